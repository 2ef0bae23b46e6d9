"""Scoring completions with a reward function, and how much an accuracy measured on n problems can be trusted."""

import inspect
import math
from collections.abc import Callable, Sequence
from statistics import NormalDist
from typing import Any, Protocol, cast, runtime_checkable

from zmaj.tasks.base import Problem, Reward


@runtime_checkable  # beartype checks the hint (only that it is callable)
class RewardFn(Protocol):
    """``Task.reward``'s signature: ``stopped`` is False for a completion that ran into the token limit."""

    def __call__(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward: ...


PlainRewardFn = Callable[[Problem, str], Reward]
"""A reward of the completion alone, the signature before ``stopped``: it reads every completion whole."""


def score(
    reward: RewardFn | PlainRewardFn,
    problems: Sequence[Problem],
    completions: Sequence[str],
    stopped: Sequence[bool] | None = None,
) -> list[Reward]:
    """``reward(problem, completion, stopped=...)`` for each sample (``stopped`` None: every completion ended
    by itself); a checker that raises or returns non-finite values fails naming the sample, since in the middle
    of an RL run "NaN" alone says nothing about which problem broke it.

    Built-in tasks pass ``task.reward``; any function of the same signature works, and one without ``stopped``
    (``PlainRewardFn``, a task's ``reward`` written before it) is called as it was, with the completion alone.
    """
    stopped = [True] * len(completions) if stopped is None else stopped
    read = _with_stopped(reward)
    if not len(problems) == len(completions) == len(stopped):
        raise ValueError(
            f"{len(problems)} problems but {len(completions)} completions ({len(stopped)} stopped)"
        )
    rewards = []
    for index, (problem, completion, ended) in enumerate(zip(problems, completions, stopped, strict=True)):
        sample = f"sample {index} (prompt {problem.prompt!r})"
        try:
            result = read(problem, completion, stopped=ended)
        except Exception as error:
            raise RuntimeError(f"the reward function failed on {sample}: {error!r}") from error
        if not isinstance(result, Reward):
            raise TypeError(f"the reward function returned {result!r}, not a Reward, for {sample}")
        if not (math.isfinite(result.format) and math.isfinite(result.correctness)):
            raise ValueError(f"the reward function returned a non-finite {result} for {sample}")
        rewards.append(result)
    return rewards


def _with_stopped(reward: RewardFn | PlainRewardFn) -> RewardFn:
    """``reward`` as a ``RewardFn``: one without ``stopped`` reads each completion whole, as it always has."""
    if "stopped" in inspect.signature(reward).parameters:
        return cast(RewardFn, reward)

    def whole(problem: Problem, completion: str, *, stopped: bool = True) -> Any:  # Any: score checks it
        return reward(problem, completion)

    return whole


def accuracy_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(accuracy, low, high)``: the observed rate and its Wilson score interval.

    Wilson (1927), "Probable Inference, the Law of Succession, and Statistical Inference", JASA 22(158). Unlike
    the textbook p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and does not collapse to a point at 0 or n successes,
    which is exactly where a small eval set of a tiny model lands. Newcombe (1998, Stat. Med. 17:857) compares it
    with the alternatives.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denominator = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    # At 0 (or n) successes the exact lower (upper) end is 0 (1); in floats centre - half_width can miss by 1e-17.
    low = 0.0 if successes == 0 else centre - half_width
    high = 1.0 if successes == n else centre + half_width
    return p, low, high
