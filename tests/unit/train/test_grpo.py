"""GRPO: group advantages, the clipped objective against a naive loop, the first pass is the plain policy gradient,
k3 vanishes at the reference, and a tiny model learns a trivial task."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDictBase

from tests.integration import finetune_fixtures
from zmaj.infer.generate import Sampling
from zmaj.models import llama
from zmaj.tasks import Reward, get_task
from zmaj.train import grpo, optim, step
from zmaj.train.logprobs import masked_token_logprobs, token_logprobs

VOCAB = 16
TARGET = 3
CONFIG = llama.LlamaConfig(
    vocab_size=VOCAB, context=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1
)
FORWARD = step.bind(llama.forward, config=CONFIG)
PROMPTS = [[1, 2], [5], [7, 8, 9], [11, 4]]


def fraction_of_target(prompt_index: int, completion: list[int]) -> float:
    return sum(token == TARGET for token in completion) / max(len(completion), 1)


def rollout(
    params: TensorDictBase,
    config: grpo.GRPOConfig,
    seed: int,
    reward: grpo.Reward = fraction_of_target,
    **kwargs: object,
) -> grpo.Rollout:
    return grpo.sample_rollout(
        params,
        PROMPTS,
        reward,
        forward=FORWARD,
        step=llama.cached(CONFIG),
        cache_shape=CONFIG,
        config=config,
        seed=seed,
        **kwargs,  # type: ignore[arg-type]
    )


GRPO = grpo.GRPOConfig(group_size=6, max_new_tokens=6, stop_tokens=(0,), sampling=Sampling(temperature=1.0))
STEP_LR = 1e-2  # the step size of the tests that compare two ways of taking one step


@given(
    rewards=st.lists(
        st.lists(st.floats(-10, 10, allow_subnormal=False), min_size=4, max_size=4), min_size=1, max_size=5
    )
)
def test_advantages_have_zero_mean_and_unit_spread_per_group(
    device: torch.device, rewards: list[list[float]]
) -> None:
    r = torch.tensor(rewards, dtype=torch.float64, device=device)
    advantages = grpo.group_advantages(r, eps=1e-8)
    zeros = torch.zeros(len(rewards), dtype=torch.float64, device=device)
    torch.testing.assert_close(advantages.mean(-1), zeros, atol=1e-6, rtol=0)
    for row, group in zip(advantages, rewards, strict=True):
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / len(group))
        if std > 1e-3:
            assert float(row.std(correction=0)) == pytest.approx(1.0, abs=1e-4)
        for a, x in zip(row.tolist(), group, strict=True):
            assert a == pytest.approx((x - mean) / (std + 1e-8), abs=1e-6)


def naive_loss(
    logprobs: torch.Tensor,
    old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float,
    eps_high: float,
    beta: float,
    ref: torch.Tensor,
) -> float:
    """Eq. 3 with token-level normalisation, one token at a time in Python floats; the upper clip bound is
    ``1 + eps_high`` (DAPO's clip-higher; ``eps_high = eps`` is GRPO's symmetric clip)."""
    total, count = 0.0, 0
    for b in range(logprobs.shape[0]):
        a = float(advantages[b])
        for t in range(logprobs.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(float(logprobs[b, t]) - float(old[b, t]))
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            kl = (
                math.exp(float(ref[b, t]) - float(logprobs[b, t]))
                - (float(ref[b, t]) - float(logprobs[b, t]))
                - 1
            )
            total += -min(ratio * a, clipped * a) + beta * kl
            count += 1
    return total / max(count, 1)


@given(
    seed=st.integers(0, 2**31),
    beta=st.sampled_from([0.0, 0.04, 0.5]),
    eps=st.sampled_from([0.1, 0.2]),
    eps_high=st.sampled_from([None, 0.28]),
)
def test_the_clipped_objective_matches_a_naive_loop(
    device: torch.device, seed: int, beta: float, eps: float, eps_high: float | None
) -> None:
    generator = torch.Generator().manual_seed(seed)
    shape = (3, 5)
    old = -torch.rand(shape, generator=generator, dtype=torch.float64) * 3
    # Ratios spread well past both clip bounds.
    logprobs = old + torch.randn(shape, generator=generator, dtype=torch.float64) * 0.4
    ref = old + torch.randn(shape, generator=generator, dtype=torch.float64) * 0.3
    advantages = torch.randn(3, generator=generator, dtype=torch.float64)
    mask = torch.rand(shape, generator=generator) > 0.3
    old, logprobs, ref, advantages, mask = (t.to(device) for t in (old, logprobs, ref, advantages, mask))
    loss, metrics = grpo.grpo_loss(logprobs, old, advantages, mask, eps, eps_high, beta, ref)
    high = eps if eps_high is None else eps_high
    assert float(loss) == pytest.approx(
        naive_loss(logprobs, old, advantages, mask, eps, high, beta, ref), abs=1e-10
    )
    ratio = (logprobs - old).exp()
    active = ((ratio > 1 + high) & (advantages[:, None] > 0)) | (
        (ratio < 1 - eps) & (advantages[:, None] < 0)
    )
    assert float(metrics["clip_fraction"]) == pytest.approx(
        float((active & mask).sum()) / max(int(mask.sum()), 1)
    )


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_the_first_pass_gradient_is_the_plain_policy_gradient(
    device: torch.device, temperature: float
) -> None:
    """Of the sampling distribution softmax(logits / temperature), whatever the temperature."""
    params = llama.init(CONFIG, seed=0, device=device)
    config = GRPO.model_copy(update={"kl_beta": 0.1, "sampling": Sampling(temperature=temperature)})
    sampled = rollout(params, config, seed=1, reference=params)
    assert sampled.batch.loss_mask is not None
    assert sampled.batch.targets is not None
    grads, (loss, metrics) = torch.func.grad_and_value(grpo.rollout_loss, has_aux=True)(
        params, sampled, FORWARD, config
    )
    # Explicitly: -(1/T) sum over completion tokens of A_i * grad log pi(y_t), one backward pass per token.
    mask, targets = sampled.batch.loss_mask, sampled.batch.targets
    n_tokens = int(mask.sum())
    expected = params.clone().zero_()
    for b, t in mask.nonzero().tolist():

        def logprob(p: TensorDictBase, b: int = b, t: int = t) -> torch.Tensor:
            logits = FORWARD(p, sampled.batch, dropout_seed=None) / temperature
            return token_logprobs(logits, targets)[b, t]

        expected = expected - torch.func.grad(logprob)(params) * (float(sampled.advantages[b]) / n_tokens)
    assert float(metrics["clip_fraction"]) == 0.0
    assert float(metrics["kl"]) == 0.0  # policy == reference: k3 is exactly zero, and so is its gradient
    for key in expected.keys(True, True):
        torch.testing.assert_close(grads.get(key), expected.get(key), atol=1e-6, rtol=1e-4)
    # The surrogate's value at ratio one is -(1/T) sum A_i, i.e. minus the length-weighted mean advantage.
    lengths = mask.sum(-1).double()
    assert float(loss) == pytest.approx(
        float(-(sampled.advantages.double() * lengths).sum() / n_tokens), abs=1e-6
    )


def test_kl_is_zero_at_the_reference_and_positive_away_from_it(device: torch.device) -> None:
    params = llama.init(CONFIG, seed=0, device=device)
    other = llama.init(CONFIG, seed=1, device=device)
    config = GRPO.model_copy(update={"kl_beta": 0.5})
    at_reference = rollout(params, config, seed=2, reference=params)
    assert torch.equal(at_reference.reference_logprobs, at_reference.old_logprobs)  # type: ignore[arg-type]
    _, metrics = grpo.rollout_loss(params, at_reference, FORWARD, config)
    assert float(metrics["kl"]) == 0.0
    away = rollout(params, config, seed=2, reference=other)
    _, metrics = grpo.rollout_loss(params, away, FORWARD, config)
    assert float(metrics["kl"]) > 1e-3


def test_a_kl_penalty_without_a_reference_is_an_error() -> None:
    with pytest.raises(ValueError, match="reference"):
        rollout(llama.init(CONFIG, seed=0), GRPO.model_copy(update={"kl_beta": 0.1}), seed=0)


def test_each_completion_is_scored_against_its_own_prompt(device: torch.device) -> None:
    """The reward takes the prompt's index (a task checks the answer against that problem): a completion scored
    against another prompt's would make rewards noise, which a reward ignoring the index cannot show."""
    seen: list[int] = []

    def reward(prompt_index: int, completion: list[int]) -> float:
        seen.append(prompt_index)
        return fraction_of_target(prompt_index, completion)

    params = llama.init(CONFIG, seed=0, device=device)
    every = GRPO.model_copy(update={"skip_uniform_groups": False})
    rollout(params, every, 5, reward)
    assert seen == [index // every.group_size for index in range(len(PROMPTS) * every.group_size)]


def test_rollouts_are_seeded_and_laid_out_prompt_major(device: torch.device) -> None:
    params = llama.init(CONFIG, seed=0, device=device)
    every = GRPO.model_copy(update={"skip_uniform_groups": False})
    first, again = rollout(params, every, seed=5), rollout(params, every, seed=5)
    assert first.completions == again.completions
    assert first.completions != rollout(params, every, seed=6).completions
    assert bool(first.kept.all())
    assert first.rewards.shape == (4, 6)
    assert first.batch.tokens.shape[0] == 24
    for row, completion in enumerate(first.completions):
        prompt = PROMPTS[row // 6]
        assert first.batch.tokens[row, : len(prompt)].tolist() == prompt
        assert float(first.rewards[row // 6, row % 6]) == pytest.approx(
            fraction_of_target(row // 6, completion)
        )
        assert first.batch.loss_mask is not None
        assert int(first.batch.loss_mask[row].sum()) == len(completion)
        assert 1 <= len(completion) <= 6
        assert all(token != 0 for token in completion[:-1])  # generation stopped at the stop token


def test_a_tiny_model_learns_to_say_three(device: torch.device) -> None:
    params = llama.init(CONFIG, seed=0, device=device)
    state = step.init_state(params)
    adamw = optim.AdamWConfig(lr=2e-2, weight_decay=0.0)
    decay = optim.decay_mask(params)
    rewards = []
    for iteration in range(15):
        sampled = rollout(state["params"], GRPO, seed=iteration)
        for _ in range(2):  # mu = 2 passes over each rollout
            state, metrics = grpo.grpo_step(
                state, sampled, forward=FORWARD, config=GRPO, optimizer=adamw, lr=2e-2, decay=decay
            )
        rewards.append(float(metrics["reward"]))
    assert sum(rewards[:2]) / 2 < 0.2  # about 1/16 at random
    assert sum(rewards[-3:]) / 3 > 0.8


def assert_same_step(
    expected: tuple[TensorDictBase, step.Metrics], actual: tuple[TensorDictBase, step.Metrics]
) -> None:
    """Two GRPO steps agree: every metric and the optimizer's moments (the gradient) to float32 rounding.

    The parameters get a looser bound, a thousandth of the step size: Adam's first step moves each one by
    lr * g / (|g| + eps), so a gradient entry near eps turns float32 rounding in g into a visible share of lr
    (5e-6 of lr 1e-2 on one of 2048 entries, seen on an AVX2-only CPU).
    """
    (state_a, metrics_a), (state_b, metrics_b) = expected, actual
    for name in metrics_a:
        torch.testing.assert_close(metrics_b[name], metrics_a[name], atol=1e-6, rtol=1e-5)
    for key in state_a.keys(True, True):
        atol = 1e-3 * STEP_LR if key[0] == "params" else 1e-6
        torch.testing.assert_close(state_b.get(key), state_a.get(key), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("micro_batch", [1, 5])
def test_micro_batches_give_the_full_batch_step(device: torch.device, micro_batch: int) -> None:
    """Scoring and differentiating a rollout a few rows at a time changes nothing but the memory it needs."""
    params = llama.init(CONFIG, seed=0, device=device)
    other = llama.init(CONFIG, seed=1, device=device)
    whole = GRPO.model_copy(update={"kl_beta": 0.1, "micro_batch": 1000})
    split = whole.model_copy(update={"micro_batch": micro_batch})
    full, chunked = (rollout(params, c, seed=3, reference=other) for c in (whole, split))
    assert full.completions == chunked.completions
    torch.testing.assert_close(chunked.old_logprobs, full.old_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked.reference_logprobs, full.reference_logprobs, atol=1e-6, rtol=0)
    adamw = optim.AdamWConfig(lr=STEP_LR, weight_decay=0.0)
    decay = optim.decay_mask(params)
    results = [
        grpo.grpo_step(
            step.init_state(params), r, forward=FORWARD, config=c, optimizer=adamw, lr=STEP_LR, decay=decay
        )
        for r, c in ((full, whole), (chunked, split))
    ]
    assert_same_step(*results)


def test_uniform_groups_are_left_out_and_the_rest_keep_their_gradient(device: torch.device) -> None:
    """Dropping zero-advantage groups only rescales the gradient: by all completion tokens over the kept ones."""
    params = llama.init(CONFIG, seed=0, device=device)
    every = GRPO.model_copy(update={"skip_uniform_groups": False})

    def uniform_groups(r: grpo.Rollout) -> torch.Tensor:
        return r.rewards.amax(-1) == r.rewards.amin(-1)

    # The first seed whose rollout has both kinds of group: something to leave out and something to keep.
    seed, full = next(
        (s, r)
        for s in range(50)
        if 0 < int(uniform_groups(r := rollout(params, every, s)).sum()) < len(PROMPTS)
    )
    kept = rollout(params, GRPO, seed=seed)
    uniform = uniform_groups(full)
    assert torch.equal(kept.kept, ~uniform)
    assert torch.equal(kept.rewards, full.rewards)
    rows = [row for row in range(len(full.completions)) if kept.kept[row // GRPO.group_size]]
    assert kept.batch.tokens.shape[0] == len(rows)
    width = kept.batch.tokens.shape[1]
    assert torch.equal(kept.batch.tokens, full.batch.tokens[rows, :width])
    torch.testing.assert_close(kept.advantages, full.advantages[rows])
    assert full.batch.loss_mask is not None
    assert kept.batch.loss_mask is not None
    scale = float(full.batch.loss_mask.sum()) / float(kept.batch.loss_mask.sum())
    grad_full = torch.func.grad(lambda p: grpo.rollout_loss(p, full, FORWARD, every)[0])(params)
    grad_kept = torch.func.grad(lambda p: grpo.rollout_loss(p, kept, FORWARD, GRPO)[0])(params)
    for key in grad_full.keys(True, True):
        torch.testing.assert_close(grad_kept.get(key), grad_full.get(key) * scale, atol=1e-6, rtol=1e-4)


def test_a_single_pass_needs_no_old_logprobs(device: torch.device) -> None:
    """Without the old log-probs' forward, the first pass takes the same step: the ratio is one either way."""
    params = llama.init(CONFIG, seed=0, device=device)
    adamw = optim.AdamWConfig(lr=STEP_LR, weight_decay=0.0)
    decay = optim.decay_mask(params)
    scored, unscored = (rollout(params, GRPO, seed=3, score_old=old) for old in (True, False))
    assert unscored.old_logprobs is None
    first, second = (
        grpo.grpo_step(
            step.init_state(params), r, forward=FORWARD, config=GRPO, optimizer=adamw, lr=STEP_LR, decay=decay
        )
        for r in (scored, unscored)
    )
    assert float(second[1]["grad_norm"]) > 0
    assert_same_step(first, second)


def test_a_rollout_with_no_informative_group_steps_on_zero_gradients(device: torch.device) -> None:
    params = llama.init(CONFIG, seed=0, device=device)
    sampled = grpo.sample_rollout(
        params,
        PROMPTS,
        lambda index, completion: 1.0,
        forward=FORWARD,
        step=llama.cached(CONFIG),
        cache_shape=CONFIG,
        config=GRPO,
        seed=0,
    )
    assert not bool(sampled.kept.any())
    assert sampled.batch.tokens.shape[0] == 0
    adamw = optim.AdamWConfig(lr=1e-2, weight_decay=0.0)
    state, metrics = grpo.grpo_step(
        step.init_state(params),
        sampled,
        forward=FORWARD,
        config=GRPO,
        optimizer=adamw,
        lr=1e-2,
        decay=optim.decay_mask(params),
    )
    assert float(metrics["grad_norm"]) == 0.0
    assert float(metrics["loss"]) == 0.0
    assert float(metrics["reward"]) == 1.0
    assert float(metrics["kept_groups"]) == 0.0
    for key in params.keys(True, True):
        assert torch.equal(state["params"].get(key), params.get(key))  # zero moments: AdamW moves nothing


def test_the_sampler_generates_and_params_score(device: torch.device) -> None:
    """A bfloat16 copy (here of another model, to tell them apart) samples; ``params`` gives the log-probs."""
    params = llama.init(CONFIG, seed=0, device=device)
    other = llama.init(CONFIG, seed=1, device=device).to(torch.bfloat16)
    sampled = rollout(params, GRPO, seed=3, sampler=other)
    assert sampled.completions == rollout(other, GRPO, seed=3).completions
    assert sampled.old_logprobs is not None
    logits = FORWARD(params, sampled.batch, dropout_seed=None) / GRPO.sampling.temperature
    torch.testing.assert_close(sampled.old_logprobs, masked_token_logprobs(logits, sampled.batch))


def test_a_group_of_one_is_refused() -> None:
    """A lone completion is its group's mean, so its advantage is zero: such a run would never learn."""
    with pytest.raises(ValueError, match="group_size"):
        grpo.GRPOConfig(group_size=1)


@pytest.mark.parametrize("eps", [1e-4, 0.5])
def test_group_advantages_are_the_closed_form_with_eps_beside_the_standard_deviation(eps: float) -> None:
    """(r - mean) / (std + eps), std without Bessel's correction (DeepSeekMath; TRL's sample std differs), where
    ``sqrt(var + eps)`` passed the property test's groups."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    for row, group in zip(grpo.group_advantages(rewards, eps), rewards.tolist(), strict=True):
        mean = sum(group) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 4)
        assert row.tolist() == pytest.approx([(x - mean) / (std + eps) for x in group], rel=1e-12)


def test_a_rollout_normalises_advantages_with_the_configured_eps() -> None:
    config = GRPO.model_copy(update={"advantage_eps": 0.5, "skip_uniform_groups": False})
    sampled = rollout(llama.init(CONFIG, seed=0), config, seed=3)
    torch.testing.assert_close(sampled.advantages, grpo.group_advantages(sampled.rewards, 0.5).flatten())


def test_the_task_reward_reads_an_answer_cut_by_the_token_limit_without_its_last_line() -> None:
    tokenizer = finetune_fixtures.tokenizer()
    task = get_task("arithmetic", digits=1)
    problems = task.problems("train", 1)
    (stop, *_) = tokenizer.stop_ids
    ids = tokenizer.encode(f"Answer: {problems[0].answer}", add_special_tokens=False)
    scored: list[Reward] = []
    reward = grpo.task_reward(task, tokenizer, problems, "step 1", scored, {stop})
    assert reward(0, [*ids, stop]) == pytest.approx(1.1)
    assert reward(0, ids) == 0.0
    assert scored == [Reward(1.0, 1.0), Reward(0.0, 0.0)]
