"""zmaj's Gemma 2 (the Gemma 3 model without QK-norm, its attention scores soft-capped), loaded from a Hugging Face
checkpoint folder, equals ``transformers``' ``Gemma2ForCausalLM``.

As in ``test_gemma3_parity.py``, each reference is a small random model saved with ``save_pretrained`` and read
back by ``zmaj.convert.hf`` alone. transformers computes Gemma 2 with its eager attention only (SDPA has no
soft-cap), which is what every comparison here runs. The ``capped`` variant caps the scores at 1 and the logits
at 2, which these small random models reach, so a cap dropped or misplaced shows (the released caps, 50 and 30,
barely touch a random model's values).
"""

import copy
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open

from tests.integration import parity
from zmaj.convert import hf
from zmaj.models import gemma3
from zmaj.models.common import Batch
from zmaj.nn.attention import Backend
from zmaj.nn.rope import LinearScaling

VOCAB = 128
WINDOW = 16
LONG = 48
SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "head_dim": 32,
    "sliding_window": WINDOW,
    "max_position_embeddings": 256,
    # Larger than the usual 0.02, so attention is sharp and a wrong rotation moves the logits by ~1, not ~1e-3.
    "initializer_range": 0.1,
}
REFERENCES: dict[str, transformers.Gemma2Config] = {
    # As Gemma 2 2B: layers alternating local and global from the config's default, two query heads per key/value
    # head, tied, the released caps, query_pre_attn_scalar = head_dim.
    "gemma2": transformers.Gemma2Config(**SMALL, num_key_value_heads=2, query_pre_attn_scalar=32),
    # Every switch moved: explicit layer types, one key/value head, untied, caps these values reach, a query
    # scalar that is not head_dim, linearly scaled RoPE with another base.
    "capped": transformers.Gemma2Config(
        **SMALL,
        num_key_value_heads=1,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=False,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=2.0,
        query_pre_attn_scalar=24,
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0},
    ),
}

# The layout of the released Gemma 2 checkpoints' config.json (transformers 4.42's: top-level RoPE keys, no
# layer_types, the caps and the window spelled out), with Gemma 2 2B's sizes.
GEMMA2_2B: dict[str, Any] = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 256000,
}


def reference_model(name: str) -> transformers.PreTrainedModel:
    return parity.random_reference(REFERENCES[name], attn_implementation="eager")


@pytest.fixture(scope="module", params=list(REFERENCES))
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[transformers.PreTrainedModel, Path]:
    model = reference_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


