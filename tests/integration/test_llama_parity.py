"""zmaj's Llama, loaded from a Hugging Face checkpoint folder, equals ``transformers``' Llama, Mistral, Qwen 2 and
Qwen 3.

Each reference is a small random model saved with ``save_pretrained`` and read back by ``zmaj.convert.hf``
alone, so the test covers the config translation, the tensor table and the model together.
"""

import copy
import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.integration import parity
from tests.unit.train.test_loop import logged
from zmaj.convert import hf
from zmaj.models import gpt, llama
from zmaj.models.common import Batch
from zmaj.nn.attention import Backend
from zmaj.nn.rope import LinearScaling, Llama3Scaling

VOCAB = 128
SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    # Larger than the usual 0.02, so attention is sharp and a wrong rotation moves the logits by ~1, not ~1e-3.
    "initializer_range": 0.1,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10_000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so that head_dim 16 has planes in all three regimes (kept, ramped, slowed).
    "original_max_position_embeddings": 32,
}
# SmolLM3Config defaults its special tokens to Llama 3's ids (pad 128004), outside the tiny vocabulary.
NO_SPECIAL_TOKENS: dict[str, Any] = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
REFERENCES: dict[str, transformers.PretrainedConfig] = {
    "llama": transformers.LlamaConfig(**SMALL, tie_word_embeddings=False),
    "llama3": transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "llama-linear": transformers.LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}
    ),
    "qwen2": transformers.Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen3": transformers.Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=True),
    # As Mistral NeMo and Small: a head_dim of its own, no sliding window.
    "mistral": transformers.MistralConfig(
        **SMALL, head_dim=24, sliding_window=None, tie_word_embeddings=False
    ),
    # SmolLM3's layers without positions (NoPE), here the second of two.
    "smollm3": transformers.SmolLM3Config(**SMALL, no_rope_layers=[1, 0], **NO_SPECIAL_TOKENS),
    # As Mistral 7B v0.1: every layer attends over its last few keys (8 of the tests' 40 tokens).
    "mistral-window": transformers.MistralConfig(**SMALL, sliding_window=8, tie_word_embeddings=True),
}
# The Llama 3 reference is saved in shards, to read a checkpoint through its index.
SHARDED = {"llama3"}


def reference_model(name: str) -> transformers.PreTrainedModel:
    return parity.random_reference(REFERENCES[name])


@pytest.fixture(scope="module", params=list(REFERENCES))
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[transformers.PreTrainedModel, Path]:
    model = reference_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, max_shard_size="40KB" if request.param in SHARDED else "50GB")
    assert (folder / "model.safetensors.index.json").exists() == (request.param in SHARDED)
    return model, folder


