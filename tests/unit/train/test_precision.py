"""Precision ``auto``: bfloat16 only where the hardware multiplies it, and nothing else taken for ``auto``."""

import warnings
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDictBase
from torch import Tensor

from tests.strategies import MODERN_BLOCK
from tests.unit.models.test_determinism import CONFIGS, SEQ, VOCAB
from zmaj.models import lora
from zmaj.models.common import Batch
from zmaj.models.registry import ModelConfig, architecture
from zmaj.train import precision
from zmaj.train.step import token_losses

# /proc/cpuinfo flags lines, shortened: the flags that decide, among others that must not.
ZEN3 = "flags\t\t: fpu sse avx avx2 fma bmi2 sha_ni"
ICE_LAKE = "flags\t\t: avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bitalg"
ZEN4 = "flags\t\t: avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(
    ("capability", "cpuinfo", "fast"),
    [
        ("AVX2", ZEN3, False),
        ("AVX512", ICE_LAKE, False),  # AVX-512 without BF16 emulates bf16 as AVX2 does
        ("AVX512", ZEN4, True),
        ("AVX512", SAPPHIRE_RAPIDS, True),
        ("AMX", SAPPHIRE_RAPIDS, True),
        ("AVX2", ZEN4, False),  # ATEN_CPU_CAPABILITY=avx2: torch's kernels then have no bf16 instructions
        ("DEFAULT", "", False),
        ("AVX512", "", False),  # no /proc/cpuinfo (not Linux)
    ],
)
def test_a_cpu_is_fast_in_bf16_only_with_the_bf16_extension_or_amx(
    capability: str, cpuinfo: str, fast: bool
) -> None:
    assert precision.fast_bf16_cpu(capability, cpuinfo) is fast


@pytest.mark.parametrize(("major", "fast"), [(7, False), (8, True), (9, True)])
def test_auto_is_bf16_on_gpus_from_ampere_on(monkeypatch: pytest.MonkeyPatch, major: int, fast: bool) -> None:
    """V100 and T4 (7.x) have no bf16 tensor cores; A100/A6000 (8.x) and H100 (9.0) have. ``device.index`` is
    the GPU asked about, not the current one."""
    asked: list[int | None] = []

    def properties(index: int | None) -> SimpleNamespace:
        asked.append(index)
        return SimpleNamespace(major=major)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(precision, "cuda_has_fast_bf16", precision._cuda_has_fast_bf16)
    expected = torch.bfloat16 if fast else torch.float32
    assert precision.resolve("auto", torch.device("cuda", 1)) == expected
    assert asked == [1]
    assert precision.resolve("bf16", torch.device("cuda", 1)) == torch.bfloat16  # asked for: as asked
    assert precision.resolve("fp32", torch.device("cuda", 1)) == torch.float32


def test_both_answers_are_constants_to_the_compiler_and_compile_without_a_warning() -> None:
    """Muon's compiled update resolves ``ns_dtype: auto`` inside its graph: each answer is marked a constant
    (``torch.compiler.assume_constant_result``), so the compiler calls it once rather than traces into a file read
    or the driver. Wrapped in ``functools.cache`` over the mark, each compile of a Muon update warned of a call to
    a cached function (twice per process in every compiled run with Muon)."""
    for answer in (precision.cpu_has_fast_bf16, precision.cuda_has_fast_bf16):
        assert getattr(answer, "_dynamo_marked_constant", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.ones(2)
        # The eager backend: dynamo alone traces (and warned); no kernels to build.
        compiled = torch.compile(lambda x: x.to(precision.resolve("auto", x.device)), backend="eager")
        assert compiled(x).dtype in (torch.bfloat16, torch.float32)
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_an_unknown_precision_is_an_error_not_auto() -> None:
    """A library caller's typo: the tests' runtime type check refuses it first, so ``resolve`` is called past
    it, as a user's program (no type check) calls it."""
    resolve = getattr(precision.resolve, "__wrapped__", precision.resolve)  # past the type check
    with pytest.raises(ValueError, match="'fp16'"):
        resolve("fp16", torch.device("cpu"))  # type: ignore[arg-type]


# Every architecture, and the modern GPT block's options (value embeddings among them) beside GPT-2's.
ARCHITECTURES: dict[str, ModelConfig] = {
    **CONFIGS,
    "gpt, modern": CONFIGS["gpt"].model_copy(update={**MODERN_BLOCK, "value_embeds": 1}),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_block_matrices_stored_for_the_matmuls_give_the_same_bits_under_autocast(name: str) -> None:
    """``for_matmuls``' promise, for every architecture: under bf16 autocast, the forward and LoRA's loss and
    adapter gradients (a base that is only read) are those of the float32 base to the bit; only the blocks'
    matrices are cast, everything else is the float32 tensor itself."""
    config = ARCHITECTURES[name]
    model = architecture(config)
    base = model.init(config, 0)
    stored = precision.for_matmuls(base, torch.bfloat16)
    for key in base.keys(True, True):
        whole, kept = base.get(key), stored.get(key)
        if key[0] == "blocks" and whole.ndim == 3:
            assert kept.dtype == torch.bfloat16, key
            assert torch.equal(kept, whole.to(torch.bfloat16)), key
        else:
            assert kept is whole, key
    config_lora = lora.LoraConfig(rank=2, targets=("*",))
    adapters = lora.init_adapters(base, config_lora).apply(
        lambda t: t + 0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
    )
    assert adapters is not None  # B no longer zero: the adapters' update counts
    rows = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(0))
    batch = Batch(tokens=rows[:, :-1], targets=rows[:, 1:])

    def loss(params: TensorDictBase, adapters: TensorDictBase) -> Tensor:
        with precision.autocast(torch.bfloat16, torch.device("cpu")):
            logits = model.forward(lora.attach(params, adapters, config_lora), batch, config)
            return token_losses(logits, batch).mean()

    grads, value = torch.func.grad_and_value(partial(loss, base))(adapters)
    grads_stored, value_stored = torch.func.grad_and_value(partial(loss, stored))(adapters)
    assert torch.equal(value, value_stored)
    for key in grads.keys(True, True):
        assert torch.equal(grads.get(key), grads_stored.get(key)), key
    with torch.no_grad(), precision.autocast(torch.bfloat16, torch.device("cpu")):
        assert torch.equal(model.forward(base, batch, config), model.forward(stored, batch, config))
    assert precision.for_matmuls(base, torch.float32) is base
