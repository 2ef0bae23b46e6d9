"""A model's tokenizer renders chats exactly as ``transformers`` does, marks exactly the assistant's tokens, and
survives a save/load round trip that ``transformers``' ``AutoTokenizer`` reads the same way."""

import errno
import json
import os
from dataclasses import replace
from datetime import date, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import tokenizers
import transformers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors

from zmaj.data import chat_template
from zmaj.data.model_tokenizer import ModelTokenizer, bos_eos_processor
from zmaj.data.tokenizer import BOS, END, EOS, PAD, Tokenizer

# ChatML as SmolLM2 and Qwen write it, with a default system turn and the tojson filter, to exercise the
# environment's conventions (trim_blocks, loop variables, filters).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|system|>You are helpful. ' + ([1, 'é'] | tojson) + '<|end|>\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="<>|"), min_size=1, max_size=30
)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    """Optionally a system turn, then user/assistant pairs, the last possibly unanswered."""
    messages = [{"role": "system", "content": draw(text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": "user", "content": draw(text)}, {"role": "assistant", "content": draw(text)}]
    return messages


@pytest.fixture(scope="module")
def model_tokenizer(tokenizer: Tokenizer) -> ModelTokenizer:
    return ModelTokenizer.from_zmaj(tokenizer)


def reference(tokenizer: ModelTokenizer, template: str) -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.tokenizer,
        chat_template=template,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
    )


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), template=st.sampled_from([chat_template.DEFAULT_TEMPLATE, CHATML]))
def test_chats_render_and_encode_as_transformers(
    model_tokenizer: ModelTokenizer, messages: list[dict[str, str]], template: str
) -> None:
    ours = ModelTokenizer(
        model_tokenizer.tokenizer,
        model_tokenizer.bos_token,
        model_tokenizer.eos_token,
        chat_template=template,
    )
    theirs = reference(ours, template)
    for add_generation_prompt in (False, True):
        rendered = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.render_chat(messages, add_generation_prompt) == rendered
        ids = theirs(rendered, add_special_tokens=False).input_ids
        assert ours.encode_chat(messages, add_generation_prompt) == ids


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_the_assistant_mask_covers_exactly_the_answers(
    model_tokenizer: ModelTokenizer, messages: list[dict[str, str]]
) -> None:
    ids, mask = model_tokenizer.encode_chat_with_mask(messages)
    assert ids == model_tokenizer.encode_chat(messages, add_generation_prompt=False)
    answers = "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")
    assert model_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], False) == answers
    prompt = "".join(
        ("<|assistant|>" if m["role"] == "assistant" else f"<|{m['role']}|>{m['content']}<|end|>")
        for m in messages
    )
    assert model_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m], False) == prompt


# The answer's first token takes in the space the template writes before it ("Assistant: Five" -> "ĠFive").
SPACED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'Assistant: ' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ 'User: ' + message['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


# ChatML with the answer marked, and the template's own newline after each answer's end marker.
MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|assistant|>' }}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


# An answer whose first word the tokenizer joins with the space before it: generated answers (any Unicode)
# rarely begin so, and the fixed examples CI draws missed it (a mutation audit found the gap).
JOINED = [
    {"role": "user", "content": "two and three?"},
    {"role": "assistant", "content": "the answer is five"},
]


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations(), template=st.sampled_from([SPACED, MARKED]))
@example(messages=JOINED, template=SPACED)
def test_the_assistant_mask_is_transformers_for_templates_that_mark_the_answer(
    model_tokenizer: ModelTokenizer, messages: list[dict[str, str]], template: str
) -> None:
    """The mask of ``transformers``' ``return_assistant_tokens_mask``: the ``{% generation %}`` blocks' text,
    and a token that begins in the template's text and ends in the answer ("ĠFive" in SPACED) is the answer's.
    Marked by where it starts, the first word of every answer went untrained; marked by the text a turn adds,
    so did MARKED's newline after the end marker."""
    ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=template)
    ids, mask = ours.encode_chat_with_mask(messages)
    theirs: Any = reference(ours, template).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(theirs["input_ids"])
    assert mask == [bool(m) for m in theirs["assistant_masks"]]
    if messages == JOINED and template == SPACED:  # the example's point, said outright
        trained = ours.decode([i for i, m in zip(ids, mask, strict=True) if m], False)
        assert trained == " the answer is five<|end|>"


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_without_generation_blocks_an_answer_ends_at_its_stop_token(
    model_tokenizer: ModelTokenizer, messages: list[dict[str, str]]
) -> None:
    """MARKED less its blocks, as SmolLM2's and Gemma's templates are: each turn is what rendering it adds, up
    to its end marker (a stop token), so the mask is MARKED's in transformers; the newline the template writes
    after the marker, which generation never reaches, went into the loss."""
    unmarked = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=unmarked, stop_tokens=("<|end|>",))
    ids, mask = ours.encode_chat_with_mask(messages)
    theirs: Any = reference(ours, MARKED).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(theirs["input_ids"])
    assert mask == [bool(m) for m in theirs["assistant_masks"]]


