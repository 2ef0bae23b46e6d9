"""Functional AdamW against torch.optim.AdamW; clipping and schedules against their definitions."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from zmaj.models import gpt
from zmaj.train import optim, step
from zmaj.train.muon import MuonConfig

CONFIG = gpt.GPTConfig(vocab_size=40, context=16, d_model=16, n_layers=2, n_heads=2)


@pytest.mark.parametrize(("grad_clip", "norms_and_biases"), [(None, False), (0.5, False), (0.5, True)])
def test_adamw_matches_torch_over_20_steps(
    device: torch.device, grad_clip: float | None, norms_and_biases: bool
) -> None:
    """The whole update a training step ends with (``step.apply_grads``): clipping by the global norm (the
    gradients' norm is about 40, so a clip at 0.5 acts every step), then AdamW with decoupled weight decay on
    the matrices, or on everything with ``decay_norms_and_biases``."""
    params = gpt.init(CONFIG, seed=0, device=device)
    config = optim.AdamWConfig(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=grad_clip)
    decay = optim.decay_mask(params, norms_and_biases)
    keys = list(params.keys(True, True))
    reference = [torch.nn.Parameter(params.get(k).clone()) for k in keys]
    decayed = [bool(decay.get(k).all()) for k in keys]
    assert any(decayed)
    assert all(decayed) == norms_and_biases
    groups = [
        {"params": [p for p, d in zip(reference, decayed, strict=True) if d], "weight_decay": 0.1},
        {"params": [p for p, d in zip(reference, decayed, strict=True) if not d], "weight_decay": 0.0},
    ]
    torch_adamw = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    state = step.init_state(params, config)
    generator = torch.Generator().manual_seed(0)
    for i in range(20):
        lr = 3e-3 * (1 - i / 40)
        grads = params.apply(lambda t: torch.randn(t.shape, generator=generator).to(device))
        assert grads is not None
        state, _ = step.apply_grads(state, grads, config, lr, decay)
        for group in torch_adamw.param_groups:
            group["lr"] = lr
        for k, p in zip(keys, reference, strict=True):
            p.grad = grads.get(k).clone()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(reference, grad_clip)
        torch_adamw.step()
    for k, p in zip(keys, reference, strict=True):
        assert (state["params"].get(k) - p.detach()).abs().max().item() <= 1e-6, k


def test_adamw_at_learning_rate_zero_leaves_the_parameters_as_they_are(device: torch.device) -> None:
    """The step size sits in the update's denominator (``adamw_update``), so lr = 0 divides by zero there: the
    step must come out zero, even where a gradient and its moments are zero, not NaN."""
    params = gpt.init(CONFIG, seed=0, device=device)
    config = optim.AdamWConfig(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_clip=None)
    grads = params.apply(torch.randn_like)
    assert grads is not None
    grads["embed", "weight"][:5] = 0.0  # rows whose moments stay zero
    new, state = optim.adamw_update(
        params, grads, optim.adamw_init(params), config, 0.0, optim.decay_mask(params)
    )
    for key in optim.leaf_keys(params):
        assert torch.equal(new.get(key), params.get(key)), key
    assert int(state["step"]) == 1


def test_decay_mask_counts_rank_without_the_layer_axis(device: torch.device) -> None:
    decay = optim.decay_mask(gpt.init(CONFIG, seed=0, device=device))
    assert (decay["embed", "weight"] == 1.0).all()
    assert (decay["blocks", "attn", "q", "weight"] == 1.0).all()
    assert (decay["blocks", "attn", "q", "bias"] == 0.0).all()  # [n_layers, d] is a stack of vectors
    assert (decay["blocks", "attn_norm", "weight"] == 0.0).all()
    assert (decay["final_norm", "weight"] == 0.0).all()


@given(st.floats(0.01, 10.0), st.integers(0, 2**16))
def test_clipping_matches_torch(device: torch.device, max_norm: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    grads = TensorDict(
        {"a": torch.randn(5, 3, generator=generator), "b": {"c": torch.randn(7, generator=generator)}}
    ).to(device)
    norm = optim.global_norm(grads)
    clipped = optim.clip_by_global_norm(grads, max_norm, norm)
    tensors = [grads["a"].clone(), grads["b", "c"].clone()]
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors]
    for p, t in zip(params, tensors, strict=True):
        p.grad = t
    expected_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    torch.testing.assert_close(norm, expected_norm)
    torch.testing.assert_close(clipped["a"], params[0].grad)
    torch.testing.assert_close(clipped["b", "c"], params[1].grad)


def test_cosine_schedule_closed_form() -> None:
    schedule = optim.ScheduleConfig(kind="cosine", warmup_steps=10, final_lr_fraction=0.1)
    assert optim.learning_rate(0, 110, 1.0, schedule) == pytest.approx(0.1)
    assert optim.learning_rate(9, 110, 1.0, schedule) == pytest.approx(1.0)
    assert optim.learning_rate(10, 110, 1.0, schedule) == pytest.approx(1.0)
    assert optim.learning_rate(60, 110, 1.0, schedule) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert optim.learning_rate(110, 110, 1.0, schedule) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_linear() -> None:
    schedule = optim.ScheduleConfig(kind="wsd", warmup_steps=10, decay_fraction=0.2, final_lr_fraction=0.0)
    assert [optim.learning_rate(s, 100, 1.0, schedule) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert optim.learning_rate(90, 100, 1.0, schedule) == pytest.approx(0.5)
    assert optim.learning_rate(100, 100, 1.0, schedule) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("fraction", "steps", "decaying"),
    [(0.7, 90, 63), (0.2, 100, 20), (0.4, 41, 16), (0.5, 5, 2), (0.4, 2, 1), (0.4, 1, 1), (0.1, 5, 1)],
)
def test_wsd_decays_over_the_whole_steps_of_the_fraction(fraction: float, steps: int, decaying: int) -> None:
    """The rate falls below the peak on the decay's steps but the first (modded-nanogpt's convention), to 1/decay
    of it on the last: 0.7 of 90 steps is 63 of them, though 0.7 * 90 is 62.99999999999999 in floats; a run too
    short for the fraction to make a whole step has a decay of one step, at the peak."""
    schedule = optim.ScheduleConfig(
        kind="wsd", warmup_steps=0, decay_fraction=fraction, final_lr_fraction=0.0
    )
    rates = [optim.learning_rate(step, steps, 1.0, schedule) for step in range(steps)]
    assert sum(rate < 1.0 for rate in rates) == decaying - 1
    assert rates[-1] == pytest.approx(1 / decaying)


@pytest.mark.parametrize(
    ("kind", "warmup", "steps", "warned"),
    [
        ("cosine", 25, 24, True),  # the last step runs at 24/25 of the peak
        ("cosine", 25, 25, False),
        ("constant", 3, 2, True),
        ("wsd", 25, 175, False),  # the default: decay from step 105
        (
            "wsd",
            25,
            41,
            False,
        ),  # decay from step 25 (41 - 16, the whole steps of 0.4 * 41), where warmup ends
        ("wsd", 25, 40, False),  # decay from step 24: step 25 is 1/16 of the way down, the decay's slope
        ("wsd", 25, 35, True),  # decay from step 21: step 25 drops from the peak to 4/14 of the way down
    ],
)
def test_schedule_warning_names_a_missed_peak_or_a_jump(
    kind: str, warmup: int, steps: int, warned: bool
) -> None:
    schedule = optim.ScheduleConfig(kind=kind, warmup_steps=warmup, decay_fraction=0.4)
    rates = [optim.learning_rate(step, steps, 1.0, schedule) for step in range(steps)]
    peaked = max(rates) == pytest.approx(1.0)
    steepest = max(a - b for a, b in itertools.pairwise(rates))
    smooth = (
        kind != "wsd" or steepest <= 0.9 / optim.decay_steps(steps, 0.4) + 1e-9
    )  # 0.9: down to the default 0.1
    assert (optim.schedule_warning(steps, schedule) is not None) == warned == (not (peaked and smooth))


@pytest.mark.parametrize("muon", [False, True])
def test_a_pure_update_leaves_its_inputs_as_they_were(muon: bool) -> None:
    """Without ``donate`` the parameters, the optimizer state and the gradients are the caller's still: only a
    donated update may write into them (the denominator goes into a donated gradient, not into a kept one). No
    clipping: a clip makes new gradients."""
    params = gpt.init(CONFIG, seed=0)
    optimizer = (
        MuonConfig(kind="muon", ns_dtype="float32", grad_clip=None)
        if muon
        else optim.AdamWConfig(lr=1e-2, weight_decay=0.1, grad_clip=None)
    )
    state = step.init_state(params, optimizer)
    generator = torch.Generator().manual_seed(0)
    grads = params.apply(lambda t: torch.randn(t.shape, generator=generator))
    assert grads is not None
    state, _ = step.apply_grads(
        state, grads.clone(), optimizer, 1e-2, optim.decay_mask(params)
    )  # moments != 0
    state_before, grads_before = state.clone(), grads.clone()
    step.apply_grads(state, grads, optimizer, 1e-2, optim.decay_mask(params))
    assert (state == state_before).all()
    assert (grads == grads_before).all()
