"""zmaj's GPT with GPT-2's choices equals ``transformers.GPT2LMHeadModel`` given the same weights."""

import pytest
import torch
import transformers

from zmaj.convert import gpt2
from zmaj.models import gpt
from zmaj.models.common import Batch
from zmaj.nn.attention import Backend


@pytest.fixture(scope="module")
def reference() -> transformers.GPT2LMHeadModel:
    # initializer_range larger than the usual 0.02, so the MLP's inputs reach where exact and tanh GELU differ:
    # at 0.02 the wrong variant moved the logits by ~8e-7, inside the bound.
    config = transformers.GPT2Config(
        vocab_size=300,
        n_positions=64,
        n_embd=48,
        n_layer=3,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.eval()
    # Non-trivial norms and biases, so the test would notice a swapped or dropped one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_logits_equal_gpt2(reference: transformers.GPT2LMHeadModel, backend: Backend) -> None:
    config = gpt2.config_from_hf(reference.config.to_dict()).model_copy(update={"attention": backend})
    params = gpt2.params_from_hf(reference.state_dict(), config)
    tokens = torch.randint(0, 300, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        logits = gpt.forward(params, Batch(tokens=tokens), config)
    assert (logits - expected).abs().max().item() <= 1e-5


def test_missing_tensor_is_named(reference: transformers.GPT2LMHeadModel) -> None:
    config = gpt2.config_from_hf(reference.config.to_dict())
    state = {k: v for k, v in reference.state_dict().items() if k != "transformer.h.1.mlp.c_fc.bias"}
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias"):
        gpt2.params_from_hf(state, config)
