"""Reading a Hugging Face folder's JSON files: every field that is missing, of the wrong type or not an object is
one ValueError naming the file and the field, not a ``KeyError``, ``TypeError`` or ``ZeroDivisionError``.

The configs are written by ``config_to_hf`` from small zmaj configs and then damaged; parity with ``transformers``
is in tests/integration/test_llama_parity.py and test_gemma3_parity.py.
"""

import json
import re
from pathlib import Path
from typing import Any

import pytest

from zmaj.convert import hf
from zmaj.models import gemma3, gpt, llama
from zmaj.models.registry import ModelConfig

WHERE = "models/m/config.json"
LLAMA = llama.LlamaConfig(vocab_size=128, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24)
CONFIGS: dict[str, ModelConfig] = {
    "llama": LLAMA,
    "gemma3": gemma3.Gemma3Config(
        vocab_size=128, d_model=16, n_layers=2, n_heads=2, head_dim=8, d_ff=24, sliding_window=4
    ),
    "gpt": gpt.GPTConfig(vocab_size=128, context=16, d_model=16, n_layers=2, n_heads=2, positions="learned"),
}


def test_null_sizes_read_as_transformers_reads_them() -> None:
    """``num_key_value_heads`` and ``head_dim`` null (or absent) mean one per query head and d_model / heads."""
    written = hf.config_to_hf(LLAMA) | {"num_key_value_heads": None, "head_dim": None}
    assert hf.config_from_hf(written) == LLAMA.model_copy(update={"n_kv_heads": 4})


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("llama", {"num_hidden_layers": "2"}, "num_hidden_layers is '2', not a positive integer"),
        ("llama", {"num_attention_heads": 0}, "num_attention_heads is 0, not a positive integer"),
        ("llama", {"hidden_size": 16.0}, "hidden_size is 16.0, not a positive integer"),
        ("gemma3", {"num_hidden_layers": True}, "num_hidden_layers is True, not a positive integer"),
        ("gpt", {"n_head": 0}, "n_head is 0, not a positive integer"),
    ],
)
def test_a_size_that_is_not_a_positive_integer_is_named(
    name: str, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(WHERE)}: {message}$"):
        hf.config_from_hf(hf.config_to_hf(CONFIGS[name]) | change, WHERE)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("llama", {"rope_parameters": None, "rope_theta": None}, "rope_theta is None, not a finite number"),
        ("llama", {"rms_norm_eps": "1e-5"}, "rms_norm_eps is '1e-5', not a finite number"),
        ("llama", {"hidden_act": ["silu"]}, "hidden_act is \\['silu'\\], not a string"),
        (
            "llama",
            {"layer_types": "full_attention"},
            "layer_types is 'full_attention', not a list of strings",
        ),
        (
            "llama",
            {"model_type": "qwen2", "layer_types": None, "use_sliding_window": True, "sliding_window": 4}
            | {"max_window_layers": None},
            "max_window_layers is None, not a finite number",
        ),
        (
            "gemma3",
            {"rope_parameters": None, "rope_local_base_freq": None},
            "rope_local_base_freq is None, not a finite number",
        ),
        ("gemma3", {"layer_types": 4}, "layer_types is 4, not a list of strings"),
        (
            "gemma3",
            {"layer_types": None, "sliding_window_pattern": "2"},
            "sliding_window_pattern is '2', not a positive integer",
        ),
        ("gemma3", {"hidden_activation": None}, "hidden_activation is None, not a string"),
        ("gemma3", {"query_pre_attn_scalar": None}, "query_pre_attn_scalar is None, not a finite number"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(name: str, change: dict[str, Any], message: str) -> None:
    """Each would have been a ``TypeError`` from deep inside the reading, naming neither file nor field."""
    with pytest.raises(ValueError, match=f"^{re.escape(WHERE)}: {message}$"):
        hf.config_from_hf(hf.config_to_hf(CONFIGS[name]) | change, WHERE)


def test_a_gpt2_activation_that_is_not_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^unsupported GPT-2 activation_function \['gelu'\]"):
        hf.config_from_hf(hf.config_to_hf(CONFIGS["gpt"]) | {"activation_function": ["gelu"]})


def test_a_null_partial_rotary_factor_is_an_absent_one() -> None:
    """As transformers reads it: full rotation. Any other factor but 1 is refused."""
    written = hf.config_to_hf(LLAMA)
    assert hf.config_from_hf(written | {"partial_rotary_factor": None}) == LLAMA
    rope = written["rope_parameters"] | {"partial_rotary_factor": None}
    assert hf.config_from_hf(written | {"rope_parameters": rope}) == LLAMA
    with pytest.raises(ValueError, match=r"^partial_rotary_factor 0\.5 is not supported, only 1$"):
        hf.config_from_hf(written | {"partial_rotary_factor": 0.5})


@pytest.mark.parametrize(
    ("name", "rope", "message"),
    [
        (
            "llama",
            {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0},
            " has no 'rope_parameters.low_freq_factor', which llama needs",
        ),
        (
            "gemma3",
            {"full_attention": {"rope_type": "linear", "rope_theta": 1e6}},
            " has no 'rope_parameters.full_attention.factor', which gemma3_text needs",
        ),
        ("gemma3", {"full_attention": [8.0]}, ": rope_parameters.full_attention is not a JSON object"),
    ],
)
def test_a_rope_field_missing_or_not_an_object_is_named(
    name: str, rope: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(WHERE + message)}$"):
        hf.config_from_hf(hf.config_to_hf(CONFIGS[name]) | {"rope_parameters": rope}, WHERE)


def test_a_config_that_is_not_an_object_is_named() -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(WHERE)} is not a JSON object$"):
        hf.config_from_hf([hf.config_to_hf(LLAMA)], WHERE)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ({"metadata": {}}, " has no 'weight_map', which a sharded checkpoint needs"),
        ([1, 2], " is not a JSON object"),
        ({"weight_map": ["model-1.safetensors"]}, ": weight_map is not a JSON object"),
    ],
)
def test_a_damaged_shard_index_is_named(tmp_path: Path, index: Any, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(LLAMA)))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    index_file = tmp_path / "model.safetensors.index.json"
    with pytest.raises(ValueError, match=f"^{re.escape(str(index_file) + message)}$"):
        hf.load_hf(tmp_path)
