import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict
from torch import Tensor

from tests import strategies
from zmaj.nn.layers import (
    activation,
    dropout,
    embedding,
    fused_linear,
    gelu_saving_derivative,
    glu_mlp,
    layer_norm,
    linear,
    matvec,
    rms_norm,
)


@pytest.mark.parametrize("shape", [(1, 40), (1, 1, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("strided", [False, True])
def test_matvec_is_the_linear_map(
    device: torch.device, shape: tuple[int, ...], dtype: torch.dtype, strided: bool
) -> None:
    """Against F.linear in float64: the multiply-reduce form accumulates in float32 and rounds once at the end.

    ``strided``: ``x`` a view with an offset and a step, which the ``as_strided`` that stores ``matvec``'s input
    must read where the view does.
    """
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=generator).to(device, dtype)
    if strided:
        x = torch.randn(*shape[:-1], 83, generator=generator).to(device, dtype)[..., 3::2]
    else:
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


@pytest.mark.parametrize("biases", [(True, True, True), (False, False, False), (True, False, True)])
def test_fused_linear_equals_separate_linears(device: torch.device, biases: tuple[bool, ...]) -> None:
    """Outputs and the gradients of every weight, bias and the input equal one ``linear`` per map (q, k and v of
    grouped-query sizes; a map without bias where others have one)."""
    generator = torch.Generator().manual_seed(0)
    sizes = (24, 8, 8)
    params = [
        TensorDict(
            {"weight": torch.randn(n, 16, generator=generator)}
            | ({"bias": torch.randn(n, generator=generator)} if bias else {})
        ).to(device)
        for n, bias in zip(sizes, biases, strict=True)
    ]
    x = torch.randn(2, 5, 16, generator=generator).to(device)
    upstream = [torch.randn(2, 5, n, generator=generator).to(device) for n in sizes]

    def total(
        fn: Callable[[list[TensorDict], Tensor], list[Tensor]], params: list[TensorDict], x: Tensor
    ) -> Tensor:
        return sum(
            ((out * u).sum() for out, u in zip(fn(params, x), upstream, strict=True)), torch.tensor(0.0)
        )

    def separate(params: list[TensorDict], x: Tensor) -> list[Tensor]:
        return [linear(p, x) for p in params]

    for a, b in zip(fused_linear(params, x), separate(params, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    fused_grads = torch.func.grad(partial(total, fused_linear), argnums=(0, 1))(params, x)
    separate_grads = torch.func.grad(partial(total, separate), argnums=(0, 1))(params, x)
    torch.testing.assert_close(fused_grads[1], separate_grads[1], rtol=1e-6, atol=1e-6)
    for fused, apart in zip(fused_grads[0], separate_grads[0], strict=True):
        for key in apart.keys():  # noqa: SIM118 (a TensorDict has no `in`)
            torch.testing.assert_close(fused[key], apart[key], rtol=1e-6, atol=1e-6)


class _Concatenations(torch.overrides.TorchFunctionMode):
    """Counts ``torch.cat`` calls: how ``fused_linear`` joins its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self,
        func: Callable[..., object],
        types: object,
        args: tuple[object, ...] = (),
        kwargs: dict[str, object] | None = None,
    ) -> object:
        self.count += func is torch.cat
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 64])
def test_fused_linear_joins_weights_only_where_gradients_are_taken(device: torch.device, rows: int) -> None:
    """The weights are concatenated only where a gradient is taken, even one taken under an outer
    ``no_grad`` (``torch.func`` turns gradients back on, as ``train_step`` runs), and never for a single row; a
    forward alone (evaluation, decoding) runs one product per map, bit for bit ``F.linear``'s."""
    generator = torch.Generator().manual_seed(2)
    params = [TensorDict({"weight": torch.randn(n, 16, generator=generator)}).to(device) for n in (24, 8, 8)]
    x = torch.randn(rows, 16, generator=generator).to(device)
    with torch.no_grad(), _Concatenations() as joins:
        outs = fused_linear(params, x)
    assert joins.count == 0
    for out, p in zip(outs, params, strict=True):
        torch.testing.assert_close(out, F.linear(x, p["weight"]), rtol=0, atol=0)

    def total(x: Tensor) -> Tensor:
        return sum((out.sum() for out in fused_linear(params, x)), torch.tensor(0.0, device=device))

    for outer in (torch.enable_grad, torch.no_grad):
        with outer(), _Concatenations() as joins:
            torch.func.grad(total)(x)
        assert joins.count == (rows > 1)


def test_fused_linear_keeps_lora_adapters(device: torch.device) -> None:
    """A map carrying LoRA factors (``zmaj.models.lora``) still gets its low-rank update."""
    generator = torch.Generator().manual_seed(1)
    params = [
        TensorDict({"weight": torch.randn(8, 16, generator=generator)}).to(device),
        TensorDict(
            {
                "weight": torch.randn(8, 16, generator=generator),
                "lora_a": torch.randn(2, 16, generator=generator),
                "lora_b": torch.randn(8, 2, generator=generator),
            }
        ).to(device),
    ]
    x = torch.randn(3, 16, generator=generator).to(device)
    adapted = x @ params[1]["weight"].T + (x @ params[1]["lora_a"].T) @ params[1]["lora_b"].T
    torch.testing.assert_close(fused_linear(params, x)[1], adapted, rtol=1e-5, atol=1e-5)


@given(seed=strategies.seeds, scale=st.sampled_from([0.1, 1.0, 4.0, 30.0]), tanh=st.booleans())
def test_gelu_saving_derivative_has_gelus_value_and_gradient(seed: int, scale: float, tanh: bool) -> None:
    """Against ``F.gelu`` and its autograd derivative, in float32 (in bf16 the same numbers, the derivative rounded
    once more)."""
    x = scale * torch.randn(64, generator=torch.Generator().manual_seed(seed))
    grad_out = torch.randn(64, generator=torch.Generator().manual_seed(seed + 1))
    approximate = "tanh" if tanh else "none"

    def value_and_grad(fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
        return out.detach(), grad

    value, grad = value_and_grad(partial(gelu_saving_derivative, tanh=tanh))
    expected_value, expected_grad = value_and_grad(partial(F.gelu, approximate=approximate))
    torch.testing.assert_close(value, expected_value, atol=1e-6, rtol=1e-6)
    # atol 1e-5: for x around -4, 1 - tanh(u)^2 cancels in float32, and the two formulas lose its digits differently.
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tanh", [True, False])
def test_gelu_saving_derivative_is_finite_for_huge_finite_inputs(tanh: bool) -> None:
    """Where x^2 or x^3 overflow float32, the value is still GELU's, x or 0 (closed form: Phi is 1 or 0 there;
    ``F.gelu`` itself overflows to inf at 3e38), and the gradient 1 or 0."""
    x = torch.tensor([1e20, -1e20, 3e38, -3e38], requires_grad=True)
    out = gelu_saving_derivative(x, tanh=tanh)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out.detach(), torch.tensor([1e20, 0.0, 3e38, 0.0]))
    torch.testing.assert_close(grad, torch.tensor([1.0, 0.0, 1.0, 0.0]))


@given(st.sampled_from([0.1, 0.5, 0.9]), st.integers(0, 2**16))
def test_dropout_zeroes_a_share_p_and_scales_the_rest_by_one_over_one_minus_p(p: float, seed: int) -> None:
    """Inverted dropout (Srivastava et al., 2014): each entry is dropped with probability ``p`` and the kept
    ones are divided by ``1 - p``, so the expectation is ``x``; the share dropped is within 5 standard
    deviations of ``p`` (a binomial over 20,000 entries), and evaluation (no generator) is the identity."""
    x = 1 + torch.rand(20_000, generator=torch.Generator().manual_seed(seed))  # no zero of its own
    out = dropout(x, p, torch.Generator().manual_seed(seed + 1))
    dropped = out == 0
    assert torch.equal(out[~dropped], x[~dropped] / (1 - p))
    assert abs(float(dropped.float().mean()) - p) <= 5 * (p * (1 - p) / len(x)) ** 0.5
    assert dropout(x, p, None) is x


def test_norms_are_their_papers_formulas() -> None:
    """Closed forms, with weights off their init and ``eps`` near the mean square, so that where ``eps`` sits
    (inside the root) and Gemma's ``1 + w`` scale both show; the gradient checks of ``test_float64`` pass any
    smooth formula."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=generator) * 1e-2
    w, b = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
    eps = 1e-4
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(rms_norm(TensorDict(weight=w), x, eps), x / rms * w)
    torch.testing.assert_close(rms_norm(TensorDict(weight=w), x, eps, offset=1.0), x / rms * (1 + w))
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(
        layer_norm(TensorDict(weight=w, bias=b), x, eps),
        centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * w + b,
    )


def test_activations_and_the_gated_mlp_are_their_formulas() -> None:
    """GPT-2's tanh GELU (Hendrycks & Gimpel, 2016, eq. 2), SiLU, and SwiGLU: silu(x W_gate) * (x W_up) W_down,
    the gate the one inside the nonlinearity (Shazeer, 2020)."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(5, 8, generator=generator) * 3
    tanh_gelu = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    torch.testing.assert_close(activation("gelu_tanh", y), tanh_gelu)
    torch.testing.assert_close(activation("gelu", y), 0.5 * y * (1 + torch.erf(y / math.sqrt(2))))
    torch.testing.assert_close(activation("silu", y), y * torch.sigmoid(y))
    gate, up, down = (torch.randn(*shape, generator=generator) for shape in ((16, 8), (16, 8), (8, 16)))
    params = TensorDict(gate=TensorDict(weight=gate), up=TensorDict(weight=up), down=TensorDict(weight=down))
    z = torch.randn(4, 8, generator=generator)
    torch.testing.assert_close(
        glu_mlp(params, z, "silu"), ((z @ gate.T) * torch.sigmoid(z @ gate.T) * (z @ up.T)) @ down.T
    )
