"""Which float type to compute in, and the autocast context that applies it.

``auto`` picks bfloat16 where matrix units make it fast (CUDA, or a CPU with AVX512-BF16 or AMX) and float32
elsewhere: on CPUs without bf16 instructions, bf16 matmuls run about 100x slower than fp32. Parameters and
optimizer state stay float32 either way; autocast runs the matmuls in the chosen type.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache, wraps
from pathlib import Path
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]


def _cpu_has_fast_bf16() -> bool:
    """AVX512 with the BF16 extension, or AMX; read from /proc/cpuinfo where it exists (Linux)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


_constant: Callable[[Callable[[], bool]], Callable[[], bool]] = torch.compiler.assume_constant_result
cpu_has_fast_bf16: Callable[[], bool] = cache(_constant(_cpu_has_fast_bf16))
"""``_cpu_has_fast_bf16``, read once, and a constant to ``torch.compile`` (Muon's update, compiled in one graph,
asks it), which cannot trace reading a file."""


def resolve(precision: Precision, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return torch.bfloat16 if fast else torch.float32


def autocast(dtype: torch.dtype, device: torch.device) -> AbstractContextManager[object]:
    """Mixed precision for ``dtype`` on ``device``; a no-op for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_forward(
    forward: Callable[..., torch.Tensor], dtype: torch.dtype, device: torch.device
) -> Callable[..., torch.Tensor]:
    """``forward`` run under ``autocast(dtype, device)``: for steps that take a forward but no autocast, so that
    every pass over the same batch (GRPO's old log-probs and its training pass) computes in one precision."""
    if dtype == torch.float32:
        return forward

    @wraps(forward)
    def mixed(*args: object, **kwargs: object) -> torch.Tensor:
        with autocast(dtype, device):
            return forward(*args, **kwargs)

    return mixed


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device(choice: DeviceChoice) -> torch.device:
    """The device a spec asks for; ``cuda`` on a machine without a usable GPU is an error, not a silent CPU run."""
    if choice == "auto":
        return default_device()
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for, but this machine has no usable CUDA GPU")
    return torch.device(choice)
