"""GGUF files (llama.cpp's checkpoint format) to zmaj configs and parameters, and to a ``tokenizers`` tokenizer.

A GGUF file is one binary: typed key/value metadata (the architecture and its shape, the tokenizer's vocabulary,
merges and chat template) followed by named tensors, each stored in one of ggml's types: plain floats, or blocks
of small integers sharing a scale (Q4_1: 32 weights as 4-bit codes plus a float16 scale and minimum; the "K"
types nest such blocks in super-blocks of 256). The format is specified in the ggml repository
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md). :func:`read_gguf` parses the metadata and the
tensor table with ``struct``, following that page field by field, and leaves the tensors' bytes memory-mapped;
the ``gguf`` package's reference reader, ``GGUFReader``, wraps every value of every array in numpy views,
which for Gemma 3's 262,144-token vocabulary took 19.6 s on a 2-core AVX2 CPU against 0.6 s here
(``tests/unit/convert/test_gguf.py`` checks that both read the same values). Loading undoes what llama.cpp's
``convert_hf_to_gguf.py`` did, exactly as ``transformers`` does when it loads a GGUF file
(``transformers.modeling_gguf_pytorch_utils``), so both give the same float32 weights:

1. Quantisation: each tensor is dequantised to float32 by ``gguf.quants.dequantize``, the reference numpy kernels.
2. Dimension order: ggml lists a tensor's dimensions fastest-varying first, so an ``nn.Linear`` weight
   ``[out, in]`` is listed as ``[in, out]``. The bytes are the same row-major ``[out, in]`` array; only the listed
   shape is reversed.
3. The ``llama`` architecture's q and k rows are permuted. Meta's Llama code rotates neighbouring features
   ``(2i, 2i + 1)`` by RoPE; Hugging Face's Llama rotates ``i`` with ``i + head_dim / 2`` and permuted the q/k
   rows of Meta's checkpoints so the two agree. llama.cpp permutes them back, because ggml's default RoPE rotates
   neighbours; zmaj rotates halves (``zmaj.nn.rope``), so the loader inverts llama.cpp's permutation
   (:func:`unpermute_qk`). Architectures that llama.cpp runs with the rotate-half ("NeoX") RoPE, Qwen 2 and 3
   and Gemma, are stored unpermuted.
4. Gemma's RMSNorm scales by ``1 + w``; llama.cpp stores ``1 + w`` itself, and zmaj (like ``transformers``, which
   subtracts the one back) keeps ``w``.
5. GPT-2's ``Conv1D`` weights (``[in, out]``) are stored transposed, as ``nn.Linear``'s ``[out, in]``, which is
   how zmaj keeps them; its fused ``attn_qkv`` is cut into q, k and v (:class:`Fused`).

Every GGUF tensor name lives in this file, in one table per architecture. A tensor the table does not read (a
bias on Llama's output projection) is an error rather than dropped: a silently ignored tensor is a wrong model.
Two tensors are read into the config instead: Llama 3.1's RoPE scaling, which llama.cpp stores as a factor per
plane (``rope_freqs``, :func:`_frequency_factors`), and an unembedding written as the embedding's copy
(:func:`_tied`).
"""

import math
import mmap
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float
from loguru import logger
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.convert import gpt2
from zmaj.convert.layers import stack_layers
from zmaj.data.model_tokenizer import ModelTokenizer, bos_eos_processor
from zmaj.extras import needs
from zmaj.models import gemma3, llama
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import ModelConfig, init_meta
from zmaj.nn.rope import FrequencyFactors, LinearScaling, Llama3Scaling, rope_frequencies
from zmaj.progress import progress
from zmaj.text import NotTextError

# This module is the GGUF reader, so it needs the extra to import at all; zmaj.convert.load imports it only
# when a GGUF file is asked for.
with needs("gguf", "loading a GGUF file"):
    from gguf import GGMLQuantizationType, GGUFValueType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

# The ggml types llama.cpp's quantize writes for the architectures zmaj loads; each has a reference kernel in
# gguf.quants, equal to ggml's own C kernel to the bit (tests/unit/convert/test_gguf.py). Others (integers, the
# ternary and FP4 types of other architectures) are refused with the tensor's name rather than failing somewhere
# inside numpy.
_T = GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {_T.F32, _T.F16, _T.BF16, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0}
    | {_T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K}
    | {_T.IQ1_S, _T.IQ1_M, _T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ3_XXS, _T.IQ3_S, _T.IQ4_NL, _T.IQ4_XS}
)

DEQUANTIZE_CHUNK = 1 << 22
"""Values dequantised at once (whole rows, at least one): 16 MB of float32."""

Transform = Callable[[Tensor, Any], Tensor]
"""What a table row does to a dequantised GGUF tensor to give zmaj's, given the model's config."""


