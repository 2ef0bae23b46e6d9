"""Reading the text files a user names: UTF-8 text, JSON and JSON lines, with errors that say where.

A file that is not what it should be (a binary file given as text, a jsonl line that is not JSON) is the user's
mistake, not a bug in zmaj, so it deserves one line naming the file and the place: the byte offset of the first
byte that is not UTF-8, or ``file:line``. Programs print that line and exit with status 2 instead of showing a
traceback from deep inside a decoder. Both errors are ``ValueError``s, which every program already reports so.
Every reader of a user's text file in zmaj goes through this module, which sits below every package that
reads one (data, convert, train, publish) and below ``zmaj.specfile``, so that none of them imports another
for it.
"""

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class NotTextError(ValueError):
    """A file that should be UTF-8 text is not: the message names it and the offset of the first bad byte."""


class NotJSONError(ValueError):
    """A file, or a line of a jsonl file, that should be JSON is not: the message names ``file:line``."""


def read_text(path: str | Path) -> str:
    """The file's text, decoded as UTF-8 exactly as stored: line endings are kept, not translated to ``\\n``
    (``Path.read_text`` would turn ``\\r\\n`` into ``\\n``, changing what a model reads and how many bytes a
    perplexity is measured over)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start]
        raise NotTextError(f"{path}: not UTF-8 text (byte 0x{bad:02x} at offset {error.start})") from error


def read_json(path: str | Path) -> Any:
    """The JSON value a whole file holds (a config, an index)."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise NotJSONError(f"{path}:{error.lineno}: not JSON ({error.msg}, column {error.colno})") from error


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Each non-blank line's JSON value with its 1-based line number, to name it in later errors.

    Read a line at a time, so that a corpus shard of gigabytes never sits in memory whole (it took 1.9x the
    file's size: its bytes, their text and its lines). Lines end at ``\\n`` only (a ``\\r`` before it is JSON
    whitespace): ``str.splitlines`` would also split at characters JSON allows unescaped inside strings (U+2028,
    U+2029), misnumbering every later line. A byte that is not UTF-8 is found at its line, not before the first.
    """
    with Path(path).open("rb") as file:
        offset = 0
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                where = offset + error.start
                raise NotTextError(
                    f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {where}, line {number})"
                ) from error
            offset += len(raw)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise NotJSONError(
                    f"{path}:{number}: not JSON ({error.msg}, column {error.colno})"
                ) from error
            yield number, value


def not_utf8(text: str) -> str | None:
    """Why ``text``, typed by a user (a command-line flag, a line of stdin), is not UTF-8 text, or None.

    Python hands bytes that are not UTF-8 over as lone surrogates (PEP 383: ``b"caf\\xe9"`` is ``"caf\\udce9"``),
    which a tokenizer refuses with a ``TypeError`` from deep inside; this names the byte instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        return f"not UTF-8 text ({what} at character {error.start})"
    return None


def checked_utf8(text: str) -> str:
    """A pydantic validator for text a model reads from a spec or a data file (a system message): :func:`not_utf8`
    as a ValueError, which validation names by field."""
    if (problem := not_utf8(text)) is not None:
        raise ValueError(problem)
    return text


def utf8(text: str) -> str:
    """An argparse type for text a model reads (a prompt, a system message): :func:`not_utf8` as the error
    argparse reports naming the flag, with exit status 2."""
    if (problem := not_utf8(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text
