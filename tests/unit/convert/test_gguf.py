"""GGUF loading: the file reader, the q/k permutation, dequantisation, the name table and their errors.

Small files are written here with ``gguf.GGUFWriter`` the way llama.cpp's ``convert_hf_to_gguf.py`` writes a
Llama (its names, its metadata keys, its q/k permutation), from a random ``transformers`` model that serves as the
reference; zmaj's reader is compared with gguf-py's on such files and on the real SmolLM2 file, whose shape
the metadata must give. Whole-model parity with real weights is in tests/integration/test_gguf_parity.py.
"""

import re
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from einops import rearrange
from gguf import GGMLQuantizationType
from hypothesis import given
from hypothesis import strategies as st
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from tests.integration import parity
from tests.strategies import seeds
from zmaj.convert import gguf as zgguf
from zmaj.convert import weights
from zmaj.models import gemma3, llama
from zmaj.models.common import Batch
from zmaj.nn.rope import LinearScaling, apply_rope, rope_angles, rope_frequencies

VOCAB = 128
# "a b" is a merge; "t1 t2" is none, as "t1t2" is no token.
BPE_TOKENS = [*(f"t{i}" for i in range(VOCAB - 3)), "a", "b", "ab"]
SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rope_theta": 50_000.0,
    "rms_norm_eps": 1e-5,
    # Sharp attention, so a wrong q/k row order moves the logits by ~1, not ~1e-3.
    "initializer_range": 0.1,
}

Tensors = dict[str, np.ndarray | tuple[np.ndarray, GGMLQuantizationType]]


def write_gguf(path: Path, architecture: str, metadata: dict[str, Any], tensors: Tensors) -> Path:
    """A GGUF file; a tensor given with a type is written as those raw (already quantised) bytes."""
    writer = gguf.GGUFWriter(path, architecture)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, tensor in tensors.items():
        if isinstance(tensor, tuple):
            writer.add_tensor(name, tensor[0], raw_dtype=tensor[1])
        else:
            writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_model(tie: bool) -> transformers.LlamaForCausalLM:
    """A random Llama whose norms are moved off one, so a dropped or swapped norm would show."""
    model = parity.random_reference(transformers.LlamaConfig(**SMALL, tie_word_embeddings=tie))
    assert isinstance(model, transformers.LlamaForCausalLM)
    return model


