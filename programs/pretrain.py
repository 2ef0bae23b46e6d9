"""Pre-train a GPT from scratch: load spec -> prepare data -> build state -> loop train steps -> save.

    uv run programs/pretrain.py                                   # specs/pretrain/stdlib-tiny.yaml
    uv run programs/pretrain.py SPEC --set train.steps=100 --set model.dropout=0.1
    uv run programs/pretrain.py --resume runs/stdlib-tiny-20261126-101500

Ctrl-C saves a checkpoint and exits cleanly; ``--resume`` continues exactly where the run stopped.
"""

import argparse
import math
import os
import random
import signal
import sys
import time
from functools import partial
from pathlib import Path
from types import FrameType

import numpy as np
import torch
import yaml
from loguru import logger
from tensordict import TensorDictBase
from torch.utils.data import DataLoader
from tqdm import tqdm

from zmaj.data.dataset import LMDataset, ResumableSampler, collate
from zmaj.data.pipeline import prepare
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer.sample import sample
from zmaj.models import gpt
from zmaj.train import checkpoint, optim, precision, report
from zmaj.train.spec import PretrainSpec, SpecError, load, parse
from zmaj.train.step import (
    Forward,
    Metrics,
    UpdateFn,
    accumulate_grads,
    apply_grads,
    bind,
    deterministic,
    eval_step,
    init_state,
    pooled_eval,
    train_step,
)

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "specs" / "pretrain" / "stdlib-tiny.yaml"


def main() -> None:
    args = parse_args()
    try:
        spec, run_dir, resume = resolve_run(args)
    except (SpecError, FileNotFoundError) as error:
        logger.error(str(error))
        sys.exit(2)
    logger.add(run_dir / "log.txt")
    logger.info(f"run folder {run_dir}")
    train(spec, run_dir, resume, Path(args.cache_dir), args.stop_after)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "spec", nargs="?", type=Path, default=DEFAULT_SPEC, help="YAML spec (default: %(default)s)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint"
    )
    parser.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/NAME-TIMESTAMP)")
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="N",
        help="run at most N steps now, then checkpoint and exit (resumable)",
    )
    default_cache = os.environ.get("ZMAJ_CACHE", str(Path.home() / ".cache" / "zmaj"))
    parser.add_argument(
        "--cache-dir", default=default_cache, help="tokenizers and token files (default: %(default)s)"
    )
    return parser.parse_args()


def check_backend(spec: PretrainSpec) -> None:
    """Fail before any work when the attention backend cannot train on this device."""
    if spec.model.attention == "flex" and precision.default_device().type == "cpu":
        raise SpecError(
            "model.attention: flex-attention has no backward pass on the CPU; use sdpa (or eager) here"
        )