@pytest.mark.parametrize(
    ("eos", "stops", "tail"),
    [
        ("<|end|>", (), "<|end|>"),  # the EOS ends the turn: no stop_tokens at all
        ("<|eos|>", ("<|end|>",), "<|end|>"),  # another stop token ends it
        ("<|eos|>", ("<|end|>",), "<|end|><|eos|>"),  # both: the turn runs to the LAST one
        ("<|end|>", (), "<|end|>.<|end|>"),  # one stop twice: to its last occurrence, not its first
    ],
)
def test_an_unmarked_turn_ends_after_its_last_stop_eos_or_stop_token(
    model_tokenizer: ModelTokenizer, eos: str, stops: tuple[str, ...], tail: str
) -> None:
    """Without generation blocks, an assistant turn is trained up to its last stop token, the EOS or one of
    ``stop_tokens`` (``encode_chat_with_mask``'s docstring), and not the newline the template writes after it."""
    template = (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '"
        + tail
        + "\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    ours = ModelTokenizer(model_tokenizer.tokenizer, eos_token=eos, chat_template=template, stop_tokens=stops)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = ours.encode_chat_with_mask(messages)
    trained = ours.decode([i for i, m in zip(ids, mask, strict=True) if m], False)
    assert trained == "Hello" + tail


def test_generation_blocks_in_a_macro_mark_the_answers(model_tokenizer: ModelTokenizer) -> None:
    """A macro's output is buffered, so where its generation block lands is not the length written so far:
    taken as it was recorded (as transformers takes it), the mask trained the role markers, not the answers."""
    macro = (
        "{% macro turn(m) %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
        "{{ m['content'] + '<|end|>' }}{% endgeneration %}{% else %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endmacro %}"
        "{% for message in messages %}{{ turn(message) }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    messages = [
        {"role": "user", "content": "two and three?"},
        {"role": "assistant", "content": "five"},
        {"role": "user", "content": "and ten?"},
        {"role": "assistant", "content": "ten"},
    ]
    tokenizer = ModelTokenizer(model_tokenizer.tokenizer, chat_template=macro)
    ids, mask = tokenizer.encode_chat_with_mask(messages)
    answers = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], False)
    assert answers == "five<|end|>ten<|end|>"


ANSWER = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]


