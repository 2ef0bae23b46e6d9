"""Specs: every shipped spec validates (pre-training ones also build their model); bad specs fail naming the field.

A spec's kind is its folder: ``specs/pretrain/`` holds pre-training specs, ``specs/finetune/`` fine-tuning ones,
whose file name starts with the algorithm (``sft-``, ``grpo-``, ``dpo-``)."""

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from zmaj.models import gpt
from zmaj.specfile import SpecError, apply_overrides, key_values, read_yaml
from zmaj.train.finetune import SPECS as FINETUNE_SPECS
from zmaj.train.spec import PretrainSpec, load

ROOT = Path(__file__).resolve().parents[3] / "specs"
SPECS = sorted((ROOT / "pretrain").rglob("*.yaml"))
FINETUNE = sorted((ROOT / "finetune").rglob("*.yaml"))
TINY = ROOT / "pretrain" / "stdlib-tiny.yaml"


def test_every_spec_is_in_a_known_folder() -> None:
    assert sorted(ROOT.rglob("*.yaml")) == sorted(SPECS + FINETUNE)


def test_specs_exist() -> None:
    assert any(path.name == "stdlib-tiny.yaml" for path in SPECS)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_spec_validates_and_builds_its_model_on_meta(path: Path) -> None:
    spec = load(PretrainSpec, path)
    params = gpt.init(spec.model, seed=0, device="meta")
    assert all(t.device == torch.device("meta") for t in params.values(True, True))


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.stem)
def test_every_finetune_spec_validates_as_its_kind(path: Path) -> None:
    kind = path.name.split("-")[0]
    assert kind in FINETUNE_SPECS, f"{path.name} does not start with one of {sorted(FINETUNE_SPECS)}"
    spec = load(FINETUNE_SPECS[kind], path)
    assert spec.name


def test_finetune_specs_cover_every_algorithm() -> None:
    assert {path.name.split("-")[0] for path in FINETUNE} == set(FINETUNE_SPECS)


def test_overrides_are_parsed_as_yaml_and_leave_the_input_alone() -> None:
    raw = {"train": {"steps": 5}, "model": {"d_model": 8}}
    out = apply_overrides(raw, ["train.steps=10", "model.dropout=0.1", "train.optimizer.lr=0.001"])
    assert out["train"] == {"steps": 10, "optimizer": {"lr": 0.001}}
    assert out["model"]["dropout"] == 0.1
    assert raw == {"train": {"steps": 5}, "model": {"d_model": 8}}
    # A null section is an empty one: sft.py's own example, --set lora.rank=16 over a spec's lora: null.
    assert apply_overrides({"lora": None}, ["lora.rank=16"]) == {"lora": {"rank": 16}}


def test_a_key_given_twice_is_refused_naming_its_line(tmp_path: Path) -> None:
    """PyYAML keeps the last: a second ``optimizer:`` under ``train:`` replaced Muon by a default AdamW."""
    shipped = TINY.read_text()
    spec = tmp_path / "twice.yaml"
    spec.write_text(shipped.replace("\ntrain:\n", "\ntrain:\n  optimizer: {lr: 1.0e-3}\n", 1))
    with pytest.raises(SpecError, match=r"key 'optimizer' given twice in one mapping.*line \d+"):
        load(PretrainSpec, spec)
    with pytest.raises(SpecError, match="key 'a' given twice"):
        apply_overrides({}, ["sample={a: 1, a: 2}"])
    # What YAML's safe loader took stays as it was: merge keys, and its own message for an unhashable key.
    assert read_yaml("a: &x {b: 1}\nc: {<<: *x, d: 2}", "x") == {"a": {"b": 1}, "c": {"b": 1, "d": 2}}
    with pytest.raises(SpecError, match="found unhashable key"):
        read_yaml("{[1]: 2}", "x")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        # The union's tag (adamw) is no key of the spec: it named train.optimizer.adamw, a Muon option's name.
        ("train.optimizer=null", "train.optimizer: Input should be a valid dictionary"),
        ("train.optimizer=muon", "train.optimizer: Input should be a valid dictionary"),
        # Lax validation read true as 1: a one-step run, a one-layer model.
        ("train.steps=yes", "train.steps: a boolean where a number goes"),
        ("model.n_layers=on", "model.n_layers: a boolean where a number goes"),
        ("train.optimizer.lr=true", "train.optimizer.lr: a boolean where a number goes"),
        ("train.optimizer.adamw.betas=[no, 0.95]", "train.optimizer.adamw.betas.0: a boolean where a number"),
        ("name=a/b", "name: Value error, 'a/b' names the run folder"),
        ("name=''", "name: Value error, '' names the run folder"),
    ],
)
def test_a_bad_spec_names_exactly_the_field(override: str, message: str) -> None:
    with pytest.raises(SpecError, match=f"^{re.escape(f'{TINY}: {message}')}"):
        load(PretrainSpec, TINY, [override])
    assert load(PretrainSpec, TINY, ["train.compile=true"]).train.compile  # a boolean where one goes

    class ModelOnly(BaseModel):  # as sample.py reads a run's spec: the other sections ignored, unvalidated
        model_config = ConfigDict(extra="ignore")
        model: gpt.GPTConfig

    assert load(ModelOnly, TINY, ["train.compile=true"]).model.n_layers == 4


