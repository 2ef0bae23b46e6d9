"""GPT-2 checkpoints (Hugging Face ``GPT2LMHeadModel``) to and from zmaj's GPT.

GPT-2 stores its linear maps as ``Conv1D`` with weights laid out ``[in, out]`` and fuses q, k and v into one
``c_attn``; zmaj keeps ``nn.Linear``'s ``[out, in]`` and separate projections. The table below is the whole
mapping: each row names a zmaj parameter, the checkpoint tensor it comes from and where in that tensor it sits
(a :class:`Layout`), which is enough to go either way.

GPT-2 always has biases and a learned position table, so a zmaj GPT without biases is written with zero ones and
one with sinusoidal positions with their fixed table: the same function, exactly, read back as a biased GPT with
learned positions.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.convert.layers import stack_layers
from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig
from zmaj.nn.layers import Activation, sinusoidal_positions


@dataclass(frozen=True)
class Layout:
    """Where a zmaj tensor sits in a checkpoint tensor: part ``part`` of ``parts`` equal slices of its last axis,
    stored transposed (``Conv1D``'s ``[in, out]``) or not."""

    transpose: bool = False
    part: int = 0
    parts: int = 1

    def read(self, stored: Tensor) -> Tensor:
        """The zmaj tensor, from the checkpoint tensor."""
        chunk = stored.chunk(self.parts, dim=-1)[self.part]
        return (chunk.T if self.transpose else chunk).contiguous()

    def write(self, pieces: Mapping[int, Tensor]) -> Tensor:
        """The checkpoint tensor, from the zmaj tensors of all its parts (by part): ``read``'s inverse."""
        assert sorted(pieces) == list(range(self.parts)), f"parts {sorted(pieces)} of {self.parts}"
        return torch.cat([pieces[i].T if self.transpose else pieces[i] for i in range(self.parts)], dim=-1)


PLAIN, CONV1D = Layout(), Layout(transpose=True)


def _qkv(part: int, transpose: bool) -> Layout:
    return Layout(transpose=transpose, part=part, parts=3)


# (zmaj key, checkpoint name with {i} for the layer, layout); per-layer rows are stacked over layers.
LAYER_TABLE: list[tuple[str, str, Layout]] = [
    ("attn_norm.weight", "h.{i}.ln_1.weight", PLAIN),
    ("attn_norm.bias", "h.{i}.ln_1.bias", PLAIN),
    ("attn.q.weight", "h.{i}.attn.c_attn.weight", _qkv(0, transpose=True)),
    ("attn.k.weight", "h.{i}.attn.c_attn.weight", _qkv(1, transpose=True)),
    ("attn.v.weight", "h.{i}.attn.c_attn.weight", _qkv(2, transpose=True)),
    ("attn.q.bias", "h.{i}.attn.c_attn.bias", _qkv(0, transpose=False)),
    ("attn.k.bias", "h.{i}.attn.c_attn.bias", _qkv(1, transpose=False)),
    ("attn.v.bias", "h.{i}.attn.c_attn.bias", _qkv(2, transpose=False)),
    ("attn.o.weight", "h.{i}.attn.c_proj.weight", CONV1D),
    ("attn.o.bias", "h.{i}.attn.c_proj.bias", PLAIN),
    ("mlp_norm.weight", "h.{i}.ln_2.weight", PLAIN),
    ("mlp_norm.bias", "h.{i}.ln_2.bias", PLAIN),
    ("mlp.up.weight", "h.{i}.mlp.c_fc.weight", CONV1D),
    ("mlp.up.bias", "h.{i}.mlp.c_fc.bias", PLAIN),
    ("mlp.down.weight", "h.{i}.mlp.c_proj.weight", CONV1D),
    ("mlp.down.bias", "h.{i}.mlp.c_proj.bias", PLAIN),
]
GLOBAL_TABLE: list[tuple[str, str, Layout]] = [
    ("embed.weight", "wte.weight", PLAIN),
    ("positions.weight", "wpe.weight", PLAIN),
    ("final_norm.weight", "ln_f.weight", PLAIN),
    ("final_norm.bias", "ln_f.bias", PLAIN),
]
PREFIX = "transformer."
"""What ``GPT2LMHeadModel`` puts before every name of the table; ``lm_head.weight`` (untied only) has none."""

# Hugging Face's activation_function (``transformers.activations.ACT2FN``) <-> zmaj's; the first name of an
# activation is the one written. ``gelu_pytorch_tanh`` is ``F.gelu(approximate="tanh")``, as zmaj computes it;
# GPT-2's own ``gelu_new`` is the same formula written out, equal to ~1e-7.
_ACTIVATIONS: dict[str, Activation] = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "relu2": "relu2",
}