@pytest.mark.parametrize(
    ("template", "messages", "spans"),
    [
        # Buffered in a set block, then written after "xx": the length written when the block ran was 0, and
        # the text there, "x", is the answer's too, so checking the text did not catch it.
        (
            "{% set ns %}{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
            "{% endgeneration %}{% endif %}{% endfor %}{% endset %}xx{{ ns }}",
            ANSWER,
            [(2, 3)],
        ),
        # A filter over the block: what lands is the answer's text as the filter wrote it.
        (
            "{% for m in messages %}{{ m.role }}:{% filter upper %}{% generation %}{{ m.content }}"
            "{% endgeneration %}{% endfilter %};{% endfor %}",
            ANSWER,
            [(5, 6), (17, 18)],  # "user:Q;assistant:X;"
        ),
        # A filter that trims the block's text from outside it: the marks would keep its spaces, so none.
        ("{% filter trim %}{% generation %} x {% endgeneration %}{% endfilter %}", ANSWER, []),
        # In a macro, written where it is called.
        (
            "{% macro t(m) %}{% generation %}{{ m.content }}{% endgeneration %}{% endmacro %}"
            "{% for m in messages %}{{ m.role }}:{{ t(m) }};{% endfor %}",
            ANSWER,
            [(5, 6), (17, 18)],
        ),
        # A conversation holding the first private-use characters: the marks are others.
        (
            "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
            [{"role": "user", "content": "\ue000\ue001"}, {"role": "assistant", "content": "\ue002"}],
            [(0, 2), (2, 3)],
        ),
        # Jinja's "+" modifier on the tag (lstrip_blocks kept off for it).
        (
            "{% for m in messages %}{{ m.role }}:{%+ generation %}{{ m.content }}{% endgeneration %};{% endfor %}",
            ANSWER,
            [(5, 6), (17, 18)],
        ),
        # A block in a block: none.
        ("{% generation %}a{% generation %}b{% endgeneration %}{% endgeneration %}", ANSWER, []),
        # A block in a block whose outer end the template cuts off ("abx" split at "x"): still none, though
        # the inner block's marks pair up.
        pytest.param(
            "{% set s %}{% generation %}a{% generation %}b{% endgeneration %}x{% endgeneration %}{% endset %}"
            "{{ s.split('x')[0] }}",
            ANSWER,
            [],
            id="nested-outer-end-cut",
        ),
        # The template cuts the last block off before its end ("qaxb" split at "x"): the text less the marks
        # is the text, but the blocks do not pair up, so none, not the first block's alone.
        pytest.param(
            "{% set s %}{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
            "{% endset %}{{ s.split('x')[0] }}",
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "axb"}],
            [],
            id="last-block-end-cut",
        ),
    ],
)
def test_generation_spans_are_where_the_blocks_text_lands_or_none(
    template: str, messages: list[dict[str, str]], spans: list[tuple[int, int]]
) -> None:
    text, found = chat_template.render_with_generation(template, messages, add_generation_prompt=False)
    assert text == chat_template.render(template, messages, add_generation_prompt=False)
    assert found == spans


def test_a_template_that_rewrites_history_is_refused(model_tokenizer: ModelTokenizer) -> None:
    # Shows only the last turn, so the conversation so far is not a prefix of the whole.
    last_only = "{{ '<|' + messages[-1]['role'] + '|>' + messages[-1]['content'] }}"
    tokenizer = ModelTokenizer(model_tokenizer.tokenizer, chat_template=last_only)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="prefix"):
        tokenizer.encode_chat_with_mask(messages)


def test_a_template_that_ends_only_the_whole_conversation_is_refused(
    model_tokenizer: ModelTokenizer,
) -> None:
    """Ends only the whole conversation with ``<|end|>``: the first answer rendered alone ("ab<|end|>") extends the
    conversation before it ("a") but is no prefix of the whole ("abcd<|end|>"), so its span there is unknown."""
    template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if messages[-1]['role'] == 'assistant' %}<|end|>{% endif %}"
    )
    tokenizer = ModelTokenizer(model_tokenizer.tokenizer, chat_template=template)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    with pytest.raises(ValueError, match="does not render turn 1 as a prefix"):
        tokenizer.encode_chat_with_mask(messages)


def test_without_a_stop_token_an_unmarked_turn_is_trained_whole(model_tokenizer: ModelTokenizer) -> None:
    """No EOS and no stop tokens: nothing cuts the turn, so all the text it adds is the answer's."""
    ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=chat_template.DEFAULT_TEMPLATE)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = ours.encode_chat_with_mask(messages)
    assert ours.decode([i for i, m in zip(ids, mask, strict=True) if m], False) == "Hello<|end|>"


def test_by_default_a_chat_is_rendered_up_to_the_answer_as_it_is_encoded(
    model_tokenizer: ModelTokenizer,
) -> None:
    """``render_chat`` and ``encode_chat`` both default to the prompt for the model's answer."""
    messages = [{"role": "user", "content": "hi"}]
    rendered = model_tokenizer.render_chat(messages)
    assert rendered == "<|user|>hi<|end|><|assistant|>"  # DEFAULT_TEMPLATE's docstring, with the prompt
    assert model_tokenizer.encode_chat(messages) == model_tokenizer.encode(rendered, add_special_tokens=False)


def test_a_model_without_a_template_cannot_chat(model_tokenizer: ModelTokenizer) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        ModelTokenizer(model_tokenizer.tokenizer).render_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [
        ("bos_token", "<not a token>", "bos_token"),
        ("eos_token", "<not a token>", "eos_token"),
        ("pad_token", "<not a token>", "pad_token"),
        ("unk_token", "<not a token>", "unk_token"),
        ("stop_tokens", (END, "<not a token>"), "stop token"),
    ],
    ids=["bos", "eos", "pad", "unk", "stop"],
)
def test_special_tokens_must_be_in_the_vocabulary(
    model_tokenizer: ModelTokenizer, field: str, value: Any, name: str
) -> None:
    """Each special token and each stop token: one missing would be a None id, found only when it is used."""
    with pytest.raises(ValueError, match=f"^{name} '<not a token>' is not in the vocabulary$"):
        ModelTokenizer(model_tokenizer.tokenizer, **{field: value})


