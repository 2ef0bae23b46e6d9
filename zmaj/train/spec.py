"""Experiment specs: one YAML file = one experiment, validated by pydantic before anything runs.

``load(path, overrides)`` reads the YAML, applies ``--set a.b.c=value`` overrides (values parsed as YAML, so
``--set train.steps=10`` is an int) and validates the whole spec; any problem raises ``SpecError`` with a message
that names the offending field.
"""

from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from zmaj.data.config import DataConfig
from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig
from zmaj.text import read_text
from zmaj.train.muon import OptimizerConfig, check_groups, optimizer_kind
from zmaj.train.optim import AdamWConfig, ScheduleConfig
from zmaj.train.parallel import ParallelConfig
from zmaj.train.precision import DeviceChoice, Precision
from zmaj.train.trackers import TrackerName

T = TypeVar("T", bound=BaseModel)


class SpecError(ValueError):
    """A spec that cannot be used; the message names the field."""


OPTIMIZER_LAYOUT = ("train.optimizer.kind", "train.optimizer.groups")
"""What shapes the optimizer state a checkpoint holds: fields a resumed run may not change (``runs.read_spec``)."""


class LoopConfig(BaseModel):
    """What the training loop (``zmaj.train.loop``) reads of every training spec's ``train`` section."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    steps: int = Field(gt=0)
    optimizer: OptimizerConfig = Field(AdamWConfig(), description="kind: adamw (the default) or muon")
    schedule: ScheduleConfig = ScheduleConfig()
    precision: Precision = "auto"
    device: DeviceChoice = Field("auto", description="auto: CUDA where there is a GPU, else the CPU")
    parallel: ParallelConfig = Field(
        ParallelConfig(), description="the state's layout across the ranks of a torchrun job"
    )
    seed: int = 0
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(
        3, gt=0, description="newest checkpoints kept on disk; older ones are deleted as new ones are saved"
    )
    trackers: list[TrackerName] = Field(
        [], description="experiment trackers that get every metrics line and the spec (zmaj.train.trackers)"
    )
    tracker_project: str = Field(
        "zmaj", min_length=1, description="the trackers' project the run is logged in"
    )

    @model_validator(mode="after")
    def _trackers_once(self) -> "LoopConfig":
        if len(set(self.trackers)) != len(self.trackers):
            raise ValueError(f"train.trackers: each tracker once, got {self.trackers}")
        return self


class TrainConfig(LoopConfig):
    batch_size: int = Field(
        gt=0, description="rows per micro-batch, over all ranks together (each rank takes an equal share)"
    )
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    compile: bool = False
    eval_batches: int = Field(
        10, gt=0, description="validation batches per periodic eval (the final eval uses all)"
    )

    @model_validator(mode="after")
    def _compiles(self) -> "TrainConfig":
        if self.compile and self.parallel.kind == "fsdp":
            raise ValueError(
                "train.compile: not with train.parallel.kind=fsdp (the sharded forward frees and gathers again "
                "each block's storage, which torch.compile does not trace); compile data-parallel runs"
            )
        return self


class SampleConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    prompts: list[Annotated[str, Field(min_length=1)]] = ["def ", "import "]  # a model continues a token
    max_new_tokens: int = Field(48, ge=0)
    temperature: float = Field(0.8, ge=0)
    top_k: int | None = Field(50, gt=0)


class PretrainSpec(BaseModel):
    """Everything a pre-training run depends on; saved into the run folder so a run can be repeated."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    name: str
    model: GPTConfig
    data: DataConfig = DataConfig()
    train: TrainConfig
    sample: SampleConfig = SampleConfig()

    @model_validator(mode="after")
    def _model_fits_data(self) -> "PretrainSpec":
        if self.model.vocab_size != self.data.vocab_size:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) must equal data.vocab_size ({self.data.vocab_size})"
            )
        if self.model.context < self.data.seq_len:
            raise ValueError(
                f"model.context ({self.model.context}) is shorter than data.seq_len ({self.data.seq_len})"
            )
        check_groups(gpt.init(self.model, 0, device="meta"), self.train.optimizer)
        if self.train.compile and self.model.dropout > 0:
            raise ValueError(
                "train.compile: not with model.dropout above 0 (Inductor's backward of the chunked loss fails "
                "on dropout's mask: no storage); set model.dropout to 0 or train.compile to false"
            )
        return self


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.dropout=0.1"]`` applied to a nested dict (a new one; the input is untouched)."""
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(raw))
    for item in overrides:
        path, sep, value = item.partition("=")
        if not sep or not path:
            raise SpecError(f"--set expects key=value, got {item!r}")
        *parents, leaf = path.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {path}: {part!r} is not a section")
            node = child
        node[leaf] = read_yaml(value, f"--set {item}")
    return result


def read_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error is a :class:`SpecError` naming ``where`` and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{where}: not valid YAML ({' '.join(str(error).split())})") from None


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` arguments (``--set-task digits=3``) as a mapping, each value read as YAML."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{flag} expects key=value, got {item!r}")
        options[key] = read_yaml(value, f"{flag} {item}")
    return options


def parse(model: type[T], raw: object, where: str) -> T:
    """Validate ``raw`` as ``model``; errors name each bad field by its dotted path."""
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{dotted(e['loc'], raw)}: {e['msg']}" for e in error.errors())
        raise SpecError(f"{where}: {problems}") from None


def dotted(loc: tuple[int | str, ...], raw: object) -> str:
    """An error's location as the dotted path of the spec field: a tagged union (``train.optimizer``) puts its
    tag (``adamw``) into the location, which is no key of the spec, so a name the spec does not hold on the
    way to the field is left out (the last may be missing: a required field)."""
    parts: list[str] = []
    node = raw
    for index, part in enumerate(loc):
        if isinstance(node, dict) and index < len(loc) - 1:
            # The tag the union's discriminator read from this section (an optimizer without kind: adamw).
            tag = optimizer_kind(node) if parts[-1:] == ["optimizer"] else node.get("kind")
            if part not in node or part == tag:
                continue
        parts.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return ".".join(parts) or "(top level)"


def load(model: type[T], path: Path, overrides: list[str] | None = None) -> T:
    """Read, override and validate a YAML spec."""
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    raw = read_yaml(read_text(path), str(path))
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    return parse(model, apply_overrides(raw, overrides or []), str(path))