def logits_of(model: transformers.PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(tokens).logits
    return logits


def load(folder: Path, backend: Backend = "sdpa") -> tuple[llama.LlamaConfig, Any]:
    config, params = hf.load_hf(folder)
    assert isinstance(config, llama.LlamaConfig)
    return config.model_copy(update={"attention": backend}), params


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_equal_transformers(
    saved: tuple[transformers.PreTrainedModel, Path], backend: Backend
) -> None:
    model, folder = saved
    config, params = load(folder, backend)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = llama.forward(params, Batch(tokens=tokens), config)
    assert (logits - logits_of(model, tokens)).abs().max().item() <= 1e-5


def test_config_follows_the_checkpoint(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    model, folder = saved
    config, params = load(folder)
    hf_config = model.config
    assert config.tie_embeddings == hf_config.tie_word_embeddings == ("unembed" not in params)
    assert config.qkv_bias == (hf_config.model_type == "qwen2")
    assert config.qk_norm == (hf_config.model_type == "qwen3")
    assert config.head_dim == (getattr(hf_config, "head_dim", None) or 64 // 4)  # Qwen 3's and Mistral's: 24
    assert config.sliding_window == (hf_config.sliding_window if hf_config.model_type == "mistral" else None)
    smollm3 = hf_config.model_type == "smollm3"
    assert config.rope_layers == ((True, False) if smollm3 else None)
    assert all(t.dtype == torch.float32 for t in params.values(include_nested=True, leaves_only=True))


def test_padded_rows_give_the_unpadded_logits(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    model, folder = saved
    config, params = load(folder)
    parity.assert_padded_rows_give_the_unpadded_logits(
        lambda batch: llama.forward(params, batch, config), partial(logits_of, model), VOCAB, [40, 23]
    )


def test_packed_documents_give_the_logits_of_separate_runs(
    saved: tuple[transformers.PreTrainedModel, Path],
) -> None:
    model, folder = saved
    config, params = load(folder)
    parity.assert_packed_documents_give_the_logits_of_separate_runs(
        lambda batch: llama.forward(params, batch, config), partial(logits_of, model), VOCAB, (25, 15)
    )


def test_the_legacy_config_format_reads_the_same() -> None:
    """Hub checkpoints written before transformers 5 keep ``rope_theta`` and ``rope_scaling`` at the top level."""
    current = REFERENCES["llama3"].to_dict()
    legacy = {k: v for k, v in current.items() if k != "rope_parameters"}
    legacy["rope_theta"] = LLAMA3_ROPE["rope_theta"]
    legacy["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    assert hf.config_from_hf(legacy) == hf.config_from_hf(current)
    old_linear = {**REFERENCES["llama"].to_dict(), "rope_scaling": {"type": "linear", "factor": 4.0}}
    del old_linear["rope_parameters"]
    assert hf.config_from_hf(old_linear) == hf.config_from_hf(REFERENCES["llama-linear"].to_dict())


@pytest.mark.parametrize("top_level", [{}, {"rope_theta": 500.0}])
def test_rope_scaling_replaces_rope_parameters_as_in_transformers(top_level: dict[str, Any]) -> None:
    """A config with both (one version's key, another's edit) is read as transformers reads it: ``rope_scaling``
    alone, its base the top-level ``rope_theta`` or the default."""
    written = REFERENCES["llama"].to_dict() | top_level
    written["rope_parameters"] = {"rope_type": "default", "rope_theta": 100.0}
    written["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    config = hf.config_from_hf(copy.deepcopy(written))
    expected = transformers.LlamaConfig(**copy.deepcopy(written)).rope_parameters
    assert isinstance(config, llama.LlamaConfig)
    assert expected is not None
    assert expected["rope_type"] == "linear"
    assert config.rope_base == expected["rope_theta"]
    assert config.rope_scaling == LinearScaling(factor=expected["factor"])


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2", "qwen3", "mistral"])
def test_absent_keys_read_as_transformers_reads_them(name: str) -> None:
    """Each model type takes its config class's defaults: Llama a context of 2048, Qwen 2 and 3 one of 32768,
    Mistral one of 131072, and Llama 3's scaling that context as its original one."""
    written = {k: v for k, v in REFERENCES[name].to_dict().items() if k != "max_position_embeddings"}
    written["rope_parameters"] = {
        k: v for k, v in written["rope_parameters"].items() if k != "original_max_position_embeddings"
    }
    config = hf.config_from_hf(copy.deepcopy(written))
    expected = type(REFERENCES[name])(**written)
    assert isinstance(config, llama.LlamaConfig)
    assert config.context == expected.max_position_embeddings
    if isinstance(config.rope_scaling, Llama3Scaling):
        original = expected.rope_parameters["original_max_position_embeddings"]
        assert config.rope_scaling.original_max_position_embeddings == original


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral"])
def test_an_absent_key_value_head_count_reads_as_transformers_reads_it(name: str) -> None:
    """Each config class has its own default: one per query head (Llama), 32 (Qwen), 8 (Mistral). 32 query
    heads, so that every default divides them."""
    written = REFERENCES[name].to_dict() | {"num_attention_heads": 32, "head_dim": 2}
    del written["num_key_value_heads"]
    config = hf.config_from_hf(copy.deepcopy(written))
    assert isinstance(config, llama.LlamaConfig)
    assert config.n_kv_heads == type(REFERENCES[name])(**written).num_key_value_heads


def test_unknown_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"'mamba'; supported: gpt2, llama, mistral, qwen2, qwen3"):
        hf.load_hf(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "swish_v9"}, "swish_v9"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
    ],
)
def test_unsupported_switches_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf({**REFERENCES["llama"].to_dict(), **change})


def bias_names(model: transformers.PreTrainedModel) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.endswith("bias")}


@pytest.mark.parametrize("switch", ["attention_bias", "mlp_bias"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "mistral", "smollm3"])
def test_a_bias_switch_is_refused_exactly_where_transformers_builds_the_biases(
    name: str, switch: str
) -> None:
    """Mistral builds no biases and Qwen 2 its q/k/v ones alone, whatever the config says, and Qwen 3 has no MLP
    biases: a config that sets a switch its model never reads is the ordinary model, not one zmaj cannot
    compute; where the model reads it, the biases it would build are refused."""
    written = REFERENCES[name].to_dict() | {switch: True}
    with torch.device("meta"):
        ordinary = transformers.AutoModelForCausalLM.from_config(REFERENCES[name])
        switched = transformers.AutoModelForCausalLM.from_config(
            type(REFERENCES[name])(**copy.deepcopy(written))
        )
    if bias_names(switched) != bias_names(ordinary):
        with pytest.raises(ValueError, match=f"{name}: {switch}=True"):
            hf.config_from_hf(written)
    else:
        assert hf.config_from_hf(written) == hf.config_from_hf(REFERENCES[name].to_dict())


def test_sliding_window_layers_are_refused() -> None:
    qwen = {**REFERENCES["qwen2"].to_dict(), "layer_types": ["full_attention", "sliding_attention"]}
    with pytest.raises(ValueError, match="sliding-window"):
        hf.config_from_hf(qwen)
    # Derived: the second layer is windowed, by Qwen2Config's default window (sliding_window absent).
    qwen = {k: v for k, v in qwen.items() if k not in ("layer_types", "sliding_window")}
    qwen |= {"use_sliding_window": True, "max_window_layers": 1}
    assert transformers.Qwen2Config(**qwen).layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding-window"):
        hf.config_from_hf(qwen)


@pytest.mark.parametrize(
    ("keys", "window"),
    [
        ({"sliding_window": 16}, 16),
        ({"sliding_window": 255}, 255),
        ({"sliding_window": 256}, None),  # as long as the context (256): it never slides
        ({"sliding_window": None}, None),
        ({}, None),  # MistralConfig's default window, 4096 tokens, over this context of 256
        ({"max_position_embeddings": None}, 4096),  # the default window over the default context, 131072
        # MistralForCausalLM reads no layer types (it warns), its window being every layer's.
        ({"sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]}, 16),
    ],
)
def test_a_mistral_window_is_read_as_transformers_reads_it(keys: dict[str, Any], window: int | None) -> None:
    """Mistral 7B v0.1 attends over its last 4096 tokens in every layer; a window as long as the context is full
    attention, as in Ministral's configs, and is read as none."""
    written = {k: v for k, v in REFERENCES["mistral"].to_dict().items() if k != "sliding_window"}
    written = {k: v for k, v in (written | keys).items() if v is not None or k == "sliding_window"}
    expected = transformers.MistralConfig(**copy.deepcopy(written))
    assert expected.sliding_window == keys.get("sliding_window", 4096)
    config = hf.config_from_hf(written)
    assert isinstance(config, llama.LlamaConfig)
    assert config.context == expected.max_position_embeddings
    assert config.sliding_window == window


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"no_rope_layer_interval": 3},
        {"no_rope_layer_interval": 9},
        {"no_rope_layers": [0, 1, 1, 0, 1, 1, 1, 1]},
    ],
)
def test_smollm3_layers_without_positions_are_read_as_transformers_derives_them(keys: dict[str, Any]) -> None:
    """SmolLM3Config lists them in ``no_rope_layers`` (1: the layer rotates), or derives them from an interval
    (every 4th by default); an interval longer than the model leaves every layer rotating, read as None."""
    derived = ("no_rope_layers", "no_rope_layer_interval", "layer_types")
    written = {k: v for k, v in REFERENCES["smollm3"].to_dict().items() if k not in derived}
    written |= {"num_hidden_layers": 8} | keys
    expected = transformers.SmolLM3Config(**copy.deepcopy(written)).no_rope_layers
    assert expected is not None
    config = hf.config_from_hf(written)
    assert isinstance(config, llama.LlamaConfig)
    assert config.rope_layers == (None if all(expected) else tuple(bool(v) for v in expected))
    assert (config.rope_layers is None) == (keys.get("no_rope_layer_interval") == 9)


def test_smollm3_keys_left_out_read_as_its_config_class_reads_them() -> None:
    """SmolLM3Config's own defaults: a tied unembedding, 4 key/value heads (of 32 query heads here), a RoPE base
    of 2,000,000; and a longer no_rope_layers list is cut to the layers there are."""
    absent = ("tie_word_embeddings", "num_key_value_heads", "rope_parameters")
    written = {k: v for k, v in REFERENCES["smollm3"].to_dict().items() if k not in absent}
    written |= {"num_attention_heads": 32, "head_dim": 2}
    expected = transformers.SmolLM3Config(**copy.deepcopy(written))
    config = hf.config_from_hf(written)
    assert isinstance(config, llama.LlamaConfig)
    assert (config.tie_embeddings, config.n_kv_heads) == (
        expected.tie_word_embeddings,
        expected.num_key_value_heads,
    )
    assert (config.tie_embeddings, config.n_kv_heads) == (True, 4)
    assert expected.rope_parameters is not None
    assert config.rope_base == expected.rope_parameters["rope_theta"] == 2_000_000.0
    longer = hf.config_from_hf(written | {"no_rope_layers": [1, 0, 1], "layer_types": None})
    assert isinstance(longer, llama.LlamaConfig)
    assert longer.rope_layers == (True, False)


@pytest.mark.parametrize("no_rope_layers", [[1, 1], [0, 0]])
def test_smollm3_windows_its_layers_without_positions_alone(no_rope_layers: list[int]) -> None:
    """SmolLM3Config derives a window for the NoPE layers only: with every layer rotating, a window switched on
    windows none of them (read as full attention); with none rotating, every one (refused)."""
    derived = ("no_rope_layers", "no_rope_layer_interval", "layer_types")
    written = {k: v for k, v in REFERENCES["smollm3"].to_dict().items() if k not in derived}
    written |= {"use_sliding_window": True, "sliding_window": 16, "no_rope_layers": no_rope_layers}
    layer_types = transformers.SmolLM3Config(**copy.deepcopy(written)).layer_types
    assert layer_types == ["sliding_attention" if v == 0 else "full_attention" for v in no_rope_layers]
    if "sliding_attention" in layer_types:
        with pytest.raises(ValueError, match="sliding-window layers are not supported"):
            hf.config_from_hf(written)
    else:
        config = hf.config_from_hf(written)
        assert isinstance(config, llama.LlamaConfig)
        assert (config.sliding_window, config.rope_layers) == (None, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"no_rope_layers": [1]}, r"no_rope_layers is \[1\], not an integer for each of 2 layers"),
        ({"no_rope_layers": [1.0, 0.0]}, "not an integer for each of 2 layers"),
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding-window layers are not supported"),
    ],
)
def test_smollm3_settings_zmaj_cannot_read_are_refused(change: dict[str, Any], message: str) -> None:
    """A windowed NoPE layer (SmolLM3Config windows those alone) would attend over every key here."""
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf({**REFERENCES["smollm3"].to_dict(), **change, "layer_types": None})


