"""DPO: learn from pairs of a preferred and a rejected answer, against the frozen starting model.

    uv run programs/dpo.py specs/finetune/dpo-smollm2-arithmetic.yaml --set model=runs/sft-smollm2-arithmetic \\
        --run-dir runs/dpo-smollm2-arithmetic
    uv run programs/dpo.py --resume runs/dpo-smollm2-arithmetic

Pairs come from jsonl files or on-policy from a task's checker (``zmaj.train.pairs``); they are made once (by
rank 0 under ``torchrun``) and kept in the run folder (``pairs.jsonl``, token ids), so a resumed run reads the
same ones. The reference is the starting model, frozen (with LoRA: the base under its plain forward).
Ctrl-C saves a checkpoint; ``--resume`` continues exactly. Bad input exits with status 2 and a one-line message.
"""

from functools import partial
from pathlib import Path

from loguru import logger
from tensordict import TensorDict

from zmaj.models.common import Batch
from zmaj.train import finetune, loop, optim, precision, runs
from zmaj.train.dpo import dpo_step, preference_batch
from zmaj.train.finetune import DPOSpec, Start
from zmaj.train.pairs import PAIRS_FILE, Pair, make_pairs, read_pairs, write_pairs
from zmaj.train.runs import Run


def main() -> None:
    args = finetune.cli(__doc__).parse_args()
    with runs.bad_input_exits_2():
        finetune.import_modules(args.imports)
        # The run keeps its pairs (pairs.jsonl): a resume may not change what they were made from.
        frozen = (*finetune.FROZEN, "pairs", "max_len", "train.batch_size")
        spec = finetune.read_spec(DPOSpec, args, frozen)
        parallel = runs.join(spec.train)
        spec = finetune.same_day(spec, parallel)
    with runs.bad_input_exits_2(parallel):
        parallel.check_divides(spec.train.batch_size, "train.batch_size")
        begin = finetune.start(spec, parallel.device, args.resume)
        params, begin = finetune.trainable(spec, begin, parallel, resuming=args.resume is not None)
        if args.resume is not None:
            pairs = read_pairs(args.resume / PAIRS_FILE, begin.model.config.vocab_size)
        else:  # made once, by rank 0 (sampling on-policy pairs is slow), and sent to every rank
            parallel.check_on_rank_0(lambda: runs.check_run_folder(args))  # said before the sampling
            pairs = parallel.from_rank_0(lambda: make_pairs(spec, begin))
        # The pairs are sampled from the whole model in float32; from here on it is only read, its matrices by
        # the matmuls (stored in their precision), and fully sharded, each rank keeps its share.
        dtype = precision.resolve(spec.train.precision, parallel.device)
        reference, begin = finetune.sharded_reference(begin, parallel, dtype)
        run = runs.open_run(spec, args, parallel, partial(write_run_files, spec, begin, pairs), frozen=frozen)
    with run:
        logger.info(f"run folder {run.dir}; {len(pairs)} preference pairs")
        train(run, begin, pairs, params, reference)


def write_run_files(spec: DPOSpec, begin: Start, pairs: list[Pair], run_dir: Path) -> None:
    finetune.write_run_files(spec, begin, run_dir)
    write_pairs(run_dir / PAIRS_FILE, pairs)


def train(
    run: Run[DPOSpec], begin: Start, pairs: list[Pair], params: TensorDict, reference: TensorDict
) -> None:
    spec, parallel = run.spec, run.parallel
    cfg = spec.train
    state = run.restore(params, cfg.optimizer)
    policy = parallel.forward(finetune.policy_forward(spec, begin), run.dtype)
    forward = precision.autocast_forward(policy, run.dtype, run.device)  # train.precision, as SFT and GRPO
    reference_forward = precision.autocast_forward(
        parallel.forward(begin.base_forward, run.dtype), run.dtype, run.device
    )
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)

    def batches(index: int) -> Batch:
        """This rank's share of the step's pairs, drawn from shuffled epochs by position."""
        drawn = finetune.draw(len(pairs), cfg.seed, index * cfg.batch_size, cfg.batch_size)
        mine = [pairs[i] for i in parallel.rows(drawn)]
        return preference_batch(
            [p.prompt for p in mine], [p.chosen for p in mine], [p.rejected for p in mine], run.device
        )

    step = partial(
        dpo_step,
        forward=forward,
        reference=reference,
        beta=cfg.beta,
        optimizer=cfg.optimizer,
        decay=decay,
        reference_forward=reference_forward,
        parallel=parallel,
        donate=True,  # the loop never reads a state again once its step has run
    )

    loop.train(
        run,
        state,
        step,
        batches,
        evaluate=finetune.evaluator(spec, begin, parallel),
        panels=[
            ("loss", "DPO loss"),
            ("reward_margin", "implied reward margin"),
            ("accuracy", "pairs ranked right"),
            ("eval_accuracy", "held-out accuracy"),
        ],
        show=("loss", "reward_margin"),
    )


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main)
