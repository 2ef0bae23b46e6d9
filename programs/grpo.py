"""GRPO with a task's verifiable reward: sample answers, score them with the checker, push the better ones up.

    uv run programs/grpo.py specs/finetune/grpo-smollm2-arithmetic.yaml --set model=runs/sft-smollm2-arithmetic \\
        --run-dir runs/grpo-smollm2-arithmetic
    uv run programs/grpo.py --resume runs/grpo-smollm2-arithmetic

Each step draws ``train.prompts_per_step`` problems of the task's train split (a pure function of the seed and the
step; under ``torchrun`` each rank samples for its share), samples ``grpo.group_size`` answers per question in the
chat template with the KV cache, scores them with the task's checker (one that raises or returns NaN stops the run
naming the sample), and makes ``train.passes`` clipped policy-gradient steps on that rollout (``zmaj.train.grpo``,
whose docstring says which log-probs the ratio and the KL penalty compare). Checkpoint folders are named by
optimizer step, ``passes`` times the GRPO step. Ctrl-C saves a checkpoint; ``--resume`` continues exactly.
"""

import time
from dataclasses import dataclass
from functools import partial

import torch
from loguru import logger
from tensordict import TensorDict, TensorDictBase

from zmaj.tasks import Problem, Reward, get_task
from zmaj.train import finetune, loop, optim, precision, runs
from zmaj.train.finetune import GRPOSpec, Start
from zmaj.train.grpo import TaskRewardError, grpo_step, sample_rollout, task_reward
from zmaj.train.runs import Run
from zmaj.train.step import Metrics


def main() -> None:
    args = finetune.cli(__doc__).parse_args()
    with runs.bad_input_exits_2():
        finetune.import_modules(args.imports)
        # Checkpoints count optimizer steps, passes per GRPO step: a resume may not change how many.
        frozen = (*finetune.FROZEN, "task", "train.prompts_per_step", "train.passes")
        spec = finetune.read_spec(GRPOSpec, args, frozen)
        parallel = runs.join(spec.train)
        spec = finetune.same_day(spec, parallel)
    with runs.bad_input_exits_2(parallel):
        parallel.check_divides(spec.train.prompts_per_step, "train.prompts_per_step")
        begin = finetune.start(spec, parallel.device, args.resume)
        params, begin = finetune.trainable(spec, begin, parallel, resuming=args.resume is not None)
        dtype = precision.resolve(spec.train.precision, parallel.device)
        begin = finetune.frozen(spec, begin, dtype)
        reference = finetune.reference_params(spec, begin, parallel.device, dtype)
        run = runs.open_run(
            spec,
            args,
            parallel,
            partial(finetune.write_run_files, spec, begin),
            data=partial(finetune.task_fingerprints, spec),
            frozen=frozen,
        )
    # A checker that fails on a sample fails on one rank: that rank says so.
    with run, runs.bad_input_exits_2(errors=(TaskRewardError,), every_rank=True):
        logger.info(f"run folder {run.dir}")
        train(run, begin, params, reference)


@dataclass(frozen=True)
class Prompts:
    """One GRPO step's problems on this rank and their prompt ids; ``longest``, the longest prompt of all ranks'
    problems, so that every rank refuses a step that would run past the context, not only the rank that has it."""

    index: int
    problems: list[Problem]
    ids: list[list[int]]
    longest: int


def train(run: Run[GRPOSpec], begin: Start, params: TensorDict, reference: TensorDictBase | None) -> None:
    spec, parallel = run.spec, run.parallel
    cfg = spec.train
    tokenizer = begin.model.tokenizer
    task = get_task(spec.task.name, **spec.task.options)
    config = spec.grpo.model_copy(
        update={"stop_tokens": tuple(sorted({*spec.grpo.stop_tokens, *tokenizer.stop_ids}))}
    )
    state = run.restore(params, cfg.optimizer)
    forward = precision.autocast_forward(finetune.policy_forward(spec, begin), run.dtype, run.device)
    reference_forward = precision.autocast_forward(begin.base_forward, run.dtype, run.device)
    step_fn = begin.model.architecture.cached(begin.model.config)
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)

    def batches(index: int) -> Prompts:
        """This rank's share of the step's problems, drawn from the task's train split by the step's seed."""
        problems = finetune.grpo_problems(spec, task, index)
        ids = [finetune.task_prompt(tokenizer, task, p, None, spec.task.system) for p in problems]
        return Prompts(index, list(parallel.rows(problems)), list(parallel.rows(ids)), max(map(len, ids)))

    def step(state: TensorDict, prompts: Prompts, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        scored: list[Reward] = []
        reward = task_reward(
            task, tokenizer, prompts.problems, f"step {prompts.index + 1}", scored, config.stop_tokens
        )
        where = f"step {prompts.index + 1}: grpo"
        finetune.fits_context(
            prompts.longest, config.max_new_tokens, begin.model.config.context, where, runs.RunFailedError
        )
        tick = time.perf_counter()
        rollout = sample_rollout(
            state["params"],
            prompts.ids,
            reward,
            forward=forward,
            step=step_fn,
            cache_shape=begin.model.config,
            config=config,
            seed=(cfg.seed * 1_000_003 + prompts.index) * parallel.size + parallel.rank,
            reference=reference,
            reference_forward=reference_forward,
            score_old=cfg.passes > 1,
            # Sampled in the training matmuls' dtype (bf16 under bf16 autocast: half the bytes per decode
            # step), LoRA's adapters merged in, so the sampler runs the plain architecture.
            sampler=finetune.full_params(spec, begin, state["params"], run.dtype),
        )
        sampled = torch.tensor(time.perf_counter() - tick)
        passes = []
        for _ in range(cfg.passes):
            state, metrics = grpo_step(
                state,
                rollout,
                forward=forward,
                config=config,
                optimizer=cfg.optimizer,
                lr=lr,
                decay=decay,
                parallel=parallel,
                donate=True,  # the rollout holds no parameters: it was sampled and scored before the passes
            )
            passes.append(metrics)
        answers = {
            "accuracy": torch.tensor(sum(r.correctness == 1.0 for r in scored) / len(scored)),
            "format_rate": torch.tensor(sum(r.format for r in scored) / len(scored)),
        }
        mean = {key: torch.stack([m[key] for m in passes]).mean() for key in passes[0]}
        return state, {**mean, **parallel.all_mean(answers), "rollout_seconds": sampled}

    loop.train(
        run,
        state,
        step,
        batches,
        evaluate=finetune.evaluator(spec, begin, parallel),
        panels=[
            ("reward", "mean reward"),
            ("accuracy", "train accuracy"),
            ("eval_accuracy", "held-out accuracy"),
            ("kl", "KL to reference"),
            ("completion_length", "answer length (tokens)"),
        ],
        show=("reward", "accuracy"),
        updates_per_step=cfg.passes,
    )


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main)
