"""The pre-training speedrun: the default run's 2019 recipe changed one step at a time, each change measured.

Row 0 trains ``specs/pretrain/stdlib-gpt2-2019.yaml`` (the old default); every later row adds its ``--set``
overrides to those of the kept rows before it, so the table reads as a record log (modded-nanogpt's): what changed, what
it bought, why. Each row is one ``programs/pretrain.py`` run in its own folder (the tokenizer and token files come
from the usual cache), evaluated on all held-out rows ``--evals`` times; the training clock is the sum of the
steps' own wall times from ``metrics.jsonl``, so evaluation and start-up are not counted (compilation is: the first
steps pay it). For each row the table gives:

- **bpb @ budget**: held-out bits per byte at the budget (row 0's training time unless ``--budget-s``), read off
  the curve between evaluations (its final value if the row finished sooner);
- **final bpb**: the end-of-run evaluation, over all held-out rows;
- **to target**: training seconds until the curve first reaches row 0's final bpb (``--target-bpb``), linearly
  between evaluations; an upper bound, since a run scheduled to stop there would have decayed its learning rate
  sooner.

A row whose option the spec does not know yet (a ``--set`` the spec refuses) is skipped with the reason, and the
rows after it go on without its overrides; so do the rows after one marked not kept (a change tried that did not
pay here, measured all the same). Prints a markdown table and writes ``benchmarks/results/speedrun.md``
and ``speedrun.png`` (held-out bpb against training time, one curve per row); ``--name`` keeps another run's
table beside that one.

    uv run benchmarks/speedrun.py                          # every row, precision auto (bf16 here)
    uv run benchmarks/speedrun.py --rows 0,3,5 --evals 3 --name speedrun_subset
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        uv run benchmarks/speedrun.py --precision fp32 --name speedrun_avx2_emulated  # the AVX2-only view
    uv run benchmarks/speedrun.py --quick                  # wiring check: a few steps per row, no results
"""

import argparse
import datetime
import itertools
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from common import markdown_table, print_header
from loguru import logger

from zmaj.specfile import SpecError
from zmaj.text import read_jsonl
from zmaj.train import precision
from zmaj.train.spec import PretrainSpec, load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PRETRAIN = ROOT / "programs" / "pretrain.py"
OLD_DEFAULT = ROOT / "specs" / "pretrain" / "stdlib-gpt2-2019.yaml"
NEW_DEFAULT = ROOT / "specs" / "pretrain" / "stdlib-tiny.yaml"
AVX2_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
"""The variables that emulate an AVX2-only CPU (README); the command line shows them when they are set."""


@dataclass(frozen=True)
class Row:
    """One change to the recipe: its ``--set`` overrides (added to the kept rows' before it), what it is, and why.

    A row with ``kept=False`` is a change tried and left out of the recipe: it is measured on top of the rows before
    it, and the rows after it build on those rows without it (the record log's "tried, did not help here")."""

    what: str
    why: str
    overrides: tuple[str, ...] = ()
    kept: bool = True


MUON = (
    "{kind: muon, lr: 0.02, momentum: 0.95, nesterov: true, weight_decay: 0.0, grad_clip: 1.0,"
    " adamw: {lr: 3.0e-3, betas: [0.9, 0.95], weight_decay: 0.1}}"
)
"""Muon for the block matrices, AdamW with the old settings for embeddings, norms and biases."""

