"""zmaj's Gemma 3, loaded from a Hugging Face checkpoint folder, equals ``transformers``' ``Gemma3ForCausalLM``.

Each reference is a small random model saved with ``save_pretrained`` and read back by ``zmaj.convert.hf`` alone,
so the test covers the config translation, the tensor table and the model together. The sliding window (16) is
shorter than the longest sequences (48), so the local layers' masks differ from the global ones'.
"""

import copy
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.models.gemma3 import modeling_gemma3

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
REFERENCES: dict[str, transformers.Gemma3TextConfig] = {
    # Sliding and global layers alternate; everything else as in Gemma 3 270M (one kv head, tied, scalar = head_dim).
    # The pattern is given by its period, the old form transformers still accepts, so it derives layer_types.
    "gemma3": transformers.Gemma3TextConfig(
        **SMALL,
        num_key_value_heads=1,
        sliding_window_pattern=2,  # type: ignore[call-arg]
        query_pre_attn_scalar=32,
    ),
    # Every switch moved: explicit layer types, grouped kv heads, untied, soft-capped logits, a query scalar that
    # is not head_dim, a linearly scaled global RoPE and a non-default local base.
    "variant": transformers.Gemma3TextConfig(
        **SMALL,
        num_key_value_heads=2,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=False,
        final_logit_softcapping=2.0,
        query_pre_attn_scalar=24,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
    ),
}
# The variant is saved in shards, to read a checkpoint through its index.
SHARDED = {"variant"}

# google/gemma-3-270m's config.json as published on the Hub (transformers 4 layout: top-level RoPE keys).
GEMMA3_270M: dict[str, Any] = {
    "_sliding_window_pattern": 6,
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 640,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": 512,
    "torch_dtype": "bfloat16",
    "use_bidirectional_attention": False,
    "use_cache": True,
    "vocab_size": 262144,
}


def reference_model(name: str) -> transformers.PreTrainedModel:
    return parity.random_reference(REFERENCES[name])


@pytest.fixture(scope="module", params=list(REFERENCES))
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[transformers.PreTrainedModel, Path]:
    model = reference_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, max_shard_size="100KB" if request.param in SHARDED else "50GB")
    assert (folder / "model.safetensors.index.json").exists() == (request.param in SHARDED)
    return model, folder


def logits_of(
    model: transformers.PreTrainedModel, tokens: torch.Tensor, backend: Backend = "sdpa"
) -> torch.Tensor:
    model.set_attn_implementation(backend)
    with torch.no_grad():
        logits: torch.Tensor = model(tokens).logits
    return logits


def load(folder: Path, backend: Backend = "sdpa") -> tuple[gemma3.Gemma3Config, Any]:
    config, params = hf.load_hf(folder)
    assert isinstance(config, gemma3.Gemma3Config)
    return config.model_copy(update={"attention": backend}), params


