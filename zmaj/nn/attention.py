"""Scaled dot-product attention with grouped-query heads, and the plainest self-attention layer built on it.

Three interchangeable backends compute the same function, and ``auto`` (the models' default) picks one:

- ``eager``: the textbook formula, softmax(q k^T / sqrt(d) + bias) v (Vaswani et al., 2017, eq. 1), written with
  einsum so the grouped-query sharing of key/value heads (Ainslie et al., 2023) is visible in the axis names.
  This is the one to read.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, fused kernels; a ``None`` mask selects its
  causal fast path.
- ``flex``: compiled flex-attention with a ``BlockMask``: it skips fully masked tiles, so attention over packed
  documents costs in proportion to the tiles it computes.
- ``auto``: ``sdpa``, except where the formula measured faster (``choose_backend``).

Why ``1 / sqrt(d)``: the dot product of two ``d``-long vectors of unit-variance entries has variance ``d``, so
unscaled scores grow with the head size and push the softmax into saturation, where its gradients vanish
(Vaswani et al., section 3.2.1). Why grouped queries: several query heads share one key/value head, which
shrinks the key/value cache, and so the memory decoding reads per token, by ``heads / kv_heads``.

For generation, ``cached_attention`` attends from new tokens over the slots of a preallocated key/value cache
(layout in ``zmaj.infer.cache``) under a dense mask, so every decode step has the same shapes; on the CPU it
reads the written slots alone (eagerly, and compiled through ``zmaj.infer.generate.compile_step``).

Gemma 2 soft-caps the scores, ``cap * tanh(scores / cap)`` between the scaling and the mask (Gemma Team, 2024,
"Gemma 2", arXiv:2408.00118, section 2, following Gemini 1.5), which keeps every score within ``(-cap, cap)``.
SDPA has no place for that step; ``softcap=`` runs the formula instead (``auto``), or flex with the
cap as its ``score_mod``.
"""

import math
from collections.abc import Callable
from functools import cache
from typing import Literal, cast, no_type_check

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Bool, Float, Int
from tensordict import TensorDictBase
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from zmaj.nn import masks
from zmaj.nn.layers import fused_linear, linear
from zmaj.nn.loss import softcap as cap_scores
from zmaj.nn.softmax import masked_softmax

Backend = Literal["auto", "eager", "sdpa", "flex"]
Kernel = Literal["eager", "sdpa", "flex"]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""Flex's ``score_mod(score, batch, head, q_idx, kv_idx)``: a change to one scaled score, before the mask."""

FORMULA_MAX_KEYS = 512
"""The longest key sequence for which ``auto`` compiles the formula on a CPU (``choose_backend``)."""

AttentionMask = Bool[Tensor, "batch q_seq k_seq"] | BlockMask | None
"""A mask in the form its backend wants: boolean for eager/SDPA, a BlockMask for flex, None for plain causal
(with fewer queries than keys, the queries are the last positions, as in FlashAttention 2 and ``_causal``)."""


def prepare_mask(
    mod: masks.MaskMod | None,
    batch: int,
    q_len: int,
    k_len: int,
    backend: Backend,
    device: torch.device | str = "cpu",
) -> AttentionMask:
    """Build a mask once per forward pass, in the form ``backend`` consumes; ``mod=None`` means plain causal
    (``AttentionMask``: the queries are the last ``q_len`` positions)."""
    if backend == "flex":
        causal = masks.causal if q_len == k_len else masks.offset_queries(masks.causal, k_len - q_len)
        return masks.block_mask(mod or causal, batch, q_len, k_len, device)
    if mod is None:
        return None
    return masks.dense(mod, batch, q_len, k_len, device)