def llama_cpp_tensors(model: transformers.LlamaForCausalLM) -> Tensors:
    """The model's tensors under llama.cpp's names, q and k rows permuted as its converter does."""
    c = model.config
    kv_heads = SMALL["num_key_value_heads"]
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        # convert_hf_to_gguf.py, LlamaModel.permute, verbatim.
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    tensors: Tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not c.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        tensors |= {
            f"blk.{i}.attn_norm.weight": state[layer + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": permute(
                state[layer + "self_attn.q_proj.weight"], c.num_attention_heads
            ),
            f"blk.{i}.attn_k.weight": permute(state[layer + "self_attn.k_proj.weight"], kv_heads),
            f"blk.{i}.attn_v.weight": state[layer + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": state[layer + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": state[layer + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": state[layer + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": state[layer + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": state[layer + "mlp.down_proj.weight"],
        }
    return tensors


def llama_cpp_metadata(config: transformers.LlamaConfig) -> dict[str, Any]:
    head_dim = config.hidden_size // config.num_attention_heads
    return {
        "general.name": "tiny",
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.rope.dimension_count": head_dim,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.rope.freq_base": float(SMALL["rope_theta"]),
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(config.vocab_size)],
    }


def tiny_llama_file(tmp_path: Path, changes: dict[str, Any] | None = None, tie: bool = False) -> Path:
    """A tiny Llama GGUF; ``changes`` replace tensors (``None`` drops one)."""
    model = llama_model(tie)
    tensors = llama_cpp_tensors(model) | (changes or {})
    kept = {k: v for k, v in tensors.items() if v is not None}
    return write_gguf(tmp_path / "tiny.gguf", "llama", llama_cpp_metadata(model.config), kept)


@st.composite
def qk_shapes(draw: st.DrawFn) -> tuple[int, int, int]:
    """(heads, head_dim, d_in), head_dim even as RoPE needs."""
    return draw(st.integers(1, 6)), 2 * draw(st.integers(1, 8)), draw(st.integers(1, 5))


@given(qk_shapes(), seeds)
def test_unpermute_inverts_the_llama_cpp_permutation(shape: tuple[int, int, int], seed: int) -> None:
    heads, head_dim, d_in = shape
    w = torch.randn(heads * head_dim, d_in, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(zgguf.unpermute_qk(zgguf.permute_qk(w, heads), heads), w)
    assert torch.equal(zgguf.permute_qk(zgguf.unpermute_qk(w, heads), heads), w)


@given(qk_shapes(), seeds)
def test_unpermute_is_transformers_reverse_permute(shape: tuple[int, int, int], seed: int) -> None:
    heads, head_dim, d_in = shape
    w = torch.randn(heads * head_dim, d_in, generator=torch.Generator().manual_seed(seed))
    reference = LlamaTensorProcessor()._reverse_permute_weights(w.numpy(), heads, heads)
    assert np.array_equal(zgguf.unpermute_qk(w, heads).numpy(), reference)


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Meta's Llama RoPE: neighbours (2i, 2i + 1) as one complex number, turned by e^(i m theta_i)."""
    pairs = torch.view_as_complex(rearrange(x.double(), "... (half two) -> ... half two", two=2).contiguous())
    turned = pairs * torch.polar(torch.ones(()).double(), positions[:, None].double() * inv_freq.double())
    return rearrange(torch.view_as_real(turned), "... half two -> ... (half two)").float()


@given(qk_shapes(), st.integers(1, 12), seeds)
def test_permuted_rows_rotated_in_pairs_equal_rotate_half(
    shape: tuple[int, int, int], seq: int, seed: int
) -> None:
    """Why the permutation exists: llama.cpp's rows under interleaved RoPE are zmaj's under rotate-half."""
    heads, head_dim, d_in = shape
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(heads * head_dim, d_in, generator=generator)
    x = torch.randn(seq, d_in, generator=generator)
    inv_freq = rope_frequencies(head_dim, 10_000.0)
    positions = torch.arange(seq)
    cos, sin = rope_angles(positions[None], inv_freq)
    zmaj = apply_rope(rearrange(x @ w.T, "s (h d) -> 1 h s d", h=heads), cos, sin)
    stored = rearrange(x @ zgguf.permute_qk(w, heads).T, "s (h d) -> h s d", h=heads)
    llama_cpp = zgguf.unpermute_qk(
        rearrange(interleaved_rope(stored, positions, inv_freq), "h s d -> (h d) s"), heads
    )
    assert torch.allclose(rearrange(zmaj, "1 h s d -> (h d) s"), llama_cpp, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_a_llama_cpp_file_gives_the_logits_of_the_model_it_was_written_from(
    tmp_path: Path, tie: bool
) -> None:
    path = tiny_llama_file(tmp_path, tie=tie)
    config, params = zgguf.load_gguf(path)
    assert isinstance(config, llama.LlamaConfig)
    assert (config.tie_embeddings, "unembed" in params) == (tie, not tie)
    assert (config.n_heads, config.n_kv_heads, config.head_dim, config.rope_base) == (4, 2, 16, 50_000.0)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = llama_model(tie)(tokens).logits
        # transformers reading the same file checks that it was written the way llama.cpp writes.
        from_file = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=path.name, dtype=torch.float32
        )(tokens).logits
        logits = llama.forward(params, Batch(tokens=tokens), config)
    assert (from_file - expected).abs().max().item() <= 1e-5
    assert (logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("absent", ["llama.rope.freq_base", "llama.attention.head_count_kv"])
def test_keys_a_llama_file_may_leave_out_read_as_transformers_reads_them(tmp_path: Path, absent: str) -> None:
    """llama.cpp takes an absent RoPE base as 10,000 and an absent key/value head count as the query heads'
    (``llama_model::load_hparams``), as ``transformers`` does; the tiny files write both keys, so a loader with
    another default passed. Without the RoPE base the file still computes as ``transformers`` computes it."""
    model = llama_model(tie=True)
    metadata = {k: v for k, v in llama_cpp_metadata(model.config).items() if k != absent}
    path = write_gguf(tmp_path / "tiny.gguf", "llama", metadata, llama_cpp_tensors(model))
    config = zgguf.config_from_gguf(zgguf.read_gguf(path))
    assert isinstance(config, llama.LlamaConfig)
    reference = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert (config.rope_base, config.n_kv_heads) == (
        reference.rope_parameters["rope_theta"],
        reference.num_key_value_heads,
    )
    assert (config.rope_base, config.n_kv_heads) == (
        (10_000.0, 2) if "freq_base" in absent else (50_000.0, 4)
    )
    if "freq_base" in absent:  # with the head count absent, the file's k and v are those of 2 heads, not 4
        tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
        _, params = zgguf.load_gguf(path)
        with torch.no_grad():
            expected = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path, gguf_file=path.name, dtype=torch.float32
            )(tokens).logits
            logits = llama.forward(params, Batch(tokens=tokens), config)
        assert (logits - expected).abs().max().item() <= 1e-5


GEMMA3_SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    # Six layers: five local, one global, the pattern llama.cpp fixes for Gemma 3.
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    # llama.cpp scales scores by head_dim ** -0.5 (bar the 27B model), so the reference does too.
    "query_pre_attn_scalar": 32,
    "sliding_window": 16,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
}


def gemma3_file(
    tmp_path: Path,
    tie: bool = True,
    reference: dict[str, Any] | None = None,
    changes: dict[str, Any] | None = None,
) -> tuple[Path, transformers.Gemma3ForCausalLM]:
    """A tiny Gemma 3 written as llama.cpp's converter writes one (``gemma_cpp_tensors``); ``reference`` changes
    the model's config, ``changes`` the file's metadata (``None`` drops a key)."""
    config = transformers.Gemma3TextConfig(**GEMMA3_SMALL | (reference or {}), tie_word_embeddings=tie)
    model = parity.random_reference(config)
    assert isinstance(model, transformers.Gemma3ForCausalLM)
    metadata = {
        "gemma3.context_length": 256,
        "gemma3.embedding_length": 64,
        "gemma3.block_count": 6,
        "gemma3.feed_forward_length": 128,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 2,
        "gemma3.attention.key_length": 32,
        "gemma3.attention.value_length": 32,
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.attention.sliding_window": 16,
        "gemma3.rope.freq_base": 1_000_000.0,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)],
    } | (changes or {})
    metadata = {key: value for key, value in metadata.items() if value is not None}
    return write_gguf(tmp_path / "gemma3.gguf", "gemma3", metadata, gemma_cpp_tensors(model, tie)), model