@pytest.mark.parametrize("length", [LONG, WINDOW - 4])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_equal_transformers(
    saved: tuple[transformers.PreTrainedModel, Path], backend: Backend, length: int
) -> None:
    """Against the same attention implementation in transformers, whose eager and SDPA masks are built apart."""
    model, folder = saved
    config, params = load(folder, backend)
    tokens = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gemma3.forward(params, Batch(tokens=tokens), config)
    assert (logits - logits_of(model, tokens, backend)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_bfloat16_logits_equal_transformers(
    saved: tuple[transformers.PreTrainedModel, Path], backend: Backend
) -> None:
    """In bfloat16, loaded as users load it (``from_pretrained(dtype=...)``, which keeps the RoPE frequencies in
    float32; ``model.bfloat16()`` would round them too). Bit-exact on the CPUs tried; the tolerance leaves room
    for other kernels, while Llama's rounding order in the norms misses by ~0.07."""
    _, folder = saved
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    config, params = load(folder, backend)
    tokens = torch.randint(0, VOCAB, (2, LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gemma3.forward(params.bfloat16(), Batch(tokens=tokens), config)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - logits_of(model, tokens, backend).float()).abs().max().item() <= 1e-2


def test_config_follows_the_checkpoint(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    model, folder = saved
    config, params = load(folder)
    hf_config = model.config
    assert list(config.layer_types) == hf_config.layer_types
    assert config.sliding_window == WINDOW
    assert config.tie_embeddings == hf_config.tie_word_embeddings == ("unembed" not in params)
    assert config.attention_scale == hf_config.query_pre_attn_scalar**-0.5
    assert config.final_logit_softcap == hf_config.final_logit_softcapping
    rope = hf_config.rope_parameters
    assert config.rope_base == rope["full_attention"]["rope_theta"]
    assert config.local_rope_base == rope["sliding_attention"]["rope_theta"]
    if rope["full_attention"]["rope_type"] == "linear":
        assert config.rope_scaling == LinearScaling(factor=rope["full_attention"]["factor"])
    assert all(t.dtype == torch.float32 for t in params.values(include_nested=True, leaves_only=True))


def test_every_checkpoint_tensor_is_read(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    """The table names exactly the tensors save_pretrained wrote: none is left behind, none is invented."""
    _, folder = saved
    config, _ = load(folder)
    stored: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            stored |= set(handle.keys())
    read = {
        name for key, name in hf.GEMMA3_GLOBAL_TABLE if key != "unembed.weight" or not config.tie_embeddings
    }
    read |= {name.format(i=i) for _, name in hf.GEMMA3_LAYER_TABLE for i in range(config.n_layers)}
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


def test_the_legacy_config_format_reads_the_same() -> None:
    """Hub checkpoints written before transformers 5 keep the RoPE keys at the top level, and the oldest give only
    the period of the local/global pattern."""
    current = REFERENCES["variant"].to_dict()
    legacy = {k: v for k, v in current.items() if k != "rope_parameters"}
    legacy |= {"rope_theta": 10_000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    legacy["rope_local_base_freq"] = 100.0
    assert hf.config_from_hf(legacy) == hf.config_from_hf(current)
    periodic = {k: v for k, v in REFERENCES["gemma3"].to_dict().items() if k != "layer_types"}
    assert hf.config_from_hf(periodic) == hf.config_from_hf(REFERENCES["gemma3"].to_dict())


@pytest.mark.parametrize(
    "rope",
    [
        # Per layer type without bases: the top-level keys of older configs stand in.
        {
            "rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {}},
            "rope_theta": 100.0,
            "rope_local_base_freq": 7.0,
        },
        {"rope_parameters": {"sliding_attention": {"rope_theta": 50.0}}, "rope_theta": 100.0},
        # A legacy rope_scaling is merged over the global layers' parameters, with or without them.
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 100.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 7.0},
            },
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        },
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100.0}},
        # Parameters not given per layer type are ignored.
        {"rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5.0}, "rope_theta": 100.0},
    ],
)
def test_mixed_rope_keys_read_as_transformers_reads_them(rope: dict[str, Any]) -> None:
    written = {k: v for k, v in REFERENCES["gemma3"].to_dict().items() if k != "rope_parameters"} | rope
    config = hf.config_from_hf(copy.deepcopy(written))
    expected = transformers.Gemma3TextConfig(**copy.deepcopy(written)).rope_parameters
    assert isinstance(config, gemma3.Gemma3Config)
    assert expected is not None
    for layer_type, base, scaling in [
        ("full_attention", config.rope_base, config.rope_scaling),
        ("sliding_attention", config.local_rope_base, config.local_rope_scaling),
    ]:
        assert base == expected[layer_type]["rope_theta"]
        linear = expected[layer_type]["rope_type"] == "linear"
        assert scaling == (LinearScaling(factor=expected[layer_type]["factor"]) if linear else None)


@pytest.mark.parametrize("pattern", [{"sliding_window_pattern": 2}, {"_sliding_window_pattern": 2}, {}])
def test_layer_types_follow_the_pattern_as_transformers_reads_it(pattern: dict[str, Any]) -> None:
    """Without ``layer_types``, the period comes from ``sliding_window_pattern`` alone: the
    ``_sliding_window_pattern`` that transformers writes beside ``layer_types`` is never read back."""
    written = {
        k: v for k, v in REFERENCES["gemma3"].to_dict().items() if "pattern" not in k and k != "layer_types"
    }
    config = hf.config_from_hf(written | pattern)
    assert isinstance(config, gemma3.Gemma3Config)
    assert list(config.layer_types) == transformers.Gemma3TextConfig(**written, **pattern).layer_types


def test_absent_keys_read_as_transformers_reads_them() -> None:
    """An absent ``sliding_window`` is transformers' default window, not none; an absent size is refused by name."""
    written = {k: v for k, v in REFERENCES["gemma3"].to_dict().items() if k != "sliding_window"}
    config = hf.config_from_hf(written)
    assert isinstance(config, gemma3.Gemma3Config)
    assert config.sliding_window == transformers.Gemma3TextConfig(**written).sliding_window
    del written["hidden_size"]
    with pytest.raises(
        ValueError, match=r"^models/g/config\.json has no 'hidden_size', which gemma3_text needs$"
    ):
        hf.config_from_hf(written, "models/g/config.json")


def test_hidden_act_is_not_read() -> None:
    """Gemma3MLP applies ``hidden_activation`` alone, so a config giving only ``hidden_act`` (as Gemma 1's did)
    has the default activation."""
    written = {k: v for k, v in REFERENCES["gemma3"].to_dict().items() if k != "hidden_activation"}
    written["hidden_act"] = "gelu"
    config = hf.config_from_hf(written)
    assert isinstance(config, gemma3.Gemma3Config)
    assert transformers.Gemma3TextConfig(**written).hidden_activation == "gelu_pytorch_tanh"
    assert config.activation == "gelu_tanh"


def test_the_270m_config_reads_as_the_default_config() -> None:
    """The published 270M config gives zmaj's defaults, and as many parameters as transformers builds from it."""
    config = hf.config_from_hf(GEMMA3_270M)
    assert config == gemma3.Gemma3Config(vocab_size=262144)
    with torch.device("meta"):
        reference = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3_270M))
    assert reference.config.layer_types == list(config.layer_types)
    params = gemma3.init(config, 0, device="meta")
    assert sum(p.numel() for p in params.values(include_nested=True, leaves_only=True)) == sum(
        p.numel() for p in reference.parameters()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"hidden_activation": "swish_v9"}, "swish_v9"),
        ({"sliding_window": None}, "sliding_window"),
        # transformers keeps rope_type "default" and ignores the old key "type": the checkpoint is ambiguous.
        (
            {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 4.0}},
            "'linear' but no rope_type",
        ),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}},
            "'yarn'",
        ),
    ],
)
def test_unsupported_switches_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf({**REFERENCES["gemma3"].to_dict(), **change})


