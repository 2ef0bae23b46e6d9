"""The pieces of zmaj's lm-evaluation-harness backend against independent references: the harness's own rolling
windows, request order through the longest-first batching, and per-pair log-likelihoods from a plain forward pass
of each pair alone."""

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from zmaj.convert.load import Pretrained, save_zmaj
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.eval import harness
from zmaj.eval.harness import ZmajLM, batched, rolling_windows, sampling_from, score_continuations
from zmaj.infer.generate import GREEDY, Sampling
from zmaj.models import gpt, registry
from zmaj.models.common import Batch
from zmaj.models.gpt import GPTConfig

CONFIG = GPTConfig(vocab_size=64, context=16, d_model=16, n_layers=2, n_heads=2)


@given(
    tokens=st.lists(st.integers(0, 99), max_size=60),
    prefix=st.integers(100, 101),
    max_length=st.integers(1, 16),
)
def test_rolling_windows_are_the_harness_windows(tokens: list[int], prefix: int, max_length: int) -> None:
    expected = [
        make_disjoint_window(window)
        for window in get_rolling_token_windows(tokens, prefix, max_length, context_len=1)
    ]
    windows = rolling_windows(tokens, prefix, max_length)
    assert windows == [(list(context), list(continuation)) for context, continuation in expected]
    # Every token is predicted exactly once, and no model input is longer than max_length.
    assert [t for _, continuation in windows for t in continuation] == tokens
    assert all(len(context) + len(continuation) - 1 <= max_length for context, continuation in windows)


@given(lengths=st.lists(st.integers(1, 30), max_size=40), batch_size=st.integers(1, 7))
def test_batched_runs_longest_first_and_answers_in_request_order(lengths: list[int], batch_size: int) -> None:
    seen: list[list[int]] = []

    def run(batch: list[int]) -> list[tuple[int, int]]:
        seen.append(batch)
        return [(i, lengths[i]) for i in batch]

    assert batched(lengths, batch_size, run, "test") == [(i, n) for i, n in enumerate(lengths)]
    order = [i for batch in seen for i in batch]
    assert sorted(order) == list(range(len(lengths)))
    assert all(len(batch) <= batch_size for batch in seen)
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)


@given(
    groups=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 30)), max_size=40),
    batch_size=st.integers(1, 7),
)
def test_batched_keeps_each_key_in_one_batch_longest_first(
    groups: list[tuple[int, int]], batch_size: int
) -> None:
    """Requests with one key share a batch and count once toward its size; keys go longest first."""
    keys, lengths = [key for key, _ in groups], [length for _, length in groups]
    seen: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        seen.append(batch)
        return batch

    assert batched(lengths, batch_size, run, "test", keys=keys) == list(range(len(keys)))
    batch_keys = [{keys[i] for i in batch} for batch in seen]
    assert all(len(batch) <= batch_size for batch in batch_keys)
    assert sum(map(len, batch_keys)) == len(set(keys))  # no key in two batches
    order = list(dict.fromkeys(keys[i] for batch in seen for i in batch))
    longest = [max(n for k, n in groups if k == key) for key in order]
    assert longest == sorted(longest, reverse=True)


@pytest.fixture(scope="module")
def model() -> Pretrained:
    tokenizer = Tokenizer.train(
        ["the quick brown fox jumps over the lazy dog\n"] * 10, vocab_size=CONFIG.vocab_size
    )
    return Pretrained(CONFIG, gpt.init(CONFIG, 0), ModelTokenizer.from_zmaj(tokenizer))


def naive_score(
    model: Pretrained, context: list[int], continuation: list[int], max_length: int = CONFIG.context
) -> tuple[float, bool]:
    """The pair alone, whole logits, log-softmax, the continuation's entries picked one by one."""
    assert isinstance(model.config, GPTConfig)
    ids = [*context, *continuation][-(max_length + 1) :]
    logits = gpt.forward(model.params, Batch(tokens=torch.tensor([ids[:-1]])), model.config)[0]
    logprobs = torch.log_softmax(logits, -1)[-len(continuation) :]
    total = sum(float(logprobs[i, t]) for i, t in enumerate(continuation))
    greedy = all(int(logprobs[i].argmax()) == t for i, t in enumerate(continuation))
    return total, greedy


