"""Tasks by name, so a spec can say ``task: countdown`` and a user can add their own next to the built-in ones."""

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

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


def checked_task(name: str, options: dict[str, Any]) -> Task:
    """``get_task`` for a spec's validator: a bad option's error is located under ``options`` (``options.digits``,
    where the spec holds it; pydantic puts a validator's errors under the section it checks)."""
    try:
        return get_task(name, **options)
    except ValidationError as error:
        located: list[Any] = []
        for e in error.errors():
            located.append({"type": e["type"], "loc": ("options", *e["loc"]), "input": e["input"]})
            if "ctx" in e:
                located[-1]["ctx"] = e["ctx"]
        raise ValidationError.from_exception_data(error.title, located) from None


def task_names() -> list[str]:
    """Every registered task name, sorted."""
    return sorted(_FACTORIES)
