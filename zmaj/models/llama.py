"""Llama: the decoder-only transformer of Touvron et al. (2023, arXiv:2302.13971 and arXiv:2307.09288), and the
family that kept its shape (Llama 3, Mistral, Qwen 2, Qwen 3, SmolLM3).

Compared with GPT-2 it changes four things: RMSNorm instead of LayerNorm (Zhang & Sennrich, 2019), rotary
position embeddings applied to q and k instead of a learned position table (Su et al., 2021; ``zmaj.nn.rope``),
a SwiGLU feed-forward block (Shazeer, 2020) and no biases. Llama 2's larger models and Llama 3 share each
key/value head among several query heads (grouped-query attention, Ainslie et al., 2023). The relatives differ
only in switches: Qwen 2 adds biases to the q/k/v projections (Qwen2 report, arXiv:2407.10671); Qwen 3 drops
them and RMS-normalises each query and key head before the rotation ("QK-norm", Qwen3 report, arXiv:2505.09388),
and sets ``head_dim`` independently of ``d_model / n_heads``; Mistral 7B v0.1 lets each layer attend over its last
4096 keys only (sliding-window attention, Jiang et al., 2023, arXiv:2310.06825); SmolLM3 rotates q and k in three
layers of four and gives the fourth no positions at all, the causal mask alone telling order (NoPE, Kazemnejad et
al., 2023, arXiv:2305.19466).

As in ``zmaj.models.gpt``, the parameters are one TensorDict with the blocks stacked along ``[n_layers]``, and
``forward_cached`` runs new tokens against a key/value cache (``zmaj.infer.cache``) for generation.
"""

from functools import partial

import torch
from einops import rearrange
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models import common
from zmaj.models.common import Batch, LazyLogits, batch_mask, cache_mask, cache_step
from zmaj.nn.attention import AttentionMask, Backend, attention, cached_attention, project_heads
from zmaj.nn.layers import Activation, embedding, glu_mlp, linear, rms_norm
from zmaj.nn.rope import RopeScaling, apply_rope, check_scaling, rope_angles, rope_frequencies
from zmaj.nn.shell import Shell