ROWS = [
    Row(
        "old default (2019 recipe)",
        "GPT-2 blocks, learned positions, AdamW 3e-3, cosine to 10%, 450 x 8 x 256",
    ),
    Row(
        "Muon",
        "the block matrices' updates orthogonalised (Newton-Schulz, 5 steps), momentum 0.95, lr 0.02; AdamW keeps "
        "embeddings, norms and biases",
        (f"train.optimizer={MUON}",),
    ),
    Row(
        "RoPE + RMSNorm",
        "rotary positions (relative, no table to learn) and RMSNorm (no mean, no bias) as in Llama",
        ("model.positions=rope", "model.norm=rmsnorm"),
    ),
    Row(
        "ReLU²",
        "relu(x)^2 in the MLP (Primer, So et al., 2021): sparse and cheaper than GELU, but here it cost bpb, so the "
        "later rows keep GELU",
        ("model.activation=relu2",),
        kept=False,
    ),
    Row(
        "QK-norm",
        "RMSNorm on each head's queries and keys: attention logits stay bounded at a high lr",
        ("model.qk_norm=true",),
    ),
    Row(
        "untied zero-init unembedding + soft-cap 15",
        "the output layer learns apart from the input table, from zero; logits squashed by 15 tanh(x / 15). It "
        "pays in modded-nanogpt's GPT-2 runs; here a second 8192-row table learning from scratch in a few hundred "
        "steps cost bpb, so the later rows keep the tied table",
        ("model.tie_embeddings=false", "model.unembed_init=zero", "model.logit_softcap=15"),
        kept=False,
    ),
    Row(
        "WSD schedule",
        "warmup-stable-decay (Hägele et al., 2024): the peak rate until the last 40% of the steps, then linear to 0",
        ("train.schedule={kind: wsd, warmup_steps: 50, decay_fraction: 0.4, final_lr_fraction: 0.0}",),
    ),
    Row(
        "U-net skips",
        "each first-half block's output added, with a learned weight, to its mirror second-half block's input "
        "(modded-nanogpt)",
        ("model.unet_skips=true",),
    ),
    Row(
        "AdamW at 8x the rate",
        "the tied embedding table, norms and skip weights at lr 0.024 instead of 0.003: the table is the input and "
        "the output layer at once, and a few hundred steps are all it gets",
        ("train.optimizer.adamw.lr=2.4e-2",),
    ),
    Row(
        "16 rows x 175 steps",
        "twice the rows per step, 0.72M tokens: Newton-Schulz costs the same per step whatever the batch (18.8 of "
        "an 8-row step's 71 GFLOP), so this is 7/8 of row 0's compute with it counted (200 steps would be all of it; "
        "175 kept an earlier default inside the 10-minute budget on an AVX2-only CPU)",
        (
            "train.batch_size=16",
            "train.steps=175",
            "train.schedule={kind: wsd, warmup_steps: 25, decay_fraction: 0.4, final_lr_fraction: 0.0}",
        ),
    ),
    Row(
        "exact GELU",
        "GELU through erf instead of GPT-2's tanh approximation, as nanoGPT: the same held-out bpb to 4 decimals at "
        "every evaluation, and PyTorch's CPU kernels for it are ~3x faster (forward and backward of [16, 256, 1024] "
        "in fp32: 14.9 -> 5.5 ms on an AVX2-only EPYC)",
        ("model.activation=gelu",),
    ),
    Row(
        "compiled step",
        "torch.compile fuses the step's elementwise work; compiling costs the first steps",
        ("train.compile=true",),
    ),
]
"""The record log's rows, each building on the kept ones before it; one of them is ``stdlib-tiny.yaml`` (checked)."""


@dataclass(frozen=True)
class Result:
    """What one row's run measured: its held-out curve against the training clock, and its final scores."""

    curve: list[tuple[float, float]]  # (training seconds, held-out bpb), from step 0 to the final evaluation
    train_s: float
    wall_s: float
    steps: int
    tokens_per_step: int

    @property
    def final_bpb(self) -> float:
        return self.curve[-1][1]


def read_result(metrics: Path, wall_s: float, tokens_per_step: int) -> Result:
    """A run's curve from its ``metrics.jsonl``: each evaluation placed at the sum of the step times before it."""
    clock, steps, curve = 0.0, 0, []
    for _, record in read_jsonl(metrics):
        if "val_bpb" in record:
            curve.append((clock, float(record["val_bpb"])))
        elif "seconds" in record:
            clock += float(record["seconds"])
            steps = int(record["step"])
    return Result(curve, clock, wall_s, steps, tokens_per_step)


def bpb_at(curve: list[tuple[float, float]], seconds: float) -> float:
    """Held-out bpb at ``seconds`` of training, linear between evaluations; the final value past the end."""
    for (t0, b0), (t1, b1) in itertools.pairwise(curve):
        if t0 <= seconds <= t1:
            return b0 if t1 == t0 else b0 + (b1 - b0) * (seconds - t0) / (t1 - t0)
    return curve[-1][1]


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """Training seconds until the curve first reaches ``target``, linear between evaluations; None if never."""
    for (t0, b0), (t1, b1) in itertools.pairwise(curve):
        if b1 <= target:
            return t0 if b0 <= target else t0 + (t1 - t0) * (b0 - target) / (b0 - b1)
    return None


@dataclass(frozen=True)
class Planned:
    """A row with its own overrides and those of the kept rows before it, or the reason the spec refuses it (its
    overrides are then dropped)."""

    index: int
    row: Row
    overrides: list[str]
    refused: str | None = None


def plan(rows: list[Row]) -> list[Planned]:
    """Each row's cumulative overrides, checked against the spec before anything runs; a row not kept is planned
    with its overrides, but the chain the later rows build on goes on without them."""
    chain: list[str] = []
    planned = []
    for index, row in enumerate(rows):
        candidate = chain + list(row.overrides)
        try:
            load(PretrainSpec, OLD_DEFAULT, candidate)
        except SpecError as error:
            planned.append(Planned(index, row, chain, refused=str(error)))
            continue
        if row.kept:
            chain = candidate
        planned.append(Planned(index, row, candidate))
    return planned


