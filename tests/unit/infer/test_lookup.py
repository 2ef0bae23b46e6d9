"""Prompt lookup decoding: its drafts against a search written out plainly, and its tokens against plain greedy
decoding, in fewer passes over the model."""

from collections.abc import Sequence
from functools import cache

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.infer.cache import init_cache
from zmaj.infer.generate import NonFiniteLogitsError, generate
from zmaj.infer.lookup import draft, stream_lookup
from zmaj.models import gpt, llama
from zmaj.models.common import Batch, CachedForward

VOCAB = 64
CONFIGS: dict[str, llama.LlamaConfig | gpt.GPTConfig] = {
    "llama": llama.LlamaConfig(
        vocab_size=VOCAB, context=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1
    ),
    "gpt": gpt.GPTConfig(
        vocab_size=VOCAB, context=128, d_model=32, n_layers=2, n_heads=4, positions="rope", init_std=0.1
    ),
}
# Repeats in the prompt give the drafts something to copy; a one-token prompt gives them nothing at first.
PROMPTS = [[5, 17, 3, 9, 5, 17, 3, 9, 5], [1, 2, 3, 4, 1, 2, 3], [8], [30, 31, 32, 1, 30, 31]]
NEW = 40


@cache
def model(name: str) -> tuple[CachedForward, TensorDict]:
    config = CONFIGS[name]
    module = llama if isinstance(config, llama.LlamaConfig) else gpt
    return module.cached(config), module.init(config, seed=0)


class Counting:
    """A step that records how many tokens each pass over the model was fed."""

    def __init__(self, step: CachedForward) -> None:
        self.step, self.fed = step, list[int]()

    def __call__(
        self, params: TensorDictBase, batch: Batch, cache: TensorDictBase, **kwargs: bool
    ) -> tuple[Tensor, TensorDictBase]:
        self.fed.append(batch.tokens.shape[1])
        return self.step(params, batch, cache, **kwargs)


def latest_continuation(context: Sequence[int], max_ngram: int, k: int) -> list[int]:
    """The drafter's rule written out: every earlier occurrence of every suffix; of the longest suffix's, the
    latest followed by ``k`` tokens, else the latest."""
    found = {
        n: [s for s in range(len(context) - n) if list(context[s : s + n]) == list(context[-n:])]
        for n in range(1, min(max_ngram, len(context) - 1) + 1)
    }
    longest = max((n for n, starts in found.items() if starts), default=None)
    if longest is None:
        return []
    followed = [s for s in found[longest] if s + longest + k <= len(context)]
    start = max(followed or found[longest]) + longest
    return list(context[start : start + k])


@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 4), st.integers(1, 6))
def test_a_draft_is_what_followed_the_latest_fitting_occurrence_of_the_longest_suffix(
    context: list[int], max_ngram: int, k: int
) -> None:
    assert draft(context, max_ngram, k) == latest_continuation(context, max_ngram, k)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("draft_tokens", [1, 3, 10])
def test_the_tokens_are_greedy_decodings_in_fewer_passes(name: str, draft_tokens: int) -> None:
    """Greedy decoding's tokens for every prompt, in a cache of exactly the room ``generate`` needs; over the
    prompts, fewer passes than tokens (drafts were kept), each fed at most ``draft_tokens + 1`` tokens."""
    step, params = model(name)
    config = CONFIGS[name]
    passes = tokens = 0
    for prompt in PROMPTS:
        [greedy] = generate(step, params, init_cache(config, 1, len(prompt) + NEW), [prompt], NEW)
        counting = Counting(step)
        room = init_cache(config, 1, len(prompt) + NEW - 1)
        assert list(stream_lookup(counting, params, room, prompt, NEW, draft_tokens)) == greedy, prompt
        assert max(counting.fed[1:]) <= draft_tokens + 1
        passes, tokens = passes + len(counting.fed), tokens + len(greedy)
    assert passes < tokens - len(PROMPTS) * 10, (passes, tokens)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_output_ends_at_its_first_stop_token_drafted_or_not(name: str) -> None:
    """Every token of every free output in turn as the stop token: each comes once first as a drafted token or as
    the model's own, and the output ends there either way."""
    step, params = model(name)
    config = CONFIGS[name]
    for prompt in PROMPTS:
        [free] = generate(step, params, init_cache(config, 1, len(prompt) + NEW), [prompt], NEW)
        for stop in sorted(set(free)):
            room = init_cache(config, 1, len(prompt) + NEW)
            ours = list(stream_lookup(step, params, room, prompt, NEW, stop_tokens={stop}))
            assert ours == free[: free.index(stop) + 1], (prompt, stop)