@pytest.mark.parametrize(
    ("spec", "override", "message"),
    [
        # An unknown task was found only after the model had loaded; eval's options were named eval.digits.
        ("sft-tiny", "data.task=nope", "data.task: Value error, unknown task 'nope'"),
        ("sft-tiny", "data.options.digits=-3", "data.options.digits: Input should be greater than"),
        ("sft-tiny", "eval.options.digits=0", "eval.options.digits: Input should be greater than"),
        ("grpo-tiny", "task.options.digitz=2", "task.options.digitz: Extra inputs are not permitted"),
        ("grpo-tiny", "task.options.digits=on", "task.options.digits: a boolean where a number goes"),
        ("sft-tiny", "data.options.digits=yes", "data.options.digits: a boolean where a number goes"),
        # The union's tag and the field are both "task": both were left out, and options with them.
        (
            "dpo-tiny",
            "pairs.task.options.digits=0",
            "pairs.task.options.digits: Input should be greater than",
        ),
    ],
)
def test_a_tasks_options_are_checked_where_the_spec_holds_them(
    spec: str, override: str, message: str
) -> None:
    path = next(p for p in FINETUNE if p.stem == spec)
    with pytest.raises(SpecError, match=f"^{re.escape(f'{path}: {message}')}"):
        load(next(kind for name, kind in FINETUNE_SPECS.items() if spec.startswith(name)), path, [override])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=many", "train.steps"),
        ("model.d_model=250", "d_model"),
        ("model.vocab_size=100", "model.vocab_size"),
        ("data.seq_len=4096", "data.seq_len"),
        ("train.parallel={kind: zero}", "train.parallel.kind"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("train.device=tpu", "train.device"),
        ("sample.prompts=['def ', '']", "sample.prompts.1"),
        # numpy's generator takes 0 to 2**32 - 1, and refused others naming no field
        ("train.seed=-1", "train.seed"),
        ("train.seed=4294967296", "train.seed"),
    ],
)
def test_a_bad_spec_names_the_field(override: str, field: str) -> None:
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        load(PretrainSpec, TINY, [override])


def test_a_malformed_override_is_rejected() -> None:
    with pytest.raises(SpecError, match="key=value"):
        apply_overrides({}, ["train.steps"])


