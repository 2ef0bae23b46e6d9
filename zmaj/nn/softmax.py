"""The softmax of attention scores over the keys a mask allows, as one PyTorch operator.

``masked_softmax(scores, mask)`` is ``softmax(scores + bias)`` with the textbook additive bias (0 where ``mask``
allows, -inf elsewhere). It is registered as a custom operator (``torch.library.custom_op``) so that
``torch.compile`` calls PyTorch's own softmax kernel instead of generating one, and so that its backward pass
never looks at the mask. Both matter on CPUs, measured on a 2-core Xeon (bf16 scores ``[8, 6, 256, 256]``, the
training-step benchmark's shape):

- Inductor's CPU softmax writes ``exp(scores - max)`` out in float32 and reads it back twice: 4.0-4.3 ms per
  layer inside the compiled step, where ATen's kernel, which keeps each row in cache, takes 1.1 ms;
- differentiating ``scores + bias`` (or ``masked_fill``) adds the mask's backward, a pass that recomputes the
  mask only to zero gradients that the softmax's backward already makes zero (the weights are zero there).

This is the CPU counterpart of the fused "scaled masked softmax" kernels Megatron-LM writes for GPUs
(``megatron/core/fusions/fused_softmax.py``). On GPUs, ``attention: sdpa`` is the fast path anyway.
"""

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def masked_softmax(
    scores: Float[Tensor, "*batch q_seq k_seq"], mask: Bool[Tensor, "*#batch q_seq k_seq"]
) -> Float[Tensor, "*batch q_seq k_seq"]:
    """``softmax(scores + additive_bias(mask))`` over the keys; ``mask`` broadcasts to ``scores``.

    The weights keep the scores' dtype; PyTorch's kernels accumulate low-precision rows in float32. A row whose
    keys are all masked gives NaN, as the textbook formula does. Without gradients (generation) the same
    formula runs inline instead, where ``torch.compile`` fuses it with its neighbours: a decode step's rows are
    one query long, and an opaque operator per layer cost SmolLM2-135M's compiled decoding 12-15% of its tokens
    per second (``benchmarks/decode.py``, batch 1: fp32 37.0 -> 32.7, bf16 47.1 -> 40.2).
    """
    if not torch.is_grad_enabled():
        return _formula(scores, mask)
    weights: Tensor = _MaskedSoftmax.apply(scores, mask)
    return weights


def _formula(scores: Tensor, mask: Tensor) -> Tensor:
    minus_inf = torch.full((), float("-inf"), dtype=scores.dtype, device=scores.device)
    return torch.softmax(torch.where(mask, scores, minus_inf), dim=-1)


@torch.library.custom_op("zmaj::masked_softmax", mutates_args=())
def _softmax_kernel(scores: Tensor, mask: Tensor) -> Tensor:
    """The forward pass as one opaque operator, which ``torch.compile`` calls rather than traces."""
    return _formula(scores, mask)


@_softmax_kernel.register_fake
def _(scores: Tensor, mask: Tensor) -> Tensor:
    return torch.empty_like(scores)


class _MaskedSoftmax(torch.autograd.Function):
    """The operator with its derivative. An ``autograd.Function`` rather than the operator's own
    ``register_autograd``, because only the former composes with ``torch.func.grad`` (it has ``setup_context``)."""

    @staticmethod
    def forward(scores: Tensor, mask: Tensor) -> Tensor:
        weights: Tensor = _softmax_kernel(scores, mask)
        return weights

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        """d scores = w * (grad - sum(w * grad)): zero wherever the mask hid a key, because w is zero there."""
        (weights,) = ctx.saved_tensors
        grad_scores: Tensor = torch._softmax_backward_data(grad, weights, -1, weights.dtype)
        return grad_scores, None
