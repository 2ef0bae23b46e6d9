"""Gemma 3: Google DeepMind's decoder-only transformer (Gemma Team, 2025, "Gemma 3 Technical Report",
arXiv:2503.19786), text-only, as in the 270M model; and Gemma 2, its predecessor, as options of the same model.

It keeps Llama's skeleton (``zmaj.models.llama``: RMSNorm, rotary positions, a gated MLP, grouped-query attention)
and changes five things:

- **Local and global layers, 5:1** (report section 2.1, "5:1 interleaving of local/global layers"). Local layers
  attend to a causal sliding window of the last ``sliding_window`` keys (the query included) and rotate with a
  RoPE base of 10k; every sixth layer is global, attending to the whole context with a base of 1M (report
  section 2.2, "Long context"), optionally position-interpolated for long context. Only the global layers' key
  cache grows with the context, which is the point.
- **QK-norm instead of soft-capping** (report section 2.1): each query and key head is RMS-normalised before the
  rotation, replacing Gemma 2's ``tanh`` soft-cap of the attention logits. The scores are scaled by
  ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5`` (they coincide in the small models).
- **Pre- and post-norms** around both sub-blocks (as in Gemma 2): the residual adds ``norm(f(norm(x)))``.
- **RMSNorm scales by ``(1 + w)``**, with ``w`` stored as a deviation from one (so zero-initialised), and the
  product is taken in float32 *before* casting back, unlike Llama's (see :func:`rms_norm`).
- **Embeddings scaled by ``sqrt(d_model)``** (as in Vaswani et al., 2017, section 3.4) and tied to the
  unembedding: the shared table's entries are small, as suits an output projection, and the scale brings each
  row up to the size of the residual stream it starts; a GeGLU MLP (GELU, tanh approximation).

The output logits may still be soft-capped (``final_logit_softcap``, Gemma 2's ``cap * tanh(logits / cap)``);
the released Gemma 3 checkpoints leave it off. As in ``zmaj.models.llama``, the parameters are one TensorDict
with the blocks stacked along ``[n_layers]``; which layers are local is static config, so the Python loop picks
each layer's mask and rotation.

**Gemma 2** (Gemma Team, 2024, arXiv:2408.00118) is the same skeleton with three of those choices made the older
way: local and global layers alternate 1:1 (window 4096), every layer rotates with one base (10k), and instead of
QK-norm the attention scores are soft-capped at 50 (``qk_norm=False``, ``attn_logit_softcap=50``), as are the
output logits at 30. Gemma 2 2B is ``Gemma3Config(vocab_size=256000, d_model=2304, n_layers=26, n_heads=8,
n_kv_heads=4, d_ff=9216, layer_types=interleaved_layer_types(26, 2), sliding_window=4096, rope_base=10_000,
qk_norm=False, attn_logit_softcap=50, final_logit_softcap=30, context=8192)``; ``zmaj.convert`` reads it so
from a ``gemma2`` checkpoint or GGUF file.
"""

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models import common
from zmaj.models.common import Batch, LazyLogits, batch_mask, cache_mask, cache_step
from zmaj.nn.attention import AttentionMask, Backend, attention, cached_attention, project_heads
from zmaj.nn.layers import Activation, at_least_float32, embedding, glu_mlp, linear
from zmaj.nn.loss import softcap
from zmaj.nn.rope import RopeScaling, apply_rope, check_scaling, rope_angles, rope_frequencies
from zmaj.nn.shell import Shell

LayerType = Literal["sliding_attention", "full_attention"]
"""A layer's attention, named as in ``transformers``' ``layer_types``: a local sliding window, or global."""


