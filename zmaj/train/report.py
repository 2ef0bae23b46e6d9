"""What a run leaves behind for people: a metrics JSONL, a curves PNG, FLOP counts for MFU, and a record of
when and on what hardware it ran (``run.jsonl``), which a model card reports."""

import json
import os
import platform
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch

from zmaj.data.text import read_jsonl, read_text
from zmaj.models.gpt import GPTConfig
from zmaj.train.checkpoint import atomic_write_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite the metrics file ``path`` (atomically) without its records past ``step``, and say how many went.

    A run killed after its last checkpoint recorded steps that the resumed run takes again from that checkpoint:
    kept, they would be counted twice (a model card's tokens seen) and drawn as a curve that runs backwards.
    """
    if not path.is_file():
        return 0
    text = read_text(path)
    lines = _whole_lines(text)
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines) or not text.endswith("\n"):
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


def has_evaluation(path: Path, step: int, final: bool) -> bool:
    """Whether the metrics file ``path`` holds an evaluation at ``step`` (a line without a step's ``lr``), the
    final one or a periodic one."""
    if not path.is_file():
        return False
    return any(
        record["step"] == step and "lr" not in record and bool(record.get("final")) == final
        for record in map(json.loads, _whole_lines(read_text(path)))
    )


def _whole_lines(text: str) -> list[str]:
    """A metrics file's records: past its last newline is nothing, or a line a kill cut short, which is none."""
    return text.split("\n")[:-1]


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


def record_session(run_dir: Path, event: str, device: torch.device) -> None:
    """Append a ``start`` or ``end`` record to the run's ``run.jsonl``: wall-clock time, device, host, versions."""
    if device.type == "cuda":
        hardware = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
    else:
        hardware = f"{cpu_model()}, {os.cpu_count()} cores"
    record = {
        "event": event,
        "time": time.time(),
        "device": device.type,
        "hardware": hardware,
        "host": socket.gethostname(),
        "torch": torch.__version__,
    }
    append_jsonl(run_dir / RUN_FILE, record)


def plot_curves(metrics_path: Path, out: Path, panels: Sequence[tuple[str, str]]) -> None:
    """One panel per ``(metric key, title)`` present in the run's metrics JSONL, each against the step."""
    records = [record for _, record in read_jsonl(metrics_path)]
    shown = [(key, title) for key, title in panels if any(key in r for r in records)]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r and not r.get("final")]
        marker = "o-" if len(points) < 30 else "-"
        ax.plot(*zip(*points, strict=True), marker, linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


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
    """Best observed GFLOP/s of an n x n matmul in this process: the ceiling MFU is measured against."""
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
