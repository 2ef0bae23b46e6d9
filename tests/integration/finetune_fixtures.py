"""Tiny models and toy tasks for the fine-tuning tests; the programs import this module with ``--import``.

Importing it registers toy tasks: ``always-right`` (every answer is right, so accuracy is exactly 1),
``right-without-format`` and ``format-only`` (correctness and format apart), ``half-right`` (partial credit),
``say-e`` (the reward is the share of ``e`` among the answer's characters: easy for GRPO to raise) with
``long-or-short``, its prompts of two lengths, and ``reward-raises`` / ``reward-nan`` / ``raises-on-rank-1``,
whose checkers break on purpose.
"""

import math
import os
import random
from pathlib import Path
from typing import ClassVar

from zmaj.convert.load import Pretrained, save_zmaj
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.models import llama
from zmaj.tasks import Problem, Reward, Task, get_task, register_task, task_names

VOCAB = 300
CONFIG = llama.LlamaConfig(
    vocab_size=VOCAB, context=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.1
)


class ToyTask(Task):
    """``Say something, number N``; the subclasses decide what is right."""

    name: ClassVar[str] = "toy"

    def generate(self, rng: random.Random) -> Problem:
        n = rng.randint(0, 10**6)
        return Problem(prompt=f"Say something, number {n}", answer="e", solution="eee\nAnswer: e")

    def is_correct(self, problem: Problem, value: str) -> bool:
        return value == problem.answer


class AlwaysRight(ToyTask):
    name: ClassVar[str] = "always-right"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(format=1.0, correctness=1.0)


class RightWithoutFormat(ToyTask):
    """Every answer right, none in the ``Answer: ...`` format: what is correct and what is well formed differ."""

    name: ClassVar[str] = "right-without-format"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(format=0.0, correctness=1.0)


class FormatOnly(ToyTask):
    """Every answer well formed, none right."""

    name: ClassVar[str] = "format-only"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(format=1.0, correctness=0.0)


class HalfRight(ToyTask):
    """Every answer half right, and well formed: partial credit, which a user's task may give."""

    name: ClassVar[str] = "half-right"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(format=1.0, correctness=0.5)


class SayE(ToyTask):
    name: ClassVar[str] = "say-e"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(format=0.0, correctness=completion.count("e") / max(len(completion), 1))


class RewardRaises(ToyTask):
    name: ClassVar[str] = "reward-raises"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        raise ZeroDivisionError("the checker broke")


class RewardNaN(ToyTask):
    name: ClassVar[str] = "reward-nan"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        return Reward(format=0.0, correctness=math.nan)


class RaisesOnRank1(ToyTask):
    """A checker that breaks on rank 1 of a ``torchrun`` job only: one rank's bad batch."""

    name: ClassVar[str] = "raises-on-rank-1"

    def reward(self, problem: Problem, completion: str, *, stopped: bool = True) -> Reward:
        if os.environ.get("RANK") == "1":
            raise ZeroDivisionError("the checker broke on rank 1")
        return Reward(format=0.0, correctness=completion.count("e") / max(len(completion), 1))


class LongOrShort(SayE):
    """Half the prompts 60 words longer than the others: a step whose long prompts may all be on one rank."""

    name: ClassVar[str] = "long-or-short"

    def generate(self, rng: random.Random) -> Problem:
        problem = super().generate(rng)
        return Problem(problem.prompt + " e" * 60 * rng.randint(0, 1), problem.answer, problem.solution)


for _task in (
    AlwaysRight,
    RightWithoutFormat,
    FormatOnly,
    HalfRight,
    SayE,
    RewardRaises,
    RewardNaN,
    RaisesOnRank1,
    LongOrShort,
):
    if _task.name not in task_names():
        register_task(_task.name, _task)


def tokenizer() -> ModelTokenizer:
    """A 300-token BPE of arithmetic worked answers and the toy prompts, with zmaj's chat template."""
    arithmetic = get_task("arithmetic", digits=1)
    texts = [p.prompt + "\n" + p.solution for p in arithmetic.problems("train", 40)]
    texts += [p.prompt + " eee e" for p in get_task("say-e").problems("train", 40)]
    return ModelTokenizer.from_zmaj(Tokenizer.train(texts * 5, vocab_size=VOCAB))


def tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random-init Llama with :func:`tokenizer`, saved as a zmaj model folder."""
    return save_zmaj(Pretrained(CONFIG, llama.init(CONFIG, seed), tokenizer()), folder)