def gemma_cpp_tensors(model: transformers.PreTrainedModel, tie: bool) -> Tensors:
    """A Gemma 2 or 3's tensors as llama.cpp's converter writes them: its names, every norm stored as ``1 + w``,
    and ``output.weight`` only when the unembedding is not the embedding."""
    renames = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "post_feedforward_layernorm": "post_ffw_norm",
    }
    tensors: Tensors = {}
    for name, value in model.state_dict().items():
        array = value.numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = array
        elif name == "model.norm.weight":
            tensors["output_norm.weight"] = array
        elif name == "lm_head.weight":
            if not tie:
                tensors["output.weight"] = array
        elif name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module = rest.removesuffix(".weight")
            tensors[f"blk.{layer}.{renames[module]}.weight"] = array
    return tensors


@pytest.mark.parametrize("tie", [True, False])
def test_a_llama_cpp_gemma3_file_gives_the_logits_of_its_model(tmp_path: Path, tie: bool) -> None:
    path, model = gemma3_file(tmp_path, tie)
    config, params = zgguf.load_gguf(path)
    assert isinstance(config, gemma3.Gemma3Config)
    assert config.is_sliding == (True,) * 5 + (False,)
    assert (config.sliding_window, config.query_pre_attn_scalar, config.tie_embeddings) == (16, 32, tie)
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
        logits = gemma3.forward(params, Batch(tokens=tokens), config)
    assert (logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("reference", "changes"),
    [
        # No window (or 0): llama.cpp's Gemma 3 attends globally in every layer.
        ({"layer_types": ["full_attention"] * 6}, {"gemma3.attention.sliding_window": None}),
        ({"layer_types": ["full_attention"] * 6}, {"gemma3.attention.sliding_window": 0}),
        # A logit soft-cap, which llama.cpp's Gemma 3 applies where the file has one.
        ({"final_logit_softcapping": 2.0}, {"gemma3.final_logit_softcapping": 2.0}),
    ],
    ids=["no window", "window 0", "soft-capped"],
)
def test_a_gemma3_file_without_a_window_or_with_a_logit_cap_reads_as_llama_cpp_reads_it(
    tmp_path: Path, reference: dict[str, Any], changes: dict[str, Any]
) -> None:
    path, model = gemma3_file(tmp_path, reference=reference, changes=changes)
    config, params = zgguf.load_gguf(path)
    assert isinstance(config, gemma3.Gemma3Config)
    assert list(config.layer_types) == model.config.layer_types
    assert config.final_logit_softcap == model.config.final_logit_softcapping
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gemma3.forward(params, Batch(tokens=tokens), config)
        assert (logits - model(tokens).logits).abs().max().item() <= 1e-5


def quantised(values: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray | tuple[np.ndarray, Any]:
    if kind == GGMLQuantizationType.F32:
        return values
    if kind == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, kind), kind


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0"])
@given(seed=seeds)
def test_dequantised_values_are_the_stored_ones(
    tmp_path_factory: pytest.TempPathFactory, kind: str, seed: int
) -> None:
    """Each type against an independent rounding: exact, torch's float16 and bfloat16, or a Q8_0 step."""
    qtype = GGMLQuantizationType[kind]
    values = np.random.default_rng(seed).normal(size=(3, 64)).astype(np.float32)
    path = write_gguf(tmp_path_factory.mktemp(kind) / "w.gguf", "llama", {}, {"w": quantised(values, qtype)})
    (tensor,) = zgguf.read_gguf(path).tensors.values()
    loaded, x = zgguf.dequantize_tensor(tensor), torch.from_numpy(values)
    assert (loaded.shape, loaded.dtype) == ((3, 64), torch.float32)
    if kind == "F32":
        assert torch.equal(loaded, x)
    elif kind in ("F16", "BF16"):
        assert torch.equal(loaded, x.to(torch.float16 if kind == "F16" else torch.bfloat16).float())
    else:
        # Blocks of 32 share the scale d = absmax / 127, stored in float16: rounding to a code is off by at most
        # d / 2, and the scale's float16 rounding (relative 2^-11) by at most 127 codes times that.
        d = rearrange(x, "r (b k) -> r b k", k=32).abs().amax(-1, keepdim=True) / 127
        error = rearrange(loaded - x, "r (b k) -> r b k", k=32).abs()
        assert bool((error <= d * (0.5 + 127 * 2**-11) + 1e-7).all())


