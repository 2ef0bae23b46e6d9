"""The norms, softmaxes, GELU, losses and log-probs compute float64 in float64: they accumulate in float32 where
their input is narrower, and used to narrow float64 to it too, so that a float64 gradient check (``gradcheck``,
the standard way to check a derivative) failed on the readable paths by float32's rounding."""

from collections.abc import Callable

import pytest
import torch
from tensordict import TensorDict
from torch import Tensor

from zmaj.models import gemma3
from zmaj.models.common import Batch
from zmaj.nn.attention import eager_attention
from zmaj.nn.layers import gelu_saving_derivative, rms_norm
from zmaj.nn.loss import chunked_cross_entropy
from zmaj.nn.softmax import masked_softmax
from zmaj.train.logprobs import token_logprobs
from zmaj.train.step import token_losses


def inputs(*shapes: tuple[int, ...]) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for shape in shapes
    )


CAUSAL = torch.ones(5, 5, dtype=torch.bool).tril()[None]
TARGETS = torch.tensor([[1, 0, 3, 2, 1]])


CASES: dict[str, tuple[Callable[..., Tensor], tuple[Tensor, ...]]] = {
    "masked_softmax": (lambda s: masked_softmax(s, CAUSAL), inputs((1, 5, 5))),
    "eager_attention": (
        lambda q, k, v: eager_attention(q, k, v, CAUSAL, 0.5),
        inputs((1, 4, 5, 3), (1, 2, 5, 3), (1, 2, 5, 3)),  # grouped-query: 4 heads over 2
    ),
    "rms_norm": (lambda x, w: rms_norm(TensorDict({"weight": w}), x, 1e-6), inputs((3, 4), (4,))),
    "gelu": (lambda x: gelu_saving_derivative(x, tanh=False), inputs((3, 4))),
    "gelu_tanh": (lambda x: gelu_saving_derivative(x, tanh=True), inputs((3, 4))),
    "chunked_cross_entropy": (
        lambda h, w: chunked_cross_entropy(h, w, TARGETS, chunk=2),
        inputs((1, 5, 3), (4, 3)),
    ),
    "chunked_cross_entropy_capped": (
        lambda h, w: chunked_cross_entropy(h, w, TARGETS, chunk=3, cap=3.0),
        inputs((1, 5, 3), (4, 3)),
    ),
    "gemma3.rms_norm": (
        lambda x, w: gemma3.rms_norm(TensorDict({"weight": w}), x, 1e-6),
        inputs((3, 4), (4,)),
    ),
    "token_losses": (lambda z: token_losses(z, Batch(tokens=TARGETS, targets=TARGETS)), inputs((1, 5, 4))),
    "token_logprobs": (lambda z: token_logprobs(z, TARGETS), inputs((1, 5, 4))),
}


@pytest.mark.parametrize("name", CASES)
def test_gradients_check_in_float64(name: str) -> None:
    function, args = CASES[name]
    assert function(*args).dtype == torch.float64
    assert torch.autograd.gradcheck(function, args)
