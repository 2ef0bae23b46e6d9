import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmaj.tasks import ArithmeticTask, Problem, Reward, accuracy_interval, finished_lines, score


def test_score_applies_the_reward_to_each_sample() -> None:
    task = ArithmeticTask()
    problems = task.problems("test", 3)
    completions = [problems[0].solution, "no idea", "Answer: -1"]
    assert score(task.reward, problems, completions) == [
        Reward(1.0, 1.0),
        Reward(0.0, 0.0),
        Reward(1.0, 0.0),
    ]
    with pytest.raises(ValueError, match="3 problems but 2 completions"):
        score(task.reward, problems, completions[:2])
    with pytest.raises(ValueError, match=r"3 problems but 3 completions \(2 stopped\)"):
        score(task.reward, problems, completions, [True, True])


def test_a_completion_cut_by_the_token_limit_is_read_without_its_unfinished_line() -> None:
    """The limit can cut "Answer: 120" to "Answer: 12", which must not pass; a stopped one is read whole."""
    task = ArithmeticTask()
    problem = next(p for p in task.problems("test", 50) if len(p.answer) > 1)
    worked = problem.solution.rsplit("\n", 1)[0]
    right, cut = problem.solution, f"{worked}\nAnswer: {problem.answer[:-1]}"
    assert score(task.reward, [problem] * 3, [right, right, cut]) == [Reward(1.0, 1.0)] * 2 + [
        Reward(1.0, 0.0)
    ]
    assert score(task.reward, [problem] * 3, [right, cut, cut], [True, False, False]) == [
        Reward(1.0, 1.0),
        Reward(0.0, 0.0),
        Reward(0.0, 0.0),
    ]
    assert score(task.reward, [problem], [right + "\n"], [False]) == [Reward(1.0, 1.0)]  # its line finished


@given(st.text(alphabet="ab\n ", max_size=20), st.booleans())
def test_finished_lines_are_all_of_a_stopped_completion_and_the_whole_lines_of_a_cut_one(
    text: str, stopped: bool
) -> None:
    kept = finished_lines(text, stopped)
    if stopped:
        assert kept == text
    else:
        assert text.startswith(kept)
        assert kept == "" or kept.endswith("\n")
        assert "\n" not in text[len(kept) :]


def test_score_names_the_sample_a_user_reward_fails_on() -> None:
    problems = ArithmeticTask().problems("test", 3)

    def fragile(problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(1.0, 1 / (len(completion) - 3))

    with pytest.raises(RuntimeError, match=r"sample 1 \(prompt 'What is .*\?'\)") as caught:
        score(fragile, problems, ["abcd", "abc", "abcde"])
    assert isinstance(caught.value.__cause__, ZeroDivisionError)

    for bad in (math.nan, math.inf):

        def broken(problem: Problem, completion: str, *, stopped: bool = True, bad: float = bad) -> Reward:
            return Reward(1.0, bad if completion == "x" else 0.0)

        with pytest.raises(
            ValueError, match=rf"non-finite .* for sample 2 \(prompt {re.escape(repr(problems[2].prompt))}\)"
        ):
            score(broken, problems, ["a", "b", "x"])
    with pytest.raises(TypeError, match=r"returned 1\.0, not a Reward, for sample 0"):
        score(lambda p, c: 1.0, problems, ["a", "b", "c"])  # type: ignore[arg-type, return-value]


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857, Table I,
    # method 3 (Wilson score, no continuity correction), 95%.
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_published_values(successes: int, n: int, low: float, high: float) -> None:
    accuracy, got_low, got_high = accuracy_interval(successes, n)
    assert accuracy == successes / n
    assert got_low == pytest.approx(low, abs=1e-4)
    assert got_high == pytest.approx(high, abs=1e-4)


@given(st.integers(1, 10_000), st.sampled_from([(0.90, 1.6448536), (0.95, 1.9599640), (0.99, 2.5758293)]))
def test_wilson_interval_at_zero_and_all_successes_has_a_closed_form(
    n: int, level: tuple[float, float]
) -> None:
    """With p = 0 the upper end is z^2 / (n + z^2); with p = 1 the lower end is n / (n + z^2)."""
    confidence, z = level
    none, all_ = accuracy_interval(0, n, confidence), accuracy_interval(n, n, confidence)
    assert none[:2] == (0.0, 0.0)
    assert none[2] == pytest.approx(z**2 / (n + z**2), rel=1e-6)
    assert (all_[0], all_[2]) == (1.0, 1.0)
    assert all_[1] == pytest.approx(n / (n + z**2), rel=1e-6)


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_is_symmetric_contains_the_rate_and_narrows_with_confidence(
    kn: tuple[int, int],
) -> None:
    k, n = kn
    p, low, high = accuracy_interval(k, n)
    _, mirror_low, mirror_high = accuracy_interval(n - k, n)
    assert low == pytest.approx(1 - mirror_high)
    assert high == pytest.approx(1 - mirror_low)
    assert 0 <= low <= p <= high <= 1
    _, low_90, high_90 = accuracy_interval(k, n, 0.9)
    assert low <= low_90 + 1e-12
    assert high_90 <= high + 1e-12


def test_wilson_interval_rejects_impossible_counts() -> None:
    for successes, n in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError, match="successes <= n"):
            accuracy_interval(successes, n)
    with pytest.raises(ValueError, match="confidence"):
        accuracy_interval(1, 2, confidence=1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_format_reward_is_refused_too(bad: float) -> None:
    """Both rewards feed the RL step (``total``): a NaN format reward must name the sample as a NaN correctness
    does (only correctness was tested)."""
    problems = ArithmeticTask().problems("test", 2)
    with pytest.raises(ValueError, match=r"non-finite .* for sample 1"):
        score(lambda p, c: Reward(bad if c == "x" else 1.0, 0.0), problems, ["a", "x"])


def test_a_reward_without_stopped_is_called_as_before_with_the_whole_completion() -> None:
    """A task's ``reward`` written before ``stopped`` (a user's module), or a plain function: each sample failed
    with "unexpected keyword argument 'stopped'", stopping GRPO at its first step."""
    problems = ArithmeticTask().problems("test", 2)
    seen: list[str] = []

    def plain(problem: Problem, completion: str) -> Reward:
        seen.append(completion)
        return Reward(1.0, float(completion.endswith(problem.answer)))

    class Old(ArithmeticTask):
        def reward(self, problem: Problem, completion: str) -> Reward:  # type: ignore[override]
            return plain(problem, completion)

    cut = [f"1\nAnswer: {p.answer}" for p in problems]
    for reward in (plain, Old().reward):
        assert score(reward, problems, cut, [False, True]) == [Reward(1.0, 1.0)] * 2
    assert seen == cut * 2  # whole, cut or not
    assert score(ArithmeticTask().reward, problems, cut, [False, True]) == [
        Reward(0.0, 0.0),
        Reward(1.0, 1.0),
    ]


def test_wilson_interval_of_no_samples_is_a_value_error() -> None:
    """An evaluation of no problems has no rate: the documented ``ValueError`` naming the counts, not a
    ``ZeroDivisionError`` from 0 / 0 deep in the formula."""
    with pytest.raises(ValueError, match=r"n >= 1, got successes=0, n=0"):
        accuracy_interval(0, 0)