@pytest.mark.parametrize("add_bos", [False, True])
def test_saved_tokenizers_load_the_same_here_and_in_transformers(
    model_tokenizer: ModelTokenizer, tmp_path: Path, add_bos: bool
) -> None:
    inner = model_tokenizer.tokenizer
    if add_bos:
        inner = type(inner).from_str(inner.to_str())
        inner.post_processor = bos_eos_processor(inner, model_tokenizer.bos_token, None)
    ours = ModelTokenizer(
        inner,
        model_tokenizer.bos_token,
        model_tokenizer.eos_token,
        model_tokenizer.pad_token,
        add_bos=add_bos,
        chat_template=model_tokenizer.chat_template,
        stop_tokens=model_tokenizer.stop_tokens,
    )
    ours.save(tmp_path)
    loaded = ModelTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = ["def f(x):\n    return x  # é 漢字", "<|user|>literal markers<|end|>", " spaces  "]
    for text in texts:
        assert loaded.encode(text) == ours.encode(text) == theirs(text).input_ids
        assert (loaded.encode(text)[0] == ours.bos_id) == add_bos
    assert loaded.add_bos == add_bos
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        ours.bos_token,
        ours.eos_token,
        ours.pad_token,
    )
    assert loaded.chat_template == theirs.chat_template == ours.chat_template
    messages = [{"role": "user", "content": "hi"}]
    expected: Any = theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert loaded.encode_chat(messages) == expected["input_ids"]


@pytest.mark.parametrize("processor", ["none", "bos", "own"])
@pytest.mark.parametrize(
    "flags", [{}, {"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True}]
)
def test_add_bos_and_eos_flags_beside_a_tokenizer_json_are_read_as_transformers_reads_them(
    model_tokenizer: ModelTokenizer, tmp_path: Path, processor: str, flags: dict[str, bool]
) -> None:
    """transformers >= 5 drops the config's flags beside a ``tokenizer.json``, whose post-processor decides (none
    adds nothing); zmaj rebuilt the post-processor from the flags, as 4.x did, and added other tokens."""
    model_tokenizer.save(tmp_path)
    written = json.loads((tmp_path / "tokenizer.json").read_text())
    inner = type(model_tokenizer.tokenizer).from_str(model_tokenizer.tokenizer.to_str())
    if processor == "bos":
        inner.post_processor = bos_eos_processor(inner, model_tokenizer.bos_token, None)
    written["post_processor"] = None if processor == "none" else json.loads(inner.to_str())["post_processor"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(written))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("add_bos_token", "add_eos_token")} | flags
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = ModelTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ("hi", "def f(x):\n    return x"):
        assert loaded.encode(text) == theirs(text).input_ids
    assert loaded.add_bos == (processor == "bos")


def test_saving_keeps_the_stop_tokens_and_the_models_other_generation_settings(
    model_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "max_length": 77}))
    model_tokenizer.save(tmp_path)
    loaded = ModelTokenizer.load(tmp_path)
    assert loaded.stop_ids == model_tokenizer.stop_ids
    assert len(model_tokenizer.stop_ids) == 2  # <|eos|> and <|end|>
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_length"] == 77


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_save_that_fails_keeps_every_old_file_whole(
    model_tokenizer: ModelTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """A fine-tuning run saves its tokenizer into its run folder; written in place, a full disk (or a kill)
    during the n-th file left it cut short. The files before it are new, the failing one and those after it old."""
    names = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    for name in names:
        (tmp_path / name).write_text('{"old": true}')
    calls = 0

    def fsync(descriptor: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2 * failing - 1:  # each file's bytes, then its folder, are flushed to disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        model_tokenizer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert [(tmp_path / name).read_text() == '{"old": true}' for name in names] == [
        i >= failing for i in range(1, 4)
    ]


def test_a_generation_config_without_eos_loads_as_in_transformers(
    model_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    # An export of a model without EOS spells its ids out as null.
    ModelTokenizer(model_tokenizer.tokenizer, bos_token=model_tokenizer.bos_token).save(tmp_path)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": None, "pad_token_id": None})
    )
    loaded = ModelTokenizer.load(tmp_path)
    assert loaded.stop_ids == ()
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id is None
    for bad in ("2", True, [1, False]):  # JSON's true is no token id, though Python's bool is an int
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be"):
            ModelTokenizer.load(tmp_path)


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ raise_exception('System role not supported') }}", "System role not supported"),
        ("{% for message in messages %}", "Unexpected end of template"),
        ("{{ messages[0]['content'] + 1 }}", "str"),
        ("{{ 1 / (messages | length - 1) }}", "division by zero"),
        ("{{ '%(a)s' % {} }}", "'a'"),
    ],
)
def test_a_template_that_fails_is_a_value_error_where_transformers_fails_too(
    model_tokenizer: ModelTokenizer, template: str, message: str
) -> None:
    """A template's refusal, a syntax error and a template's own bugs (a TypeError, a ZeroDivisionError) are each
    one line."""
    ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=template)
    messages = [{"role": "system", "content": "hi"}]
    with pytest.raises(Exception, match=message):
        reference(ours, template).apply_chat_template(messages, tokenize=False)
    with pytest.raises(ValueError, match=f"^chat template: .*{message}"):
        ours.render_chat(messages)


