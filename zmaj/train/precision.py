"""Which float type to compute in, and the autocast context that applies it.

``auto`` picks bfloat16 where matrix units make it fast (a CUDA GPU of compute capability 8.0 or later: A100,
A6000, H100; or a CPU with AVX512-BF16 or AMX) and float32 elsewhere: on CPUs without bf16 instructions, bf16
matmuls run about 100x slower than fp32, and GPUs before Ampere (V100, T4) have no bf16 tensor cores. Trained
parameters and optimizer state stay float32 either way; autocast runs the matmuls in the chosen type. A model that
is only read (LoRA's base, DPO's reference) may keep its block matrices in that type (:func:`for_matmuls`).
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import wraps
from pathlib import Path
from typing import Literal, TypeVar, cast, get_args

import torch
from tensordict import TensorDict, TensorDictBase

from zmaj.models.common import LazyLogits

Precision = Literal["auto", "fp32", "bf16"]
DeviceChoice = Literal["auto", "cpu", "cuda"]


def fast_bf16_cpu(capability: str, cpuinfo: str) -> bool:
    """Whether a CPU multiplies bf16 matrices in hardware: torch's kernels for it are AVX-512 ones
    (``torch.backends.cpu.get_cpu_capability()``) and the CPU has the BF16 extension or AMX (``/proc/cpuinfo``'s
    flags). An AVX-512 CPU without them (Skylake-X, Ice Lake) emulates bf16, as an AVX2-only one does."""
    return capability in ("AVX512", "AMX") and ("avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo)


def _cpu_has_fast_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")  # Linux; elsewhere no flags, so float32
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return fast_bf16_cpu(torch.backends.cpu.get_cpu_capability(), flags)


def _cuda_has_fast_bf16(index: int | None) -> bool:
    """Compute capability 8.0 or later (Ampere); not ``torch.cuda.is_bf16_supported()``, which asks about the
    current device, not this one, and by default counts emulated bf16 as supported. Under ROCm, any AMD GPU: the
    data-centre ones zmaj's users would train on (MI200, MI300) multiply bf16 in hardware, though older or
    consumer ones (MI50, RDNA2) would not; untested, as zmaj has run on no AMD GPU."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(index).major >= 8


F = TypeVar("F", bound=Callable[..., bool])
Out = TypeVar("Out")  # what a forward returns: logits, or LazyLogits
_mark: Callable[[Callable[..., bool]], object] = torch.compiler.assume_constant_result


def _constant(fn: F) -> F:
    """``torch.compiler.assume_constant_result``, typed: it marks ``fn`` itself."""
    _mark(fn)
    return fn


_answers: dict[object, bool] = {}


def _once(key: object, ask: Callable[[], bool]) -> bool:
    """``ask()``, asked once per ``key``. A dict, not ``functools.cache``, whose wrapper dynamo meets first, and
    warns of, at every compile."""
    if key not in _answers:
        _answers[key] = ask()
    return _answers[key]


@_constant
def cpu_has_fast_bf16() -> bool:
    """``_cpu_has_fast_bf16``, read once, and a constant to ``torch.compile`` (Muon's update, compiled in one
    graph, asks it), which cannot trace reading a file."""
    return _once("cpu", _cpu_has_fast_bf16)


@_constant
def cuda_has_fast_bf16(index: int | None) -> bool:
    """``_cuda_has_fast_bf16``, asked once per device, as ``cpu_has_fast_bf16``."""
    return _once(("cuda", index), lambda: _cuda_has_fast_bf16(index))


def resolve(precision: Precision, device: torch.device) -> torch.dtype:
    if precision not in get_args(Precision):  # a library caller's typo, not auto
        raise ValueError(f"precision must be one of {get_args(Precision)}, got {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        fast = cuda_has_fast_bf16(device.index)
    else:
        fast = device.type == "cpu" and cpu_has_fast_bf16()
    return torch.bfloat16 if fast else torch.float32


def autocast(dtype: torch.dtype, device: torch.device) -> AbstractContextManager[object]:
    """Mixed precision for ``dtype`` on ``device``; a no-op for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_forward(
    forward: Callable[..., Out], dtype: torch.dtype, device: torch.device
) -> Callable[..., Out]:
    """``forward`` run under ``autocast(dtype, device)``: for steps that take a forward but no autocast, so that
    every pass over the same batch (GRPO's old log-probs and its training pass) computes in one precision. A
    lazy forward's hidden states and unembedding come back cast to ``dtype``, as autocast would cast them for
    the unembedding's matmul, which the log-probs run later, chunk by chunk (``zmaj.train.logprobs``)."""
    if dtype == torch.float32:
        return forward

    @wraps(forward)
    def mixed(*args: object, **kwargs: object) -> Out:
        with autocast(dtype, device):
            out = forward(*args, **kwargs)
            if isinstance(out, LazyLogits):
                return cast(Out, LazyLogits(out.hidden.to(dtype), out.weight.to(dtype), out.softcap))
            return out

    return mixed


def for_matmuls(params: TensorDictBase, dtype: torch.dtype) -> TensorDict:
    """``params`` with every block matrix stored in ``dtype``, for a model that is only read (LoRA's base, DPO's
    and GRPO's references): the same bits under ``autocast(dtype)`` at a fraction of the memory.

    A block's matrices feed linear maps alone, which autocast casts to ``dtype`` at every call (as the fully
    sharded forward gathers them: ``zmaj.train.parallel.sharded_forward``); cast once ahead, autocast finds
    them cast and each forward computes what it did, for every architecture (tested), while an 8B Llama's
    blocks take 14 GB in bf16 where float32 took 28, and the casts of every step are gone. Everything else (the
    embeddings and unembedding, the blocks' norm scales and biases) is shared as it is: float32, as on one
    process. A float32 ``dtype`` gives ``params`` back unchanged."""
    assert isinstance(params, TensorDict)
    if dtype == torch.float32:
        return params
    blocks = params["blocks"]
    out = params.clone(recurse=False)
    out.set("blocks", blocks.apply(lambda t: t.to(dtype) if _is_matrix(blocks, t) else t))
    return out


def matrices_dtype(params: TensorDictBase) -> torch.dtype:
    """The dtype ``params``' block matrices are stored in: float32, or the one :func:`for_matmuls` gave them."""
    blocks = params["blocks"]
    dtype: torch.dtype = next(t.dtype for t in blocks.values(True, True) if _is_matrix(blocks, t))
    return dtype


def _is_matrix(blocks: TensorDictBase, t: torch.Tensor) -> bool:
    """A block's weight matrix, stacked over layers (``[layers, d_out, d_in]``), not a norm scale or bias."""
    return t.ndim == blocks.batch_dims + 2


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device(choice: DeviceChoice) -> torch.device:
    """The device a spec asks for; ``cuda`` on a machine without a usable GPU is an error, not a silent CPU run."""
    if choice == "auto":
        return default_device()
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for, but this machine has no usable CUDA GPU")
    return torch.device(choice)
