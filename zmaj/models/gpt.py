"""GPT: a decoder-only transformer in the style of GPT-2 (Radford et al., 2019) and nanoGPT.

Token embeddings plus learned or sinusoidal positions, ``n_layers`` pre-norm blocks (attention, then MLP, each
added to the residual stream), a final norm and an unembedding that may share the embedding matrix. Pre-norm
(GPT-2's change to the original transformer, Radford et al. section 2.3; Xiong et al., 2020) normalises each
block's input but never the residual stream itself, so an un-normalised identity path runs from the embeddings
to the final norm, and deep stacks train without the warmup-sensitive instability of post-norm.

The parameters are one TensorDict; the blocks are stacked along a leading ``[n_layers]`` axis, so initialising,
converting or inspecting all layers is one tensor operation. ``forward`` unbinds them once per call: autograd then
gathers the per-layer gradients with a single stack instead of one full-size scatter per layer.

``forward_cached`` runs the same blocks on new tokens only, reading and extending a key/value cache
(``zmaj.infer.cache``), for generation.

The defaults are GPT-2's. Each later change that the modded-nanogpt speedrun (Keller Jordan et al., 2024,
github.com/KellerJordan/modded-nanogpt) found to pay off at small scale is one config field, off by default:

- ``positions="rope"``: rotary positions on q and k instead of a position table (``zmaj.nn.rope``);
- ``norm="rmsnorm"`` and ``activation="relu2"``: RMSNorm, and ReLU squared in the MLP (Primer, So et al., 2021);
- ``qk_norm``: each query and key head RMS-normalised before the rotation (as Qwen 3 and Gemma 3 do), which
  bounds the attention logits;
- ``unembed_init="zero"``: an untied unembedding that starts at zero, so every first prediction is uniform;
- ``logit_softcap``: logits squashed into ``(-cap, cap)`` by ``cap * tanh(logits / cap)`` (Gemma 2);
- ``value_embeds``: extra token embedding tables added to the values of the first and last layers;
- ``unet_skips``: the outputs of the first half's blocks added, with learned weights, to the inputs of the
  second half's blocks in mirror order, as in a U-net.
"""

import math
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models import common
from zmaj.models.common import Batch, LazyLogits, batch_mask, cache_mask, cache_step
from zmaj.nn.attention import Backend, attention, cached_attention, project_heads
from zmaj.nn.layers import (
    Activation,
    dropout,
    embedding,
    layer_norm,
    linear,
    mlp,
    rms_norm,
    sinusoidal_positions,
)
from zmaj.nn.loss import softcap
from zmaj.nn.rope import apply_rope, rope_angles, rope_frequencies
from zmaj.nn.shell import Shell


class GPTConfig(BaseModel):
    """The shape of a GPT; GPT-2 small is ``GPTConfig(vocab_size=50257, context=1024)``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    vocab_size: int = Field(gt=0)
    context: int = Field(1024, gt=0, description="longest sequence; sizes the learned position table")
    d_model: int = Field(768, gt=0)
    n_layers: int = Field(12, gt=0)
    n_heads: int = Field(12, gt=0)
    d_ff: int | None = Field(None, gt=0, description="MLP width; 4 * d_model when unset")
    positions: Literal["learned", "sinusoidal", "rope"] = "learned"
    rope_base: float = Field(10_000.0, gt=0, description="RoPE's base (theta) when positions=rope")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0)
    activation: Activation = "gelu_tanh"
    qk_norm: bool = Field(False, description="RMSNorm over head_dim on each q and k head, before any RoPE")
    bias: bool = True
    tie_embeddings: bool = True
    unembed_init: Literal["normal", "zero"] = Field(
        "normal", description="the untied unembedding starts N(0, init_std), or at zero (modded-nanogpt)"
    )
    logit_softcap: float | None = Field(
        None, gt=0, description="logits become cap * tanh(logits / cap) (Gemma 2); off when unset"
    )
    value_embeds: int = Field(
        0,
        ge=0,
        description="extra token embedding tables, table i added to the values of layer i and of "
        "layer n_layers - value_embeds + i",
    )
    unet_skips: bool = Field(
        False, description="layer i's output is added, times a learned weight, to layer n_layers-1-i's input"
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="on the embeddings and each residual branch; unlike GPT-2 and nanoGPT, not on the "
        "attention weights",
    )
    init_std: float = Field(0.02, gt=0)
    attention: Backend = "auto"

    @model_validator(mode="after")
    def _shapes_fit(self) -> "GPTConfig":
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.positions == "rope" and self.head_dim % 2 != 0:
            raise ValueError(
                f"positions=rope needs an even head_dim (d_model / n_heads), got {self.head_dim}"
            )
        if self.positions == "sinusoidal" and self.d_model % 2 != 0:
            raise ValueError(
                f"positions=sinusoidal needs an even d_model (sine, cosine pairs), got {self.d_model}"
            )
        if self.unembed_init == "zero" and self.tie_embeddings:
            raise ValueError(
                "unembed_init=zero needs tie_embeddings=false: a zero unembedding tied to the embedding would "
                "zero the embedding too"
            )
        if 2 * self.value_embeds > self.n_layers:
            raise ValueError(
                f"value_embeds={self.value_embeds} feeds the first and last {self.value_embeds} layers, "
                f"so it must be at most n_layers / 2 ({self.n_layers // 2})"
            )
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

    @property
    def value_embed_tables(self) -> tuple[int | None, ...]:
        """Per layer, the value embedding table it adds to its values, or None: the first and the last
        ``value_embeds`` layers share the tables in the same order: the "012 ... 012" layout of modded-nanogpt's
        later records (its ``records/120424_ValueEmbed`` had one table per layer)."""
        k, n = self.value_embeds, self.n_layers
        return tuple(i if i < k else i - (n - k) if i >= n - k else None for i in range(n))

    @property
    def unet_skip_sources(self) -> tuple[int | None, ...]:
        """Per layer, the earlier layer whose output is added to its input, or None: with ``unet_skips`` each
        layer of the second half takes its mirror image in the first (for odd ``n_layers``, the middle none)."""
        n = self.n_layers
        return tuple(n - 1 - i if self.unet_skips and n - 1 - i < i else None for i in range(n))


def init(config: GPTConfig, seed: int, device: torch.device | str = "cpu") -> TensorDict:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit norms.

    The projections that write into the residual stream (attention output, MLP down) get std / sqrt(2 n_layers),
    so the residual's variance does not grow with depth (GPT-2 paper, section 2.3). The optional parts are
    drawn after the rest, so a config without them gets GPT-2's parameters exactly: QK-norm scales start at one,
    U-net skip weights at one (modded-nanogpt), value embeddings N(0, 0.02) like the token embedding.
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

    attn = {
        "q": linear(d, d),
        "k": linear(d, d),
        "v": linear(d, d),
        "o": linear(d, d, std=residual_std),
    }
    if config.qk_norm:
        attn |= {
            name: {"weight": torch.ones(layers, config.head_dim, device=device)}
            for name in ("q_norm", "k_norm")
        }
    blocks = TensorDict(
        {
            "attn_norm": norm(layers),
            "attn": attn,
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
        zero = config.unembed_init == "zero"
        unembed = torch.zeros(config.vocab_size, d, device=device) if zero else normal(config.vocab_size, d)
        params["unembed"] = {"weight": unembed}
    if config.value_embeds > 0:
        # One table per value embedding, stacked as the blocks are (a batch dimension): fully sharded training
        # cuts each table's vocabulary, as it cuts the embedding's, not the tables, which 2 ranks cannot share
        # evenly when there are 3 (``zmaj.train.parallel.shard_dim``).
        tables = normal(config.value_embeds, config.vocab_size, d)
        params["value_embeds"] = TensorDict(
            {"weight": tables}, batch_size=[config.value_embeds], device=device
        )
    if config.unet_skips:
        params["unet_skips"] = {"weight": torch.ones(config.n_layers // 2, device=device)}
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
    return LazyLogits(hidden, common.unembedding(params, config.tie_embeddings), config.logit_softcap)


def hidden_states(
    params: TensorDictBase, batch: Batch, config: GPTConfig, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq d_model"]:
    """The final-norm residual stream, before the unembedding."""
    generator = None
    # The seed is read only where dropout is on: dynamo guards on an int it reads, and a new seed each step
    # would then compile the training step again (``zmaj.train.step.step_functions``).
    if config.dropout > 0 and dropout_seed is not None:
        generator = torch.Generator(batch.tokens.device).manual_seed(dropout_seed)
    if config.positions == "learned" and batch.positions is None:
        # The default positions' largest is known without reading the device; given positions are not checked
        # (that would wait for the device every step), and past the table they fail in the lookup.
        _check_learned_positions(batch.tokens.shape[1] - 1, config)
    positions = batch.position_ids()
    x = dropout(_embed(params, batch.tokens, positions, config), config.dropout, generator)
    angles = _rope(positions, config)
    value_embeddings = _value_embeddings(params, batch.tokens, config)

    mask = batch_mask(batch, config.attention)
    outputs: list[Tensor] = []
    for layer, block in enumerate(common.layers(params["blocks"])):
        x = _unet_skip(params, x, outputs, layer, config)
        q, k, v = _heads(block, x, angles, value_embeddings[layer], config)
        attn_out = _merge_heads(block, attention(q, k, v, mask, config.attention))
        x = x + dropout(attn_out, config.dropout, generator)
        mlp_out = mlp(block["mlp"], _norm(block["mlp_norm"], x, config), config.activation)
        x = x + dropout(mlp_out, config.dropout, generator)
        outputs.append(x)
    return _norm(params["final_norm"], x, config)


def forward_cached(
    params: TensorDictBase,
    batch: Batch,
    cache: TensorDictBase,
    config: GPTConfig,
    donate: bool = False,
    last_only: bool = False,
) -> tuple[Float[Tensor, "batch _ vocab"], TensorDict]:
    """Logits of ``batch``'s tokens given the tokens already in ``cache``, and the cache with them added.

    Equal to ``forward`` over the whole sequence at these positions. Positions default to each row's count of
    real tokens (``cache_step``), so left- or right-padded prompts (``batch.is_token``) need no positions.
    Evaluation only: no dropout. Value embeddings and U-net skips act on each token alone, so only keys and
    values need a cache.
    ``last_only=True`` gives the last position's logits alone (``[batch, 1, vocab]``): all a prompt's prefill
    needs, where the whole prompt's logits would be its memory peak (20k tokens of a 262k vocabulary: 20 GB).
    """
    step = cache_step(batch, cache)
    # A default position is below the cache's length, so only given positions or a cache longer than the
    # position table can run past it; only then is the largest read from the device, and never while compiled.
    could_overrun = batch.positions is not None or cache["k"].shape[3] > config.context
    if config.positions == "learned" and could_overrun and not torch.compiler.is_compiling():
        _check_learned_positions(int(step.positions.max()), config)
    mask = cache_mask(step)
    x = _embed(params, batch.tokens, step.positions, config)
    angles = _rope(step.positions, config)
    value_embeddings = _value_embeddings(params, batch.tokens, config)
    keys, values = [], []
    outputs: list[Tensor] = []
    for layer, block in enumerate(common.layers(params["blocks"])):
        x = _unet_skip(params, x, outputs, layer, config)
        q, k, v = _heads(block, x, angles, value_embeddings[layer], config)
        cache_k, cache_v = step.write(cache, layer, k, v, donate)
        x = x + _merge_heads(
            block, cached_attention(q, cache_k, cache_v, mask, config.attention, written=step.length)
        )
        x = x + mlp(block["mlp"], _norm(block["mlp_norm"], x, config), config.activation)
        outputs.append(x)
        keys.append(cache_k)
        values.append(cache_v)
    if last_only:
        x = x[:, -1:]
    logits = unembed(params, _norm(params["final_norm"], x, config), config)
    return logits, step.advance(keys, values, cache if donate else None)


def _check_learned_positions(largest: int, config: GPTConfig) -> None:
    """A position past the learned table is a ValueError naming both, not an ``IndexError`` from the lookup."""
    if largest >= config.context:
        raise ValueError(
            f"position {largest} is past the context of this GPT with learned positions ({config.context}: "
            f"its position table has rows 0 to {config.context - 1})"
        )


def _embed(
    params: TensorDictBase,
    tokens: Int[Tensor, "batch seq"],
    positions: Int[Tensor, "batch seq"],
    config: GPTConfig,
) -> Float[Tensor, "batch seq d_model"]:
    """Token embeddings plus the embeddings of their positions (none with RoPE, which rotates q and k instead)."""
    x = embedding(params["embed"], tokens)
    if config.positions == "learned":
        return x + embedding(params["positions"], positions)
    if config.positions == "sinusoidal":
        return x + sinusoidal_positions(positions, config.d_model).to(x.dtype)
    return x


def _rope(
    positions: Int[Tensor, "batch seq"], config: GPTConfig
) -> tuple[Float[Tensor, "batch seq half"], Float[Tensor, "batch seq half"]] | None:
    """RoPE's (cos, sin) at ``positions``, shared by every layer; None without rotary positions."""
    if config.positions != "rope":
        return None
    return rope_angles(
        positions, rope_frequencies(config.head_dim, config.rope_base, device=positions.device)
    )


def _value_embeddings(
    params: TensorDictBase, tokens: Int[Tensor, "batch seq"], config: GPTConfig
) -> list[Float[Tensor, "batch seq d_model"] | None]:
    """Per layer, the value embedding of every token that the layer adds to its values, or None.

    A second path from the token itself to every head's values, around the residual stream
    (modded-nanogpt's ``records/120424_ValueEmbed``): it adds parameters that cost almost no time, since a table
    lookup is nearly free. Each table is looked up once and shared by its two layers.
    """
    if config.value_embeds == 0:
        return [None] * config.n_layers
    tables: Tensor = params["value_embeds", "weight"]
    looked_up = [F.embedding(tokens, table) for table in tables.unbind(0)]
    return [None if table is None else looked_up[table] for table in config.value_embed_tables]


def _unet_skip(
    params: TensorDictBase,
    x: Float[Tensor, "batch seq d_model"],
    outputs: list[Tensor],
    layer: int,
    config: GPTConfig,
) -> Float[Tensor, "batch seq d_model"]:
    """``x`` plus, for a second-half layer with U-net skips, the weighted output of its mirror layer.

    The skip gives the late layers the early layers' features directly (modded-nanogpt, already in
    ``records/120424_ValueEmbed``, after the U-net of Ronneberger et al., 2015); the weights start at one and
    are learned.
    """
    source = config.unet_skip_sources[layer]
    if source is None:
        return x
    weight: Tensor = params["unet_skips", "weight"][source]
    return x + weight.to(x.dtype) * outputs[source]


def _heads(
    block: TensorDictBase,
    x: Float[Tensor, "batch seq d_model"],
    angles: tuple[Float[Tensor, "batch seq half"], Float[Tensor, "batch seq half"]] | None,
    value_embedding: Float[Tensor, "batch seq d_model"] | None,
    config: GPTConfig,
) -> tuple[
    Float[Tensor, "batch heads seq head_dim"],
    Float[Tensor, "batch heads seq head_dim"],
    Float[Tensor, "batch heads seq head_dim"],
]:
    """A block's query, key and value heads from its pre-normed input, with the options that change them:
    the value embedding added to v, q and k RMS-normalised per head (always RMSNorm, whatever ``norm`` is, as in
    Qwen 3 and the speedrun) and then rotated."""
    attn = block["attn"]
    q, k, v = project_heads(attn, _norm(block["attn_norm"], x, config), config.n_heads, config.n_heads)
    if value_embedding is not None:
        v = v + rearrange(value_embedding, "b s (h d) -> b h s d", h=config.n_heads)
    if config.qk_norm:
        q = rms_norm(attn["q_norm"], q, config.norm_eps)
        k = rms_norm(attn["k_norm"], k, config.norm_eps)
    if angles is not None:
        q, k = apply_rope(q, *angles), apply_rope(k, *angles)
    return q, k, v


def _merge_heads(
    block: TensorDictBase, heads: Float[Tensor, "batch heads seq head_dim"]
) -> Float[Tensor, "batch seq d_model"]:
    """The attention heads side by side, through the output projection."""
    return linear(block["attn", "o"], rearrange(heads, "b h s d -> b s (h d)"))


def unembed(
    params: TensorDictBase, hidden: Float[Tensor, "batch seq d_model"], config: GPTConfig
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from hidden states, through the embedding matrix itself when the two are tied, soft-capped if the
    config says so: ``cap * tanh(logits / cap)`` is the identity near zero and keeps every logit inside
    ``(-cap, cap)``, so no single logit can run away early in training (Gemma 2; modded-nanogpt uses 30, then 15).
    """
    return softcap(common.unembed(params, hidden, config.tie_embeddings), config.logit_softcap)


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
    """``forward_cached`` with its config bound: the ``step(params, batch, cache, donate=False,
    last_only=False)`` that generation takes (``zmaj.models.common.CachedForward``)."""
    return partial(forward_cached, config=config)
