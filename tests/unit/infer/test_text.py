"""Streamed text: the pieces add up to the decoding of all tokens, whatever the tokenizer splits characters into,
and ``complete`` is ``generate`` decoded, stopping where it stops."""

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import tokenizers
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from tests.unit.infer.test_lookup import Counting
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import EOS, Tokenizer
from zmaj.infer import chat as infer_chat
from zmaj.infer import text as infer_text
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import GREEDY, Emitted, Sampling, generate
from zmaj.infer.text import REPLACEMENT, byte_tokens, complete, detokenize, held_tokens
from zmaj.models import llama

TEXTS = ["héllo wörld, 世界 🙂🐍 naïve café ", "def parse(tokens): return [t for t in tokens] "] * 20
BYTE_LEVEL = Tokenizer.train(TEXTS, vocab_size=300)


def metaspace() -> tokenizers.Tokenizer:
    """A SentencePiece-style tokenizer: words start with ``▁``, which decodes to a space except at the start."""
    inner = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Metaspace()
    inner.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *byte_tokens], show_progress=False)
    inner.train_from_iterator(TEXTS, trainer)
    return inner


def byte_fallback_with_a_special() -> ModelTokenizer:
    """Gemma's layout: byte tokens in the model's vocabulary (ordinary ones), and a special token, which decoding
    skips."""
    vocab = {"<unk>": 0, **{f"<0x{i:02X}>": 1 + i for i in range(256)}, "▁": 257, "a": 258, "b": 259}
    inner = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    inner.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    inner.add_special_tokens(["<extra>"])
    return ModelTokenizer(inner, None, None)


METASPACE = metaspace()
METASPACE_BYTES = byte_tokens(ModelTokenizer(METASPACE, None, None))
GEMMA_LIKE = byte_fallback_with_a_special()
DECODERS = {
    "byte-level": (BYTE_LEVEL.vocab_size, ModelTokenizer.from_zmaj(BYTE_LEVEL).decode),
    # The byte tokens are registered as special here (Gemma's are ordinary): decoded all the same, as Gemma's are.
    "metaspace": (
        METASPACE.get_vocab_size(),
        lambda ids: str(METASPACE.decode(ids, skip_special_tokens=False)),
    ),
    "byte fallback, a special token skipped": (GEMMA_LIKE.vocab_size, GEMMA_LIKE.decode),
}
HELD = {
    "byte-level": held_tokens(ModelTokenizer.from_zmaj(BYTE_LEVEL)),
    "metaspace": METASPACE_BYTES,
    "byte fallback, a special token skipped": held_tokens(GEMMA_LIKE),
}


@pytest.mark.parametrize("name", list(DECODERS))
@given(data=st.data())
def test_pieces_add_up_to_the_whole_decoding(name: str, data: st.DataObject) -> None:
    vocab, decode = DECODERS[name]
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=30))
    pieces = list(detokenize(ids, decode, HELD[name]))
    assert "".join(pieces) == decode(ids)
    assert all(pieces)
    # Only the last piece may end in an incomplete character; every earlier one was final when shown.
    assert not any(piece.endswith(REPLACEMENT) for piece in pieces[:-1])


def test_byte_tokens_are_the_256_of_a_byte_fallback_vocabulary_and_none_of_a_byte_level_one() -> None:
    """``<0x00>`` to ``<0xFF>``, ids 1 to 256 here: each is held, the last as the first (a ``<0xFF>`` not held
    would show the "j" before it, which the run "j" 0xFF ... decodes as one U+FFFD per byte)."""
    assert byte_tokens(GEMMA_LIKE) == frozenset(range(1, 257))
    assert byte_tokens(ModelTokenizer.from_zmaj(BYTE_LEVEL)) == frozenset()


