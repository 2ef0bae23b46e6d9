"""One- and two-step word problems from a few templates: arithmetic wrapped in a sentence, GSM8K in miniature.

The model must find the numbers and the operation in the text (Cobbe et al. 2021, "Training Verifiers to Solve
Math Word Problems", arXiv:2110.14168, is the grown-up version). Difficulty is the size of the numbers; every
answer is a whole number, and the worked answer is the one-line computation.
"""

import random
from typing import ClassVar

from pydantic import Field

from zmaj.tasks.base import Problem, Task, parse_int

NAMES = ("Ann", "Ben", "Carla", "Dev", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo")
ITEMS = ("apples", "pencils", "marbles", "cookies", "stickers", "books", "shells", "cards")


class WordProblemsTask(Task):
    """Buying, giving away, boxes and fair shares, with numbers up to ``max_number``."""

    name: ClassVar[str] = "word_problems"
    max_number: int = Field(default=20, ge=2, le=10**18)
    """At most 18 digits, as ``arithmetic``'s operands: Python will not write an int past 4,300 digits."""

    def generate(self, rng: random.Random) -> Problem:
        name, friend = rng.sample(NAMES, 2)
        item = rng.choice(ITEMS)
        a, b, c = (rng.randint(1, self.max_number) for _ in range(3))
        template = rng.randrange(5)
        if template == 0:
            question = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
            working, value = f"{a} + {b}", a + b
        elif template == 1:
            a, b = max(a, b), min(a, b)
            question = (
                f"{name} has {a} {item} and gives {b} to {friend}. How many {item} does {name} have left?"
            )
            working, value = f"{a} - {b}", a - b
        elif template == 2:
            question = (
                f"{name} buys {a} boxes of {item} with {b} {item} in each box. How many {item} is that?"
            )
            working, value = f"{a} * {b}", a * b
        elif template == 3:
            b = rng.randint(2, self.max_number)  # a share among one friend is no division
            question = f"{name} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
            working, value = f"{a * b} / {b}", a
        else:
            c = rng.randint(1, a + b)
            question = (
                f"{name} has {a} {item}, gets {b} more from {friend} and then gives away {c}. "
                f"How many {item} does {name} have now?"
            )
            working, value = f"{a} + {b} - {c}", a + b - c
        return Problem(prompt=question, answer=str(value), solution=f"{working} = {value}\nAnswer: {value}")

    def is_correct(self, problem: Problem, value: str) -> bool:
        return parse_int(value) == int(problem.answer)
