"""``continuation``, what pre-training's samples and ``programs/sample.py`` use: the KV cache where the text fits
the context, against the full-recomputation sampler it is tested with; that sampler past the context."""

from functools import partial
from typing import Any

import pytest
import torch

from tests.strategies import MODERN_BLOCK
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer import sample as sample_module
from zmaj.infer.sample import continuation, continue_texts, sample
from zmaj.models import gpt

PLAIN = gpt.GPTConfig(vocab_size=64, context=24, d_model=32, n_layers=2, n_heads=4, init_std=0.2)
MODERN = PLAIN.model_copy(update={**MODERN_BLOCK, "bias": False, "logit_softcap": 30.0, "value_embeds": 1})


def recomputed(params: Any, config: gpt.GPTConfig, prompt: list[int], new: int, **kwargs: Any) -> list[int]:
    """The reference: ``sample``, which reruns the model over the whole text for each token."""
    out = sample(
        partial(gpt.forward, params, config=config), torch.tensor([prompt]), new, config.context, **kwargs
    )
    return list(out[0].tolist())


def refused(*args: Any, **kwargs: Any) -> Any:
    """What ``sample`` is patched with where the text fits the context: the cache must continue it."""
    raise AssertionError("recomputed a text that fits the context")


@pytest.mark.parametrize("config", [PLAIN, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize(("temperature", "top_k"), [(0.0, None), (1.0, None), (0.8, 10)])
def test_within_the_context_the_cache_continues_as_recomputation_does(
    monkeypatch: pytest.MonkeyPatch, config: gpt.GPTConfig, temperature: float, top_k: int | None
) -> None:
    """Same tokens, same draws from the seeded generator, with a stop token that ends seed 0's text early; and
    no full forward at all (recomputation costs the whole text per token)."""
    params = gpt.init(config, seed=1)
    prompt = [3, 9, 27, 5]
    stop = recomputed(params, config, prompt, 6, temperature=temperature, top_k=top_k, seed=0)[-1]
    expected = [
        recomputed(params, config, prompt, 21, temperature=temperature, top_k=top_k, seed=s, stop_token=stop)
        for s in range(4)
    ]
    assert len(expected[0]) <= 6

    monkeypatch.setattr(sample_module, "sample", refused)
    got = [continuation(params, config, prompt, 21, temperature, top_k, s, stop) for s in range(4)]
    assert got == expected
    assert len(prompt) + 21 - 1 == config.context  # the longest continuation the cache holds
    if temperature > 0:
        assert len({tuple(tokens) for tokens in got}) > 1  # seeds differ, so the draws are real


@pytest.mark.parametrize("config", [PLAIN, MODERN], ids=["gpt2", "modern"])
@pytest.mark.parametrize("new", [22, 30])  # 4 + 22 - 1 = 25 tokens fed: one past the context
def test_past_the_context_it_slides_the_window_as_the_reference_sampler(
    config: gpt.GPTConfig, new: int
) -> None:
    """From the first length past the context (where the cache would need a 25th position: a learned position
    table has 24), the sliding window, stop token included."""
    params = gpt.init(config, seed=1)
    prompt = [3, 9, 27, 5]
    free = recomputed(params, config, prompt, new, temperature=1.0, seed=2)
    assert continuation(params, config, prompt, new, temperature=1.0, seed=2) == free
    assert len(free) == new
    stop = free[-2]
    expected = recomputed(params, config, prompt, new, temperature=1.0, seed=2, stop_token=stop)
    assert len(expected) < new
    assert continuation(params, config, prompt, new, temperature=1.0, seed=2, stop_token=stop) == expected


def test_continue_texts_samples_each_prompt_with_its_own_seed_up_to_the_end_of_the_document() -> None:
    """Prompt i continues as ``sample`` does with ``seed + i`` and the tokenizer's eos as the stop token (a
    pre-training run's samples end with their document); the same prompt four times gives different samples."""
    tokenizer = Tokenizer.train(["the quick brown fox jumps over the lazy dog\n"] * 10, vocab_size=270)
    config = gpt.GPTConfig(
        **{**PLAIN.model_dump(), "vocab_size": tokenizer.vocab_size, "tie_embeddings": False}
    )
    params = gpt.init(config, seed=1)
    params["unembed", "weight"][tokenizer.eos_id] *= 4  # so that some samples end early
    texts = continue_texts(
        params, config, tokenizer, 0, prompts=["the fox"] * 4, max_new_tokens=20, temperature=1.0, top_k=None
    )
    ids = tokenizer.encode("the fox")
    expected = [recomputed(params, config, ids, 20, seed=i, stop_token=tokenizer.eos_id) for i in range(4)]
    assert any(len(new) < 20 for new in expected)  # some end at the eos
    assert texts == ["the fox" + tokenizer.decode(new) for new in expected]
    assert len(set(texts)) == 4


@pytest.mark.parametrize("prompt_length", [1, 5, 24, 30])
def test_no_new_tokens_is_an_empty_continuation_as_the_reference_gives(prompt_length: int) -> None:
    """``sample.max_new_tokens: 0`` is a valid pre-training spec: the cache sized for the prompt less one token
    made the prefill write past it, and the run's first evaluation crashed."""
    params = gpt.init(PLAIN, seed=1)
    prompt = list(range(3, 3 + prompt_length))
    assert continuation(params, PLAIN, prompt, 0) == recomputed(params, PLAIN, prompt, 0) == []


def test_a_bfloat16_model_continues_from_a_cache_of_its_own_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bfloat16 model continues from a cache of its own dtype (a float32 cache refused the bfloat16 keys written
    into it). Its first token is recomputation's: later ones may part after a near-tie, since the two paths
    multiply matrices of other shapes, whose bf16 rounding differs between CPUs' kernels."""
    params = gpt.init(PLAIN, seed=1).to(torch.bfloat16)
    prompt = [40, 2, 11]
    expected = recomputed(params, PLAIN, prompt, 1, temperature=0.0)

    monkeypatch.setattr(sample_module, "sample", refused)
    tokens = continuation(params, PLAIN, prompt, 6, temperature=0.0)
    assert len(tokens) == 6
    assert tokens[:1] == expected
