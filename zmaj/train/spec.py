"""Experiment specs: one YAML file = one experiment, validated by pydantic before anything runs.

The training specs and the sections they share. :func:`load` reads one as ``zmaj.specfile.load`` does
(``--set a.b.c=value`` overrides, a ``SpecError`` naming the offending field), with error paths that know
``train.optimizer`` to be AdamW where it names no kind.
"""

from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from zmaj import specfile
from zmaj.data.config import DataConfig
from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig
from zmaj.specfile import RunName, Seed
from zmaj.train.muon import OptimizerConfig, check_groups, optimizer_kind
from zmaj.train.optim import AdamWConfig, ScheduleConfig
from zmaj.train.parallel import ParallelConfig
from zmaj.train.precision import DeviceChoice, Precision
from zmaj.train.trackers import TrackerName

T = TypeVar("T", bound=BaseModel)


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
    seed: Seed = 0
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

    name: RunName
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


def _tag(path: list[str], section: dict[str, Any]) -> object:
    """The tag of a training spec's section: ``train.optimizer`` is AdamW when it names no kind."""
    return optimizer_kind(section) if path[-1:] == ["optimizer"] else specfile.kind_tag(path, section)


def parse(model: type[T], raw: object, where: str) -> T:
    """``zmaj.specfile.parse`` for a training spec, whose optimizer's default kind the error paths know."""
    return specfile.parse(model, raw, where, _tag)


def load(model: type[T], path: Path, overrides: list[str] | None = None) -> T:
    """``zmaj.specfile.load`` for a training spec, whose optimizer's default kind the error paths know."""
    return specfile.load(model, path, overrides, _tag)
