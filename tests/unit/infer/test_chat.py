"""A conversation's kept cache against encoding the whole conversation afresh at every turn: the same logits at each
answer's first token, the same greedy answers; and a cache that disagrees with the next prompt re-encoded from the
first difference."""

from collections.abc import Sequence

import pytest
import torch
from tensordict import TensorDictBase

from zmaj.data.chat_template import Message
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer.cache import CacheShape, init_cache, prefix
from zmaj.infer.chat import Context, empty_context, reply, resume
from zmaj.infer.generate import GREEDY, CachedForward
from zmaj.models import llama
from zmaj.models.common import Batch

TEXTS = ["the cat sat on the mat. the dog ate the bone. ", "what is two plus two? it is four.\n"] * 20
USER = ["hi", "what is two plus two?", "the cat sat", "why?"]


@pytest.fixture(scope="module")
def tokenizer() -> ModelTokenizer:
    return ModelTokenizer.from_zmaj(Tokenizer.train(TEXTS, vocab_size=300))


@pytest.fixture(scope="module")
def model(tokenizer: ModelTokenizer) -> tuple[llama.LlamaConfig, TensorDictBase]:
    config = llama.LlamaConfig(
        vocab_size=tokenizer.vocab_size, context=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
        init_std=0.1,
    )  # fmt: skip
    return config, llama.init(config, seed=0)


def last_logits(
    step: CachedForward, params: TensorDictBase, cache: TensorDictBase, tokens: Sequence[int]
) -> torch.Tensor:
    logits, _ = step(params, Batch(tokens=torch.tensor([list(tokens)], device=cache["k"].device)), cache)
    return logits[0, -1]


def check_turns(
    step: CachedForward,
    params: TensorDictBase,
    config: CacheShape,
    tokenizer: ModelTokenizer,
    users: Sequence[str],
    max_new_tokens: int,
    system: str | None = None,
    atol: float = 1e-5,
) -> list[int]:
    """Chat through ``users`` greedily keeping the cache, and check each turn against a fresh encoding; returns how
    many prompt tokens each turn took from the cache. (Shared with the SmolLM2 test in tests/integration.)"""
    dtype, device = params["embed", "weight"].dtype, params["embed", "weight"].device
    messages: list[Message] = [] if system is None else [{"role": "system", "content": system}]
    context, reused = empty_context(config, dtype, device), []
    for user in users:
        messages.append({"role": "user", "content": user})
        prompt = tokenizer.encode_chat(messages)
        max_len = len(prompt) + max_new_tokens - 1
        cache, new = resume(context, prompt, max_len)
        assert int(cache["length"]) + len(new) == len(prompt)
        fresh = init_cache(config, 1, max_len, dtype, device)
        torch.testing.assert_close(
            last_logits(step, params, cache, new), last_logits(step, params, fresh, prompt), atol=atol, rtol=0
        )
        answer, after = reply(
            step, params, context, prompt, tokenizer, max_new_tokens, GREEDY, 0, show=lambda _: None
        )
        expected, _ = reply(
            step, params, empty_context(config, dtype, device), prompt, tokenizer, max_new_tokens, GREEDY, 0,
            show=lambda _: None,
        )  # fmt: skip
        assert answer == expected
        assert after.tokens[: len(prompt)] == tuple(prompt)
        assert int(after.cache["length"]) == len(after.tokens)
        reused.append(len(prompt) - len(new))
        context = after
        messages.append({"role": "assistant", "content": answer})
    return reused


def test_a_kept_cache_answers_as_encoding_the_whole_conversation(
    model: tuple[llama.LlamaConfig, TensorDictBase], tokenizer: ModelTokenizer
) -> None:
    config, params = model
    reused = check_turns(llama.cached(config), params, config, tokenizer, USER, 6, system="be brief")
    assert reused[0] == 0
    assert all(count > 0 for count in reused[1:])  # every later turn took its beginning from the cache


def test_shown_pieces_make_the_answer(
    model: tuple[llama.LlamaConfig, TensorDictBase], tokenizer: ModelTokenizer
) -> None:
    """The pieces shown add up to the answer, and the answer is the decoding of a naive greedy continuation
    (argmax of a whole forward pass per token, up to a stop token)."""
    config, params = model
    shown: list[str] = []
    prompt = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    context = empty_context(config, torch.float32, "cpu")
    answer, _ = reply(llama.cached(config), params, context, prompt, tokenizer, 10, GREEDY, 0, shown.append)
    tokens: list[int] = []
    for _ in range(10):
        logits = llama.forward(params, Batch(tokens=torch.tensor([[*prompt, *tokens]])), config)
        if (token := int(logits[0, -1].argmax())) in tokenizer.stop_ids:
            break
        tokens.append(token)
    assert len(tokens) > 1  # an answer of pieces, not an empty one
    assert answer == tokenizer.decode(tokens)
    assert "".join(shown) == answer


@pytest.mark.parametrize(
    ("prompt", "kept"),
    [
        ([1, 2, 3, 4, 5, 6, 7, 8], 5),  # continues the cached tokens: only the new ones are prefilled
        ([1, 2, 9, 4, 5, 6], 2),  # differs at token 2 (a template rendering an earlier turn anew)
        ([9, 2, 3], 0),  # differs at once (the oldest turns forgotten)
        ([1, 2, 3, 4, 5], 4),  # is the cached tokens: the last one is run again for its logits
        ([1, 2, 3], 2),  # is shorter
    ],
)
def test_resume_keeps_the_common_beginning_and_prefills_the_rest(
    model: tuple[llama.LlamaConfig, TensorDictBase], prompt: list[int], kept: int
) -> None:
    config, params = model
    step = llama.cached(config)
    cached = [1, 2, 3, 4, 5]
    _, full = step(params, Batch(tokens=torch.tensor([cached])), init_cache(config, 1, len(cached)))
    cache, new = resume(Context(full, tuple(cached)), prompt, max_len=12)
    assert (int(cache["length"]), new) == (kept, prompt[kept:])
    assert cache["k"].shape[3] == 12
    torch.testing.assert_close(
        last_logits(step, params, cache, new),
        last_logits(step, params, init_cache(config, 1, 12), prompt),
        atol=1e-5,
        rtol=0,
    )


def test_prefix_refuses_slots_it_does_not_have(model: tuple[llama.LlamaConfig, TensorDictBase]) -> None:
    config, _ = model
    with pytest.raises(ValueError, match="cannot keep 1 slots of a cache of 0 tokens"):
        prefix(init_cache(config, 1, 4), 1, 4)