def interleaved_layer_types(n_layers: int, pattern: int = 6) -> tuple[LayerType, ...]:
    """Gemma 3's interleaving: every ``pattern``-th layer global, the others local (5:1 for the default 6)."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers))


class Gemma3Config(BaseModel):
    """The shape of a Gemma 3 text model; Gemma 3 270M is ``Gemma3Config(vocab_size=262144)``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    vocab_size: int = Field(gt=0)
    context: int = Field(
        32_768, gt=0, description="longest sequence trained on; RoPE itself has no table to size"
    )
    d_model: int = Field(640, gt=0)
    n_layers: int = Field(18, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int = Field(1, gt=0, description="key/value heads shared by groups of query heads")
    head_dim: int = Field(256, gt=0, description="set independently of d_model / n_heads, as in every Gemma")
    d_ff: int = Field(2048, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    layer_types: tuple[LayerType, ...] = Field(
        default_factory=lambda data: interleaved_layer_types(data["n_layers"]),
        description="each layer's attention; five local layers to one global when unset",
    )
    sliding_window: int = Field(512, gt=0, description="keys a local layer sees, the query's own included")
    rope_base: float = Field(1_000_000.0, gt=0, description="RoPE base of the global layers")
    rope_scaling: RopeScaling | None = Field(None, description="context extension of the global layers' RoPE")
    local_rope_base: float = Field(10_000.0, gt=0, description="RoPE base of the local (sliding) layers")
    local_rope_scaling: RopeScaling | None = Field(
        None, description="context extension of the local layers' RoPE; none in the released models"
    )
    query_pre_attn_scalar: float = Field(
        default_factory=lambda data: data["head_dim"],
        gt=0,
        description="attention scores are scaled by its inverse square root; head_dim when unset",
    )
    final_logit_softcap: float | None = Field(
        None, gt=0, description="logits become cap * tanh(logits / cap) (Gemma 2); off in Gemma 3"
    )
    qk_norm: bool = Field(True, description="RMS-normalise each query and key head (Gemma 3; not Gemma 2)")
    attn_logit_softcap: float | None = Field(
        None, gt=0, description="attention scores become cap * tanh(scores / cap) (Gemma 2); off in Gemma 3"
    )
    tie_embeddings: bool = True
    activation: Activation = "gelu_tanh"
    init_std: float = Field(0.02, gt=0)
    attention: Backend = "auto"

    @model_validator(mode="after")
    def _shapes_fit(self) -> "Gemma3Config":
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}): "
                "each key/value head serves a whole group of query heads"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even: RoPE rotates pairs of features")
        if len(self.layer_types) != self.n_layers:
            raise ValueError(
                f"layer_types lists {len(self.layer_types)} layers but n_layers is {self.n_layers}"
            )
        check_scaling(self.rope_scaling, self.head_dim)
        check_scaling(self.local_rope_scaling, self.head_dim)
        if self.attn_logit_softcap is not None and self.attention == "sdpa":
            raise ValueError(
                "attn_logit_softcap needs attention auto, eager or flex: sdpa cannot soft-cap the scores"
            )
        return self

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the local sliding window (else globally)?"""
        return tuple(kind == "sliding_attention" for kind in self.layer_types)

    @property
    def attention_scale(self) -> float:
        """What q k^T is multiplied by before the softmax."""
        return float(self.query_pre_attn_scalar**-0.5)


def init(config: Gemma3Config, seed: int, device: torch.device | str = "cpu") -> TensorDict:
    """The initialisation of ``transformers``' Gemma 3: every matrix N(0, init_std), every norm weight zero.

    Zero is the identity here, since the norms scale by ``(1 + w)``.
    """
    generator = torch.Generator().manual_seed(seed)
    layers, d, ff, hd = config.n_layers, config.d_model, config.d_ff, config.head_dim
    q_dim, kv_dim = config.n_heads * hd, config.n_kv_heads * hd

    def normal(*shape: int) -> Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(shape, device="meta")
        return (torch.randn(shape, generator=generator) * config.init_std).to(device)

    def zeros(*shape: int) -> dict[str, Tensor]:
        return {"weight": torch.zeros(shape, device=device)}

    def projection(d_out: int, d_in: int) -> dict[str, Tensor]:
        return {"weight": normal(layers, d_out, d_in)}

    attn = {
        "q": projection(q_dim, d),
        "k": projection(kv_dim, d),
        "v": projection(kv_dim, d),
        "o": projection(d, q_dim),
    }
    if config.qk_norm:
        attn |= {"q_norm": zeros(layers, hd), "k_norm": zeros(layers, hd)}
    blocks = TensorDict(
        {
            "attn_norm": zeros(layers, d),
            "attn": attn,
            "attn_post_norm": zeros(layers, d),
            "mlp_norm": zeros(layers, d),
            "mlp": {"gate": projection(ff, d), "up": projection(ff, d), "down": projection(d, ff)},
            "mlp_post_norm": zeros(layers, d),
        },
        batch_size=[layers],
        device=device,
    )
    params = TensorDict(
        {"embed": {"weight": normal(config.vocab_size, d)}, "blocks": blocks, "final_norm": zeros(d)},
        device=device,
    )
    if not config.tie_embeddings:
        params["unembed"] = {"weight": normal(config.vocab_size, d)}
    return params


def forward(
    params: TensorDictBase, batch: Batch, config: Gemma3Config, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq vocab"]:
    """Next-token logits for every position.

    ``dropout_seed`` is accepted, so this fits wherever ``zmaj.models.gpt.forward`` does (the training step
    passes one), and ignored: Gemma 3 trains without dropout.
    """
    return unembed(params, hidden_states(params, batch, config, dropout_seed), config)


def lazy_forward(
    params: TensorDictBase, batch: Batch, config: Gemma3Config, dropout_seed: int | None = None
) -> LazyLogits:
    """``forward`` short of its last matmul, for a training loss that unembeds in chunks (``LazyLogits``)."""
    hidden = hidden_states(params, batch, config, dropout_seed)
    return LazyLogits(hidden, common.unembedding(params, config.tie_embeddings), config.final_logit_softcap)


def hidden_states(
    params: TensorDictBase, batch: Batch, config: Gemma3Config, dropout_seed: int | None = None
) -> Float[Tensor, "batch seq d_model"]:
    """The final-norm residual stream, before the unembedding; ``dropout_seed`` is ignored, as in ``forward``."""
    x = embed(params, batch, config)
    angles = _angles(config, batch.position_ids())
    # Both kinds of mask are built once here and shared by every layer of their kind.
    masks: dict[bool, AttentionMask] = {
        sliding: batch_mask(batch, config.attention, config.sliding_window if sliding else None)
        for sliding in set(config.is_sliding)
    }
    for block, sliding in zip(common.layers(params["blocks"]), config.is_sliding, strict=True):
        q, k, v = _rotated_qkv(block, x, *angles[sliding], config)
        attended = attention(
            q, k, v, masks[sliding], config.attention, config.attention_scale, config.attn_logit_softcap
        )
        x = _finish_block(block, x, attended, config)
    return rms_norm(params["final_norm"], x, config.norm_eps)


def forward_cached(
    params: TensorDictBase,
    batch: Batch,
    cache: TensorDictBase,
    config: Gemma3Config,
    donate: bool = False,
    last_only: bool = False,
) -> tuple[Float[Tensor, "batch _ vocab"], TensorDict]:
    """Logits of ``batch``'s tokens given the tokens already in ``cache``, and the cache with them added.

    Equal to ``forward`` over the whole sequence at these positions (``zmaj.models.llama.forward_cached`` explains
    the defaults). Every layer keeps the whole history: a local layer's cache could be a ring of
    ``sliding_window`` slots, but one buffer shape for all layers keeps the cache a single stacked tensor, and
    the window is applied by the mask instead.
    ``last_only=True`` gives the last position's logits alone (``[batch, 1, vocab]``): all a prompt's prefill
    needs, where the whole prompt's logits would be its memory peak (20k tokens of a 262k vocabulary: 20 GB).
    """
    step = cache_step(batch, cache)
    masks = {
        sliding: cache_mask(step, config.sliding_window if sliding else None)
        for sliding in set(config.is_sliding)
    }
    x = embed(params, batch, config)
    angles = _angles(config, step.positions)
    keys, values = [], []
    layers = zip(common.layers(params["blocks"]), config.is_sliding, strict=True)
    for layer, (block, sliding) in enumerate(layers):
        q, k, v = _rotated_qkv(block, x, *angles[sliding], config)
        cache_k, cache_v = step.write(cache, layer, k, v, donate)
        attended = cached_attention(
            q,
            cache_k,
            cache_v,
            masks[sliding],
            config.attention,
            config.attention_scale,
            written=step.length,
            softcap=config.attn_logit_softcap,
        )
        x = _finish_block(block, x, attended, config)
        keys.append(cache_k)
        values.append(cache_v)
    if last_only:
        x = x[:, -1:]
    logits = unembed(params, rms_norm(params["final_norm"], x, config.norm_eps), config)
    return logits, step.advance(keys, values, cache if donate else None)


def _angles(config: Gemma3Config, positions: Tensor) -> dict[bool, tuple[Tensor, Tensor]]:
    """RoPE's (cos, sin) for the local (True) and global (False) layers, each with its own base and scaling;
    computed once where the two rotate alike (Gemma 2)."""
    settings = {
        True: (config.local_rope_base, config.local_rope_scaling),
        False: (config.rope_base, config.rope_scaling),
    }
    computed: dict[tuple[float, RopeScaling | None], tuple[Tensor, Tensor]] = {}
    for base, scaling in {settings[sliding] for sliding in config.is_sliding}:
        inv_freq = rope_frequencies(config.head_dim, base, scaling, device=positions.device)
        computed[base, scaling] = rope_angles(positions, inv_freq)
    return {sliding: computed[settings[sliding]] for sliding in set(config.is_sliding)}


def _finish_block(
    block: TensorDictBase,
    x: Float[Tensor, "batch seq d_model"],
    attended: Float[Tensor, "batch heads seq head_dim"],
    config: Gemma3Config,
) -> Float[Tensor, "batch seq d_model"]:
    """The rest of a block after attention: output projection, post-norm, residual, then the normed GeGLU MLP."""
    eps = config.norm_eps
    out = linear(block["attn", "o"], rearrange(attended, "b h s d -> b s (h d)"))
    x = x + rms_norm(block["attn_post_norm"], out, eps)
    fed = glu_mlp(block["mlp"], rms_norm(block["mlp_norm"], x, eps), config.activation)
    return x + rms_norm(block["mlp_post_norm"], fed, eps)


def embed(params: TensorDictBase, batch: Batch, config: Gemma3Config) -> Float[Tensor, "batch seq d_model"]:
    """Token embeddings times ``sqrt(d_model)``, the factor rounded to the weights' dtype first.

    The rounding is that of Gemma's reference code, which ``transformers`` keeps (``Gemma3TextScaledWordEmbedding``,
    PR #29402): in bfloat16 the factor for d_model 3072 is 55.5, not 55.43.
    """
    weight: Tensor = params["embed", "weight"]
    scale = torch.tensor(config.d_model**0.5, dtype=torch.float32).to(
        device=weight.device, dtype=weight.dtype
    )
    return embedding(params["embed"], batch.tokens) * scale


def unembed(
    params: TensorDictBase, hidden: Float[Tensor, "batch seq d_model"], config: Gemma3Config
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from hidden states (through the embedding matrix when tied), soft-capped if the config says so."""
    return softcap(common.unembed(params, hidden, config.tie_embeddings), config.final_logit_softcap)