def resolve_run(args: argparse.Namespace) -> tuple[PretrainSpec, Path, bool]:
    """The spec to run and the folder to write to; a resumed run re-reads its own spec."""
    if args.resume is None:
        spec = load(PretrainSpec, args.spec, args.overrides)
        check_backend(spec)
        run_dir = args.run_dir or Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (run_dir / checkpoint.CHECKPOINTS).exists():
            raise SpecError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(run_dir / "spec.yaml", yaml.safe_dump(spec.model_dump(mode="json")))
        return spec, run_dir, False
    run_dir = args.resume
    saved = run_dir / "spec.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no spec.yaml there, so it is not a zmaj run folder")
    spec = load(PretrainSpec, saved, args.overrides)
    check_backend(spec)
    original = parse(PretrainSpec, yaml.safe_load(saved.read_text()), str(saved))
    if spec.model != original.model:
        raise SpecError(
            f"--resume {run_dir}: the model config differs from the checkpoint's; --set cannot change it"
        )
    checkpoint.latest(run_dir)  # fails early, with the path, when there is nothing to resume
    return spec, run_dir, True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(
    forward: Forward,
    params: TensorDictBase,
    dataset: LMDataset,
    batch_size: int,
    max_batches: int | None,
    token_bytes: torch.Tensor,
    device: torch.device,
    autocast_dtype: torch.dtype,
) -> dict[str, float]:
    """Validation loss and bits per byte over the first ``max_batches`` batches (all of them when None)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    metrics: list[Metrics] = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        metrics.append(
            eval_step(
                params, batch.to(device), forward, token_bytes, precision.autocast(autocast_dtype, device)
            )
        )
    return pooled_eval(metrics)


def samples(
    forward: Forward, params: TensorDictBase, tokenizer: Tokenizer, spec: PretrainSpec, device: torch.device
) -> list[str]:
    out = []
    for i, prompt in enumerate(spec.sample.prompts):
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        new = sample(
            lambda b: forward(params, b, dropout_seed=None),
            ids,
            spec.sample.max_new_tokens,
            spec.model.context,
            spec.sample.temperature,
            spec.sample.top_k,
            seed=spec.train.seed + i,
            stop_token=tokenizer.eos_id,
        )
        out.append(prompt + tokenizer.decode(new[0].tolist()))
    return out


def unigram_bpb(train: LMDataset, validation: LMDataset, token_bytes: torch.Tensor, vocab: int) -> float:
    """Bits per byte of the best context-free model: train-set token frequencies (add-one smoothed)."""
    counts = np.bincount(np.asarray(train.token_file.tokens), minlength=vocab).astype(np.float64) + 1.0
    log_probs = np.log2(counts / counts.sum())
    held_out = np.asarray(validation.token_file.tokens)
    return float(-log_probs[held_out].sum() / token_bytes.numpy()[held_out].sum())


def train(spec: PretrainSpec, run_dir: Path, resume: bool, cache_dir: Path, stop_after: int | None) -> None:
    cfg = spec.train
    seed_everything(cfg.seed)
    device = precision.default_device()
    dtype = precision.resolve(cfg.precision, device)
    started = time.perf_counter()
    report.record_session(run_dir, "start", device)

    data = prepare(spec.data, cache_dir, cfg.seed)
    tokenizer = data.tokenizer
    if tokenizer.vocab_size != spec.model.vocab_size:
        raise SpecError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {spec.model.vocab_size}"
        )
    tokenizer.save(run_dir / "tokenizer.json")
    token_bytes = tokenizer.token_bytes()
    logger.info(
        f"data ready in {time.perf_counter() - started:.0f}s: {len(data.train)} train rows, "
        f"{len(data.validation)} validation rows of {spec.data.seq_len} tokens"
    )

    state = init_state(gpt.init(spec.model, cfg.seed, device=device))
    position = 0
    if resume:
        latest = checkpoint.latest(run_dir)
        state = checkpoint.load_state(latest, state).to(device)
        position = int(checkpoint.load_meta(latest)["data_position"])
        logger.info(f"resumed from {latest} (step {int(state['opt', 'step'])})")
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)
    forward = bind(gpt.forward, config=spec.model)
    grad_fn = deterministic(torch.compile(accumulate_grads)) if cfg.compile else accumulate_grads
    # The loop never reads a state again once its step has run, so the update may write into it (donate).
    update: UpdateFn = partial(apply_grads, donate=True)
    update_fn = torch.compile(update, fullgraph=True) if cfg.compile else update
    autocast = precision.autocast(dtype, device)

    n_params = sum(t.numel() for t in state["params"].values(True, True))
    flops_per_token = report.gpt_flops_per_token(spec.model, spec.data.seq_len)
    peak = report.measure_matmul_peak(dtype, device)
    baseline = unigram_bpb(data.train, data.validation, token_bytes, tokenizer.vocab_size)
    logger.info(
        f"{n_params / 1e6:.2f}M parameters, {dtype} on {device}, matmul peak {peak:.0f} GFLOP/s, "
        f"unigram baseline {baseline:.3f} bits per byte"
    )

    metrics_path = run_dir / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * cfg.grad_accum * spec.data.seq_len
    interrupted = False

    def on_interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True
        logger.warning("interrupted: finishing this step, then saving a checkpoint")

    signal.signal(signal.SIGINT, on_interrupt)

    def save() -> None:
        meta = {"data_position": position, "seed": cfg.seed, "spec": spec.model_dump(mode="json")}
        path = checkpoint.save(run_dir, state, meta)
        logger.info(f"saved {path}")

    def periodic_eval(step: int, max_batches: int | None) -> dict[str, float]:
        # No activations are kept for a backward pass, so evaluation affords 4x larger batches.
        result = evaluate(
            forward,
            state["params"],
            data.validation,
            4 * cfg.batch_size,
            max_batches,
            token_bytes,
            device,
            dtype,
        )
        report.append_jsonl(metrics_path, {"step": step, **result})
        for text in samples(forward, state["params"], tokenizer, spec, device):
            logger.info(f"sample at step {step}: {text!r}")
        return result

    loader = DataLoader(
        data.train,
        batch_size=cfg.batch_size,
        sampler=ResumableSampler(len(data.train), position),
        collate_fn=collate,
    )
    batches = iter(loader)
    first_step = int(state["opt", "step"])
    bar = tqdm(range(first_step, cfg.steps), initial=first_step, total=cfg.steps, desc=spec.name, unit="step")
    for step in bar:
        lr = optim.learning_rate(step, cfg.steps, cfg.optimizer.lr, cfg.schedule)
        micro = [next(batches).to(device) for _ in range(cfg.grad_accum)]
        position += cfg.batch_size * cfg.grad_accum
        tick = time.perf_counter()
        state, metrics = train_step(
            state,
            micro,
            forward=forward,
            optimizer=cfg.optimizer,
            lr=lr,
            decay=decay,
            seed=cfg.seed,
            autocast=autocast,
            grad_fn=grad_fn,
            update_fn=update_fn,
        )
        loss = float(metrics["loss"])  # also waits for the step to finish, so the timing below is honest
        seconds = time.perf_counter() - tick
        tokens_per_s = tokens_per_step / seconds
        record = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / (peak * 1e9),
        }
        report.append_jsonl(metrics_path, record)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
        if not math.isfinite(loss):
            save()
            raise FloatingPointError(
                f"loss became {loss} at step {step + 1}; checkpoint saved for inspection"
            )
        if interrupted or (
            stop_after is not None and step + 1 - first_step >= stop_after and step + 1 < cfg.steps
        ):
            save()
            report.record_session(run_dir, "end", device)
            logger.info(f"stopped at step {step + 1}; continue with --resume {run_dir}")
            return
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            result = periodic_eval(step + 1, cfg.eval_batches)
            logger.info(
                f"step {step + 1}: val loss {result['val_loss']:.3f}, {result['val_bpb']:.3f} bits per byte"
            )
        if (step + 1) % cfg.checkpoint_every == 0:
            save()
    bar.close()

    save()
    final = periodic_eval(cfg.steps, None)
    report.plot_losses(metrics_path, run_dir / "loss.png")
    summary = {
        "step": cfg.steps,
        "final": True,
        **final,
        "unigram_bpb": baseline,
        "wall_s": time.perf_counter() - started,
    }
    report.append_jsonl(metrics_path, summary)
    report.record_session(run_dir, "end", device)
    logger.info(
        f"done in {summary['wall_s']:.0f}s: held-out {final['val_bpb']:.3f} bits per byte "
        f"(unigram baseline {baseline:.3f}), val loss {final['val_loss']:.3f}; run folder {run_dir}"
    )


if __name__ == "__main__":
    main()