def ggml_dequantize(blocks: np.ndarray, kind: str) -> np.ndarray:
    """ggml's ``dequantize_row_*`` (``ggml-quants.c``) for one block per row of ``blocks`` (uint8), written from
    the block layouts of ``ggml-common.h``: float16 scales, then codes, low nibbles before high ones."""

    def half(at: int) -> np.ndarray:
        return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]

    def nibbles(codes: np.ndarray) -> np.ndarray:
        return np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.float32)

    if kind == "Q4_0":  # d, 16 bytes: 32 codes; x = d (q - 8)
        return half(0) * (nibbles(blocks[:, 2:18]) - 8)
    if kind == "Q4_1":  # d, m, 16 bytes: 32 codes; x = d q + m
        return half(0) * nibbles(blocks[:, 4:20]) + half(2)
    if kind == "Q5_0":  # d, 32 fifth bits (value j's is bit j), 16 bytes of low bits; x = d (q - 16)
        fifth = (blocks[:, 2:6].copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1
        return half(0) * (nibbles(blocks[:, 6:22]) + 16 * fifth.astype(np.float32) - 16)
    if kind == "Q4_K":  # d, dmin, 8 six-bit scales and mins in 12 bytes, 128 bytes: 8 sub-blocks of 32 codes
        packed = blocks[:, 4:16].astype(np.int32)
        low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
        scales = np.concatenate([low & 63, (high & 15) | (low >> 6 << 4)], axis=1).astype(np.float32)
        mins = np.concatenate([mid & 63, (high >> 4) | (mid >> 6 << 4)], axis=1).astype(np.float32)
        # Each 32 bytes hold two sub-blocks: the low nibbles the first, the high nibbles the second.
        codes = rearrange(nibbles(rearrange(blocks[:, 16:144], "n (c l) -> n c l", l=32)), "n c l -> n (c l)")
        codes = rearrange(codes, "n (s l) -> n s l", l=32)
        x = (half(0) * scales)[..., None] * codes - (half(2) * mins)[..., None]
        return rearrange(x, "n s l -> n (s l)")
    # Q6_K: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales, d; x = d s (q - 32)
    assert kind == "Q6_K"
    ql = rearrange(blocks[:, :128], "n (h k l) -> n h k l", h=2, k=2)  # per half of 128 values
    qh = rearrange(blocks[:, 128:192], "n (h l) -> n h l", h=2)
    low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = np.stack([qh >> shift & 3 for shift in (0, 2, 4, 6)], axis=2)
    codes = (low | high << 4).astype(np.float32) - 32  # [n, half, quarter k, 32]: value 128 h + 32 k + l
    scales = rearrange(blocks[:, 192:208].view(np.int8), "n (h k t) -> n h k t", h=2, t=2)  # t = l // 16
    x = (half(208)[..., None, None] * scales.astype(np.float32)).repeat(16, axis=-1) * codes
    return rearrange(x, "n h k l -> n (h k l)")


# Where each type's float16 scales sit in its block.
SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("kind", list(SCALE_OFFSETS))
@given(seed=seeds)
def test_quantised_blocks_dequantise_as_ggml_lays_them_out(
    tmp_path_factory: pytest.TempPathFactory, kind: str, seed: int
) -> None:
    """The types of the shipped files (Q4_0, Q4_1, Q5_0 in SmolLM2's; Q4_K, Q6_K in Gemma 3's) against a
    reference written from ggml's block layout: random codes, random finite scales. transformers' GGUF loader
    calls the same gguf-py kernels as zmaj, so parity with it checks neither the kernels nor the types zmaj
    accepts."""
    qtype = GGMLQuantizationType[kind]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (3 * 256 // block, block_bytes), dtype=np.uint8)
    for at in SCALE_OFFSETS[kind]:
        blocks[:, at : at + 2] = rng.normal(0, 0.1, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    raw = (blocks.reshape(3, -1), qtype)
    path = write_gguf(tmp_path_factory.mktemp(kind) / "w.gguf", "llama", {}, {"w": raw})
    (tensor,) = zgguf.read_gguf(path).tensors.values()
    loaded = zgguf.dequantize_tensor(tensor)
    assert loaded.shape == (3, 256)
    expected = torch.from_numpy(ggml_dequantize(blocks, kind).reshape(3, 256))
    assert torch.allclose(loaded, expected, rtol=1e-6, atol=0), (loaded - expected).abs().max()


IQUANTS = np.load(Path(__file__).parents[2] / "data" / "gguf" / "iquants.npz")
"""Random blocks of each I-quant type and what ggml's C kernels dequantise them to (written by
tests/data/gguf/write_iquants.py with llama-cpp-python's libggml)."""


@pytest.mark.parametrize(
    "kind", sorted({key.split("_blocks")[0] for key in IQUANTS if key.endswith("_blocks")})
)
def test_i_quants_dequantise_as_ggml_does(tmp_path: Path, kind: str) -> None:
    """The I-quants (IQ4_XS is common among published GGUF files) look their codes up in lattice grids that a
    test could only copy; the reference is ggml's own dequantisation of the same random blocks, to the bit."""
    qtype = GGMLQuantizationType[kind]
    blocks, expected = IQUANTS[f"{kind}_blocks"], torch.from_numpy(IQUANTS[f"{kind}_values"])
    path = write_gguf(tmp_path / "w.gguf", "llama", {}, {"w": (blocks.reshape(1, -1), qtype)})
    (tensor,) = zgguf.read_gguf(path).tensors.values()
    assert torch.equal(zgguf.dequantize_tensor(tensor), expected[None])


def test_an_unsupported_type_names_the_tensor(tmp_path: Path) -> None:
    # Q8_1 is a type gguf-py has no dequantiser for; zeros are valid bytes for it. ffn_up is [d_ff=128, d_model=64].
    block, block_bytes = gguf.GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
    raw = np.zeros((128, 64 // block * block_bytes), dtype=np.uint8)
    path = tiny_llama_file(tmp_path, {"blk.1.ffn_up.weight": (raw, GGMLQuantizationType.Q8_1)})
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' is stored as Q8_1.*supported: .*Q4_K"):
        zgguf.load_gguf(path)


def test_a_tensor_the_table_does_not_read_is_named(tmp_path: Path) -> None:
    path = tiny_llama_file(tmp_path, {"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"would not read: blk\.0\.attn_q\.bias"):
        zgguf.load_gguf(path)


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    path = tiny_llama_file(tmp_path, {"blk.1.ffn_down.weight": None})
    with pytest.raises(ValueError, match=re.escape("'blk.1.ffn_down.weight' (zmaj blocks.mlp.down.weight)")):
        zgguf.load_gguf(path)


def test_a_misshapen_tensor_is_named(tmp_path: Path) -> None:
    path = tiny_llama_file(tmp_path, {"blk.0.ffn_gate.weight": np.zeros((127, 64), dtype=np.float32)})
    with pytest.raises(
        ValueError, match=r"'blk\.0\.ffn_gate\.weight' has shape \(127, 64\), expected \(128, 64\)"
    ):
        zgguf.load_gguf(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"llama.attention.head_count": 0}, r"llama\.attention\.head_count is 0, not a positive integer"),
        ({"llama.block_count": "2"}, r"llama\.block_count is '2', not a positive integer"),
        ({"llama.context_length": 0}, r"llama\.context_length is 0, not a positive integer"),
    ],
)
def test_a_size_that_is_not_a_positive_integer_is_named(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    metadata = llama_cpp_metadata(llama_model(tie=True).config) | change
    path = write_gguf(tmp_path / "m.gguf", "llama", metadata, {"w": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match=f"GGUF metadata of {re.escape(str(path))}: {message}"):
        zgguf.config_from_gguf(zgguf.read_gguf(path))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"tokenizer.ggml.bos_token_id": VOCAB},
            rf"bos_token_id is {VOCAB}, not one of its {VOCAB} token ids",
        ),
        ({"tokenizer.ggml.padding_token_id": 2**31}, r"padding_token_id is 2147483648, not one of its"),
        ({"tokenizer.ggml.model": "gpt2"}, r"a gpt2 \(BPE\) tokenizer but no 'tokenizer\.ggml\.merges'"),
        # tokenizers' own errors: a TypeError about PyMerges, "Token `zz` out of vocabulary", "Token `t1t2`
        # out of vocabulary" (a merge's join must be a token too).
        *(
            (
                {
                    "tokenizer.ggml.model": "gpt2",
                    "tokenizer.ggml.tokens": BPE_TOKENS,
                    "tokenizer.ggml.merges": merges,
                },
                rf"tokenizer\.ggml\.merges\[{index}\] is '{bad}', not two tokens of its vocabulary whose join",
            )
            for merges, index, bad in (
                (["a b", "a_b"], 1, "a_b"),
                (["a b", "a zz"], 1, "a zz"),
                (["a b", "t1 t2"], 1, "t1 t2"),
            )
        ),
    ],
)
def test_a_tokenizer_transformers_would_fail_on_is_named(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    """transformers' converter indexes the vocabulary with these ids, and derives missing merges from scores."""
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)]}
    path = write_gguf(tmp_path / "m.gguf", "llama", metadata | change, {"w": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match=f"GGUF metadata of {re.escape(str(path))}.*{message}"):
        zgguf.tokenizer_from_gguf(path)


@pytest.mark.parametrize(
    ("ends", "stops"),
    [
        ({}, (3,)),
        ({"eot": 5}, (3, 5)),
        ({"eot": 5, "eom": 6}, (3, 5, 6)),
        ({"eot": 3}, (3,)),
        (
            {"eot": VOCAB + 5, "eom": 6},
            (3, 6),
        ),  # not a token: ignored, as llama.cpp does, not the file refused
    ],
)
def test_a_files_end_of_turn_tokens_stop_generation(
    tmp_path: Path, ends: dict[str, int], stops: tuple[int, ...]
) -> None:
    """An instruct GGUF ends a turn with llama.cpp's EOT (and EOM) token where its EOS is another (Llama 3's
    <|eot_id|> beside <|end_of_text|>): read as EOS alone, chat.py ran on into a next turn it made up."""
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": BPE_TOKENS,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 3,
        **{f"tokenizer.ggml.{name}_token_id": token for name, token in ends.items()},
    }
    path = write_gguf(tmp_path / "m.gguf", "llama", metadata, {"w": np.zeros(4, dtype=np.float32)})
    assert zgguf.tokenizer_from_gguf(path).stop_ids == stops