def corrupt(tmp_path: Path, edit: Any) -> Path:
    """A saved Qwen 3 checkpoint whose tensors ``edit`` has changed."""
    reference_model("qwen3").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file(edit(tensors), tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.k_norm.weight"
    folder = corrupt(tmp_path, lambda tensors: {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match=re.escape(name)):
        hf.load_hf(folder)


def test_a_misshapen_tensor_is_named(tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    folder = corrupt(tmp_path, lambda tensors: {**tensors, name: tensors[name][:-1].contiguous()})
    with pytest.raises(ValueError, match=re.escape(name) + r".*\(127, 64\).*\(128, 64\)"):
        hf.load_hf(folder)


def test_a_gpt2_folder_loads_through_the_same_entry_point(tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path)
    zmaj_config, params = hf.load_hf(tmp_path)
    assert isinstance(zmaj_config, gpt.GPTConfig)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = gpt.forward(params, Batch(tokens=tokens), zmaj_config)
    assert (logits - logits_of(model, tokens)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_a_tied_config_beside_a_stored_head_of_its_own_reads_as_transformers_reads_it(
    tmp_path: Path, name: str
) -> None:
    """``transformers`` believes the weights over ``tie_word_embeddings: true`` when the checkpoint stores an
    ``lm_head.weight`` that differs from the embedding; zmaj dropped that matrix (logits off by ~1)."""
    torch.manual_seed(0)
    if name == "gpt2":
        gpt2 = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False
        )
        transformers.GPT2LMHeadModel(gpt2).save_pretrained(tmp_path)
    else:
        reference_model(name).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(written | {"tie_word_embeddings": True}))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, params = hf.load_hf(tmp_path)
    assert not config.tie_embeddings
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        if isinstance(config, gpt.GPTConfig):
            logits = gpt.forward(params, Batch(tokens=tokens), config)
        else:
            assert isinstance(config, llama.LlamaConfig)
            logits = llama.forward(params, Batch(tokens=tokens), config)
    assert (logits - logits_of(model, tokens)).abs().max().item() <= 1e-5


def test_a_tied_checkpoint_that_also_stores_its_embedding_as_the_head_stays_tied(tmp_path: Path) -> None:
    """Some exporters write ``lm_head.weight`` beside a tied embedding, as a copy: ``transformers`` ties the two
    (one matrix), so zmaj reads it tied, without the warning an untied head of its own gets."""
    reference_model("qwen3").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    save_file(
        tensors | {"lm_head.weight": tensors["model.embed_tokens.weight"].clone()},
        tmp_path / "model.safetensors",
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with logged("WARNING") as warnings:
        config, params = hf.load_hf(tmp_path)
    assert (config.tie_embeddings, "unembed" in params, warnings) == (True, False, [])


def test_a_top_level_original_context_wins_as_in_transformers(tmp_path: Path) -> None:
    """Phi-3's layout keeps ``original_max_position_embeddings`` beside ``rope_parameters``; the model
    ``transformers`` loads lets it win over the nested value and over ``max_position_embeddings`` (zmaj read 256
    where transformers computes with 16: logits off by ~1.8 past position 16)."""
    reference_model("llama3").save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    for nested in ({}, {"original_max_position_embeddings": 32}):
        rope = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"} | nested
        changed = written | {"rope_parameters": rope, "original_max_position_embeddings": 16}
        (tmp_path / "config.json").write_text(json.dumps(changed))
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert model.config.rope_parameters["original_max_position_embeddings"] == 16
        config, params = load(tmp_path)
        tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = llama.forward(params, Batch(tokens=tokens), config)
        assert (logits - logits_of(model, tokens)).abs().max().item() <= 1e-5


def test_a_top_level_original_context_counts_only_for_llama3_scaling() -> None:
    """transformers reads the top-level key for the scalings that use one: a default-RoPE config with it null
    (which transformers loads) was refused once zmaj read it."""
    written = REFERENCES["llama"].to_dict() | {"original_max_position_embeddings": None}
    config = hf.config_from_hf(copy.deepcopy(written))
    assert isinstance(config, llama.LlamaConfig)
    assert config.rope_scaling is None
    expected = transformers.LlamaConfig(**copy.deepcopy(written)).rope_parameters
    assert expected is not None
    assert expected["rope_type"] == "default"


def test_a_checkpoint_of_mixed_dtypes_is_read_in_one(tmp_path: Path) -> None:
    """float32 norms beside bfloat16 matrices loaded as they were stored, and the first matmul of two dtypes
    failed; transformers casts the model to one dtype, config.json's."""
    folder = corrupt(
        tmp_path,
        lambda tensors: {k: v if "norm" in k else v.to(torch.bfloat16) for k, v in tensors.items()},
    )
    written = json.loads((folder / "config.json").read_text())
    for declared, dtype in (("float32", torch.float32), (None, torch.float32), ("bfloat16", torch.bfloat16)):
        (folder / "config.json").write_text(json.dumps({**written, "dtype": declared}))
        config, params = hf.load_hf(folder)
        assert {t.dtype for t in params.values(True, True)} == {dtype}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = llama.forward(params, Batch(tokens=tokens), config)  # type: ignore[arg-type]
    assert torch.equal(logits.argmax(-1), logits_of(model, tokens).argmax(-1))