def logits_of(model: transformers.PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(tokens).logits
    return logits


def load(folder: Path, backend: Backend = "auto") -> tuple[gemma3.Gemma3Config, Any]:
    config, params = hf.load_hf(folder)
    assert isinstance(config, gemma3.Gemma3Config)
    return config.model_copy(update={"attention": backend}), params


def tokens_of(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("length", [LONG, WINDOW - 4])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_logits_equal_transformers(
    saved: tuple[transformers.PreTrainedModel, Path], backend: Backend, length: int
) -> None:
    model, folder = saved
    config, params = load(folder, backend)
    tokens = tokens_of(length)
    with torch.no_grad():
        logits = gemma3.forward(params, Batch(tokens=tokens), config)
    assert (logits - logits_of(model, tokens)).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_compiled_flex_logits_equal_transformers(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    """Flex with the cap as its ``score_mod``, compiled as the model runs it, against transformers' eager."""
    model, folder = saved
    config, params = load(folder, "flex")
    tokens = tokens_of(LONG)
    with torch.no_grad():
        logits = gemma3.forward(params, Batch(tokens=tokens), config)
    assert (logits - logits_of(model, tokens)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("cap", ["attn_logit_softcap", "final_logit_softcap"])
def test_without_either_cap_the_logits_differ(cap: str, tmp_path: Path) -> None:
    """The check above can fail: each cap, left out, moves the capped variant's logits far past its tolerance."""
    model = reference_model("capped")
    model.save_pretrained(tmp_path)
    config, params = load(tmp_path)
    tokens = tokens_of(LONG)
    with torch.no_grad():
        logits = gemma3.forward(params, Batch(tokens=tokens), config.model_copy(update={cap: None}))
    assert (logits - logits_of(model, tokens)).abs().max().item() > 0.1


def test_bfloat16_logits_equal_transformers(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    """In bfloat16, loaded as users load it (``from_pretrained(dtype=...)``)."""
    _, folder = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    config, params = load(folder)
    tokens = tokens_of(LONG)
    with torch.no_grad():
        logits = gemma3.forward(params.bfloat16(), Batch(tokens=tokens), config)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - logits_of(model, tokens).float()).abs().max().item() <= 1e-2


def test_config_follows_the_checkpoint(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    model, folder = saved
    config, params = load(folder)
    hf_config = model.config
    assert not config.qk_norm
    assert "q_norm" not in params["blocks", "attn"]
    assert list(config.layer_types) == hf_config.layer_types
    assert config.sliding_window == WINDOW
    assert config.tie_embeddings == hf_config.tie_word_embeddings == ("unembed" not in params)
    assert config.attention_scale == hf_config.query_pre_attn_scalar**-0.5
    assert config.attn_logit_softcap == hf_config.attn_logit_softcapping
    assert config.final_logit_softcap == hf_config.final_logit_softcapping
    rope = hf_config.rope_parameters
    assert config.rope_base == config.local_rope_base == rope["rope_theta"]
    expected = LinearScaling(factor=rope["factor"]) if rope["rope_type"] == "linear" else None
    assert config.rope_scaling == config.local_rope_scaling == expected


def test_every_checkpoint_tensor_is_read(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    """The table, less Gemma 3's q/k norms, names exactly the tensors save_pretrained wrote."""
    _, folder = saved
    config, _ = load(folder)
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        stored = set(handle.keys())
    read = {
        name for key, name in hf.GEMMA3_GLOBAL_TABLE if key != "unembed.weight" or not config.tie_embeddings
    }
    read |= {
        name.format(i=i)
        for key, name in hf.GEMMA3_LAYER_TABLE
        if "q_norm" not in key and "k_norm" not in key
        for i in range(config.n_layers)
    }
    assert stored == read


def test_padded_rows_give_the_unpadded_logits(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    model, folder = saved
    config, params = load(folder)
    parity.assert_padded_rows_give_the_unpadded_logits(
        lambda batch: gemma3.forward(params, batch, config), partial(logits_of, model), VOCAB, [LONG, 29]
    )


def test_packed_documents_give_the_logits_of_separate_runs(
    saved: tuple[transformers.PreTrainedModel, Path],
) -> None:
    """Both documents are longer than the window, so the window must slide within each document alone."""
    model, folder = saved
    config, params = load(folder)
    parity.assert_packed_documents_give_the_logits_of_separate_runs(
        lambda batch: gemma3.forward(params, batch, config), partial(logits_of, model), VOCAB, (30, 18)
    )


def test_the_2b_config_reads_as_gemma_2_2b() -> None:
    """The 2B layout gives the model the module docstring spells out, with as many parameters as transformers
    builds from it."""
    config = hf.config_from_hf(GEMMA2_2B)
    assert config == gemma3.Gemma3Config(
        vocab_size=256000,
        d_model=2304,
        n_layers=26,
        n_heads=8,
        n_kv_heads=4,
        d_ff=9216,
        layer_types=gemma3.interleaved_layer_types(26, 2),
        sliding_window=4096,
        rope_base=10_000,
        qk_norm=False,
        attn_logit_softcap=50,
        final_logit_softcap=30,
        context=8192,
    )
    with torch.device("meta"):
        reference = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**GEMMA2_2B))
    assert reference.config.layer_types == list(config.layer_types)
    params = gemma3.init(config, 0, device="meta")
    assert sum(p.numel() for p in params.values(include_nested=True, leaves_only=True)) == sum(
        p.numel() for p in reference.parameters()
    )


def test_absent_keys_read_as_transformers_reads_them() -> None:
    """Gemma2Config's defaults, which are not Gemma 3's: the caps, a 1:1 pattern, 8192 positions, base 10k."""
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    written = {"model_type": "gemma2"} | {key: GEMMA2_2B[key] for key in sizes}
    config = hf.config_from_hf(copy.deepcopy(written))
    assert isinstance(config, gemma3.Gemma3Config)
    expected = transformers.Gemma2Config(**written)
    assert expected.rope_parameters is not None
    assert config.attn_logit_softcap == expected.attn_logit_softcapping == 50.0
    assert config.final_logit_softcap == expected.final_logit_softcapping == 30.0
    assert list(config.layer_types) == expected.layer_types
    assert config.context == expected.max_position_embeddings
    assert config.sliding_window == expected.sliding_window
    assert config.rope_base == config.local_rope_base == expected.rope_parameters["rope_theta"]
    assert (config.n_kv_heads, config.head_dim) == (expected.num_key_value_heads, expected.head_dim)
    assert config.query_pre_attn_scalar == expected.query_pre_attn_scalar
    # Null caps are none, as transformers reads them.
    uncapped = hf.config_from_hf(written | {"attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert isinstance(uncapped, gemma3.Gemma3Config)
    assert uncapped.attn_logit_softcap is None
    assert uncapped.final_logit_softcap is None


def test_the_legacy_rope_keys_read_the_same() -> None:
    current = REFERENCES["capped"].to_dict()
    legacy = {k: v for k, v in current.items() if k != "rope_parameters"}
    legacy |= {"rope_theta": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    assert hf.config_from_hf(legacy) == hf.config_from_hf(current)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "gemma2: attention_bias"),
        ({"use_bidirectional_attention": True}, "gemma2: use_bidirectional_attention"),
        ({"hidden_activation": "swish_v9"}, "swish_v9"),
        ({"sliding_window": None}, "gemma2: sliding-window layers need sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
        ({"attn_logit_softcapping": "50"}, "attn_logit_softcapping is '50', not a finite number"),
    ],
)
def test_unsupported_switches_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf({**REFERENCES["gemma2"].to_dict(), **change})
