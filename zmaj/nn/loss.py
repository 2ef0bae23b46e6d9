"""Next-token cross-entropy straight from the hidden states, without ever holding the whole ``[tokens, vocab]``
logits: the unembedding and the loss a chunk of positions at a time.

The logits are a small model's largest activation by far: GPT-2 small at batch 16 x 1024 holds 16k x 50k of
them, 3.3 GB in float32, and the plain loss keeps that twice (the logits, and the softmax its backward needs)
while the whole rest of the model keeps less. The gradient of the summed cross-entropy with respect to the
logits is known in closed form, ``softmax(z) - onehot(target)``, so each chunk's logits can be turned into the
chunk's gradients on the spot (for the hidden states, ``dz W``, and for the unembedding, ``dz^T h``) and dropped.
This is Liger-Kernel's "fused linear cross-entropy" (Hsu et al., 2024, arXiv:2410.10989, section 3.3) written in
plain PyTorch: the same three matmuls as the plain loss, the gradient computed in the forward pass and kept
(one ``[tokens, d_model]`` and one ``[vocab, d_model]`` tensor, the sizes of the inputs) until the backward
pass scales it by the incoming gradient. "Cut Your Losses" (Wijmans et al., 2024, arXiv:2411.09009) goes
further with a kernel that never writes even a chunk of logits to memory.

Because the gradient is computed in the forward pass, this is a training loss: it returns the *weighted sum*
of the token losses (weights known up front: the loss mask) so that the incoming gradient is a scalar. Where no
gradient is taken (an evaluation), it computes the loss alone.
"""

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from zmaj.nn.layers import at_least_float32


