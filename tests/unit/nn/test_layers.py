import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from tests import strategies
from zmaj.nn.layers import activation, embedding, matvec


@pytest.mark.parametrize("shape", [(1, 40), (1, 1, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_is_the_linear_map(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Against F.linear in float64: the multiply-reduce form accumulates in float32 and rounds once at the end."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(device, dtype)
    x = torch.randn(shape, generator=generator).to(device, dtype)
    out = matvec(weight, x)
    exact = F.linear(x.double(), weight.double())
    assert out.shape == (*shape[:-1], 24)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8  # bf16: one rounding of the result
    torch.testing.assert_close(out.double(), exact, rtol=tolerance, atol=tolerance)


@given(seed=strategies.seeds, n_ids=st.integers(1, 8))
def test_embedding_gradient_adds_each_rows_gradients_in_position_order(seed: int, n_ids: int) -> None:
    """Bit for bit the serial sum, on two threads, however often an id repeats (few ids: many collisions).

    The serial loop is the order a single thread adds in; a kernel whose threads add into shared rows as they
    arrive would miss it in the last bits. 4 x 64 positions x 128 features reach ATen's ``GRAIN_SIZE``, so
    the work is split between threads at all.
    """
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(16, 128, generator=generator, requires_grad=True)
    ids = torch.randint(0, n_ids, (4, 64), generator=generator)
    upstream = torch.randn(4, 64, 128, generator=generator)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = embedding(TensorDict({"weight": table}), ids)
        (grad,) = torch.autograd.grad(rows, table, upstream)
    finally:
        torch.set_num_threads(saved)
    expected = torch.zeros(table.shape)
    for i, row in zip(ids.flatten().tolist(), upstream.flatten(0, 1), strict=True):
        expected[i] += row
    assert torch.equal(rows, table.detach()[ids])
    assert torch.equal(grad, expected)


@given(seed=strategies.seeds)
def test_relu2_is_relu_squared_as_transformers_computes_it(seed: int) -> None:
    """Against the formula max(0, x)^2 and ``transformers``' ``ReLUSquaredActivation`` (what export writes)."""
    from transformers.activations import ACT2FN

    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed))
    out = activation("relu2", x)
    torch.testing.assert_close(out, torch.where(x > 0, x * x, torch.zeros_like(x)), rtol=0, atol=0)
    torch.testing.assert_close(out, ACT2FN["relu2"](x), rtol=0, atol=0)
