"""GPT-2 checkpoints (Hugging Face ``GPT2LMHeadModel``) to and from zmaj's GPT.

GPT-2 stores its linear maps as ``Conv1D`` with weights laid out ``[in, out]`` and fuses q, k and v into one
``c_attn``; zmaj keeps ``nn.Linear``'s ``[out, in]`` and separate projections. The table below is the whole
mapping: each row names a zmaj parameter, the checkpoint tensor it comes from and how to reshape it.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor

from zmaj.models.gpt import GPTConfig

Transform = Callable[[Tensor], Tensor]


def _transpose(t: Tensor) -> Tensor:
    return t.T.contiguous()


def _qkv_part(index: int, transpose: bool) -> Transform:
    def part(t: Tensor) -> Tensor:
        chunk = t.chunk(3, dim=-1)[index]
        return chunk.T.contiguous() if transpose else chunk.contiguous()

    return part


def _identity(t: Tensor) -> Tensor:
    return t


# (zmaj key, checkpoint name with {i} for the layer, transform); per-layer rows are stacked over layers.
LAYER_TABLE: list[tuple[str, str, Transform]] = [
    ("attn_norm.weight", "h.{i}.ln_1.weight", _identity),
    ("attn_norm.bias", "h.{i}.ln_1.bias", _identity),
    ("attn.q.weight", "h.{i}.attn.c_attn.weight", _qkv_part(0, transpose=True)),
    ("attn.k.weight", "h.{i}.attn.c_attn.weight", _qkv_part(1, transpose=True)),
    ("attn.v.weight", "h.{i}.attn.c_attn.weight", _qkv_part(2, transpose=True)),
    ("attn.q.bias", "h.{i}.attn.c_attn.bias", _qkv_part(0, transpose=False)),
    ("attn.k.bias", "h.{i}.attn.c_attn.bias", _qkv_part(1, transpose=False)),
    ("attn.v.bias", "h.{i}.attn.c_attn.bias", _qkv_part(2, transpose=False)),
    ("attn.o.weight", "h.{i}.attn.c_proj.weight", _transpose),
    ("attn.o.bias", "h.{i}.attn.c_proj.bias", _identity),
    ("mlp_norm.weight", "h.{i}.ln_2.weight", _identity),
    ("mlp_norm.bias", "h.{i}.ln_2.bias", _identity),
    ("mlp.up.weight", "h.{i}.mlp.c_fc.weight", _transpose),
    ("mlp.up.bias", "h.{i}.mlp.c_fc.bias", _identity),
    ("mlp.down.weight", "h.{i}.mlp.c_proj.weight", _transpose),
    ("mlp.down.bias", "h.{i}.mlp.c_proj.bias", _identity),
]
GLOBAL_TABLE: list[tuple[str, str, Transform]] = [
    ("embed.weight", "wte.weight", _identity),
    ("positions.weight", "wpe.weight", _identity),
    ("final_norm.weight", "ln_f.weight", _identity),
    ("final_norm.bias", "ln_f.bias", _identity),
]


def config_from_hf(hf: Mapping[str, Any]) -> GPTConfig:
    """A zmaj GPTConfig from a GPT-2 ``config.json``; GPT-2's choices (tanh GELU, LayerNorm, biases) are fixed."""
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported GPT-2 activation_function {hf['activation_function']!r}")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context=hf["n_positions"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def params_from_hf(state_dict: Mapping[str, Tensor], config: GPTConfig) -> TensorDict:
    """Convert a GPT-2 state dict (with or without the ``transformer.`` prefix) into zmaj GPT parameters."""
    tensors = {name.removeprefix("transformer."): t for name, t in state_dict.items()}

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise KeyError(f"GPT-2 checkpoint has no tensor {name!r}")
        return tensors[name]

    flat = {key: fn(get(name)) for key, name, fn in GLOBAL_TABLE}
    for key, name, fn in LAYER_TABLE:
        flat[f"blocks.{key}"] = torch.stack([fn(get(name.format(i=i))) for i in range(config.n_layers)])
    if not config.tie_embeddings:
        flat["unembed.weight"] = get("lm_head.weight")
    params = TensorDict.from_dict(_unflatten(flat), auto_batch_size=False)
    params["blocks"].batch_size = torch.Size([config.n_layers])
    return params


def _unflatten(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
