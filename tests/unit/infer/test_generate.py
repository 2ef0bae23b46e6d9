"""Generation: the token pickers against naive references and closed forms, and the loop's promises (batching,
seeds, stopping, streaming) against plain runs of the same loop."""

import math
from functools import cache

import pydantic
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tests import strategies
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import (
    Sampling,
    choose,
    generate,
    left_padded,
    sample_categorical,
    stream,
    top_k_filter,
    top_p_filter,
)
from zmaj.infer.sample import sample
from zmaj.models import gpt, llama
from zmaj.models.common import Batch

VOCAB = 64
CONFIG = llama.LlamaConfig(
    vocab_size=VOCAB, context=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1
)
STEP = llama.cached(CONFIG)
PROMPTS = [[5, 17, 3, 9, 40, 2, 11], [8], [30, 31, 32, 1]]


@cache
def params(device: torch.device) -> TensorDict:
    """The model every generation test runs, built once per device."""
    return llama.init(CONFIG, seed=0, device=device)


def run(
    device: torch.device,
    prompts: list[list[int]] = PROMPTS,
    max_new_tokens: int = 12,
    max_len: int = 32,
    **kwargs: object,
) -> list[list[int]]:
    cache = init_cache(CONFIG, len(prompts), max_len, device=device)
    return generate(STEP, params(device), cache, prompts, max_new_tokens, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def free(device: torch.device) -> list[list[int]]:
    """Greedy continuations of ``PROMPTS`` with no stopping: what the stopping tests cut short."""
    return run(device)


# Logits as multiples of 1/2: ties are common (to exercise tie-breaking) and distinct values are far apart.
logit_rows = st.lists(st.integers(-12, 12).map(lambda i: i / 2), min_size=1, max_size=24)


def naive_nucleus(logits: list[float], p: float) -> tuple[set[int], list[float]]:
    """Tokens from most to least likely (ties by id), added one by one until their probability reaches p."""
    weights = [math.exp(x) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept: set[int] = set()
    mass, masses = 0.0, []
    for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        kept.add(i)
        mass += probs[i]
        masses.append(mass)
        if mass >= p:
            break
    return kept, masses


@given(logits=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(device: torch.device, logits: list[float], p: float) -> None:
    expected, masses = naive_nucleus(logits, p)
    # float32 and float64 sums may round to different sides of p only when a running mass is within rounding.
    assume(all(abs(mass - p) > 1e-5 for mass in masses))
    filtered = top_p_filter(torch.tensor([logits], device=device), p)
    kept = set(torch.isfinite(filtered[0]).nonzero()[:, 0].tolist())
    assert kept == expected
    torch.testing.assert_close(filtered[0, sorted(kept)], torch.tensor(logits, device=device)[sorted(kept)])


@pytest.mark.parametrize("k", [24576, 40000, 49000])
def test_top_p_over_a_uniform_vocabulary_keeps_the_nucleus_to_the_token(device: torch.device, k: int) -> None:
    """49,152 equal logits: the mass before the token ranked i is exactly i / 49152, so p a hair (2e-8) above
    k / 49152 keeps exactly k + 1 tokens, the first k + 1 ids (ties by id). In float32 the running mass is off
    by ~1e-7 there and one token went, even on the CPU (whose cumsum accumulates float32 in float64)."""
    n = 49152
    kept = torch.isfinite(top_p_filter(torch.zeros(1, n, device=device), (k + 1e-3) / n))[0]
    assert kept.nonzero()[:, 0].tolist() == list(range(k + 1))


@given(logits=logit_rows, k=st.integers(1, 30))
def test_top_k_keeps_the_k_largest_and_their_ties(device: torch.device, logits: list[float], k: int) -> None:
    kept = torch.isfinite(top_k_filter(torch.tensor([logits], device=device), k))[0].tolist()
    kth = sorted(logits, reverse=True)[min(k, len(logits)) - 1]
    assert kept == [x >= kth for x in logits]


@settings(max_examples=20)
@given(seed=strategies.seeds, temperature=st.floats(0.1, 3.0))
def test_top_k_one_is_greedy(device: torch.device, seed: int, temperature: float) -> None:
    generator = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(5, VOCAB, generator=generator, device=device)
    sampled = choose(logits, Sampling(temperature=temperature, top_k=1), generator)
    assert torch.equal(sampled, logits.argmax(-1))
    assert torch.equal(choose(logits, Sampling(), generator), logits.argmax(-1))


def test_a_tiny_temperature_samples_the_most_likely_token_and_non_finite_logits_are_refused(
    device: torch.device,
) -> None:
    """Logits divided by 1e-40 overflowed to inf, softmax gave NaN, and the draw returned the vocabulary size:
    an id past the embedding. Shifted to a maximum of 0 first, they cannot overflow."""
    generator = torch.Generator(device).manual_seed(0)
    logits = torch.randn(5, VOCAB, generator=generator, device=device) * 10
    # 1e-300 rounds to 0 in float32, where the top logit became 0/0 = NaN and every program a traceback.
    for temperature in (1e-40, 1e-46, 1e-300):
        tiny = choose(logits, Sampling(temperature=temperature), generator)
        assert torch.equal(tiny, logits.argmax(-1))
    logits[2, 7] = math.nan
    # Greedy too: argmax takes the NaN for the largest logit, and a model of NaNs decoded token 0 silently.
    for temperature in (1.0, 0.0):
        with pytest.raises(ValueError, match="logits are not finite"):
            choose(logits, Sampling(temperature=temperature), generator)
    logits[2, 7] = -math.inf  # a token a mask ruled out is no reason to refuse
    assert torch.equal(choose(logits, Sampling(temperature=0.0), generator), logits.argmax(-1))
    for temperature in (math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            Sampling(temperature=temperature)


PROBS = [0.5, 0.25, 0.125, 0.125]


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        (Sampling(temperature=1.0), [0.5, 0.25, 0.125, 0.125]),
        # Temperature 2 takes the square root of each probability, before renormalising.
        (Sampling(temperature=2.0), [x**0.5 / sum(y**0.5 for y in PROBS) for x in PROBS]),
        (Sampling(temperature=1.0, top_k=2), [2 / 3, 1 / 3, 0, 0]),
        (Sampling(temperature=1.0, top_p=0.7), [2 / 3, 1 / 3, 0, 0]),
        (Sampling(temperature=1.0, top_p=0.4), [1, 0, 0, 0]),
        # Top-k first, then the nucleus of what is left, renormalised: of [2/3, 1/3], 2/3 alone reaches 0.6 (the
        # nucleus of the whole distribution, [0.5, 0.25], would keep both).
        pytest.param(Sampling(temperature=1.0, top_k=2, top_p=0.6), [1, 0, 0, 0], id="top_k-then-top_p"),
        # Temperature first: the nucleus of the square roots' distribution (0.369, 0.261, ...) reaching 0.45 has
        # two tokens; of the untempered one (0.5, ...), one.
        pytest.param(
            Sampling(temperature=2.0, top_p=0.45),
            [x**0.5 / (PROBS[0] ** 0.5 + PROBS[1] ** 0.5) for x in PROBS[:2]] + [0, 0],
            id="temperature-then-top_p",
        ),
    ],
)
def test_sampling_frequencies_match_the_closed_form(
    device: torch.device, sampling: Sampling, expected: list[float]
) -> None:
    logits = torch.tensor(PROBS, device=device).log().expand(20_000, 4)
    tokens = choose(logits, sampling, torch.Generator(device).manual_seed(0))
    frequencies = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    expected_frequencies = torch.tensor(expected, dtype=torch.float32, device=device)
    torch.testing.assert_close(frequencies, expected_frequencies, atol=0.015, rtol=0)


@pytest.mark.parametrize("monotone", [False, True])  # True: the GPU's step, run here too
@settings(max_examples=50, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.0, 0.0, 1e-6, 1.0, 3.0]), min_size=1, max_size=16).filter(
        lambda w: sum(w) > 0
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_inverse_cdf_never_draws_a_token_of_probability_zero(
    device: torch.device, weights: list[float], seed: int, monotone: bool
) -> None:
    probs = torch.tensor(weights, device=device) / sum(weights)
    drawn = sample_categorical(probs.expand(4000, -1), torch.Generator(device).manual_seed(seed), monotone)
    assert drawn.shape == (4000,)
    assert (probs[drawn] > 0).all()


@pytest.mark.parametrize("monotone", [False, True])
@pytest.mark.parametrize("u", [0.0, 1 - 2**-24])  # the ends of torch.rand's range in float32: [0, 1)
def test_the_inverse_cdf_draws_a_token_of_probability_above_zero_at_either_end_of_the_uniform(
    monkeypatch: pytest.MonkeyPatch, u: float, monotone: bool
) -> None:
    """``torch.rand`` returns 0 once in 2**24 draws, which random draws in a test almost never meet: searching for
    ``u * total`` there picked a leading token of probability zero (one top-k or top-p had cut)."""
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.full(shape[:2], u))
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]])
    drawn = int(sample_categorical(probs, torch.Generator(), monotone))
    assert probs[0, drawn] > 0


