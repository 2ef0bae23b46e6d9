"""Pre-train a GPT from scratch: load spec -> prepare data -> build state -> loop train steps -> save.

    uv run programs/pretrain.py                                   # specs/pretrain/stdlib-tiny.yaml
    uv run programs/pretrain.py SPEC --set train.steps=100 --set model.dropout=0.1
    uv run programs/pretrain.py --resume runs/stdlib-tiny-20261126-101500
    uv run torchrun --nproc-per-node 2 programs/pretrain.py       # data parallel over 2 processes

Ctrl-C saves a checkpoint and exits cleanly; ``--resume`` continues exactly where the run stopped.
``train.batch_size`` counts the rows of all ranks together, so a spec means the same run at any world size.
"""

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from tensordict import TensorDict, TensorDictBase

from zmaj.data.dataset import LMDataset, stream_batch
from zmaj.data.pipeline import Prepared, prepare
from zmaj.infer.sample import sample
from zmaj.models import gpt
from zmaj.models.common import Batch
from zmaj.train import loop, optim, precision, report, runs
from zmaj.train.parallel import Parallel
from zmaj.train.runs import Run
from zmaj.train.spec import PretrainSpec, SpecError
from zmaj.train.step import (
    Forward,
    Metrics,
    UpdateFn,
    accumulate_grads,
    apply_grads,
    bind,
    eval_step,
    init_state,
    pooled_eval,
    train_step,
)

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "specs" / "pretrain" / "stdlib-tiny.yaml"


def main() -> None:
    parser = runs.cli(__doc__, DEFAULT_SPEC)
    default_cache = os.environ.get("ZMAJ_CACHE", str(Path.home() / ".cache" / "zmaj"))
    parser.add_argument(
        "--cache-dir", default=default_cache, help="tokenizers and token files (default: %(default)s)"
    )
    args = parser.parse_args()
    with runs.bad_input_exits_2():
        spec = runs.read_spec(PretrainSpec, args, frozen=("model",))
        parallel = runs.join(spec.train)
    with runs.bad_input_exits_2(parallel):
        check_backend(spec, parallel)
        data = prepare_data(spec, Path(args.cache_dir), parallel)
        run = runs.open_run(spec, args, parallel)
    with run:
        train(run, data)


def check_backend(spec: PretrainSpec, parallel: Parallel) -> None:
    """Fail before any work when the spec cannot train here."""
    if spec.model.attention == "flex" and parallel.device.type == "cpu":
        raise SpecError(
            "model.attention: flex-attention has no backward pass on the CPU; use sdpa (or eager) here"
        )
    parallel.check_divides(spec.train.batch_size, "train.batch_size")
    parallel.check_shardable(gpt.init(spec.model, 0, device="meta"))


def prepare_data(spec: PretrainSpec, cache_dir: Path, parallel: Parallel) -> Prepared:
    """Tokenizer and token files, made by rank 0 while the others wait, then read from the cache by them."""
    if parallel.main:
        data = prepare(spec.data, cache_dir, spec.train.seed)
    parallel.barrier()
    if not parallel.main:
        data = prepare(spec.data, cache_dir, spec.train.seed)
    if data.tokenizer.vocab_size != spec.model.vocab_size:
        raise SpecError(
            f"tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size is {spec.model.vocab_size}"
        )
    return data


def train(run: Run[PretrainSpec], data: Prepared) -> None:
    spec, parallel, device = run.spec, run.parallel, run.device
    cfg = spec.train
    if parallel.main:
        data.tokenizer.save(run.dir / "tokenizer.json")
    logger.info(
        f"{len(data.train)} train rows, {len(data.validation)} validation rows of {spec.data.seq_len} tokens"
    )
    state = run.restore(init_state(gpt.init(spec.model, cfg.seed, device=device)))
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)
    forward = bind(gpt.forward, config=spec.model)
    grad_fn = torch.compile(accumulate_grads) if cfg.compile else accumulate_grads
    # The loop never reads a state again once its step has run, so the update may write into it (donate).
    update: UpdateFn = partial(apply_grads, donate=True)
    update_fn = torch.compile(update, fullgraph=True) if cfg.compile else update
    autocast = precision.autocast(run.dtype, device)

    def step(state: TensorDict, micro: list[Batch], lr: float) -> tuple[TensorDict, Metrics]:
        return train_step(
            state,
            micro,
            forward=parallel.forward(forward),
            optimizer=cfg.optimizer,
            lr=lr,
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
    baseline = unigram_bpb(data.train, data.validation, token_bytes, data.tokenizer.vocab_size)

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float | int]:
        params = parallel.unshard(state["params"])
        # No activations are kept for a backward pass, so evaluation affords 4x larger batches.
        max_batches = None if final else cfg.eval_batches
        result = validation(
            forward, params, data.validation, 4 * cfg.batch_size, max_batches, token_bytes, run
        )
        logger.info(f"step {step}: val loss {result['val_loss']:.3f}, {result['val_bpb']:.3f} bits per byte")
        if parallel.main:
            for text in samples(forward, params, data, spec, device):
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


def validation(
    forward: Forward,
    params: TensorDictBase,
    dataset: LMDataset,
    batch_size: int,
    max_batches: int | None,
    token_bytes: torch.Tensor,
    run: Run[PretrainSpec],
) -> dict[str, float]:
    """Held-out loss and bits per byte over the first ``max_batches`` batches (all when None), each rank taking
    every N-th batch, the sums pooled over the ranks."""
    parallel = run.parallel
    n_batches = -(-len(dataset) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    sums = torch.zeros(3, dtype=torch.float64)
    for index in range(parallel.rank, n_batches, parallel.size):
        rows = range(index * batch_size, min((index + 1) * batch_size, len(dataset)))
        batch = stream_batch(dataset, rows).to(run.device)
        metrics = eval_step(params, batch, forward, token_bytes, precision.autocast(run.dtype, run.device))
        sums += torch.stack(
            [metrics["loss_sum"].double().cpu(), metrics["tokens"].cpu(), metrics["bytes"].cpu()]
        )
    total = parallel.all_sum(sums.to(run.device)).cpu()
    return pooled_eval([{"loss_sum": total[0], "tokens": total[1], "bytes": total[2]}])


def samples(
    forward: Forward, params: TensorDictBase, data: Prepared, spec: PretrainSpec, device: torch.device
) -> list[str]:
    out = []
    for i, prompt in enumerate(spec.sample.prompts):
        ids = torch.tensor([data.tokenizer.encode(prompt)], device=device)
        new = sample(
            lambda b: forward(params, b, dropout_seed=None),
            ids,
            spec.sample.max_new_tokens,
            spec.model.context,
            spec.sample.temperature,
            spec.sample.top_k,
            seed=spec.train.seed + i,
            stop_token=data.tokenizer.eos_id,
        )
        out.append(prompt + data.tokenizer.decode(new[0].tolist()))
    return out


def unigram_bpb(train: LMDataset, validation: LMDataset, token_bytes: torch.Tensor, vocab: int) -> float:
    """Bits per byte of the best context-free model: train-set token frequencies (add-one smoothed)."""
    counts = np.bincount(np.asarray(train.token_file.tokens), minlength=vocab).astype(np.float64) + 1.0
    log_probs = np.log2(counts / counts.sum())
    held_out = np.asarray(validation.token_file.tokens)
    return float(-log_probs[held_out].sum() / token_bytes.numpy()[held_out].sum())


if __name__ == "__main__":
    main()