def test_a_templates_own_python_error_is_named_by_its_type(model_tokenizer: ModelTokenizer) -> None:
    """A KeyError's message is the bare key (``'a'``); a refusal of the template's own is its message alone."""
    for template, said in [
        ("{{ '%(a)s' % {} }}", "KeyError: 'a'"),
        ("{{ 'abc'.index('z') }}", "ValueError: substring not found"),
        ("{{ raise_exception('no system role') }}", "no system role"),
    ]:
        ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=template)
        with pytest.raises(ValueError, match=f"^chat template: {said}$"):
            ours.render_chat([{"role": "user", "content": "hi"}])


def test_chat_template_jinja_wins_over_the_config_and_saving_replaces_it(
    model_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    model_tokenizer.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}FILE:{{ m['content'] }}{% endfor %}"
    )
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rendered = theirs.apply_chat_template(messages, tokenize=False)
    assert ModelTokenizer.load(tmp_path).render_chat(messages, add_generation_prompt=False) == rendered
    assert rendered == "FILE:hi"
    model_tokenizer.save(tmp_path)  # its own template, not the file's, is what loads back
    assert ModelTokenizer.load(tmp_path).chat_template == model_tokenizer.chat_template
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).chat_template == model_tokenizer.chat_template


def test_a_list_of_named_templates_renders_its_default_as_in_transformers(
    model_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    model_tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    templates = [
        {"name": "tool_use", "template": "{% for m in messages %}T:{{ m['content'] }}{% endfor %}"},
        {"name": "default", "template": "{% for m in messages %}D:{{ m['content'] }}{% endfor %}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": templates}))
    rendered = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False
    )
    assert (
        ModelTokenizer.load(tmp_path).render_chat(messages, add_generation_prompt=False) == rendered == "D:hi"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": templates[:1]}))
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json: chat_template lists no template named 'default'"
    ):
        ModelTokenizer.load(tmp_path)


@pytest.mark.parametrize("bos_token", [None, "<|bos|>"])
def test_a_missing_special_token_is_undefined_as_in_transformers(
    model_tokenizer: ModelTokenizer, bos_token: str | None
) -> None:
    template = (
        "{{ bos_token }}{% if pad_token is defined %}[pad {{ pad_token }}]{% endif %}"
        "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    )
    ours = ModelTokenizer(
        model_tokenizer.tokenizer, bos_token, model_tokenizer.eos_token, chat_template=template
    )
    messages = [{"role": "user", "content": "hi"}]
    rendered = reference(ours, template).apply_chat_template(messages, tokenize=False)
    assert ours.render_chat(messages) == rendered == f"{bos_token or ''}hi<|eos|>"


@pytest.mark.parametrize(
    "template",
    [
        # transformers' mark of the assistant's text, with whitespace control and a variable set inside it
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{%- generation -%}\n{{ m['content'] }}"
        "{% set inside = 1 %}{% endgeneration %}</a>{% else %}<u>{{ m['content'] }}</u>{% endif %}"
        "{% endfor %}"
        "{{ inside is defined }}",
        # tools and documents are defined, as None
        "{% if tools is not none %}[TOOLS]{{ tools | tojson }}{% endif %}{% if documents is not none %}[DOCS]"
        "{% endif %}{{ tools is defined and documents is defined }}{{ messages[0]['content'] }}",
    ],
)
def test_the_environment_has_transformers_extras(model_tokenizer: ModelTokenizer, template: str) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=template)
    assert ours.render_chat(messages) == reference(ours, template).apply_chat_template(
        messages, tokenize=False
    )


