"""Supervised fine-tuning: learn a model's answers in conversations, the loss on the assistant's tokens only.

    uv run programs/sft.py specs/finetune/sft-smollm2-arithmetic.yaml
    uv run programs/sft.py SPEC --set train.steps=100 --set lora.rank=16 --run-dir runs/sft
    uv run programs/sft.py --resume runs/sft

Each conversation is rendered with the chat template (the model's own, or the spec's ``chat_template``) and
its assistant turns are marked (``ModelTokenizer.encode_chat_with_mask``); every other token, and the padding,
has loss mask 0, so it contributes exactly nothing to the loss or the gradient. ``lora: null`` trains every
parameter; a ``lora`` section trains adapters only. The run folder is a model PATH: ``load_model(RUN_DIR)``
(and ``programs/evaluate.py --model RUN_DIR``) gives the fine-tuned model. Ctrl-C saves a checkpoint;
``--resume`` continues exactly. Bad input exits with status 2 and a one-line message.
"""

import sys
import time
from pathlib import Path

from loguru import logger
from tensordict import TensorDict
from tqdm import tqdm

from zmaj.data.chat import load_conversations
from zmaj.train import finetune, optim, precision, report
from zmaj.train.finetune import SFTSpec, Start
from zmaj.train.spec import SpecError
from zmaj.train.step import init_state, train_step

Example = tuple[list[int], list[bool]]


def main() -> None:
    args = finetune.cli(__doc__).parse_args()
    device = precision.default_device()
    try:
        finetune.import_modules(args.imports)
        spec, resume = finetune.resolve_run(SFTSpec, args.spec, args.overrides, args.resume)
        finetune.seed_everything(spec.train.seed)
        begin = finetune.start(spec, device)
        examples = build_examples(spec, begin)
        params = finetune.trainable(spec, begin)
        run_dir = resume or finetune.new_run(spec, begin, args.run_dir)
    except (SpecError, FileNotFoundError, ValueError) as error:
        logger.error(finetune.one_line(error))
        sys.exit(2)
    logger.add(run_dir / "log.txt")
    logger.info(f"run folder {run_dir}; {len(examples)} conversations")
    train(spec, begin, examples, params, run_dir, resume is not None, args.stop_after)


def build_examples(spec: SFTSpec, begin: Start) -> list[Example]:
    """Every conversation as (ids, assistant mask); the first that teaches nothing fails, naming it."""
    conversations = load_conversations(spec.data)
    return [
        finetune.sft_example(
            begin.model.tokenizer,
            [m.model_dump() for m in conversation.messages],
            spec.max_len,
            f"conversation {index} of data",
        )
        for index, conversation in enumerate(conversations)
    ]


def train(
    spec: SFTSpec,
    begin: Start,
    examples: list[Example],
    params: TensorDict,
    run_dir: Path,
    resume: bool,
    stop_after: int | None,
) -> None:
    cfg = spec.train
    device = precision.default_device()
    dtype = precision.resolve(cfg.precision, device)
    autocast = precision.autocast(dtype, device)
    started = time.perf_counter()
    report.record_session(run_dir, "start", device)
    state = finetune.restore(run_dir, params, device) if resume else init_state(params)
    forward = finetune.policy_forward(spec, begin)
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)
    metrics_path = run_dir / "metrics.jsonl"
    interrupt = finetune.Interrupt()
    rows_per_step = cfg.batch_size * cfg.grad_accum

    def save() -> None:
        logger.info(f"saved {finetune.save_checkpoint(run_dir, state, spec)}")

    def evaluate(step: int) -> None:
        finetune.record_eval(spec, begin, state["params"], metrics_path, step)

    first_step = int(state["opt", "step"])
    if first_step == 0:
        evaluate(0)
    bar = tqdm(range(first_step, cfg.steps), initial=first_step, total=cfg.steps, desc=spec.name, unit="step")
    for step in bar:
        lr = optim.learning_rate(step, cfg.steps, cfg.optimizer.lr, cfg.schedule)
        chosen = finetune.draw(len(examples), cfg.seed, step * rows_per_step, rows_per_step)
        micro = [
            finetune.masked_batch([examples[i] for i in chosen[m : m + cfg.batch_size]], device)
            for m in range(0, rows_per_step, cfg.batch_size)
        ]
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
        )
        loss = float(metrics["loss"])
        tokens = int(metrics["tokens"])
        record = {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(metrics["grad_norm"]),
            "assistant_tokens": tokens,
            "tokens_per_s": tokens / (time.perf_counter() - tick),
        }
        report.append_jsonl(metrics_path, record)
        bar.set_postfix(loss=f"{loss:.3f}")
        if finetune.after_step(
            step + 1, first_step, cfg, loss, stop_after, interrupt, save, evaluate, run_dir, device
        ):
            return
    bar.close()
    save()
    evaluate(cfg.steps)
    finetune.plot_curves(
        metrics_path,
        run_dir / "curves.png",
        [("loss", "assistant loss (nats/token)"), ("eval_accuracy", "accuracy")],
    )
    report.record_session(run_dir, "end", device)
    logger.info(f"done in {time.perf_counter() - started:.0f}s; run folder {run_dir}")


if __name__ == "__main__":
    main()