def test_a_tokenizer_without_flags_or_special_token_types_encodes_as_transformers(tmp_path: Path) -> None:
    """A BPE file that sets neither ``add_bos_token`` nor ``add_eos_token`` and types its BOS and EOS as normal
    tokens (token_type 1, not 3: control): ``transformers`` adds neither to an encoding, and splits neither out
    of the text it comes in only as its tokenizer class makes them special. ``t0`` and ``t1`` are no BPE word of
    this vocabulary, so only a whole special token encodes them."""
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": BPE_TOKENS,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": [1] * VOCAB,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    path = write_gguf(tmp_path / "m.gguf", "llama", metadata, {"w": np.zeros(4, dtype=np.float32)})
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = zgguf.tokenizer_from_gguf(path)
    assert (
        (ours.add_bos, ours.add_eos) == (reference.add_bos_token, reference.add_eos_token) == (False, False)
    )
    for text in ("ab", "at1b", "t0abt1", "ba"):
        assert ours.tokenizer.encode(text).ids == reference(text).input_ids
    assert reference("at1b").input_ids == [125, 1, 126]


def with_u32(path: Path, key: str, value: int) -> Path:
    """A copy of a GGUF file with the uint32 metadata value of ``key`` replaced (the bytes after the key's name
    are its type, then its value)."""
    data = path.read_bytes()
    at = data.index(key.encode()) + len(key) + 4
    damaged = path.with_name(f"damaged-{path.name}")
    damaged.write_bytes(data[:at] + value.to_bytes(4, "little") + data[at + 4 :])
    return damaged


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_a_layer_count_the_tensors_do_not_have_is_refused_before_it_sizes_anything(
    tmp_path: Path, architecture: str
) -> None:
    """A damaged count of 4e9 layers built a list of 4e9 layer types (Gemma 3: a MemoryError after 18 s), or
    a stacked tensor of 4e9 layers (Llama: a terabyte asked of the allocator)."""
    path = tiny_llama_file(tmp_path) if architecture == "llama" else gemma3_file(tmp_path)[0]
    layers = 2 if architecture == "llama" else 6
    for count in (4_000_000_000, layers + 1, layers - 1):
        damaged = with_u32(path, f"{architecture}.block_count", count)
        with pytest.raises(
            ValueError,
            match=rf"{architecture}\.block_count is {count}, but its tensors are those of {layers} layers "
            rf"\(blk\.0 to blk\.{layers - 1}\)",
        ):
            zgguf.load_gguf(damaged)