def test_the_unknown_token_is_saved_and_named_to_templates_as_in_transformers(
    model_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    inner = type(model_tokenizer.tokenizer).from_str(model_tokenizer.tokenizer.to_str())
    inner.add_special_tokens(["<unk>"])
    template = "{{ unk_token }}|{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ModelTokenizer(inner, unk_token="<unk>", chat_template=template).save(tmp_path)
    loaded = ModelTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.unk_token == theirs.unk_token == "<unk>"
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.render_chat(messages) == theirs.apply_chat_template(messages, tokenize=False) == "<unk>|hi"


@pytest.fixture(scope="module")
def zmaj_tokenizer() -> ModelTokenizer:
    return ModelTokenizer.from_zmaj(Tokenizer.train(["the quick brown fox\n"] * 10, vocab_size=300))


def test_eos_is_the_first_stop_token(zmaj_tokenizer: ModelTokenizer) -> None:
    """``transformers`` pads with the first ``eos_token_id`` when there is no pad token: EOS must lead, in
    ``stop_ids`` and in the exported generation config (the suite compared only the set's size and a round trip)."""
    assert zmaj_tokenizer.stop_ids[0] == zmaj_tokenizer.eos_id
    assert zmaj_tokenizer.generation_config()["eos_token_id"][0] == zmaj_tokenizer.eos_id


def _bos_and_eos_folder(tokenizer: ModelTokenizer, folder: Path) -> Path:
    inner = type(tokenizer.tokenizer).from_str(tokenizer.tokenizer.to_str())
    inner.post_processor = bos_eos_processor(inner, tokenizer.bos_token, tokenizer.eos_token)
    ModelTokenizer(inner, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token).save(folder)
    return folder


def test_a_tokenizer_that_appends_eos_is_read_and_saved_so(
    zmaj_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """``add_eos`` records what the post-processor does, for saving (``add_eos = False`` always passed)."""
    loaded = ModelTokenizer.load(_bos_and_eos_folder(zmaj_tokenizer, tmp_path))
    assert loaded.encode("hi")[-1] == loaded.eos_id
    assert loaded.add_eos
    loaded.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["add_eos_token"] is True


@pytest.mark.parametrize(
    ("single", "flag", "at"), [(f"$A:0 {END}:0", "add_eos", -1), (f"{END}:0 $A:0", "add_bos", 0)]
)
def test_a_tokenizer_that_adds_another_token_than_bos_or_eos_is_not_read_as_adding_them(
    zmaj_tokenizer: ModelTokenizer, tmp_path: Path, single: str, flag: str, at: int
) -> None:
    """``add_eos`` is EOS appended, not anything appended, and ``add_bos`` BOS prepended: ``$A <|end|>`` saved
    as ``add_eos_token: true`` would tell transformers 4.x to rebuild the post-processor with an EOS the model
    never saw."""
    inner = type(zmaj_tokenizer.tokenizer).from_str(zmaj_tokenizer.tokenizer.to_str())
    inner.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(END, inner.token_to_id(END))]
    )
    ModelTokenizer(inner, zmaj_tokenizer.bos_token, zmaj_tokenizer.eos_token, zmaj_tokenizer.pad_token).save(
        tmp_path
    )
    loaded = ModelTokenizer.load(tmp_path)
    assert loaded.encode("hi")[at] == inner.token_to_id(END)
    assert not getattr(loaded, flag)


