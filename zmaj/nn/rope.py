"""Rotary position embeddings (RoPE; Su et al., 2021, "RoFormer", arXiv:2104.09864).

RoPE encodes a token's position by rotating its query and key vectors instead of adding a position vector to the
residual stream. The head dimension is split into ``head_dim / 2`` planes; plane ``i`` of the vector at position
``m`` is rotated by the angle ``m * theta_i`` with ``theta_i = base^(-2i / head_dim)`` (RoFormer section 3.2). A
rotation is orthogonal, so norms are kept, and ``<R(m) q, R(n) k> = <q, R(n - m) k>``: attention scores depend on
positions only through their difference (same section), which is what lets packed documents restart their
positions at zero.

Which two features form a plane is a convention. RoFormer and Meta's Llama code pair neighbours ``(2i, 2i + 1)``;
Hugging Face's Llama pairs feature ``i`` with ``i + head_dim / 2`` ("rotate half") and permutes the q/k projection
rows of Meta's checkpoints to match. zmaj uses the Hugging Face layout so that Llama, Qwen and Mistral checkpoints
from the Hub load without permuting any weight.

Context extension rescales the frequencies: ``linear`` divides all of them by ``factor`` (position interpolation,
Chen et al., 2023, arXiv:2306.15595); ``llama3`` divides only the low frequencies, whose wavelength exceeds the
pre-training context, and blends smoothly in between (Llama 3.1; Meta's reference is ``apply_scaling`` in
github.com/meta-llama/llama-models); ``factors`` divides each frequency by a factor of its own, the form in which
GGUF files store such a scaling (llama.cpp's ``rope_freqs``).
"""

import math
from typing import Annotated, Literal

import torch
from jaxtyping import Float, Int
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor


class LinearScaling(BaseModel):
    """Position interpolation: every frequency divided by ``factor``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rope_type: Literal["linear"] = "linear"
    factor: float = Field(gt=0)


class Llama3Scaling(BaseModel):
    """Llama 3.1's scaling: low frequencies divided by ``factor``, high ones kept, a smooth ramp between."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rope_type: Literal["llama3"] = "llama3"
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(gt=0)

    @model_validator(mode="after")
    def _ramp_has_width(self) -> "Llama3Scaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor ({self.low_freq_factor})"
            )
        return self


class FrequencyFactors(BaseModel):
    """Each plane's frequency divided by a factor of its own: llama.cpp's ``rope_freqs``, one factor per plane.

    llama.cpp's converter evaluates Llama 3.1's scaling into such factors and keeps none of its parameters, so
    these are what a GGUF file holds where the scaling is not recognisably Llama 3.1's
    (``zmaj.convert.gguf``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rope_type: Literal["factors"] = "factors"
    factors: tuple[Annotated[float, Field(gt=0)], ...] = Field(min_length=1)


RopeScaling = Annotated[LinearScaling | Llama3Scaling | FrequencyFactors, Field(discriminator="rope_type")]


def check_scaling(scaling: LinearScaling | Llama3Scaling | FrequencyFactors | None, head_dim: int) -> None:
    """A ValueError unless ``scaling`` fits heads of ``head_dim`` features: frequency factors, one per plane.
    Configs call it when they are built, so a bad ``model.json`` is refused on reading, not at the first forward."""
    if isinstance(scaling, FrequencyFactors) and len(scaling.factors) != head_dim // 2:
        raise ValueError(
            f"{len(scaling.factors)} RoPE frequency factors, but head_dim {head_dim} has {head_dim // 2} planes"
        )


def rope_frequencies(
    head_dim: int,
    base: float,
    scaling: LinearScaling | Llama3Scaling | FrequencyFactors | None = None,
    device: torch.device | str = "cpu",
) -> Float[Tensor, " half"]:
    """The rotation speed ``theta_i`` of each of the ``head_dim / 2`` planes, after any context-extension scaling.

    Computed in float32 with the same operations as ``transformers`` (``ROPE_INIT_FUNCTIONS``), so converted
    models reproduce its angles exactly.
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE rotates pairs of features, so head_dim must be even, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearScaling):
        return inv_freq / scaling.factor
    if isinstance(scaling, FrequencyFactors):
        check_scaling(scaling, head_dim)
        return inv_freq / torch.tensor(scaling.factors, dtype=torch.float32, device=device)
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: Float[Tensor, " half"], scaling: Llama3Scaling) -> Float[Tensor, " half"]:
    """Planes turning fewer than ``low_freq_factor`` times over the original context are slowed by ``factor``,
    those turning more than ``high_freq_factor`` times are kept, and between, the two blend linearly in the turn
    count. The comparisons are strict exactly where ``transformers``' are, so boundary planes agree.
    """
    context = scaling.original_max_position_embeddings
    low_freq_wavelen = context / scaling.low_freq_factor
    high_freq_wavelen = context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_angles(
    positions: Int[Tensor, "batch seq"], inv_freq: Float[Tensor, " half"]
) -> tuple[Float[Tensor, "batch seq half"], Float[Tensor, "batch seq half"]]:
    """cos and sin of every (position, plane) angle; computed once per forward pass and shared by all layers.

    Always float32: in bfloat16, an angle like ``4000 * theta_0`` would lose every digit that matters.
    """
    angles = positions[..., None].float() * inv_freq.float()
    return angles.cos(), angles.sin()


def apply_rope(
    x: Float[Tensor, "batch heads seq head_dim"],
    cos: Float[Tensor, "batch seq half"],
    sin: Float[Tensor, "batch seq half"],
) -> Float[Tensor, "batch heads seq head_dim"]:
    """Rotate each (``x[i]``, ``x[i + head_dim/2]``) plane by its angle: the rotate-half layout of HF Llama.

    cos and sin are cast to ``x``'s dtype first, as ``transformers`` does, so low-precision runs round alike.
    """
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
