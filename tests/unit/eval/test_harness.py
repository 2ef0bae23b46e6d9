"""The pieces of zmaj's lm-evaluation-harness backend against independent references: the harness's own rolling
windows, request order through the longest-first batching, and per-pair log-likelihoods from a plain forward pass
of each pair alone."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from zmaj.convert.load import Pretrained
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.eval.harness import batched, rolling_windows, sampling_from, score_continuations
from zmaj.infer.generate import GREEDY, Sampling
from zmaj.models import gpt
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


@pytest.fixture(scope="module")
def model() -> Pretrained:
    tokenizer = Tokenizer.train(
        ["the quick brown fox jumps over the lazy dog\n"] * 10, vocab_size=CONFIG.vocab_size
    )
    return Pretrained(CONFIG, gpt.init(CONFIG, 0), ModelTokenizer.from_zmaj(tokenizer))


def naive_score(model: Pretrained, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The pair alone, whole logits, log-softmax, the continuation's entries picked one by one."""
    ids = [*context, *continuation][-(CONFIG.context + 1) :]
    logits = gpt.forward(model.params, Batch(tokens=torch.tensor([ids[:-1]])), CONFIG)[0]
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


def test_sampling_follows_the_task_and_refuses_what_zmaj_cannot_do() -> None:
    assert sampling_from({"do_sample": False, "temperature": 0.0}) == GREEDY
    assert sampling_from({"do_sample": True, "temperature": 0.0}) == GREEDY
    assert sampling_from({"do_sample": True, "temperature": 0.7, "top_p": 0.9}) == Sampling(
        temperature=0.7, top_p=0.9
    )
    with pytest.raises(ValueError, match="num_beams"):
        sampling_from({"do_sample": False, "temperature": 0.0, "num_beams": 4})
