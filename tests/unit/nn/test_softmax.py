"""``masked_softmax`` is the textbook ``softmax(scores + bias)``, forward and backward, eager and compiled: both its
formula and the operator it runs as under ``torch.compile`` (called directly here, eagerly)."""

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

from tests import strategies
from zmaj.nn import masks
from zmaj.nn.softmax import _MaskedSoftmax, _softmax_kernels, masked_softmax


def textbook(scores: Tensor, mask: Tensor) -> Tensor:
    """softmax(scores + additive bias), differentiated by autograd through every step; ``mask`` is
    ``[batch, 1, q, k]``, shared by the heads."""
    return torch.softmax(scores + masks.additive_bias(mask[:, 0], scores.dtype)[:, None], dim=-1)


@st.composite
def scores_and_masks(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    """Scores ``[batch, heads, q, k]`` and a ``[batch, 1, q, k]`` mask that allows at least one key per row."""
    batch, heads, q_len, k_len = (draw(st.integers(1, n)) for n in (3, 3, 9, 9))
    generator = torch.Generator().manual_seed(draw(strategies.seeds))
    scores = 4 * torch.randn(batch, heads, q_len, k_len, generator=generator)
    mask = torch.rand(batch, 1, q_len, k_len, generator=generator) < draw(st.floats(0.1, 1.0))
    mask[..., draw(st.integers(0, k_len - 1))] = True
    return scores, mask


def operator(scores: Tensor, mask: Tensor) -> Tensor:
    """The compiled path's operator, with its own backward."""
    weights: Tensor = _MaskedSoftmax.apply(scores, mask)
    return weights


IMPLEMENTATIONS = {"formula": masked_softmax, "operator": operator}


@given(scores_and_masks(), st.sampled_from(sorted(IMPLEMENTATIONS)))
def test_weights_are_the_textbook_softmax(
    device: torch.device, problem: tuple[Tensor, Tensor], name: str
) -> None:
    scores, mask = (t.to(device) for t in problem)
    torch.testing.assert_close(IMPLEMENTATIONS[name](scores, mask), textbook(scores, mask))


@given(scores_and_masks(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_operators_gradient_is_the_textbook_gradient_and_zero_where_masked(
    device: torch.device, problem: tuple[Tensor, Tensor], dtype: torch.dtype
) -> None:
    """In bf16 against the float32 textbook: the operator's backward starts from bf16 weights and rounds the
    gradient once more (``masked_softmax``'s docstring), an error of a few units of bf16's last place."""
    scores, mask = (t.to(device) for t in problem)
    grad_out = torch.randn(scores.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def gradient(fn: Callable[[Tensor, Tensor], Tensor], dtype: torch.dtype) -> Tensor:
        leaf = scores.to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf, mask), leaf, grad_out.to(dtype))
        return grad

    ours = gradient(operator, dtype)
    atol, rtol = (1e-6, 1e-5) if dtype == torch.float32 else (2e-2, 2**-6)
    torch.testing.assert_close(ours.float(), gradient(textbook, torch.float32), atol=atol, rtol=rtol)
    assert (ours.masked_select(~mask.expand_as(ours)) == 0).all()


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_a_row_with_every_key_masked_is_nan_as_in_the_formula(device: torch.device, name: str) -> None:
    scores = torch.randn(1, 1, 2, 3, device=device)
    mask = torch.tensor([[[[True, False, True], [False, False, False]]]], device=device)
    weights = IMPLEMENTATIONS[name](scores, mask)
    assert weights[0, 0, 1].isnan().all()
    torch.testing.assert_close(weights[0, 0, 0], textbook(scores, mask)[0, 0, 0])


COMPILED_GRAD = """
import torch
from zmaj.nn.softmax import _MaskedSoftmax, _softmax_kernels, masked_softmax

generator = torch.Generator().manual_seed(0)
scores = torch.randn(2, 3, 7, 7, generator=generator)
row_weights = torch.randn(2, 3, 7, 7, generator=generator)
mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
leaf = scores.clone().requires_grad_()
textbook = torch.softmax(leaf.masked_fill(~mask, float("-inf")), dim=-1)
(expected,) = torch.autograd.grad((textbook * row_weights).sum(), leaf)


def loss(s):
    return (masked_softmax(s, mask) * row_weights).sum()


torch.testing.assert_close(torch.func.grad(loss)(scores), expected, atol=1e-6, rtol=1e-5)
compiled = torch.compile(torch.func.grad(loss), fullgraph=True)  # one graph, or an error
torch.testing.assert_close(compiled(scores), expected, atol=1e-6, rtol=1e-5)
with torch.no_grad():  # a compiled prefill takes the operator too
    weights = torch.compile(masked_softmax, fullgraph=True)(scores, mask)
torch.testing.assert_close(weights, torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1))
"""


@pytest.mark.slow
def test_torch_func_grad_and_compile_give_the_textbook_gradient() -> None:
    """The training step differentiates it with ``torch.func.grad`` inside ``torch.compile``: one graph, the
    textbook gradient. In a fresh interpreter: dynamo cannot trace pytest's runtime shape checker in one graph."""
    done = subprocess.run([sys.executable, "-c", COMPILED_GRAD], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_bfloat16_weights_are_the_float32_weights_rounded(device: torch.device, name: str) -> None:
    """Low-precision scores give weights of their dtype, normalised in float32 and rounded once: bit for bit."""
    generator = torch.Generator().manual_seed(0)
    scores = (4 * torch.randn(2, 4, 16, 16, generator=generator)).to(device, torch.bfloat16)
    mask = torch.ones(16, 16, dtype=torch.bool, device=device).tril()[None, None]
    weights = IMPLEMENTATIONS[name](scores, mask)
    assert weights.dtype == torch.bfloat16
    assert torch.equal(weights, textbook(scores.float(), mask.expand(2, 1, 16, 16)).bfloat16())


def test_the_operators_bfloat16_gradient_is_computed_in_float32_and_rounded_once() -> None:
    """The backward upcasts the bf16 weights and gradient, computes w * (g - sum(w * g)) in float32 and rounds
    once (the module docstring); in bf16 throughout, a quarter of the elements of such a gradient come out
    otherwise."""
    generator = torch.Generator().manual_seed(0)
    scores = (4 * torch.randn(2, 4, 64, 64, generator=generator)).bfloat16().requires_grad_()
    mask = torch.ones(64, 64, dtype=torch.bool).tril()[None, None]
    grad_out = torch.randn(scores.shape, generator=generator).bfloat16()
    weights = operator(scores, mask)
    (grad,) = torch.autograd.grad(weights, scores, grad_out)
    w, g = weights.float(), grad_out.float()
    assert torch.equal(grad, (w * (g - (w * g).sum(-1, keepdim=True))).bfloat16())


def test_the_operator_passes_torch_library_opcheck() -> None:
    """Its fake (shape) function, schema and dispatch agree with what it computes: on contiguous scores, and on
    transposed ones, for which ATen's softmax returns a contiguous tensor."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 5, generator=generator)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    for case in (scores, scores.transpose(-1, -2)):
        torch.library.opcheck(_softmax_kernels, (case, mask))
