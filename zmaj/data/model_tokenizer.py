"""The tokenizer of a model you run: a ``tokenizers.Tokenizer`` plus the conventions around it.

A vocabulary is not enough to talk to a model: it also matters whether a prompt starts with a BOS token, which
tokens end an answer, and how a conversation is written (its chat template, ``zmaj.data.chat_template``). Hugging
Face keeps the vocabulary in ``tokenizer.json`` and those conventions in ``tokenizer_config.json`` (and the stop
tokens in ``generation_config.json``); a GGUF file keeps all of them in its metadata (``zmaj.convert.gguf``);
zmaj's own pre-trained models use ``zmaj.data.tokenizer`` with :data:`~zmaj.data.chat_template.DEFAULT_TEMPLATE`.
:class:`ModelTokenizer` is the one shape all three load into, and what the programs (generate, chat,
perplexity) and fine-tuning use.

Unlike the pre-training tokenizer, special tokens written in the text *are* parsed here, as ``transformers``
does: a rendered chat template spells its role markers as text, and they must become the marker tokens.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from zmaj.data import chat_template
from zmaj.data.chat_template import Message
from zmaj.data.tokenizer import BOS, END, EOS, PAD, Tokenizer, read_tokenizer_file
from zmaj.fileio import atomic_write_text
from zmaj.text import read_json, read_text

TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class ModelTokenizer:
    """A tokenizer with its special tokens, BOS/EOS conventions and chat template.

    ``tokenizer``'s post-processor already adds BOS (and EOS) when encoding with special tokens, as the model's
    own configuration asks (``add_bos``/``add_eos`` record it, for saving). ``stop_tokens`` end generation
    besides ``eos_token`` (an instruct model's end-of-turn marker, say). ``unk_token`` is kept for saving and
    for templates that name it; the vocabulary's own model decides what becomes it.
    """

    tokenizer: tokenizers.Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    stop_tokens: tuple[str, ...] = ()
    today: date | None = None
    """What the chat template's ``strftime_now`` tells (``chat_template.render``): None, the clock; fine-tuning
    pins the run's day (its spec's ``chat_date``). Not saved: it is the run's, not the tokenizer's."""

    def __post_init__(self) -> None:
        self.tokenizer.encode_special_tokens = False
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, name)
            if token is not None and self.tokenizer.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the vocabulary")
        for token in self.stop_tokens:
            if self.tokenizer.token_to_id(token) is None:
                raise ValueError(f"stop token {token!r} is not in the vocabulary")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every token that ends a generated answer: EOS first (``transformers`` pads with the first when there
        is no pad token), then the extra stop tokens."""
        names = ((self.eos_token,) if self.eos_token is not None else ()) + self.stop_tokens
        ids = (self.tokenizer.token_to_id(name) for name in names)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids, with BOS/EOS where the model's configuration adds them (unless ``add_special_tokens=False``)."""
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation in the model's chat template; a model without one cannot chat, and says so."""
        return chat_template.render(
            self._template(), messages, add_generation_prompt, self.today, **self._special_tokens()
        )

    def _template(self) -> str:
        if self.chat_template is None:
            raise ValueError("this model's tokenizer has no chat template: use a plain prompt, not --chat")
        return self.chat_template

    def _special_tokens(self) -> dict[str, str | None]:
        """The special tokens a chat template may name."""
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation's ids; the template writes any BOS itself, so none is added (as in
        ``transformers``' ``apply_chat_template``)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def encode_chat_with_mask(self, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
        """The conversation's ids and, per token, whether it is written by the assistant (what SFT trains on).

        A template with ``{% generation %}`` blocks marks the assistant's text itself, and those blocks are it,
        as in ``transformers``' ``return_assistant_tokens_mask``, found wherever they land
        (``chat_template.render_with_generation``; where that cannot be trusted, as for a template without
        them). Otherwise an assistant turn is the text that rendering it adds after the prompt for it
        (``add_generation_prompt``), found by rendering the conversation up to each turn, up to its last stop
        token (EOS or another of ``stop_tokens``) where it has one; a template whose renderings are not
        prefixes of each other cannot be split this way, and is refused. The end-of-turn marker belongs to the
        turn, so the model learns to stop; what the template writes after it (ChatML's newline) does not, as
        generation never reaches it; a token the template's text and the answer share belongs to the answer.
        """
        text, spans = chat_template.render_with_generation(
            self._template(), messages, False, self.today, **self._special_tokens()
        )
        if not spans:
            spans = [
                self._turn_span(text, messages, index)
                for index, m in enumerate(messages)
                if m["role"] == "assistant"
            ]
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        # A token is the answer's if any of its characters is: "Assistant: " + "Five" is one token "ĠFive", which
        # the answer must train (as in transformers' return_assistant_tokens_mask).
        mask = [
            any(begin < end and start < finish for start, end in spans) for begin, finish in encoding.offsets
        ]
        return list(encoding.ids), mask

    def _turn_span(self, text: str, messages: Sequence[Message], index: int) -> tuple[int, int]:
        """Where in ``text`` (the whole conversation) the text rendering turn ``index`` adds lies, cut after its
        last stop token."""
        before = self.render_chat(messages[:index], add_generation_prompt=True)
        through = self.render_chat(messages[: index + 1], add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError(
                f"the chat template does not render turn {index} as a prefix of the conversation, so the "
                "assistant's tokens cannot be told apart"
            )
        turn = through[len(before) :]
        stops = [token for token in (self.eos_token, *self.stop_tokens) if token is not None]
        ends = [turn.rfind(stop) + len(stop) for stop in stops if stop in turn]
        return len(before), len(before) + max(ends, default=len(turn))

    @classmethod
    def from_zmaj(cls, tokenizer: Tokenizer) -> "ModelTokenizer":
        """A zmaj pre-training tokenizer: documents start bare and end with ``<|eos|>``; chats use the role tokens."""
        return cls(
            tokenizers.Tokenizer.from_str(tokenizer.to_json()),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            chat_template=chat_template.DEFAULT_TEMPLATE,
            stop_tokens=(END,),
        )

    @classmethod
    def load(cls, folder: str | Path) -> "ModelTokenizer":
        """The tokenizer of a Hugging Face folder: ``tokenizer.json``, ``tokenizer_config.json`` and the stop
        tokens of ``generation_config.json``."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE} (only fast tokenizers are supported)")
        inner = read_tokenizer_file(path)
        config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        bos, eos, pad, unk = (
            _token_text(config.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        )
        # Beside a tokenizer.json, transformers >= 5 drops the config's add_bos_token/add_eos_token (4.x rebuilt
        # the post-processor from them): tokenizer.json's own post-processor decides, and none adds nothing.
        if inner.post_processor is None:
            inner.post_processor = bos_eos_processor(inner, None, None)
        # What the post-processor puts on either side of a text's tokens (both sides: a prefix measured as
        # "whatever is added" took BOS and the text's first token when EOS was appended too).
        plain, full = inner.encode("a", add_special_tokens=False).ids, inner.encode("a").ids
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
        add_bos = at is not None and bos is not None and full[:at] == [inner.token_to_id(bos)]
        add_eos = at is not None and eos is not None and full[at + len(plain) :] == [inner.token_to_id(eos)]
        stop_ids = _stop_ids(folder / GENERATION_CONFIG_FILE)
        stops = tuple(token for i in stop_ids if (token := inner.id_to_token(i)) is not None and token != eos)
        # The template's own file wins over the config's entry, as in transformers (which saves only the file)
        template_file = folder / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            template: str | None = read_text(template_file)
        else:
            template = _config_template(config.get("chat_template"), folder / TOKENIZER_CONFIG_FILE)
        return cls(inner, bos, eos, pad, unk, add_bos, add_eos, template, stops)

    def save(self, folder: str | Path) -> None:
        """``tokenizer.json`` and ``tokenizer_config.json`` as ``transformers``' ``AutoTokenizer`` reads them, and
        the stop tokens in ``generation_config.json``. The chat template goes into the config; an old
        ``chat_template.jinja`` in ``folder`` is removed, since it would take the template's place. Each file is
        written whole or not at all (``zmaj.fileio``): a fine-tuning run writes them into its run folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / TOKENIZER_FILE, self.tokenizer.to_str())
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
            # transformers 4's PreTrainedTokenizerFast also returns token_type_ids by default, which a causal
            # model's generate(**inputs) refuses ("model_kwargs are not used by the model").
            "model_input_names": ["input_ids", "attention_mask"],
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        atomic_write_text(
            folder / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        # Other keys of an existing generation config (sampling defaults, lengths) are the model's; kept.
        generation = _read_json(folder / GENERATION_CONFIG_FILE) | self.generation_config()
        atomic_write_text(folder / GENERATION_CONFIG_FILE, json.dumps(generation, indent=2) + "\n")

    def generation_config(self) -> dict[str, Any]:
        """``generation_config.json``'s token ids: where ``transformers``' ``generate`` looks for its stop tokens."""
        config: dict[str, Any] = {"bos_token_id": self.bos_id, "pad_token_id": self.pad_id}
        if self.stop_ids:
            config["eos_token_id"] = list(self.stop_ids) if len(self.stop_ids) > 1 else self.stop_ids[0]
        return config


def bos_eos_processor(
    tokenizer: tokenizers.Tokenizer, bos: str | None, eos: str | None
) -> processors.TemplateProcessing:
    """The post-processor of ``transformers``' ``update_post_processor``: ``bos`` before, ``eos`` after, when given."""

    def sequence(name: str, type_id: int) -> list[str]:
        before = [f"{bos}:{type_id}"] if bos is not None else []
        after = [f"{eos}:{type_id}"] if eos is not None else []
        return [*before, f"${name}:{type_id}", *after]

    special = [(token, tokenizer.token_to_id(token)) for token in (bos, eos) if token is not None]
    return processors.TemplateProcessing(
        single=" ".join(sequence("A", 0)),
        pair=" ".join(sequence("A", 0) + sequence("B", 1)),
        special_tokens=list(dict.fromkeys(special)),
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or an empty one when the file does not exist (every such file is optional)."""
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _stop_ids(path: Path) -> list[int]:
    """``eos_token_id`` of a generation config: one id, a list of them, or none (absent, or null as an export
    of a model without EOS writes it)."""
    ids = _read_json(path).get("eos_token_id")
    ids = [] if ids is None else [ids] if isinstance(ids, int) else ids
    if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {ids!r}")
    return ids


def _config_template(value: object, path: Path) -> str | None:
    """``tokenizer_config.json``'s chat template: one, or a list of named ones (as some Hub tokenizers store
    them), of which ``transformers`` renders the one named "default" unless given tools (zmaj passes none)."""
    if isinstance(value, list):
        named = {entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)}
        if "default" not in named:
            raise ValueError(
                f"{path}: chat_template lists no template named 'default' (only {sorted(map(str, named))}); "
                f"write the one to use into {CHAT_TEMPLATE_FILE} beside it"
            )
        value = named["default"]
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: chat_template must be a template or a list of named ones, got {value!r}")
    return value


def _token_text(value: object) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string, or an ``AddedToken`` dict."""
    if isinstance(value, dict):
        return str(value["content"])
    return None if value is None else str(value)
