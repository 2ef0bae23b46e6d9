"""The Llama model: its config, its initialisation and stacking, its shell; parity with transformers lives in
tests/integration/test_llama_parity.py."""

import pydantic
import pytest
import torch
from tensordict import TensorDict

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


def shaken(config: llama.LlamaConfig, seed: int = 0) -> TensorDict:
    """Parameters with every norm and bias moved off its identity and larger weights, so that every part matters."""
    params = llama.init(config.model_copy(update={"init_std": 0.2}), seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for key, tensor in params.items(include_nested=True, leaves_only=True):
        if "norm" in ".".join(key) or key[-1] == "bias":
            params.set(key, tensor + 0.2 * torch.randn(tensor.shape, generator=generator))
    return params


def naive_forward(params: TensorDict, tokens: torch.Tensor, config: llama.LlamaConfig) -> torch.Tensor:
    """Llama written out in float32 and plain tensor operations, one sequence at a time, without zmaj's building
    blocks: pre-norm blocks (RMSNorm, Zhang & Sennrich 2019), grouped-query attention with RoPE in the
    rotate-half form, a SwiGLU MLP (Shazeer, 2020); Qwen 2's q/k/v biases and Qwen 3's per-head QK-norm when the
    config has them. A part wired wrongly (a residual taken from the wrong place) shows here, not only against
    transformers."""

    def norm(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * weight

    def project(part: TensorDict, x: torch.Tensor) -> torch.Tensor:
        bias = part.get("bias", None)
        return x @ part["weight"].T + (0 if bias is None else bias)

    def rotate(x: torch.Tensor) -> torch.Tensor:  # x: [seq, heads, head_dim]
        half = config.head_dim // 2
        frequencies = config.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * frequencies
        cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
        first, second = x[..., :half], x[..., half:]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    seq, heads, kv_heads, hd = tokens.shape[0], config.n_heads, config.n_kv_heads, config.head_dim
    x = params["embed", "weight"][tokens]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for layer in range(config.n_layers):
        block = params["blocks"][layer]
        h = norm(block["attn_norm", "weight"], x)
        q = project(block["attn", "q"], h).view(seq, heads, hd)
        k = project(block["attn", "k"], h).view(seq, kv_heads, hd)
        v = project(block["attn", "v"], h).view(seq, kv_heads, hd)
        if config.qk_norm:
            q, k = norm(block["attn", "q_norm", "weight"], q), norm(block["attn", "k_norm", "weight"], k)
        q, k = rotate(q), rotate(k)
        out = torch.empty(seq, heads, hd)
        for head in range(heads):
            group = head // (heads // kv_heads)
            scores = (q[:, head] @ k[:, group].T) / hd**0.5
            out[:, head] = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v[:, group]
        x = x + project(block["attn", "o"], out.reshape(seq, heads * hd))
        m = norm(block["mlp_norm", "weight"], x)
        gated = torch.nn.functional.silu(project(block["mlp", "gate"], m)) * project(block["mlp", "up"], m)
        x = x + project(block["mlp", "down"], gated)
    unembedding = params["embed", "weight"] if config.tie_embeddings else params["unembed", "weight"]
    return norm(params["final_norm", "weight"], x) @ unembedding.T


@pytest.mark.parametrize("config", [TINY, QWEN2ISH, QWEN3ISH], ids=["llama", "qwen2", "qwen3"])
def test_forward_is_the_naive_formula(config: llama.LlamaConfig) -> None:
    """Every norm and bias off its identity (``shaken``); the full forward, whose cached twin ``test_cache``
    compares with it, so that a mistake both share shows here."""
    params = shaken(config, seed=3)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = llama.forward(params, Batch(tokens=tokens), config.model_copy(update={"attention": "eager"}))
    for row in range(2):
        torch.testing.assert_close(
            logits[row], naive_forward(params, tokens[row], config), atol=1e-5, rtol=1e-5
        )
