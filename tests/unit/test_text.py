"""``zmaj.text``: a user's file read exactly, or one line naming the file and where it goes wrong."""

import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmaj.text import NotJSONError, NotTextError, read_json, read_jsonl, read_text

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=8,
)


@contextmanager
def written(data: bytes) -> Iterator[Path]:
    """``data`` in a file of its own for the block (hypothesis runs many examples in one ``tmp_path``)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file.txt"
        path.write_bytes(data)
        yield path


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@given(st.text())
def test_text_is_read_exactly_line_endings_included(text: str) -> None:
    with written(text.encode("utf-8")) as path:
        assert read_text(path) == text


@given(st.text(), st.binary(min_size=1))
def test_the_error_names_the_file_and_the_first_byte_that_is_not_utf8(prefix: str, tail: bytes) -> None:
    data = prefix.encode("utf-8") + tail
    with written(data) as path:
        if is_utf8(data):
            assert read_text(path) == data.decode("utf-8")
            return
        with pytest.raises(NotTextError) as caught:
            read_text(path)
    pattern = rf"{re.escape(str(path))}: not UTF-8 text \(byte 0x([0-9a-f]{{2}}) at offset (\d+)\)"
    found = re.fullmatch(pattern, str(caught.value))
    assert found is not None, str(caught.value)
    offset = int(found[2])
    # Where valid text ends: everything before the offset decodes, and no character starts at it.
    assert int(found[1], 16) == data[offset]
    assert offset >= len(prefix.encode("utf-8"))
    assert is_utf8(data[:offset])
    assert not any(is_utf8(data[offset : offset + n]) for n in range(1, 5))


def test_a_binary_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(
        NotTextError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0x89 at offset 0\)$"
    ):
        read_text(path)


@given(
    st.lists(JSON_VALUES, max_size=5),
    st.lists(st.sampled_from(["\n", "\r\n", "\n  \n", "\n\n"]), min_size=5, max_size=5),
)
def test_jsonl_gives_each_value_with_its_line_number(values: list[Any], ends: list[str]) -> None:
    lines = [json.dumps(value, ensure_ascii=False) + end for value, end in zip(values, ends, strict=False)]
    expected, number = [], 1
    for value, line in zip(values, lines, strict=True):
        expected.append((number, value))
        number += line.count("\n")
    with written("".join(lines).encode("utf-8")) as path:
        assert list(read_jsonl(path)) == expected


def test_a_line_separator_inside_a_json_string_does_not_start_a_line() -> None:
    rows = [{"text": "one\u2028two\x85three"}, {"text": "four"}]
    with written("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")) as path:
        assert list(read_jsonl(path)) == [(1, rows[0]), (2, rows[1])]


def test_a_jsonl_line_that_is_not_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{a: 2}\n')
    with pytest.raises(NotJSONError, match=rf"^{re.escape(str(path))}:3: not JSON \(.*column 2\)$"):
        list(read_jsonl(path))


def test_a_binary_jsonl_file_names_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff\n')
    with pytest.raises(NotTextError, match=r"byte 0xff at offset 9, line 2\)$"):
        list(read_jsonl(path))


@given(
    st.lists(st.text().map(json.dumps) | st.sampled_from(["", "  ", "\r"]), max_size=5),
    st.binary(min_size=1, max_size=8),
)
def test_jsonl_read_a_line_at_a_time_names_the_first_bad_byte_as_the_whole_file_does(
    lines: list[str], tail: bytes
) -> None:
    """A line at a time (a shard of gigabytes is never in memory whole), yet the same first bad byte as the
    whole file's decoding, blank lines before it counted: a UTF-8 character never spans the newline byte."""
    data = "".join(line + "\n" for line in lines).encode("utf-8") + tail + b"\n"
    with written(data) as path:
        if is_utf8(data):
            return
        with pytest.raises(NotTextError) as whole:
            read_text(path)
        with pytest.raises(NotTextError) as by_line:
            list(read_jsonl(path))
    found = re.fullmatch(r".* at offset (\d+)\)", str(whole.value))
    assert found is not None
    line = data[: int(found[1])].count(b"\n") + 1
    assert str(by_line.value) == str(whole.value).removesuffix(")") + f", line {line})"


def test_json_is_read_and_its_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": [1, 2]}')
    assert read_json(path) == {"a": [1, 2]}
    path.write_bytes(b'{\n  "a": 1,\n}\n')
    with pytest.raises(NotJSONError, match=rf"^{re.escape(str(path))}:3: not JSON"):
        read_json(path)


@pytest.mark.parametrize("text", ["a\r\nb\r\n", "a\rb", "x\r\n\r\n"])
def test_crlf_line_endings_are_read_as_stored(tmp_path: Path, text: str) -> None:
    """The docstring's promise, with the case that matters written out: 40 random ``st.text()`` examples almost
    never hold a ``\\r\\n``, so a reader that translated line endings passed."""
    path = tmp_path / "file.txt"
    path.write_bytes(text.encode())
    assert read_text(path) == text
