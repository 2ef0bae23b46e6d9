"""The GPT model: its config, its initialisation, packing, positions and dropout."""

import math

import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from tests.strategies import MODERN_BLOCK
from zmaj.models import gpt
from zmaj.models.common import Batch
from zmaj.nn import layers
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


def test_dropout_falls_on_the_embeddings_and_each_residual_branch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GPTConfig.dropout``'s promise, as nanoGPT places it: once on the embeddings, then on every layer's
    attention and MLP output before each is added to the residual stream (a branch that lost its dropout
    passed the test of seeds above)."""
    config = TINY.model_copy(update={"dropout": 0.2, "n_layers": 3})
    params = gpt.init(config, seed=0)
    batch = Batch(tokens=torch.arange(16)[None])
    seen: list[tuple[int, ...]] = []
    original = layers.dropout

    def recording(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return original(x, p, generator)

    monkeypatch.setattr(gpt, "dropout", recording)
    gpt.forward(params, batch, config, dropout_seed=3)
    assert seen == [(1, 16, config.d_model)] * (1 + 2 * config.n_layers)


def test_builds_on_the_meta_device() -> None:
    config = gpt.GPTConfig(vocab_size=50257, context=1024)
    params = gpt.init(config, seed=0, device="meta")
    n = sum(p.numel() for p in params.values(include_nested=True, leaves_only=True))
    assert n == 124_439_808  # GPT-2 small with tied embeddings


# The logits of two configs without any of the modern options, recorded before those options existed: the last
# position's first four logits of two random rows, and the sum of all logits (float64).
RECORDED_GPT2 = (
    [
        [-0.21947692334651947, -0.14485211670398712, -0.032796602696180344, 0.08335933089256287],
        [-0.05299925431609154, 0.004848994314670563, 0.02669621631503105, 0.01245892234146595],
    ],
    -2.9841885419155005,
)
RECORDED_SINUSOIDAL_RMSNORM = (
    [
        [0.07783973217010498, -0.014811260625720024, 0.12393508106470108, 0.09220251441001892],
        [0.08538569509983063, -0.014362804591655731, 0.1230117604136467, 0.08510429412126541],
    ],
    -42.532628613407724,
)


@pytest.mark.parametrize(
    ("update", "recorded"),
    [
        ({}, RECORDED_GPT2),
        (
            {
                "bias": False,
                "tie_embeddings": False,
                "norm": "rmsnorm",
                "positions": "sinusoidal",
                "activation": "relu",
            },
            RECORDED_SINUSOIDAL_RMSNORM,
        ),
    ],
)
def test_configs_without_the_new_options_compute_what_they_did(
    update: dict[str, object], recorded: tuple[list[list[float]], float]
) -> None:
    config = TINY.model_copy(update=update)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = gpt.forward(gpt.init(config, 0), Batch(tokens=tokens), config)
    last, total = recorded
    torch.testing.assert_close(logits[:, -1, :4], torch.tensor(last), rtol=0, atol=1e-6)
    assert logits.double().sum().item() == pytest.approx(total, abs=1e-4)


MODERN = TINY.model_copy(
    update={
        **MODERN_BLOCK,
        "n_layers": 4,
        "bias": False,
        "unembed_init": "zero",
        "logit_softcap": 3.0,
        "value_embeds": 2,
    }
)


def test_config_refuses_options_that_contradict_each_other() -> None:
    with pytest.raises(pydantic.ValidationError, match="unembed_init=zero needs tie_embeddings=false"):
        gpt.GPTConfig(vocab_size=64, unembed_init="zero")
    with pytest.raises(pydantic.ValidationError, match="positions=rope needs an even head_dim"):
        gpt.GPTConfig(vocab_size=64, d_model=30, n_heads=2, positions="rope")
    with pytest.raises(
        pydantic.ValidationError, match=r"positions=sinusoidal needs an even d_model .*, got 9"
    ):
        gpt.GPTConfig(vocab_size=64, d_model=9, n_heads=3, positions="sinusoidal")
    with pytest.raises(pydantic.ValidationError, match=r"value_embeds=3 .* at most n_layers / 2 \(2\)"):
        gpt.GPTConfig(vocab_size=64, n_layers=5, value_embeds=3)
    with pytest.raises(pydantic.ValidationError, match="logit_softcap"):
        gpt.GPTConfig(vocab_size=64, logit_softcap=0.0)


def test_options_add_parameters_and_never_redraw_gpt2s() -> None:
    params, plain = gpt.init(MODERN, 0), gpt.init(MODERN.model_copy(update={"unembed_init": "normal"}), 0)
    layers, head_dim = MODERN.n_layers, MODERN.head_dim
    assert params["blocks", "attn", "q_norm", "weight"].shape == (layers, head_dim)
    assert torch.equal(params["blocks", "attn", "k_norm", "weight"], torch.ones(layers, head_dim))
    assert params["value_embeds", "weight"].shape == (2, 64, 32)
    assert params["value_embeds", "weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(params["unet_skips", "weight"], torch.ones(2))
    assert torch.equal(params["unembed", "weight"], torch.zeros(64, 32))
    assert "positions" not in params
    assert plain["unembed", "weight"].std().item() == pytest.approx(0.02, rel=0.1)
    # Every parameter GPT-2 (without biases or positions) has is drawn exactly as it would be without the options.
    gpt2 = gpt.init(TINY.model_copy(update={"n_layers": 4, "bias": False, "norm": "rmsnorm"}), 0)
    for key, tensor in gpt2.items(include_nested=True, leaves_only=True):
        if key[0] != "positions":
            assert torch.equal(params.get(key), tensor), key  # type: ignore[arg-type]
    meta = gpt.init(MODERN, 0, device="meta")
    assert {k: v.shape for k, v in meta.items(True, True)} == {
        k: v.shape for k, v in params.items(True, True)
    }
    assert meta["blocks"].batch_size == torch.Size([layers])


def test_value_embed_and_skip_layouts() -> None:
    config = gpt.GPTConfig(vocab_size=8, n_layers=7, value_embeds=3, unet_skips=True)
    assert config.value_embed_tables == (0, 1, 2, None, 0, 1, 2)
    assert config.unet_skip_sources == (None, None, None, None, 2, 1, 0)
    assert gpt.GPTConfig(vocab_size=8, n_layers=4).unet_skip_sources == (None,) * 4


def naive_forward(params: TensorDict, tokens: torch.Tensor, config: gpt.GPTConfig) -> torch.Tensor:
    """The GPT written out one formula at a time, with no zmaj function: nanoGPT's loop plus each option.

    RoPE as complex multiplication: features ``j`` and ``j + head_dim/2`` are the real and imaginary parts of
    one number, turned by ``e^(i m theta_j)``, ``theta_j = base^(-2j/head_dim)`` (RoFormer, eq. 34, in the
    rotate-half pairing of Hugging Face's Llama).
    """
    n_layers, heads, head_dim = config.n_layers, config.n_heads, config.head_dim
    seq, eps = tokens.shape[1], config.norm_eps

    def norm(p: TensorDict, x: torch.Tensor) -> torch.Tensor:
        if config.norm == "layernorm":
            centred = x - x.mean(-1, keepdim=True)
            out = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * p["weight"]
            return out + p["bias"] if "bias" in p else out
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * p["weight"]

    def dense(p: TensorDict, x: torch.Tensor) -> torch.Tensor:
        return x @ p["weight"].T + p.get("bias", 0)

    def act(x: torch.Tensor) -> torch.Tensor:
        if config.activation == "relu2":
            return torch.clamp(x, min=0) ** 2
        assert config.activation == "gelu_tanh"
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def rotate(x: torch.Tensor) -> torch.Tensor:  # [batch, seq, heads, head_dim]
        half = head_dim // 2
        theta = config.rope_base ** (-2 * torch.arange(half, dtype=torch.float64) / head_dim)
        turn = torch.polar(torch.ones(seq, half, dtype=torch.float64), torch.arange(seq)[:, None] * theta)
        z = torch.complex(x[..., :half].double(), x[..., half:].double()) * turn[None, :, None]
        return torch.cat([z.real, z.imag], -1).float()

    x = params["embed", "weight"][tokens]
    if config.positions == "learned":
        x = x + params["positions", "weight"][:seq]
    elif config.positions == "sinusoidal":
        x = x + sinusoidal_positions(torch.arange(seq), config.d_model)
    outputs: list[torch.Tensor] = []
    for i in range(n_layers):
        block = params["blocks"][i]
        mirror = n_layers - 1 - i
        if config.unet_skips and mirror < i:
            x = x + params["unet_skips", "weight"][mirror] * outputs[mirror]
        h = norm(block["attn_norm"], x)
        q, k, v = (dense(block["attn", name], h).unflatten(-1, (heads, head_dim)) for name in "qkv")
        k_tables = config.value_embeds
        table = i if i < k_tables else i - (n_layers - k_tables) if i >= n_layers - k_tables else None
        if table is not None:
            v = v + params["value_embeds", "weight"][table][tokens].unflatten(-1, (heads, head_dim))
        if config.qk_norm:
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + eps) * block["attn", "q_norm", "weight"]
            k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps) * block["attn", "k_norm", "weight"]
        if config.positions == "rope":
            q, k = rotate(q), rotate(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
        future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        weights = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        attended = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(-2)
        x = x + dense(block["attn", "o"], attended)
        x = x + dense(block["mlp", "down"], act(dense(block["mlp", "up"], norm(block["mlp_norm"], x))))
        outputs.append(x)
    x = norm(params["final_norm"], x)
    logits = x @ params["embed" if config.tie_embeddings else "unembed", "weight"].T
    if config.logit_softcap is not None:
        logits = config.logit_softcap * torch.tanh(logits / config.logit_softcap)
    return logits


def shaken(params: TensorDict, seed: int) -> TensorDict:
    """``params`` with every tensor moved off its init (ones, zeros), so an option that ignored one would show."""
    generator = torch.Generator().manual_seed(seed)
    shaken = params.apply(lambda t: t + 0.1 * torch.randn(t.shape, generator=generator))
    assert shaken is not None
    return shaken


@st.composite
def modern_configs(draw: st.DrawFn) -> gpt.GPTConfig:
    """Any combination of the options, old and new, on a tiny GPT of two to five layers."""
    n_layers = draw(st.integers(2, 5))
    untied = draw(st.booleans())
    return TINY.model_copy(
        update={
            "n_layers": n_layers,
            "positions": draw(st.sampled_from(["learned", "sinusoidal", "rope"])),
            "rope_base": draw(st.sampled_from([10_000.0, 100.0])),
            "norm": draw(st.sampled_from(["layernorm", "rmsnorm"])),
            "activation": draw(st.sampled_from(["gelu_tanh", "relu2"])),
            "qk_norm": draw(st.booleans()),
            "bias": draw(st.booleans()),
            "tie_embeddings": not untied,
            "unembed_init": draw(st.sampled_from(["normal", "zero"])) if untied else "normal",
            "logit_softcap": draw(st.sampled_from([None, 1.5])),
            "value_embeds": draw(st.integers(0, n_layers // 2)),
            "unet_skips": draw(st.booleans()),
        }
    )


def test_every_option_at_once_equals_the_naive_formulas() -> None:
    """The fast version of the sweep below: all the new options together, one seed."""
    check_against_naive(MODERN.model_copy(update={"logit_softcap": 1.5}), seed=0)


@pytest.mark.slow
@settings(max_examples=25)
@given(config=modern_configs(), seed=st.integers(0, 100))
def test_every_option_combination_equals_the_naive_formulas(config: gpt.GPTConfig, seed: int) -> None:
    """25 random combinations; 310 s on 2 cores heavily shared with other work, hence slow."""
    check_against_naive(config, seed)


def check_against_naive(config: gpt.GPTConfig, seed: int) -> None:
    """Logits and every parameter's gradient, against ``naive_forward``."""
    params = shaken(gpt.init(config, seed), seed)
    tokens = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(seed))

    def loss(forward: object, p: TensorDict) -> torch.Tensor:
        logits = forward(p)  # type: ignore[operator]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    def zmaj(p: TensorDict) -> torch.Tensor:
        return gpt.forward(p, Batch(tokens=tokens), config)

    def naive(p: TensorDict) -> torch.Tensor:
        return naive_forward(p, tokens, config)

    torch.testing.assert_close(zmaj(params), naive(params), atol=2e-5, rtol=2e-5)
    grads, expected = (
        torch.func.grad(lambda p: loss(zmaj, p))(params),
        torch.func.grad(lambda p: loss(naive, p))(params),
    )
    for key, grad in expected.items(include_nested=True, leaves_only=True):
        assert grad.abs().max() > 0, f"{key} unused"
        torch.testing.assert_close(
            grads.get(key),
            grad,
            atol=2e-5,
            rtol=2e-4,
            msg=lambda m, key=key: f"{key}: {m}",  # type: ignore[misc]
        )