@settings(max_examples=15)  # each example runs the model once per pair
@given(
    pairs=st.lists(
        st.tuples(
            st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=24),
            st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=CONFIG.context),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_a_batch_scores_each_pair_as_it_scores_alone(
    model: Pretrained, pairs: list[tuple[list[int], list[int]]]
) -> None:
    """Right padding and left truncation (pairs longer than the context) change no pair's score."""
    scores = score_continuations(model, pairs, CONFIG.context)
    for (total, greedy), (context, continuation) in zip(scores, pairs, strict=True):
        expected_total, expected_greedy = naive_score(model, context, continuation)
        assert total == pytest.approx(expected_total, abs=1e-4)
        assert greedy == expected_greedy


def test_scores_unembed_a_chunk_of_positions_at_a_time(
    model: Pretrained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rolling request scores every position of its windows: the unembedding takes ``chunk`` of them at a
    time, never the batch's all, and the scores are those of one pass."""
    pairs = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9], [10, 11, 12])]
    whole = score_continuations(model, pairs, CONFIG.context, chunk=100)
    widths: list[int] = []
    arch = registry.ARCHITECTURES["gpt"]

    def counted(params: Any, hidden: torch.Tensor, config: Any) -> torch.Tensor:
        widths.append(hidden.shape[1])
        return arch.unembed(params, hidden, config=config)

    monkeypatch.setitem(registry.ARCHITECTURES, "gpt", replace(arch, unembed=counted))
    chunked = score_continuations(model, pairs, CONFIG.context, chunk=3)
    assert widths == [3, 3, 2]
    widths.clear()  # by default, as many positions as LOGITS_PER_CHUNK logits make
    monkeypatch.setattr(harness, "LOGITS_PER_CHUNK", 4 * CONFIG.vocab_size + 1)
    score_continuations(model, pairs, CONFIG.context)
    assert widths == [4, 4]
    for (total, greedy), (expected_total, expected_greedy) in zip(chunked, whole, strict=True):
        assert total == pytest.approx(expected_total, abs=1e-5)
        assert greedy == expected_greedy


def test_the_greedy_continuation_is_flagged_greedy(model: Pretrained) -> None:
    ids = [5, 9, 2]
    with torch.no_grad():
        for _ in range(4):
            logits = gpt.forward(model.params, Batch(tokens=torch.tensor([ids])), CONFIG)
            ids.append(int(logits[0, -1].argmax()))
    (_, greedy), (_, other) = score_continuations(
        model, [(ids[:3], ids[3:]), (ids[:3], [*ids[3:6], (ids[6] + 1) % 64])], CONFIG.context
    )
    assert greedy
    assert not other


def test_a_continuation_longer_than_max_length_is_refused(model: Pretrained) -> None:
    with pytest.raises(ValueError, match="max_length=16"):
        score_continuations(model, [([1], [2] * 17)], CONFIG.context)


def test_a_pair_without_context_is_refused(model: Pretrained) -> None:
    """Its first continuation token has no position to be predicted from: scored anyway, it was left out."""
    with pytest.raises(ValueError, match="needs a context"):
        score_continuations(model, [([], [1, 2])], CONFIG.context)


def test_bf16_logits_are_scored_in_float32(model: Pretrained) -> None:
    """``dtype=auto`` is bf16 on a GPU: a log-softmax in bf16 moves each score by about 1e-2, enough to flip close
    choices (every other test runs in float32). The weights are scaled up so that the logits spread widely."""
    scaled = model.params.apply(lambda t: (t * 8).to(torch.bfloat16))
    assert scaled is not None
    bf16 = Pretrained(CONFIG, scaled, model.tokenizer)
    context, continuation = [1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]
    with torch.no_grad():
        logits = gpt.forward(
            bf16.params, Batch(tokens=torch.tensor([[*context, *continuation][:-1]])), CONFIG
        )
    logprobs = logits[0].float().log_softmax(-1)[-len(continuation) :]
    expected = sum(float(logprobs[i, t]) for i, t in enumerate(continuation))
    [(total, _)] = score_continuations(bf16, [(context, continuation)], CONFIG.context)
    assert total == pytest.approx(expected, abs=1e-4)


