"""Benchmark of data-parallel and fully sharded training on this machine's cores: 1 process x N threads against
N processes x 1 thread (``torchrun``, gloo), the same global batch and model.

Each layout trains the benchmark GPT shape (``benchmarks/train_step.py``: 6 layers, d=384, vocab 8192, 256 tokens x
8 rows per step) with ``zmaj.train.step.train_step`` as ``programs/pretrain.py`` runs it (eager, donating update).
Reported per layout: tokens/s over the global batch (median step after warm-up), the share of a step spent in
collectives (from ``torch.profiler``: the self time of every gloo / c10d op, which includes waiting for the other
rank, so imbalance counts as communication), and each rank's peak resident memory (``ru_maxrss``; also above what
the imports alone took) with the state elements it holds. Run by hand:

    uv run python benchmarks/distributed.py            # the benchmark shape, a few minutes
    uv run python benchmarks/distributed.py --quick    # a tiny model: is everything wired up?

Writes ``benchmarks/results/distributed_<dtype>.md``. The workers are this file run with ``--worker`` (by ``torchrun`` for
the multi-process layouts).

CPU only, by design: on GPUs the layouts are one process per GPU under NCCL, whose kernels run asynchronously
(the CPU profiler above would see ~0 in collectives) and whose memory is the GPU's, not the process's resident
set; that benchmark needs a multi-GPU machine, which this project has not had.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from common import markdown_table, print_header

from zmaj.models import gpt
from zmaj.models.common import Batch
from zmaj.train import muon, optim, precision
from zmaj.train.parallel import Parallel, ParallelConfig, tensors
from zmaj.train.step import bind_lazy, init_state, step_functions, train_step

RESULTS = Path(__file__).parent / "results"
SHAPES = {
    "benchmark": gpt.GPTConfig(vocab_size=8192, context=256, d_model=384, n_layers=6, n_heads=6, bias=False),
    "quick": gpt.GPTConfig(vocab_size=512, context=64, d_model=64, n_layers=2, n_heads=2, bias=False),
}
OPTIMIZERS: dict[str, optim.AdamWConfig | muon.MuonConfig] = {
    "adamw": optim.AdamWConfig(lr=1e-3),
    "muon": muon.MuonConfig(kind="muon", lr=0.02, adamw=optim.AdamWGroup(lr=1e-3)),
}
"""``--optimizer``: AdamW everywhere, or Muon on the blocks' matrices (default groups), AdamW on the rest."""
COLLECTIVES = ("gloo", "c10d", "nccl", "allreduce", "all_reduce", "all_gather", "allgather", "reduce_scatter")


def worker(args: argparse.Namespace) -> None:
    """Train ``args.steps`` steps in this process's layout and append one JSON line of measurements per rank."""
    config = SHAPES[args.shape]
    parallel = Parallel.from_environment(ParallelConfig(kind=args.kind), torch.device("cpu"))
    device = parallel.device
    dtype = precision.resolve(args.precision, device)
    imported_rss = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # torch and friends, before any state
    optimizer = OPTIMIZERS[args.optimizer]
    state = parallel.shard(init_state(gpt.init(config, 0, device), optimizer))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.rows, args.seq + 1), generator=generator)
    mine = parallel.rows(range(args.rows))
    batch = Batch(tokens=tokens[mine[0] : mine[-1] + 1, :-1], targets=tokens[mine[0] : mine[-1] + 1, 1:]).to(
        device
    )
    grad_fn, update_fn = step_functions(compile=False)  # as programs/pretrain.py runs an eager step
    step = partial(
        train_step,
        forward=parallel.forward(bind_lazy(gpt.lazy_forward, config=config), dtype),  # the chunked loss
        optimizer=optimizer,
        lr=optimizer.lr,
        decay=optim.decay_mask(state["params"]),
        seed=0,
        autocast=precision.autocast(dtype, device),
        grad_fn=grad_fn,
        update_fn=update_fn,
        parallel=parallel,
    )

    def timed() -> float:
        nonlocal state
        parallel.barrier()
        start = time.perf_counter()
        state, metrics = step(state, [batch])
        float(metrics["loss"])
        return time.perf_counter() - start

    for _ in range(args.warmup):
        timed()
    seconds = [timed() for _ in range(args.steps)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        profiled = timed()
    events = profile.key_averages()
    communication = sum(e.self_cpu_time_total for e in events if any(c in e.key.lower() for c in COLLECTIVES))
    record = {
        "layout": "1 process" if not parallel.distributed else f"{parallel.size} processes, {args.kind}",
        "rank": parallel.rank,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "step_ms": round(1000 * statistics.median(seconds), 1),
        "tokens_per_s": round(args.rows * args.seq / statistics.median(seconds)),
        "collective_share": communication / 1e6 / profiled,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rss_over_imports_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - imported_rss
        ),
        "state_elements": sum(t.numel() for t in tensors(state)),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    if parallel.distributed:
        torch.distributed.destroy_process_group()


def launch(args: argparse.Namespace, out: Path, processes: int, kind: str) -> None:
    """One layout: this file as a worker, alone with ``--cores`` threads or under ``torchrun`` with 1 each."""
    flags = [
        "--worker",
        f"--kind={kind}",
        f"--shape={args.shape}",
        f"--rows={args.rows}",
        f"--seq={args.seq}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--precision={args.precision}",
        f"--optimizer={args.optimizer}",
        f"--out={out}",
    ]
    threads = args.cores // processes
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        command = [sys.executable, __file__, *flags]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={processes}",
            __file__,
            *flags,
        ]
    subprocess.run(command, env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="dp", choices=["dp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="benchmark", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=8, help="rows of the global batch")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="threads of the one process")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.shape, args.seq, args.steps, args.warmup = "quick", 64, 3, 1
    header = print_header("cpu")
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "records.jsonl"
        launch(args, out, 1, "dp")
        for kind in ("dp", "fsdp"):
            launch(args, out, args.cores, kind)
        records = [json.loads(line) for line in out.read_text().splitlines()]
    baseline = records[0]["tokens_per_s"]
    rows = [
        {
            **r,
            "vs 1 process": f"{r['tokens_per_s'] / baseline:.2f}x",
            "collective_share": f"{100 * r['collective_share']:.1f}%",
        }
        for r in records
    ]
    columns = [
        "layout",
        "rank",
        "threads",
        "dtype",
        "step_ms",
        "tokens_per_s",
        "vs 1 process",
        "collective_share",
        "peak_rss_mb",
        "rss_over_imports_mb",
        "state_elements",
    ]
    config = SHAPES[args.shape]
    title = (
        f"GPT {config.n_layers} layers, d={config.d_model}, vocab {config.vocab_size}; global batch {args.rows} x "
        f"{args.seq} tokens; {args.optimizer}; median of {args.steps} steps after {args.warmup} warm-up"
    )
    table = markdown_table(rows, columns)
    print(title)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    command = " ".join(["uv run python benchmarks/distributed.py", *sys.argv[1:]])
    optimizer = "" if args.optimizer == "adamw" else f"_{args.optimizer}"
    name = f"distributed_{records[0]['dtype']}{optimizer}" + ("_quick" if args.quick else "")
    (RESULTS / f"{name}.md").write_text(f"{header}\n\n`{command}`\n\n{title}\n\n{table}\n")


if __name__ == "__main__":
    main()