class LlamaConfig(BaseModel):
    """The shape of a Llama-family model; Llama 2 7B is ``LlamaConfig(vocab_size=32000)``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    vocab_size: int = Field(gt=0)
    context: int = Field(
        4096, gt=0, description="longest sequence trained on; RoPE itself has no table to size"
    )
    d_model: int = Field(4096, gt=0)
    n_layers: int = Field(32, gt=0)
    n_heads: int = Field(32, gt=0)
    n_kv_heads: int = Field(
        default_factory=lambda data: data["n_heads"],
        gt=0,
        description="key/value heads shared by groups of query heads; n_heads (no grouping) when unset",
    )
    head_dim: int = Field(
        default_factory=lambda data: data["d_model"] // data["n_heads"],
        gt=0,
        description="d_model // n_heads when unset; Qwen 3 sets it independently",
    )
    d_ff: int = Field(11008, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    rope_base: float = Field(10_000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = Field(False, description="biases on the q/k/v projections (Qwen 2)")
    qk_norm: bool = Field(
        False, description="RMSNorm over head_dim on each q and k head before RoPE (Qwen 3)"
    )
    rope_layers: tuple[bool, ...] | None = Field(
        None,
        description="per layer, whether q and k are rotated: SmolLM3 gives every 4th layer no positions at all "
        "(NoPE); None: every layer",
    )
    sliding_window: int | None = Field(
        None,
        gt=0,
        description="keys every layer sees, the query's own included (Mistral 7B v0.1: 4096); None: all before it",
    )
    activation: Activation = "silu"
    init_std: float = Field(0.02, gt=0)
    attention: Backend = "auto"

    @model_validator(mode="after")
    def _heads_fit(self) -> "LlamaConfig":
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each key/value head serves a whole group of query heads"
            )
        if "head_dim" not in self.model_fields_set and self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or head_dim set explicitly"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of features")
        check_scaling(self.rope_scaling, self.head_dim)
        if self.rope_layers is not None and len(self.rope_layers) != self.n_layers:
            raise ValueError(
                f"rope_layers lists {len(self.rope_layers)} layers but n_layers is {self.n_layers}"
            )
        return self

    @field_validator("rope_layers")
    @classmethod
    def _all_rotating_is_none(cls, rope_layers: tuple[bool, ...] | None) -> tuple[bool, ...] | None:
        """Every layer rotating is the default, kept as one value so that equal models have equal configs."""
        return None if rope_layers is None or all(rope_layers) else rope_layers

    def rotates(self, layer: int) -> bool:
        """Whether ``layer`` rotates its queries and keys by their positions (see ``rope_layers``)."""
        return self.rope_layers is None or self.rope_layers[layer]


def init(config: LlamaConfig, seed: int, device: torch.device | str = "cpu") -> TensorDict:
    """The initialisation of ``transformers``' Llama: every matrix N(0, init_std), norms one, biases zero.

    Unlike GPT-2, no residual projection is scaled down with depth, so at initialisation what the blocks add to
    the embedding grows with depth (its std measured at d_model 256: 4 times the embedding's after 2 layers, 12
    after 8, 27 after 32, where GPT-2's scaling keeps it near 3); the pre-norms keep each block's input at unit
    scale whatever the stream's size.
    """
    generator = torch.Generator().manual_seed(seed)
    layers, d, ff, hd = config.n_layers, config.d_model, config.d_ff, config.head_dim
    q_dim, kv_dim = config.n_heads * hd, config.n_kv_heads * hd

    def normal(*shape: int) -> Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(shape, device="meta")
        return (torch.randn(shape, generator=generator) * config.init_std).to(device)

    def ones(*shape: int) -> dict[str, Tensor]:
        return {"weight": torch.ones(shape, device=device)}

    def projection(d_out: int, d_in: int, bias: bool = False) -> dict[str, Tensor]:
        weights = {"weight": normal(layers, d_out, d_in)}
        if bias:
            weights["bias"] = torch.zeros(layers, d_out, device=device)
        return weights

    attn = {
        "q": projection(q_dim, d, config.qkv_bias),
        "k": projection(kv_dim, d, config.qkv_bias),
        "v": projection(kv_dim, d, config.qkv_bias),
        "o": projection(d, q_dim),
    }
    if config.qk_norm:
        attn |= {"q_norm": ones(layers, hd), "k_norm": ones(layers, hd)}
    blocks = TensorDict(
        {
            "attn_norm": ones(layers, d),
            "attn": attn,
            "mlp_norm": ones(layers, d),
            "mlp": {"gate": projection(ff, d), "up": projection(ff, d), "down": projection(d, ff)},
        },
        batch_size=[layers],
        device=device,
    )
    params = TensorDict(
        {"embed": {"weight": normal(config.vocab_size, d)}, "blocks": blocks, "final_norm": ones(d)},
        device=device,
    )
    if not config.tie_embeddings:
        params["unembed"] = {"weight": normal(config.vocab_size, d)}
    return params


def forward(
    params: TensorDictBase, batch: Batch, config: LlamaConfig, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq vocab"]:
    """Next-token logits for every position.

    ``dropout_seed`` is accepted, so this fits wherever ``zmaj.models.gpt.forward`` does (the training step
    passes one), and ignored: Llama trains without dropout.
    """
    return unembed(params, hidden_states(params, batch, config, dropout_seed), config)


def lazy_forward(
    params: TensorDictBase, batch: Batch, config: LlamaConfig, dropout_seed: int | None = None
) -> LazyLogits:
    """``forward`` short of its last matmul, for a training loss that unembeds in chunks (``LazyLogits``)."""
    hidden = hidden_states(params, batch, config, dropout_seed)
    return LazyLogits(hidden, common.unembedding(params, config.tie_embeddings))


def hidden_states(
    params: TensorDictBase, batch: Batch, config: LlamaConfig, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq d_model"]:
    """The final-norm residual stream, before the unembedding; ``dropout_seed`` is ignored, as in ``forward``."""
    x = embedding(params["embed"], batch.tokens)
    inv_freq = rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling, device=x.device)
    cos, sin = rope_angles(batch.position_ids(), inv_freq)
    mask = batch_mask(batch, config.attention, config.sliding_window)
    for layer, block in enumerate(common.layers(params["blocks"])):
        x = x + llama_attention(
            block["attn"], rms_norm(block["attn_norm"], x, config.norm_eps), mask, cos, sin, config, layer
        )
        x = x + glu_mlp(block["mlp"], rms_norm(block["mlp_norm"], x, config.norm_eps), config.activation)
    return rms_norm(params["final_norm"], x, config.norm_eps)


def forward_cached(
    params: TensorDictBase,
    batch: Batch,
    cache: TensorDictBase,
    config: LlamaConfig,
    donate: bool = False,
    last_only: bool = False,
) -> tuple[Float[Tensor, "batch _ vocab"], TensorDict]:
    """Logits of ``batch``'s tokens given the tokens already in ``cache``, and the cache with them added.

    Equal to ``forward`` over the whole sequence at these positions. Positions default to each row's count of
    real tokens (``cache_step``), so left- or right-padded prompts (``batch.is_token``) need no positions.
    ``donate=True`` writes the new keys and values into ``cache``'s own buffers, which the returned cache then
    shares: for a decode loop that never reads the old cache again (``zmaj.infer.generate.stream``), it saves
    copying the whole cache twice per step (``common.CacheStep.write``).
    ``last_only=True`` gives the last position's logits alone (``[batch, 1, vocab]``): all a prompt's prefill
    needs, where the whole prompt's logits would be its memory peak (20k tokens of a 262k vocabulary: 20 GB).
    """
    step = cache_step(batch, cache)
    mask = cache_mask(step, config.sliding_window)
    x = embedding(params["embed"], batch.tokens)
    inv_freq = rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling, device=x.device)
    cos, sin = rope_angles(step.positions, inv_freq)
    keys, values = [], []
    for layer, block in enumerate(common.layers(params["blocks"])):
        attn = block["attn"]
        q, k, v = _rotated_qkv(
            attn, rms_norm(block["attn_norm"], x, config.norm_eps), cos, sin, config, layer
        )
        cache_k, cache_v = step.write(cache, layer, k, v, donate)
        out = cached_attention(q, cache_k, cache_v, mask, config.attention, written=step.length)
        x = x + linear(attn["o"], rearrange(out, "b h s d -> b s (h d)"))
        x = x + glu_mlp(block["mlp"], rms_norm(block["mlp_norm"], x, config.norm_eps), config.activation)
        keys.append(cache_k)
        values.append(cache_v)
    if last_only:
        x = x[:, -1:]
    logits = unembed(params, rms_norm(params["final_norm"], x, config.norm_eps), config)
    return logits, step.advance(keys, values, cache if donate else None)


def unembed(
    params: TensorDictBase, hidden: Float[Tensor, "batch seq d_model"], config: LlamaConfig
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from hidden states, through the embedding matrix itself when the two are tied."""
    return common.unembed(params, hidden, config.tie_embeddings)


def llama_attention(
    params: TensorDictBase,
    x: Float[Tensor, "batch seq d_model"],
    mask: AttentionMask,
    cos: Float[Tensor, "batch seq half"],
    sin: Float[Tensor, "batch seq half"],
    config: LlamaConfig,
    layer: int,
) -> Float[Tensor, "batch seq d_model"]:
    """Grouped-query self-attention of block ``layer``, q and k rotated by their positions (and first normalised,
    for Qwen 3)."""
    q, k, v = _rotated_qkv(params, x, cos, sin, config, layer)
    out = attention(q, k, v, mask, config.attention)
    return linear(params["o"], rearrange(out, "b h s d -> b s (h d)"))


def _rotated_qkv(
    params: TensorDictBase,
    x: Float[Tensor, "batch seq d_model"],
    cos: Float[Tensor, "batch seq half"],
    sin: Float[Tensor, "batch seq half"],
    config: LlamaConfig,
    layer: int,
) -> tuple[
    Float[Tensor, "batch heads seq head_dim"],
    Float[Tensor, "batch kv_heads seq head_dim"],
    Float[Tensor, "batch kv_heads seq head_dim"],
]:
    """Query, key and value heads, q and k rotated (after QK-norm, for Qwen 3) unless block ``layer`` has no
    positions (SmolLM3's NoPE layers, where the causal mask alone tells order); shared by both forwards."""
    q, k, v = project_heads(params, x, config.n_heads, config.n_kv_heads)
    if config.qk_norm:
        q = rms_norm(params["q_norm"], q, config.norm_eps)
        k = rms_norm(params["k_norm"], k, config.norm_eps)
    if not config.rotates(layer):
        return q, k, v
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def nope_every(interval: int, n_layers: int) -> tuple[bool, ...]:
    """``rope_layers`` with every ``interval``-th layer left without positions: SmolLM3's (every 4th)."""
    return tuple((i + 1) % interval != 0 for i in range(n_layers))


class Llama(Shell):
    """``nn.Module`` shell over :func:`forward`; its parameters are exactly ``init(config, seed)``."""

    def __init__(self, config: LlamaConfig, params: TensorDictBase | None = None, seed: int = 0) -> None:
        super().__init__(init(config, seed) if params is None else params)
        self.config = config

    def forward(self, batch: Batch, dropout_seed: int | None = None) -> Float[Tensor, "batch seq vocab"]:
        return forward(self.params(), batch, self.config, dropout_seed)


def pure(config: LlamaConfig) -> partial[Tensor]:
    """``forward`` with its config bound, so it reads ``model(params, batch)``."""
    return partial(forward, config=config)


def cached(config: LlamaConfig) -> partial[tuple[Tensor, TensorDict]]:
    """``forward_cached`` with its config bound: the ``step(params, batch, cache, donate=False,
    last_only=False)`` that generation takes (``zmaj.models.common.CachedForward``)."""
    return partial(forward_cached, config=config)