def test_malformed_yaml_is_a_spec_error_naming_where(tmp_path: Path) -> None:
    """A YAML syntax error in a spec file or a ``--set`` value is bad input like any other (yaml's own error is
    not a ValueError, so the programs printed a traceback)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64\ntrain: {}\n")
    with pytest.raises(SpecError, match=rf"^{re.escape(str(bad))}: not valid YAML \(.*line \d+"):
        load(PretrainSpec, bad)
    with pytest.raises(SpecError, match=r"^--set sample\.prompts=\[a: not valid YAML"):
        apply_overrides({}, ["sample.prompts=[a"])
    with pytest.raises(SpecError, match=r"^--set-task digits=\[3: not valid YAML"):
        key_values(["digits=[3"], "--set-task")
    assert key_values(["digits=3", "ops=[+, -]"], "--set-task") == {"digits": 3, "ops": ["+", "-"]}


def test_a_compiled_fully_sharded_run_is_refused() -> None:
    path = next(p for p in SPECS if p.name == "stdlib-gpt2-2019.yaml")
    with pytest.raises(SpecError, match=r"train\.compile: not with train\.parallel\.kind=fsdp"):
        load(PretrainSpec, path, ["train.compile=true", "train.parallel={kind: fsdp}"])
    with pytest.raises(SpecError, match=r"train\.compile: not with model\.dropout above 0"):
        load(PretrainSpec, path, ["train.compile=true", "model.dropout=0.1"])  # crashed at the first step
    with pytest.raises(SpecError, match=r"model\.init_std: Input should be a finite number"):
        load(PretrainSpec, path, ["model.init_std=.inf"])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: apply_overrides({}, ["=3"]), r"^--set expects key=value, got '=3'$"),
        (lambda: key_values(["=3"], "--set-task"), r"^--set-task expects key=value, got '=3'$"),
        # A value where a section goes: a TypeError traceback ('str' object does not support item assignment).
        (
            lambda: apply_overrides({"name": "x"}, ["name.sub=3"]),
            r"^--set name\.sub: 'name' is not a section$",
        ),
    ],
)
def test_an_override_without_a_key_or_into_a_value_is_refused_by_name(
    call: Callable[[], object], message: str
) -> None:
    """Without the checks, ``--set =3`` set a key named "" and ``--set name.sub=3`` was a TypeError traceback."""
    with pytest.raises(SpecError, match=message):
        call()


def test_a_spec_file_that_is_not_a_mapping_is_refused_by_name(tmp_path: Path) -> None:
    """A list at the top level with an override was an AttributeError ('list' object has no attribute 'get')."""
    spec = tmp_path / "list.yaml"
    spec.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match=r"list\.yaml: expected a mapping at the top level$"):
        load(PretrainSpec, spec, ["train.steps=1"])


@pytest.mark.parametrize("field", ["train.steps", "train.eval_every"])
def test_zero_steps_or_zero_eval_every_is_refused_naming_the_field(field: str) -> None:
    """A run of 0 steps trains nothing, and evaluating every 0 steps is ``step % 0`` in the loop, a
    ZeroDivisionError after the data is prepared: both are typos, refused by the spec naming the field."""
    with pytest.raises(SpecError, match=rf"{re.escape(field)}: Input should be greater than 0"):
        load(PretrainSpec, TINY, [f"{field}=0"])
    assert load(PretrainSpec, TINY, [f"{field}=1"])


def test_temperature_zero_is_greedy_sampling_and_accepted() -> None:
    """``zmaj.infer`` documents temperature 0 as greedy decoding: a spec asking for it must load."""
    assert load(PretrainSpec, TINY, ["sample.temperature=0"]).sample.temperature == 0
    with pytest.raises(SpecError, match=r"sample\.temperature: Input should be greater than or equal to 0"):
        load(PretrainSpec, TINY, ["sample.temperature=-0.5"])


def test_a_context_one_short_of_the_rows_is_refused_and_an_equal_one_accepted() -> None:
    """A row feeds ``data.seq_len`` tokens to the model (the one more is only a target), so a context of exactly
    ``seq_len`` fits and one of ``seq_len - 1`` does not: the context is the longest sequence the model takes (a learned
    position table has no row past it, an index error at the first step)."""
    with pytest.raises(SpecError, match=r"model\.context \(255\) is shorter than data\.seq_len \(256\)"):
        load(PretrainSpec, TINY, ["model.context=255", "data.seq_len=256"])
    spec = load(PretrainSpec, TINY, ["model.context=256", "data.seq_len=256"])
    assert spec.model.context == spec.data.seq_len == 256