def cycle(period: int, nan_after: int | None = None) -> CachedForward:
    """A stand-in model whose greedy next token is always ``(token + 1) % period``: its answer repeats its prompt,
    so every draft copied from a prompt of whole periods is kept. It keeps the cache's bookkeeping alone; its
    logits after the token ``nan_after`` are NaN."""

    def step(
        params: TensorDictBase, batch: Batch, cache: TensorDictBase, **kwargs: bool
    ) -> tuple[Tensor, TensorDictBase]:
        fed = batch.tokens.shape[1]
        logits = torch.nn.functional.one_hot((batch.tokens + 1) % period, VOCAB).float()
        logits[batch.tokens == nan_after] = float("nan")
        length = int(cache["length"])
        new = cache.clone()
        new["is_token"][:, length : length + fed] = True
        new["length"] = torch.tensor(length + fed)
        return logits, new

    return step


def test_a_stop_token_inside_a_kept_draft_ends_the_output_there() -> None:
    step = cycle(4)
    prompt = [0, 1, 2, 3, 0]
    counting = Counting(step)
    free = list(stream_lookup(counting, TensorDict(), init_cache(CONFIGS["llama"], 1, 32), prompt, 20))
    assert free == [(1 + i) % 4 for i in range(20)]
    # After the prompt's pass, each pass emits every token it was fed: no drafted token was refused.
    assert sum(counting.fed[1:]) == len(free) - 1
    assert len(counting.fed) < 6
    for stop in range(4):
        cache = init_cache(CONFIGS["llama"], 1, 32)
        ours = list(stream_lookup(step, TensorDict(), cache, prompt, 20, stop_tokens={stop}))
        assert ours == free[: free.index(stop) + 1]


def test_only_the_logits_greedy_decoding_reads_are_checked_and_the_prefill_keeps_the_last() -> None:
    """NaN logits after a drafted token the model refuses are never read, as plain greedy decoding never computes
    them; NaN after a token it emits ends the output with the refusal ``choose`` gives. The prompt's pass asks for
    its last position's logits alone (a long prompt's every logit is the memory peak)."""
    prompt = [2, 7, 1]  # the model says 2, then the draft copies "7 1" after the earlier 2: it says 3
    cache = init_cache(CONFIGS["llama"], 1, 32)
    counting = Counting(cycle(4, nan_after=7))
    ours = list(stream_lookup(counting, TensorDict(), cache, prompt, 12))
    assert ours == [(2 + i) % 4 for i in range(12)]
    assert counting.fed[1] > 1  # a draft was fed, holding the 7
    with pytest.raises(NonFiniteLogitsError):
        list(stream_lookup(cycle(4, nan_after=3), TensorDict(), cache, prompt, 12))
    asked: list[bool] = []

    def recording(
        params: TensorDictBase, batch: Batch, cache: TensorDictBase, **kwargs: bool
    ) -> tuple[Tensor, TensorDictBase]:
        asked.append(kwargs.get("last_only", False))
        return cycle(4)(params, batch, cache, **kwargs)

    list(stream_lookup(recording, TensorDict(), cache, prompt, 12))
    assert asked[0] is True
    assert not any(asked[1:])  # the checking passes read every position


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 7])
def test_exactly_max_new_tokens_come_and_the_callers_cache_is_untouched(max_new_tokens: int) -> None:
    step, params = model("gpt")
    config = CONFIGS["gpt"]
    prompt = PROMPTS[1]
    [greedy] = generate(step, params, init_cache(config, 1, 32), [prompt], max_new_tokens)
    empty = init_cache(config, 1, 32)
    before = empty.clone()
    assert list(stream_lookup(step, params, empty, prompt, max_new_tokens)) == greedy
    assert len(greedy) == max_new_tokens
    assert all(torch.equal(empty[key], before[key]) for key in before.keys(True, True))


def test_what_it_cannot_do_is_refused() -> None:
    step, params = model("llama")
    config = CONFIGS["llama"]
    with pytest.raises(ValueError, match="one prompt at a time; the cache has 2 rows"):
        next(stream_lookup(step, params, init_cache(config, 2, 32), [1, 2], 4))
    with pytest.raises(ValueError, match="room for 8 tokens, this generation needs 9"):
        next(stream_lookup(step, params, init_cache(config, 1, 8), [1, 2, 3], 7))
    with pytest.raises(ValueError, match="draft_tokens and max_ngram must be at least 1, got 0 and 3"):
        next(stream_lookup(step, params, init_cache(config, 1, 8), [1], 2, draft_tokens=0))
    with pytest.raises(ValueError, match="a prompt of at least one token"):
        next(stream_lookup(step, params, init_cache(config, 1, 8), [], 2))