def test_norm_and_embedding_round_like_transformers_in_bfloat16() -> None:
    """Gemma multiplies by (1 + w) before casting back, and rounds sqrt(d_model) to the weights' dtype: in
    bfloat16 both differ from the obvious implementation, and both must match bit for bit."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 3072, generator=generator).bfloat16()
    norm = modeling_gemma3.Gemma3RMSNorm(3072, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(3072, generator=generator))
    norm = norm.bfloat16()
    config = gemma3.Gemma3Config(vocab_size=50, d_model=3072, n_layers=1)
    params = gemma3.init(config, 0).bfloat16()
    params["final_norm", "weight"] = norm.weight.detach()
    with torch.no_grad():
        assert torch.equal(gemma3.rms_norm(params["final_norm"], x, 1e-6), norm(x))
    embedding = modeling_gemma3.Gemma3TextScaledWordEmbedding(50, 3072, 0, embed_scale=3072**0.5)
    with torch.no_grad():
        embedding.weight.copy_(params["embed", "weight"].float())
    embedding = embedding.bfloat16()
    tokens = torch.randint(0, 50, (2, 9), generator=generator)
    with torch.no_grad():
        assert torch.equal(gemma3.embed(params, Batch(tokens=tokens), config), embedding(tokens))


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    reference_model("gemma3").save_pretrained(tmp_path)
    name = "model.layers.2.post_feedforward_layernorm.weight"
    tensors = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if k != name}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(name)):
        hf.load_hf(tmp_path)


# --- multimodal checkpoints (Gemma 3 4B and up): the language model alone ------------------------------------

# The tiniest SigLIP tower transformers builds; zmaj never reads it.
VISION = transformers.SiglipVisionConfig(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


@pytest.mark.parametrize(
    ("name", "tied"),
    [("gemma3", True), ("variant", False), ("variant", True)],
    ids=["gemma3", "untied", "retied"],
)
@pytest.mark.parametrize("layout", ["published", "transformers 5"])
def test_a_multimodal_checkpoint_reads_as_its_language_model_on_text(
    tmp_path: Path, name: str, tied: bool, layout: str
) -> None:
    """Gemma 3 4B, 12B and 27B are ``Gemma3ForConditionalGeneration`` checkpoints: a text config inside theirs,
    the language model's tensors under ``language_model.`` beside a vision tower. Read, they are the language
    model, whose logits on text are the multimodal model's; the tensors' names as published, or as transformers 5
    names them in memory. The outer config's ``tie_word_embeddings`` ties, whatever the text config says
    ("retied": an untied text config inside a tied model, whose checkpoint then stores no unembedding)."""
    torch.manual_seed(0)
    config = transformers.Gemma3Config(
        tie_word_embeddings=tied,
        text_config=text_config(name),
        vision_config=VISION.to_dict(),
        mm_tokens_per_image=1,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
    )
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.language_model.load_state_dict(reference_model(name).model.state_dict())
        model.lm_head.load_state_dict(reference_model(name).lm_head.state_dict())
    model.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert any(key.startswith("vision_tower.") for key in stored)
    if layout == "transformers 5":
        renamed = {
            re.sub(r"^language_model\.model\.", "model.language_model.", k): v for k, v in stored.items()
        }
        renamed = {re.sub(r"^language_model\.lm_head\.", "lm_head.", k): v for k, v in renamed.items()}
        save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    zmaj_config, params = load(tmp_path)
    assert zmaj_config == load_text_only(name).model_copy(update={"tie_embeddings": tied})
    tokens = torch.randint(0, VOCAB - 3, (2, LONG), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gemma3.forward(params, Batch(tokens=tokens), zmaj_config)
        expected = model(input_ids=tokens).logits
    assert (logits - expected).abs().max().item() <= 1e-5


def text_config(name: str) -> dict[str, Any]:
    """A reference's config as a multimodal checkpoint's text config: without the final soft-cap, which
    Gemma3ForConditionalGeneration never applies (test_a_multimodal_soft_cap_is_refused)."""
    return REFERENCES[name].to_dict() | {"final_logit_softcapping": None}


def load_text_only(name: str) -> gemma3.Gemma3Config:
    config = hf.config_from_hf(text_config(name))
    assert isinstance(config, gemma3.Gemma3Config)
    return config.model_copy(update={"attention": "sdpa"})


def test_a_multimodal_soft_cap_is_refused() -> None:
    """transformers' two Gemma 3 classes disagree on it: the multimodal one's forward leaves the cap out."""
    text = REFERENCES["variant"].to_dict()
    assert text["final_logit_softcapping"] == 2.0
    with pytest.raises(ValueError, match="does not apply it where Gemma3ForCausalLM does"):
        hf.config_from_hf({"model_type": "gemma3", "text_config": text})


def test_a_multimodal_config_without_tie_word_embeddings_ties_as_gemma3_config_does() -> None:
    """Gemma3Config ties the unembedding unless told otherwise, whatever its text config says."""
    text = text_config("variant") | {"tie_word_embeddings": False}
    assert transformers.Gemma3Config(text_config=copy.deepcopy(text)).tie_word_embeddings
    config = hf.config_from_hf({"model_type": "gemma3", "text_config": text})
    assert isinstance(config, gemma3.Gemma3Config)
    assert config.tie_embeddings


def test_a_multimodal_configs_left_out_sizes_are_gemma3_text_configs_defaults() -> None:
    """Gemma 3 4B's text_config lists its width, depth and MLP width and leaves the rest to Gemma3TextConfig."""
    defaults = transformers.Gemma3TextConfig()
    assert {key: getattr(defaults, key) for key in hf.GEMMA3_TEXT_SIZES} == hf.GEMMA3_TEXT_SIZES
    four_b: dict[str, Any] = {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
    }
    config = hf.config_from_hf({"model_type": "gemma3", "text_config": four_b})
    expected = transformers.Gemma3TextConfig(**four_b)
    assert isinstance(config, gemma3.Gemma3Config)
    assert (config.vocab_size, config.n_heads, config.n_kv_heads, config.head_dim) == (
        expected.vocab_size,
        expected.num_attention_heads,
        expected.num_key_value_heads,
        expected.head_dim,
    )
    with pytest.raises(ValueError, match=r"text_config\.model_type is 'llama', not 'gemma3_text'"):
        hf.config_from_hf({"model_type": "gemma3", "text_config": four_b | {"model_type": "llama"}})