def choose_backend(
    backend: Backend, device: torch.device, dtype: torch.dtype, k_len: int, compiling: bool, grad: bool
) -> Kernel:
    """The backend that computes attention: ``backend`` itself, unless it is ``auto``; ``dtype`` is the
    precision attention computes in (autocast's where it is on), ``grad`` whether a backward pass will follow.

    ``auto`` is ``sdpa`` (fused kernels, flash attention on GPUs), except in a compiled training step on a CPU
    in 16-bit precision over at most ``FORMULA_MAX_KEYS`` keys, where it is the formula: a power-of-two scale
    goes onto q, where Inductor fuses it (:func:`grouped_queries`; another stays on the scores), and zmaj's
    softmax operator adds the mask and normalises on ATen's kernels (``zmaj.nn.softmax``), while CPU SDPA's
    flash backward is slow. Measured on a 2-core Xeon with AMX (one-off scripts: one layer's attention and a
    sum of squares as the loss, compiled, 2048 tokens a batch, 6 heads of 64, median ms; formula against SDPA): forward and
    backward, causal, bf16: 24.5 vs 36.3 at 256 keys, 39.6 vs 43.7 at 512, 82.6 vs 54.7 at 1024, 193 vs 78
    at 2048 (the formula computes every score, flash skips the masked half); two documents in 256 keys: 22.5
    vs 39.8; fp32 causal at 256: 26.5 vs 24.2, so full precision keeps SDPA. Forward alone SDPA wins (bf16,
    256 keys: 4.1 vs 14.8 causal, 4.9 vs 13.7 with documents), so evaluation and generation keep it; eagerly
    the formula is a chain of unfused passes, so SDPA again.
    """
    if backend != "auto":
        return backend
    half = dtype in (torch.bfloat16, torch.float16)
    if compiling and grad and device.type == "cpu" and half and k_len <= FORMULA_MAX_KEYS:
        return "eager"
    return "sdpa"


def resolve_backend(backend: Backend, q: Tensor, k_len: int) -> Kernel:
    """``choose_backend`` where attention runs now: ``q``'s device, autocast's dtype if it is on there (a
    float32 ``q`` out of a float32 norm, QK-norm's, is still attended in bf16 under bf16 autocast), whether
    ``torch.compile`` is tracing, and whether gradients are on."""
    device = q.device
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else q.dtype
    return choose_backend(
        backend, device, dtype, k_len, torch.compiler.is_compiling(), torch.is_grad_enabled()
    )