def test_a_tokenizer_that_adds_bos_and_eos_is_read_as_adding_both(
    zmaj_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """With EOS appended as well, what was measured as the prefix the post-processor adds was BOS and the text's
    first token, so add_bos was read False and saved as ``add_bos_token: false`` beside a tokenizer.json that adds
    it."""
    loaded = ModelTokenizer.load(_bos_and_eos_folder(zmaj_tokenizer, tmp_path))
    assert loaded.encode("hi")[0] == loaded.bos_id
    assert loaded.add_bos
    loaded.save(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, True)


def test_special_tokens_written_as_added_token_objects_load_as_in_transformers(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """Many Hub tokenizers write ``"bos_token": {"__type": "AddedToken", "content": "<s>", ...}``; taken as a
    string, that dict is no token of the vocabulary, and the folder fails to load."""
    ModelTokenizer.from_zmaj(tokenizer).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    for name in ("bos_token", "eos_token", "pad_token"):
        config[name] = {
            "__type": "AddedToken",
            "content": config[name],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = ModelTokenizer.load(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS, EOS, PAD)
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == (BOS, EOS, PAD)


# Whitespace after block tags (trim_blocks), indentation before them (lstrip_blocks), {% continue %}
# (loopcontrols) and strftime_now: each a convention published templates (Llama 3.x, Qwen) rely on, and none
# of which the suite's templates (written on one line, without loop controls or dates) depended on.
CONVENTIONS = """{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
<{{ m['role'] }}>
{{ m['content'] }}
{% endfor %}
{% if add_generation_prompt %}<assistant> {{ strftime_now('%d %b %Y') }}{% endif %}"""


def test_published_template_conventions_render_as_in_transformers(tokenizer: Tokenizer) -> None:
    """zmaj promises to render every template exactly as ``apply_chat_template``."""
    ours = ModelTokenizer(ModelTokenizer.from_zmaj(tokenizer).tokenizer, chat_template=CONVENTIONS)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.tokenizer, chat_template=CONVENTIONS)
    messages = [
        {"role": "system", "content": "hidden"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    for add_generation_prompt in (False, True):
        expected = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.render_chat(messages, add_generation_prompt) == expected


def test_a_pinned_day_is_what_strftime_now_tells_in_every_rendering(tokenizer: Tokenizer) -> None:
    """Fine-tuning pins the run's day (``today``), so that Llama 3.2's "Today Date" does not change a run's
    conversations with the calendar; with no day pinned the template reads the clock, as in ``transformers``."""
    template = "{{ strftime_now('%d %b %Y %H:%M') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    dated = "{{ strftime_now('%d %b %Y') }}{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    pinned = ModelTokenizer(
        ModelTokenizer.from_zmaj(tokenizer).tokenizer, chat_template=template, today=date(2024, 7, 26)
    )
    assert pinned.render_chat(messages, False) == "26 Jul 2024 00:00hiyo"
    clock = replace(pinned, today=None).render_chat(messages, False)
    assert clock.startswith(datetime.now().strftime("%d %b %Y")), clock  # (a test run past midnight: rerun)
    with_blocks = replace(pinned, chat_template=dated)
    ids, mask = with_blocks.encode_chat_with_mask(messages)
    assert with_blocks.decode(ids) == "26 Jul 2024hiyo"
    assert with_blocks.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "hiyo"


def test_templates_run_sandboxed(tokenizer: Tokenizer) -> None:
    """A chat template comes with a downloaded model: like transformers, zmaj runs it in Jinja's immutable
    sandbox, where changing the conversation or reaching Python's internals is refused."""
    for template in ("{{ messages.append(messages[0]) }}", "{{ messages.__class__.__mro__ }}"):
        with pytest.raises(ValueError, match=r"^chat template: access to attribute .* is unsafe"):
            chat_template.render(template, [{"role": "user", "content": "hi"}], False)


def test_the_bos_eos_processor_types_a_pairs_second_text_as_transformers_does(
    model_tokenizer: ModelTokenizer,
) -> None:
    """``update_post_processor`` writes a pair as ``BOS A EOS BOS B EOS``, the second half of type 1."""
    inner = type(model_tokenizer.tokenizer).from_str(model_tokenizer.tokenizer.to_str())
    inner.post_processor = bos_eos_processor(inner, BOS, EOS)
    first, second = (inner.encode(t, add_special_tokens=False).ids for t in ("def f", "(x)"))
    bos, eos = inner.token_to_id(BOS), inner.token_to_id(EOS)
    pair = inner.encode("def f", "(x)")
    assert pair.ids == [bos, *first, eos, bos, *second, eos]
    assert pair.type_ids == [0] * (len(first) + 2) + [1] * (len(second) + 2)


def test_the_vocabulary_size_counts_added_tokens_as_transformers_does(
    model_tokenizer: ModelTokenizer,
) -> None:
    """An added token's id is past the model's own vocabulary, so the embedding needs a row for it."""
    inner = type(model_tokenizer.tokenizer).from_str(model_tokenizer.tokenizer.to_str())
    inner.add_tokens(["<added>"])
    ours = ModelTokenizer(inner)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=inner)
    assert ours.vocab_size == len(theirs) == model_tokenizer.vocab_size + 1
    assert ours.token_id("<added>") == ours.vocab_size - 1


def test_a_stop_token_named_twice_or_as_eos_too_is_one_stop_id(model_tokenizer: ModelTokenizer) -> None:
    """Each stop id once, EOS first; a single one is written as ``transformers`` writes it, an id, not a list."""
    ours = ModelTokenizer(model_tokenizer.tokenizer, eos_token=END, stop_tokens=(END, EOS, EOS))
    end, eos = ours.token_id(END), ours.token_id(EOS)
    assert ours.stop_ids == (end, eos)
    assert ours.generation_config()["eos_token_id"] == [end, eos]
    single = replace(ours, stop_tokens=(END,))
    assert single.stop_ids == (end,)
    assert single.generation_config()["eos_token_id"] == end


def test_a_saved_wordpiece_tokenizer_decodes_in_transformers_as_here(tmp_path: Path) -> None:
    """Told to clean up tokenization spaces, ``transformers`` decodes WordPiece's "it ' s" as "it's" (4.x
    BPE's "Hello ." as "Hello." too): the saved config must not ask, so that it decodes as zmaj does."""
    vocab = {word: i for i, word in enumerate(["[UNK]", "hello", ",", "world", ".", "it", "'", "s"])}
    inner = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    inner.decoder = decoders.WordPiece()
    ours = ModelTokenizer(inner, unk_token="[UNK]")
    ours.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = ours.encode("hello, world. it's")
    assert ids == theirs("hello, world. it's").input_ids
    assert theirs.decode(ids) == ours.decode(ids)


@pytest.mark.parametrize(
    ("name", "content", "complaint"),
    [
        ("tokenizer_config.json", [], r"tokenizer_config\.json is not a JSON object"),
        ("generation_config.json", [2], r"generation_config\.json is not a JSON object"),
        (
            "tokenizer_config.json",
            {"chat_template": 5},
            r"tokenizer_config\.json: chat_template must be a template or a list of named ones, got 5",
        ),
    ],
    ids=["config-not-an-object", "generation-config-not-an-object", "template-not-text"],
)
def test_a_malformed_config_fails_naming_its_file(
    model_tokenizer: ModelTokenizer, tmp_path: Path, name: str, content: Any, complaint: str
) -> None:
    model_tokenizer.save(tmp_path)
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=complaint):
        ModelTokenizer.load(tmp_path)


def test_a_list_of_templates_passes_over_entries_that_are_not_named_templates(
    model_tokenizer: ModelTokenizer, tmp_path: Path
) -> None:
    """An entry that is no ``{name, template}`` object names no template: the default is still found."""
    model_tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    default = "{% for m in messages %}D:{{ m['content'] }}{% endfor %}"
    templates = ["stray", {"name": "default", "template": default}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": templates}))
    assert ModelTokenizer.load(tmp_path).chat_template == default


def test_any_sequence_of_mappings_renders_as_the_list_of_dicts_transformers_gets(
    model_tokenizer: ModelTokenizer,
) -> None:
    """``render`` takes any sequence of mappings (here a tuple of read-only ones): the template sees the list of
    dicts that ``apply_chat_template`` gives it, which it may extend and serialize."""
    template = "{{ (messages + [{'role': 'user', 'content': 'more'}]) | tojson }}"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=template)
    expected = reference(ours, template).apply_chat_template(messages, tokenize=False)
    assert ours.render_chat(tuple(MappingProxyType(m) for m in messages)) == expected


def test_tojson_takes_the_keywords_of_transformers_filter(model_tokenizer: ModelTokenizer) -> None:
    template = "{{ messages[0] | tojson(indent=2, separators=(',', ': '), sort_keys=True) }}"
    messages = [{"role": "user", "content": "é"}]
    ours = ModelTokenizer(model_tokenizer.tokenizer, chat_template=template)
    expected = reference(ours, template).apply_chat_template(messages, tokenize=False)
    assert ours.render_chat(messages) == expected == '{\n  "content": "é",\n  "role": "user"\n}'