def rms_norm(
    params: TensorDictBase, x: Float[Tensor, "*batch d_model"], eps: float
) -> Float[Tensor, "*batch d_model"]:
    """Gemma's RMSNorm: normalise and scale by ``(1 + w)`` all in float32 at least, then cast back.

    ``zmaj.nn.layers.rms_norm(..., offset=1)`` is the same function in float32, but casts before scaling, as
    Llama does; in bfloat16 the two round differently, and this is the order of Gemma's reference code, which
    ``transformers`` follows (PR #29402).
    """
    normed = F.rms_norm(at_least_float32(x), x.shape[-1:], eps=eps)
    weight: Tensor = params["weight"]
    return (normed * (1.0 + at_least_float32(weight))).to(x.dtype)


def _rotated_qkv(
    block: TensorDictBase,
    x: Float[Tensor, "batch seq d_model"],
    cos: Float[Tensor, "batch seq half"],
    sin: Float[Tensor, "batch seq half"],
    config: Gemma3Config,
) -> tuple[
    Float[Tensor, "batch heads seq head_dim"],
    Float[Tensor, "batch kv_heads seq head_dim"],
    Float[Tensor, "batch kv_heads seq head_dim"],
]:
    """A block's query, key and value heads from its pre-normed input; q and k RMS-normalised (Gemma 3), then
    rotated."""
    params, normed = block["attn"], rms_norm(block["attn_norm"], x, config.norm_eps)
    q, k, v = project_heads(params, normed, config.n_heads, config.n_kv_heads)
    if config.qk_norm:
        q = rms_norm(params["q_norm"], q, config.norm_eps)
        k = rms_norm(params["k_norm"], k, config.norm_eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class Gemma3(Shell):
    """``nn.Module`` shell over :func:`forward`; its parameters are exactly ``init(config, seed)``."""

    def __init__(self, config: Gemma3Config, params: TensorDictBase | None = None, seed: int = 0) -> None:
        super().__init__(init(config, seed) if params is None else params)
        self.config = config

    def forward(self, batch: Batch, dropout_seed: int | None = None) -> Float[Tensor, "batch seq vocab"]:
        return forward(self.params(), batch, self.config, dropout_seed)


def pure(config: Gemma3Config) -> partial[Tensor]:
    """``forward`` with its config bound, so it reads ``model(params, batch)``."""
    return partial(forward, config=config)


def cached(config: Gemma3Config) -> partial[tuple[Tensor, TensorDict]]:
    """``forward_cached`` with its config bound: the ``step(params, batch, cache, donate=False,
    last_only=False)`` that generation takes (``zmaj.models.common.CachedForward``)."""
    return partial(forward_cached, config=config)
