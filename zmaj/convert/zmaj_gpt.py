"""A zmaj GPT that GPT-2 cannot express, as a Hugging Face folder with its own code (``model_type: zmaj_gpt``).

``transformers`` has no class for a GPT with rotary positions, RMSNorm, QK-norm, U-net skips, value embeddings
or a logit soft-cap, so such a GPT (the default pre-training spec's among them) is exported with the model's code
beside its weights, as the Hub's models with their own architectures are: ``remote/modeling_zmaj_gpt.py``, named
by ``config.json``'s ``auto_map`` and loaded by ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)``. The config holds ``GPTConfig``'s fields under their own names; the tensors are zmaj's,
each stacked one unbound into its layers (``blocks.0.attn.q.weight``, ``value_embeds.1.weight``). A GPT that
GPT-2 can express is still exported as ``GPT2LMHeadModel`` (``zmaj.convert.gpt2``), which needs no code.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj import specfile
from zmaj.convert.layers import stack_layers
from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig

MODEL_TYPE = "zmaj_gpt"
CODE = Path(__file__).parent / "remote" / "modeling_zmaj_gpt.py"
"""The model's code, copied into every folder of this type under its own name."""
ARCHITECTURE = "ZmajGPTForCausalLM"
AUTO_MAP = {
    "AutoConfig": f"{CODE.stem}.ZmajGPTConfig",
    "AutoModelForCausalLM": f"{CODE.stem}.{ARCHITECTURE}",
}
_STACKED = ("blocks", "value_embeds")
"""The parameters stacked along a leading axis in zmaj, one tensor per row in the folder."""
_LEFT_OUT = ("attention", "tie_embeddings", "unembed_init")
"""``GPTConfig`` fields the folder does not keep: how zmaj computes attention, ``tie_embeddings`` (written as
``transformers``' ``tie_word_embeddings``) and how an untied unembedding was initialised, which a trained one no
longer depends on."""


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` that ``remote/modeling_zmaj_gpt.py``'s ``ZmajGPTConfig`` reads."""
    fields = config.model_dump(exclude=set(_LEFT_OUT))
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": AUTO_MAP,
        **fields,
        "tie_word_embeddings": config.tie_embeddings,
    }


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> GPTConfig:
    """``config_to_hf`` read back. The fields ``transformers`` adds (``dtype``, ``use_cache``, the token ids...)
    are not ``GPTConfig``'s and are left; a value ``GPTConfig`` refuses is refused in one line naming ``where``
    and the field."""
    known = set(GPTConfig.model_fields) - set(_LEFT_OUT)
    fields = {key: value for key, value in hf.items() if key in known}
    fields["tie_embeddings"] = hf.get("tie_word_embeddings", True)
    return specfile.parse(GPTConfig, fields, where)


def params_to_hf(params: TensorDictBase) -> dict[str, Tensor]:
    """The folder's tensors by name: views into ``params``, the stacked ones unbound."""
    tensors: dict[str, Tensor] = {}
    for key, tensor in params.items(include_nested=True, leaves_only=True):
        assert isinstance(tensor, Tensor)
        if key[0] in _STACKED:
            rest = ".".join(key[1:])
            tensors |= {f"{key[0]}.{i}.{rest}": row for i, row in enumerate(tensor.unbind(0))}
        else:
            tensors[".".join(key)] = tensor
    return tensors


def params_from_hf(tensors: Mapping[str, Tensor], config: GPTConfig) -> TensorDict:
    """The parameters ``gpt.init(config)`` would build, read from the folder's tensors (names as written by
    ``params_to_hf``); a missing tensor, or one the config has no place for, is named."""

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise ValueError(f"zmaj_gpt checkpoint has no tensor {name!r}")
        return tensors[name]

    params = gpt.init(config, 0, device="meta")
    read = TensorDict({}, batch_size=[])
    for key, meta in params.items(include_nested=True, leaves_only=True):
        assert isinstance(meta, Tensor)
        if key[0] in _STACKED:
            rest, rows = ".".join(key[1:]), meta.shape[0]
            name = f"{key[0]}.{{i}}.{rest}"
            layers = (get(name.format(i=i)) for i in range(rows))
            read[key] = stack_layers(layers, rows, f"zmaj_gpt checkpoint tensors {name}")
        else:
            read[key] = get(".".join(key))
    extra = set(tensors) - set(params_to_hf(params))
    if extra:
        raise ValueError(f"zmaj_gpt checkpoint has tensors this config does not: {sorted(extra)}")
    for name in _STACKED:
        if name in params.keys():  # noqa: SIM118 (a TensorDict answers `in` only through keys())
            read[name].batch_size = torch.Size(params[name].batch_size)
    return read
