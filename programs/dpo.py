"""DPO: learn from pairs of a preferred and a rejected answer, against the frozen starting model.

    uv run programs/dpo.py specs/finetune/dpo-smollm2-arithmetic.yaml --set model=runs/sft-smollm2-arithmetic
    uv run programs/dpo.py --resume runs/dpo-smollm2-arithmetic

Pairs come from jsonl files (``pairs: {kind: files, paths: [...]}``, one ``{"prompt", "chosen", "rejected"}``
object per line: the prompt is asked as a user message in the chat template, the answers are the assistant's
turn, end-of-turn marker included), or on-policy from a task's checker (``pairs: {kind: task, ...}``): ``k``
sampled answers per train problem from the starting model, the first right one preferred to the first wrong one
(generally: the first with the highest correctness to the first with the lowest, where they differ).
The pairs are made once and kept in the run folder (``pairs.jsonl``, token ids), so a resumed run reads the
same ones. The reference is the starting model, frozen (with LoRA: the base under its plain forward).
Ctrl-C saves a checkpoint; ``--resume`` continues exactly. Bad input exits with status 2 and a one-line message.
"""

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from loguru import logger
from tensordict import TensorDict

from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.models.common import Batch
from zmaj.tasks import get_task, score
from zmaj.train import checkpoint, finetune, loop, optim, runs
from zmaj.train.dpo import dpo_step, preference_batch
from zmaj.train.finetune import DPOSpec, PairFiles, PairsFromTask, Start
from zmaj.train.parallel import Parallel
from zmaj.train.runs import Run
from zmaj.train.step import Metrics, init_state

PAIRS_FILE = "pairs.jsonl"


@dataclass(frozen=True)
class Pair:
    """Token ids of a prompt and of its preferred and rejected answers."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def main() -> None:
    args = finetune.cli(__doc__).parse_args()
    with runs.bad_input_exits_2():
        finetune.import_modules(args.imports)
        spec = runs.read_spec(DPOSpec, args, finetune.FROZEN)
        parallel = runs.join(spec.train)
    with runs.bad_input_exits_2(parallel):
        parallel.check_divides(spec.train.batch_size, "train.batch_size")
        begin = finetune.start(spec, parallel.device)
        params = finetune.trainable(spec, begin)
        parallel.check_shardable(params)
        pairs = (
            read_pairs(args.resume / PAIRS_FILE)
            if args.resume is not None
            else rank_0_pairs(spec, begin, parallel)
        )
        if not pairs:
            raise ValueError(
                "pairs: no preference pair was found (on-policy: every problem's answers were all equally right)"
            )
        run = runs.open_run(spec, args, parallel, partial(write_run_files, spec, begin, pairs))
    with run:
        logger.info(f"run folder {run.dir}; {len(pairs)} preference pairs")
        train(run, begin, pairs, params)


def write_run_files(spec: DPOSpec, begin: Start, pairs: list[Pair], run_dir: Path) -> None:
    finetune.write_run_files(spec, begin, run_dir)
    write_pairs(run_dir / PAIRS_FILE, pairs)


def rank_0_pairs(spec: DPOSpec, begin: Start, parallel: Parallel) -> list[Pair]:
    """The pairs, made once by rank 0 (sampling on-policy pairs is the slow part) and sent to every rank."""
    made = [make_pairs(spec, begin) if parallel.main else None]
    if parallel.distributed:
        torch.distributed.broadcast_object_list(made, src=0)
    assert made[0] is not None
    return made[0]


def make_pairs(spec: DPOSpec, begin: Start) -> list[Pair]:
    source = spec.pairs
    if isinstance(source, PairFiles):
        return [
            fit(text_pair(begin.model.tokenizer, row, sample), spec.max_len, sample)
            for sample, row in file_rows(source)
        ]
    return [
        fit(pair, spec.max_len, f"on-policy pair {i}")
        for i, pair in enumerate(on_policy_pairs(source, begin))
    ]


def file_rows(source: PairFiles) -> list[tuple[str, dict[str, str]]]:
    """Each line's ``{"prompt", "chosen", "rejected"}`` strings, named ``file:line``; a bad one fails naming it."""
    rows = []
    for path in source.paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"pairs.paths: {path} not found")
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            sample = f"{path}:{number}"
            row = json.loads(line)
            if not isinstance(row, dict) or any(
                not isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")
            ):
                raise ValueError(f"bad pair at {sample}: need string fields prompt, chosen and rejected")
            rows.append((sample, row))
    return rows


