"""The chunked unembedding + cross-entropy and log-probabilities: the plain formulas' values and gradients, however
they are chunked."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from tests import strategies
from zmaj.nn import loss
from zmaj.nn.loss import chunked_cross_entropy, chunked_token_logprobs, softcap


def plain(hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, cap: float | None) -> Tensor:
    """The textbook path: every logit at once, float32 cross-entropy, weighted sum."""
    logits = softcap(hidden @ weight.T, cap).float()
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return (losses * weights.flatten()).sum()


def inputs(seed: int, rows: int, seq: int, vocab: int, device: torch.device) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, 16, generator=generator).to(device)
    weight = torch.randn(vocab, 16, generator=generator).to(device)
    targets = torch.randint(0, vocab, (rows, seq), generator=generator).to(device)
    weights = (torch.rand(rows, seq, generator=generator) > 0.3).float().to(device)  # a loss mask
    return hidden, weight, targets, weights


LAYOUTS = {
    "seed": strategies.seeds,
    "rows": st.integers(1, 3),
    "seq": st.integers(1, 9),
    "vocab": st.integers(2, 40),
    "chunk": st.integers(1, 30),
    "cap": st.sampled_from([None, 2.0, 30.0]),
}
"""Chunks of any size against batches of any shape (a last chunk cut short), soft-capped or not."""


@given(**LAYOUTS)
def test_value_and_gradients_equal_the_plain_formula(
    device: torch.device, seed: int, rows: int, seq: int, vocab: int, chunk: int, cap: float | None
) -> None:
    """Chunks of any size, a last chunk cut short, positions masked out, logits soft-capped or not."""
    hidden, weight, targets, weights = inputs(seed, rows, seq, vocab, device)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    expected = plain(hidden, weight, targets, weights, cap)
    expected_grads = torch.autograd.grad(expected, leaves)
    got = chunked_cross_entropy(hidden, weight, targets, weights, chunk, cap)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):  # summed over chunks in another order: 1e-5
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_no_weights_means_every_position_and_the_incoming_gradient_scales(device: torch.device) -> None:
    """``token_weights=None`` weighs every position 1; the backward multiplies by what flows into the sum."""
    hidden, weight, targets, _ = inputs(0, 2, 5, 11, device)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    expected = 0.25 * plain(hidden, weight, targets, torch.ones_like(targets, dtype=torch.float32), None)
    got = 0.25 * chunked_cross_entropy(hidden, weight, targets, chunk=3)
    torch.testing.assert_close(got, expected)
    for g, e in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(expected, leaves), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_torch_func_grad_equals_autograd(device: torch.device) -> None:
    """What the training step differentiates with: ``torch.func.grad`` through the custom function."""
    hidden, weight, targets, weights = inputs(1, 2, 7, 13, device)

    def loss(hidden: Tensor, weight: Tensor) -> Tensor:
        return chunked_cross_entropy(hidden, weight, targets, weights, 4, 5.0)

    func_grads = torch.func.grad(loss, argnums=(0, 1))(hidden, weight)
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    expected = torch.autograd.grad(plain(leaves[0], leaves[1], targets, weights, 5.0), leaves)
    for g, e in zip(func_grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_a_frozen_unembedding_gets_no_gradient_and_costs_no_matmul_for_one(device: torch.device) -> None:
    """LoRA's unembedding is frozen (closed over, not differentiated): the hidden states' gradient is the plain
    path's, and the weight's gradient matmul is skipped, a third of the loss's matmuls (counted in FLOPs)."""
    hidden, weight, targets, weights = inputs(1, 2, 7, 13, device)

    def loss(hidden: Tensor, weight: Tensor) -> Tensor:
        return chunked_cross_entropy(hidden, weight, targets, weights, 4)

    with FlopCounterMode(display=False) as frozen:
        got = torch.func.grad(lambda h: loss(h, weight))(hidden)
    with FlopCounterMode(display=False) as trained:
        torch.func.grad(loss, argnums=(0, 1))(hidden, weight)
    leaf = hidden.clone().requires_grad_()
    (expected,) = torch.autograd.grad(plain(leaf, weight, targets, weights, None), leaf)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert 3 * frozen.get_total_flops() == 2 * trained.get_total_flops()


def test_under_bf16_autocast_it_rounds_as_the_plain_path(device: torch.device) -> None:
    """The matmuls run in bfloat16 as autocast would run the unembedding; the gradients come back in the
    inputs' float32. Both paths round differently, so: within bfloat16's resolution of the plain path's, and
    the loss nearer it than the float32 loss is (that margin alone let a loss ignoring autocast pass)."""
    hidden, weight, targets, weights = inputs(2, 2, 16, 64, device)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        expected = plain(hidden, weight, targets, weights, None)
        got = chunked_cross_entropy(hidden, weight, targets, weights, 8)
    in_float32 = plain(hidden, weight, targets, weights, None).detach()
    expected_grads = torch.autograd.grad(expected, leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, expected, rtol=2**-8, atol=0.0)
    assert float((got - expected).detach().abs()) < 0.25 * float((in_float32 - expected).detach().abs())
    for g, e in zip(got_grads, expected_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.0, atol=2**-7 * float(e.abs().max()))


