"""Any zmaj model as a Hugging Face checkpoint folder, which ``transformers`` (``AutoModelForCausalLM``,
``AutoTokenizer``) and the tools built on its format load: the inverse of ``load_model`` on such a folder.

The folder holds what ``save_pretrained`` writes (https://huggingface.co/docs/transformers/main_classes/model):

- ``config.json``: the architecture and its shape, from ``zmaj.convert.hf.config_to_hf``;
- the weights in safetensors (https://huggingface.co/docs/safetensors), named by the same tables that loading
  reads: one ``model.safetensors``, or past ``max_shard_bytes`` shards ``model-0000i-of-0000n.safetensors`` and a
  ``model.safetensors.index.json`` mapping each tensor to its shard;
- ``tokenizer.json`` and ``tokenizer_config.json`` (``ModelTokenizer.save``);
- ``generation_config.json``: the BOS, EOS and PAD ids, with every stop token among the EOS ids, so that
  ``generate`` ends an answer where zmaj does;
- for a GPT that GPT-2 cannot express (rotary positions, RMSNorm, QK-norm, U-net skips...: the default
  pre-training spec's), ``modeling_zmaj_gpt.py``, the model's own code (``zmaj.convert.zmaj_gpt``), which
  ``transformers`` runs with ``trust_remote_code=True``.

Only exact exports are written: a setting that no ``transformers`` model computes the same way is refused with a
ValueError naming it, never approximated. The one loss is of form, not function: GPT-2 always has biases and a
learned position table, so a GPT without biases comes back with zero ones, and one with sinusoidal positions with
their table as learned positions (``zmaj.convert.gpt2``).
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import Tensor

from zmaj import fileio
from zmaj.convert import gpt2, hf, zmaj_gpt
from zmaj.convert.load import Pretrained, staged_folder
from zmaj.models.gpt import GPTConfig
from zmaj.progress import progress

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""transformers 4's default shard size ("5GB"; 5 moved it to 50GB): small enough for any download to resume."""
WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


def save_hf(model: Pretrained, folder: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``model`` as a Hugging Face folder, staged beside ``folder`` and renamed into place, so an interrupted
    save never leaves half a model; an existing ``folder`` is replaced. Raises ValueError, before writing any
    file (the empty staging folder is removed), for a model ``transformers`` cannot compute exactly."""
    folder = Path(folder)
    with staged_folder(folder) as staging:
        write_hf(model, staging, max_shard_bytes)
    return folder


def write_hf(model: Pretrained, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The files of :func:`save_hf`, written into the existing (staging) ``folder``; raises ValueError before
    writing any for a model ``transformers`` cannot compute exactly."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = hf.config_to_hf(model.config)
    tensors = hf.params_to_hf(model.params, model.config)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"parameters mix dtypes {sorted(map(str, dtypes))}; cast the model to one first")
    dtype = str(dtypes.pop()).removeprefix("torch.")
    _write_json(folder / "config.json", config | _token_ids(model) | {"dtype": dtype})
    _write_json(folder / "generation_config.json", _token_ids(model))
    _write_weights(tensors, folder, max_shard_bytes)
    model.tokenizer.save(folder)
    if config["model_type"] == zmaj_gpt.MODEL_TYPE:
        assert isinstance(model.config, GPTConfig)
        (folder / zmaj_gpt.CODE.name).write_bytes(zmaj_gpt.CODE.read_bytes())
        logger.info(
            f"{gpt2.inexpressible(model.config)}; written with zmaj's code for it ({zmaj_gpt.CODE.name}): "
            "load it with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)"
        )


def _token_ids(model: Pretrained) -> dict[str, Any]:
    """BOS, EOS and PAD ids as the tokenizer writes them into ``generation_config.json`` (EOS lists every stop
    token, EOS first, when there are several), each spelled out, null where the model has none."""
    unknown = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return unknown | model.tokenizer.generation_config()


def _write_weights(tensors: Mapping[str, Tensor], folder: Path, max_shard_bytes: int) -> None:
    """One safetensors file, or shards of at most ``max_shard_bytes`` (a larger tensor alone in its own) and an
    index, filled in the order of ``tensors`` as ``save_pretrained`` does."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    what = f"writing {total / 1e6:,.1f} MB of weights in {len(shards)} safetensors file(s)"
    with progress(None, total, what, unit="B", unit_scale=True) as bar:
        if len(shards) == 1:
            _write_shard(tensors, shards[0], folder / WEIGHTS_FILE)
            bar.update(total)
            return
        weight_map: dict[str, str] = {}
        for number, names in enumerate(shards, start=1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(tensors, names, folder / file)
            weight_map |= dict.fromkeys(names, file)
            bar.update(sum(tensors[name].numel() * tensors[name].element_size() for name in names))
    _write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_shard(tensors: Mapping[str, Tensor], names: list[str], path: Path) -> None:
    """Some of ``tensors`` in one file. A view (a layer of a stacked parameter) is copied, so that no two
    tensors of a file share memory, which safetensors refuses where they overlap; a tensor of its own is
    written as it is (copying it too held the whole model twice, with the default 5 GB shards)."""

    def own(tensor: Tensor) -> Tensor:
        view = tensor._is_view()  # asked first: a detached view no longer says it is one
        tensor = tensor.detach().cpu()
        return tensor.clone(memory_format=torch.contiguous_format) if view else tensor.contiguous()

    shard = {name: own(tensors[name]) for name in names}
    fileio.save_tensors(shard, path, metadata={"format": "pt"})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