def attention(
    q: Float[Tensor, "batch heads q_seq head_dim"],
    k: Float[Tensor, "batch kv_heads k_seq head_dim"],
    v: Float[Tensor, "batch kv_heads k_seq head_dim"],
    mask: AttentionMask,
    backend: Backend,
    scale: float | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "batch heads q_seq head_dim"]:
    """Attention of every query head over its group's key/value head; ``scale`` defaults to 1/sqrt(head_dim),
    and ``softcap`` soft-caps the scaled scores (module docstring)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kernel = _uncapped_or_formula(backend, resolve_backend(backend, q, k.shape[2]), softcap)
    if kernel == "flex":
        if not isinstance(mask, BlockMask):
            raise TypeError(
                "the flex backend needs a BlockMask: build it with prepare_mask(..., backend='flex')"
            )
        return flex(q, k, v, mask, scale, softcap=softcap)
    if isinstance(mask, BlockMask):
        raise TypeError(f"the {kernel} backend needs a boolean mask, not a BlockMask")
    if kernel == "eager":
        return eager_attention(q, k, v, mask if mask is not None else _causal(q, k), scale, softcap)
    return sdpa_attention(q, k, v, mask, scale)


def _uncapped_or_formula(backend: Backend, kernel: Kernel, softcap: float | None) -> Kernel:
    """``kernel``, unless the scores are soft-capped and it is SDPA, which cannot: then the formula, where
    ``auto`` chose SDPA, and an error where the caller named it."""
    if softcap is None or kernel != "sdpa":
        return kernel
    if backend == "sdpa":
        raise ValueError("the sdpa backend cannot soft-cap attention scores: use auto, eager or flex")
    return "eager"


def eager_attention(
    q: Float[Tensor, "batch heads q_seq head_dim"],
    k: Float[Tensor, "batch kv_heads k_seq head_dim"],
    v: Float[Tensor, "batch kv_heads k_seq head_dim"],
    mask: Bool[Tensor, "#batch q_seq k_seq"],
    scale: float,
    softcap: float | None = None,
) -> Float[Tensor, "batch heads q_seq head_dim"]:
    """softmax(q k^T * scale + bias) v, each group of query heads sharing one key/value head; with ``softcap``,
    softmax(softcap(q k^T * scale) + bias) v."""
    q, score_scale = grouped_queries(q, k.shape[1], scale)
    scores = einsum(q, k, "b kv g q d, b kv k d -> b kv g q k")
    if score_scale is not None:
        scores = scores * score_scale
    scores = cap_scores(scores, softcap)
    weights = masked_softmax(scores, mask[:, None, None]).to(v.dtype)
    out = einsum(weights, v, "b kv g q k, b kv k d -> b kv g q d")
    return rearrange(out, "b kv g q d -> b (kv g) q d")


def grouped_queries(
    q: Float[Tensor, "batch heads q_seq head_dim"], kv_heads: int, scale: float
) -> tuple[Float[Tensor, "batch kv_heads group q_seq head_dim"], float | None]:
    """q split into the groups of heads that share a key/value head, and the scale the scores still need.

    A scale that is a power of two multiplies q instead of the scores, a tensor ``k_seq / head_dim`` times
    smaller: only the exponents change, so the bits are the same (``None`` is returned for the scores). Any other
    scale stays on the scores, where rounding it in bf16 gives what ``transformers`` computes.
    """
    if math.frexp(scale)[0] == 0.5:
        return rearrange(q * scale, "b (kv g) q d -> b kv g q d", kv=kv_heads), None
    return rearrange(q, "b (kv g) q d -> b kv g q d", kv=kv_heads), scale


def single_query_attention(
    q: Float[Tensor, "batch heads 1 head_dim"],
    k: Float[Tensor, "batch kv_heads k_seq head_dim"],
    v: Float[Tensor, "batch kv_heads k_seq head_dim"],
    mask: Bool[Tensor, "#batch 1 k_seq"],
    scale: float,
    softcap: float | None = None,
) -> Float[Tensor, "batch heads 1 head_dim"]:
    """``eager_attention`` for one query per row (a decode step), written as multiplies and sums so that
    ``torch.compile`` emits the loops itself, as ``zmaj.nn.layers.matvec`` does for the weights.

    The einsums of the formula become batched matrix products with a single row each, which Inductor hands to
    ATen: in SmolLM2-135M's compiled bf16 decode step (batch 1, 2-core Xeon with AMX) each took about 100
    microseconds, 60 of them together 6 ms a token, a fifth of the step. Here the products are fused into the
    reductions and never materialised. Run eagerly, each sum accumulates in float32 (at least) and is rounded
    to the inputs' dtype where the formula's products round theirs, and the scale goes where the formula puts
    it: the same bits in bf16, other orders of addition in float32. Compiled, Inductor drops the roundings
    between fused operations (``emulate_precision_casts`` is off), so bf16 scores and weights stay float32:
    slightly more accurate than the formula, not its bits.
    """
    q, score_scale = grouped_queries(q, k.shape[1], scale)
    acc = torch.promote_types(k.dtype, torch.float32)
    scores = (q.to(acc) * k.to(acc)[:, :, None]).sum(-1).to(k.dtype)  # b kv g k
    if score_scale is not None:
        scores = scores * score_scale
    scores = cap_scores(scores, softcap)
    weights = masked_softmax(scores[..., None, :], mask[:, None, None]).squeeze(-2)
    out = (weights.to(acc)[..., None] * v.to(acc)[:, :, None]).sum(-2).to(v.dtype)  # b kv g d
    return rearrange(out, "b kv g d -> b (kv g) 1 d")


def sdpa_attention(
    q: Float[Tensor, "batch heads q_seq head_dim"],
    k: Float[Tensor, "batch kv_heads k_seq head_dim"],
    v: Float[Tensor, "batch kv_heads k_seq head_dim"],
    mask: Bool[Tensor, "batch q_seq k_seq"] | None,
    scale: float,
) -> Float[Tensor, "batch heads q_seq head_dim"]:
    """PyTorch's fused attention; without a mask it runs causal with its own (faster) causal kernels.

    Those align the queries with the first keys (``is_causal``'s top-left diagonal), so with fewer queries than
    keys the mask is written out instead, the queries being the last positions as everywhere else."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None and q.shape[2] != k.shape[2]:
        mask = _causal(q, k)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)


