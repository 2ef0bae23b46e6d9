"""Supervised fine-tuning: learn a model's answers in conversations, the loss on the assistant's tokens only.

    uv run programs/sft.py specs/finetune/sft-smollm2-arithmetic.yaml
    uv run programs/sft.py SPEC --set train.steps=100 --set lora.rank=16 --run-dir runs/sft
    uv run programs/sft.py --resume runs/sft

Each conversation is rendered with the chat template (the model's own, or the spec's ``chat_template``) and
its assistant turns are marked (``ModelTokenizer.encode_chat_with_mask``); every other token, and the padding,
has loss mask 0, so it contributes exactly nothing to the loss or the gradient. ``lora: null`` trains every
parameter; a ``lora`` section trains adapters only. The run folder is a model PATH: ``load_model(RUN_DIR)``
(and ``programs/evaluate.py --model RUN_DIR``) gives the fine-tuned model. Ctrl-C saves a checkpoint;
``--resume`` continues exactly. Bad input exits with status 2 and a one-line message. Under ``torchrun``,
``train.batch_size`` conversations per micro-batch are split over the ranks.
"""

from functools import partial

from loguru import logger
from tensordict import TensorDict

from zmaj.data.chat import load_conversations
from zmaj.models.common import Batch
from zmaj.train import finetune, loop, optim, precision, runs
from zmaj.train.finetune import SFTSpec, Start
from zmaj.train.runs import Run
from zmaj.train.step import apply_grads, train_step

Example = tuple[list[int], list[bool]]


def main() -> None:
    args = finetune.cli(__doc__).parse_args()
    with runs.bad_input_exits_2():
        finetune.import_modules(args.imports)
        frozen = (*finetune.FROZEN, "data", "max_len", "train.batch_size", "train.grad_accum")
        spec = finetune.read_spec(SFTSpec, args, frozen)
        parallel = runs.join(spec.train)
        spec = finetune.same_day(spec, parallel)
    with runs.bad_input_exits_2(parallel):
        parallel.check_divides(spec.train.batch_size, "train.batch_size")
        begin = finetune.start(spec, parallel.device, args.resume)
        examples = build_examples(spec, begin)
        params, begin = finetune.trainable(spec, begin, parallel, resuming=args.resume is not None)
        begin = finetune.frozen(spec, begin, precision.resolve(spec.train.precision, parallel.device))
        write = partial(finetune.write_run_files, spec, begin)
        run = runs.open_run(
            spec, args, parallel, write, data=lambda: {"data": finetune.fingerprint(examples)}, frozen=frozen
        )
    with run:
        logger.info(f"run folder {run.dir}; {len(examples)} conversations")
        train(run, begin, examples, params)


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


def train(run: Run[SFTSpec], begin: Start, examples: list[Example], params: TensorDict) -> None:
    spec, parallel = run.spec, run.parallel
    cfg = spec.train
    state = run.restore(params, cfg.optimizer)
    forward = parallel.forward(finetune.policy_forward(spec, begin), run.dtype)
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)

    def batches(index: int) -> list[Batch]:
        """This rank's share of each micro-batch: conversations drawn from shuffled epochs by position."""
        rows = cfg.batch_size * cfg.grad_accum
        chosen = finetune.draw(len(examples), cfg.seed, index * rows, rows)
        micro = [chosen[m : m + cfg.batch_size] for m in range(0, rows, cfg.batch_size)]
        return [finetune.masked_batch([examples[i] for i in parallel.rows(m)], run.device) for m in micro]

    step = partial(
        train_step,
        forward=forward,
        optimizer=cfg.optimizer,
        decay=decay,
        seed=cfg.seed,
        autocast=precision.autocast(run.dtype, run.device),
        parallel=parallel,
        # The loop never reads a state again once its step has run.
        update_fn=partial(apply_grads, donate=True),
    )

    loop.train(
        run,
        state,
        step,
        batches,
        evaluate=finetune.evaluator(spec, begin, parallel),
        panels=[("loss", "assistant loss (nats/token)"), ("eval_accuracy", "accuracy")],
    )


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main)