def test_bytes_either_side_of_a_skipped_special_token_are_one_run() -> None:
    """ "j", then the special token, then 0x93: decoded whole, "j" and 0x93 are one run of bytes that is not UTF-8,
    two replacement characters, so the "j" shown before 0x93 came was not final (inference audit, Gemma)."""
    special = GEMMA_LIKE.token_id("<extra>")
    assert special is not None
    ids = [1 + 0x6A, special, 1 + 0x93]
    assert GEMMA_LIKE.decode(ids) == REPLACEMENT * 2
    assert list(detokenize(ids, GEMMA_LIKE.decode, held_tokens(GEMMA_LIKE))) == [REPLACEMENT * 2]


@pytest.mark.parametrize("name", ["byte-level", "metaspace"])
def test_a_character_split_over_tokens_comes_out_whole(name: str) -> None:
    _, decode = DECODERS[name]
    encode = BYTE_LEVEL.encode if name == "byte-level" else (lambda text: METASPACE.encode(text).ids)
    text = "🐍 naïve 世界"
    ids = encode(text)
    pieces = list(detokenize(ids, decode, HELD[name]))
    assert "".join(pieces) == text
    assert REPLACEMENT not in "".join(pieces)


CONFIG = llama.LlamaConfig(
    vocab_size=BYTE_LEVEL.vocab_size, context=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48
)
PARAMS = llama.init(CONFIG, seed=0)
TOKENIZER = ModelTokenizer.from_zmaj(BYTE_LEVEL)
PROMPT = BYTE_LEVEL.encode("def parse(")


def test_a_run_of_high_byte_tokens_is_held_whole_though_it_completes_a_character_inside() -> None:
    """ "é" (C3 A9), then the first byte of "世": shown at A9, the "é" would be taken back when the run ends cut
    short (decoded whole, the bytes after A9 join no character; the hypothesis test seldom draws such a run)."""
    ids = [1 + 0xC3, 1 + 0xA9, 1 + 0xE4]
    pieces = list(detokenize(ids, GEMMA_LIKE.decode, held_tokens(GEMMA_LIKE)))
    assert "".join(pieces) == GEMMA_LIKE.decode(ids)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, top_k=20)])
def test_complete_is_generate_decoded(sampling: Sampling) -> None:
    cache = init_cache(CONFIG, 1, len(PROMPT) + 16)
    stops = TOKENIZER.stop_ids
    (tokens,) = generate(
        llama.cached(CONFIG), PARAMS, cache, [PROMPT], 16, sampling, seed=3, stop_tokens=stops
    )
    text = "".join(complete(llama.cached(CONFIG), PARAMS, cache, PROMPT, TOKENIZER, 16, sampling, seed=3))
    assert text == TOKENIZER.decode([token for token in tokens if token not in stops])


def test_complete_with_draft_tokens_is_greedy_decoding_by_prompt_lookup() -> None:
    """The same text as plain greedy decoding, in fewer passes over the model than tokens (a prompt that repeats
    itself, which a random model continues in a loop); sampling with drafts is refused."""
    prompt = BYTE_LEVEL.encode("def parse(def parse(def parse(")
    cache = init_cache(CONFIG, 1, len(prompt) + 24)
    plain = "".join(complete(llama.cached(CONFIG), PARAMS, cache, prompt, TOKENIZER, 24))
    counting = Counting(llama.cached(CONFIG))
    drafted = "".join(complete(counting, PARAMS, cache, prompt, TOKENIZER, 24, draft_tokens=5))
    assert drafted == plain
    assert len(counting.fed) < 24 - 5, counting.fed
    with pytest.raises(ValueError, match="prompt lookup decodes greedily"):
        complete(
            llama.cached(CONFIG),
            PARAMS,
            cache,
            prompt,
            TOKENIZER,
            4,
            Sampling(temperature=1.0),
            draft_tokens=2,
        )