def test_a_row_that_is_no_whole_number_of_blocks_names_the_tensor(tmp_path: Path) -> None:
    """gguf-py's "Quantized tensor row size (64) is not a multiple of Q4_K block size (256)" named no tensor."""
    data = tiny_llama_file(tmp_path).read_bytes()
    name = b"output_norm.weight"
    # After the name: its number of dimensions (1), its one dimension, then its type.
    at = data.index(name) + len(name) + 4 + 8
    (tmp_path / "q4k.gguf").write_bytes(data[:at] + (12).to_bytes(4, "little") + data[at + 4 :])  # Q4_K
    with pytest.raises(ValueError, match=r"GGUF tensor 'output_norm\.weight' of .*q4k\.gguf: .*block size"):
        zgguf.read_gguf(tmp_path / "q4k.gguf")


def test_metadata_arrays_nested_past_any_real_files_are_refused(tmp_path: Path) -> None:
    nested: list[Any] = [1]
    for _ in range(9):
        nested = [nested]
    path = write_gguf(tmp_path / "n.gguf", "llama", {"x": nested}, {"w": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ValueError, match="metadata arrays nested more than 8 deep"):
        zgguf.read_gguf(path)  # deeper still, a RecursionError


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, None),
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, LinearScaling(factor=4.0)),
        ({"rope.scaling.factor": 4.0}, LinearScaling(factor=4.0)),  # no type: llama.cpp's default, linear
        ({"rope.scale_linear": 4.0}, LinearScaling(factor=4.0)),  # converters before YaRN (2023)
        ({"rope.scaling.type": "none", "rope.scaling.factor": 4.0}, None),  # none never scales
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 1.0}, None),
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 0.0}, None),  # llama.cpp: 0 is none given
        ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}, "RoPE scaling 'yarn' is not supported"),
    ],
)
def test_rope_scaling_is_read_as_llama_cpp_reads_it(
    tmp_path: Path, architecture: str, keys: dict[str, Any], expected: LinearScaling | str | None
) -> None:
    """A Llama 2 fine-tune stretched to 16k by linear scaling, converted before YaRN, says so in
    ``rope.scale_linear`` alone: it loaded unscaled, every logit past the first tokens wrong."""
    file = zgguf.read_gguf(tiny_llama_file(tmp_path) if architecture == "llama" else gemma3_file(tmp_path)[0])
    file.metadata.update({f"{architecture}.{key}": value for key, value in keys.items()})
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=f"{architecture}: {expected}"):
            zgguf.config_from_gguf(file)
    else:
        config = zgguf.config_from_gguf(file)
        assert isinstance(config, llama.LlamaConfig | gemma3.Gemma3Config)
        assert config.rope_scaling == expected


