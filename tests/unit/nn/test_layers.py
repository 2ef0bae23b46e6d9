import pytest
import torch
import torch.nn.functional as F

from zmaj.nn.layers import matvec


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
