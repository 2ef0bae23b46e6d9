"""GGUF files (llama.cpp's checkpoint format) to zmaj configs and parameters, and to a ``tokenizers`` tokenizer.

A GGUF file is one binary: typed key/value metadata (the architecture and its shape, the tokenizer's vocabulary,
merges and chat template) followed by named tensors, each stored in one of ggml's types: plain floats, or blocks
of small integers sharing a scale (Q4_1: 32 weights as 4-bit codes plus a float16 scale and minimum; the "K"
types nest such blocks in super-blocks of 256). The format is specified in the ggml repository
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) and read here with its reference reader, the ``gguf``
package. Loading undoes what llama.cpp's ``convert_hf_to_gguf.py`` did, exactly as ``transformers`` does when it
loads a GGUF file (``transformers.modeling_gguf_pytorch_utils``), so both give the same float32 weights:

1. Quantisation: each tensor is dequantised to float32 by ``gguf.quants.dequantize``, the reference numpy kernels.
2. Dimension order: ggml lists a tensor's dimensions fastest-varying first, so an ``nn.Linear`` weight
   ``[out, in]`` is listed as ``[in, out]``. The bytes are the same row-major ``[out, in]`` array; only the listed
   shape is reversed.
3. The ``llama`` architecture's q and k rows are permuted. Meta's Llama code rotates neighbouring features
   ``(2i, 2i + 1)`` by RoPE; Hugging Face's Llama rotates ``i`` with ``i + head_dim / 2`` and permuted the q/k
   rows of Meta's checkpoints so the two agree. llama.cpp permutes them back, because ggml's default RoPE rotates
   neighbours; zmaj rotates halves (``zmaj.nn.rope``), so the loader inverts llama.cpp's permutation
   (:func:`unpermute_qk`). Architectures that llama.cpp runs with the rotate-half ("NeoX") RoPE, such as Gemma,
   are stored unpermuted.
4. Gemma's RMSNorm scales by ``1 + w``; llama.cpp stores ``1 + w`` itself, and zmaj (like ``transformers``, which
   subtracts the one back) keeps ``w``.

Every GGUF tensor name lives in this file, in one table per architecture. A tensor the table does not read (a
bias, Llama 3.1's ``rope_freqs``) is an error rather than dropped: a silently ignored tensor is a wrong model.
"""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.data.model_tokenizer import ModelTokenizer, bos_eos_processor
from zmaj.extras import needs
from zmaj.models import gemma3, llama
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.llama import LlamaConfig
from zmaj.nn.rope import LinearScaling

# This module is the GGUF reader, so it needs the extra to import at all; zmaj.convert.load imports it only
# when a GGUF file is asked for.
with needs("gguf", "loading a GGUF file"):
    from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
    from gguf.quants import dequantize

ModelConfig = LlamaConfig | Gemma3Config
SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# The ggml types zmaj dequantises; all have a reference kernel in gguf.quants. Others (the I-quants, integers)
# are refused with the tensor's name rather than failing somewhere inside numpy.
_T = GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {_T.F32, _T.F16, _T.BF16, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0}
    | {_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K}
)

C = TypeVar("C", bound=ModelConfig)
Transform = Callable[[Tensor, C], Tensor]


def unpermute_qk(weight: Float[Tensor, "rows d_in"], n_heads: int) -> Float[Tensor, "rows d_in"]:
    """Undo llama.cpp's q/k row permutation: within each head, interleaved pairs back to rotate-half halves.

    The rows of a head are stored as ``(half, two)``, row ``2j + t`` holding feature ``t * head_dim / 2 + j``;
    this puts them back as ``(two, half)``. ``transformers`` calls it ``reverse_permute_weights``.
    """
    return rearrange(weight, "(heads half two) d -> (heads two half) d", heads=n_heads, two=2)


def permute_qk(weight: Float[Tensor, "rows d_in"], n_heads: int) -> Float[Tensor, "rows d_in"]:
    """llama.cpp's permutation (``LlamaModel.permute`` in ``convert_hf_to_gguf.py``), the inverse of the above."""
    return rearrange(weight, "(heads two half) d -> (heads half two) d", heads=n_heads, two=2)


def _same(tensor: Tensor, config: ModelConfig) -> Tensor:
    return tensor