def flex(
    q: Float[Tensor, "batch heads q_seq head_dim"],
    k: Float[Tensor, "batch kv_heads k_seq head_dim"],
    v: Float[Tensor, "batch kv_heads k_seq head_dim"],
    mask: BlockMask,
    scale: float,
    compiled: bool = True,
    softcap: float | None = None,
) -> Float[Tensor, "batch heads q_seq head_dim"]:
    """Flex-attention; uncompiled it runs a slow dense reference of the same semantics (handy in tests).
    A soft-cap is its ``score_mod``, which flex applies to the scaled scores, before the mask."""
    gqa = q.shape[1] != k.shape[1]
    # Inside an outer torch.compile the plain function is traced and fused into the surrounding graph.
    fn = _compiled_flex() if compiled and not torch.compiler.is_compiling() else flex_attention
    score_mod = None if softcap is None else _capped(torch.tensor(softcap, device=q.device))
    out = fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale, enable_gqa=gqa)
    assert isinstance(out, Tensor)
    return out


def _capped(cap: Float[Tensor, ""]) -> ScoreMod:
    """Flex's ``score_mod`` that soft-caps each score. The cap is a tensor, which flex passes to its kernel as
    a buffer (a Python float it would trace as a symbolic float, which it refuses). Marked ``no_type_check``
    and the formula written out, as ``zmaj.nn.masks``' mods are: flex traces the function, and a runtime shape
    check keeps state that tracing refuses."""

    @no_type_check
    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return torch.tanh(score / cap) * cap

    return cast(ScoreMod, score_mod)  # mypy reads a no_type_check function as Any


@cache
def _compiled_flex():  # type: ignore[no-untyped-def]
    return torch.compile(flex_attention, dynamic=False)


def _causal(
    q: Float[Tensor, "batch heads q_seq head_dim"], k: Float[Tensor, "batch kv_heads k_seq head_dim"]
) -> Bool[Tensor, "1 q_seq k_seq"]:
    """The causal mask for queries that are the last ``q_seq`` of ``k_seq`` positions, one row for the whole
    batch. An operator that takes the mask as an input (``masked_softmax``) would otherwise get it expanded to
    every row, which ``torch.compile`` writes out in full before the call, and the operator reads it all: about
    0.35 ms a layer at batch 8 and 256 positions (a profile of the compiled step each way)."""
    q_len, k_len = q.shape[2], k.shape[2]
    return masks.dense(masks.offset_queries(masks.causal, k_len - q_len), 1, q_len, k_len, q.device)


def self_attention(
    params: TensorDictBase,
    x: Float[Tensor, "batch seq d_model"],
    mask: AttentionMask,
    n_heads: int,
    n_kv_heads: int,
    backend: Backend,
) -> Float[Tensor, "batch seq d_model"]:
    """Multi-head self-attention: project to q/k/v heads, attend, merge heads, project back. The layer at its
    plainest, to read; each model spells it out itself (``project_heads``, then ``attention``), because each
    adds its own steps between the projection and the attention (RoPE, QK-norm, value embeddings)."""
    q, k, v = project_heads(params, x, n_heads, n_kv_heads)
    out = attention(q, k, v, mask, backend)
    return linear(params["o"], rearrange(out, "b h s d -> b s (h d)"))


def project_heads(
    params: TensorDictBase, x: Float[Tensor, "batch seq d_model"], n_heads: int, n_kv_heads: int
) -> tuple[
    Float[Tensor, "batch heads seq head_dim"],
    Float[Tensor, "batch kv_heads seq head_dim"],
    Float[Tensor, "batch kv_heads seq head_dim"],
]:
    """The query, key and value heads of ``x``, projected in one matmul where gradients are taken
    (``fused_linear``); a model that changes them before attending (RoPE, QK-norm) starts here."""
    q, k, v = fused_linear([params["q"], params["k"], params["v"]], x)
    return (
        rearrange(q, "b s (h d) -> b h s d", h=n_heads),
        rearrange(k, "b s (h d) -> b h s d", h=n_kv_heads),
        rearrange(v, "b s (h d) -> b h s d", h=n_kv_heads),
    )