def test_an_unknown_architecture_lists_the_supported_ones(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "mamba", {}, {"w": np.zeros(4, dtype=np.float32)})
    with pytest.raises(
        ValueError, match=r"'mamba'; supported: llama, qwen2, qwen3, smollm3, gemma2, gemma3, gpt2"
    ):
        zgguf.load_gguf(path)


def test_the_llama_table_covers_every_tensor_of_smollm2() -> None:
    """Every tensor of the real file is read, and the metadata gives SmolLM2-135M's published shape."""
    file = zgguf.read_gguf(weights.smollm2_gguf())
    config = zgguf.config_from_gguf(file)
    assert config == llama.LlamaConfig(
        vocab_size=49152,
        context=8192,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        norm_eps=float(np.float32(1e-5)),  # stored as float32, and transformers reads it so
        rope_base=100_000.0,
        tie_embeddings=True,
    )
    names = {name for key, name, _ in zgguf.LLAMA_GLOBAL_TABLE if key != "unembed.weight"}
    names |= {name.format(i=i) for _, name, _ in zgguf.LLAMA_LAYER_TABLE for i in range(config.n_layers)}
    assert names == set(file.tensors)


# --- the reader, against gguf-py's reference reader ---------------------------------------------------------


def reference_contents(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], str, bytes]]]:
    """Each metadata value and tensor (torch-order shape, type, bytes) as ``gguf.GGUFReader`` reads it."""
    reader = gguf.GGUFReader(path)
    # The reader lists the header's fields (GGUF.version and the counts) as metadata too; they are not keys.
    metadata = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")
    }
    tensors = {
        t.name: (tuple(reversed(t.shape.tolist())), t.tensor_type.name, t.data.tobytes())
        for t in reader.tensors
    }
    return metadata, tensors


def contents(path: Path) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], str, bytes]]]:
    file = zgguf.read_gguf(path)
    tensors = {t.name: (t.shape, t.tensor_type.name, t.data.tobytes()) for t in file.tensors.values()}
    return file.metadata, tensors


