"""What a run leaves behind for people: a metrics JSONL, a curves PNG, FLOP counts for MFU, and a record of
when and on what hardware it ran (``run.jsonl``), which a model card reports."""

import io
import json
import os
import platform
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch

from zmaj.fileio import atomic_write_bytes, atomic_write_text
from zmaj.models.gpt import GPTConfig
from zmaj.text import NotJSONError, read_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Needs = Mapping[str, type | tuple[type, ...]]
"""The keys every record of a file holds, with their types."""

METRIC: Needs = {"step": int}
"""A metrics line, a step's or an evaluation's, says which step it describes."""

SESSION: Needs = {"event": str, "time": (int, float), "hardware": str}
"""A ``run.jsonl`` line (:func:`record_session`), as far as a model card reads it."""


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path, needs: Needs) -> list[dict[str, Any]]:
    """The records of a jsonl file a run appends to (``metrics.jsonl``, ``run.jsonl``), none when it is
    missing; a line that is not one (:func:`_records`) is damage, named ``file:line``."""
    if not path.is_file():
        return []
    return [record for _, record in _records(path, _whole_lines(read_text(path)), needs)]


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite the metrics file ``path`` (atomically) without its records past ``step``, and say how many went.

    A run killed after its last checkpoint recorded steps that the resumed run takes again from that checkpoint:
    kept, they would be counted twice (a model card's tokens seen) and drawn as a curve that runs backwards.
    """
    if not path.is_file():
        return 0
    text = read_text(path)
    lines = _whole_lines(text)
    records = _records(path, lines, METRIC)
    kept = [line for line, record in records if record["step"] <= step]
    if len(kept) < len(lines) or not text.endswith("\n"):
        _rewrite(path, kept)
    return len(records) - len(kept)


def drop_cut_short_line(path: Path) -> None:
    """Rewrite ``path`` (atomically) without a last line a kill cut short, as :func:`drop_records_after` does
    for the metrics: appended to, it would run into the next record, a line that no reader parses."""
    if path.is_file() and not (text := read_text(path)).endswith("\n") and text:
        _rewrite(path, _whole_lines(text))


def has_evaluation(path: Path, step: int, final: bool) -> bool:
    """Whether the metrics file ``path`` holds an evaluation at ``step`` (a line without a step's ``lr``), the
    final one or a periodic one; the final line of a run without evaluations counts as its final one."""
    return any(
        record["step"] == step and "lr" not in record and bool(record.get("final")) == final
        for record in read_records(path, METRIC)
    )


def finished(path: Path) -> bool:
    """Whether the metrics file ``path`` holds a final line (the final evaluation's, or the end's alone for a
    run without evaluations): the run it records ran to its end once (it may have been continued since)."""
    return any(record.get("final") for record in read_records(path, METRIC))


def _whole_lines(text: str) -> list[str]:
    """The lines of a file a run appends to: past its last newline is nothing, or a line a kill cut short."""
    return text.split("\n")[:-1]


def _records(path: Path, lines: list[str], needs: Needs) -> list[tuple[str, dict[str, Any]]]:
    """Each non-blank line of ``lines`` (of ``path``) with its record: a JSON object holding ``needs``."""
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise NotJSONError(f"{path}:{number}: not JSON ({error.msg}, column {error.colno})") from error
        if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in needs.items()):
            wanted = " and ".join(needs)
            raise ValueError(f"{path}:{number}: damaged, not a record (a JSON object with {wanted})")
        records.append((line, record))
    return records


def _rewrite(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


RUN_FILE = "run.jsonl"
"""One line per start and end of a program on a run folder: a resumed run adds a start/end pair per session."""


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def record_session(run_dir: Path, event: str, device: torch.device, precision: str, ranks: int = 1) -> None:
    """Append a ``start`` or ``end`` record to the run's ``run.jsonl``: wall-clock time, device, host, versions.
    A line a kill cut short goes first: the record would run into it, and every later export would fail.
    ``ranks`` is the job's world size: the GPUs it trains on, not the ones the machine has. ``precision`` is the
    type the matmuls computed in, which ``auto`` chose on this machine (``zmaj.train.precision``): a resumed run
    may have computed in another in an earlier session, and a model card says so."""
    if device.type == "cuda":
        hardware = f"{ranks} x {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"{cpu_model()}, {os.cpu_count()} cores"
    record = {
        "event": event,
        "time": time.time(),
        "device": device.type,
        "hardware": hardware,
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "precision": precision,
    }
    drop_cut_short_line(run_dir / RUN_FILE)
    append_jsonl(run_dir / RUN_FILE, record)


def curve_points(
    records: Sequence[dict[str, Any]], key: str
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The ``(step, value)`` points of ``key``: the curve, and apart from it the end-of-run evaluation (``final``),
    which may measure more (pre-training's scores the whole held-out set, the others a sample of it), so it is
    drawn as a point of its own rather than joined to the curve. Every curve but the training loss ends with it:
    the loop evaluates every ``eval_every`` steps before the last, and at the last the final evaluation."""
    curve = [(r["step"], r[key]) for r in records if key in r and not r.get("final")]
    final = [(r["step"], r[key]) for r in records if key in r and r.get("final")]
    return curve, final


def plot_curves(metrics_path: Path, out: Path, panels: Sequence[tuple[str, str]]) -> None:
    """One panel per ``(metric key, title)`` present in the run's metrics JSONL, each against the step."""
    records = read_records(metrics_path, METRIC)
    shown = [(key, title) for key, title in panels if any(key in r for r in records)]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown, strict=True):
        curve, final = curve_points(records, key)
        if curve:
            ax.plot(*zip(*curve, strict=True), "o-" if len(curve) < 30 else "-", linewidth=0.8)
        if final:
            ax.plot(*zip(*final, strict=True), "*", color="C3", markersize=10, label="end of run")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    # Whole or not at all (zmaj.fileio): a kill while saving in place left a cut-short PNG, which --resume kept
    # and export copied.
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(out, png.getvalue())


def gpt_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter-multiply (forward + backward) plus attention scores.

    Counts the matmuls only (Kaplan et al., 2020; the PaLM appendix's 6N + 12 L d S); embeddings are lookups,
    the unembedding is a matmul and counts.
    """
    d, layers = config.d_model, config.n_layers
    per_layer = 4 * d * d + 2 * d * config.ff_dim
    matmul_params = layers * per_layer + config.vocab_size * d
    return 6.0 * matmul_params + 12.0 * layers * d * seq_len


def measure_matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """Best observed GFLOP/s of an n x n matmul in this process: the ceiling MFU is measured against.

    On a GPU the product is 8192 wide whatever ``n``: a 1024 one (2 GFLOP, microseconds on an H100) is mostly
    launch and synchronisation, which would put the ceiling far too low and the MFU far too high (as
    ``benchmarks/common.py`` sizes its GPU peak)."""
    if device.type == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
