"""Benchmark of a fine-tuning step: zmaj's SFT step, full and LoRA, against ``transformers`` under torch's AdamW.

A user fine-tuning SmolLM2 without zmaj loads ``LlamaForCausalLM`` and loops ``loss.backward()``, gradient
clipping and ``torch.optim.AdamW.step()``: that is the reference row. zmaj's rows are the step ``programs/sft.py``
runs (``train_step``, the update donated), on all parameters and on LoRA adapters (rank 16 on every attention
and MLP matrix). All take the same batch, random token rows whose second half is learned (an assistant's
answer: the loss mask), from the same weights (SmolLM2-135M-Instruct's GGUF, dequantised to fp32), with the same
AdamW settings and clipping; the first step's losses are checked to agree, so every row does the same work.
Rows are timed in turns, one step each per round, so that other work on the machine skews them alike; the
table gives each row's median. Run by hand:

    uv run python benchmarks/finetune_step.py                      # batch 8 x 256 tokens, fp32 and bf16
    uv run python benchmarks/finetune_step.py --batch 4 --seq 128 --rounds 3 --dtypes fp32

Writes ``benchmarks/results/finetune_step.md``. bf16 rows (autocast, as ``train.precision: bf16``) are skipped
where this CPU's bf16 matmuls are emulated (``common.usable_dtypes``).
"""

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import transformers
from common import DTYPES, dtype_names, markdown_table, print_header, synchronize, usable_dtypes
from tensordict import TensorDict

from zmaj.convert.load import load_model, resolve
from zmaj.models.common import Batch, LazyForward
from zmaj.models.lora import LoraConfig, init_adapters, lora_forward
from zmaj.train import precision
from zmaj.train.finetune import masked_batch
from zmaj.train.optim import AdamWConfig, decay_mask
from zmaj.train.step import apply_grads, bind_lazy, init_state, train_step

RESULTS = Path(__file__).parent / "results"
MODEL = "pypi:smollm2-135m-instruct"
OPTIMIZER = AdamWConfig(lr=1e-4, weight_decay=0.0, grad_clip=1.0)
LORA = LoraConfig(rank=16, alpha=32, targets=["attn.*", "mlp.*"])


@dataclass
class Runner:
    """One row: a step to time, the loss of its first step, and its timings."""

    name: str
    dtype: str
    step: Callable[[], float]
    first_loss: float = float("nan")
    seconds: list[float] = field(default_factory=list)


