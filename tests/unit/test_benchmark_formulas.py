"""The formulas behind README's benchmark numbers that no run checks: the FLOPs a training step's matmuls do
(``benchmarks/train_step.py``'s floor), the nanoGPT model its "x nanoGPT" ratios are against, the datasheet peak
of a GPU, the read bandwidth of decode's bound (``benchmarks/decode.py``) and the compressors' bits per byte
(``benchmarks/compression.py``). Each against a closed form or nanoGPT's own ``model.py``."""

import importlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks() -> Iterator[SimpleNamespace]:
    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import their shared ``common`` as a top-level module
    try:
        yield SimpleNamespace(
            **{name: importlib.import_module(name) for name in ("train_step", "decode", "compression")}
        )
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_matmul_floor_counts_every_weight_matrix_three_times(benchmarks: SimpleNamespace) -> None:
    """Forward, input gradient and weight gradient: 6 FLOPs per weight per token, over the 12 d^2 of each block
    (q/k/v, output, the 4d MLP's two) and the tied unembedding once."""
    train_step: ModuleType = benchmarks.train_step
    shape = train_step.Shape(batch=2, seq=8, layers=3, d_model=16, heads=2, vocab=50, bias=False)
    d = 16
    assert train_step.matmul_floor_gflop(shape) == pytest.approx(6 * 2 * 8 * (3 * 12 * d * d + d * 50) / 1e9)


def test_the_nanogpt_reference_is_nanogpts_model(benchmarks: SimpleNamespace) -> None:
    """The README's "x nanoGPT" ratios are against nanoGPT's ``model.py``: its unembedding tied to the token
    embedding, its residual projections initialised with std 0.02 / sqrt(2 n_layer) (GPT-2's scaled init), and
    its optimizer decaying the 2-D parameters only. A reference that drifted from any would time another model."""
    train_step: ModuleType = benchmarks.train_step
    torch.manual_seed(0)
    layers, d, vocab, block = 4, 256, 300, 32
    model = train_step.NanoGPT(train_step.NanoGPTConfig(block, vocab, layers, 4, d, bias=False))
    assert model.lm_head.weight is model.transformer.wte.weight
    params = sum(p.numel() for p in model.parameters())
    assert params == vocab * d + block * d + layers * (12 * d * d + 2 * d) + d  # LayerNorms without biases
    for name in ("attn", "mlp"):
        weights = torch.cat([getattr(b, name).c_proj.weight.flatten() for b in model.transformer.h])
        assert weights.std().item() == pytest.approx(0.02 / math.sqrt(2 * layers), rel=0.03), name
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    # Decayed: wte (the unembedding too), wpe and each block's four matrices; not: the LayerNorms' weights.
    assert [len(group["params"]) for group in optimizer.param_groups] == [2 + 4 * layers, 2 * layers + 1]


@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA H100 PCIe", 756.5), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 NVL", 835.0)],
)
def test_a_gpus_datasheet_peak_is_its_most_specific_names(
    benchmarks: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, name: str, tflops: float
) -> None:
    """ "H100" is in every H100's name: the PCIe card and the NVL must match their own rows first."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert benchmarks.train_step.datasheet_bf16_tflops(torch.device("cuda")) == tflops


def test_the_read_bandwidth_is_the_tensors_bytes_over_the_fastest_sum(
    benchmarks: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode's bandwidth bound reads fp32 elements of 4 bytes: counted as 2, the bound halves and every decode
    rate reads as twice its share of it."""
    ticks = iter(range(100))
    monkeypatch.setattr(benchmarks.decode, "time", SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-3))
    assert benchmarks.decode.read_bandwidth_gbs(1) == pytest.approx(2**20 / 1e-3 / 1e9)


def test_bits_per_byte_are_eight_compressed_bytes_per_raw_byte(benchmarks: SimpleNamespace) -> None:
    assert benchmarks.compression.bits_per_byte(100, 800) == 1.0
    assert benchmarks.compression.bits_per_byte(300, 800) == 3.0