def test_sampling_follows_the_task_and_refuses_what_zmaj_cannot_do() -> None:
    assert sampling_from({"do_sample": False, "temperature": 0.0}) == GREEDY
    assert sampling_from({"do_sample": True, "temperature": 0.0}) == GREEDY
    assert sampling_from({"do_sample": True, "temperature": 0.7, "top_p": 0.9}) == Sampling(
        temperature=0.7, top_p=0.9
    )
    with pytest.raises(ValueError, match="num_beams"):
        sampling_from({"do_sample": False, "temperature": 0.0, "num_beams": 4})


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = GPTConfig(vocab_size=300, context=64, d_model=16, n_layers=2, n_heads=2)
    texts = ["the quick brown fox jumps over the lazy dog\n"] * 10
    tokenizer = ModelTokenizer.from_zmaj(Tokenizer.train(texts, vocab_size=config.vocab_size))
    return save_zmaj(Pretrained(config, gpt.init(config, 0), tokenizer), tmp_path_factory.mktemp("m") / "m")


# One question with one-token choices, a multi-token choice whose input is the question too, long contexts cut to
# one input, and pairs of their own: 12 requests, 5 distinct inputs of max_length=16 or fewer tokens, in an order
# that puts requests of one input apart.
QUESTION, LONG = list(range(5, 15)), list(range(100, 130))
SHARED_PAIRS = [
    *[(QUESTION, [t]) for t in (20, 21, 22, 23, 24)],
    (QUESTION[:-1], [QUESTION[-1], 30]),  # input: the question
    (QUESTION, [20, 21]),  # input: the question and 20
    (LONG, [7]),
    (LONG[5:], [8]),  # input: LONG's last 16 tokens, as for LONG
    (LONG[:-1], [LONG[-1], 9]),  # the same input
    ([3, 4], [5, 6, 7]),
    ([40], [41]),
]
SHARED_ORDER = [0, 7, 1, 10, 2, 8, 3, 6, 11, 4, 9, 5]
DISTINCT_INPUTS = 5