def differences(a: object, b: object, path: str = "") -> list[str]:
    """Dotted names of the fields where two spec dumps differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)]
    return [] if a == b else [path]


NOT_THE_RECIPE: dict[str, bool | set[str]] = {
    "name": True,
    "sample": True,
    "train": {"eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"},
}
"""Spec fields that do not change what a run learns (``measurement_overrides`` sets them in every row)."""


def against_default(planned: list[Planned]) -> str:
    """Which row is ``stdlib-tiny.yaml``, the default run; if none, where the last accepted row differs from it."""
    default = load(PretrainSpec, NEW_DEFAULT).model_dump(exclude=NOT_THE_RECIPE)
    accepted = [p for p in planned if p.refused is None and p.row.kept]
    built = {
        p.index: load(PretrainSpec, OLD_DEFAULT, p.overrides).model_dump(exclude=NOT_THE_RECIPE)
        for p in accepted
    }
    same = [index for index, spec in built.items() if spec == default]
    if same:
        return f"- row {same[0]} is `specs/pretrain/stdlib-tiny.yaml`, the default run."
    last = accepted[-1].index
    diff = ", ".join(differences(built[last], default))
    return f"- no row is `specs/pretrain/stdlib-tiny.yaml` (the default run); row {last} differs from it in: {diff}."


def measurement_overrides(spec: PretrainSpec, evals: int, precision: str | None, quick: bool) -> list[str]:
    """The ``--set``s that make a run measurable without changing what it learns: evaluations over all held-out
    rows about ``evals`` times, no samples, no checkpoints but the last; the precision when one is asked for."""
    steps = 6 if quick else spec.train.steps
    sets = [
        f"train.eval_every={max(1, steps // evals)}",
        f"train.eval_batches={1 if quick else 1_000_000}",
        f"train.checkpoint_every={steps + 1}",
        "sample.max_new_tokens=0",
    ]
    if quick:
        sets += [f"train.steps={steps}", "train.schedule.warmup_steps=2"]
    if precision is not None:
        sets.append(f"train.precision={precision}")
    return sets


def run_row(index: int, overrides: list[str], out: Path, args: argparse.Namespace) -> Result:
    """Train one row with ``programs/pretrain.py`` in ``out/row-N`` (its output in ``out/row-N.log``)."""
    spec = load(PretrainSpec, OLD_DEFAULT, overrides)
    sets = overrides + measurement_overrides(spec, args.evals, args.precision, args.quick)
    command = [sys.executable, str(PRETRAIN), str(OLD_DEFAULT), "--run-dir", str(out / f"row-{index}")]
    command += [arg for item in sets for arg in ("--set", item)]
    if args.cache_dir is not None:
        command += ["--cache-dir", str(args.cache_dir)]
    log = out / f"row-{index}.log"
    logger.info(f"row {index}: {shlex.join(command[1:])}")
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"row {index} failed (exit {done.returncode}); end of {log}:\n{tail}")
    steps = 6 if args.quick else spec.train.steps
    final = load(PretrainSpec, OLD_DEFAULT, sets)
    tokens = final.train.batch_size * final.train.grad_accum * final.data.seq_len
    result = read_result(out / f"row-{index}" / "metrics.jsonl", wall, tokens)
    assert result.steps == steps, f"row {index}: metrics.jsonl ends at step {result.steps}, not {steps}"
    logger.info(
        f"row {index}: final {result.final_bpb:.3f} bpb, {result.train_s:.0f} s training, {wall:.0f} s wall"
    )
    return result


def table(done: list[tuple[Planned, Result]], budget: float, target: float) -> str:
    """The record log: one line per row run; speed-ups against row 0's time to the same ``target``."""
    base = next((time_to(result.curve, target) for planned, result in done if planned.index == 0), None)
    lines = []
    for planned, result in done:
        reach = time_to(result.curve, target)
        lines.append(
            {
                "#": planned.index,
                "change": planned.row.what if planned.row.kept else f"({planned.row.what}: tried, not kept)",
                "steps x tokens": f"{result.steps} x {result.tokens_per_step}",
                "train s": f"{result.train_s:.0f}",
                "bpb @ budget": f"{bpb_at(result.curve, budget):.3f}",
                "final bpb": f"{result.final_bpb:.3f}",
                "to target (s)": "-" if reach is None else f"{reach:.0f}",
                "speed-up": "-" if reach is None or not base or reach == 0 else f"{base / reach:.2f}x",
            }
        )
    return markdown_table(lines, list(lines[0]))


def record_log(done: list[tuple[Planned, Result]], skipped: list[Planned]) -> list[str]:
    """Below the table: each row's why and its own ``--set``s, then the rows the spec refused."""
    lines = []
    for planned, _ in done:
        sets = f" (`{' '.join(planned.row.overrides)}`)" if planned.row.overrides else ""
        tried = "" if planned.row.kept else " (tried, not kept)"
        lines.append(f"- **{planned.index}. {planned.row.what}**{tried}: {planned.row.why}{sets}")
    lines += [f"- row {p.index} ({p.row.what}) skipped, the spec refuses it: {p.refused}" for p in skipped]
    return lines


