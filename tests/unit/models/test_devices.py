"""Every tensor a model makes lives on its inputs' device: checked on fake CUDA tensors, so that a forgotten
``device=`` (a ``torch.arange`` on the CPU in a forward pass) fails here, on a machine with no GPU, and not first on
a user's GPU.

``FakeTensorMode`` (torch._subclasses, what ``torch.compile`` traces with) runs every operator's shape and device
rules without memory or kernels, and refuses an operator whose tensors sit on two devices. It cannot run a backward
pass (autograd asks the CUDA driver for streams) nor anything that reads a value (``int(tensor)``), so this covers
forward passes, cached decoding, masks, the loss and the optimizer update; ``pytest --device cuda`` covers the rest
on a real GPU. Flex-attention's forward is left out: it is compiled, and Inductor would compile a CUDA kernel here.
"""

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from zmaj.infer.cache import init_cache
from zmaj.models import gemma3, gpt, llama, lora
from zmaj.models.common import Batch
from zmaj.nn import masks
from zmaj.train import dpo, optim, step
from zmaj.train.logprobs import masked_token_logprobs

# With an explicit index: TensorDict asks the CUDA driver for the current device when given a bare "cuda".
CUDA = torch.device("cuda:0")
GPT = gpt.GPTConfig(vocab_size=64, context=32, d_model=32, n_layers=2, n_heads=4)
LLAMA = llama.LlamaConfig(
    vocab_size=64,
    context=32,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    d_ff=48,
    head_dim=12,
    qk_norm=True,
)
MODELS: dict[str, tuple[ModuleType, gpt.GPTConfig | llama.LlamaConfig | gemma3.Gemma3Config]] = {
    "gpt": (gpt, GPT),
    "gpt-sinusoidal-rmsnorm-eager": (
        gpt,
        GPT.model_copy(update={"positions": "sinusoidal", "norm": "rmsnorm", "attention": "eager"}),
    ),
    "qwen3": (llama, LLAMA),
    "qwen2-bias-eager": (llama, LLAMA.model_copy(update={"qkv_bias": True, "attention": "eager"})),
    "gemma3": (
        gemma3,
        gemma3.Gemma3Config(
            vocab_size=64,
            context=32,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            d_ff=48,
            sliding_window=4,
            layer_types=("sliding_attention", "full_attention"),
            final_logit_softcap=3.0,
        ),
    ),
}


@pytest.fixture
def fake_cuda() -> Iterator[None]:
    with FakeTensorMode():
        yield


def padded_batch() -> Batch:
    """Two rows, the second right-padded, with targets and a loss mask: every optional field of a batch."""
    tokens = torch.randint(0, 64, (2, 10), device=CUDA)
    is_token = torch.arange(10, device=CUDA)[None] < torch.tensor([[10], [7]], device=CUDA)
    return Batch(
        tokens=tokens[:, :-1], targets=tokens[:, 1:], is_token=is_token[:, :-1], loss_mask=is_token[:, 1:]
    )


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_and_cached_forward_stay_on_the_device(name: str) -> None:
    module, config = MODELS[name]
    params = module.init(config, 0, CUDA)
    batch = padded_batch()
    logits = module.forward(params, batch, config)
    assert logits.device == CUDA
    assert step.token_losses(logits, batch).device == CUDA
    cache = init_cache(config, 2, 16, device=CUDA)
    logits, cache = module.forward_cached(
        params, Batch(tokens=batch.tokens, is_token=batch.is_token), cache, config
    )
    logits, cache = module.forward_cached(
        params, Batch(tokens=batch.tokens[:, :1]), cache, config, donate=True
    )
    assert logits.device == CUDA
    assert all(t.device == CUDA for t in cache.values(True, True))


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("donate", [False, True])
def test_the_optimizer_update_stays_on_the_device(donate: bool) -> None:
    params = gpt.init(GPT, 0, CUDA)
    grads = params.apply(torch.randn_like)
    assert grads is not None
    config = optim.AdamWConfig(weight_decay=0.1, grad_clip=1.0)
    new, norm = step.apply_grads(
        step.init_state(params), grads, config, 1e-3, optim.decay_mask(params), donate=donate
    )
    assert norm.device == CUDA
    # AdamW's step counter may stay a CPU scalar (optim.adamw_init makes it one), as in torch.optim: reading it
    # then never waits for the GPU.
    assert all(t.device == CUDA for t in new.exclude(("opt", "step")).values(True, True))


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("merged", [True, False])
def test_lora_and_the_dpo_loss_stay_on_the_device(merged: bool) -> None:
    params = llama.init(LLAMA, 0, CUDA)
    config = lora.LoraConfig(rank=2, targets=("attn.q", "mlp.*"))
    adapters = lora.init_adapters(params, config)
    assert all(t.device == CUDA for t in adapters.values(True, True))
    forward = lora.lora_forward(step.bind(llama.forward, config=LLAMA), params, config, merged=merged)
    batch = dpo.preference_batch([[1, 2], [3]], [[4, 5], [6]], [[7], [8, 9]], CUDA)
    logprobs = masked_token_logprobs(forward(adapters, batch, dropout_seed=None), batch).sum(-1)
    loss, metrics = dpo.dpo_loss(
        logprobs[:2], logprobs[2:], logprobs[:2].detach(), logprobs[2:].detach(), 0.1
    )
    assert loss.device == CUDA
    assert all(value.device == CUDA for value in metrics.values())


@pytest.mark.usefixtures("fake_cuda")
def test_masks_stay_on_the_device() -> None:
    ids = (torch.arange(64, device=CUDA) // 20)[None]
    mod = masks.combine(masks.causal, masks.document(ids))
    assert masks.dense(mod, 1, 64, 64, CUDA).device == CUDA
    assert masks.block_mask(mod, 1, 64, 64, CUDA, block_size=16).kv_num_blocks.device == CUDA
