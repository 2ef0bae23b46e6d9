"""GPT: a decoder-only transformer in the style of GPT-2 (Radford et al., 2019) and nanoGPT.

Token embeddings plus learned or sinusoidal positions, ``n_layers`` pre-norm blocks (attention, then MLP, each
added to the residual stream), a final norm and an unembedding that may share the embedding matrix.

The parameters are one TensorDict; the blocks are stacked along a leading ``[n_layers]`` axis, so initialising,
converting or inspecting all layers is one tensor operation. ``forward`` unbinds them once per call: autograd then
gathers the per-layer gradients with a single stack instead of one full-size scatter per layer.
"""

import math
from functools import partial
from typing import Literal

import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models.common import Batch, batch_mask
from zmaj.nn.attention import Backend, self_attention
from zmaj.nn.layers import Activation, dropout, layer_norm, mlp, rms_norm, sinusoidal_positions
from zmaj.nn.shell import Shell


class GPTConfig(BaseModel):
    """The shape of a GPT; GPT-2 small is ``GPTConfig(vocab_size=50257, context=1024)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0)
    context: int = Field(1024, gt=0, description="longest sequence; sizes the learned position table")
    d_model: int = Field(768, gt=0)
    n_layers: int = Field(12, gt=0)
    n_heads: int = Field(12, gt=0)
    d_ff: int | None = Field(None, gt=0, description="MLP width; 4 * d_model when unset")
    positions: Literal["learned", "sinusoidal"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    activation: Activation = "gelu_tanh"
    bias: bool = True
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)
    attention: Backend = "sdpa"

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "GPTConfig":
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model


def init(config: GPTConfig, seed: int, device: torch.device | str = "cpu") -> TensorDict:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit norms.

    The projections that write into the residual stream (attention output, MLP down) get std / sqrt(2 n_layers),
    so the residual's variance does not grow with depth (GPT-2 paper, section 2.3).
    """
    generator = torch.Generator().manual_seed(seed)
    std = config.init_std
    residual_std = std / math.sqrt(2 * config.n_layers)
    layers, d, ff = config.n_layers, config.d_model, config.ff_dim

    def normal(*shape: int, std: float = std) -> Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(shape, device="meta")
        return (torch.randn(shape, generator=generator) * std).to(device)

    def linear(d_out: int, d_in: int, std: float = std) -> dict[str, Tensor]:
        weights = {"weight": normal(layers, d_out, d_in, std=std)}
        if config.bias:
            weights["bias"] = torch.zeros(layers, d_out, device=device)
        return weights

    def norm(*batch: int) -> dict[str, Tensor]:
        weights = {"weight": torch.ones(*batch, d, device=device)}
        if config.norm == "layernorm" and config.bias:
            weights["bias"] = torch.zeros(*batch, d, device=device)
        return weights

    blocks = TensorDict(
        {
            "attn_norm": norm(layers),
            "attn": {
                "q": linear(d, d),
                "k": linear(d, d),
                "v": linear(d, d),
                "o": linear(d, d, std=residual_std),
            },
            "mlp_norm": norm(layers),
            "mlp": {"up": linear(ff, d), "down": linear(d, ff, std=residual_std)},
        },
        batch_size=[layers],
        device=device,
    )
    params = TensorDict(
        {"embed": {"weight": normal(config.vocab_size, d)}, "blocks": blocks, "final_norm": norm()},
        device=device,
    )
    if config.positions == "learned":
        params["positions"] = {"weight": normal(config.context, d)}
    if not config.tie_embeddings:
        params["unembed"] = {"weight": normal(config.vocab_size, d)}
    return params


def forward(
    params: TensorDictBase, batch: Batch, config: GPTConfig, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq vocab"]:
    """Next-token logits for every position. ``dropout_seed`` switches dropout on, reproducibly."""
    return unembed(params, hidden_states(params, batch, config, dropout_seed), config)


def hidden_states(
    params: TensorDictBase, batch: Batch, config: GPTConfig, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq d_model"]:
    """The final-norm residual stream, before the unembedding."""
    generator = None
    if dropout_seed is not None and config.dropout > 0:
        generator = torch.Generator(batch.tokens.device).manual_seed(dropout_seed)
    positions = batch.position_ids()
    x = params["embed", "weight"][batch.tokens]
    if config.positions == "learned":
        x = x + params["positions", "weight"][positions]
    else:
        x = x + sinusoidal_positions(positions, config.d_model).to(x.dtype)
    x = dropout(x, config.dropout, generator)

    mask = batch_mask(batch, config.attention)
    for block in params["blocks"].unbind(0):
        attn_in = _norm(block["attn_norm"], x, config)
        attn_out = self_attention(
            block["attn"], attn_in, mask, config.n_heads, config.n_heads, config.attention
        )
        x = x + dropout(attn_out, config.dropout, generator)
        mlp_out = mlp(block["mlp"], _norm(block["mlp_norm"], x, config), config.activation)
        x = x + dropout(mlp_out, config.dropout, generator)
    return _norm(params["final_norm"], x, config)


def unembed(
    params: TensorDictBase, hidden: Float[Tensor, "batch seq d_model"], config: GPTConfig
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from hidden states, through the embedding matrix itself when the two are tied."""
    weight: Tensor = params["embed", "weight"] if config.tie_embeddings else params["unembed", "weight"]
    return hidden @ weight.T


def _norm(params: TensorDictBase, x: Float[Tensor, "batch seq d_model"], config: GPTConfig) -> Tensor:
    if config.norm == "layernorm":
        return layer_norm(params, x, config.norm_eps)
    return rms_norm(params, x, config.norm_eps)


class GPT(Shell):
    """``nn.Module`` shell over :func:`forward`; its parameters are exactly ``init(config, seed)``."""

    def __init__(self, config: GPTConfig, params: TensorDictBase | None = None, seed: int = 0) -> None:
        super().__init__(init(config, seed) if params is None else params)
        self.config = config

    def forward(self, batch: Batch, dropout_seed: int | None = None) -> Float[Tensor, "batch seq vocab"]:
        return forward(self.params(), batch, self.config, dropout_seed)


def pure(config: GPTConfig) -> partial[Tensor]:
    """``forward`` with its config bound, so it reads ``model(params, batch)``."""
    return partial(forward, config=config)