def cached_attention(
    q: Float[Tensor, "batch heads q_seq head_dim"],
    cache_k: Float[Tensor, "batch kv_heads k_seq head_dim"],
    cache_v: Float[Tensor, "batch kv_heads k_seq head_dim"],
    mask: Bool[Tensor, "batch q_seq k_seq"],
    backend: Backend,
    scale: float | None = None,
    written: Int[Tensor, ""] | None = None,
    softcap: float | None = None,
) -> Float[Tensor, "batch heads q_seq head_dim"]:
    """New tokens' queries over the slots of a key/value cache that already holds their own keys and values
    (``zmaj.models.common.CacheStep.write`` puts them there).

    The mask must hide the slots not written yet; ``zmaj.models.common.cache_mask`` does. The buffer's fixed
    shapes keep every decode step's graph the same, which is what lets ``torch.compile`` reuse one graph (the
    written count is read at run time, below). ``flex`` runs as SDPA here: a decode step's single query row
    leaves no tiles to skip, and building a BlockMask per step costs more. A decode step (one query) runs the
    eager formula whatever the backend: PyTorch's CPU SDPA kernel with an explicit mask took 5 ms per call
    there (SmolLM2-135M, 160 slots, measured), 30x the two small einsums; compiled on the CPU, it runs that
    formula as multiplies and sums (``single_query_attention``), which Inductor fuses (not measured on GPUs,
    where the einsums stay). Several queries (a prefill) take ``backend``, ``auto`` resolved as in
    ``attention``: SDPA when no gradients are taken, as in generation, and the formula where ``softcap`` is set.

    ``written``, the number of slots written (``CacheStep.length``), lets attention on the CPU read those
    slots alone: the others are masked, so the outputs are those of the whole buffer (to the summation order),
    at the cost of what is written, not what was allocated. Eagerly that is a slice by a Python int; a GPU is
    left alone, where reading the count would make the host wait for the device at every layer. Under
    ``torch.compile`` a decode step slices where ``torch._dynamo.config.capture_scalar_outputs`` is on
    (``zmaj.infer.generate.compile_step`` turns it on): the count becomes a size that the generated loops read
    at run time, so one graph still serves every step. Over 30 layers of SmolLM2-135M's heads and a 1032-slot
    cache (fp32, 2-core AVX2 EPYC), compiled: 0.67 ms with 100 slots written against 4.19 ms over all of them,
    and 4.47 against 3.80 ms with all 1032 written (loops with a bound known only at run time); SmolLM2-135M
    decoding 1024 tokens in one process, 46.3 against 40.4 tokens/s, the same tokens. Eagerly, at batch 16:
    11.5 ms with 100 slots, 35.9 with 516, 62.7 with 1032.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if written is not None and q.device.type == "cpu":
        cache_k, cache_v, mask = _written_slots(cache_k, cache_v, mask, written, q.shape[2] == 1)
    if q.shape[2] == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
        return single_query_attention(q, cache_k, cache_v, mask, scale, softcap)
    kernel = resolve_backend(backend, q, cache_k.shape[2])
    kernel = _uncapped_or_formula(backend, "sdpa" if kernel == "flex" else kernel, softcap)
    if kernel == "eager" or q.shape[2] == 1:
        return eager_attention(q, cache_k, cache_v, mask, scale, softcap)
    return sdpa_attention(q, cache_k, cache_v, mask, scale)


def _written_slots(
    cache_k: Float[Tensor, "batch kv_heads k_seq head_dim"],
    cache_v: Float[Tensor, "batch kv_heads k_seq head_dim"],
    mask: Bool[Tensor, "batch q_seq k_seq"],
    written: Int[Tensor, ""],
    decoding: bool,
) -> tuple[
    Float[Tensor, "batch kv_heads n head_dim"],
    Float[Tensor, "batch kv_heads n head_dim"],
    Bool[Tensor, "batch q_seq n"],
]:
    """The first ``written`` slots of the keys, values and mask (``cached_attention``), or all of them in a
    compiled graph that does not read the count: a prefill (SDPA's, not tried with a size known only at run
    time) or one traced without scalar outputs captured."""
    n: int
    if not torch.compiler.is_compiling():
        n = int(written)
    elif decoding and torch._dynamo.config.capture_scalar_outputs:
        n = cast(int, written.item())  # a SymInt while tracing, which the slices below take
        torch._check(n >= 1)  # the bounds dynamo needs to slice by a number it reads at run time
        torch._check(n <= cache_k.shape[2])
    else:
        return cache_k, cache_v, mask
    return cache_k[:, :, :n], cache_v[:, :, :n], mask[..., :n]