@pytest.mark.parametrize("monotone", [False, True])
def test_a_row_of_nan_is_refused_on_either_path(device: torch.device, monotone: bool) -> None:
    """The GPU's step reads NaN > 0 as False: checked after it, a NaN row's CDF was zeros and it drew token 0."""
    probs = torch.full((3, 5), 0.2, device=device)
    probs[1] = math.nan
    with pytest.raises(ValueError, match="logits are not finite"):
        sample_categorical(probs, torch.Generator(device).manual_seed(0), monotone)


def test_batched_prompts_of_different_lengths_give_each_prompt_alone(
    device: torch.device, free: list[list[int]]
) -> None:
    assert free == [run(device, [prompt])[0] for prompt in PROMPTS]
    assert all(len(tokens) == 12 for tokens in free)


def test_gpt_batched_greedy_equals_the_full_recompute_sampler(device: torch.device) -> None:
    config = gpt.GPTConfig(vocab_size=VOCAB, context=64, d_model=32, n_layers=2, n_heads=4, init_std=0.1)
    params = gpt.init(config, seed=0, device=device)
    cache = init_cache(config, 3, 20, device=device)
    batched = generate(gpt.cached(config), params, cache, PROMPTS, 10)
    for prompt, tokens in zip(PROMPTS, batched, strict=True):
        recomputed = sample(
            lambda batch: gpt.forward(params, batch, config),
            torch.tensor([prompt], device=device),
            10,
            64,
            temperature=0.0,
        )
        assert tokens == recomputed[0].tolist()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0)])