def rows_of(batch: int, seq: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[bool]]]:
    """``batch`` random rows of ``seq + 1`` tokens, the second half flagged to be learned."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    learn = [position > (seq + 1) // 2 for position in range(seq + 1)]
    return [(row.tolist(), learn) for row in tokens]


def zmaj_step(
    params: TensorDict, forward: LazyForward, dtype: torch.dtype, batch: Batch
) -> Callable[[], float]:
    """``programs/sft.py``'s step on ``params`` (all of the model's, or adapters) through ``forward``."""
    state = init_state(params, OPTIMIZER)
    step = partial(
        train_step,
        forward=forward,
        optimizer=OPTIMIZER,
        decay=decay_mask(params),
        seed=0,
        autocast=precision.autocast(dtype, torch.device("cpu")),
        update_fn=partial(apply_grads, donate=True),
    )

    def run() -> float:
        nonlocal state
        state, metrics = step(state, [batch], lr=OPTIMIZER.lr)
        return float(metrics["loss"])

    return run


def transformers_step(path: Path, dtype: torch.dtype, batch: Batch) -> Callable[[], float]:
    """The reference: ``LlamaForCausalLM`` in fp32 (autocast for bf16), labels -100 where nothing is learned,
    ``clip_grad_norm_`` and ``torch.optim.AdamW`` with its defaults for the rest (as a user would write it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=OPTIMIZER.lr, betas=OPTIMIZER.betas, eps=OPTIMIZER.eps, weight_decay=0.0
    )
    assert batch.targets is not None
    assert batch.loss_mask is not None
    # transformers shifts the labels itself: the input's row, its next tokens appended, -100 where not learned.
    input_ids = torch.cat([batch.tokens, batch.targets[:, -1:]], dim=1)
    labels = torch.cat([batch.tokens[:, :1], batch.targets.masked_fill(~batch.loss_mask, -100)], dim=1)
    labels[:, 0] = -100
    autocast = torch.autocast("cpu", dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def run() -> float:
        with autocast:
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIMIZER.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


def build(dtypes: list[str], batch: Batch) -> list[Runner]:
    path = resolve(MODEL)
    model = load_model(MODEL).to(torch.device("cpu"), torch.float32)
    forward = bind_lazy(model.architecture.lazy_forward, config=model.config)  # as Start.base_forward
    runners = []
    for name in dtypes:
        dtype = DTYPES[name]
        runners += [
            Runner("transformers + torch AdamW (full)", name, transformers_step(path, dtype, batch)),
            Runner("zmaj (full)", name, zmaj_step(model.params.clone(), forward, dtype, batch)),
            Runner(
                f"zmaj (LoRA rank {LORA.rank})",
                name,
                zmaj_step(  # the base as sft.py keeps it: its block matrices in the matmuls' dtype
                    init_adapters(model.params, LORA),
                    lora_forward(forward, precision.for_matmuls(model.params, dtype), LORA),
                    dtype,
                    batch,
                ),
            ),
        ]
    return runners


def measure(runners: list[Runner], rounds: int) -> None:
    for runner in runners:  # first step: the losses must agree; second: warm-up
        runner.first_loss = runner.step()
        runner.step()
    for _ in range(rounds):
        for runner in runners:
            synchronize("cpu")
            start = time.perf_counter()
            runner.step()
            runner.seconds.append(time.perf_counter() - start)


def table(runners: list[Runner], tokens: int) -> str:
    reference = {r.dtype: statistics.median(r.seconds) for r in runners if r.name.startswith("transformers")}
    rows = []
    for runner in runners:
        seconds = statistics.median(runner.seconds)
        rows.append(
            {
                "step": runner.name,
                "dtype": runner.dtype,
                "first loss": f"{runner.first_loss:.5f}",
                "ms (median)": f"{1000 * seconds:.0f}",
                "min-max ms": f"{1000 * min(runner.seconds):.0f}-{1000 * max(runner.seconds):.0f}",
                "tokens/s": f"{tokens / seconds:.0f}",
                "vs transformers": f"{reference[runner.dtype] / seconds:.2f}x",
            }
        )
    return markdown_table(rows, list(rows[0]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each row")
    parser.add_argument("--dtypes", type=dtype_names, default=["fp32", "bf16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    header = print_header("cpu")
    dtypes, notes = usable_dtypes(args.dtypes, torch.device("cpu"), "the fine-tuning step")
    batch = masked_batch(rows_of(args.batch, args.seq, vocab=49152))
    runners = build(dtypes, batch)
    measure(runners, args.rounds)
    for name in dtypes:
        losses = [r.first_loss for r in runners if r.dtype == name]
        tolerance = 1e-4 if name == "fp32" else 2e-2
        assert max(losses) - min(losses) <= tolerance * max(losses), f"{name}: first losses differ: {losses}"
    text = "\n\n".join(
        [
            "# Fine-tuning step: zmaj SFT vs transformers + torch AdamW",
            header,
            f"SmolLM2-135M-Instruct (fp32 weights), batch {args.batch} x {args.seq} tokens (the second half "
            f"learned), AdamW lr {OPTIMIZER.lr} with clipping at {OPTIMIZER.grad_clip}, {args.rounds} rounds "
            "after a warm-up step.",
            *notes,
            table(runners, args.batch * args.seq),
        ]
    )
    print(text.split("\n\n", 2)[2])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune_step.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
