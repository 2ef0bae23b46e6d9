"""LoRA: a zero B is the base model, merged equals unmerged, only the adapters learn, and they do learn."""

import gc
import math
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase

from zmaj.models import llama, lora
from zmaj.models.common import Batch
from zmaj.train import optim, step
from zmaj.train.logprobs import completion_batch

CONFIG = llama.LlamaConfig(
    vocab_size=32, context=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1
)
FORWARD = step.bind(llama.forward, config=CONFIG)
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=("attn.q", "attn.v", "mlp.*"), seed=1)


@cache
def base(device: torch.device) -> TensorDict:
    """The frozen model every test adapts, built once per device."""
    return llama.init(CONFIG, seed=0, device=device)


def make_batch(seed: int, device: torch.device, rows: int = 3, seq: int = 12) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 32, (rows, seq + 1), generator=generator)
    return Batch(
        tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=torch.ones(rows, seq, dtype=torch.bool)
    ).to(device)


def random_adapters(seed: int, device: torch.device) -> TensorDictBase:
    """Adapters with B non-zero too, so that the update is not trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    adapters = lora.init_adapters(base(device), LORA)
    return adapters.apply(lambda t: torch.randn(t.shape, generator=generator).to(device) * 0.2)  # type: ignore[return-value]


def test_targets_select_the_named_matrices_and_shapes_stack_over_layers(device: torch.device) -> None:
    adapters = lora.init_adapters(base(device), LORA)
    paths = sorted(".".join(key[:-1]) for key in adapters.keys(True, True) if key[-1] == "a")
    assert paths == ["attn.q", "attn.v", "mlp.down", "mlp.gate", "mlp.up"]
    assert adapters["attn", "q", "a"].shape == (2, 4, 32)
    assert adapters["attn", "v", "b"].shape == (2, 16, 4)  # v: n_kv_heads * head_dim = 2 * 8
    assert adapters["mlp", "down", "a"].shape == (2, 4, 48)
    assert adapters.batch_size == torch.Size([2])
    assert all(bool((b == 0).all()) for key, b in adapters.items(True, True) if key[-1] == "b")


def test_a_pattern_that_matches_nothing_is_an_error_naming_it_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'attn\.qq'.*attn\.k.*mlp\.up"):
        lora.init_adapters(base(torch.device("cpu")), lora.LoraConfig(targets=("attn.q", "attn.qq")))


def test_zero_b_is_exactly_the_base_model(device: torch.device) -> None:
    frozen = base(device)
    adapters = lora.init_adapters(frozen, LORA)
    batch = make_batch(0, device)
    base_logits = FORWARD(frozen, batch, dropout_seed=None)
    for merged in (True, False):
        logits = lora.lora_forward(FORWARD, frozen, LORA, merged=merged)(adapters, batch, dropout_seed=None)
        assert torch.equal(logits, base_logits)


def test_merged_equals_unmerged_and_both_change_the_model(device: torch.device) -> None:
    frozen = base(device)
    adapters = random_adapters(3, device)
    batch = make_batch(1, device)
    merged = lora.lora_forward(FORWARD, frozen, LORA, merged=True)(adapters, batch, dropout_seed=None)
    unmerged = lora.lora_forward(FORWARD, frozen, LORA, merged=False)(adapters, batch, dropout_seed=None)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert (merged - FORWARD(frozen, batch, dropout_seed=None)).abs().max() > 1e-2


def test_merge_adds_the_scaled_product_and_leaves_the_inputs_alone(device: torch.device) -> None:
    frozen = base(device)
    adapters = random_adapters(4, device)
    before = frozen.clone()
    merged = lora.merge(frozen, adapters, LORA)
    for layer in range(2):
        expected = frozen["blocks", "attn", "q", "weight"][layer] + 2.0 * (
            adapters["attn", "q", "b"][layer] @ adapters["attn", "q", "a"][layer]
        )
        torch.testing.assert_close(merged["blocks", "attn", "q", "weight"][layer], expected)
    assert torch.equal(merged["blocks", "attn", "k", "weight"], frozen["blocks", "attn", "k", "weight"])
    assert (before == frozen).all()
    assert "lora_a" not in frozen["blocks", "attn", "q"]


def test_merging_into_a_dtype_casts_each_weight_as_the_whole_cast_afterwards(device: torch.device) -> None:
    """``merge(..., dtype)`` (GRPO's bf16 sampler) gives the float32 merge cast to bf16, bit for bit, every
    tensor in it, merged or not, without the float32 merge existing whole."""
    frozen, adapters = base(device), random_adapters(6, device)
    expected = lora.merge(frozen, adapters, LORA).to(torch.bfloat16)
    got = lora.merge(frozen, adapters, LORA, torch.bfloat16)
    for key in expected.keys(True, True):
        assert got.get(key).dtype == torch.bfloat16, key
        assert torch.equal(got.get(key), expected.get(key)), key
    # At each weight's merge, the float32 tensors of an adapted weight's shape alive stay as many (the merged
    # weights made so far are bf16).
    shapes = {frozen.get(key).shape for key in frozen.keys(True, True) if key[-1] == "weight"}
    alive: list[int] = []
    real = lora.delta

    def counted(*args: Any) -> torch.Tensor:
        float32 = (o for o in gc.get_objects() if type(o) is torch.Tensor and o.dtype == torch.float32)
        alive.append(sum(o.shape in shapes for o in float32))
        return real(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora, "delta", counted)
        lora.merge(frozen, adapters, LORA, torch.bfloat16)
    assert len(alive) == 5
    assert len(set(alive)) == 1, alive


@pytest.mark.parametrize("merged", [True, False])
def test_gradients_reach_the_adapters_only_and_match_finite_differences(
    device: torch.device, merged: bool
) -> None:
    frozen = base(device)
    adapters = random_adapters(5, device)
    forward = lora.lora_forward(FORWARD, frozen, LORA, merged=merged)
    batch = make_batch(2, device)
    grads, _, _ = step.accumulate_grads(adapters, [batch], forward, [None])
    assert set(grads.keys(True, True)) == set(adapters.keys(True, True))
    assert all(bool(g.abs().sum() > 0) for g in grads.values(True, True))
    # The base's tensors never enter autograd: they are constants of the closure.
    assert not any(t.requires_grad for t in frozen.values(True, True))
    # One directional derivative by central differences (float64), against the gradient's prediction.
    direction = random_adapters(7, device)
    base64, adapters64, direction64 = frozen.double(), adapters.double(), direction.double()
    forward64 = lora.lora_forward(FORWARD, base64, LORA, merged=merged)

    def loss_at(shift: float) -> float:
        logits = forward64(adapters64 + direction64 * shift, batch, dropout_seed=None)
        # Not step.token_losses: it computes in float32, too coarse for a difference quotient.
        return float(F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()))  # type: ignore[union-attr]

    eps = 1e-5
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    products = grads * direction
    analytic = sum(float(products.get(key).sum()) for key in products.keys(True, True))
    assert analytic == pytest.approx(numeric, rel=1e-3)


def test_train_step_over_adapters_lowers_the_loss_and_keeps_the_base(device: torch.device) -> None:
    frozen = base(device)
    adapters = lora.init_adapters(frozen, LORA)
    state = step.init_state(adapters)
    forward = lora.lora_forward(FORWARD, frozen, LORA)
    batch = completion_batch([[1, 2, 3]] * 2, [[7, 8, 9, 10, 11], [12, 13, 14]], device)
    before = frozen.clone()
    config = optim.AdamWConfig(lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(25):
        state, metrics = step.train_step(
            state,
            [batch],
            forward=forward,
            optimizer=config,
            lr=1e-2,
            decay=optim.decay_mask(adapters),
            seed=0,
        )
        losses.append(float(metrics["loss"]))
    assert losses[0] > 3.0
    assert losses[-1] < 0.5 * losses[0]
    assert (before == frozen).all()
    assert set(state["params"].keys(True, True)) == set(adapters.keys(True, True))


def test_a_is_kaiming_uniform_within_one_over_sqrt_d_in_and_follows_the_seed() -> None:
    """PEFT's init of A (``kaiming_uniform_(a=sqrt(5))``: bound 1/sqrt(d_in)); ``lora.seed`` picks it."""
    base = llama.init(CONFIG, seed=0)
    config = lora.LoraConfig(rank=8, targets=("mlp.down",), seed=1)  # d_in 48, d_out 32: which one shows
    a = lora.init_adapters(base, config)["mlp", "down", "a"]
    assert a.shape[-1] == CONFIG.d_ff != CONFIG.d_model
    bound = 1 / math.sqrt(CONFIG.d_ff)
    assert 0.9 * bound < float(a.abs().max()) <= bound
    assert float(a.min()) < -0.9 * bound  # centred: uniform in +-bound
    assert abs(float(a.mean())) < 0.1 * bound
    quarters = torch.histc((a.flatten().double() / bound + 1) / 2, bins=4, min=0, max=1) / a.numel()
    assert (quarters - 0.25).abs().max() < 0.05, quarters  # uniform, not clipped or bent
    other = lora.init_adapters(base, config.model_copy(update={"seed": 2}))["mlp", "down", "a"]
    assert not torch.equal(a, other)


def test_merging_into_a_bfloat16_base_keeps_it_bfloat16() -> None:
    base = llama.init(CONFIG, seed=0).to(torch.bfloat16)
    config = lora.LoraConfig(rank=2, targets=("attn.q",))
    adapters = lora.init_adapters(llama.init(CONFIG, seed=0), config)
    for key in adapters.keys(True, True):  # B starts at zero: make the merge change the weight
        adapters.set(key, torch.randn_like(adapters.get(key)))
    merged = lora.merge(base, adapters, config)
    assert merged["blocks", "attn", "q", "weight"].dtype == torch.bfloat16


def test_the_defaults_are_the_papers_rank_8_alpha_16_on_queries_and_values() -> None:
    """Specs that leave them out rely on them (Hu et al. adapt W_q and W_v)."""
    config = lora.LoraConfig()
    assert (config.rank, config.alpha, config.targets, config.scale) == (8, 16.0, ("attn.q", "attn.v"), 2.0)


def test_a_wildcard_targets_every_matrix_and_no_norm() -> None:
    """``targets: ["*"]`` adapts the seven matrices; a norm's scale ([layers, d_model]) is no matrix, and matched
    it failed unpacking its shape."""
    params = base(torch.device("cpu"))
    assert lora.matrix_names(params) == [
        "attn.k",
        "attn.o",
        "attn.q",
        "attn.v",
        "mlp.down",
        "mlp.gate",
        "mlp.up",
    ]
    adapters = lora.init_adapters(params, lora.LoraConfig(targets=("*",)))
    assert len(list(adapters.keys(True, True))) == 2 * 7


def test_adapters_over_a_bfloat16_base_are_bfloat16_and_run() -> None:
    bf16 = llama.init(CONFIG, seed=0).to(torch.bfloat16)
    adapters = lora.init_adapters(bf16, LORA)
    assert {t.dtype for t in adapters.values(True, True)} == {torch.bfloat16}
    adapted = lora.lora_forward(FORWARD, bf16, LORA)
    logits = adapted(adapters, make_batch(0, torch.device("cpu")), dropout_seed=None)
    assert logits.dtype == torch.bfloat16