def softcap(logits: Float[Tensor, "*shape"], cap: float | None) -> Float[Tensor, "*shape"]:
    """``cap * tanh(logits / cap)``, logits squashed smoothly into ``(-cap, cap)`` (Gemma 2); None: unchanged."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def chunked_cross_entropy(
    hidden: Float[Tensor, "batch seq d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, "batch seq"],
    token_weights: Float[Tensor, "batch seq"] | None = None,
    chunk: int = 1024,
    cap: float | None = None,
) -> Float[Tensor, ""]:
    """``sum(token_weights * cross_entropy(softcap(hidden @ weight.T, cap), targets))``, the logits computed
    ``chunk`` positions at a time and never all at once; the softmax in float32 at least, as
    ``zmaj.train.step.token_losses``.

    Under autocast the two inputs are cast to its dtype first, as the plain unembedding's matmul would cast
    them, so the matmuls run in it and the gradients come back through the casts in the inputs' dtypes. Where
    no gradient is taken (an evaluation under ``torch.no_grad``), the loss alone: the gradients' two matmuls per
    chunk made an evaluation step 1.6x slower (the default spec's model, Zen 4).
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    flat_weights = None if token_weights is None else token_weights.flatten().float()
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    if not torch.is_grad_enabled():
        with torch.autocast(device_type, enabled=False):
            loss = torch.zeros(
                (), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device
            )
            for start in range(0, flat_hidden.shape[0], chunk):
                picked = _chunk(flat_hidden, weight, flat_targets, start, chunk, cap)[0]
                loss = loss - _weighted_sum(picked, flat_weights, start, chunk)
            return loss
    # A frozen unembedding (LoRA's) gets no gradient: its matmul per chunk, a third of the loss's, is skipped.
    wants_weight = weight.requires_grad
    total: Tensor = _ChunkedCrossEntropy.apply(
        flat_hidden, weight, flat_targets, flat_weights, chunk, cap, wants_weight
    )[0]
    return total


def chunked_token_logprobs(
    hidden: Float[Tensor, "batch seq d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, "batch seq"],
    temperature: float = 1.0,
    chunk: int = 1024,
    cap: float | None = None,
) -> Float[Tensor, "batch seq"]:
    """``log_softmax(softcap(hidden @ weight.T, cap) / temperature)`` at each target, the logits computed
    ``chunk`` positions at a time and never all at once: the per-token log-probabilities DPO and GRPO are made
    of (``zmaj.train.logprobs``), in float32 at least.

    Unlike the training loss, what these feed is not a weighted sum known up front (DPO's loss is a sigmoid of
    sums of them, GRPO's clips each ratio), so the gradient cannot be made in the forward pass: the backward
    pass computes each chunk's logits again, ``dz = g (onehot - softmax) / temperature``, and turns them into
    the gradients of the hidden states and the unembedding on the spot. One more unembedding matmul, and no
    ``[tokens, vocab]`` tensor kept: the plain log-softmax held two or more (33.6 GB each for an 8B model's
    128k vocabulary at 32 x 2048 tokens). Autocast is handled as :func:`chunked_cross_entropy` does.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    flat_hidden, flat_targets = hidden.flatten(0, -2), targets.flatten()
    if torch.is_grad_enabled():
        picked: Tensor = _ChunkedLogprobs.apply(flat_hidden, weight, flat_targets, temperature, chunk, cap)
    else:  # the forward pass alone, nothing saved for a backward pass
        picked = _ChunkedLogprobs.forward(flat_hidden, weight, flat_targets, temperature, chunk, cap)
    return picked.view(targets.shape)


def _chunk(
    hidden: Float[Tensor, "tokens d_model"],
    weight: Float[Tensor, "vocab d_model"],
    targets: Int[Tensor, " tokens"],
    start: int,
    chunk: int,
    cap: float | None,
    temperature: float = 1.0,
) -> tuple[Float[Tensor, " chunk"], Float[Tensor, "chunk vocab"], Float[Tensor, "chunk vocab"] | None]:
    """The chunk of positions from ``start``: its targets' log-probabilities, the log-probabilities, and
    (soft-capped) ``tanh(z / cap)``, which the gradient needs; the logits divided by ``temperature`` last."""
    h, y = hidden[start : start + chunk], targets[start : start + chunk, None]
    # Every [chunk, vocab] pass below is written into a tensor the chunk already holds: on a CPU, each fresh
    # one costs its page faults, and the loss's elementwise work is most of its time.
    logits = at_least_float32(h @ weight.T)
    squashed = None
    if cap is not None:
        # The soft-cap, keeping tanh(z / cap) for the gradient; tanh(u) as 2 sigmoid(2u) - 1, which PyTorch's
        # CPU kernels compute ~7x faster (0.34 vs 2.5 ms for 2M floats, Zen 4).
        squashed = logits.mul_(2 / cap).sigmoid_().mul_(2).sub_(1)  # the product is ours
        logits = squashed * cap
    if temperature != 1:
        logits = logits.div_(temperature)
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(-1, y).squeeze(-1), log_p, squashed


class _WeightGradSum:
    """The unembedding's gradient, ``grad_z^T h`` summed over the chunks in float32 at least, without a fresh
    ``[vocab, d_model]`` tensor per chunk (113 MB at SmolLM2's 49k vocabulary, each a round of page faults on
    a CPU): in float32 the matmul adds into the sum itself (``addmm``); a bf16 chunk's product and its float32
    copy are written into two buffers made once (``addmm`` cannot mix the dtypes). Measured in
    benchmarks/README.md (session 40)."""

    def __init__(self, weight: Float[Tensor, "vocab d_model"], dtype: torch.dtype) -> None:
        self.total = torch.zeros(
            weight.shape, dtype=torch.promote_types(dtype, torch.float32), device=weight.device
        )
        self.buffers = (
            None
            if dtype == self.total.dtype
            else (torch.empty(weight.shape, dtype=dtype, device=weight.device), torch.empty_like(self.total))
        )

    def add(self, grad_z: Float[Tensor, "chunk vocab"], h: Float[Tensor, "chunk d_model"]) -> None:
        if torch.is_grad_enabled():  # a backward being differentiated (create_graph): out= has no derivative
            self.total.add_(grad_z.T @ h)
        elif self.buffers is None:
            torch.addmm(self.total, grad_z.T, h, out=self.total)
        else:
            product, widened = self.buffers
            self.total.add_(widened.copy_(torch.mm(grad_z.T, h, out=product)))


def _logits_grad(
    log_p: Float[Tensor, "chunk vocab"],
    y: Int[Tensor, "chunk 1"],
    scale: Float[Tensor, "chunk 1"] | None,
    squashed: Float[Tensor, "chunk vocab"] | None,
    dtype: torch.dtype,
) -> Float[Tensor, "chunk vocab"]:
    """``scale (softmax - onehot)``, the gradient of ``-scale log p_y`` with respect to the logits, times
    ``1 - tanh^2`` through the cap; written into ``log_p`` (and ``squashed``), then cast to ``dtype``."""
    grad_z = log_p.exp_().scatter_add_(-1, y, torch.full_like(y, -1.0, dtype=log_p.dtype))
    if scale is not None:
        grad_z.mul_(scale)
    if squashed is not None:
        grad_z.mul_(squashed.square_().neg_().add_(1))  # (addcmul_ breaks dynamo's graph)
    return grad_z.to(dtype)


def _weighted_sum(
    picked: Float[Tensor, " chunk"], token_weights: Float[Tensor, " tokens"] | None, start: int, chunk: int
) -> Float[Tensor, ""]:
    return (picked if token_weights is None else token_weights[start : start + chunk] * picked).sum()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss and, already, its gradients; backward only scales those by the incoming (scalar) gradient.

    Forward and ``setup_context`` are separate, which is what lets ``torch.func``'s transforms and
    ``torch.compile`` (which traces it inside the compiled ``grad_and_value``) take the function.
    """

    @staticmethod
    def forward(
        hidden: Float[Tensor, "tokens d_model"],
        weight: Float[Tensor, "vocab d_model"],
        targets: Int[Tensor, " tokens"],
        token_weights: Float[Tensor, " tokens"] | None,
        chunk: int,
        cap: float | None,
        wants_weight: bool,
    ) -> tuple[
        Float[Tensor, ""],
        Float[Tensor, "tokens d_model"],
        Float[Tensor, "vocab d_model"] | Float[Tensor, "0"],
    ]:
        with torch.autocast(
            hidden.device.type, enabled=False
        ):  # the caller cast; everything here is explicit
            wide = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64's own
            loss = torch.zeros((), dtype=wide, device=hidden.device)
            grad_hidden = []
            weight_grad = _WeightGradSum(weight, hidden.dtype) if wants_weight else None
            for start in range(0, hidden.shape[0], chunk):
                h, y = hidden[start : start + chunk], targets[start : start + chunk, None]
                w = None if token_weights is None else token_weights[start : start + chunk, None]
                picked, log_p, squashed = _chunk(hidden, weight, targets, start, chunk, cap)
                loss = loss - _weighted_sum(picked, token_weights, start, chunk)
                grad_z = _logits_grad(log_p, y, w, squashed, hidden.dtype)  # d loss / d logits
                grad_hidden.append(grad_z @ weight)
                if weight_grad is not None:
                    weight_grad.add(grad_z, h)
        # Empty for a frozen weight.
        grad_weight = (
            torch.zeros(0, dtype=wide, device=weight.device) if weight_grad is None else weight_grad.total
        )
        return loss, torch.cat(grad_hidden), grad_weight.to(weight.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        _, grad_hidden, grad_weight = output
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(grad_hidden, grad_weight)

    @staticmethod
    def backward(
        ctx: Any, grad_loss: Tensor, *unused: Tensor | None
    ) -> tuple[Tensor, Tensor | None, None, None, None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        weight_grad = grad_loss * grad_weight if ctx.needs_input_grad[1] else None
        return grad_loss * grad_hidden, weight_grad, None, None, None, None, None


class _ChunkedLogprobs(torch.autograd.Function):
    """The targets' log-probabilities, chunk by chunk; backward computes each chunk's logits again and makes
    its gradients from them (:func:`chunked_token_logprobs`). Forward and ``setup_context`` are separate, as in
    :class:`_ChunkedCrossEntropy`, for ``torch.func``'s transforms."""

    @staticmethod
    def forward(
        hidden: Float[Tensor, "tokens d_model"],
        weight: Float[Tensor, "vocab d_model"],
        targets: Int[Tensor, " tokens"],
        temperature: float,
        chunk: int,
        cap: float | None,
    ) -> Float[Tensor, " tokens"]:
        # The caller cast; everything here is explicit.
        with torch.autocast(hidden.device.type, enabled=False):
            starts = range(0, hidden.shape[0], chunk)
            return torch.cat([_chunk(hidden, weight, targets, i, chunk, cap, temperature)[0] for i in starts])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        hidden, weight, targets, temperature, chunk, cap = inputs
        ctx.save_for_backward(hidden, weight, targets)
        ctx.temperature, ctx.chunk, ctx.cap = temperature, chunk, cap

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        hidden, weight, targets = ctx.saved_tensors
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        grad_hidden = []
        weight_grad = _WeightGradSum(weight, hidden.dtype) if wants_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk):
                h, y = hidden[start : start + ctx.chunk], targets[start : start + ctx.chunk, None]
                _, log_p, squashed = _chunk(
                    hidden, weight, targets, start, ctx.chunk, ctx.cap, ctx.temperature
                )
                # d log p_y / d logits = (onehot - softmax) / temperature: the loss's with scale -g / temperature.
                scale = grad_out[start : start + ctx.chunk, None].to(log_p.dtype) / -ctx.temperature
                grad_z = _logits_grad(log_p, y, scale, squashed, hidden.dtype)
                if wants_hidden:
                    grad_hidden.append(grad_z @ weight)
                if weight_grad is not None:
                    weight_grad.add(grad_z, h)
        return (
            torch.cat(grad_hidden) if wants_hidden else None,
            None if weight_grad is None else weight_grad.total.to(weight.dtype),
            None,
            None,
            None,
            None,
        )
