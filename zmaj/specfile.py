"""Spec files: a YAML file read into a pydantic model, with ``--set`` overrides, errors naming the field.

``load(model, path, overrides)`` reads the YAML, applies ``--set a.b.c=value`` overrides (values parsed as
YAML, so ``--set train.steps=10`` is an int) and validates the whole spec against ``model``; any problem
raises ``SpecError`` with a message that names the offending field by its dotted path. What a spec holds is
the caller's model (the training specs are ``zmaj.train.spec``'s). This module sits below every package, so
that loading a model (``zmaj.convert``) and publishing (``zmaj.publish``) read a run's ``spec.yaml`` without
importing ``zmaj.train``.
"""

import argparse
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml
from pydantic import AfterValidator, BaseModel, Field

from zmaj.text import read_text

T = TypeVar("T", bound=BaseModel)


Seed = Annotated[int, Field(ge=0, lt=2**32, description="0 to 2**32 - 1")]
"""A spec's seed: in the range of every generator seeded from it (numpy's, the narrowest), so that a bad one is
refused naming its field rather than by numpy, naming none."""


def _one_folder_name(name: str) -> str:
    if not name or "/" in name or "\0" in name:
        raise ValueError(
            f"{name!r} names the run folder (runs/NAME-<time>): give one folder name, not empty, no /"
        )
    return name


RunName = Annotated[str, AfterValidator(_one_folder_name)]
"""A spec's name, which names its run folder: ``a/b`` failed only after the data was prepared, when the folder
could not be made, and an empty one made ``runs/-<time>``."""


def seed_argument(text: str) -> int:
    """An argparse type: a seed ``torch.Generator`` takes, 0 to 2**64 - 1. Not negative: Python's
    ``random.Random(-3)`` is ``random.Random(3)``, so a task's problems of seed -3 would be seed 3's. Here, at
    the bottom of the package, so that the inference programs take it without importing the training code."""
    if not text.strip().isdigit() or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2**64 - 1, got {text!r}")
    return int(text)


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field."""


Tag = Callable[[list[str], dict[str, Any]], object]
"""The tag a tagged union's discriminator reads from a section, given the section's dotted path so far."""


def kind_tag(path: list[str], section: dict[str, Any]) -> object:
    """A section's ``kind``: the tag of every union whose discriminator is that field."""
    return section.get("kind")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.dropout=0.1"]`` applied to a nested dict (a new one; the input is untouched)."""
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw))
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise SpecError(f"--set expects key=value, got {item!r}")
        *parents, leaf = path.split(".")
        node = result
        for part in parents:
            # Absent, or null (``lora: null``): --set lora.rank=16 makes the section.
            if node.get(part) is None:
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise SpecError(f"--set {path}: {part!r} is not a section")
            node = child
        node[leaf] = read_yaml(value, f"--set {item}")
    return result


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last, so a second
    ``optimizer:`` under ``train:`` would silently drop the first section and the experiment it described."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor, which the base class flattens
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # the base class names that
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error or a repeated key is a :class:`SpecError` naming ``where`` and the
    position."""
    try:
        return yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as error:
        raise SpecError(f"{where}: not valid YAML ({' '.join(str(error).split())})") from None


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` arguments (``--set-task digits=3``) as a mapping, each value read as YAML."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{flag} expects key=value, got {item!r}")
        options[key] = read_yaml(value, f"{flag} {item}")
    return options


def parse(model: type[T], raw: object, where: str, tag: Tag = kind_tag) -> T:
    """Validate ``raw`` as ``model``; errors name each bad field by its dotted path (:func:`dotted`)."""
    try:
        parsed = model.model_validate(raw)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{dotted(e['loc'], raw, tag)}: {e['msg']}" for e in error.errors())
        raise SpecError(f"{where}: {problems}") from None
    if (field := boolean_as_number(raw, parsed)) is not None:
        raise SpecError(f"{where}: {field}: {BOOLEAN_AS_NUMBER}")
    return parsed


BOOLEAN_AS_NUMBER = "a boolean where a number goes (YAML reads true, yes and on as true)"
_MISSING = object()


def boolean_as_number(raw: object, parsed: object, path: str = "") -> str | None:
    """The dotted path of the first boolean in ``raw`` (a section, or a list) that validation into ``parsed`` made
    something else: pydantic's lax mode reads ``true`` as 1, so ``n_layers: yes`` was a one-layer model. (Strict
    mode is no cure: it would also refuse ``3e-4``, which YAML reads as a string.) A section the model ignores
    (``extra="ignore"``) is not validated, so there is nothing to compare."""
    if isinstance(raw, dict):
        pairs = [
            (
                key,
                value,
                parsed.get(key, _MISSING) if isinstance(parsed, dict) else getattr(parsed, key, _MISSING),
            )
            for key, value in raw.items()
            if isinstance(key, str)
        ]
    elif isinstance(raw, list | tuple) and isinstance(parsed, list | tuple) and len(raw) == len(parsed):
        pairs = [
            (str(index), value, inside) for index, (value, inside) in enumerate(zip(raw, parsed, strict=True))
        ]
    else:
        return None
    for key, value, inside in pairs:
        name = f"{path}.{key}" if path else key
        if inside is _MISSING:
            continue
        if isinstance(value, bool) and not isinstance(inside, bool):
            return name
        if (found := boolean_as_number(value, inside, name)) is not None:
            return found
    return None


def dotted(loc: tuple[int | str, ...], raw: object, tag: Tag = kind_tag) -> str:
    """An error's location as the dotted path of the spec field: a tagged union (``train.optimizer``) puts its
    tag (``adamw``) into the location, which is no key of the spec, so a name the spec does not hold on the
    way to the field is left out (the last may be missing: a required field). ``tag`` says which tag each
    section on the way has, so that it is left out even where the section also holds a key of that name."""
    parts: list[str] = []
    node = raw
    tagged: object = None  # the section whose tag was left out: the same name next is its field (DPO's task)
    for index, part in enumerate(loc):
        if isinstance(node, dict) and index < len(loc) - 1:
            if part not in node:
                continue
            if part == tag(parts, node) and node is not tagged:
                tagged = node
                continue
        if parts and not isinstance(node, dict | list):
            break  # a value (or null) where a section goes: what follows is no key of the spec (a union's tag)
        parts.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(parts) or "(top level)"


def load(model: type[T], path: Path, overrides: list[str] | None = None, tag: Tag = kind_tag) -> T:
    """Read, override and validate a YAML spec; errors name each bad field as :func:`parse`'s do."""
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    raw = read_yaml(read_text(path), str(path))
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return parse(model, apply_overrides(raw, overrides or []), str(path), tag)
