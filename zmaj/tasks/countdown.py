"""Countdown: reach a target from given numbers with + - * / and parentheses, each number used at most once.

A search problem with a cheap exact check, the toy that showed RL with verifiable rewards teaching a small model
to search (TinyZero, Pan et al. 2025; Gandhi et al. 2025, "Cognitive Behaviors that Enable Self-Improving
Reasoners", arXiv:2503.01307). Only solvable instances are generated: the target is the value of a random
expression over the numbers, which is also the reference solution. The checker reads the answer with ``ast``
(numbers, the four operators and parentheses, nothing else) and evaluates it exactly with ``Fraction``, so
``6 / 4 * 2`` is 3, and a division by zero is a wrong answer rather than a crash.
"""

import ast
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from pydantic import Field

from zmaj.tasks.base import Problem, Task

MAX_EXPRESSION_CHARS = 1000
"""Longer answers are wrong without parsing: no valid answer is that long, and a deep parse could exhaust the stack."""

_OPERATORS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


class CountdownTask(Task):
    """``count`` numbers from 1 to ``max_number`` and a positive whole target, not among them, built from all."""

    name: ClassVar[str] = "countdown"
    count: int = Field(default=3, ge=2, le=8)
    max_number: int = Field(default=10, ge=2, le=10**18)
    """At most 18 digits, as ``arithmetic``'s operands: Python will not write an int past 4,300 digits."""

    def generate(self, rng: random.Random) -> Problem:
        while True:  # a target that is one of the numbers would be solved by writing it down
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            expression, steps = _random_expression(numbers, rng)
            if expression.value not in numbers:
                break
        shown = ", ".join(map(str, sorted(numbers)))
        target = int(expression.value)
        return Problem(
            prompt=(
                f"Make {target} from the numbers {shown} using + - * / and parentheses, "
                "each number at most once."
            ),
            answer=expression.text,
            solution="\n".join([*steps, f"Answer: {expression.text}"]),
            info={"numbers": sorted(numbers), "target": target},
        )

    def is_correct(self, problem: Problem, value: str) -> bool:
        return check_expression(value, problem.info["numbers"], problem.info["target"])


def check_expression(text: str, numbers: Sequence[int], target: int) -> bool:
    """Whether ``text`` is an expression over ``numbers`` (each at most once) equal to ``target``, exactly."""
    if len(text) > MAX_EXPRESSION_CHARS:
        return False
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a null byte in the text (Python 3.11)
        return False
    used: list[int] = []
    if not _allowed(tree.body, used) or Counter(used) - Counter(numbers):
        return False
    try:
        return _evaluate(tree.body) == target
    except ZeroDivisionError:
        return False


def _allowed(node: ast.expr, used: list[int]) -> bool:
    """Only whole-number literals and + - * / between them; collects the literals into ``used``."""
    if isinstance(node, ast.Constant) and type(node.value) is int:  # not bool, float or str
        used.append(node.value)
        return True
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _allowed(node.left, used) and _allowed(node.right, used)
    return False


def _evaluate(node: ast.expr) -> Fraction:
    """The exact value of an expression ``_allowed`` accepted."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    assert isinstance(node, ast.BinOp)
    left, right = _evaluate(node.left), _evaluate(node.right)
    op = _OPERATORS[type(node.op)]
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    return left / right


@dataclass(frozen=True)
class _Node:
    """A sub-expression: its value, its text with as few parentheses as correct, and its operator's precedence."""

    value: int
    text: str
    precedence: int


def _random_expression(numbers: list[int], rng: random.Random) -> tuple[_Node, list[str]]:
    """A random expression using every number once whose every intermediate value is a positive integer.

    Returns it with its steps (``3 + 5 = 8``) in the order they are computed. Adjacent sub-expressions of a
    shuffled list are merged until one is left, which reaches every binary tree shape.
    """
    nodes = [_Node(n, str(n), _ATOM) for n in rng.sample(numbers, len(numbers))]
    steps = []
    while len(nodes) > 1:
        i = rng.randrange(len(nodes) - 1)
        left, right = nodes[i], nodes[i + 1]
        for op in rng.sample(["+", "-", "*", "/"], 4):  # + and * always succeed, so some op does
            value = _apply(op, left.value, right.value)
            if value is not None:
                break
        assert value is not None
        steps.append(f"{left.value} {op} {right.value} = {value}")
        nodes[i : i + 2] = [_Node(value, _join(left, op, right), _PRECEDENCE[op])]
    return nodes[0], steps


def _apply(op: str, a: int, b: int) -> int | None:
    """``a op b`` if it is a positive integer, else None (so targets and steps stay whole and positive)."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if a % b == 0 else None


def _join(left: _Node, op: str, right: _Node) -> str:
    """``left op right``, parenthesising a side only where precedence or (for - and /) order requires it."""
    precedence = _PRECEDENCE[op]
    left_text = f"({left.text})" if left.precedence < precedence else left.text
    right_needs = right.precedence < precedence or (right.precedence == precedence and op in "-/")
    right_text = f"({right.text})" if right_needs else right.text
    return f"{left_text} {op} {right_text}"
