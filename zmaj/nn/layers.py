"""The small pure layers every architecture shares: embeddings, linear maps, norms, MLPs, positions, dropout.

Each takes its parameters (a TensorDict) first. Weights keep the ``nn.Linear`` layout ``[out, in]``, so
``F.linear`` uses them as stored and ``nn.Linear`` checkpoints (Llama, Qwen, Gemma) convert without transposes;
GPT-2's ``Conv1D`` stores ``[in, out]``, transposed on conversion (``zmaj.convert.gpt2``).
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tensordict import TensorDictBase
from torch import Tensor

Activation = Literal["gelu", "gelu_tanh", "silu", "relu", "relu2"]
_join: ContextVar[bool] = ContextVar("join", default=True)


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 where it is narrower (bf16, fp16), else as it is: what the norms, softmaxes and losses
    accumulate in, since bf16 keeps 8 significant bits and a sum of thousands of squares or exponentials in it
    loses its small terms. ``x.float()`` would also narrow float64, and a float64 gradient check of the readable
    paths would then fail by float32's rounding."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def embedding(params: TensorDictBase, ids: Int[Tensor, "*batch"]) -> Float[Tensor, "*batch d_model"]:
    """The rows of the table ``params["weight"]`` at ``ids``: token (or position) embeddings.

    ``F.embedding`` rather than ``weight[ids]``, for the backward pass: both scatter-add the incoming gradient
    into the rows that were read, but indexing's backward is ``index_put_(accumulate=True)``, whose CPU kernel
    (``index_put_kernel`` in ATen's ``cpu/IndexKernel.cpp``) splits the positions between threads that add with
    atomics, so a row read at several positions sums in the order the threads happen to arrive: two runs of
    one spec then differ in the last bits (issue 19). ``embedding_dense_backward_cpu`` (ATen's
    ``Embedding.cpp``) splits the *table* between threads instead, each walking all positions in order, so the
    sum is the same on every run at any thread count. The forward pass is the same copy of rows either way.
    """
    return F.embedding(ids, params["weight"])


def linear(params: TensorDictBase, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_out"]:
    """x W^T + b, the bias optional; plus a low-rank update (x A^T) B^T where the params carry LoRA factors.

    ``lora_a`` and ``lora_b`` (already scaled) are put there by ``zmaj.models.lora.attach``; going through the
    rank-r bottleneck never forms the full-size update B A.
    """
    weight: Tensor = params["weight"]
    if compiling_one_row(x):
        out = matvec(weight, x)
        bias = params.get("bias", None)
        if bias is not None:
            out = out + bias
    else:
        out = F.linear(x, weight, params.get("bias", None))
    lora_a = params.get("lora_a", None)
    if lora_a is not None:
        out = out + F.linear(F.linear(x, lora_a), params["lora_b"])
    return out


def fused_linear(
    params: Sequence[TensorDictBase], x: Float[Tensor, "*batch d_in"]
) -> list[Float[Tensor, "*batch d_out"]]:
    """``[linear(p, x) for p in params]`` as one matmul: the weights (and biases) concatenated along the output
    axis at compute time, the product split back. What nanoGPT's ``c_attn`` does for q, k and v, with the
    parameters still stored apart, so checkpoints and conversion tables keep one tensor per projection.

    It pays in training: one product of ``3 d`` outputs keeps the matrix units busier than three of ``d``, and
    the backward's input gradient becomes one product instead of three products and two sums. The price is a
    copy of the weights per call, which a forward alone rarely earns back, so without gradients (evaluation,
    prefill, decoding) the maps stay apart; so they do for a single row, whose products are all copy and no
    reuse (compiled, ``linear``'s ``matvec``). Measured on a 2-core AVX2 CPU, fp32, no gradients, SmolLM2-135M's
    shapes (``benchmarks/README.md``; not measured on GPUs): the joined product took 1.9-2.3x the separate
    products' time for one row, 1.5-1.8x for 8 and 0.9-1.2x for 128 to 2048; the copy was a quarter of an
    eager decode step. LoRA factors add their update to their map's part. Within :func:`maps_apart` (fully
    sharded training) the maps stay apart too.
    """
    if not torch.is_grad_enabled() or x.shape[:-1].numel() == 1 or not _join.get():
        return [linear(p, x) for p in params]
    weights: list[Tensor] = [p["weight"] for p in params]
    biases: list[Tensor | None] = [p.get("bias", None) for p in params]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat(
            [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights, strict=True)]
        )
    outs = torch.split(F.linear(x, torch.cat(weights), bias), [w.shape[0] for w in weights], dim=-1)
    return [_lora_update(p, x, out) for p, out in zip(params, outs, strict=True)]


@contextmanager
def maps_apart() -> Iterator[None]:
    """Within this context, :func:`fused_linear` runs its maps apart. Fully sharded training frees each block's
    gathered weights once the next block starts (``zmaj.train.parallel.Gathered``), but the joined weight is a
    new tensor, which the product saves for its backward: every layer's joined q/k/v and gate/up would stay
    until the backward, two thirds of a Llama's blocks, whole. Apart, each product saves the gathered weight
    itself, which the sharded forward frees."""
    token = _join.set(False)
    try:
        yield
    finally:
        _join.reset(token)


def _lora_update(params: TensorDictBase, x: Tensor, out: Tensor) -> Tensor:
    """``out`` plus the low-rank update (x A^T) B^T where ``params`` carry LoRA factors, as in ``linear``."""
    lora_a = params.get("lora_a", None)
    return out if lora_a is None else out + F.linear(F.linear(x, lora_a), params["lora_b"])


def compiling_one_row(x: Float[Tensor, "*batch d_in"]) -> bool:
    """Whether a product with ``x`` should be ``matvec``: a single row, inside ``torch.compile``.

    A single row reuses no weight, so the product is a stream of the weights that Inductor's own loop runs
    faster than PyTorch's GEMV; eager, ``matvec`` would materialise the whole product, and several rows reuse
    each weight in ``F.linear``'s matrix kernels.
    """
    return torch.compiler.is_compiling() and x.shape[:-1].numel() == 1


def matvec(weight: Float[Tensor, "d_out d_in"], x: Float[Tensor, "*one d_in"]) -> Float[Tensor, "*one d_out"]:
    """W x for a single vector, written as a multiply and a sum so that ``torch.compile`` emits the loop itself.

    Decoding one token is a matrix-vector product per weight, bound by how fast the weights stream from memory.
    PyTorch's CPU GEMV kernels stream them at 13-16 GB/s (bf16) and ~12 GB/s (fp32) on a 2-core EPYC whose read
    bandwidth is ~34 GB/s; Inductor's fused multiply-reduce loop (nothing materialised, float32 accumulation)
    reaches 23 GB/s (bf16) and 28 GB/s (fp32) (``benchmarks/decode.py``). Eager, the product would be materialised, so
    ``linear`` and ``zmaj.models.common.unembed`` take this path only while compiling.

    ``x`` is stored first: left to itself, Inductor may inline a pointwise input, such as the last residual
    sum and RMSNorm before the unembedding, into the loop and compute it again for every output row, 49,152
    times for SmolLM2's vocabulary. Inductor's lowering of ``as_strided`` realises its input (torch 2.15,
    ``torch/_inductor/lowering.py``); ``contiguous`` first, so that the view asks only for elements stored.
    """
    x = x.contiguous()
    x = x.as_strided(x.shape, x.stride())
    product = at_least_float32(x).unsqueeze(-2) * at_least_float32(weight)
    return product.sum(-1).to(x.dtype)


def layer_norm(
    params: TensorDictBase, x: Float[Tensor, "*batch d_model"], eps: float
) -> Float[Tensor, "*batch d_model"]:
    """LayerNorm (Ba et al., 2016): centre and scale each vector, then an affine map."""
    normed: Tensor = F.layer_norm(x, x.shape[-1:], params["weight"], params.get("bias", None), eps)
    return normed


def rms_norm(
    params: TensorDictBase, x: Float[Tensor, "*batch d_model"], eps: float, offset: float = 0.0
) -> Float[Tensor, "*batch d_model"]:
    """RMSNorm (Zhang & Sennrich, 2019): scale by the root mean square, no centring.

    Normalises in float32 at least (``at_least_float32``), as Llama does. ``offset=1`` gives Gemma's ``(1 + w)`` scale,
    whose weights are stored as deviations from one.

    ``F.rms_norm`` is the formula ``x * rsqrt(mean(x^2) + eps)`` to the bit, forward and backward, and compiles
    to the same graph; eagerly it is one fused kernel where the formula is five passes and its backward more
    (fp32 forward and backward of ``[16, 4, 256, 64]``: 8.8 -> 5.9 ms on a 2-core AVX2 EPYC).
    """
    normed = F.rms_norm(at_least_float32(x), x.shape[-1:], eps=eps)
    weight: Tensor = params["weight"]
    return normed.to(x.dtype) * (weight + offset)


def activation(name: Activation, x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """The named elementwise nonlinearity (``gelu_tanh`` is GPT-2's and Gemma's approximation).

    ``relu2`` is ReLU squared, found by architecture search in Primer (So et al., 2021, arXiv:2109.08668) and
    kept by the modded-nanogpt speedrun; ``transformers`` calls it ``relu2`` too (``ReLUSquaredActivation``).
    Inside ``torch.compile`` and with gradients on, GELU is ``gelu_saving_derivative`` (the same value): without
    gradients there is no backward pass to save the derivative for.
    """
    if name in ("gelu", "gelu_tanh") and torch.compiler.is_compiling() and torch.is_grad_enabled():
        return gelu_saving_derivative(x, tanh=name == "gelu_tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    if name == "relu2":
        return F.relu(x).square()
    return F.relu(x)


def gelu_saving_derivative(x: Float[Tensor, "*shape"], tanh: bool) -> Float[Tensor, "*shape"]:
    """GELU (Hendrycks & Gimpel, 2016) whose backward pass is one multiply by a derivative the forward pass
    computed: ``gelu(x) + (x - x.detach()) * gelu'(x).detach()``, the value GELU's and the gradient
    ``grad * gelu'(x)``.

    Autograd's GELU saves ``x`` and evaluates erf (or tanh) again in the backward pass; here the forward pass
    evaluates it once for both, and saves ``gelu'(x)`` in place of ``x`` (the same size). Only worth it where a
    compiler fuses the forward's formulas into one loop: ``activation`` takes this path inside
    ``torch.compile``, where it cut GELU's forward and backward from 4.8 to 3.4 ms per layer (bf16,
    ``[2048, 1536]``, 2-core Xeon; ``benchmarks/train_step.py``). Eagerly each formula would be its own
    pass over the tensor. The derivative is stored in ``x``'s dtype: in bf16 one more rounding of the gradient.
    Finite inputs give GELU's value whatever their size; infinite ones give NaN (``inf - inf``).
    """
    x32 = at_least_float32(x)
    if tanh:  # GPT-2's approximation: 0.5 x (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3)
        t = torch.tanh(math.sqrt(2 / math.pi) * (x32 + 0.044715 * x32**3))
        y = 0.5 * x32 * (1 + t)
        # Where |x| > 10, t is +-1 in float32 and the second term 0; clipping x keeps x^2 from making it 0 * inf.
        xc = x32.clamp(-10, 10)
        derivative = 0.5 * (1 + t) + 0.5 * xc * (1 - t * t) * math.sqrt(2 / math.pi) * (
            1 + 3 * 0.044715 * xc**2
        )
    else:  # x Phi(x), whose derivative is Phi(x) + x phi(x)
        cdf = 0.5 * (1 + torch.erf(x32 * math.sqrt(0.5)))
        y = x32 * cdf
        derivative = cdf + x32 * torch.exp(-0.5 * x32 * x32) / math.sqrt(2 * math.pi)
    return y.to(x.dtype).detach() + (x - x.detach()) * derivative.to(x.dtype).detach()


def mlp(
    params: TensorDictBase, x: Float[Tensor, "*batch d_model"], act: Activation
) -> Float[Tensor, "*batch d_model"]:
    """The transformer feed-forward block: expand to d_ff, nonlinearity, project back."""
    return linear(params["down"], activation(act, linear(params["up"], x)))


def glu_mlp(
    params: TensorDictBase, x: Float[Tensor, "*batch d_model"], act: Activation
) -> Float[Tensor, "*batch d_model"]:
    """Gated feed-forward block (Shazeer, 2020): act(x W_gate) * (x W_up), projected back; SwiGLU when act=silu."""
    gate, up = fused_linear([params["gate"], params["up"]], x)
    # contiguous: on a strided view (a part of the fused product) the CPU's SiLU takes its scalar loop, which
    # rounds differently from the vectorised one that a LoRA-adapted (hence contiguous) gate gets.
    return linear(params["down"], activation(act, gate.contiguous()) * up)


def sinusoidal_positions(positions: Int[Tensor, "*batch"], d_model: int) -> Float[Tensor, "*batch d_model"]:
    """Fixed positional encodings of Vaswani et al. (2017, section 3.5): sin on even, cos on odd features."""
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32)
        * (-math.log(10_000.0) / d_model)
    )
    angles = positions.float()[..., None] * inv_freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def dropout(
    x: Float[Tensor, "*shape"], p: float, generator: torch.Generator | None
) -> Float[Tensor, "*shape"]:
    """Inverted dropout whose randomness comes only from ``generator``; no generator means evaluation (identity)."""
    if generator is None or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1.0 - p)
