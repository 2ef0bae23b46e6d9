"""What every config and spec model of zmaj shares: a float field refuses inf and NaN at validation.

A number that is not finite passes ``gt=0``-style bounds (``inf > 0``) and then does its damage quietly: a RoPE
scaling factor of inf turns every frequency to 0, so the model ignores positions. JSON, YAML and ``--set``
all spell such numbers (``Infinity``, ``.inf``, ``nan``), so the refusal belongs to the models themselves.
"""

import importlib
import pkgutil
import types
import typing

import pydantic
import pytest

import zmaj


def zmaj_models() -> list[type[pydantic.BaseModel]]:
    """Every pydantic model class defined in a module of the ``zmaj`` package."""
    for module in pkgutil.walk_packages(zmaj.__path__, "zmaj."):
        importlib.import_module(module.name)
    found = []
    pending = list(pydantic.BaseModel.__subclasses__())
    while pending:
        model = pending.pop()
        pending += model.__subclasses__()
        if model.__module__.startswith("zmaj."):
            found.append(model)
    return sorted(set(found), key=lambda model: f"{model.__module__}.{model.__qualname__}")


def holds_a_float(annotation: object) -> bool:
    if annotation is float:
        return True
    return any(
        holds_a_float(arg) for arg in typing.get_args(annotation) if not isinstance(arg, types.NoneType)
    )


MODELS = [
    model for model in zmaj_models() if any(holds_a_float(f.annotation) for f in model.model_fields.values())
]


def test_the_models_with_float_fields_are_found() -> None:
    names = {model.__name__ for model in MODELS}
    assert {"LinearScaling", "Llama3Scaling", "GPTConfig", "AdamWConfig", "Sampling"} <= names


@pytest.mark.parametrize("model", MODELS, ids=lambda model: f"{model.__module__}.{model.__qualname__}")
def test_float_fields_refuse_inf_and_nan(model: type[pydantic.BaseModel]) -> None:
    assert model.model_config.get("allow_inf_nan") is False
