"""Helpers shared by the hand-run benchmarks: timing, the machine's matmul peak, markdown tables, a header.

Timings only mean something next to the machine that produced them, so every benchmark prints a header with the
torch version, the device, the CPU and its thread count, and the fp32/bf16 matmul peaks measured in the same
process. The bf16 peak matters on CPUs: without native bf16 instructions (AVX512-BF16, AMX) a bf16 matmul can be
~100x slower than fp32, and a bf16 row would then measure the emulation, not the algorithm.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path

import torch

from zmaj.train.report import cpu_model

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
"""CPU flags that decide how fast fp32 and bf16 matmuls can be."""


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""The dtypes a benchmark's ``--dtypes`` may name."""

BLANKS = ("", "-")
"""Cells that do not stop a column from counting as numeric."""


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so that a wall-clock reading covers the work (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(
    fn: Callable[[], object], warmup: int = 2, repeats: int = 5, device: torch.device | str = "cpu"
) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def cpu_features() -> list[str]:
    """Which of ``CPU_FEATURES`` this CPU reports (empty where /proc/cpuinfo is missing)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in CPU_FEATURES if f in flags]
    return []


@cache
def matmul_peak_gflops(dtype: torch.dtype, device: torch.device | str, n: int | None = None) -> float:
    """Best GFLOP/s of square matmuls, measured here and now (cached per process).

    On a GPU, one size: ``n``, default 8192, whose matrix units a smaller product leaves short of their peak. On
    the CPU the size doubles from 256 while one product takes under 0.1 s, up to ``n`` (default 4096), and the
    peak is the best rate of any size: an emulated dtype (slow) stops at a matrix that takes a fraction of a
    second rather than minutes, and a stall from other work on the machine (milliseconds) cannot stop a fast
    dtype at a small size, as a rate probed once at 256 could (under load it read 11 GFLOP/s where a 2048 product
    ran at 52).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return square_matmul_gflops(n or 8192, dtype, device)[0]
    size, rates = 256, []
    while True:
        rate, seconds = square_matmul_gflops(size, dtype, device)
        rates.append(rate)
        if size >= (n or 4096) or seconds > 0.1:
            return max(rates)
        size *= 2


def square_matmul_gflops(n: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """GFLOP/s of the fastest of 5 ``n x n`` products (after one untimed), and its seconds."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = min(timeit(lambda: a @ b, warmup=1, repeats=5, device=device))
    return 2 * n**3 / seconds / 1e9, seconds


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 is worth benchmarking here: always on CUDA; on CPU if its matmuls reach half the fp32 peak."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return matmul_peak_gflops(torch.bfloat16, device) >= 0.5 * matmul_peak_gflops(torch.float32, device)


def device_name(device: torch.device | str) -> str:
    """The accelerator's name, or the CPU's."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def header(device: torch.device | str) -> str:
    """Markdown lines describing the machine: torch, device, CPU, threads and the measured matmul peaks."""
    device = torch.device(device)
    fp32 = matmul_peak_gflops(torch.float32, device)
    bf16 = matmul_peak_gflops(torch.bfloat16, device)
    features = ", ".join(cpu_features()) or "unknown"
    lines = [
        f"- torch {torch.__version__}, device `{device}` ({device_name(device)})",
        f"- CPU: {cpu_model()} (flags: {features}); torch threads: {torch.get_num_threads()}",
        f"- measured matmul peak: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s "
        f"(bf16 {'fast' if bf16_is_fast(device) else 'slow'} here)",
    ]
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        lines.append(
            f"- load average at start (1, 5, 15 min): {load}; other work on the machine skews timings"
        )
    return "\n".join(lines)


def print_header(device: torch.device | str) -> str:
    """Print ``header(device)`` and return it, so the caller can also write it next to its results."""
    text = header(device)
    print(text)
    return text


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` (missing cells are blank); numeric columns are right-aligned.

    A column counts as numeric when every cell is a number, blank, or "-" (a value that was not measured).
    """
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([3, len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [
        all(_is_number(r[i]) for r in cells if r[i] not in BLANKS) and any(r[i] not in BLANKS for r in cells)
        for i in range(len(columns))
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if num else "-" * w for w, num in zip(widths, numeric, strict=True)]
    return "\n".join([line(columns), line(rule), *(line(r) for r in cells)])


def median_ms(seconds: Sequence[float]) -> float:
    """The median of timings in seconds, in milliseconds."""
    return 1000 * statistics.median(seconds)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def dtype_names(text: str) -> list[str]:
    """``--dtypes``' type: comma-separated names of ``DTYPES``, refused by argparse (one line) if unknown."""
    names = [d.strip() for d in text.split(",")]
    if unknown := [d for d in names if d not in DTYPES]:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    return names


def usable_dtypes(requested: Sequence[str], device: torch.device, what: str) -> tuple[list[str], list[str]]:
    """The dtypes worth timing here, and a note for each one dropped (bf16 where it is emulated).

    Exits with the note when none is left, before the benchmark builds anything it could not time."""
    dtypes = list(requested)
    notes = []
    if "bf16" in dtypes and not bf16_is_fast(device):
        dtypes.remove("bf16")
        fp32, bf16 = (matmul_peak_gflops(t, device) for t in (torch.float32, torch.bfloat16))
        notes.append(
            f"bf16 skipped: its matmul peak here ({bf16:.0f} GFLOP/s) is under half the fp32 peak ({fp32:.0f}), so "
            f"bf16 rows would time the emulation of bf16, not {what}."
        )
    if not dtypes:
        raise SystemExit(f"--dtypes {','.join(requested)}: nothing left to time; {' '.join(notes)}")
    return dtypes, notes