def config_from_hf(hf: Mapping[str, Any]) -> GPTConfig:
    """A zmaj GPTConfig from a GPT-2 ``config.json``; GPT-2's choices (LayerNorm, biases, learned positions) are
    fixed."""
    act = hf.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(
            f"unsupported GPT-2 activation_function {act!r}; supported: {', '.join(_ACTIVATIONS)}"
        )
    for switch in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(switch, False):
            raise ValueError(f"GPT-2 {switch}=True is not supported")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 scale_attn_weights=False (unscaled attention scores) is not supported")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        context=hf["n_positions"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_ACTIVATIONS[act],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_hf(config: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` of ``GPT2LMHeadModel`` computing what ``config`` does; a setting it lacks is an error
    (:func:`refuse_inexpressible`). Dropout is written as GPT-2 places it (embeddings and residual branches, none
    on attention weights)."""
    refuse_inexpressible(config)
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context,
        "n_embd": config.d_model,
        "n_layer": config.n_layers,
        "n_head": config.n_heads,
        "n_inner": config.d_ff,
        "activation_function": next(hf for hf, act in _ACTIVATIONS.items() if act == config.activation),
        "layer_norm_epsilon": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def refuse_inexpressible(config: GPTConfig) -> None:
    """A ValueError naming the first setting of ``config`` that ``GPT2LMHeadModel`` cannot compute exactly."""
    reason = inexpressible(config)
    if reason is not None:
        raise ValueError(reason)


def inexpressible(config: GPTConfig) -> str | None:
    """The first setting of ``config`` that ``GPT2LMHeadModel`` cannot compute exactly, and why; None if none.

    GPT-2 has LayerNorm, a position table added to the embeddings and nothing else in the blocks; ReLU squared
    it does have (``activation_function="relu2"``), and how an unembedding was initialised does not matter.
    """
    missing = {
        "norm": (config.norm != "layernorm", "it only has LayerNorm"),
        "positions": (
            config.positions == "rope",
            "it only adds a position table, it has no rotary positions",
        ),
        "qk_norm": (config.qk_norm, "it has no norm on queries and keys"),
        "logit_softcap": (config.logit_softcap is not None, "it has no logit soft-cap"),
        "value_embeds": (config.value_embeds > 0, "it has no value embeddings"),
        # One layer has no pair to join: the flag computes nothing there (the default spec shrunk to one layer).
        "unet_skips": (
            any(source is not None for source in config.unet_skip_sources),
            "it has no skip connections between blocks",
        ),
    }
    for field, (set_here, reason) in missing.items():
        if set_here:
            return (
                f"GPT {field}={getattr(config, field)!r}: GPT-2 (GPT2LMHeadModel) cannot express it, {reason}"
            )
    return None


def params_from_hf(state_dict: Mapping[str, Tensor], config: GPTConfig) -> TensorDict:
    """Convert a GPT-2 state dict (with or without the ``transformer.`` prefix) into zmaj GPT parameters."""
    tensors = {name.removeprefix(PREFIX): t for name, t in state_dict.items()}

    def get(name: str) -> Tensor:
        if name not in tensors:
            raise ValueError(f"GPT-2 checkpoint has no tensor {name!r}")
        return tensors[name]

    flat = {key: layout.read(get(name)) for key, name, layout in GLOBAL_TABLE}
    for key, name, layout in LAYER_TABLE:
        flat[f"blocks.{key}"] = stack_layers(
            (layout.read(get(name.format(i=i))) for i in range(config.n_layers)),
            config.n_layers,
            f"GPT-2 checkpoint tensors {name}",
        )
    if not config.tie_embeddings:
        flat["unembed.weight"] = get("lm_head.weight")
    params = TensorDict.from_dict(_unflatten(flat), auto_batch_size=False)
    params["blocks"].batch_size = torch.Size([config.n_layers])
    return params


def params_to_hf(params: TensorDictBase, config: GPTConfig) -> dict[str, Tensor]:
    """The ``GPT2LMHeadModel`` state dict that ``params_from_hf`` reads back: the same tables, right to left.

    Tensors are views into ``params`` where the layout allows; the fused ``c_attn`` and transposed ones are new.
    """
    refuse_inexpressible(config)
    flat = _with_gpt2_defaults(params, config)
    pieces: dict[str, dict[int, Tensor]] = {}
    layouts: dict[str, Layout] = {}
    for key, name, layout in GLOBAL_TABLE:
        pieces.setdefault(name, {})[layout.part] = flat[key]
        layouts[name] = layout
    for key, name, layout in LAYER_TABLE:
        for i, layer in enumerate(flat[f"blocks.{key}"].unbind(0)):
            pieces.setdefault(name.format(i=i), {})[layout.part] = layer
            layouts[name.format(i=i)] = layout
    tensors = {PREFIX + name: layouts[name].write(parts) for name, parts in pieces.items()}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = flat["unembed.weight"]
    return tensors


def _with_gpt2_defaults(params: TensorDictBase, config: GPTConfig) -> dict[str, Tensor]:
    """``params`` by dotted key, plus what GPT-2 always has and this GPT may lack: zero biases and the sinusoidal
    position table (``sinusoidal_positions`` at every position: the very values ``gpt.forward`` adds)."""
    leaves = params.items(include_nested=True, leaves_only=True)
    flat = {".".join(key): t for key, t in leaves if isinstance(t, Tensor)}
    gpt2_like = config.model_copy(update={"bias": True, "positions": "learned"})
    embed = flat["embed.weight"]
    for key, meta in gpt.init(gpt2_like, 0, device="meta").items(include_nested=True, leaves_only=True):
        name = ".".join(key)
        if name in flat:
            continue
        if name == "positions.weight":
            positions = torch.arange(config.context, device=embed.device)
            flat[name] = sinusoidal_positions(positions, config.d_model).to(embed.dtype)
        else:
            assert name.endswith("bias"), f"only biases and positions are filled in, not {name}"
            flat[name] = torch.zeros(meta.shape, dtype=embed.dtype, device=embed.device)
    return flat


def _unflatten(flat: Mapping[str, Tensor]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested
