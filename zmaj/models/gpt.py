"""GPT: a decoder-only transformer in the style of GPT-2 (Radford et al., 2019) and nanoGPT.

Token embeddings plus learned or sinusoidal positions, ``n_layers`` pre-norm blocks (attention, then MLP, each
added to the residual stream), a final norm and an unembedding that may share the embedding matrix.

The parameters are one TensorDict; the blocks are stacked along a leading ``[n_layers]`` axis, so initialising,
converting or inspecting all layers is one tensor operation. ``forward`` unbinds them once per call: autograd then
gathers the per-layer gradients with a single stack instead of one full-size scatter per layer.

``forward_cached`` runs the same blocks on new tokens only, reading and extending a key/value cache
(``zmaj.infer.cache``), for generation.
"""

import math
from functools import partial
from typing import Literal

import torch
from jaxtyping import Float, Int
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models import common
from zmaj.models.common import Batch, LazyLogits, batch_mask, cache_mask, cache_step, writes_in_place
from zmaj.nn.attention import Backend, cached_self_attention, self_attention
from zmaj.nn.layers import Activation, dropout, embedding, layer_norm, mlp, rms_norm, sinusoidal_positions
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

    @property
    def n_kv_heads(self) -> int:
        """Every head has its own keys and values (no grouping); named so a cache is sized as for any model."""
        return self.n_heads


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


def lazy_forward(
    params: TensorDictBase, batch: Batch, config: GPTConfig, dropout_seed: int | None = None
) -> LazyLogits:
    """``forward`` short of its last matmul, for a training loss that unembeds in chunks (``LazyLogits``)."""
    hidden = hidden_states(params, batch, config, dropout_seed)
    return LazyLogits(hidden, common.unembedding(params, config.tie_embeddings))


def hidden_states(
    params: TensorDictBase, batch: Batch, config: GPTConfig, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq d_model"]:
    """The final-norm residual stream, before the unembedding."""
    generator = None
    if dropout_seed is not None and config.dropout > 0:
        generator = torch.Generator(batch.tokens.device).manual_seed(dropout_seed)
    x = dropout(_embed(params, batch.tokens, batch.position_ids(), config), config.dropout, generator)

    mask = batch_mask(batch, config.attention)
    for block in common.layers(params["blocks"]):
        attn_in = _norm(block["attn_norm"], x, config)
        attn_out = self_attention(
            block["attn"], attn_in, mask, config.n_heads, config.n_heads, config.attention
        )
        x = x + dropout(attn_out, config.dropout, generator)
        mlp_out = mlp(block["mlp"], _norm(block["mlp_norm"], x, config), config.activation)
        x = x + dropout(mlp_out, config.dropout, generator)
    return _norm(params["final_norm"], x, config)


def forward_cached(
    params: TensorDictBase, batch: Batch, cache: TensorDictBase, config: GPTConfig, donate: bool = False
) -> tuple[Float[Tensor, "batch seq vocab"], TensorDict]:
    """Logits of ``batch``'s tokens given the tokens already in ``cache``, and the cache with them added.

    Equal to ``forward`` over the whole sequence at these positions. Positions default to each row's count of
    real tokens (``cache_step``), so left- or right-padded prompts (``batch.is_token``) need no positions.
    Evaluation only: no dropout.
    """
    donate = writes_in_place(donate)
    step = cache_step(batch, cache)
    mask = cache_mask(step)
    x = _embed(params, batch.tokens, step.positions, config)
    keys, values = [], []
    layers = zip(common.layers(params["blocks"]), cache["k"].unbind(0), cache["v"].unbind(0), strict=True)
    for block, cache_k, cache_v in layers:
        attn_out, cache_k, cache_v = cached_self_attention(
            block["attn"],
            _norm(block["attn_norm"], x, config),
            cache_k,
            cache_v,
            step.slots,
            mask,
            config.n_heads,
            config.n_heads,
            config.attention,
            donate,
        )
        x = x + attn_out
        x = x + mlp(block["mlp"], _norm(block["mlp_norm"], x, config), config.activation)
        keys.append(cache_k)
        values.append(cache_v)
    logits = unembed(params, _norm(params["final_norm"], x, config), config)
    return logits, step.advance(keys, values, cache if donate else None)


def _embed(
    params: TensorDictBase,
    tokens: Int[Tensor, "batch seq"],
    positions: Int[Tensor, "batch seq"],
    config: GPTConfig,
) -> Float[Tensor, "batch seq d_model"]:
    """Token embeddings plus the embeddings of their positions."""
    x = embedding(params["embed"], tokens)
    if config.positions == "learned":
        return x + embedding(params["positions"], positions)
    return x + sinusoidal_positions(positions, config.d_model).to(x.dtype)


def unembed(
    params: TensorDictBase, hidden: Float[Tensor, "batch seq d_model"], config: GPTConfig
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from hidden states, through the embedding matrix itself when the two are tied."""
    return common.unembed(params, hidden, config.tie_embeddings)


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


def cached(config: GPTConfig) -> partial[tuple[Tensor, TensorDict]]:
    """``forward_cached`` with its config bound: the ``step(params, batch, cache, donate=False)`` that generation
    takes (``zmaj.models.common.Step``)."""
    return partial(forward_cached, config=config)
