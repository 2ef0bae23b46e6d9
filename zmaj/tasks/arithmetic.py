"""Multi-digit addition, subtraction and multiplication: the classic probe of whether a model learned to carry.

Difficulty is the number of digits of each operand. The worked answer of a multiplication spells out one partial
product per non-zero digit of the second operand (long multiplication in a line), which turns one hard step into
several easy ones; see Nye et al. 2021, "Show Your Work: Scratchpads for Intermediate Computation with Language
Models" (arXiv:2112.00114).
"""

import random
from typing import ClassVar, Literal

from pydantic import Field

from zmaj.tasks.base import Problem, Task, parse_int

Op = Literal["+", "-", "*"]


class ArithmeticTask(Task):
    """``What is a <op> b?`` for ``digits``-digit operands; subtraction never goes below zero."""

    name: ClassVar[str] = "arithmetic"
    digits: int = Field(default=2, ge=1, le=18)
    ops: tuple[Op, ...] = Field(default=("+", "-", "*"), min_length=1)

    def generate(self, rng: random.Random) -> Problem:
        low = 0 if self.digits == 1 else 10 ** (self.digits - 1)
        a, b = rng.randint(low, 10**self.digits - 1), rng.randint(low, 10**self.digits - 1)
        op = rng.choice(self.ops)
        if op == "-" and a < b:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(
            prompt=f"What is {a} {op} {b}?",
            answer=str(value),
            solution=f"{_working(a, op, b, value)}\nAnswer: {value}",
        )

    def is_correct(self, problem: Problem, value: str) -> bool:
        return parse_int(value) == int(problem.answer)


def _working(a: int, op: Op, b: int, value: int) -> str:
    """``a op b = value``, with the partial products of ``b``'s non-zero digits in between for a multiplication."""
    digits = str(b)
    parts = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]
    if op != "*" or len(parts) < 2:
        return f"{a} {op} {b} = {value}"
    split = " + ".join(f"{a} * {p}" for p in parts)
    products = " + ".join(str(a * p) for p in parts)
    return f"{a} * {b} = {split} = {products} = {value}"
