"""The benchmarks' shared helpers (``benchmarks/common.py``) that decide what a run times: a ``--dtypes`` it
cannot time must stop it at the start with one line, not after minutes of setup with a traceback."""

import argparse
import importlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

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


def test_median_ms_is_the_median_in_milliseconds(common: ModuleType) -> None:
    """One slow outlier (a first call compiling, another process) moves a mean, not the median benchmarks print."""
    assert common.median_ms([0.001, 0.002, 0.100]) == pytest.approx(2.0)
    assert common.median_ms([0.001, 0.002, 0.003, 0.100]) == pytest.approx(2.5)


def test_timeit_warms_up_before_it_times(common: ModuleType) -> None:
    """``warmup`` untimed calls first, then ``repeats`` timed ones: a slow first call is not in the timings."""
    calls: list[int] = []

    def first_call_slow() -> None:
        if not calls:
            time.sleep(0.05)
        calls.append(1)

    times = common.timeit(first_call_slow, warmup=2, repeats=3)
    assert (len(times), len(calls)) == (3, 5)
    assert max(times) < 0.025


def test_the_matmul_peak_grows_past_stalls_and_stops_small_where_a_dtype_is_emulated(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy machine stalls each product by milliseconds: a rate probed once at 256 read 11 GFLOP/s where a
    2048 product ran at 52, and sized the measurement from it. Stand-in products: 100 GFLOP/s plus a 30 ms
    stall each (busy), 1 GFLOP/s (emulated), and a GPU that is measured at 8192 alone."""
    sizes: list[int] = []

    def busy(n: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
        sizes.append(n)
        seconds = 2 * n**3 / 100e9 + (0.03 if device.type == "cpu" else 0.0)
        return 2 * n**3 / seconds / 1e9, seconds

    monkeypatch.setattr(common, "square_matmul_gflops", busy)
    peak = common.matmul_peak_gflops.__wrapped__
    work = 2 * 2048**3 / 100e9  # 0.17 s: past 0.1 s, the last size
    assert peak(torch.float32, "cpu") == pytest.approx(100 * work / (work + 0.03))  # 85, not 256's 1.1
    assert sizes == [256, 512, 1024, 2048]
    sizes.clear()
    assert peak(torch.float32, "cuda") == pytest.approx(100.0)
    assert sizes == [8192]

    def emulated(n: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
        sizes.append(n)
        return 1.0, 2 * n**3 / 1e9

    monkeypatch.setattr(common, "square_matmul_gflops", emulated)
    sizes.clear()
    assert peak(torch.bfloat16, "cpu") == 1.0
    assert sizes == [256, 512]  # 0.27 s a product: past 0.1 s, so no 1024 (2.1 s) or 4096 (137 s)


@pytest.mark.parametrize(("bf16", "fast"), [(60.0, True), (50.0, True), (40.0, False), (1.0, False)])
def test_bf16_counts_as_fast_from_half_the_fp32_peak(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch, bf16: float, fast: bool
) -> None:
    """A CPU emulating bf16 (a tenth of the fp32 peak, or far less) would time the emulation: its bf16 rows are
    left out; from half the peak they are kept."""
    peaks = {torch.float32: 100.0, torch.bfloat16: bf16}
    monkeypatch.setattr(common, "matmul_peak_gflops", lambda dtype, device: peaks[dtype])
    assert common.bf16_is_fast("cpu") is fast


def test_a_column_of_blanks_alone_is_not_numeric(common: ModuleType) -> None:
    """Only a column with a number in it is right-aligned; one never measured ("-" throughout) reads as text."""
    table = common.markdown_table([{"a": "-", "b": 1.5}, {"a": "", "b": 2}], ["a", "b"])
    assert table.splitlines()[1] == "| --- | --: |"


def test_the_matmul_peak_is_the_best_size_up_to_4096(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docstring: the peak is the best rate of any size (a stall at the last size must not lower it), and
    the sizes stop at 4096 on the CPU by default however fast the products are."""
    sizes: list[int] = []

    def stalled_past_1024(n: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
        sizes.append(n)
        rate = 10_000.0 if n == 1024 else 5_000.0
        return rate, 2 * n**3 / (rate * 1e9)  # 4096: 0.03 s, under 0.1 s

    monkeypatch.setattr(common, "square_matmul_gflops", stalled_past_1024)
    assert common.matmul_peak_gflops.__wrapped__(torch.float32, "cpu") == 10_000.0
    assert sizes == [256, 512, 1024, 2048, 4096]


def test_timeit_reads_the_clock_around_each_call_and_its_synchronize(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reading starts before the call and ends after the device has finished it: read after the call, every
    time (ms/step, tokens/s, MFU) was about 0; read before the synchronize, a GPU timed its kernel launches."""
    events: list[str] = []

    def clock() -> float:
        events.append("clock")
        return 0.0

    monkeypatch.setattr(common, "synchronize", lambda device: events.append("sync"))
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=clock))
    common.timeit(lambda: events.append("call"), warmup=1, repeats=2)
    assert events == ["call", "sync"] + ["clock", "call", "sync", "clock"] * 2


def test_a_square_matmul_rate_is_two_n_cubed_over_the_fastest_time(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An n x n product is 2 n^3 FLOPs, and the ceiling is the fastest of its repeats: counted as n^3, or over
    the slowest, the peak halves and every MFU doubles."""
    monkeypatch.setattr(common, "timeit", lambda fn, **kwargs: [0.5, 1.0, 2.0, 1.0, 1.0])
    rate, seconds = common.square_matmul_gflops(100, torch.float32, torch.device("cpu"))
    assert (rate, seconds) == (pytest.approx(2 * 100**3 / 0.5 / 1e9), 0.5)


def test_bf16_is_fast_on_cuda_without_measuring(common: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CUDA GPU zmaj's users train on has bf16 tensor cores: no measurement decides it there."""

    def measured(*args: object) -> float:
        raise AssertionError("measured a peak")

    monkeypatch.setattr(common, "matmul_peak_gflops", measured)
    assert common.bf16_is_fast("cuda") is True


def test_a_markdown_table_aligns_numbers_right_and_escapes_pipes(common: ModuleType) -> None:
    """A cell holding "|" would start a new column of README's table."""
    table = common.markdown_table([{"name": "a|b", "x": 1.5}, {"name": "c", "x": 12}], ["name", "x"])
    assert table == "| name |   x |\n| ---- | --: |\n| a\\|b | 1.5 |\n| c    |  12 |"


def test_the_bf16_skip_note_names_each_peak(common: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason printed under a table that lost its bf16 rows: the two peaks in their places."""
    monkeypatch.setattr(common, "bf16_is_fast", lambda device: False)
    monkeypatch.setattr(
        common, "matmul_peak_gflops", lambda dtype, device: 100.0 if dtype == torch.float32 else 1.0
    )
    dtypes, [note] = common.usable_dtypes(["fp32", "bf16"], torch.device("cpu"), "the step")
    assert dtypes == ["fp32"]
    assert "its matmul peak here (1 GFLOP/s) is under half the fp32 peak (100)" in note


@pytest.mark.parametrize(("fast", "word"), [(True, "fast"), (False, "slow")])
def test_the_header_says_whether_bf16_is_fast(
    common: ModuleType, monkeypatch: pytest.MonkeyPatch, fast: bool, word: str
) -> None:
    monkeypatch.setattr(common, "bf16_is_fast", lambda device: fast)
    monkeypatch.setattr(common, "matmul_peak_gflops", lambda dtype, device: 10.0)
    assert f"(bf16 {word} here)" in common.header("cpu")


def test_the_cpu_features_are_this_cpus_flags(common: ModuleType) -> None:
    """The header's flags say why a row was skipped (no avx512_bf16, no amx): they must be the CPU's own."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this system")
    line = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    flags = set(line.split(":", 1)[1].split())
    assert common.cpu_features() == [feature for feature in common.CPU_FEATURES if feature in flags]
