"""The Gemma 3 model: its config, its initialisation and stacking, its shell, and what its local layers can see;
parity with transformers lives in tests/integration/test_gemma3_parity.py."""

import pydantic
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from zmaj.models import gemma3
from zmaj.models.common import Batch

TINY = gemma3.Gemma3Config(
    vocab_size=64,
    context=64,
    d_model=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_ff=48,
    sliding_window=4,
    layer_types=("sliding_attention", "full_attention", "sliding_attention", "full_attention"),
)
UNTIED = TINY.model_copy(update={"tie_embeddings": False, "final_logit_softcap": 3.0})


def perturbed(config: gemma3.Gemma3Config, device: torch.device, seed: int = 0) -> TensorDict:
    """Parameters with every norm moved off zero (its identity) and larger weights, so that every part matters."""
    params = gemma3.init(config.model_copy(update={"init_std": 0.2}), seed, device)
    generator = torch.Generator().manual_seed(seed + 1)
    for key, tensor in params.items(include_nested=True, leaves_only=True):
        if "norm" in ".".join(key):
            params.set(key, 0.2 * torch.randn(tensor.shape, generator=generator).to(device))
    return params


def random_batch(rows: int, seq: int, device: torch.device) -> Batch:
    return Batch(
        tokens=torch.randint(0, 64, (rows, seq), generator=torch.Generator().manual_seed(0)).to(device)
    )


def test_config_names_the_bad_field() -> None:
    with pytest.raises(
        pydantic.ValidationError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"
    ):
        gemma3.Gemma3Config(vocab_size=10, n_heads=4, n_kv_heads=3)
    with pytest.raises(pydantic.ValidationError, match="head_dim"):
        gemma3.Gemma3Config(vocab_size=10, head_dim=7)
    with pytest.raises(pydantic.ValidationError, match=r"layer_types lists 2 layers but n_layers is 3"):
        gemma3.Gemma3Config(vocab_size=10, n_layers=3, layer_types=("sliding_attention", "full_attention"))
    with pytest.raises(pydantic.ValidationError, match="layer_types"):
        gemma3.Gemma3Config(vocab_size=10, n_layers=1, layer_types=("chunked_attention",))
    with pytest.raises(pydantic.ValidationError, match="sliding_window"):
        gemma3.Gemma3Config(vocab_size=10, sliding_window=0)
    with pytest.raises(pydantic.ValidationError, match="final_logit_softcap"):
        gemma3.Gemma3Config(vocab_size=10, final_logit_softcap=0.0)
    with pytest.raises(pydantic.ValidationError, match="attn_logit_softcap"):
        gemma3.Gemma3Config(vocab_size=10, attn_logit_softcap=0.0)
    with pytest.raises(pydantic.ValidationError, match="sdpa cannot soft-cap the scores"):
        gemma3.Gemma3Config(vocab_size=10, attn_logit_softcap=50.0, attention="sdpa")


def test_the_default_is_gemma3_270m() -> None:
    """Gemma 3 270M: 18 layers, five local to one global, 268,098,176 parameters (the count transformers gives)."""
    config = gemma3.Gemma3Config(vocab_size=262144)
    assert [i for i, sliding in enumerate(config.is_sliding) if not sliding] == [5, 11, 17]
    assert config.attention_scale == 256**-0.5
    params = gemma3.init(config, seed=0, device="meta")
    assert sum(p.numel() for p in params.values(include_nested=True, leaves_only=True)) == 268_098_176


@given(n_layers=st.integers(1, 40), pattern=st.integers(1, 8))
def test_interleaving_puts_one_global_layer_in_every_period(n_layers: int, pattern: int) -> None:
    is_global = [kind == "full_attention" for kind in gemma3.interleaved_layer_types(n_layers, pattern)]
    assert len(is_global) == n_layers
    for start in range(0, n_layers - pattern + 1, pattern):
        assert is_global[start : start + pattern] == [False] * (pattern - 1) + [True]
    assert sum(is_global) == n_layers // pattern


def test_query_scalar_defaults_to_head_dim() -> None:
    assert gemma3.Gemma3Config(vocab_size=10, head_dim=64).attention_scale == 64**-0.5
    scaled = gemma3.Gemma3Config(vocab_size=10, head_dim=64, query_pre_attn_scalar=168)
    assert scaled.attention_scale == pytest.approx(168**-0.5)


