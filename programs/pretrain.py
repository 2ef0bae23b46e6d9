"""Pre-train a GPT from scratch: load spec -> prepare data -> build state -> loop train steps -> save.

    uv run programs/pretrain.py                                   # specs/pretrain/stdlib-tiny.yaml
    uv run programs/pretrain.py SPEC --set train.steps=100 --set model.dropout=0.1
    uv run programs/pretrain.py --resume runs/stdlib-tiny-20261126-101500
    uv run torchrun --nproc-per-node 2 programs/pretrain.py       # data parallel over 2 processes

Ctrl-C saves a checkpoint and exits cleanly (before or after the training steps it stops at once, status 130);
``--resume`` continues exactly where the run stopped.
``train.batch_size`` counts the rows of all ranks together, so a spec means the same run at any world size.
"""

import os
from functools import partial
from pathlib import Path

from loguru import logger
from tensordict import TensorDict

from zmaj.data.dataset import stream_batch
from zmaj.data.pipeline import Prepared, prepare
from zmaj.data.tokenizer import check_unchanged
from zmaj.infer.sample import continue_texts
from zmaj.models import gpt
from zmaj.models.common import Batch
from zmaj.specfile import SpecError
from zmaj.train import loop, optim, precision, report, runs
from zmaj.train.parallel import Parallel
from zmaj.train.runs import Run
from zmaj.train.spec import OPTIMIZER_LAYOUT, PretrainSpec
from zmaj.train.step import bind_lazy, held_out, step_functions, train_step

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "specs" / "pretrain" / "stdlib-tiny.yaml"
FROZEN = ("model", "data", "train.seed", "train.batch_size", "train.grad_accum", *OPTIMIZER_LAYOUT)
"""What ``--resume --set`` may not change: the model, and what decides the rows each step reads (the corpus,
its packing, the seed of their order, the rows a step takes: step i starts at row i x batch x accumulation), so
that a resumed run reads the batches of an uninterrupted one."""


def main() -> None:
    parser = runs.cli(__doc__, DEFAULT_SPEC)
    default_cache = os.environ.get("ZMAJ_CACHE", str(Path.home() / ".cache" / "zmaj"))
    parser.add_argument(
        "--cache-dir", default=default_cache, help="tokenizers and token files (default: %(default)s)"
    )
    args = parser.parse_args()
    with runs.bad_input_exits_2():
        spec = runs.read_spec(PretrainSpec, args, FROZEN, DEFAULT_SPEC)
        parallel = runs.join(spec.train)
    with runs.bad_input_exits_2(parallel):
        check_backend(spec, parallel)
        cache_dir = make_cache_dir(Path(args.cache_dir))
        parallel.check_on_rank_0(lambda: runs.check_run_folder(args))  # before the data, which may take long
        # Rank 0 trains the tokenizer and fills the token-file cache while the others wait, then they read it.
        data = parallel.rank_0_first(lambda: prepare(spec.data, cache_dir, spec.train.seed))
        if args.resume is not None and (args.resume / TOKENIZER_FILE).is_file():
            check_unchanged(args.resume / TOKENIZER_FILE, data.tokenizer)
        run = runs.open_run(spec, args, parallel, data=data.fingerprints, frozen=FROZEN)
    with run:
        train(run, data)


def check_backend(spec: PretrainSpec, parallel: Parallel) -> None:
    """Fail before any work when the spec cannot train here."""
    if (
        spec.model.attention == "flex"
    ):  # (tests/unit/train/test_step.py: a strict xfail on CUDA, skipped on the CPU)
        raise SpecError(
            "model.attention: flex-attention cannot be differentiated under torch.func, which the training step "
            "uses (pytorch/pytorch#144810); train with auto (or sdpa, eager), and use flex for inference"
        )
    parallel.check_divides(spec.train.batch_size, "train.batch_size")
    parallel.check_shardable(gpt.init(spec.model, 0, device="meta"))