def test_complete_stops_at_a_stop_token_and_hides_it() -> None:
    cache = init_cache(CONFIG, 1, len(PROMPT) + 16)
    (free,) = generate(llama.cached(CONFIG), PARAMS, cache, [PROMPT], 16)
    # EOS gets 1.5 times the 4th free token's unembedding row, so it takes over early (asserted below).
    eos = TOKENIZER.eos_id
    assert eos is not None
    assert eos not in free
    stop_at = free[3]
    params = PARAMS.clone()
    params["unembed", "weight"][eos] = params["unembed", "weight"][stop_at] * 1.5
    (stopped,) = generate(llama.cached(CONFIG), params, cache, [PROMPT], 16, stop_tokens=TOKENIZER.stop_ids)
    assert stopped[-1] == eos
    assert len(stopped) < 16
    text = "".join(complete(llama.cached(CONFIG), params, cache, PROMPT, TOKENIZER, 16))
    assert text == TOKENIZER.decode(stopped[:-1], skip_special_tokens=False)
    assert EOS not in text
    # A chat's answer ends there too: what follows the end of turn is neither shown nor kept in the history.
    context = infer_chat.empty_context(CONFIG, torch.float32, "cpu")
    answer, after = infer_chat.reply(
        llama.cached(CONFIG), params, context, PROMPT, TOKENIZER, 16, GREEDY, 0, lambda _: None
    )
    assert answer == TOKENIZER.decode(stopped[:-1])
    assert after.tokens == (*PROMPT, *stopped[:-1])


def scripted(ids: list[int]) -> Callable[..., Iterator[Emitted]]:
    """A ``zmaj.infer.generate.stream`` that emits ``ids`` whatever the model."""

    def fake(step: Any, params: Any, cache: Any, *args: Any, **kwargs: Any) -> Iterator[Emitted]:
        for token in ids:
            yield Emitted(torch.tensor([token]), torch.tensor([True]), cache)

    return fake


def test_complete_and_reply_stream_a_special_token_between_bytes_as_one_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both callers of ``detokenize`` hold what ``held_tokens`` names (a byte token, then a special token, then a
    byte): the pieces add up to the whole decoding, not to a "j" that decoding all takes back."""
    special, a = GEMMA_LIKE.token_id("<extra>"), GEMMA_LIKE.token_id("a")
    assert special is not None
    assert a is not None
    ids = [1 + 0x6A, special, 1 + 0x93, a]
    expected = GEMMA_LIKE.decode(ids)
    assert expected == REPLACEMENT * 2 + "a"
    monkeypatch.setattr(infer_text, "stream", scripted(ids))
    monkeypatch.setattr(infer_chat, "stream", scripted(ids))
    assert (
        "".join(complete(llama.cached(CONFIG), PARAMS, init_cache(CONFIG, 1, 8), [0], GEMMA_LIKE, len(ids)))
        == expected
    )
    shown: list[str] = []
    context = infer_chat.empty_context(CONFIG, torch.float32, "cpu")
    answer, _ = infer_chat.reply(
        llama.cached(CONFIG), PARAMS, context, [0], GEMMA_LIKE, len(ids), GREEDY, 0, shown.append
    )
    assert "".join(shown) == answer == expected


def test_a_stop_token_that_decoding_keeps_is_neither_shown_nor_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation config may end answers at an ordinary token (``stop_tokens``), which decoding does not skip as
    it skips a special one: ``complete`` and ``reply`` leave it out themselves, and the chat's history ends
    before it."""
    stopper = replace(GEMMA_LIKE, stop_tokens=("b",))
    a, b = stopper.token_id("a"), stopper.token_id("b")
    assert a is not None
    assert b is not None
    assert stopper.stop_ids == (b,)
    assert stopper.decode([a, a, b]) == "aab"  # decoded, the stop token is text
    ids = [a, a, b]
    monkeypatch.setattr(infer_text, "stream", scripted(ids))
    monkeypatch.setattr(infer_chat, "stream", scripted(ids))
    assert "".join(complete(llama.cached(CONFIG), PARAMS, init_cache(CONFIG, 1, 8), [0], stopper, 3)) == "aa"
    shown: list[str] = []
    context = infer_chat.empty_context(CONFIG, torch.float32, "cpu")
    answer, after = infer_chat.reply(
        llama.cached(CONFIG), PARAMS, context, [0], stopper, 3, GREEDY, 0, shown.append
    )
    assert "".join(shown) == answer == "aa"
    assert after.tokens == (0, a, a)