def test_the_reader_reads_what_the_reference_reader_reads(tmp_path: Path) -> None:
    """Every metadata type gguf-py writes (each scalar, strings, arrays of numbers, of strings, of arrays), a
    non-default alignment, and tensors of several types and ranks."""
    writer = gguf.GGUFWriter(tmp_path / "all.gguf", "llama")
    writer.add_custom_alignment(64)
    for kind in gguf.GGUFValueType:
        if kind not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
            value = True if kind == gguf.GGUFValueType.BOOL else 0.25 if "FLOAT" in kind.name else 7
            writer.add_key_value(f"test.{kind.name.lower()}", value, kind)
    writer.add_key_value("test.int8_negative", -3, gguf.GGUFValueType.INT8)
    writer.add_string("test.string", "naïve ▁tokens\n")
    writer.add_array("test.floats", [0.5, -1.25, 3.0])
    writer.add_array("test.ints", [1, -2, 3])
    writer.add_array("test.strings", ["a", "", "ü b"])
    writer.add_array("test.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 256)).astype(np.float32)
    writer.add_tensor("f32", rng.normal(size=(2, 3, 5)).astype(np.float32))
    writer.add_tensor("f16", values.astype(np.float16))
    for qtype in (GGMLQuantizationType.BF16, GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0):
        writer.add_tensor(qtype.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    # gguf-py cannot quantise to Q4_K (Gemma 3's file is mostly Q4_K); any bytes are a valid block to read.
    q4_k = gguf.quants.quant_shape_to_byte_shape(values.shape, GGMLQuantizationType.Q4_K)
    writer.add_tensor("Q4_K", rng.integers(0, 256, q4_k, dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    metadata, tensors = contents(tmp_path / "all.gguf")
    expected_metadata, expected_tensors = reference_contents(tmp_path / "all.gguf")
    # The reference reader flattens an array of arrays ("FIXME" in gguf-py): that one is compared as written.
    assert expected_metadata.pop("test.nested") == [1, 2, 3]
    assert metadata.pop("test.nested") == [[1, 2], [3]]
    assert (metadata, tensors) == (expected_metadata, expected_tensors)
    assert set(tensors) == {"f32", "f16", "BF16", "Q8_0", "Q5_0", "Q4_K"}


@pytest.mark.slow  # 8-11 s: the reference reader and both readers' bytes of every tensor
def test_the_reader_reads_smollm2_as_the_reference_reader_does() -> None:
    """The real file: a 49,152-token vocabulary, its merges and scores, and 272 quantised tensors."""
    path = weights.smollm2_gguf()
    assert contents(path) == reference_contents(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"", r"not a GGUF file: it has only 0 bytes"),
        (lambda data: b"GGML" + data[4:], r"does not start with the bytes 'GGUF'"),
        (
            lambda data: data[:4] + (1).to_bytes(4, "little") + data[8:],
            r"GGUF version 1; zmaj reads versions",
        ),
        (lambda data: data[:4] + (3).to_bytes(4, "big") + data[8:], r"a big-endian GGUF file"),
        (lambda data: data[:100], r"ends inside its header: it is truncated"),
        # The first key's length, damaged: refused before anything of that length is read.
        (lambda data: data[:24] + (2**62).to_bytes(8, "little") + data[32:], r"ends inside its header"),
        (lambda data: data[:-1000], r"tensor '[\w.]+' ends at byte \d+ of .*: the file is truncated"),
        # general.name, "tiny", made invalid UTF-8 (equal length, so the rest still parses).
        (
            lambda data: data.replace(b"tiny", b"t\xffny", 1),
            r"damaged\.gguf: a metadata string is not UTF-8 text \(byte 0xff at offset \d+\)",
        ),
    ],
)
def test_a_damaged_file_is_refused_naming_the_damage(tmp_path: Path, damage: Any, message: str) -> None:
    data = tiny_llama_file(tmp_path, tie=False).read_bytes()
    (tmp_path / "damaged.gguf").write_bytes(damage(data))
    with pytest.raises(ValueError, match=message):
        zgguf.read_gguf(tmp_path / "damaged.gguf")


def test_a_name_given_twice_or_a_bad_alignment_is_refused(tmp_path: Path) -> None:
    """Which of two values or tensors of one name would be meant? Names of equal length are written, then one
    is renamed to the other in the file's bytes (gguf-py's writer refuses duplicates)."""
    zeros = np.zeros(4, dtype=np.float32)
    path = write_gguf(
        tmp_path / "a.gguf", "llama", {"test.one": 1, "test.two": 2}, {"first": zeros, "other": zeros}
    )
    for old, new, message in (
        (b"test.two", b"test.one", r"the metadata key 'test\.one' twice"),
        (b"other", b"first", r"the tensor 'first' twice"),
    ):
        (tmp_path / "twice.gguf").write_bytes(path.read_bytes().replace(old, new, 1))
        with pytest.raises(ValueError, match=message):
            zgguf.read_gguf(tmp_path / "twice.gguf")
    path = write_gguf(tmp_path / "b.gguf", "llama", {"general.alignment": 0}, {"w": zeros})
    with pytest.raises(ValueError, match=r"general\.alignment 0, not a positive multiple of 8"):
        zgguf.read_gguf(path)


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0", "Q4_1"])
def test_dequantising_in_chunks_holds_little_beyond_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Chunks of rows (here 3 rows of 256, so the last chunk is short) give the values of the whole tensor at
    once, and the reference kernels' temporaries stay chunk-sized: ``tracemalloc`` sees numpy's allocations, not
    the torch result's."""
    qtype = GGMLQuantizationType[kind]
    values = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    path = write_gguf(tmp_path / "w.gguf", "llama", {}, {"w": quantised(values, qtype)})
    (tensor,) = zgguf.read_gguf(path).tensors.values()
    whole = gguf.quants.dequantize(tensor.data, qtype).astype(np.float32)
    monkeypatch.setattr(zgguf, "DEQUANTIZE_CHUNK", 3 * 256)
    tracemalloc.start()
    try:
        loaded = zgguf.dequantize_tensor(tensor)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert torch.equal(loaded, torch.from_numpy(whole))
    assert peak < values.nbytes / 4, f"dequantising held {peak / values.nbytes:.2f} of the result's bytes"
