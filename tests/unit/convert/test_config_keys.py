"""Config keys the tiny test files and models leave at their defaults, read and written: a loader that ignored
one (or an export that dropped one) passed every parity test, since both sides then had the default."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from transformers.activations import ACT2FN

from zmaj.convert import gguf as zgguf
from zmaj.convert import hf
from zmaj.models import gemma3
from zmaj.models.gpt import GPTConfig
from zmaj.nn.layers import activation
from zmaj.nn.rope import LinearScaling

# --- GGUF metadata that the tiny test files leave at its default ---------------------------------------------


def gguf_file(architecture: str, n_layers: int, metadata: dict[str, Any]) -> zgguf.GGUFFile:
    """A GGUF file's header alone: the config reads metadata and the tensors' names, never their bytes."""
    empty = np.zeros((0,), dtype=np.uint8)
    tensors = {
        name: zgguf.GGUFTensor(name, (0,), GGMLQuantizationType.F32, empty)
        for name in (f"blk.{i}.attn_norm.weight" for i in range(n_layers))
    }
    common = {"tokenizer.ggml.tokens": [f"t{i}" for i in range(16)]}
    return zgguf.GGUFFile(common | metadata, tensors, Path(f"{architecture}.gguf"))


def gemma3_metadata(n_layers: int, **changes: Any) -> dict[str, Any]:
    keys = {
        "general.architecture": "gemma3",
        "gemma3.context_length": 256,
        "gemma3.embedding_length": 64,
        "gemma3.block_count": n_layers,
        "gemma3.feed_forward_length": 32,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 8,  # not 64 / 4: the two scales below differ
        "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.attention.sliding_window": 16,
    }
    return keys | {f"gemma3.{key}": value for key, value in changes.items()}


def test_gemma3_27b_files_scale_scores_by_d_model_over_heads() -> None:
    """llama.cpp scales Gemma 3 27B's scores by (d_model / n_heads) ** -0.5 (its query_pre_attn_scalar is 168,
    its head_dim 128), every other size by head_dim ** -0.5. Only the 62-layer count tells the 27B apart; a
    loader that always took head_dim gave the 27B the wrong softmax temperature in every layer."""
    big = zgguf.config_from_gguf(gguf_file("gemma3", 62, gemma3_metadata(62)))
    small = zgguf.config_from_gguf(gguf_file("gemma3", 26, gemma3_metadata(26)))
    assert isinstance(big, gemma3.Gemma3Config)
    assert isinstance(small, gemma3.Gemma3Config)
    assert (big.query_pre_attn_scalar, small.query_pre_attn_scalar) == (16.0, 8.0)


def test_gemma3_rope_bases_and_epsilon_are_read_from_the_file() -> None:
    """The tiny Gemma 3 test file writes the default bases (1e6 global, none local) and epsilon (1e-6), so a
    loader that ignored ``rope.freq_base``, ``rope.freq_base_swa`` or ``layer_norm_rms_epsilon`` passed; a
    fine-tune with other values would load mis-rotated, or with every norm slightly off."""
    keys = gemma3_metadata(
        6,
        **{
            "rope.freq_base": 500_000.0,
            "rope.freq_base_swa": 20_000.0,
            "attention.layer_norm_rms_epsilon": 1e-5,
        },
    )
    config = zgguf.config_from_gguf(gguf_file("gemma3", 6, keys))
    assert isinstance(config, gemma3.Gemma3Config)
    assert (config.rope_base, config.local_rope_base, config.norm_eps) == (500_000.0, 20_000.0, 1e-5)


def test_a_llama_file_with_its_own_head_dim_reads_it() -> None:
    """``llama.attention.key_length`` sets head_dim apart from d_model / n_heads (Mistral NeMo: 5120 / 32 = 160,
    but 128). The tiny test file omits the key, so a loader that ignored it passed, and NeMo's q/k/v would be
    refused as misshapen."""
    keys = {
        "general.architecture": "llama",
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 32,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.attention.key_length": 32,
        "llama.rope.dimension_count": 32,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
    }
    config = zgguf.config_from_gguf(gguf_file("llama", 2, keys))
    assert config.head_dim == 32


# --- Hugging Face configs, both directions ----------------------------------------------------------------------

GEMMA3_BOTH_SCALED = gemma3.Gemma3Config(
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    d_ff=64,
    rope_scaling=LinearScaling(factor=8.0),
    local_rope_scaling=LinearScaling(factor=2.0),
)


def test_every_gemma3_setting_survives_the_config_round_trip() -> None:
    """The export tests use Gemma configs whose local layers are unscaled, so an export that wrote the local
    layers' RoPE without their scaling passed, and transformers then rotated them unscaled: other logits past
    the first positions, with no error."""
    assert hf.config_from_hf(hf.config_to_hf(GEMMA3_BOTH_SCALED)) == GEMMA3_BOTH_SCALED


def test_gemma3_absent_keys_take_transformers_defaults() -> None:
    """Each key a Gemma 3 ``config.json`` may omit, read as ``Gemma3TextConfig`` fills it in (its default
    ``num_key_value_heads`` is 4, not the 270M model's 1; without ``layer_types`` or ``sliding_window_pattern``,
    every sixth layer is global)."""
    sizes: dict[str, Any] = {
        "model_type": "gemma3_text",
        "vocab_size": 64,
        "hidden_size": 32,
        # Twelve layers: two periods of the default pattern, five local layers to one global.
        "num_hidden_layers": 12,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    config = hf.config_from_hf(sizes)
    reference = transformers.Gemma3TextConfig(**sizes)
    assert isinstance(config, gemma3.Gemma3Config)
    assert config.layer_types == tuple(reference.layer_types or ())
    assert (config.n_kv_heads, config.head_dim, config.query_pre_attn_scalar, config.sliding_window) == (
        reference.num_key_value_heads,
        reference.head_dim,
        reference.query_pre_attn_scalar,
        reference.sliding_window,
    )
    assert (config.norm_eps, config.tie_embeddings, config.context) == (
        reference.rms_norm_eps,
        reference.tie_word_embeddings,
        reference.max_position_embeddings,
    )


def test_qwen3_absent_head_dim_is_transformers_128() -> None:
    """Qwen3Config's head_dim defaults to 128, not hidden_size / heads (here 8): a config without the key read
    as the latter refuses every q/k/v tensor as misshapen."""
    sizes: dict[str, Any] = {
        "model_type": "qwen3",
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    }
    assert hf.config_from_hf(sizes).head_dim == transformers.Qwen3Config(**sizes).head_dim == 128


@pytest.mark.parametrize("null", [False, True])
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_absent_key_value_heads_and_epsilon_are_transformers_defaults(model_type: str, null: bool) -> None:
    """Qwen2Config and Qwen3Config default an absent count to 32 key/value heads, a null one (and LlamaConfig
    either) to the query heads' count: read as the latter, a Qwen config without the key refused a checkpoint
    that transformers loads."""
    sizes: dict[str, Any] = {
        **({"num_key_value_heads": None} if null else {}),
        "model_type": model_type,
        "vocab_size": 64,
        "hidden_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 64,
        "intermediate_size": 64,
        "head_dim": 8,
    }
    reference = transformers.AutoConfig.for_model(**sizes)
    config = hf.config_from_hf(sizes)
    assert config.n_kv_heads == reference.num_key_value_heads
    assert reference.num_key_value_heads == (64 if model_type == "llama" or null else 32)
    # Every real config.json writes rms_norm_eps, so a wrong default for it passed every parity test.
    assert config.norm_eps == reference.rms_norm_eps


def test_gpt2_absent_keys_take_transformers_defaults() -> None:
    """A GPT-2 ``config.json`` without ``layer_norm_epsilon`` or ``activation_function`` is read as
    ``GPT2Config`` fills them in; the activation is compared by its values, as ``transformers`` computes it."""
    sizes: dict[str, Any] = {
        "model_type": "gpt2",
        "vocab_size": 64,
        "n_positions": 16,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
    }
    config = hf.config_from_hf(sizes)
    reference = transformers.GPT2Config(**sizes)
    assert isinstance(config, GPTConfig)
    assert config.norm_eps == reference.layer_norm_epsilon
    x = torch.linspace(-6, 6, 1001)
    expected = ACT2FN[reference.activation_function](x)
    assert (activation(config.activation, x) - expected).abs().max().item() <= 1e-6


def test_gpt2_config_carries_its_epsilon_and_dropout_both_ways() -> None:
    """The GPT-2 parity and export tests keep GPT-2's default epsilon (1e-5) and no dropout, so a reader that
    ignored ``layer_norm_epsilon`` (every LayerNorm of a 1e-6 model slightly off) or an export that wrote
    ``embd_pdrop`` 0 (transformers then fine-tunes without the embedding dropout zmaj trained with) passed."""
    config = GPTConfig(
        vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2, norm_eps=1e-6, dropout=0.1
    )
    written = hf.config_to_hf(config)
    assert (written["embd_pdrop"], written["resid_pdrop"], written["attn_pdrop"]) == (0.1, 0.1, 0.0)
    read = hf.config_from_hf(written)
    assert isinstance(read, GPTConfig)
    assert read.norm_eps == 1e-6