@pytest.mark.parametrize("config", [TINY, UNTIED], ids=["tied", "untied"])
def test_init_shapes_are_stacked_over_layers(device: torch.device, config: gemma3.Gemma3Config) -> None:
    params = gemma3.init(config, seed=0, device=device)
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
        "blocks.attn.q_norm.weight": (layers, hd),
        "blocks.attn.k_norm.weight": (layers, hd),
        "blocks.attn_post_norm.weight": (layers, d),
        "blocks.mlp_norm.weight": (layers, d),
        "blocks.mlp.gate.weight": (layers, ff, d),
        "blocks.mlp.up.weight": (layers, ff, d),
        "blocks.mlp.down.weight": (layers, d, ff),
        "blocks.mlp_post_norm.weight": (layers, d),
        "final_norm.weight": (d,),
    }
    if not config.tie_embeddings:
        expected["unembed.weight"] = (vocab, d)
    shapes = {".".join(key): tuple(t.shape) for key, t in params.items(include_nested=True, leaves_only=True)}
    assert shapes == expected
    assert params["blocks"].batch_size == torch.Size([layers])
    for key, tensor in params.items(include_nested=True, leaves_only=True):
        assert isinstance(tensor, torch.Tensor)
        name = ".".join(key)
        if "norm" in name:
            # (1 + w) norms start at the identity with w = 0.
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        else:
            assert tensor.std().item() == pytest.approx(config.init_std, rel=0.15), name


def test_init_is_seeded(device: torch.device) -> None:
    first = gemma3.init(TINY, seed=0, device=device)
    assert (first == gemma3.init(TINY, seed=0, device=device)).all()
    assert not torch.equal(
        first["embed", "weight"], gemma3.init(TINY, seed=1, device=device)["embed", "weight"]
    )


def test_zero_norm_weights_give_the_plain_rms_norm(device: torch.device) -> None:
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).to(device)
    normed = gemma3.rms_norm(TensorDict({"weight": torch.zeros(32, device=device)}), x, 1e-6)
    torch.testing.assert_close(normed, x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())


def test_shell_round_trips_the_parameters(device: torch.device) -> None:
    params = perturbed(UNTIED, device)
    shell = gemma3.Gemma3(UNTIED, params)
    round_trip = shell.params()
    assert set(round_trip.keys(True, True)) == set(params.keys(True, True))
    assert (round_trip == params).all()
    assert round_trip["blocks"].batch_size == params["blocks"].batch_size
    batch = random_batch(2, 10, device)
    torch.testing.assert_close(shell(batch), gemma3.forward(params, batch, UNTIED))


def test_pure_ignores_the_dropout_seed_and_backends_agree(device: torch.device) -> None:
    params = perturbed(TINY, device)
    batch = random_batch(2, 12, device)
    logits = gemma3.pure(TINY)(params, batch, dropout_seed=3)
    torch.testing.assert_close(logits, gemma3.forward(params, batch, TINY))
    eager = gemma3.forward(params, batch, TINY.model_copy(update={"attention": "eager"}))
    torch.testing.assert_close(eager, logits, atol=1e-5, rtol=1e-5)


def test_softcapped_logits_are_the_capped_plain_logits(device: torch.device) -> None:
    params = perturbed(UNTIED, device)
    batch = random_batch(2, 10, device)
    capped = gemma3.forward(params, batch, UNTIED)
    plain = gemma3.forward(params, batch, UNTIED.model_copy(update={"final_logit_softcap": None}))
    assert plain.abs().max() > 3.0 > capped.abs().max()
    torch.testing.assert_close(capped, 3.0 * torch.tanh(plain / 3.0))


@given(window=st.integers(1, 6), query=st.integers(0, 11), seed=st.integers(0, 1000))
def test_a_local_layer_sees_exactly_the_last_window_tokens(
    device: torch.device, window: int, query: int, seed: int
) -> None:
    """With one local layer, the logits at ``query`` move with the token at ``key`` iff
    ``query - window < key <= query``: the query and the ``window - 1`` tokens before it, as transformers'
    ``sliding_window_overlay`` (``kv > q - window``) has it. One global layer instead sees every earlier token."""
    local = TINY.model_copy(
        update={"n_layers": 1, "layer_types": ("sliding_attention",), "sliding_window": window}
    )
    full = local.model_copy(update={"layer_types": ("full_attention",)})
    params = perturbed(local, device, seed)
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(seed))

    # Row 0 is the sequence itself, row 1 + k has token k changed; one forward pass answers every key.
    rows = tokens.repeat(tokens.shape[1] + 1, 1)
    rows[1:] = torch.where(torch.eye(tokens.shape[1], dtype=torch.bool), (rows[1:] + 1) % 64, rows[1:])
    rows = rows.to(device)

    def keys_seen(config: gemma3.Gemma3Config) -> set[int]:
        logits = gemma3.forward(params, Batch(tokens=rows), config)[:, query]
        return {key for key in range(tokens.shape[1]) if not torch.equal(logits[1 + key], logits[0])}

    assert keys_seen(local) == set(range(max(0, query - window + 1), query + 1))
    assert keys_seen(full) == set(range(query + 1))


