"""The Llama model: its config, its initialisation and stacking, its shell; parity with transformers lives in
tests/integration/test_llama_parity.py."""

import pydantic
import pytest
import torch

from zmaj.models import llama
from zmaj.models.common import Batch
from zmaj.nn.rope import Llama3Scaling

TINY = llama.LlamaConfig(vocab_size=64, context=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
QWEN3ISH = TINY.model_copy(update={"head_dim": 12, "qk_norm": True, "tie_embeddings": True})
QWEN2ISH = TINY.model_copy(update={"qkv_bias": True})


def test_config_names_the_bad_field() -> None:
    with pytest.raises(
        pydantic.ValidationError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"
    ):
        llama.LlamaConfig(vocab_size=10, d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(pydantic.ValidationError, match="d_model"):
        llama.LlamaConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(pydantic.ValidationError, match="head_dim"):
        llama.LlamaConfig(vocab_size=10, d_model=32, n_heads=4, head_dim=7)
    with pytest.raises(pydantic.ValidationError, match="n_layerz"):
        llama.LlamaConfig(vocab_size=10, n_layerz=2)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError, match="vocab_size"):
        llama.LlamaConfig(vocab_size=0)
    with pytest.raises(pydantic.ValidationError, match="n_kv_heads"):
        llama.LlamaConfig(vocab_size=10, n_kv_heads=0)


def test_heads_default_from_the_width() -> None:
    config = llama.LlamaConfig(vocab_size=10, d_model=48, n_heads=6)
    assert (config.head_dim, config.n_kv_heads) == (8, 6)
    # An explicit head_dim (Qwen 3) need not divide d_model.
    assert llama.LlamaConfig(vocab_size=10, d_model=30, n_heads=4, head_dim=16).head_dim == 16


def test_rope_scaling_is_parsed_by_its_type() -> None:
    config = llama.LlamaConfig.model_validate(
        {
            "vocab_size": 10,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert isinstance(config.rope_scaling, Llama3Scaling)
    with pytest.raises(pydantic.ValidationError, match="rope_type"):
        llama.LlamaConfig.model_validate(
            {"vocab_size": 10, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
        )


@pytest.mark.parametrize("config", [TINY, QWEN2ISH, QWEN3ISH], ids=["llama", "qwen2", "qwen3"])
def test_init_shapes_are_stacked_over_layers(device: torch.device, config: llama.LlamaConfig) -> None:
    params = llama.init(config, seed=0, device=device)
    layers, d, hd, ff, vocab = (
        config.n_layers,
        config.d_model,
        config.head_dim,
        config.d_ff,
        config.vocab_size,
    )
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    expected = {
        "embed.weight": (vocab, d),
        "blocks.attn_norm.weight": (layers, d),
        "blocks.attn.q.weight": (layers, q, d),
        "blocks.attn.k.weight": (layers, kv, d),
        "blocks.attn.v.weight": (layers, kv, d),
        "blocks.attn.o.weight": (layers, d, q),
        "blocks.mlp_norm.weight": (layers, d),
        "blocks.mlp.gate.weight": (layers, ff, d),
        "blocks.mlp.up.weight": (layers, ff, d),
        "blocks.mlp.down.weight": (layers, d, ff),
        "final_norm.weight": (d,),
    }
    if config.qkv_bias:
        expected |= {"blocks.attn.q.bias": (layers, q), "blocks.attn.k.bias": (layers, kv)}
        expected |= {"blocks.attn.v.bias": (layers, kv)}
    if config.qk_norm:
        expected |= {"blocks.attn.q_norm.weight": (layers, hd), "blocks.attn.k_norm.weight": (layers, hd)}
    if not config.tie_embeddings:
        expected["unembed.weight"] = (vocab, d)
    shapes = {".".join(key): tuple(t.shape) for key, t in params.items(include_nested=True, leaves_only=True)}
    assert shapes == expected
    assert params["blocks"].batch_size == torch.Size([layers])
    for key, tensor in params.items(include_nested=True, leaves_only=True):
        assert isinstance(tensor, torch.Tensor)
        name = ".".join(key)
        if "norm" in name:
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith("bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        else:
            assert tensor.std().item() == pytest.approx(config.init_std, rel=0.15), name


def test_init_is_seeded(device: torch.device) -> None:
    first = llama.init(TINY, seed=0, device=device)
    assert (first == llama.init(TINY, seed=0, device=device)).all()
    assert not torch.equal(
        first["embed", "weight"], llama.init(TINY, seed=1, device=device)["embed", "weight"]
    )


def test_shell_round_trips_the_parameters(device: torch.device) -> None:
    params = llama.init(QWEN3ISH, seed=0, device=device)
    shell = llama.Llama(QWEN3ISH, params)
    round_trip = shell.params()
    assert set(round_trip.keys(True, True)) == set(params.keys(True, True))
    assert (round_trip == params).all()
    assert round_trip["blocks"].batch_size == params["blocks"].batch_size
    batch = Batch(tokens=torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))).to(device)
    torch.testing.assert_close(shell(batch), llama.forward(params, batch, QWEN3ISH))


def test_pure_ignores_the_dropout_seed_and_backends_agree(device: torch.device) -> None:
    params = llama.init(QWEN2ISH, seed=0, device=device)
    batch = Batch(tokens=torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))).to(device)
    logits = llama.pure(QWEN2ISH)(params, batch, dropout_seed=3)
    torch.testing.assert_close(logits, llama.forward(params, batch, QWEN2ISH))
    eager = llama.forward(params, batch, QWEN2ISH.model_copy(update={"attention": "eager"}))
    torch.testing.assert_close(eager, logits, atol=1e-5, rtol=1e-5)


def test_llama2_7b_builds_on_the_meta_device() -> None:
    params = llama.init(llama.LlamaConfig(vocab_size=32000), seed=0, device="meta")
    assert sum(p.numel() for p in params.values(include_nested=True, leaves_only=True)) == 6_738_415_616