def _minus_one(tensor: Tensor, config: ModelConfig) -> Tensor:
    """A Gemma norm weight as zmaj keeps it, from llama.cpp's ``1 + w``."""
    return tensor - 1


def _unpermute_q(tensor: Tensor, config: LlamaConfig) -> Tensor:
    return unpermute_qk(tensor, config.n_heads)


def _unpermute_k(tensor: Tensor, config: LlamaConfig) -> Tensor:
    return unpermute_qk(tensor, config.n_kv_heads)


# (zmaj key, GGUF name with {i} for the layer, transform); per-layer rows are stacked over layers. As in
# zmaj.convert.hf, a row is read only when the config's parameters have its key (the unembedding, when untied).
LLAMA_LAYER_TABLE: list[tuple[str, str, Transform[LlamaConfig]]] = [
    ("attn_norm.weight", "blk.{i}.attn_norm.weight", _same),
    ("attn.q.weight", "blk.{i}.attn_q.weight", _unpermute_q),
    ("attn.k.weight", "blk.{i}.attn_k.weight", _unpermute_k),
    ("attn.v.weight", "blk.{i}.attn_v.weight", _same),
    ("attn.o.weight", "blk.{i}.attn_output.weight", _same),
    ("mlp_norm.weight", "blk.{i}.ffn_norm.weight", _same),
    ("mlp.gate.weight", "blk.{i}.ffn_gate.weight", _same),
    ("mlp.up.weight", "blk.{i}.ffn_up.weight", _same),
    ("mlp.down.weight", "blk.{i}.ffn_down.weight", _same),
]
LLAMA_GLOBAL_TABLE: list[tuple[str, str, Transform[LlamaConfig]]] = [
    ("embed.weight", "token_embd.weight", _same),
    ("final_norm.weight", "output_norm.weight", _same),
    ("unembed.weight", "output.weight", _same),
]
# Gemma 3's norms: attn_norm and ffn_norm before the two sub-blocks, post_attention_norm and post_ffw_norm after.
GEMMA3_LAYER_TABLE: list[tuple[str, str, Transform[Gemma3Config]]] = [
    ("attn_norm.weight", "blk.{i}.attn_norm.weight", _minus_one),
    ("attn.q.weight", "blk.{i}.attn_q.weight", _same),
    ("attn.k.weight", "blk.{i}.attn_k.weight", _same),
    ("attn.v.weight", "blk.{i}.attn_v.weight", _same),
    ("attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", _minus_one),
    ("attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", _minus_one),
    ("attn.o.weight", "blk.{i}.attn_output.weight", _same),
    ("attn_post_norm.weight", "blk.{i}.post_attention_norm.weight", _minus_one),
    ("mlp_norm.weight", "blk.{i}.ffn_norm.weight", _minus_one),
    ("mlp.gate.weight", "blk.{i}.ffn_gate.weight", _same),
    ("mlp.up.weight", "blk.{i}.ffn_up.weight", _same),
    ("mlp.down.weight", "blk.{i}.ffn_down.weight", _same),
    ("mlp_post_norm.weight", "blk.{i}.post_ffw_norm.weight", _minus_one),
]
GEMMA3_GLOBAL_TABLE: list[tuple[str, str, Transform[Gemma3Config]]] = [
    ("embed.weight", "token_embd.weight", _same),
    ("final_norm.weight", "output_norm.weight", _minus_one),
    ("unembed.weight", "output.weight", _same),
]


def load_gguf(path: str | Path, device: torch.device | str = "cpu") -> tuple[ModelConfig, TensorDict]:
    """The config and parameters of the GGUF file at ``path``, dequantised to float32.

    float32 holds every quantised value exactly, so this is the checkpoint as llama.cpp would compute with it;
    cast the result (``params.to(torch.bfloat16)``) to trade that for memory.
    """
    reader = GGUFReader(path)
    config = config_from_gguf(reader)
    if isinstance(config, Gemma3Config):
        expected = gemma3.init(config, 0, "meta")
        params = _params(reader, config, GEMMA3_LAYER_TABLE, GEMMA3_GLOBAL_TABLE, expected)
    else:
        params = _params(reader, config, LLAMA_LAYER_TABLE, LLAMA_GLOBAL_TABLE, llama.init(config, 0, "meta"))
    return config, params.to(device)