def test_global_and_local_layers_rotate_with_their_own_bases(device: torch.device) -> None:
    """Changing the local base changes only what local layers compute: with all layers global it has no effect."""
    params = perturbed(TINY, device)
    batch = random_batch(1, 12, device)
    all_global = TINY.model_copy(update={"layer_types": ("full_attention",) * 4})
    other_local_base = {"local_rope_base": 100.0}
    torch.testing.assert_close(
        gemma3.forward(params, batch, all_global),
        gemma3.forward(params, batch, all_global.model_copy(update=other_local_base)),
        rtol=0,
        atol=0,
    )
    assert not torch.allclose(
        gemma3.forward(params, batch, TINY),
        gemma3.forward(params, batch, TINY.model_copy(update=other_local_base)),
    )


def naive_forward(params: TensorDict, tokens: torch.Tensor, config: gemma3.Gemma3Config) -> torch.Tensor:
    """Gemma 3 written out from the paper's and the reference code's description, one sequence at a time, in
    float32 and plain tensor operations: no zmaj building block, so that a part wired wrongly in the model (a
    norm's weights swapped for another's, a residual taken from the wrong place) shows here, not only against
    transformers. RoPE in the rotate-half form (Su et al., 2021; as Gemma's code and transformers write it)."""

    def norm(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # Gemma's RMSNorm: scale by (1 + w)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps) * (1 + weight)

    def rotate(x: torch.Tensor, base: float) -> torch.Tensor:  # x: [seq, heads, head_dim]
        half = config.head_dim // 2
        frequencies = base ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.arange(x.shape[0], dtype=torch.float64)[:, None] * frequencies  # [seq, half]
        cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
        first, second = x[..., :half], x[..., half:]
        return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)

    seq, heads, kv_heads, hd = tokens.shape[0], config.n_heads, config.n_kv_heads, config.head_dim
    x = params["embed", "weight"][tokens] * config.d_model**0.5
    position = torch.arange(seq)
    for layer, sliding in enumerate(config.is_sliding):
        block = params["blocks"][layer]
        h = norm(block["attn_norm", "weight"], x)
        q = (h @ block["attn", "q", "weight"].T).view(seq, heads, hd)
        k = (h @ block["attn", "k", "weight"].T).view(seq, kv_heads, hd)
        v = (h @ block["attn", "v", "weight"].T).view(seq, kv_heads, hd)
        base = config.local_rope_base if sliding else config.rope_base
        q = rotate(norm(block["attn", "q_norm", "weight"], q), base)
        k = rotate(norm(block["attn", "k_norm", "weight"], k), base)
        visible = position[None, :] <= position[:, None]  # [query, key]
        if sliding:
            visible &= position[None, :] > position[:, None] - config.sliding_window
        out = torch.empty(seq, heads, hd)
        for head in range(heads):
            group = head // (heads // kv_heads)
            scores = (q[:, head] @ k[:, group].T) * config.query_pre_attn_scalar**-0.5
            weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[:, head] = weights @ v[:, group]
        attended = out.reshape(seq, heads * hd) @ block["attn", "o", "weight"].T
        x = x + norm(block["attn_post_norm", "weight"], attended)
        m = norm(block["mlp_norm", "weight"], x)
        gate = torch.nn.functional.gelu(m @ block["mlp", "gate", "weight"].T, approximate="tanh")
        fed = (gate * (m @ block["mlp", "up", "weight"].T)) @ block["mlp", "down", "weight"].T
        x = x + norm(block["mlp_post_norm", "weight"], fed)
    unembedding = params["embed", "weight"] if config.tie_embeddings else params["unembed", "weight"]
    logits = norm(params["final_norm", "weight"], x) @ unembedding.T
    cap = config.final_logit_softcap
    return logits if cap is None else cap * torch.tanh(logits / cap)


@pytest.mark.parametrize("config", [TINY, UNTIED], ids=["tied", "untied-softcapped"])
def test_forward_is_the_naive_formula(config: gemma3.Gemma3Config) -> None:
    """Every part moved off its identity (``perturbed``), over a sequence longer than the local window, so
    that the local and global layers see different keys."""
    params = perturbed(config, torch.device("cpu"), seed=3)
    batch = random_batch(2, 12, torch.device("cpu"))
    logits = gemma3.forward(params, batch, config.model_copy(update={"attention": "eager"}))
    for row in range(2):
        expected = naive_forward(params, batch.tokens[row], config)
        torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)