def plot(done: list[tuple[Planned, Result]], budget: float, target: float, path: Path) -> None:
    """Held-out bpb against training time, one curve per row, with the target and the budget marked."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for planned, result in done:
        times, bpbs = zip(*result.curve[1:], strict=True)  # without step 0, whose 3.5 bpb squashes the axis
        style, tried = ("o-", "") if planned.row.kept else ("x-.", ", not kept")
        label = f"{planned.index}: {planned.row.what}{tried}"
        ax.plot(times, bpbs, style, markersize=3, linewidth=1, label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8, label=f"target {target:.3f}")
    ax.axvline(budget, color="grey", linestyle=":", linewidth=0.8, label=f"budget {budget:.0f} s")
    ax.set_xlabel("training seconds (evaluations excluded)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("pre-training speedrun, cumulative changes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", help="comma-separated row numbers (default: all)")
    parser.add_argument(
        "--budget-s", type=float, help="training-time budget (default: row 0's training time)"
    )
    parser.add_argument("--target-bpb", type=float, help="bpb to reach (default: row 0's final bpb)")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], help="set train.precision in every row"
    )
    parser.add_argument(
        "--evals", type=int, default=6, help="held-out evaluations per run (default: %(default)s)"
    )
    parser.add_argument("--quick", action="store_true", help="6 steps per row, results in --out only")
    parser.add_argument("--out", type=Path, help="folder for the runs (default: a new temporary folder)")
    parser.add_argument("--cache-dir", type=Path, help="tokenizer and token cache (default: pretrain.py's)")
    parser.add_argument(
        "--name",
        default="speedrun",
        help="results/NAME.md and NAME.png (default %(default)s), so that a run of some rows, or on another "
        "machine, can be kept beside the main one",
    )
    args = parser.parse_args()

    wanted = set(range(len(ROWS)))
    if args.rows is not None:
        if not all(part.strip().isdigit() for part in args.rows.split(",")):
            parser.error(f"--rows: expected comma-separated row numbers, got {args.rows!r}")
        wanted = {int(part) for part in args.rows.split(",")}
        if unknown := sorted(wanted - set(range(len(ROWS)))):
            parser.error(f"--rows: there is no row {unknown[0]}; rows are 0-{len(ROWS) - 1}")
    if 0 not in wanted and (args.budget_s is None or args.target_bpb is None):
        parser.error("without row 0, give --budget-s and --target-bpb (row 0's run sets them otherwise)")
    if args.evals < 1:
        parser.error(f"--evals: at least 1, got {args.evals}")

    header = print_header(precision.device("auto"))  # where the runs train: their spec's train.device is auto
    out = args.out or Path(tempfile.mkdtemp(prefix="zmaj-speedrun-"))
    out.mkdir(parents=True, exist_ok=True)
    logger.info(f"run folders in {out}")
    planned = [p for p in plan(ROWS) if p.index in wanted]
    skipped = [p for p in planned if p.refused is not None]
    for p in skipped:
        logger.warning(f"row {p.index} ({p.row.what}) skipped, the spec refuses it: {p.refused}")
    done = [(p, run_row(p.index, p.overrides, out, args)) for p in planned if p.refused is None]

    results = {p.index: result for p, result in done}
    budget = args.budget_s if args.budget_s is not None else results[0].train_s
    target = args.target_bpb if args.target_bpb is not None else results[0].final_bpb
    budget_from = "row 0's training time" if args.budget_s is None else "--budget-s"
    target_from = "row 0's final" if args.target_bpb is None else "--target-bpb"
    emulation = [f"{k}={os.environ[k]}" for k in AVX2_ENV if k in os.environ]
    command = shlex.join([*emulation, "uv", "run", "benchmarks/speedrun.py", *sys.argv[1:]])
    text = "\n".join(
        [
            f"## Pre-training speedrun, {datetime.date.today().isoformat()}",
            "",
            header,
            f"- command: `{command}`",
            f"- budget: {budget:.0f} s of training ({budget_from}); target: {target:.3f} held-out bits per byte "
            f"({target_from})",
            "",
            table(done, budget, target),
            "",
            *record_log(done, skipped),
            against_default(plan(ROWS)),
            "",
        ]
    )
    print(text)
    written = out if args.quick else RESULTS
    written.mkdir(exist_ok=True)
    (written / f"{args.name}.md").write_text(text)
    plot(done, budget, target, written / f"{args.name}.png")
    logger.info(f"wrote {written / args.name}.md and .png")


if __name__ == "__main__":
    main()