# --- reading the file ---------------------------------------------------------------------------------------

_SCALARS: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
"""``struct`` formats of the fixed-size metadata types; strings and arrays are read by ``_Cursor.value``."""
GGUF_VERSIONS = (2, 3)  # version 1 counted in 32 bits; llama.cpp has not written it since 2023


@dataclass(frozen=True, eq=False)  # eq=False: the generated == would compare arrays to a bool
class GGUFTensor:
    """One tensor of a GGUF file: its entry in the tensor table, and its bytes, not yet read from disk."""

    name: str
    shape: tuple[int, ...]
    """In torch's order (``[out, in]`` for a linear weight): the reverse of the order the file lists."""
    tensor_type: GGMLQuantizationType
    data: np.ndarray
    """``uint8`` ``[*shape[:-1], bytes of a row]``, a view of the mapped file, as ``dequantize`` takes it."""


@dataclass(frozen=True)
class GGUFFile:
    """A GGUF file's metadata (as Python: int, float, bool, str, or lists of them) and tensors by name."""

    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    path: Path
    """Where it was read from, for errors about its contents."""


class _Cursor:
    """Reads little-endian fields one after another from the mapped file; a field that would run past its end
    means the file was cut short (a download that stopped), and says so."""

    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, size: int) -> int:
        """The position of the next ``size`` bytes, which are then passed over."""
        if self.pos + size > len(self.buffer):
            raise ValueError(f"GGUF file {self.path} ends inside its header: it is truncated")
        self.pos += size
        return self.pos - size

    def read(self, fmt: str, count: int = 1) -> tuple[Any, ...]:
        """The fields of ``fmt``, or ``count`` values of the one field ``fmt`` names."""
        size = struct.calcsize("<" + fmt) * count  # checked before ``struct`` sees a damaged count
        return struct.unpack_from(f"<{count}{fmt}" if count != 1 else "<" + fmt, self.buffer, self.take(size))

    def string(self) -> str:
        (length,) = self.read("Q")
        start = self.take(length)
        try:
            return self.buffer[start : start + length].decode("utf-8")
        except UnicodeDecodeError as error:
            bad = self.buffer[start + error.start]
            raise NotTextError(
                f"GGUF file {self.path}: a metadata string is not UTF-8 text "
                f"(byte 0x{bad:02x} at offset {start + error.start})"
            ) from None

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            if depth == 8:  # real files nest one deep; a damaged one could recurse past Python's stack
                raise ValueError(f"GGUF file {self.path} holds metadata arrays nested more than 8 deep")
            item_kind, count = self.read("IQ")
            if item_kind in _SCALARS:  # one call for a whole array: 262,144 token scores at once
                return list(self.read(_SCALARS[item_kind], count))
            return [self.value(item_kind, depth + 1) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"GGUF file {self.path} holds a metadata value of unknown type {kind}")
        return self.read(_SCALARS[kind])[0]


