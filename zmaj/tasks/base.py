"""A task is a generator of problems with an exact checker: the data of fine-tuning with verifiable rewards.

Each problem has a question (``prompt``), its canonical final answer, and a short worked answer (``solution``) that
SFT imitates. RL with verifiable rewards (GRPO: Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, §4) then only
needs ``reward(problem, completion)``: whether the completion ends in the required format, and whether the answer
it gives is right. One format for every task keeps that learnable by a tiny model: the completion's last non-blank
line is ``Answer: <value>``.

Problems are drawn from a seeded ``random.Random``, and each one belongs to the train or the test split by a hash
of its question, as documents do in ``zmaj.data.corpus``: the split is a property of the problem alone, so no seed,
count or difficulty can ever put a test question into training.
"""

import hashlib
import random
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

Split = Literal["train", "test"]

FORMAT_WEIGHT = 0.1
"""A well-formed but wrong answer earns a little, so a fresh model first learns the format, then correctness; the
format reward stays small next to correctness (1.0) so it cannot be farmed instead of solving."""

FEW_SHOT_STOP = "\n\n"
"""Worked answers hold no blank line, so a base model prompted few-shot has finished when it writes one."""

_ANSWER_LINE = re.compile(r"Answer:[ \t]*(?P<value>\S.*)")  # fullmatched on a stripped line


@dataclass(frozen=True)
class Problem:
    """One question, its canonical answer and a worked answer ending in ``Answer: <answer>``."""

    prompt: str
    answer: str
    solution: str
    info: dict[str, Any] = field(default_factory=dict, hash=False)
    """What a checker needs beyond the answer, e.g. the numbers and target of a countdown problem."""


@dataclass(frozen=True)
class Reward:
    """The two verifiable rewards of a completion, each 0 or 1 for the built-in tasks."""

    format: float
    correctness: float

    @property
    def total(self) -> float:
        """The scalar an RL step maximises."""
        return FORMAT_WEIGHT * self.format + self.correctness


def final_answer(completion: str) -> str | None:
    """The value on the completion's last non-blank line if that line is ``Answer: <value>``, else None."""
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return None
    match = _ANSWER_LINE.fullmatch(lines[-1].strip())
    return match["value"] if match else None


def finished_lines(completion: str, stopped: bool) -> str:
    """The lines a completion finished: all of it if generation stopped by itself (a stop token, or few-shot
    the blank line), else up to its last line break, since the token limit can cut a line anywhere."""
    return completion if stopped else completion[: completion.rfind("\n") + 1]


def in_test_split(task_name: str, prompt: str, fraction: float) -> bool:
    """Whether a question is held out: the first 8 bytes of sha256(task name, question) as a number in [0, 1)."""
    digest = hashlib.sha256(f"{task_name}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class Task(BaseModel, ABC):
    """A problem generator and its checker; the fields are its difficulty (and are validated like a config).

    A new task subclasses this, names itself, and writes ``generate`` and ``is_correct``; splits, few-shot
    prompts and rewards come from here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: ClassVar[str]
    test_fraction: ClassVar[float] = 0.2
    """The share of all possible questions held out for evaluation: the task's own, not an option, since an
    option could differ between the training spec and the evaluation and put test questions into training."""

    @abstractmethod
    def generate(self, rng: random.Random) -> Problem:
        """One problem, drawing every random choice from ``rng``."""

    @abstractmethod
    def is_correct(self, problem: Problem, value: str) -> bool:
        """Whether ``value`` (the text after ``Answer:``) answers the problem; exact, never ``eval``."""

    def problems(self, split: Split, n: int, seed: int = 0) -> list[Problem]:
        """The first ``n`` distinct problems of a split drawn from ``seed``; a larger ``n`` extends the list."""
        if seed < 0:  # random.Random(-3) is random.Random(3): the draw would repeat another seed's
            raise ValueError(f"task {self.name!r}: seed {seed} is negative; seeds are 0 or more")
        rng = random.Random(seed)
        want_test = split == "test"
        found: dict[str, Problem] = {}
        max_draws, draws, since_new = 1000 + 100 * n, 0, 0
        # Also given up after a run of draws that found nothing new, long beside the problems found so far (the
        # last unseen problem of a split takes len(found) / its fraction of the draws on average): a split that
        # has run out says so at once, where 100 draws per problem asked took minutes for a large n.
        while len(found) < n and draws < max_draws and since_new <= 1000 + 100 * len(found):
            problem = self.generate(rng)
            draws, since_new = draws + 1, since_new + 1
            held_out = in_test_split(self.name, problem.prompt, self.test_fraction)
            if held_out == want_test and problem.prompt not in found:
                found[problem.prompt], since_new = problem, 0
        if len(found) < n:
            raise ValueError(
                f"task {self.name!r} ({self!r}) gave only {len(found)} distinct {split} problems of the {n} asked "
                f"in {draws} draws: ask for fewer or make the task harder"
            )
        return list(found.values())

    def few_shot_prompt(self, problem: Problem, k: int = 3, seed: int = 0) -> str:
        """``k`` solved train problems, then the question: how a base model is shown the answer format.

        A model continues it with a worked answer; cut its completion at ``FEW_SHOT_STOP``.
        """
        examples = [p for p in self.problems("train", k + 1, seed) if p.prompt != problem.prompt][:k]
        shots = "".join(f"Question: {p.prompt}\n{p.solution}{FEW_SHOT_STOP}" for p in examples)
        return f"{shots}Question: {problem.prompt}\n"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        """Format: the last line is ``Answer: <value>``; correctness: that value is right (needs the format).

        ``stopped`` is False for a completion that ran into the token limit: its last line is unfinished
        (``finished_lines``), so a cut "Answer: 120" earns nothing rather than passing as 12.
        """
        value = final_answer(finished_lines(completion, stopped))
        if value is None:
            return Reward(format=0.0, correctness=0.0)
        return Reward(format=1.0, correctness=float(self.is_correct(problem, value)))


def parse_int(value: str) -> int | None:
    """An integer written plainly (optional sign, ASCII digits, optional thousands commas), else None: ``\\d``
    alone matches every script's digits, which ``int`` reads too, and a task asks for the answer in ``0-9``."""
    if re.fullmatch(r"[+-]?([0-9]+|[0-9]{1,3}(,[0-9]{3})+)", value) is None:
        return None
    plain = value.replace(",", "")
    if 0 < sys.get_int_max_str_digits() < len(plain.lstrip("+-")):  # int() refuses it: no answer is that long
        return None
    return int(plain)
