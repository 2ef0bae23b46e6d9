"""The benchmarks' shared helpers (``benchmarks/common.py``) that decide what a run times: a ``--dtypes`` it
cannot time must stop it at the start with one line, not after minutes of setup with a traceback."""

import argparse
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def common() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import it as a top-level module
    try:
        yield importlib.import_module("common")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_dtypes_are_names_of_known_dtypes(common: ModuleType) -> None:
    assert common.dtype_names("fp32, bf16") == ["fp32", "bf16"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dtype 'fp16'; choose from fp32, bf16"):
        common.dtype_names("fp32,fp16")


def test_a_run_left_without_dtypes_stops_with_the_reason(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "bf16_is_fast", lambda device: False)
    monkeypatch.setattr(
        common, "matmul_peak_gflops", lambda dtype, device: 100.0 if dtype == torch.float32 else 1.0
    )
    dtypes, notes = common.usable_dtypes(["fp32", "bf16"], torch.device("cpu"), "decoding")
    assert dtypes == ["fp32"]
    assert notes[0].startswith("bf16 skipped")
    with pytest.raises(SystemExit, match="--dtypes bf16: nothing left to time; bf16 skipped"):
        common.usable_dtypes(["bf16"], torch.device("cpu"), "decoding")
