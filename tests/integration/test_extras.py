"""``pip install zmaj`` without extras, in a fresh virtual environment: every module imports (or, for a module
that is an extra's capability, fails in one line naming the extra), pre-training and generating from a zmaj run
work, and loading a GGUF file exits 2 with the line that says to install ``zmaj[gguf]``.

The environment is built offline from uv's cache, which ``uv sync`` filled: the wheel of this checkout
(``uv build``), the core dependencies at the lockfile's versions (``uv sync --no-dev --no-default-groups``
into another folder; uv hardlinks from its cache, a few seconds even for torch), then the wheel without
dependencies. The programs run from the repository's ``programs/`` with the new environment's Python, from
another folder, so ``zmaj`` is the installed wheel's.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.integration.test_pretrain_program import corpus
from zmaj.convert import weights

ROOT = Path(__file__).resolve().parents[2]

REMOTE_CODE = ROOT / "zmaj" / "convert" / "remote"
"""Code that exported model folders carry for ``transformers`` to run (``zmaj.convert.zmaj_gpt``): data the wheel
ships, not a zmaj module (it imports ``transformers``, which the core install lacks)."""
NEEDS_AN_EXTRA = {"zmaj.convert.gguf": "gguf", "zmaj.eval.harness": "eval"}
"""The modules that are an extra's capability, so importing them without it is the one-line error."""

IMPORT_ALL = """
import importlib, pkgutil, sys
import zmaj
from zmaj.extras import MissingExtraError
print(zmaj.__file__)
for module in pkgutil.walk_packages(zmaj.__path__, "zmaj."):
    try:
        importlib.import_module(module.name)
        print(module.name, "ok")
    except MissingExtraError as error:
        print(module.name, "missing:", error)
"""


def uv(*args: str | Path, env: dict[str, str] | None = None) -> None:
    command = ["uv", *map(str, args)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"


@pytest.fixture(scope="module")
def core_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a fresh environment holding zmaj's wheel and its core dependencies only."""
    if shutil.which("uv") is None:
        pytest.fail(
            "this test builds its environment with uv (https://docs.astral.sh/uv/), which is not on PATH"
        )
    root = tmp_path_factory.mktemp("core")
    uv("build", "--wheel", "--offline", "--out-dir", root / "dist")
    (wheel,) = (root / "dist").glob("zmaj-*.whl")
    venv = root / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv)}
    uv("sync", "--locked", "--offline", "--no-dev", "--no-default-groups", "--no-install-project", env=env)
    uv("pip", "install", "--offline", "--no-deps", "--python", venv / "bin" / "python", wheel)
    return venv / "bin" / "python"


def run(python: Path, cwd: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(python), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_the_core_install_imports_everything_and_names_the_extra_a_capability_needs(
    core_python: Path, tmp_path: Path
) -> None:
    result = run(core_python, tmp_path, "-c", IMPORT_ALL)
    assert result.returncode == 0, result.stderr
    where, *lines = result.stdout.splitlines()
    assert Path(where).is_relative_to(core_python.parent.parent)  # the wheel, not this checkout
    outcomes = dict(line.split(" ", 1) for line in lines)
    expected_modules = {
        "zmaj." + ".".join(path.relative_to(ROOT / "zmaj").with_suffix("").parts)
        for path in (ROOT / "zmaj").rglob("*.py")
        if path.name != "__init__.py" and not path.is_relative_to(REMOTE_CODE)
    }
    assert expected_modules <= set(outcomes)
    shipped = Path(where).parent / REMOTE_CODE.relative_to(ROOT / "zmaj")
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in REMOTE_CODE.glob("*.py"))
    for module, outcome in outcomes.items():
        if module in NEEDS_AN_EXTRA:
            extra = NEEDS_AN_EXTRA[module]
            assert outcome.startswith("missing: "), module
            assert f"needs the '{extra}' extra: pip install 'zmaj[{extra}]'" in outcome, module
        else:
            assert outcome == "ok", f"{module}: {outcome}"


@pytest.mark.slow
def test_the_core_install_refuses_a_gguf_file_in_one_line_naming_the_extra(
    core_python: Path, tmp_path: Path
) -> None:
    result = run(
        core_python, tmp_path, ROOT / "programs" / "generate.py",
        "--model", weights.smollm2_gguf(), "--prompt", "Hi",
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "--model: loading a GGUF file needs the 'gguf' extra: pip install 'zmaj[gguf]' (gguf is not installed)"
        )
    )


@pytest.mark.slow
def test_the_core_install_pretrains_and_generates_from_its_run(core_python: Path, tmp_path: Path) -> None:
    spec = {
        "name": "core",
        "model": {"vocab_size": 300, "context": 32, "d_model": 32, "n_layers": 1, "n_heads": 2},
        "data": {
            "source": {"kind": "files", "paths": [str(corpus(tmp_path / "corpus.jsonl"))], "format": "jsonl"},
            "validation_fraction": 0.2,
            "seq_len": 32,
            "vocab_size": 300,
        },
        "train": {"steps": 2, "batch_size": 4, "eval_batches": 1},
        "sample": {"prompts": ["def "], "max_new_tokens": 2},
    }
    (tmp_path / "core.yaml").write_text(yaml.safe_dump(spec))
    pretrain = ROOT / "programs" / "pretrain.py"
    result = run(core_python, tmp_path, pretrain, "core.yaml", "--run-dir", "run", "--cache-dir", "cache")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    generate = ROOT / "programs" / "generate.py"
    result = run(
        core_python, tmp_path, generate, "--model", "run", "--prompt", "def ", "--max-new-tokens", "3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")  # the continuation (of an untrained model: anything)