def text_pair(tokenizer: ModelTokenizer, row: dict[str, str], sample: str) -> Pair:
    """The prompt as a user turn and each answer as the assistant's turn, split where the template starts it."""

    def split(answer: str) -> tuple[list[int], list[int]]:
        ids, mask = tokenizer.encode_chat_with_mask(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": answer}]
        )
        if not any(mask):
            raise ValueError(f"bad pair at {sample}: an answer renders to no assistant token")
        first, last = mask.index(True), len(mask) - 1 - mask[::-1].index(True)
        return ids[:first], ids[first : last + 1]

    (prompt, chosen), (prompt_again, rejected) = split(row["chosen"]), split(row["rejected"])
    if prompt != prompt_again:
        raise ValueError(f"bad pair at {sample}: the two answers change how the prompt is tokenized")
    return Pair(prompt, chosen, rejected)


def on_policy_pairs(source: PairsFromTask, begin: Start) -> list[Pair]:
    """``k`` samples per problem from the starting model; a right answer preferred to a wrong one (the most
    correct to the least, for a task whose correctness is not 0 or 1)."""
    task = get_task(source.task.name, **source.task.options)
    problems = task.problems("train", source.n_prompts, source.seed)
    tokenizer = begin.model.tokenizer
    prompts = [finetune.task_prompt(tokenizer, task, p, None, source.task.system) for p in problems]
    rows = [prompt for prompt in prompts for _ in range(source.k)]
    answers = finetune.sample_answers(
        begin.model, rows, source.max_new_tokens, source.batch_size, source.sampling, source.seed
    )
    rewards = score(
        task.reward, [p for p in problems for _ in range(source.k)], [tokenizer.decode(a) for a in answers]
    )
    pairs = []
    for index, prompt in enumerate(prompts):
        group = range(index * source.k, (index + 1) * source.k)
        best = max(group, key=lambda i: rewards[i].correctness)
        worst = min(group, key=lambda i: rewards[i].correctness)
        if rewards[best].correctness > rewards[worst].correctness:
            pairs.append(Pair(prompt, answers[best], answers[worst]))
    logger.info(f"{len(pairs)} of {len(prompts)} problems gave a right and a wrong answer")
    return pairs


def fit(pair: Pair, max_len: int, sample: str) -> Pair:
    """Answers cut so that prompt + answer is at most ``max_len + 1`` tokens (inputs and shifted targets)."""
    room = max_len + 1 - len(pair.prompt)
    if room < 1:
        raise ValueError(
            f"{sample}: the prompt alone has {len(pair.prompt)} tokens, more than max_len {max_len}"
        )
    return Pair(pair.prompt, pair.chosen[:room], pair.rejected[:room])


def write_pairs(path: Path, pairs: list[Pair]) -> None:
    """The pairs as token ids, written whole or not at all: ``--resume`` trains on exactly these."""
    checkpoint.atomic_write_text(path, "".join(json.dumps(pair.__dict__) + "\n" for pair in pairs))


def read_pairs(path: Path) -> list[Pair]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run's preference pairs cannot be read back")
    return [Pair(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def train(run: Run[DPOSpec], begin: Start, pairs: list[Pair], params: TensorDict) -> None:
    spec, parallel = run.spec, run.parallel
    cfg = spec.train
    state = run.restore(init_state(params))
    forward = parallel.forward(finetune.policy_forward(spec, begin))
    decay = optim.decay_mask(state["params"], cfg.optimizer.decay_norms_and_biases)

    def batches(index: int) -> Batch:
        """This rank's share of the step's pairs, drawn from shuffled epochs by position."""
        drawn = finetune.draw(len(pairs), cfg.seed, index * cfg.batch_size, cfg.batch_size)
        mine = [pairs[i] for i in parallel.rows(drawn)]
        return preference_batch(
            [p.prompt for p in mine], [p.chosen for p in mine], [p.rejected for p in mine], run.device
        )

    def step(state: TensorDict, batch: Batch, lr: float) -> tuple[TensorDict, Metrics]:
        return dpo_step(
            state,
            batch,
            forward=forward,
            reference=begin.model.params,
            beta=cfg.beta,
            optimizer=cfg.optimizer,
            lr=lr,
            decay=decay,
            reference_forward=begin.base_forward,
            seed=cfg.seed,
            parallel=parallel,
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
    main()
