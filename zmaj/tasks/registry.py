"""Tasks by name, so a spec can say ``task: countdown`` and a user can add their own next to the built-in ones."""

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from zmaj.specfile import BOOLEAN_AS_NUMBER, boolean_as_number
from zmaj.tasks.arithmetic import ArithmeticTask
from zmaj.tasks.base import Task
from zmaj.tasks.countdown import CountdownTask
from zmaj.tasks.word_problems import WordProblemsTask

_FACTORIES: dict[str, Callable[..., Task]] = {
    task.name: task for task in (ArithmeticTask, CountdownTask, WordProblemsTask)
}


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, **options)`` call ``factory(**options)``; a name is registered once."""
    if name in _FACTORIES:
        raise ValueError(f"a task named {name!r} is already registered")
    _FACTORIES[name] = factory


def get_task(name: str, **options: Any) -> Task:
    """The task registered as ``name``, built with ``options`` (its difficulty: e.g. ``digits=3``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return _FACTORIES[name](**options)


def checked_task(name: str, options: Mapping[str, Any]) -> Task:
    """``get_task`` for a spec's validator or a command line's options: a bad option's error is located under
    ``options`` (``options.digits``, where the spec holds it; pydantic puts a validator's errors under the section
    it checks), and a boolean where a number goes is refused (``digits: yes`` was one digit). A factory that
    ``register_task`` was given as a function takes its options as Python arguments: one it does not take is a
    ``TypeError``, which names the option, reported as the others are."""
    try:
        task = get_task(name, **options)
    except ValidationError as error:
        # Custom types, which a task's own validator may raise, pydantic knows only as custom errors.
        raise _located(
            error.title, [(e["type"], e["msg"], e["loc"], e["input"]) for e in error.errors()]
        ) from None
    except TypeError as error:
        message = f"task {name!r} does not take these options: {error}"
        raise _located(name, [("bad_options", message, (), dict(options))]) from None
    if (field := boolean_as_number(options, task)) is not None:
        raise _located(name, [("bool_as_number", BOOLEAN_AS_NUMBER, tuple(field.split(".")), True)])
    return task


def _located(title: str, errors: list[tuple[str, str, tuple[int | str, ...], Any]]) -> ValidationError:
    """Errors of a task's options, as pydantic's, located under ``options``."""
    return ValidationError.from_exception_data(
        title,
        [
            {"type": PydanticCustomError(kind, message), "loc": ("options", *loc), "input": value}
            for kind, message, loc, value in errors
        ],
    )


def task_names() -> list[str]:
    """Every registered task name, sorted."""
    return sorted(_FACTORIES)