def config_from_gguf(reader: GGUFReader) -> ModelConfig:
    """A zmaj config from a GGUF file's metadata, chosen by ``general.architecture``."""
    architecture = _metadata(reader, "general.architecture")
    if architecture == "llama":
        return _llama_config(reader)
    if architecture == "gemma3":
        return _gemma3_config(reader)
    raise ValueError(
        f"unsupported GGUF architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _llama_config(reader: GGUFReader) -> LlamaConfig:
    """Llama's shape under llama.cpp's key names; a switch zmaj cannot express (scaled or partial RoPE) is refused."""

    def key(name: str, default: Any = ...) -> Any:
        return _metadata(reader, f"llama.{name}", default)

    if key("rope.scaling.type", "none") != "none":
        raise ValueError(f"llama: RoPE scaling {key('rope.scaling.type')!r} is not supported")
    if key("expert_count", 0):
        raise ValueError("llama: mixture-of-experts files are not supported")
    n_kv_heads = key("attention.head_count_kv", key("attention.head_count"))
    if isinstance(n_kv_heads, list):
        raise ValueError("llama: a different number of key/value heads per layer is not supported")
    d_model, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", d_model // n_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"llama: RoPE over {key('rope.dimension_count')} of {head_dim} head features is not supported"
        )
    names = {tensor.name for tensor in reader.tensors}
    return LlamaConfig(
        vocab_size=_vocab_size(reader),
        context=key("context_length"),
        d_model=d_model,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=key("feed_forward_length"),
        norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_base=key("rope.freq_base", 10_000.0),
        # llama.cpp writes no output.weight when the unembedding is the embedding.
        tie_embeddings="output.weight" not in names,
    )


def _gemma3_config(reader: GGUFReader) -> Gemma3Config:
    """Gemma 3's shape, with what the file does not say taken as llama.cpp's Gemma 3 code fixes it.

    llama.cpp hard-codes five local layers to one global (``set_swa_pattern(6)``) and scales attention scores by
    ``head_dim ** -0.5``, except for the 27B model (62 layers), whose ``query_pre_attn_scalar`` is
    ``d_model / n_heads``. Linear RoPE scaling (Gemma 3 4B and up) applies to the global layers only.
    """

    def key(name: str, default: Any = ...) -> Any:
        return _metadata(reader, f"gemma3.{name}", default)

    scaling_type = key("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"gemma3: RoPE scaling {scaling_type!r} is not supported")
    n_layers, d_model, n_heads = key("block_count"), key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length")
    names = {tensor.name for tensor in reader.tensors}
    return Gemma3Config(
        vocab_size=_vocab_size(reader),
        context=key("context_length"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv"),
        head_dim=head_dim,
        d_ff=key("feed_forward_length"),
        norm_eps=key("attention.layer_norm_rms_epsilon"),
        layer_types=gemma3.interleaved_layer_types(n_layers, 6),
        sliding_window=key("attention.sliding_window"),
        rope_base=key("rope.freq_base", 1_000_000.0),
        rope_scaling=LinearScaling(factor=key("rope.scaling.factor")) if scaling_type == "linear" else None,
        local_rope_base=key("rope.freq_base_swa", 10_000.0),
        query_pre_attn_scalar=d_model / n_heads if n_layers == 62 else head_dim,
        tie_embeddings="output.weight" not in names,
    )


def _vocab_size(reader: GGUFReader) -> int:
    """The number of tokens the tokenizer lists, as ``transformers`` takes it (``{arch}.vocab_size`` is optional)."""
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
        raise KeyError("GGUF metadata has no 'tokenizer.ggml.tokens', so the vocabulary size is unknown")
    return len(field.data)


def _metadata(reader: GGUFReader, key: str, default: Any = ...) -> Any:
    """A metadata value as Python (str, int, float, bool or list); a missing key without a default is named."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise KeyError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def dequantize_tensor(tensor: ReaderTensor) -> Float[Tensor, "..."]:
    """A GGUF tensor as float32 in torch's dimension order; a type zmaj does not read names the tensor."""
    if tensor.tensor_type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(
            f"GGUF tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which zmaj does not "
            f"dequantise; supported: {supported}"
        )
    values = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
    # F32 (and other unconverted types) come back as views of the read-only memory map; torch needs its own copy.
    if not values.flags.writeable:
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False))