def test_copies_continue_each_prompt_as_the_repeated_prompts_would(
    device: torch.device, sampling: Sampling
) -> None:
    repeated = [prompt for prompt in PROMPTS for _ in range(3)]
    cache = init_cache(CONFIG, 3, 32, device=device)
    branched = generate(STEP, params(device), cache, PROMPTS, 12, sampling, seed=5, stop_tokens={3}, copies=3)
    assert branched == run(device, repeated, sampling=sampling, seed=5, stop_tokens={3})
    if sampling.temperature > 0:  # the copies are distinct samples, not one sample thrice
        assert len({tuple(tokens) for tokens in branched}) > len(PROMPTS)


def test_same_seed_same_samples(device: torch.device) -> None:
    sampling = Sampling(temperature=1.5, top_k=40, top_p=0.95)
    first = run(device, max_new_tokens=8, sampling=sampling, seed=3)
    assert run(device, max_new_tokens=8, sampling=sampling, seed=3) == first
    assert run(device, max_new_tokens=8, sampling=sampling, seed=4) != first


def test_the_reference_sampler_sees_the_last_context_tokens_and_repeats_a_rows_stop_token() -> None:
    """``sample`` is what the cached generator is tested against: a window one token short (or long) and a row
    going on after its stop token passed every test that used it, with prompts far shorter than the context."""
    seen: list[int] = []

    def count_on(batch: Batch) -> torch.Tensor:  # greedy: the next token is the last one + 1, modulo 10
        seen.append(batch.tokens.shape[1])
        following = torch.nn.functional.one_hot((batch.tokens[:, -1] + 1) % 10, 10).float()
        return following[:, None, :].expand(-1, batch.tokens.shape[1], -1)

    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = sample(count_on, prompt, 6, context=4, temperature=0.0, stop_token=8)
    assert seen == [3, 4, 4, 4, 4]  # ends once both rows have stopped
    assert out.tolist() == [[4, 5, 6, 7, 8], [7, 8, 8, 8, 8]]


def test_a_stop_token_ends_its_row_only(device: torch.device, free: list[list[int]]) -> None:
    stop = free[0][4]
    stopped = run(device, stop_tokens={stop})
    for tokens, alone in zip(stopped, free, strict=True):
        end = alone.index(stop) + 1 if stop in alone else len(alone)
        assert tokens == alone[:end]
    assert stopped[0][-1] == stop


