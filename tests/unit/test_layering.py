"""Layering: zmaj's packages import each other one way (README, Layout), read from the source with ``ast``.

``programs -> train / infer / convert -> models -> nn``, with the top-level modules (``zmaj/*.py``: the
checkpoint format, spec files, file writing...) below every package: what two packages share lives below both,
so no two import each other. An import inside a function counts as one at the top of the module: it is the
same dependency, met later.
"""

import ast
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import pytest

ZMAJ = Path(__file__).resolve().parents[2] / "zmaj"
TOP_LEVEL = frozenset(path.stem for path in ZMAJ.glob("*.py") if path.stem != "__init__")
LEAVES = ("data", "convert", "infer", "tasks")
"""Packages below training, publishing and evaluation: what those build on."""


def imported(path: Path) -> set[str]:
    """The zmaj names ``path`` imports anywhere in it, as absolute dotted names (``zmaj.train.step.bind``)."""
    module = list(path.relative_to(ZMAJ.parent).with_suffix("").parts)
    package = module[:-1]  # an __init__'s own package too: ``zmaj/train/__init__`` is in ``zmaj.train``
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = [*package[: len(package) - node.level + 1], node.module] if node.level else [node.module]
            prefix = ".".join(part for part in base if part)
            names |= {f"{prefix}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("zmaj.")}


def unit(name: str) -> str:
    """The layer of a zmaj name: its package (``train``) or, for a top-level module, that module."""
    return name.split(".")[1]


def graph() -> dict[str, dict[str, list[str]]]:
    """Each layer's imports of other layers, with where each happens (``zmaj/x/y.py imports zmaj.z``)."""
    edges: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(ZMAJ.rglob("*.py")):
        source = path.relative_to(ZMAJ.parent)
        if source.parent == Path("zmaj") and path.stem == "__init__":
            continue
        here = unit(".".join(source.with_suffix("").parts))
        for name in sorted(imported(path)):
            if unit(name) != here:
                edges[here][unit(name)].append(f"{source} imports {name}")
    return {layer: dict(targets) for layer, targets in edges.items()}  # plain: a lookup adds no edge


GRAPH = graph()
LAYERS = frozenset(GRAPH).union(*GRAPH.values())


def offending(layer: str, allowed: frozenset[str]) -> list[str]:
    """Where ``layer`` imports a layer outside ``allowed``."""
    return [
        where for target, wheres in GRAPH.get(layer, {}).items() if target not in allowed for where in wheres
    ]


def test_the_scan_sees_imports_at_the_top_and_inside_functions() -> None:
    """Else every check below would pass on nothing."""
    assert "nn" in GRAPH["models"]
    assert {"models", "checkpoint", "specfile"} <= set(GRAPH["train"])
    assert "zmaj.convert.gguf" in imported(ZMAJ / "convert" / "load.py")  # inside load_model


def test_the_top_level_modules_are_below_every_package() -> None:
    for module in TOP_LEVEL:
        assert offending(module, TOP_LEVEL) == [], f"zmaj/{module}.py may import only other zmaj/*.py modules"


def test_nn_imports_no_other_package() -> None:
    assert offending("nn", TOP_LEVEL) == []


def test_models_import_only_nn() -> None:
    assert offending("models", TOP_LEVEL | {"nn"}) == []


@pytest.mark.parametrize("package", LEAVES)
def test_a_package_below_training_imports_no_training_publishing_or_evaluation(package: str) -> None:
    assert offending(package, LAYERS - {"train", "publish", "eval"}) == []


def test_no_layers_import_each_other_in_a_circle() -> None:
    """Depth-first search over the layer graph; a layer met again while still on the path closes a circle."""
    done: set[str] = set()

    def visit(layer: str, path: list[str]) -> None:
        if layer in path:
            circle = [*path[path.index(layer) :], layer]
            links = [GRAPH[a][b][0] for a, b in pairwise(circle)]
            pytest.fail(f"{' -> '.join(circle)}: {'; '.join(links)}")
        if layer in done:
            return
        for target in GRAPH.get(layer, {}):
            visit(target, [*path, layer])
        done.add(layer)

    for layer in GRAPH:
        visit(layer, [])
