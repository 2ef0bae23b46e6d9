import ast
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmaj.tasks import CountdownTask, check_expression
from zmaj.tasks.countdown import _ATOM, _join, _Node

seeds = st.integers(0, 2**32 - 1)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, count=st.integers(2, 6), max_number=st.integers(5, 100))
def test_reference_solutions_are_accepted_and_use_the_given_numbers(
    seed: int, count: int, max_number: int
) -> None:
    task = CountdownTask(count=count, max_number=max_number)
    for problem in task.problems("train", 5, seed):
        numbers, target = problem.info["numbers"], problem.info["target"]
        assert check_expression(problem.answer, numbers, target)
        assert task.reward(problem, problem.solution).correctness == 1.0
        assert len(numbers) == count
        assert all(1 <= n <= max_number for n in numbers)
        assert isinstance(target, int)
        assert 0 < target not in numbers
        assert f"Make {target} from the numbers {', '.join(map(str, numbers))} " in problem.prompt
        # The reference uses every number, and each step is one true operation on positive integers.
        assert sorted(_literals(problem.answer)) == numbers
        *steps, _ = problem.solution.splitlines()
        assert len(steps) == count - 1
        for step in steps:
            left, result = step.split(" = ")
            assert Fraction(eval(left)) == int(result) > 0  # trusted: text we generated
        assert steps[-1].endswith(f"= {target}")


def _literals(text: str) -> list[int]:
    return [
        n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and isinstance(n.value, int)
    ]


@st.composite
def expressions(draw: st.DrawFn) -> str:
    """Random expressions over small whole numbers with all four operators and random parentheses."""
    depth = draw(st.integers(0, 3))

    def build(depth: int) -> str:
        if depth == 0 or draw(st.booleans()):
            return str(draw(st.integers(0, 12)))
        text = f"{build(depth - 1)} {draw(st.sampled_from('+-*/'))} {build(depth - 1)}"
        return f"({text})" if draw(st.booleans()) else text

    return build(depth)


def _naive_value(text: str) -> Fraction | None:
    """The exact value by Python's own evaluator over Fractions, None on division by zero (test-only eval)."""
    wrapped = ast.unparse(_FractionLiterals().visit(ast.parse(text, mode="eval")))
    try:
        return eval(wrapped, {"Fraction": Fraction})
    except ZeroDivisionError:
        return None


class _FractionLiterals(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.expr:
        return ast.Call(ast.Name("Fraction", ast.Load()), [node], [])


@given(expressions(), st.integers(-50, 200))
def test_checker_agrees_with_exact_evaluation(text: str, target: int) -> None:
    """Given every number it uses, an expression is right exactly when its exact value is the target."""
    numbers = _literals(text)
    value = _naive_value(text)
    assert check_expression(text, numbers, target) == (value == target)
    if value is not None and value.denominator == 1:
        assert check_expression(text, [*numbers, 99], int(value))  # unused numbers are fine
        if numbers:
            assert not check_expression(text, numbers[1:], int(value))  # one number short


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("2 + 2 + 6", "reuses 2"),
        ("(3 + 7) * 1", "1 is not given"),
        ("3 * 4 - 2", "a wrong value (10)"),
        ("x + 10", "a name"),
        ("abs(10) * 2", "a call"),
        ("2 ** 3 + 12", "power"),
        ("-2 + 22", "unary minus"),
        ("10.0 * 2", "a float"),
        ("10 // 2 * 4", "floor division"),
        ("True + 19", "a bool"),
        ("10 * 2 if 3 else 3", "a conditional"),
        ("[10 * 2][0]", "a subscript"),
        ("10 * 2 == 20", "a comparison"),
        ("10 * 2;", "a statement"),
        ("10 * (2", "syntax error"),
        ("10 * 2\x00", "a null byte"),
        ("", "empty"),
        ("10 / (3 - 3) + 2", "division by zero"),
        ("(" * 300 + "10" + ")" * 300 + " * 2", "too deep"),
        ("+".join(["2"] * 1000), "too long"),
    ],
)
def test_checker_rejects(text: str, why: str) -> None:
    assert not check_expression(text, [2, 3, 3, 7, 10], 20), why


@pytest.mark.parametrize(
    ("text", "numbers", "target"),
    [
        ("True + 19", [1, 19], 20),
        ("2 ** 3", [2, 3], 8),
        ("10 // 2 * 4", [2, 4, 10], 20),
        ("-2 + 22", [2, 22], 20),
    ],
)
def test_checker_rejects_for_the_form_alone_when_every_number_is_given(
    text: str, numbers: list[int], target: int
) -> None:
    """The cases above are wrong twice (2 ** 3 + 12 uses a 12 not given), so they passed without the operator
    and literal checks; ``2 ** 3`` without them was a KeyError, which stops a GRPO run."""
    assert not check_expression(text, numbers, target)


def test_the_reference_answer_has_only_the_parentheses_it_needs() -> None:
    sum_ = _Node(8, "3 + 5", 1)
    assert _join(sum_, "+", _Node(2, "2", _ATOM)) == "3 + 5 + 2"
    assert _join(sum_, "-", _Node(2, "2", _ATOM)) == "3 + 5 - 2"
    assert _join(_Node(6, "2 * 3", 2), "/", _Node(2, "2", _ATOM)) == "2 * 3 / 2"
    assert _join(_Node(2, "2", _ATOM), "-", sum_) == "2 - (3 + 5)"
    assert _join(_Node(2, "2", _ATOM), "+", sum_) == "2 + 3 + 5"
    product = _Node(6, "2 * 3", 2)
    assert _join(_Node(2, "2", _ATOM), "/", product) == "2 / (2 * 3)"
    assert _join(_Node(2, "2", _ATOM), "*", product) == "2 * 2 * 3"


def test_the_random_expressions_take_right_leaning_shapes_too() -> None:
    """Merging any two of the numbers, not the first two, reaches every tree: a * (b + c) as well as (a + b) * c."""
    answers = [p.answer for p in CountdownTask(count=3).problems("train", 200, 0)]
    assert any(re.search(r"[-+*/] \(", answer) for answer in answers)


def test_checker_accepts_exact_division_and_any_order() -> None:
    assert check_expression("10 * 2", [2, 3, 3, 7, 10], 20)
    assert check_expression(" (7 - 3) / 2 * 10 ", [2, 3, 3, 7, 10], 20)
    assert check_expression("10 / 3 * 3 * 2", [2, 3, 3, 7, 10], 20)  # exact: 10/3 is not rounded
    assert not check_expression("10 / 3 * 3 * 2", [2, 3, 7, 10], 20)  # but needs two 3s