def _params(
    reader: GGUFReader,
    config: C,
    layer_table: Sequence[tuple[str, str, Transform[C]]],
    global_table: Sequence[tuple[str, str, Transform[C]]],
    expected: TensorDictBase,
) -> TensorDict:
    """Parameters shaped like ``expected`` (an ``init`` on the meta device), read through the two tables.

    A tensor missing, misshapen or left unread is named; layers are stacked along ``[n_layers]``.
    """
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    wanted = {".".join(key) for key in expected.keys(include_nested=True, leaves_only=True)}
    read: set[str] = set()

    def load(key: str, name: str, transform: Transform[C]) -> Tensor:
        if name not in tensors:
            raise KeyError(f"GGUF file has no tensor {name!r} (zmaj {key})")
        shape = tuple(reversed(tensors[name].shape.tolist()))
        expected_shape = tuple(expected.get(tuple(key.split("."))).shape)
        if key.startswith("blocks."):
            expected_shape = expected_shape[1:]
        if shape != expected_shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {shape}, expected {expected_shape}")
        read.add(name)
        return transform(dequantize_tensor(tensors[name]), config)

    flat = {key: load(key, name, fn) for key, name, fn in global_table if key in wanted}
    n_layers = expected["blocks"].batch_size[0]
    for key, name, fn in layer_table:
        if f"blocks.{key}" in wanted:
            layers = [load(f"blocks.{key}", name.format(i=i), fn) for i in range(n_layers)]
            flat[f"blocks.{key}"] = torch.stack(layers)
    assert set(flat) == wanted, f"the GGUF tables miss {sorted(wanted - set(flat))}"
    if unread := sorted(set(tensors) - read):
        raise ValueError(f"GGUF file has tensors zmaj would not read: {', '.join(unread)}")
    params: TensorDict = TensorDict(flat).unflatten_keys(".")
    params["blocks"].batch_size = torch.Size([n_layers])
    return params


def tokenizer_from_gguf(path: str | Path) -> ModelTokenizer:
    """The tokenizer stored in a GGUF file's metadata, built by ``transformers``' GGUF converter.

    A GGUF has no ``tokenizer.json``: it lists tokens, merges, token kinds and a pre-tokenizer name under
    llama.cpp's keys, and rebuilding a tokenizer from those is a table of per-family quirks that ``transformers``
    maintains (``integrations.gguf.gguf_tokenizer_mapping``); it is the reference for the format, so zmaj calls
    it instead of copying it. What ``transformers``' tokenizer class adds on top (special tokens as whole tokens,
    the BOS/EOS post-processor) is repeated here, so encodings agree.
    """
    # Imported here: transformers takes seconds to import.
    with needs("gguf", "loading a GGUF file's tokenizer"):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )

    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    inner, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tokens: list[str] = tokenizer_dict["tokens"]
    ids = {name: tokenizer_dict.get(f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}
    # transformers' tokenizer class adds its named special tokens whole, as the file's control tokens already are.
    added = {token.content for token in inner.get_added_tokens_decoder().values()}
    inner.add_special_tokens([tokens[i] for i in ids.values() if i is not None and tokens[i] not in added])
    add_bos = bool(tokenizer_config.get("add_bos_token", False)) and ids["bos"] is not None
    add_eos = bool(tokenizer_config.get("add_eos_token", False)) and ids["eos"] is not None
    # The class rewrites the post-processor when the file sets either flag, or when there is none to keep.
    if (
        "add_bos_token" in tokenizer_config
        or "add_eos_token" in tokenizer_config
        or inner.post_processor is None
    ):
        bos = tokens[ids["bos"]] if add_bos and ids["bos"] is not None else None
        eos = tokens[ids["eos"]] if add_eos and ids["eos"] is not None else None
        inner.post_processor = bos_eos_processor(inner, bos, eos)

    def token(name: str) -> str | None:
        token_id = ids[name]
        return None if token_id is None else tokens[token_id]

    return ModelTokenizer(
        inner,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("pad"),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=tokenizer_config.get("chat_template"),
    )