def test_without_gradients_only_the_loss_is_computed(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An evaluation (``torch.no_grad``) gets the training path's loss, bit for bit, without its gradients: the
    two gradient matmuls per chunk made an evaluation step 1.6x slower."""
    hidden, weight, targets, weights = inputs(0, 3, 7, 40, device)
    for cap in (None, 15.0):
        trained = chunked_cross_entropy(hidden, weight, targets, weights, 4, cap)
        with torch.no_grad(), monkeypatch.context() as patch:
            patch.setattr(loss._ChunkedCrossEntropy, "apply", None)  # the gradients' path, not taken
            evaluated = chunked_cross_entropy(hidden, weight, targets, weights, 4, cap)
        assert torch.equal(evaluated, trained)


def plain_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, cap: float | None
) -> Tensor:
    """The textbook path: every logit at once, scaled, float32 log-softmax, read at the targets."""
    logits = softcap(hidden @ weight.T, cap).float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)


@given(**LAYOUTS, temperature=st.sampled_from([1.0, 0.7, 1.3]))
def test_log_probs_and_their_gradients_equal_the_plain_formula(
    device: torch.device,
    seed: int,
    rows: int,
    seq: int,
    vocab: int,
    chunk: int,
    cap: float | None,
    temperature: float,
) -> None:
    """Chunks of any size, a last chunk cut short, logits soft-capped or not, at any sampling temperature; the
    gradient of any function of them (a weighted sum with random weights, as DPO's and GRPO's losses weigh
    each token by what only the backward pass knows)."""
    hidden, weight, targets, _ = inputs(seed, rows, seq, vocab, device)
    upstream = torch.randn(rows, seq, generator=torch.Generator().manual_seed(seed)).to(device)
    leaves = [hidden.requires_grad_(), weight.requires_grad_()]
    expected = plain_logprobs(hidden, weight, targets, temperature, cap)
    got = chunked_token_logprobs(hidden, weight, targets, temperature, chunk, cap)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves)
    got_grads = torch.autograd.grad((got * upstream).sum(), leaves)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_log_probs_under_torch_func_and_bf16_autocast(device: torch.device) -> None:
    """``torch.func.vjp`` (what the fine-tuning steps differentiate with) through the custom function, a frozen
    unembedding (LoRA's) left without a gradient; under bf16 autocast the matmuls round as the plain path's,
    the gradients in the inputs' float32."""
    hidden, weight, targets, _ = inputs(3, 2, 7, 13, device)
    upstream = torch.linspace(-1, 1, 14, device=device).view(2, 7)

    def summed(hidden: Tensor) -> Tensor:
        return (chunked_token_logprobs(hidden, weight, targets, 0.8, 3, 5.0) * upstream).sum()

    _, vjp, *_ = torch.func.vjp(summed, hidden)
    leaf = hidden.clone().requires_grad_()
    (expected,) = torch.autograd.grad(
        (plain_logprobs(leaf, weight, targets, 0.8, 5.0) * upstream).sum(), leaf
    )
    torch.testing.assert_close(vjp(torch.ones(()))[0], expected, rtol=1e-5, atol=1e-6)

    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        expected_bf16 = plain_logprobs(leaves[0], leaves[1], targets, 1.0, None)
        got = chunked_token_logprobs(leaves[0], leaves[1], targets, chunk=4)
    torch.testing.assert_close(
        got, expected_bf16, rtol=0.0, atol=2**-8 * float(expected_bf16.detach().abs().max())
    )
    assert float((got - expected_bf16).detach().abs().max()) < float(
        (plain_logprobs(hidden, weight, targets, 1.0, None) - expected_bf16).detach().abs().max()
    )
    for g, e in zip(
        torch.autograd.grad((got * upstream).sum(), leaves),
        torch.autograd.grad((expected_bf16 * upstream).sum(), leaves),
        strict=True,
    ):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=0.0, atol=2**-7 * float(e.abs().max()))


@pytest.mark.parametrize("bf16", [False, True])
def test_log_probs_under_torch_func_grad_of_the_weight(device: torch.device, bf16: bool) -> None:
    """``torch.func.grad`` runs the backward pass with gradients on (``create_graph``, so that transforms
    compose): the weight's gradient is then summed with differentiable operations (``out=`` matmuls have no
    derivative and raised), to the plain formula's gradient."""
    hidden, weight, targets, _ = inputs(2, 2, 7, 13, device)
    upstream = torch.linspace(-1, 1, 14, device=device).view(2, 7)

    def summed(weight: Tensor, chunked: bool) -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if chunked:
                return (chunked_token_logprobs(hidden, weight, targets, 0.8, 3, 5.0) * upstream).sum()
            return (plain_logprobs(hidden, weight, targets, 0.8, 5.0) * upstream).sum()

    got, expected = torch.func.grad(summed)(weight, True), torch.func.grad(summed)(weight, False)
    tolerance = 2**-7 * float(expected.abs().max()) if bf16 else 1e-6
    torch.testing.assert_close(got, expected, rtol=0.0 if bf16 else 1e-5, atol=tolerance)


def test_log_probs_without_gradients_are_the_training_paths(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scoring under ``torch.no_grad`` (the reference's, a rollout's old log-probs) gives the training path's
    values, bit for bit, and saves nothing for a backward pass."""
    hidden, weight, targets, _ = inputs(0, 3, 7, 40, device)
    trained = chunked_token_logprobs(hidden, weight, targets, 0.9, 4, 15.0)
    with torch.no_grad(), monkeypatch.context() as patch:
        patch.setattr(loss._ChunkedLogprobs, "apply", None)
        scored = chunked_token_logprobs(hidden, weight, targets, 0.9, 4, 15.0)
    assert torch.equal(scored, trained)


def test_log_probs_unembed_at_most_chunk_positions_at_a_time(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forward and the backward pass each make every chunk's logits once, ``chunk`` positions at most."""
    hidden, weight, targets, _ = inputs(0, 2, 7, 11, device)
    made: list[tuple[int, int]] = []
    real = loss._chunk

    def counted(hidden: Tensor, weight: Tensor, targets: Tensor, start: int, chunk: int, *rest: Any) -> Any:
        made.append((start, len(hidden[start : start + chunk])))
        return real(hidden, weight, targets, start, chunk, *rest)

    monkeypatch.setattr(loss, "_chunk", counted)
    got = chunked_token_logprobs(hidden.requires_grad_(), weight, targets, chunk=4)
    torch.autograd.grad(got.sum(), hidden)
    assert made == [(0, 4), (4, 4), (8, 4), (12, 2)] * 2


class _WeightShaped(TorchDispatchMode):
    """Counts the fresh tensors of one shape that operators make (in-place and ``out=`` results write into
    their operands): here, the unembedding's ``[vocab, d_model]``."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.made = shape, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        operands = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        if isinstance(out, Tensor) and out.shape == self.shape:
            self.made += out.untyped_storage().data_ptr() not in operands
        return out


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("which", ["cross_entropy", "logprobs"])
def test_weight_gradients_are_summed_without_a_product_per_chunk(
    device: torch.device, which: str, bf16: bool
) -> None:
    """Each chunk adds its ``grad_z^T h`` to the sum inside the matmul (``addmm``) in float32, or through two
    buffers made once under bf16: the ``[vocab, d_model]`` tensors made are as many for eight chunks as for one
    (a fresh product per chunk is 113 MB at SmolLM2's vocabulary, page faults and all)."""
    hidden, weight, targets, _ = inputs(0, 3, 8, 11, device)  # 24 positions, no dimension shared by shapes

    def made(chunk: int) -> int:
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with _WeightShaped(weight.shape) as mode, torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            if which == "cross_entropy":
                value = chunked_cross_entropy(h, w, targets, chunk=chunk)
            else:
                value = chunked_token_logprobs(h, w, targets, chunk=chunk).sum()
            torch.autograd.grad(value, [h, w])
        return mode.made

    assert made(3) == made(24) > 0


@pytest.mark.parametrize("which", ["cross_entropy", "logprobs"])
def test_under_bf16_the_weight_gradient_is_summed_in_float32(device: torch.device, which: str) -> None:
    """One position repeated 40 times, a chunk each: the unembedding's gradient is exactly 40 times one
    position's, rounded once to bfloat16 (each chunk's bf16 product summed in float32 is exact: 8 + 6
    significant bits); a sum kept in bfloat16 rounds at every chunk (and stalls once the total is 256 terms)."""
    hidden, weight, targets, _ = inputs(0, 1, 1, 11, device)

    def grad(n: int) -> Tensor:
        h = hidden.expand(1, n, -1).clone().requires_grad_()
        w = weight.clone().requires_grad_()
        t = targets.expand(1, n).clone()
        with torch.autocast(device.type, torch.bfloat16):
            if which == "cross_entropy":
                value = chunked_cross_entropy(h, w, t, chunk=1)
            else:
                value = chunked_token_logprobs(h, w, t, chunk=1).sum()
        return torch.autograd.grad(value, w)[0]

    # The sum comes back in the (autocast) weight's bfloat16, rounded once.
    assert torch.equal(grad(40), (40 * grad(1)).bfloat16().float())
