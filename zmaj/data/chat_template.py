"""Chat templates: the Jinja programs that turn a conversation into the exact text a chat model was tuned on.

An instruct model only answers properly when its prompt looks like its fine-tuning data, role markers and all,
and those markers differ per model family (``<|im_start|>user``, ``<start_of_turn>user``, ...). Hugging Face
stores the template with the tokenizer (``chat_template`` in ``tokenizer_config.json``, or in a GGUF file's
metadata) and renders it with a sandboxed Jinja environment whose conventions every published template relies
on: ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` block, a
``tojson`` filter that keeps non-ASCII text, the globals ``raise_exception`` and ``strftime_now``, and
``tools`` and ``documents`` defined, as None when there are none
(https://huggingface.co/docs/transformers/chat_templating_writing). This module sets up the same environment, so
zmaj renders every template exactly as ``transformers``' ``apply_chat_template`` does.

zmaj's own models use :data:`DEFAULT_TEMPLATE`, written with the role tokens reserved by ``zmaj.data.tokenizer``.
"""

import json
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import date, datetime
from functools import cache
from itertools import islice
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, str]

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""zmaj's template: ``<|user|>Hi<|end|><|assistant|>Hello!<|end|>``; the model ends its turn with ``<|end|>``."""


def render(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    today: date | None = None,
    **tokens: str | None,
) -> str:
    """The conversation as the template writes it; ``tokens`` are the special tokens it may name (``bos_token``
    ...), of which those that are None stay undefined, as in ``transformers``: ``{{ bos_token }}`` then writes
    nothing, not "None". With ``add_generation_prompt`` the text ends where the assistant's answer begins.
    ``today`` is what ``strftime_now`` (Llama 3.2's "Today Date") tells: midnight of that day, or the clock's
    time when None; training pins it, so that a run's conversations do not change with the calendar.

    A template that does not compile, refuses the conversation (``raise_exception``: "System role not
    supported") or fails on it is a ValueError with Jinja's message, so programs report it in one line."""
    return _render(template, messages, add_generation_prompt, tokens, today, marks=None)


def render_with_generation(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    today: date | None = None,
    **tokens: str | None,
) -> tuple[str, list[tuple[int, int]]]:
    """:func:`render`, and where the text of each ``{% generation %}`` block lands in it (start, end), as
    ``transformers``' ``return_assistant_tokens_mask`` means them: a template that marks the assistant's text
    itself says exactly what is the answer's, where the text a turn adds also holds the template's own (the
    newline after ``<|im_end|>``).

    Found by rendering a second time with each block's text between two characters of Unicode's private use
    area that the text does not hold (:func:`_free_marks`), which pass through whatever the template does with
    it: a block inside a macro, a ``{% set %}`` block or a filter is written into a buffer first, so the length
    written so far, which ``transformers`` records as its start, is not where it lands (there it trains the role
    markers). No spans (``[]``) when the marks cannot be trusted: the template did more than move the marked
    text (a filter that trims it, a block nested in a block), so that the second rendering less its marks is not
    the first. A template without blocks is rendered once."""
    text = _render(template, messages, add_generation_prompt, tokens, today, marks=None)
    if not _GENERATION_TAG.search(template):
        return text, []
    marks = _free_marks(text)
    if marks is None:
        return text, []
    unmarked = _unmark(_render(template, messages, add_generation_prompt, tokens, today, marks), marks)
    if unmarked is None or unmarked[0] != text:
        return text, []
    return unmarked


_GENERATION_TAG = re.compile(r"{%[-+]?\s*generation\b")


def _free_marks(text: str) -> tuple[str, str] | None:
    """Two characters of the private use area (U+E000 to U+F8FF, which no standard assigns) not in ``text``;
    None if it holds all but one."""
    free = list(islice((mark for mark in map(chr, range(0xE000, 0xF900)) if mark not in text), 2))
    return (free[0], free[1]) if len(free) == 2 else None


def _render(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    tokens: Mapping[str, str | None],
    today: date | None,
    marks: tuple[str, str] | None,
) -> str:
    """The template's text, each generation block's between ``marks`` when given."""
    marking = _marks.set(marks)
    try:
        return _compiled(template).render(
            messages=[dict(message) for message in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,  # zmaj passes none; templates test `tools is not none`
            documents=None,
            strftime_now=_strftime_now if today is None else _strftime_on(today),
            **{name: token for name, token in tokens.items() if token is not None},
        )
    # The template's own bugs, which its code raises as Python would: "a" + 1, 1 / 0.
    except (jinja2.TemplateError, TypeError, ArithmeticError, ValueError, LookupError) as error:
        # Python's own errors are named by their type: a KeyError's message is the bare key.
        said = str(error) if isinstance(error, jinja2.TemplateError) else f"{type(error).__name__}: {error}"
        raise ValueError(f"chat template: {said}") from error
    finally:
        _marks.reset(marking)


def _unmark(marked: str, marks: tuple[str, str]) -> tuple[str, list[tuple[int, int]]] | None:
    """The text without its ``marks`` and the spans they enclosed; None if they do not pair up in order."""
    pieces, spans, length, start = [], [], 0, None
    for piece in re.split(f"([{''.join(marks)}])", marked):
        if piece == marks[0] and start is None:
            start = length
        elif piece == marks[1] and start is not None:
            spans.append((start, length))
            start = None
        elif piece in marks:  # a block in a block, or an end without a start
            return None
        else:
            pieces.append(piece)
            length += len(piece)
    return ("".join(pieces), spans) if start is None else None


@cache
def _compiled(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


_marks: ContextVar[tuple[str, str] | None] = ContextVar("marks", default=None)
"""The characters generation blocks write their text between, if any (:func:`render_with_generation`)."""


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}``, which writes its body, between marks in
    :func:`render_with_generation`'s second rendering. As in ``transformers``, the body is a caller (a macro),
    so what it sets stays inside."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 types it as a plain attribute)

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        text = caller()
        marks = _marks.get()
        return f"{marks[0]}{text}{marks[1]}" if marks is not None else text


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def today() -> date:
    """The clock's day, which ``strftime_now`` tells where no day is pinned."""
    return datetime.now().date()


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _strftime_on(today: date) -> Callable[[str], str]:
    """``strftime_now`` for a pinned day: its midnight, formatted."""
    midnight = datetime.combine(today, datetime.min.time())
    return midnight.strftime
