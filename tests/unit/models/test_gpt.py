"""The GPT model: its config, its initialisation, packing, positions and dropout."""

import math

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zmaj.models import gpt
from zmaj.models.common import Batch
from zmaj.nn.attention import Backend
from zmaj.nn.layers import sinusoidal_positions

TINY = gpt.GPTConfig(vocab_size=64, context=32, d_model=32, n_layers=2, n_heads=4)


def test_config_names_the_bad_field() -> None:
    with pytest.raises(pydantic.ValidationError, match="d_model"):
        gpt.GPTConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(pydantic.ValidationError, match="n_layerz"):
        gpt.GPTConfig(vocab_size=10, n_layerz=2)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError, match="vocab_size"):
        gpt.GPTConfig(vocab_size=0)


def test_init_is_gpt2_style_and_seeded(device: torch.device) -> None:
    config = gpt.GPTConfig(vocab_size=256, context=64, d_model=256, n_layers=8, n_heads=4)
    params = gpt.init(config, seed=0, device=device)
    assert torch.equal(params["embed", "weight"], gpt.init(config, 0, device)["embed", "weight"])
    assert not torch.equal(params["embed", "weight"], gpt.init(config, 1, device)["embed", "weight"])
    assert params["embed", "weight"].std().item() == pytest.approx(0.02, rel=0.02)
    residual = 0.02 / math.sqrt(2 * config.n_layers)
    assert params["blocks", "attn", "o", "weight"].std().item() == pytest.approx(residual, rel=0.02)
    assert params["blocks", "mlp", "down", "weight"].std().item() == pytest.approx(residual, rel=0.02)
    assert params["blocks", "attn", "q", "weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(params["blocks", "mlp", "up", "bias"], torch.zeros(8, 1024, device=device))
    assert torch.equal(params["blocks", "attn_norm", "weight"], torch.ones(8, 256, device=device))
    assert params["blocks"].batch_size == torch.Size([8])


def test_tying_decides_whether_an_unembedding_exists() -> None:
    assert "unembed" not in gpt.init(TINY, 0)
    untied = TINY.model_copy(update={"tie_embeddings": False})
    assert gpt.init(untied, 0)["unembed", "weight"].shape == (64, 32)
    assert "positions" not in gpt.init(TINY.model_copy(update={"positions": "sinusoidal"}), 0)


def test_sinusoidal_positions_closed_form(device: torch.device) -> None:
    table = sinusoidal_positions(torch.arange(50, device=device), 16)
    for pos in (0, 7, 49):
        for i in range(8):
            angle = pos / 10_000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_packed_documents_give_the_logits_of_separate_documents(
    device: torch.device, backend: Backend, positions: str
) -> None:
    config = TINY.model_copy(update={"attention": backend, "positions": positions, "norm": "rmsnorm"})
    if backend == "flex" and device.type == "cuda":
        # Inductor's CUDA flex-attention kernel needs head_dim >= 16 ("NYI: embedding dimension ... must be at
        # least 16"); its CPU kernel takes this model's 8.
        config = config.model_copy(update={"n_heads": 2})
    params = gpt.init(config, seed=0, device=device)
    generator = torch.Generator().manual_seed(1)
    first, second = (
        torch.randint(0, 64, (1, 11), generator=generator).to(device),
        torch.randint(0, 64, (1, 7), generator=generator).to(device),
    )
    packed = Batch(
        tokens=torch.cat([first, second], 1),
        positions=torch.cat([torch.arange(11), torch.arange(7)])[None],
        document_ids=torch.cat([torch.zeros(11, dtype=torch.long), torch.ones(7, dtype=torch.long)])[None],
    ).to(device)
    logits = gpt.forward(params, packed, config)
    alone = torch.cat([gpt.forward(params, Batch(tokens=t), config) for t in (first, second)], dim=1)
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)


def test_padding_leaves_the_real_tokens_alone(device: torch.device) -> None:
    params = gpt.init(TINY, seed=0, device=device)
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(2)).to(device)
    padded = Batch(
        tokens=torch.cat([tokens, torch.zeros(1, 5, dtype=torch.long, device=device)], 1),
        is_token=torch.arange(14, device=device)[None] < 9,
    )
    logits = gpt.forward(params, padded, TINY)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[:, :9], gpt.forward(params, Batch(tokens=tokens), TINY))


@settings(max_examples=10)
@given(seed=st.integers(0, 1000))
def test_dropout_is_a_function_of_its_seed(device: torch.device, seed: int) -> None:
    config = TINY.model_copy(update={"dropout": 0.2})
    params = gpt.init(config, seed=0, device=device)
    batch = Batch(tokens=torch.arange(16, device=device)[None])
    first = gpt.forward(params, batch, config, dropout_seed=seed)
    torch.testing.assert_close(gpt.forward(params, batch, config, dropout_seed=seed), first)
    assert not torch.allclose(gpt.forward(params, batch, config, dropout_seed=seed + 1), first)
    # No seed means evaluation: dropout is the identity.
    torch.testing.assert_close(gpt.forward(params, batch, config), gpt.forward(params, batch, TINY))


def test_builds_on_the_meta_device() -> None:
    config = gpt.GPTConfig(vocab_size=50257, context=1024)
    params = gpt.init(config, seed=0, device="meta")
    n = sum(p.numel() for p in params.values(include_nested=True, leaves_only=True))
    assert n == 124_439_808  # GPT-2 small with tied embeddings
