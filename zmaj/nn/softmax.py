"""The softmax of attention scores over the keys a mask allows, and a compiled form that runs PyTorch's kernel.

``masked_softmax(scores, mask)`` is ``softmax(scores + bias)`` with the textbook additive bias (0 where ``mask``
allows, -inf elsewhere), and that is how it runs eagerly. Inside ``torch.compile`` it runs as an operator of its
own (``torch.library.custom_op``), which the compiler calls rather than traces: ATen adds the bias to the scores
and ATen's softmax normalises them. Its backward pass is softmax's formula, ``w * (g - sum(w * g))`` in
float32, which the compiler fuses into one kernel and which never reads the mask (the weights are zero where keys
were hidden, so their gradients are too). Measured in the compiled bf16 training step of
``benchmarks/train_step.py`` (2-core Xeon with AMX, scores ``[8, 6, 256, 256]`` per layer, profiles with Inductor's
per-kernel records): Inductor's own softmax kernel, which writes ``exp(scores - max)`` out in float32 and reads it
back twice, took 4.0-4.3 ms a layer forward and 1.0 backward; the operator's two kernels take 0.7 (the add) +
1.1-1.5 ms (the softmax) forward, and its backward 0.56-0.69.

It is the CPU counterpart of the fused "scaled masked softmax" kernels Megatron-LM writes for GPUs
(``megatron/core/fusions/fused_softmax.py``), though two passes, not one. On GPUs ``attention: sdpa`` is the fast
path anyway.
"""

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from zmaj.nn import masks
from zmaj.nn.layers import at_least_float32


def masked_softmax(
    scores: Float[Tensor, "*batch q_seq k_seq"], mask: Bool[Tensor, "*#batch q_seq k_seq"]
) -> Float[Tensor, "*batch q_seq k_seq"]:
    """``softmax(scores + additive_bias(mask))`` over the keys, in float32 at least, as the scores' dtype; ``mask``
    broadcasts to ``scores``. A row whose keys are all masked gives NaN, as the formula does.

    Under ``torch.compile`` with ``q_seq > 1``, the operator (module docstring). Its backward pass works from
    the weights in the scores' dtype, where the formula's keeps them in float32: in bf16, one more rounding of
    the gradient. Decode steps (one query) keep the formula, which the compiler fuses with its neighbours: the
    operator cost SmolLM2-135M's compiled decoding 12-15% of its tokens per second (``benchmarks/decode.py``,
    batch 1, 2-core Xeon with AMX: fp32 37.0 -> 32.7, bf16 47.1 -> 40.2). Eagerly the formula also keeps
    ``torch.func.vmap`` and ``jvp``, which the operator does not define.
    """
    if torch.compiler.is_compiling() and scores.shape[-2] > 1:
        weights: Tensor = _MaskedSoftmax.apply(scores, mask)
        return weights
    biased = scores + masks.additive_bias(mask, scores.dtype)
    return torch.softmax(at_least_float32(biased), dim=-1).to(scores.dtype)


@torch.library.custom_op("zmaj::masked_softmax", mutates_args=())
def _softmax_kernels(scores: Tensor, mask: Tensor) -> Tensor:
    """The formula's forward pass on ATen's kernels, in the scores' dtype: a low-precision softmax accumulates in
    float32 and rounds once, so it equals the float32 softmax rounded, as the formula's ``.float() ... .to()``,
    but for a rare one-ulp difference where the float32 value sits on a rounding tie."""
    return torch.softmax(scores + masks.additive_bias(mask, scores.dtype), dim=-1)


@_softmax_kernels.register_fake
def _(scores: Tensor, mask: Tensor) -> Tensor:
    # Contiguous: ATen's softmax returns a contiguous tensor whatever the scores' strides.
    return scores.new_empty(scores.shape)


class _MaskedSoftmax(torch.autograd.Function):
    """The operator with its derivative. An ``autograd.Function`` rather than the operator's own
    ``register_autograd``, whose derivative ``torch.func``'s transforms refuse ("must override the
    setup_context staticmethod"): the training step differentiates with ``torch.func``."""

    @staticmethod
    def forward(scores: Tensor, mask: Tensor) -> Tensor:
        weights: Tensor = _softmax_kernels(scores, mask)
        return weights

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        """d scores = w * (grad - sum(w * grad)): zero wherever the mask hid a key, because w is zero there."""
        (weights,) = ctx.saved_tensors
        w, g = at_least_float32(weights), at_least_float32(grad)
        return (w * (g - (w * g).sum(-1, keepdim=True))).to(grad.dtype), None