def test_softcap_keeps_logits_inside_the_cap() -> None:
    config = MODERN.model_copy(update={"logit_softcap": 0.5})
    params = shaken(gpt.init(config, 0), 0) * 5
    logits = gpt.forward(params, Batch(tokens=torch.arange(12)[None]), config)
    uncapped = gpt.forward(
        params, Batch(tokens=torch.arange(12)[None]), config.model_copy(update={"logit_softcap": None})
    )
    assert uncapped.abs().max() > 5
    assert logits.abs().max() <= 0.5  # tanh rounds to exactly 1 in float32 far out
    torch.testing.assert_close(logits, 0.5 * torch.tanh(uncapped / 0.5))


OPTIONS: dict[str, dict[str, object]] = {
    "rope": {"positions": "rope"},
    "qk_norm": {"qk_norm": True},
    "relu2": {"activation": "relu2"},
    "zero_unembed": {"tie_embeddings": False, "unembed_init": "zero"},
    "softcap": {"logit_softcap": 1.5},
    "value_embeds": {"n_layers": 3, "value_embeds": 1},
    "unet_skips": {"n_layers": 3, "unet_skips": True},
    "all": dict(MODERN.model_dump(exclude_defaults=True)),
}


@pytest.mark.parametrize(("option", "backend"), [(option, "eager") for option in OPTIONS] + [("all", "sdpa")])
def test_cached_decoding_equals_the_full_forward(device: torch.device, option: str, backend: Backend) -> None:
    """Prefill then one token at a time through the key/value cache, against recomputing the whole prefix."""
    from zmaj.infer.cache import init_cache

    config = TINY.model_copy(update=OPTIONS[option] | {"attention": backend})
    params = shaken(gpt.init(config, 0), 1).to(device)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3)).to(device)
    cache = init_cache(config, batch=2, max_len=10, device=device)
    logits, cache = gpt.forward_cached(params, Batch(tokens=tokens[:, :6]), cache, config)
    torch.testing.assert_close(
        logits, gpt.forward(params, Batch(tokens=tokens[:, :6]), config), atol=1e-5, rtol=1e-5
    )
    for i in range(6, 10):
        logits, cache = gpt.forward_cached(params, Batch(tokens=tokens[:, i : i + 1]), cache, config)
        full = gpt.forward(params, Batch(tokens=tokens[:, : i + 1]), config)
        torch.testing.assert_close(logits[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_a_position_past_the_learned_table_is_named() -> None:
    """Not an ``IndexError`` from the lookup: a forward pass, or a decode step into a cache longer than the
    context, names the position and the context. Sinusoidal positions have no such end."""
    from zmaj.infer.cache import init_cache

    params = gpt.init(TINY, 0)
    message = r"^position 32 is past the context of this GPT with learned positions \(32: .* rows 0 to 31\)$"
    with pytest.raises(ValueError, match=message):
        gpt.forward(params, Batch(tokens=torch.zeros(1, 33, dtype=torch.long)), TINY)
    cache = init_cache(TINY, batch=1, max_len=40)
    _, cache = gpt.forward_cached(params, Batch(tokens=torch.zeros(1, 32, dtype=torch.long)), cache, TINY)
    with pytest.raises(ValueError, match=message):
        gpt.forward_cached(params, Batch(tokens=torch.zeros(1, 1, dtype=torch.long)), cache, TINY)
    sinusoidal = TINY.model_copy(update={"positions": "sinusoidal"})
    logits = gpt.forward(
        gpt.init(sinusoidal, 0), Batch(tokens=torch.zeros(1, 33, dtype=torch.long)), sinusoidal
    )
    assert logits.shape == (1, 33, TINY.vocab_size)


def test_a_sinusoidal_gpt_runs_in_bfloat16() -> None:
    """The sinusoidal table is computed in float32; added to bfloat16 embeddings without a cast it promotes the
    residual stream to float32, and the first bfloat16 LayerNorm fails. The float64 and float32 tests cannot see
    that; this one can."""
    config = gpt.GPTConfig(
        vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2, positions="sinusoidal"
    )
    params = gpt.init(config, 0).to(torch.bfloat16)
    logits = gpt.forward(params, Batch(tokens=torch.arange(8)[None]), config)
    assert logits.dtype == torch.bfloat16
    reference = gpt.forward(params.to(torch.float32), Batch(tokens=torch.arange(8)[None]), config)
    assert (logits.float() - reference).abs().max() < 0.1


def test_dropout_takes_each_branch_output_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where dropout falls, not only how often: the embeddings, then each layer's attention output and MLP output
    themselves, before they join the residual stream (dropout of ``x + branch`` has the same count and shapes)."""
    config = TINY.model_copy(update={"dropout": 0.2, "n_layers": 3})
    params = gpt.init(config, seed=0)
    batch = Batch(tokens=torch.arange(16)[None])
    dropped: list[torch.Tensor] = []
    branches: list[torch.Tensor] = []

    def keeping(function):  # type: ignore[no-untyped-def]
        def kept(*args, **kwargs):  # type: ignore[no-untyped-def]
            branches.append(out := function(*args, **kwargs))
            return out

        return kept

    def recording(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
        dropped.append(x)
        return layers.dropout(x, p, generator)

    monkeypatch.setattr(gpt, "_merge_heads", keeping(gpt._merge_heads))
    monkeypatch.setattr(gpt, "mlp", keeping(layers.mlp))
    monkeypatch.setattr(gpt, "dropout", recording)
    gpt.forward(params, batch, config, dropout_seed=3)
    assert len(branches) == 2 * config.n_layers
    assert len(dropped) == 1 + len(branches)
    assert all(d is b for d, b in zip(dropped[1:], branches, strict=True))
