"""The same parameters and batch give the same gradient, bit for bit, when PyTorch runs its CPU kernels on
several threads: the property that makes two runs of one spec and seed identical (issue 19).

A kernel that adds into shared memory from several threads (atomic adds) sums in whatever order the threads
arrive, and float addition is not associative. Only colliding writes can race, so the batch repeats a handful of
token ids, as real text repeats spaces and newlines, and is large enough (batch * seq * d_model = 32768, ATen's
``GRAIN_SIZE``) that ATen splits the work between threads at all.
"""

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDictBase
from torch import Tensor

from zmaj.models.common import Batch
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import ModelConfig, architecture

VOCAB, BATCH, SEQ, D_MODEL = 64, 4, 64, 128
CONFIGS: dict[str, ModelConfig] = {
    "gpt": GPTConfig(vocab_size=VOCAB, context=SEQ, d_model=D_MODEL, n_layers=1, n_heads=2),
    "llama": LlamaConfig(vocab_size=VOCAB, context=SEQ, d_model=D_MODEL, n_layers=1, n_heads=2, d_ff=256),
    "gemma3": Gemma3Config(
        vocab_size=VOCAB,
        context=SEQ,
        d_model=D_MODEL,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=64,
        d_ff=256,
        layer_types=("full_attention",),
    ),
}


@pytest.fixture
def two_threads() -> Iterator[None]:
    """Two intra-op threads for the test, whatever the suite runs with; restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def repetitive_batch(seed: int) -> Batch:
    """Rows drawn from only four token ids, so that every embedding row is read at many positions at once."""
    tokens = torch.randint(0, 4, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return Batch(tokens=tokens[:, :-1], targets=tokens[:, 1:])


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.usefixtures("two_threads")
def test_the_gradient_is_bitwise_identical_on_two_threads(name: str) -> None:
    config = CONFIGS[name]
    forward = architecture(config).forward

    def loss(params: TensorDictBase, batch: Batch) -> Tensor:
        assert batch.targets is not None
        logits = forward(params, batch, config=config)
        return F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())

    params = architecture(config).init(config, 0)
    batch = repetitive_batch(seed=0)
    first = torch.func.grad(loss)(params, batch)
    for _ in range(4):  # a race need not show every time; before the fix it showed on the first repeat
        again = torch.func.grad(loss)(params, batch)
        for key in first.keys(include_nested=True, leaves_only=True):
            assert torch.equal(first.get(key), again.get(key)), key
