"""Rotary position embeddings: a rotation (norms kept), relative (scores see only position differences), equal to
complex multiplication in the half-split layout, and scaled exactly as ``transformers`` scales them."""

import math

import pydantic
import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tests import strategies
from zmaj.nn.rope import LinearScaling, Llama3Scaling, apply_rope, rope_angles, rope_frequencies

head_dims = st.sampled_from([2, 8, 16, 64])


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """``x`` of shape [batch, heads, seq, head_dim] rotated for ``positions`` of shape [batch, seq]."""
    cos, sin = rope_angles(positions, rope_frequencies(x.shape[-1], base, device=x.device))
    return apply_rope(x, cos, sin)


@given(head_dim=head_dims, seed=strategies.seeds, max_position=st.integers(0, 5000))
def test_rotation_preserves_norms(device: torch.device, head_dim: int, seed: int, max_position: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 7, head_dim, generator=generator).to(device)
    positions = torch.randint(0, max_position + 1, (2, 7), generator=generator).to(device)
    rotated = rotate(x, positions)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@given(
    head_dim=head_dims,
    seed=strategies.seeds,
    query=st.integers(0, 2000),
    key=st.integers(0, 2000),
    shift=st.integers(-2000, 2000),
)
def test_scores_depend_only_on_relative_position(
    device: torch.device, head_dim: int, seed: int, query: int, key: int, shift: int
) -> None:
    """<R(m) q, R(n) k> = <R(m + t) q, R(n + t) k> for every shift t (RoFormer section 3.4.2)."""
    shift = max(shift, -min(query, key))  # positions stay non-negative
    generator = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 1, head_dim, generator=generator, dtype=torch.float64).to(device)

    def score(m: int, n: int) -> torch.Tensor:
        return (
            rotate(q, torch.tensor([[m]], device=device)) * rotate(k, torch.tensor([[n]], device=device))
        ).sum()

    # Angles are float32, as in transformers: at position 4000 each is good to about 4000 * 2^-24.
    tolerance = 1e-3 * q.norm() * k.norm()
    assert abs(score(query, key) - score(query + shift, key + shift)) <= tolerance


@given(head_dim=head_dims, seed=strategies.seeds)
def test_equals_complex_multiplication_in_the_half_split_layout(
    device: torch.device, head_dim: int, seed: int
) -> None:
    """Feature i and feature i + head_dim/2 are the real and imaginary parts of z_i; RoPE is z_i e^(j m theta_i)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 9, head_dim, generator=generator, dtype=torch.float64).to(device)
    positions = torch.randint(0, 100, (2, 9), generator=generator).to(device)
    half = head_dim // 2
    speeds = [10_000.0 ** (-2 * i / head_dim) for i in range(half)]
    theta = torch.tensor(speeds, dtype=torch.float64, device=device)
    z = torch.complex(x[..., :half], x[..., half:])
    rotated = z * torch.polar(torch.ones_like(theta), positions[:, None, :, None] * theta)
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    # Angles are float32, as in transformers: at position 99 each is good to about 99 * 2^-24 ~ 6e-6 radians,
    # times |x| of a few units.
    torch.testing.assert_close(rotate(x, positions), expected, atol=1e-4, rtol=1e-5)


def test_position_zero_is_the_identity(device: torch.device) -> None:
    x = torch.randn(1, 2, 5, 16).to(device)
    torch.testing.assert_close(rotate(x, torch.zeros(1, 5, dtype=torch.long, device=device)), x)


TWO_PI_F32 = float(torch.tensor(2 * math.pi, dtype=torch.float32))
"""The wavelength of a head_dim-2 rotation's one plane, in float32 as the frequencies are computed."""


def hf_frequencies(rope_parameters: dict[str, float | str], head_dim: int) -> torch.Tensor:
    """transformers' inverse frequencies, from the functions its rotary embedding module calls."""
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_parameters=rope_parameters
    )
    rope_type = str(rope_parameters["rope_type"])
    if rope_type == "default":
        inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq


@pytest.mark.parametrize(
    ("head_dim", "base", "factor", "low", "high", "context"),
    [
        (128, 500_000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
        (64, 500_000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2 1B
        (16, 10_000.0, 8.0, 1.0, 4.0, 32),  # every regime in few planes
        (32, 10_000.0, 2.0, 0.5, 3.0, 100),
        # A plane's wavelength (float32 2 pi) exactly on a cut-off: the low one (context / low) in the first row,
        # the high one (context / high) in the second; the comparisons are strict where transformers' are.
        (2, 10_000.0, 8.0, 1 / TWO_PI_F32, 4 / TWO_PI_F32, 1),
        (2, 10_000.0, 8.0, 0.25 / TWO_PI_F32, 1 / TWO_PI_F32, 1),
    ],
)
def test_llama3_scaling_matches_transformers(
    head_dim: int, base: float, factor: float, low: float, high: float, context: int
) -> None:
    scaling = Llama3Scaling(
        factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=context
    )
    expected = hf_frequencies(
        {
            "rope_type": "llama3",
            "rope_theta": base,
            "factor": factor,
            "low_freq_factor": low,
            "high_freq_factor": high,
            "original_max_position_embeddings": context,
        },
        head_dim,
    )
    assert torch.equal(rope_frequencies(head_dim, base, scaling), expected)


def test_llama3_scaling_has_three_regimes(device: torch.device) -> None:
    """Closed form: short wavelengths kept, long ones divided by ``factor``, a ramp between (Llama 3 report)."""
    scaling = Llama3Scaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    plain = rope_frequencies(128, 500_000.0, device=device)
    scaled = rope_frequencies(128, 500_000.0, scaling, device=device)
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192 / 1
    assert short.any()
    assert long.any()
    assert (~short & ~long).any()
    torch.testing.assert_close(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    between = ~short & ~long
    assert ((scaled[between] < plain[between]) & (scaled[between] > plain[between] / 8)).all()


@pytest.mark.parametrize("head_dim", [16, 128])
def test_unscaled_and_linear_frequencies_match_transformers(head_dim: int) -> None:
    assert torch.equal(
        rope_frequencies(head_dim, 10_000.0),
        hf_frequencies({"rope_type": "default", "rope_theta": 10_000.0}, head_dim),
    )
    assert torch.equal(
        rope_frequencies(head_dim, 10_000.0, LinearScaling(factor=4.0)),
        hf_frequencies({"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0}, head_dim),
    )


def test_bad_settings_are_named() -> None:
    with pytest.raises(pydantic.ValidationError, match="high_freq_factor"):
        Llama3Scaling(
            factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        )
    with pytest.raises(pydantic.ValidationError, match="factor"):
        LinearScaling(factor=0.0)
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(15, 10_000.0)


def test_in_bfloat16_the_rotation_rounds_as_transformers_does() -> None:
    """cos and sin are cast to the input's dtype first: bf16 queries come out bf16 and bit for bit
    ``transformers``' (uncast, fp32 angles promote q and k to fp32 beside a bf16 v, which SDPA refuses)."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 10, 16, generator=generator).bfloat16() for _ in range(2))
    cos, sin = rope_angles(torch.arange(10)[None].expand(2, 10), rope_frequencies(16, 10_000.0))
    full_cos, full_sin = (torch.cat([t, t], dim=-1).bfloat16() for t in (cos, sin))  # as its rotary embedding
    expected_q, expected_k = transformers.models.llama.modeling_llama.apply_rotary_pos_emb(
        q, k, full_cos, full_sin
    )
    for ours, expected in ((apply_rope(q, cos, sin), expected_q), (apply_rope(k, cos, sin), expected_k)):
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, expected)