@pytest.mark.parametrize("batch_size", [2, 5])
def test_requests_sharing_an_input_score_as_each_alone_from_one_forward_row(
    model_folder: Path, monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> None:
    """A forward row per distinct input, however batches fall (batches of 2 or 5 requests in request order split
    the question's six; 5 distinct inputs put the question's 1-token and 2-token choices in one batch), and each
    request's score that of its pair alone. A row per request ran a multiple-choice question's forward once per
    choice."""
    pairs = [SHARED_PAIRS[i] for i in SHARED_ORDER]
    lm = ZmajLM(path=str(model_folder), device="cpu", dtype="float32", batch_size=batch_size, max_length=16)
    rows: list[int] = []
    arch = registry.ARCHITECTURES["gpt"]

    def counted(params: Any, batch: Batch, config: Any) -> torch.Tensor:
        rows.append(batch.tokens.shape[0])
        return arch.hidden_states(params, batch, config=config)

    monkeypatch.setitem(registry.ARCHITECTURES, "gpt", replace(arch, hidden_states=counted))
    scores = lm._loglikelihood_tokens([(None, context, continuation) for context, continuation in pairs])
    assert sum(rows) == DISTINCT_INPUTS
    assert max(rows) <= batch_size
    for (total, greedy), (context, continuation) in zip(scores, pairs, strict=True):
        expected_total, expected_greedy = naive_score(lm.model, context, continuation, max_length=16)
        assert total == pytest.approx(expected_total, abs=1e-5)
        assert greedy == expected_greedy


def test_log_likelihoods_run_longest_input_first_counting_the_continuation(
    model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch is the widest (an out-of-memory shows at once, and batches pad least): a pair's width is
    its context and continuation together, not its context alone."""
    lm = ZmajLM(path=str(model_folder), device="cpu", dtype="float32", batch_size=1, max_length=16)
    seen: list[list[tuple[list[int], list[int]]]] = []
    real = harness.score_continuations

    def spied(
        model: Pretrained, pairs: list[tuple[list[int], list[int]]], *args: Any
    ) -> list[tuple[float, bool]]:
        seen.append(pairs)
        return real(model, pairs, *args)

    monkeypatch.setattr(harness, "score_continuations", spied)
    # Widths 9, 7, 5; by context alone 8, 2, 3; by continuation alone 1, 5, 2: three different orders.
    pairs = [([6] * 3, [7] * 2), ([1, 2], [5] * 5), ([3] * 8, [4])]
    lm._loglikelihood_tokens([(None, context, continuation) for context, continuation in pairs])
    assert seen == [[pairs[2]], [pairs[1]], [pairs[0]]]


def test_add_bos_token_forces_one_bos_on_or_off(model_folder: Path) -> None:
    """``add_bos_token=True`` puts a BOS before a plain text, ``False`` none, and neither a second BOS before a text
    that starts with one, as ``HFLM`` (the parity test runs with the tokenizer's default only, so ignoring the
    flag, or dropping the starts-with-BOS check, passed)."""
    plain = ZmajLM(path=str(model_folder), device="cpu", dtype="float32").tok_encode("the fox")
    on = ZmajLM(path=str(model_folder), device="cpu", dtype="float32", add_bos_token=True)
    off = ZmajLM(path=str(model_folder), device="cpu", dtype="float32", add_bos_token=False)
    bos, bos_id = on.model.tokenizer.bos_token, on.model.tokenizer.bos_id
    assert plain[0] != bos_id  # zmaj's tokenizer adds no BOS by default
    assert on.tok_encode("the fox") == [bos_id, *plain]
    assert off.tok_encode("the fox") == plain
    assert on.tok_encode(f"{bos}the fox") == [bos_id, *plain]  # one BOS, not two


def test_sampled_generations_differ_per_request_and_repeat_per_seed(model_folder: Path) -> None:
    """Each batch samples from its own seed (``seed + first request``): repeats of a prompt (maj@k, pass@k) are
    independent samples, and a run is reproducible. One seed for every batch gave k identical samples."""
    kwargs = {"until": ["\n\n"], "do_sample": True, "temperature": 1.0, "max_gen_toks": 12}
    requests = [Instance("generate_until", {}, ("the quick", kwargs), i) for i in range(3)]
    lm = ZmajLM(path=str(model_folder), device="cpu", dtype="float32", batch_size=1)
    first = lm.generate_until(requests)
    assert len(set(first)) == 3
    assert lm.generate_until(requests) == first


def test_generations_prefill_into_the_cache_made_for_them(
    model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch's cache is made for it, so its prefill writes into it (``generate(donate=True)``)."""
    donated: list[bool] = []
    real = harness.generate  # type: ignore[attr-defined]  # imported there, not exported

    def spy(*args: Any, **kwargs: Any) -> Any:
        donated.append(kwargs.get("donate", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "generate", spy)
    lm = ZmajLM(path=str(model_folder), device="cpu", dtype="float32", batch_size=2)
    kwargs = {"until": ["\n"], "max_gen_toks": 3, "do_sample": False}
    lm.generate_until([Instance("generate_until", {}, ("the quick", kwargs), i) for i in range(3)])
    assert donated == [True, True]


def test_max_gen_toks_filling_max_length_is_refused_in_one_line(model_folder: Path) -> None:
    """``max_gen_toks == max_length`` leaves no token for the prompt: a ValueError naming both, not a prompt cut to
    ``[-0:]`` (the whole prompt) that runs past ``max_length`` (``>`` instead of ``>=`` passed every test)."""
    lm = ZmajLM(path=str(model_folder), device="cpu", dtype="float32", max_length=16)
    request = Instance(
        "generate_until", {}, ("the quick brown fox jumps", {"until": ["\n\n"], "max_gen_toks": 16}), 0
    )
    with pytest.raises(ValueError, match="max_gen_toks 16 leaves no room for a prompt in max_length 16"):
        lm.generate_until([request])