def read_gguf(path: str | Path) -> GGUFFile:
    """The metadata and tensor table of the GGUF file at ``path`` (header, key/value pairs, tensor infos, then
    the tensor data from the next multiple of ``general.alignment``), the tensors left on disk."""
    path = Path(path)
    if (size := path.stat().st_size) < 24:  # magic, version and the two counts
        raise ValueError(f"{path} is not a GGUF file: it has only {size} bytes")
    with path.open("rb") as file:
        buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(buffer, path)
    if buffer[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it does not start with the bytes 'GGUF'")
    (version,) = cursor.read("4xI")
    if version not in GGUF_VERSIONS:
        big_endian = int.from_bytes(version.to_bytes(4, "little"), "big") in GGUF_VERSIONS
        raise ValueError(
            f"{path} is a big-endian GGUF file; zmaj reads little-endian ones"
            if big_endian
            else f"{path} is GGUF version {version}; zmaj reads versions {GGUF_VERSIONS}"
        )
    n_tensors, n_metadata = cursor.read("QQ")
    metadata = {}
    for _ in range(n_metadata):
        key = cursor.string()
        if key in metadata:  # which of two values would be meant? (gguf-py refuses them too)
            raise ValueError(f"GGUF file {path} has the metadata key {key!r} twice")
        (kind,) = cursor.read("I")
        metadata[key] = cursor.value(kind)
    table = []
    for _ in range(n_tensors):
        name = cursor.string()
        (n_dims,) = cursor.read("I")
        dims = cursor.read("Q", n_dims)
        raw_type, offset = cursor.read("IQ")
        table.append((name, tuple(reversed(dims)), raw_type, offset))
    alignment = metadata.get("general.alignment", 32)
    if not (isinstance(alignment, int) and alignment > 0 and alignment % 8 == 0):
        raise ValueError(
            f"GGUF file {path} has general.alignment {alignment!r}, not a positive multiple of 8"
        )
    start = -(-cursor.pos // alignment) * alignment
    types = {kind.value for kind in GGMLQuantizationType}
    tensors = {}
    for name, shape, raw_type, offset in table:
        if name in tensors:
            raise ValueError(f"GGUF file {path} has the tensor {name!r} twice")
        if raw_type not in types:
            raise ValueError(f"GGUF tensor {name!r} of {path} has unknown ggml type {raw_type}")
        if not shape:
            raise ValueError(f"GGUF tensor {name!r} of {path} has no dimensions")
        tensor_type = GGMLQuantizationType(raw_type)
        try:
            byte_shape = quant_shape_to_byte_shape(shape, tensor_type)
        except ValueError as error:  # a row that is no whole number of blocks; gguf-py names no tensor
            raise ValueError(f"GGUF tensor {name!r} of {path}: {error}") from None
        size = math.prod(byte_shape)
        if start + offset + size > len(buffer):
            raise ValueError(
                f"GGUF tensor {name!r} ends at byte {start + offset + size} of {path}, which has "
                f"{len(buffer)}: the file is truncated"
            )
        data = np.frombuffer(buffer, np.uint8, size, start + offset).reshape(byte_shape)
        tensors[name] = GGUFTensor(name, shape, tensor_type, data)
    return GGUFFile(metadata, tensors, path)


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


@dataclass(frozen=True)
class Fused:
    """Part ``part`` of ``parts`` equal tensors stacked along a GGUF tensor's first axis: GPT-2's ``attn_qkv``
    holds q, k and v one after another (its weight ``[3 * d_model, d_model]``, its bias ``[3 * d_model]``)."""

    part: int
    parts: int = 3

    def __call__(self, tensor: Tensor, config: ModelConfig) -> Tensor:
        return tensor.chunk(self.parts)[self.part]


Table = Sequence[tuple[str, str, Transform]]
"""Rows of (zmaj key, GGUF name with ``{i}`` for the layer, transform); per-layer rows are stacked over layers.
As in zmaj.convert.hf, a row is read only when the config's parameters have its key (the unembedding, when
untied; Qwen 2's biases)."""

LLAMA_LAYER_TABLE: Table = [
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
LLAMA_GLOBAL_TABLE: Table = [
    ("embed.weight", "token_embd.weight", _same),
    ("final_norm.weight", "output_norm.weight", _same),
    ("unembed.weight", "output.weight", _same),
]
# Gemma 3's norms: attn_norm and ffn_norm before the two sub-blocks, post_attention_norm and post_ffw_norm after.
GEMMA3_LAYER_TABLE: Table = [
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
GEMMA3_GLOBAL_TABLE: Table = [
    ("embed.weight", "token_embd.weight", _same),
    ("final_norm.weight", "output_norm.weight", _minus_one),
    ("unembed.weight", "output.weight", _same),
]
# Qwen 2 and 3 are Llama's tensors with the q and k rows as they are (llama.cpp rotates halves for both), plus
# Qwen 2's q/k/v biases and Qwen 3's per-head q/k norms (plain RMSNorm weights, no 1 + w).
QWEN_LAYER_TABLE: Table = [
    *((key, name, _same) for key, name, _ in LLAMA_LAYER_TABLE),
    ("attn.q.bias", "blk.{i}.attn_q.bias", _same),
    ("attn.k.bias", "blk.{i}.attn_k.bias", _same),
    ("attn.v.bias", "blk.{i}.attn_v.bias", _same),
    ("attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", _same),
    ("attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", _same),
]
# GPT-2: LayerNorm weights and biases, a bias on every linear map, the learned position table.
GPT2_LAYER_TABLE: Table = [
    ("attn_norm.weight", "blk.{i}.attn_norm.weight", _same),
    ("attn_norm.bias", "blk.{i}.attn_norm.bias", _same),
    ("attn.q.weight", "blk.{i}.attn_qkv.weight", Fused(0)),
    ("attn.k.weight", "blk.{i}.attn_qkv.weight", Fused(1)),
    ("attn.v.weight", "blk.{i}.attn_qkv.weight", Fused(2)),
    ("attn.q.bias", "blk.{i}.attn_qkv.bias", Fused(0)),
    ("attn.k.bias", "blk.{i}.attn_qkv.bias", Fused(1)),
    ("attn.v.bias", "blk.{i}.attn_qkv.bias", Fused(2)),
    ("attn.o.weight", "blk.{i}.attn_output.weight", _same),
    ("attn.o.bias", "blk.{i}.attn_output.bias", _same),
    ("mlp_norm.weight", "blk.{i}.ffn_norm.weight", _same),
    ("mlp_norm.bias", "blk.{i}.ffn_norm.bias", _same),
    ("mlp.up.weight", "blk.{i}.ffn_up.weight", _same),
    ("mlp.up.bias", "blk.{i}.ffn_up.bias", _same),
    ("mlp.down.weight", "blk.{i}.ffn_down.weight", _same),
    ("mlp.down.bias", "blk.{i}.ffn_down.bias", _same),
]
GPT2_GLOBAL_TABLE: Table = [
    ("embed.weight", "token_embd.weight", _same),
    ("positions.weight", "position_embd.weight", _same),
    ("final_norm.weight", "output_norm.weight", _same),
    ("final_norm.bias", "output_norm.bias", _same),
    ("unembed.weight", "output.weight", _same),
]
TABLES: dict[str, tuple[Table, Table]] = {
    "llama": (LLAMA_LAYER_TABLE, LLAMA_GLOBAL_TABLE),
    "qwen2": (QWEN_LAYER_TABLE, LLAMA_GLOBAL_TABLE),
    "qwen3": (QWEN_LAYER_TABLE, LLAMA_GLOBAL_TABLE),
    "smollm3": (LLAMA_LAYER_TABLE, LLAMA_GLOBAL_TABLE),  # converted as Llama, q/k rows permuted
    "gemma2": (GEMMA3_LAYER_TABLE, GEMMA3_GLOBAL_TABLE),  # Gemma 3's, less the q/k norms it lacks
    "gemma3": (GEMMA3_LAYER_TABLE, GEMMA3_GLOBAL_TABLE),
    "gpt2": (GPT2_LAYER_TABLE, GPT2_GLOBAL_TABLE),
}
"""Each architecture's (layer table, global table), by its ``general.architecture``."""
SUPPORTED_ARCHITECTURES = tuple(TABLES)


def load_gguf(path: str | Path, device: torch.device | str = "cpu") -> tuple[ModelConfig, TensorDict]:
    """The config and parameters of the GGUF file at ``path``, dequantised to float32.

    float32 holds every quantised value exactly, so this is the checkpoint as llama.cpp would compute with it;
    cast the result (``params.to(torch.bfloat16)``) to trade that for memory.
    """
    file = read_gguf(path)
    config = config_from_gguf(file)
    architecture = file.metadata["general.architecture"]  # one of TABLES': config_from_gguf checked it
    layer_table, global_table = TABLES[architecture]
    in_config = {"rope_freqs.weight"} if architecture == "llama" else set()
    if config.tie_embeddings:
        in_config.add("output.weight")
    params = _params(file, config, layer_table, global_table, init_meta(config), in_config)
    return config, params.to(device)


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    """A zmaj config from a GGUF file's metadata, chosen by ``general.architecture``."""
    architecture = _metadata(file, "general.architecture")
    if architecture in ("llama", "qwen2", "qwen3", "smollm3"):
        return _llama_config(file, architecture)
    if architecture in ("gemma2", "gemma3"):
        return _gemma_config(file, architecture)
    if architecture == "gpt2":
        return _gpt2_config(file)
    raise ValueError(
        f"unsupported GGUF architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _llama_config(file: GGUFFile, architecture: str) -> LlamaConfig:
    """Llama's shape under llama.cpp's key names, which Qwen 2 and 3 and SmolLM3 share under their own prefix; a
    switch zmaj cannot express (YaRN, partial RoPE) is refused.

    SmolLM3's layers without positions are every 4th, fixed in llama.cpp's code (``n_no_rope_layer_step``) where
    no metadata key says so, as in every released SmolLM3's ``no_rope_layers``.

    llama.cpp reads Qwen 2's q/k/v biases as optional, so the file's tensors say whether there are any; Qwen 3
    always has its q/k norms. ``attention.key_length`` sets head_dim apart from ``d_model / n_heads``, as
    llama.cpp reads it (``transformers`` ignores it for Qwen 3 and takes Qwen3Config's default, 128: every
    released Qwen 3's).
    """

    def key(name: str, default: Any = ...) -> Any:
        return _metadata(file, f"{architecture}.{name}", default)

    def size(name: str, default: int | None = None) -> int:
        return _size(file, f"{architecture}.{name}", default)

    if key("expert_count", 0):
        raise ValueError(f"{architecture}: mixture-of-experts files are not supported")
    if isinstance(key("attention.head_count_kv", None), list):
        raise ValueError(f"{architecture}: a different number of key/value heads per layer is not supported")
    d_model, n_heads = size("embedding_length"), size("attention.head_count")
    n_kv_heads = size("attention.head_count_kv", n_heads)
    head_dim = size("attention.key_length", d_model // n_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{architecture}: RoPE over {key('rope.dimension_count')} of {head_dim} head features is not "
            "supported"
        )
    context, n_layers, d_ff = size("context_length"), size("block_count"), size("feed_forward_length")
    _check_layers(file, n_layers, architecture)
    rope_base = key("rope.freq_base", 10_000.0)
    rope_scaling = _linear_rope_scaling(file, architecture)
    # llama.cpp reads rope_freqs for Llama alone; in another family's file it is a tensor nothing reads.
    factors = _frequency_factors(file, head_dim, rope_base) if architecture == "llama" else None
    if rope_scaling is not None and factors is not None:
        raise ValueError(
            f"{architecture}: linear RoPE scaling together with per-plane factors (rope_freqs) is not supported"
        )
    return LlamaConfig(
        vocab_size=_vocab_size(file),
        context=context,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=d_ff,
        norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_base=rope_base,
        rope_scaling=rope_scaling or factors,
        tie_embeddings=_tied(file),
        qkv_bias=architecture == "qwen2" and "blk.0.attn_q.bias" in file.tensors,
        qk_norm=architecture == "qwen3",
        rope_layers=llama.nope_every(4, n_layers) if architecture == "smollm3" else None,
    )


def _gemma_config(file: GGUFFile, architecture: str) -> Gemma3Config:
    """Gemma 2's or Gemma 3's shape, with what the file does not say taken as llama.cpp's code fixes it.

    llama.cpp reads which layers are local from ``attention.sliding_window_pattern`` (a flag per layer, or the
    period of the global ones), else takes Gemma 3's five local layers to one global and Gemma 2's alternation;
    a Gemma 3 file without a window has none (every layer global). It scales attention scores by
    ``head_dim ** -0.5``, except for the 27B models (Gemma 3's 62 layers, Gemma 2's 46), whose
    ``query_pre_attn_scalar`` is ``d_model // n_heads``. Gemma 3's linear RoPE scaling (4B and up) applies to its
    global layers only, and its logits are soft-capped only where the file says so. Gemma 2's scaling applies to
    every layer, its local layers rotate with the global base unless ``rope.freq_base_swa`` says otherwise, it
    has no QK-norm, and it soft-caps its attention scores and logits at the file's caps, else at 50 and 30 (its
    window too may be left out: 4096). Gemma 2's unembedding is always its embedding: llama.cpp refuses a
    Gemma 2 file with an ``output.weight`` of its own.
    """
    gemma2 = architecture == "gemma2"

    def key(name: str, default: Any = ...) -> Any:
        return _metadata(file, f"{architecture}.{name}", default)

    def size(name: str, default: int | None = None) -> int:
        return _size(file, f"{architecture}.{name}", default)

    rope_scaling = _linear_rope_scaling(file, architecture)
    n_layers, d_model, n_heads = size("block_count"), size("embedding_length"), size("attention.head_count")
    head_dim, n_kv_heads = size("attention.key_length"), size("attention.head_count_kv")
    context, d_ff = size("context_length"), size("feed_forward_length")
    _check_layers(file, n_layers, architecture)  # before a list of n_layers layer types is made
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"{architecture}: RoPE over {key('rope.dimension_count')} of {head_dim} head features is not supported"
        )
    rope_base = key("rope.freq_base", 10_000.0 if gemma2 else 1_000_000.0)
    big = n_layers == (46 if gemma2 else 62)
    window: int | None
    if gemma2:
        window = size("attention.sliding_window", 4096)
    else:  # llama.cpp: a Gemma 3 file without a window, or with 0, has no sliding layers
        window = size("attention.sliding_window") if key("attention.sliding_window", 0) else None
    tied = _tied(file)  # compares the two matrices' bytes, when both are stored: once
    options: dict[str, Any] = {"final_logit_softcap": key("final_logit_softcapping", 0.0) or None}
    if gemma2:
        options = {
            "attn_logit_softcap": key("attn_logit_softcapping", 50.0),
            "final_logit_softcap": key("final_logit_softcapping", 30.0),
            "qk_norm": False,
        }
        if not tied:
            raise ValueError(
                f"GGUF file {file.path}: a Gemma 2 file with an output.weight other than its embedding, which "
                "llama.cpp refuses (its Gemma 2 unembeds through the embedding)"
            )
    if window is None:
        options["layer_types"] = ("full_attention",) * n_layers
    else:
        options |= {
            "sliding_window": window,
            "layer_types": _layer_types(file, architecture, n_layers, 2 if gemma2 else 6),
        }
    return Gemma3Config(
        vocab_size=_vocab_size(file),
        context=context,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_ff=d_ff,
        norm_eps=key("attention.layer_norm_rms_epsilon"),
        rope_base=rope_base,
        rope_scaling=rope_scaling,
        local_rope_base=key("rope.freq_base_swa", rope_base if gemma2 else 10_000.0),
        local_rope_scaling=rope_scaling if gemma2 else None,
        query_pre_attn_scalar=d_model // n_heads if big else head_dim,
        tie_embeddings=tied,
        **options,
    )


def _layer_types(
    file: GGUFFile, architecture: str, n_layers: int, period: int
) -> tuple[gemma3.LayerType, ...]:
    """Which layers attend through the window, as llama.cpp's ``load_swa_pattern`` reads them: a flag per layer
    in ``attention.sliding_window_pattern``, or there the period of the global layers (every ``period``-th
    layer; 0: none global), else the architecture's ``period``."""
    pattern = _metadata(file, f"{architecture}.attention.sliding_window_pattern", period)
    kinds: tuple[gemma3.LayerType, gemma3.LayerType] = ("full_attention", "sliding_attention")
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(flag, bool | int) for flag in pattern):
            raise ValueError(
                f"GGUF metadata of {file.path}: {architecture}.attention.sliding_window_pattern is {pattern!r}, "
                f"neither a period nor a flag for each of {n_layers} layers"
            )
        return tuple(kinds[bool(flag)] for flag in pattern)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise ValueError(
            f"GGUF metadata of {file.path}: {architecture}.attention.sliding_window_pattern is {pattern!r}, not a "
            "period (a whole number) or a flag per layer"
        )
    if pattern == 0:
        return (kinds[1],) * n_layers
    return gemma3.interleaved_layer_types(n_layers, pattern)


def _gpt2_config(file: GGUFFile) -> GPTConfig:
    """GPT-2's shape, with the choices the architecture fixes (LayerNorm, biases, the learned position table, the
    tanh GELU that is ggml's ``gelu``) made where zmaj makes them for a Hugging Face checkpoint."""

    def size(name: str) -> int:
        return _size(file, f"gpt2.{name}")

    n_layers = size("block_count")
    _check_layers(file, n_layers, "gpt2")
    return gpt2.config_from_hf(
        {
            "vocab_size": _vocab_size(file),
            "n_positions": size("context_length"),
            "n_embd": size("embedding_length"),
            "n_layer": n_layers,
            "n_head": size("attention.head_count"),
            "n_inner": size("feed_forward_length"),
            "layer_norm_epsilon": _metadata(file, "gpt2.attention.layer_norm_epsilon"),
            "activation_function": "gelu_new",
            "tie_word_embeddings": _tied(file),
        }
    )


def _tied(file: GGUFFile) -> bool:
    """Whether the unembedding is the embedding. llama.cpp writes ``output.weight`` only when it is not, but its
    converter long wrote GPT-2's tied unembedding out as a copy; a copy, byte for byte, is the one matrix the
    checkpoint had (:func:`load_gguf` counts it as read)."""
    output, embedding = file.tensors.get("output.weight"), file.tensors.get("token_embd.weight")
    if output is None:
        return True
    return (
        embedding is not None
        and (output.tensor_type, output.shape) == (embedding.tensor_type, embedding.shape)
        and _same_bytes(output.data, embedding.data)
    )


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two tensors' bytes (same shape) are equal, compared a few MB at a time: an untied unembedding
    differs from the embedding in its first rows, and an 8B model's would otherwise be read whole (2 GB)."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    rows = max(1, DEQUANTIZE_CHUNK // a.shape[-1])
    return all(np.array_equal(a[i : i + rows], b[i : i + rows]) for i in range(0, len(a), rows))


def _linear_rope_scaling(file: GGUFFile, architecture: str) -> LinearScaling | None:
    """RoPE scaling as llama.cpp reads it (``llama_model::load_hparams``): the factor is
    ``{arch}.rope.scaling.factor``, or the older converters' ``{arch}.rope.scale_linear``; a file that names no
    type scales linearly, and type ``none`` never scales. Linear is the one type GGUF metadata expresses that zmaj
    computes; the others (YaRN) are refused, as a factor ignored would be a wrong model past the first tokens."""
    factor = _metadata(file, f"{architecture}.rope.scaling.factor", None)
    if factor is None:
        factor = _metadata(file, f"{architecture}.rope.scale_linear", None)
    kind = _metadata(file, f"{architecture}.rope.scaling.type", "linear")
    if kind == "none" or factor in (None, 0.0, 1.0):  # llama.cpp: a factor of 0 is none given
        return None
    if kind != "linear":
        raise ValueError(f"{architecture}: RoPE scaling {kind!r} is not supported")
    return LinearScaling(factor=factor)


META_LLAMA3_RAMP = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""The scaling parameters of every Llama 3.1, 3.2 and 3.3, bar the factor (8 or 32). llama.cpp's converter
defaults to the same three, and older versions took the original context from the config's top level, where
Llama 3.x has none: 8192 in every Llama 3.x file either way."""


def _frequency_factors(file: GGUFFile, head_dim: int, base: float) -> Llama3Scaling | FrequencyFactors | None:
    """llama.cpp's ``rope_freqs``, a divisor of each RoPE plane's frequency, which its converter evaluates from
    Llama 3.1's scaling (``LlamaModel.generate_extra_tensors``), keeping none of the parameters.

    Where the factors are those of Meta's parameters (:data:`META_LLAMA3_RAMP`, the factor being the largest of
    them) to float32 rounding, they are read as those parameters, as the checkpoint the file was converted from
    states them, which export to ``transformers`` writes back. Other factors are kept as they are
    (:class:`FrequencyFactors`), computing as llama.cpp computes them.
    """
    tensor = file.tensors.get("rope_freqs.weight")
    if tensor is None:
        return None
    if tensor.shape != (head_dim // 2,):
        raise ValueError(
            f"GGUF tensor 'rope_freqs.weight' has shape {tensor.shape}, expected ({head_dim // 2},): one factor "
            f"per RoPE plane of head_dim {head_dim}"
        )
    factors = dequantize_tensor(tensor)
    if not (factors.isfinite().all() and (factors > 0).all()):
        raise ValueError(
            f"GGUF tensor 'rope_freqs.weight' of {file.path} holds factors that are not positive finite numbers"
        )
    meta = Llama3Scaling(factor=factors.max().item(), **META_LLAMA3_RAMP)
    plain = rope_frequencies(head_dim, base)
    if torch.allclose(plain / rope_frequencies(head_dim, base, meta), factors, rtol=1e-6, atol=0):
        return meta
    return FrequencyFactors(factors=tuple(factors.tolist()))


def _vocab_size(file: GGUFFile) -> int:
    """The number of tokens the tokenizer lists, as ``transformers`` takes it (``{arch}.vocab_size`` is optional)."""
    if "tokenizer.ggml.tokens" not in file.metadata:
        raise ValueError(
            f"GGUF metadata of {file.path} has no 'tokenizer.ggml.tokens', so the vocabulary size is unknown"
        )
    return len(file.metadata["tokenizer.ggml.tokens"])


def _metadata(file: GGUFFile, key: str, default: Any = ...) -> Any:
    """A metadata value; a missing key without a default is named."""
    if key not in file.metadata:
        if default is ...:
            raise ValueError(f"GGUF metadata of {file.path} has no {key!r}")
        return default
    return file.metadata[key]


def _check_layers(file: GGUFFile, n_layers: int, architecture: str) -> None:
    """The layers' tensors are ``blk.0`` to ``blk.{n_layers - 1}``: checked before anything is sized by the
    count, which a damaged file may give as billions (a layer-types list or a stacked tensor that large)."""
    found = {int(m[1]) for name in file.tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    if len(found) != n_layers or found != set(range(n_layers)):  # the length first: n_layers may be 4e9
        raise ValueError(
            f"GGUF file {file.path}: {architecture}.block_count is {n_layers}, but its tensors are those of "
            f"{len(found)} layers (blk.{min(found, default=0)} to blk.{max(found, default=-1)})"
        )


def _size(file: GGUFFile, key: str, default: int | None = None) -> int:
    """A count or length of the model: a positive integer (a head count of 0 would divide by zero)."""
    value = _metadata(file, key, ... if default is None else default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"GGUF metadata of {file.path}: {key} is {value!r}, not a positive integer")
    return value


def dequantize_tensor(tensor: GGUFTensor) -> Float[Tensor, "..."]:
    """A GGUF tensor as float32 in torch's dimension order; a type zmaj does not read names the tensor.

    Rows are dequantised a few MB at a time into the result: ``gguf.quants``' kernels hold float32 temporaries
    larger than their output, which for Gemma 3 270M's Q8_0 embedding (262,144 x 640) took 1,455 MiB beside the
    640 MiB result, against 828 MiB in chunks.
    """
    if tensor.tensor_type not in SUPPORTED_TYPES:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise ValueError(
            f"GGUF tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which zmaj does not "
            f"dequantise; supported: {supported}"
        )
    values = torch.empty(tensor.shape, dtype=torch.float32)
    rows = values.numpy().reshape(-1, tensor.shape[-1])  # views of the result, and of the mapped file
    data = tensor.data.reshape(-1, tensor.data.shape[-1])
    step = max(1, DEQUANTIZE_CHUNK // tensor.shape[-1])
    for start in range(0, len(rows), step):
        rows[start : start + step] = dequantize(data[start : start + step], tensor.tensor_type)
    return values


def _params(
    file: GGUFFile,
    config: ModelConfig,
    layer_table: Table,
    global_table: Table,
    expected: TensorDictBase,
    in_config: set[str],
) -> TensorDict:
    """Parameters shaped like ``expected`` (an ``init`` on the meta device), read through the two tables.

    A tensor missing, misshapen or left unread (and not among ``in_config``, those the config was read from) is
    named; layers are stacked along ``[n_layers]``. A fused tensor is dequantised once for each of its parts:
    GPT-2's q/k/v are a quarter of its blocks' weights.
    """
    tensors = file.tensors
    wanted = {".".join(key) for key in expected.keys(include_nested=True, leaves_only=True)}
    read = set(in_config)
    n_read = len(set(tensors) - read)

    def load(key: str, name: str, transform: Transform) -> Tensor:
        if name not in tensors:
            raise ValueError(f"GGUF file has no tensor {name!r} (zmaj {key})")
        shape = tensors[name].shape
        expected_shape = tuple(expected.get(tuple(key.split("."))).shape)
        if key.startswith("blocks."):
            expected_shape = expected_shape[1:]
        if isinstance(transform, Fused):
            expected_shape = (expected_shape[0] * transform.parts, *expected_shape[1:])
        if shape != expected_shape:
            raise ValueError(f"GGUF tensor {name!r} has shape {shape}, expected {expected_shape}")
        if name not in read:
            read.add(name)
            bar.update()
        return transform(dequantize_tensor(tensors[name]), config)

    with progress(None, n_read, f"de-quantising {n_read} GGUF tensors", unit="tensor") as bar:
        flat = {key: load(key, name, fn) for key, name, fn in global_table if key in wanted}
        n_layers = expected["blocks"].batch_size[0]
        for key, name, fn in layer_table:
            if f"blocks.{key}" in wanted:
                flat[f"blocks.{key}"] = stack_layers(
                    (load(f"blocks.{key}", name.format(i=i), fn) for i in range(n_layers)),
                    n_layers,
                    f"GGUF tensors {name}",
                )
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

    file = read_gguf(path)
    _check_tokenizer(file)
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

    # llama.cpp's end-of-turn and end-of-message tokens end an answer as EOS does (an instruct model's EOS may be
    # another: Llama 3's <|end_of_text|> beside <|eot_id|>); transformers reads no generation config from a GGUF.
    turn_ends = [_turn_end(file, name) for name in ("eot", "eom")]
    return ModelTokenizer(
        inner,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("pad"),
        unk_token=token("unk"),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=tokenizer_config.get("chat_template"),
        stop_tokens=tuple(dict.fromkeys(tokens[i] for i in turn_ends if i is not None and i != ids["eos"])),
    )


def _turn_end(file: GGUFFile, name: str) -> int | None:
    """The end-of-turn (``eot``) or end-of-message (``eom``) token id, if the file names one of its tokens; a
    bad id is ignored with a warning, as llama.cpp does: the file loads as it did before zmaj read these keys."""
    key = f"tokenizer.ggml.{name}_token_id"
    token_id = file.metadata.get(key)
    if token_id is None or _is_token_id(token_id, _vocab_size(file)):
        return token_id
    logger.warning(f"GGUF metadata of {file.path}: {key} is {token_id!r}, not a token id; ignored")
    return None


def _is_token_id(value: object, n_tokens: int) -> bool:
    """Whether a metadata value is one of the vocabulary's ids (a bool is a GGUF type of its own, no id)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_tokens


def _check_tokenizer(file: GGUFFile) -> None:
    """What ``transformers``' converter takes on trust, checked first so that a damaged file is one line naming
    the key rather than an ``IndexError`` or ``KeyError`` from inside it."""
    n_tokens = _vocab_size(file)
    for name in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        token_id = file.metadata.get(key)
        if token_id is not None and not _is_token_id(token_id, n_tokens):
            raise ValueError(
                f"GGUF metadata of {file.path}: {key} is {token_id!r}, not one of its {n_tokens} token ids"
            )
    # A byte-level BPE vocabulary is nothing without its merges (llama.cpp refuses such a file too).
    if file.metadata.get("tokenizer.ggml.model") == "gpt2":
        if "tokenizer.ggml.merges" not in file.metadata:
            raise ValueError(
                f"GGUF metadata of {file.path} has a gpt2 (BPE) tokenizer but no 'tokenizer.ggml.merges'"
            )
        vocabulary = set(file.metadata["tokenizer.ggml.tokens"])
        for index, merge in enumerate(file.metadata["tokenizer.ggml.merges"]):
            parts = merge.split(" ") if isinstance(merge, str) else []
            # Two tokens, and their join a token too: BPE looks the merged token up.
            if len(parts) != 2 or not {*parts, "".join(parts)} <= vocabulary:
                raise ValueError(
                    f"GGUF metadata of {file.path}: tokenizer.ggml.merges[{index}] is {merge!r}, not two tokens "
                    "of its vocabulary whose join is one too"
                )