def decode(ids: list[int]) -> str:
    """A stand-in tokenizer: each id is two letters, so strings can straddle tokens."""
    return "".join(chr(ord("a") + i % 26) + chr(ord("a") + i // 26) for i in ids)


def test_a_stop_string_ends_generation_at_the_token_completing_it(
    device: torch.device, free: list[list[int]]
) -> None:
    # Straddles tokens 5 and 6 of the first row: the second letter of one and the first of the next.
    target = decode(free[0])[11:13]
    stopped = run(device, stop_strings=[target], decode=decode)
    for tokens, alone in zip(stopped, free, strict=True):
        ends = [n for n in range(1, len(alone) + 1) if target in decode(alone[:n])]
        assert tokens == alone[: ends[0] if ends else len(alone)]
    assert len(stopped[0]) <= 7


def test_generation_ends_when_every_row_has_stopped(device: torch.device, free: list[list[int]]) -> None:
    stops = {row[1] for row in free}
    cache = init_cache(CONFIG, 3, 32, device=device)
    steps = list(stream(STEP, params(device), cache, PROMPTS, 12, stop_tokens=stops))
    last_needed = max(next(i for i, token in enumerate(row) if token in stops) for row in free)
    assert len(steps) == last_needed + 1 <= 2


def test_streaming_yields_what_generate_returns(device: torch.device) -> None:
    sampling = Sampling(temperature=1.0, top_p=0.9)
    collected: list[list[int]] = [[] for _ in PROMPTS]
    cache = init_cache(CONFIG, 3, 32, device=device)
    steps = list(stream(STEP, params(device), cache, PROMPTS, 12, sampling, 7, stop_tokens={3}))
    for emitted in steps:
        assert emitted.tokens.shape == emitted.emitted.shape == (3,)
        for row, (token, live) in enumerate(
            zip(emitted.tokens.tolist(), emitted.emitted.tolist(), strict=True)
        ):
            if live:
                collected[row].append(token)
    assert collected == run(device, max_new_tokens=12, sampling=sampling, seed=7, stop_tokens={3})


def test_the_cache_passed_in_is_not_changed(device: torch.device) -> None:
    cache = init_cache(CONFIG, 3, 32, device=device)
    first = generate(STEP, params(device), cache, PROMPTS, 10)
    assert int(cache["length"]) == 0
    assert not cache["k"].any()
    assert generate(STEP, params(device), cache, PROMPTS, 10) == first


@pytest.mark.parametrize("copies", [1, 3])
def test_a_donated_cache_is_written_into_and_gives_the_same_tokens(device: torch.device, copies: int) -> None:
    """``donate`` gives the cache to the prefill, which writes the prompts into its buffers (one cache where a
    copying prefill held up to three); the tokens are the copying path's, sampled or greedy."""
    sampling = Sampling(temperature=1.0, top_p=0.9)
    kept = init_cache(CONFIG, 3, 32, device=device)
    given = init_cache(CONFIG, 3, 32, device=device)
    expected = list(stream(STEP, params(device), kept, PROMPTS, 12, sampling, 7, copies=copies))
    got = list(stream(STEP, params(device), given, PROMPTS, 12, sampling, 7, copies=copies, donate=True))
    assert [e.tokens.tolist() for e in got] == [e.tokens.tolist() for e in expected]
    assert int(given["length"]) == 0  # the TensorDict is the caller's; its buffers were the prefill's
    assert given["k"].any()
    if copies == 1:
        assert got[0].cache["k"].data_ptr() == given["k"].data_ptr()
    assert not kept["k"].any()


def test_left_padding_right_aligns_the_prompts() -> None:
    batch = left_padded([[1, 2, 3], [4]])
    assert batch.tokens.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch.is_token is not None
    assert batch.is_token.tolist() == [[True, True, True], [False, False, True]]
    assert isinstance(batch, Batch)


@pytest.mark.parametrize(
    "fields",
    [{"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1.0}, {"top_kk": 3}],
    ids=["top_k-0", "top_p-0", "top_p-above-1", "negative-temperature", "misspelt-field"],
)
def test_sampling_refuses_settings_outside_its_ranges(fields: dict[str, float]) -> None:
    """No token survives top-k 0 or top-p 0, top-p is a probability, a negative temperature would make the least
    likely token the most likely, and a misspelt field would silently sample with the default."""
    with pytest.raises(pydantic.ValidationError):
        Sampling(**fields)


def test_the_longest_prompt_sizes_the_room_needed(device: torch.device) -> None:
    """Left-padded, every row takes the longest prompt's slots: 4 + 3 - 1 = 6 do not fit in 5, whichever row the
    longest prompt is in, and fit in 6."""
    for prompts in ([[1, 2, 3, 4], [5]], [[5], [1, 2, 3, 4]]):
        with pytest.raises(ValueError, match="room for 5 tokens per row, this generation needs 6"):
            run(device, prompts, max_new_tokens=3, max_len=5)
        assert [len(tokens) for tokens in run(device, prompts, max_new_tokens=3, max_len=6)] == [3, 3]


def test_a_stop_token_ends_its_row_when_stop_strings_are_given_too(
    device: torch.device, free: list[list[int]]
) -> None:
    """A stop string that never appears (``decode`` writes letters alone) leaves the stop token's stopping as it
    is without stop strings."""
    stop = free[0][4]
    stopped = run(device, stop_tokens={stop}, stop_strings=["~"], decode=decode)
    for tokens, alone in zip(stopped, free, strict=True):
        end = alone.index(stop) + 1 if stop in alone else len(alone)
        assert tokens == alone[:end]
    assert stopped[0][-1] == stop


def test_the_decode_steps_write_into_one_cache(device: torch.device) -> None:
    """The prefill writes a new cache (the one passed in is not donated) and every decode step after it writes
    into that cache's buffers (``donate``), not a fresh copy per token; each step's cache still says how many
    tokens chose its tokens: the longest prompt's 7, then one more a step."""
    cache = init_cache(CONFIG, 3, 32, device=device)
    steps = list(stream(STEP, params(device), cache, PROMPTS, 6))
    assert len(steps) == 6
    assert len({emitted.cache["k"].data_ptr() for emitted in steps}) == 1
    assert steps[0].cache["k"].data_ptr() != cache["k"].data_ptr()
    assert [int(emitted.cache["length"]) for emitted in steps] == [7, 8, 9, 10, 11, 12]


def test_bad_requests_are_refused(device: torch.device) -> None:
    with pytest.raises(ValueError, match="decode"):
        run(device, stop_strings=["x"])
    with pytest.raises(ValueError, match="room for 4"):
        run(device, [[1, 2]], max_new_tokens=4, max_len=4)
    # The prompt and the fed-back tokens (all but the last) fill the 4 slots exactly.
    assert len(run(device, [[1, 2]], max_new_tokens=3, max_len=4)[0]) == 3
    with pytest.raises(ValueError, match="3 prompts, but the cache has 2 rows"):
        generate(STEP, params(device), init_cache(CONFIG, 2, 32, device=device), PROMPTS, 4)
    with pytest.raises(ValueError, match="at least one token"):
        run(device, [[1], []])
    with pytest.raises(ValueError, match="copies must be at least 1"):
        run(device, copies=0)


def test_stop_strings_are_found_in_a_tail_of_the_text_as_in_the_whole(device: torch.device) -> None:
    """Each step decodes a tail of the row (the longest stop string's 4 bytes a character, and a margin), not
    the whole text (quadratic in its length): the same stops as the whole text's, with a decode that drops the
    text's first space as SentencePiece's does, for stop strings starting with one, far past the tail's length."""

    def spaced(ids: list[int]) -> str:
        seen.append(len(ids))
        return "".join(" " + decode([i]) for i in ids)[1:]

    cache = init_cache(CONFIG, 3, 56, device=device)
    free = generate(STEP, params(device), cache, PROMPTS, 50, Sampling(temperature=1.0), seed=2)
    targets = [
        " " + decode([row[k]]) + " " + decode([row[k + 1]])[0]
        for row, k in zip(free, [12, 30, 47], strict=True)
    ]
    seen: list[int] = []
    stopped = generate(
        STEP,
        params(device),
        cache,
        PROMPTS,
        50,
        Sampling(temperature=1.0),
        seed=2,
        stop_strings=targets,
        decode=spaced,
    )
    for tokens, alone in zip(stopped, free, strict=True):
        whole = "".join(" " + decode([i]) for i in alone)[1:]
        ends = [n for n in range(1, len(alone) + 1) if any(t in whole[: 3 * n - 1] for t in targets)]
        assert tokens == alone[: ends[0] if ends else len(alone)]
    assert sorted(map(len, stopped)) != [50, 50, 50]
    assert max(seen) == 4 * max(map(len, targets)) + 8 < 48  # the rows run past it
    assert len(seen) == sum(map(len, stopped))  # one decode per token a live row emits, whatever the stops