def make_cache_dir(folder: Path) -> Path:
    """``--cache-dir``, made now: one that cannot be a folder (a file, or a path under one) would otherwise fail
    with a traceback once the tokenizer is trained, which may take minutes."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--cache-dir {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"--cache-dir {folder}: cannot make the folder ({error.strerror or error})"
        ) from error
    return folder


def train(run: Run[PretrainSpec], data: Prepared) -> None:
    spec, parallel, device = run.spec, run.parallel, run.device
    cfg = spec.train
    if not run.resumed:  # a resumed run's own was checked against it, and is kept
        runs.on_rank_0(
            parallel, partial(data.tokenizer.save, run.dir / TOKENIZER_FILE), "write the tokenizer"
        )
    logger.info(
        f"{len(data.train)} train rows, {len(data.validation)} validation rows of {spec.data.seq_len} tokens"
    )
    # Fresh parameters are made on the CPU (a resumed run's read there), cut into this rank's share and moved to
    # the device, where the optimizer's state is made beside them.
    state = run.restore(
        lambda device: parallel.shard(gpt.init(spec.model, cfg.seed, device or "cpu")), cfg.optimizer
    )
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)
    # The loss unembeds a chunk of positions at a time, never holding the whole logits (zmaj.nn.loss).
    lazy = bind_lazy(gpt.lazy_forward, config=spec.model)
    grad_fn, update_fn = step_functions(cfg.compile)
    autocast = precision.autocast(run.dtype, device)

    step = partial(
        train_step,
        forward=parallel.forward(lazy, run.dtype),
        optimizer=cfg.optimizer,
        decay=decay,
        seed=cfg.seed,
        autocast=autocast,
        grad_fn=grad_fn,
        update_fn=update_fn,
        parallel=parallel,
    )

    def batches(index: int) -> list[Batch]:
        """This rank's share of each micro-batch of step ``index``: the rows of the endless epoch stream from
        position ``index * rows per step`` on."""
        first = index * cfg.batch_size * cfg.grad_accum
        micro = [
            range(first + m * cfg.batch_size, first + (m + 1) * cfg.batch_size) for m in range(cfg.grad_accum)
        ]
        return [stream_batch(data.train, parallel.rows(rows)).to(device) for rows in micro]

    token_bytes = data.tokenizer.token_bytes()
    baseline = data.unigram_bpb()
    sampling = spec.sample.model_dump()

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float | int]:
        params = parallel.unshard(state["params"])
        # No activations are kept for a backward pass, and the loss is chunked as in training, so evaluation
        # affords 4x larger batches.
        max_batches = None if final else cfg.eval_batches
        result = held_out(
            params, data.validation, lazy, 4 * cfg.batch_size, max_batches, token_bytes, autocast, parallel
        )
        logger.info(f"step {step}: val loss {result['val_loss']:.3f}, {result['val_bpb']:.3f} bits per byte")
        if parallel.main:
            for text in continue_texts(params, spec.model, data.tokenizer, cfg.seed, **sampling):
                logger.info(f"sample at step {step}: {text!r}")
        return {**result, "unigram_bpb": baseline} if final else result

    peak = report.measure_matmul_peak(run.dtype, device)
    n_params = sum(t.numel() for t in gpt.init(spec.model, 0, device="meta").values(True, True))
    logger.info(
        f"{n_params / 1e6:.2f}M parameters, {run.dtype} on {device} x {parallel.size} ({parallel.kind}), "
        f"matmul peak {peak:.0f} GFLOP/s per process, unigram baseline {baseline:.3f} bits per byte"
    )
    loop.train(
        run,
        state,
        step,
        batches,
        evaluate=evaluate,
        panels=[("loss", "train loss (nats/token)"), ("val_loss", "held-out loss (nats/token)")],
        show=("loss",),
        flops_per_token=report.gpt_flops_per_token(spec.model, spec.data.seq_len),
        peak_gflops=peak * parallel.size,
    )


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main)
