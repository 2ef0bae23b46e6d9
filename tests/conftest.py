"""Test-wide settings: hypothesis profiles, deterministic torch, and the device the device-generic tests run on.

``pytest --device cuda`` runs every test that takes the ``device`` fixture on the GPU (the default is ``cpu``);
tests that are CPU-only by nature (files, tokenizers, programs, parity on GGUF weights) ignore the option. Those
that take it carry the ``device`` marker, so ``pytest --device cuda -m device`` runs only them.
"""

import hashlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the device-generic tests create their tensors (default: %(default)s)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "device: takes the `device` fixture, so --device moves it (set by conftest)"
    )
    if config.getoption("--device") != "cuda":
        return
    if not torch.cuda.is_available():
        pytest.exit(
            "--device cuda: torch sees no usable CUDA GPU on this machine (torch.cuda.is_available() is False)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    # The tests compare float32 results to float32 references at float32 tolerances (1e-5 and tighter). TF32,
    # which Ampere and Hopper matrix units may use for float32 products, keeps 10 mantissa bits, an error near
    # 1e-3: it would fail those comparisons by design, not by a bug. The CPU never uses it.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device of ``--device``; session-scoped so that hypothesis tests and module fixtures may take it."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(autouse=True, scope="session")
def trackers_write_under_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Experiment trackers (``train.trackers``) write into the session's temporary folder, never the user's
    caches, and wandb never goes online. trackio reads ``TRACKIO_DIR`` when it is first imported, which is
    after this (zmaj imports trackers only when a run starts them)."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRACKIO_DIR", str(root / "trackio"))
        for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(name, str(root / "wandb" / name.lower()))
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        yield


@pytest.fixture(autouse=True, scope="session")
def datasets_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``datasets`` caches under the session's temporary folder, never the user's: module-scoped fixtures too
    (lm-eval's harness loads its data files through ``datasets``), which are set up before any test's own."""
    root = tmp_path_factory.mktemp("datasets")
    with _datasets_cache(root / "session"):
        yield root


@pytest.fixture(autouse=True)
def datasets_cache_of_the_test(datasets_caches: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """``datasets`` caches what it reads from a local folder with a dataset card (``publish.py --out``) under the
    folder's name and card, not its files: a test that loaded its ``.../out`` folder through a shared cache read
    the rows another test (or an earlier session) wrote there, and could not fail. Each test gets its own (made
    only when used)."""
    with _datasets_cache(datasets_caches / hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]):
        yield


@contextmanager
def _datasets_cache(folder: Path) -> Iterator[None]:
    """``HF_DATASETS_CACHE`` for the programs a test runs and for ``datasets`` when it is first imported, which
    reads it then; ``datasets.config`` where it was imported already (importing it here cost every pytest start
    1.6 s)."""
    imported = "datasets" in sys.modules
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(folder))
        if imported:
            patch.setattr(sys.modules["datasets"].config, "HF_DATASETS_CACHE", folder)
        yield
    before = os.environ.get("HF_DATASETS_CACHE")
    if not imported and "datasets" in sys.modules and before is not None:
        # Imported meanwhile, it read this folder: the one of the enclosing session, as the environment's.
        sys.modules["datasets"].config.HF_DATASETS_CACHE = Path(before)
