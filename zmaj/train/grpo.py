"""GRPO: policy-gradient fine-tuning with a group of samples per prompt as the baseline instead of a value model.

Shao et al. (2024, "DeepSeekMath", arXiv:2402.03300, section 4.1, eq. 3) sample G completions per prompt from
the current policy, score each with a reward, and give every token of completion i the advantage
``A_i = (r_i - mean(r)) / std(r)`` over its group: better than its siblings is pushed up, worse is pushed down,
and no learned critic is needed. The update is PPO's clipped surrogate (Schulman et al., 2017,
arXiv:1707.06347, eq. 7) per token,

    min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i),    rho_t = pi(y_t | ...) / pi_old(y_t | ...),

where ``pi_old`` is the policy that sampled the batch, so the same rollouts can serve several passes (mu in the
paper) without the policy running away from them. An optional penalty ``beta * KL(pi || pi_ref)`` keeps it near
a reference, with the per-token estimator k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman, 2020,
"Approximating KL Divergence"): unbiased, and never negative. DeepSeek-R1 (arXiv:2501.12948) trains this way
with rule-based rewards.

One departure from eq. 3: the loss is summed over every completion token of the batch and divided by their
count, not averaged per completion first, as DAPO recommends (Yu et al., 2025, arXiv:2503.14476, eq. 12):
long completions then weigh by their length instead of being diluted. ``clip_eps_high`` is DAPO's
"clip-higher" (eq. 10), a wider upper bound that leaves unlikely tokens room to grow.

A rollout is scored and differentiated ``micro_batch`` rows at a time: its logits (rows x length x vocab, 1.3 GB
in float32 for 64 answers of 100 tokens over SmolLM2's 49k vocabulary, several copies alive in the backward) are
what fills memory. The loss is a sum over tokens divided by the whole rollout's count, so the micro-batches'
gradients add up to exactly the full batch's.
"""

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields, replace

import torch
from jaxtyping import Bool, Float
from pydantic import BaseModel, ConfigDict, Field
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj import tasks
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.infer.cache import CacheShape, init_cache
from zmaj.infer.generate import CachedForward, Sampling, generate
from zmaj.models.common import Batch, Forward, LazyForward
from zmaj.train.logprobs import completion_batch, masked_token_logprobs
from zmaj.train.muon import OptimizerConfig
from zmaj.train.parallel import SINGLE, Parallel
from zmaj.train.step import Metrics, apply_grads, grad_and_value, sum_grads

Reward = Callable[[int, list[int]], float]
"""``reward(prompt_index, completion_tokens) -> float``: the task's score of one completion."""


class TaskRewardError(ValueError):
    """The task's checker failed on a sample; the message names it."""


def task_reward(
    task: tasks.Task,
    tokenizer: ModelTokenizer,
    problems: Sequence[tasks.Problem],
    where: str,
    scored: list[tasks.Reward],
    stop_tokens: Collection[int],
) -> Reward:
    """A task's checker as ``sample_rollout``'s reward: its total on the decoded answer, each result also kept
    in ``scored``; a checker that raises or returns a non-finite score stops the run, naming the sample. An
    answer that ends at none of ``stop_tokens`` ran into ``max_new_tokens`` (``Task.reward``'s ``stopped``)."""

    def reward(index: int, completion: list[int]) -> float:
        stopped = bool(completion) and completion[-1] in stop_tokens
        try:
            (result,) = tasks.score(task.reward, [problems[index]], [tokenizer.decode(completion)], [stopped])
        except (RuntimeError, TypeError, ValueError) as error:
            sample = f"{where}, completion {len(scored)} (of prompt {index} in the rollout)"
            raise TaskRewardError(f"{sample}: {error}") from error
        scored.append(result)
        return result.total

    return reward


class GRPOConfig(BaseModel):
    """How rollouts are sampled and how the clipped, KL-penalised objective reads them."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    group_size: int = Field(
        8,
        ge=2,
        description="G: completions sampled per prompt; an advantage is relative to the group's others",
    )
    max_new_tokens: int = Field(256, gt=0)
    sampling: Sampling = Sampling(temperature=1.0)
    stop_tokens: tuple[int, ...] = ()
    clip_eps: float = Field(0.2, gt=0, lt=1)
    clip_eps_high: float | None = Field(None, gt=0, description="DAPO's clip-higher; clip_eps when unset")
    kl_beta: float = Field(
        0.0, ge=0, description="weight of the KL penalty; DeepSeekMath 0.04, DAPO drops it"
    )
    advantage_eps: float = Field(
        1e-4, gt=0, description="added to the group std, so equal rewards give A = 0"
    )
    micro_batch: int = Field(
        16,
        gt=0,
        description="rollout rows per forward when scoring and differentiating; gradients accumulate over them",
    )
    skip_uniform_groups: bool = Field(
        True,
        description="leave groups whose rewards are all equal (A = 0) out of the loss, as DAPO's dynamic sampling",
    )


@dataclass(frozen=True)
class Rollout:
    """Sampled completions laid out for training, and what the objective needs of the sampling policy.

    ``completions`` and ``rewards`` hold every sample, prompt-major (completion ``p * G + g`` is prompt ``p``'s
    ``g``-th). The training rows (``batch``, ``advantages`` and the log-probs) are those of the ``kept`` prompts
    only, in the same order. ``old_logprobs`` and ``reference_logprobs`` are per target token, zero outside
    ``batch.loss_mask``; ``old_logprobs`` is None when the rollout trains a single pass (see
    :func:`sample_rollout`).
    """

    batch: Batch
    completions: list[list[int]]
    rewards: Float[Tensor, "prompts group"]
    kept: Bool[Tensor, " prompts"]
    advantages: Float[Tensor, " batch"]
    old_logprobs: Float[Tensor, "batch seq"] | None
    reference_logprobs: Float[Tensor, "batch seq"] | None


def group_advantages(
    rewards: Float[Tensor, "prompts group"], eps: float = 1e-4
) -> Float[Tensor, "prompts group"]:
    """Each reward standardised within its prompt's group (DeepSeekMath section 4.1.2, outcome supervision).

    The population std (no Bessel correction), which a group of one has too (the sample std's is nan); equal
    rewards give A = 0 either way, through ``eps``. (TRL uses the sample std; the two differ by
    sqrt(G / (G - 1)), a rescaling of the step.)
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, correction=0)
    return (rewards - mean) / (std + eps)


def kl_k3(
    logprobs: Float[Tensor, "batch seq"], reference_logprobs: Float[Tensor, "batch seq"]
) -> Float[Tensor, "batch seq"]:
    """Schulman's k3 estimate of KL(pi || pi_ref) from one sample: r - log r - 1 with r = pi_ref / pi; >= 0."""
    log_ratio = reference_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logprobs: Float[Tensor, "batch seq"],
    old_logprobs: Float[Tensor, "batch seq"],
    advantages: Float[Tensor, " batch"],
    loss_mask: Bool[Tensor, "batch seq"],
    clip_eps: float,
    clip_eps_high: float | None = None,
    kl_beta: float = 0.0,
    reference_logprobs: Float[Tensor, "batch seq"] | None = None,
    n_tokens: Tensor | None = None,
) -> tuple[Float[Tensor, ""], Metrics]:
    """Minus the clipped surrogate (plus ``kl_beta`` times k3), summed over completion tokens / their count.

    ``clip_fraction`` is the share of tokens whose ratio left the trust region in the direction the advantage
    pushes, so that the clip zeroes their gradient. ``kl`` is reported whenever reference log-probs are given.
    ``n_tokens`` (default: this batch's completion tokens) is the divisor; a micro-batch passes the whole
    rollout's count, so that its loss and metrics are its share of the rollout's and sum to them.
    """
    if kl_beta > 0 and reference_logprobs is None:
        raise ValueError("kl_beta > 0 needs reference_logprobs")
    if n_tokens is None:
        n_tokens = loss_mask.sum().clamp(min=1)
    advantage = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    low, high = 1 - clip_eps, 1 + (clip_eps if clip_eps_high is None else clip_eps_high)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(low, high) * advantage)
    per_token = -surrogate
    metrics: Metrics = {}
    if reference_logprobs is not None:
        kl = kl_k3(logprobs, reference_logprobs)
        per_token = per_token + kl_beta * kl
        metrics["kl"] = torch.where(loss_mask, kl, 0.0).sum().detach() / n_tokens
    loss = torch.where(loss_mask, per_token, 0.0).sum() / n_tokens
    clipped = ((ratio > high) & (advantage > 0)) | ((ratio < low) & (advantage < 0))
    metrics["loss"] = loss.detach()
    metrics["clip_fraction"] = (clipped & loss_mask).sum() / n_tokens
    return loss, metrics


@torch.no_grad()
def sample_rollout(
    params: TensorDictBase,
    prompts: Sequence[Sequence[int]],
    reward: Reward,
    *,
    forward: Forward | LazyForward,
    step: CachedForward,
    cache_shape: CacheShape,
    config: GRPOConfig,
    seed: int,
    reference: TensorDictBase | None = None,
    reference_forward: Forward | LazyForward | None = None,
    score_old: bool = True,
    sampler: TensorDictBase | None = None,
) -> Rollout:
    """Sample ``group_size`` completions per prompt with the KV cache, score them, and record old log-probs.

    Each prompt is prefilled once and its cache branched into its group (``generate(..., copies=group_size)``).

    ``step`` is the model's cached forward (``llama.cached(config)``) and ``cache_shape`` its config. The old
    log-probs come from a full forward of ``forward`` over prompt + completion, the function the training pass
    runs, so a first pass sees a ratio of one to float32 rounding (without gradients the q/k/v and gate/up
    products run apart, ``zmaj.nn.layers.fused_linear``). That forward is only needed for a second
    pass: with ``score_old=False`` (one pass per rollout) the loss takes the current log-probs, detached, as the
    old ones, the same values, and saves a forward over the rollout (TRL's GRPO trainer does the same). Every
    log-prob is that of the sampling distribution, ``softmax(logits / temperature)``, as in TRL: the ratio and
    the KL then compare the policy that actually sampled. ``reference`` (under ``reference_forward``, default
    ``forward``) gives the KL penalty's log-probs; it is required when ``config.kl_beta > 0``. ``sampler``
    (default ``params``) is what ``step`` generates with, e.g. a bfloat16 copy of ``params`` when ``forward``
    runs under bfloat16 autocast: the same matmul precision, at half the bytes per decode step.

    With ``config.skip_uniform_groups``, a prompt whose samples all earned the same reward gets no training
    rows: its advantages are zero, so it would only cost compute and, through the token-count divisor, shrink
    the other prompts' step (DAPO, eq. 11, which also resamples to refill the batch; here the batch just
    shrinks). With a KL penalty this also drops those rows' KL term.
    """
    if config.kl_beta > 0 and reference is None:
        raise ValueError("config.kl_beta > 0 needs a reference model")
    group = config.group_size
    rows = [list(prompt) for prompt in prompts for _ in range(group)]
    device = params.device if params.device is not None else "cpu"
    sampler = params if sampler is None else sampler
    dtype = next(t.dtype for t in sampler.values(True, True) if t.is_floating_point())
    longest = max(len(prompt) for prompt in prompts)
    cache = init_cache(cache_shape, len(prompts), longest + config.max_new_tokens, dtype, device)
    completions = generate(
        step,
        sampler,
        cache,
        prompts,
        config.max_new_tokens,
        config.sampling,
        seed,
        config.stop_tokens,
        copies=group,
        donate=True,
    )
    rewards = torch.tensor(
        [reward(index // group, completion) for index, completion in enumerate(completions)],
        dtype=torch.float32,
        device=device,
    ).view(len(prompts), group)
    spread = rewards.amax(-1) > rewards.amin(-1)
    kept = spread if config.skip_uniform_groups else torch.ones_like(spread)
    kept_groups = kept.tolist()  # one read from the device, not one per row
    train_rows = [index for index in range(len(rows)) if kept_groups[index // group]]
    batch = completion_batch([rows[i] for i in train_rows], [completions[i] for i in train_rows], device)
    temperature = config.sampling.temperature

    def logprobs(model: TensorDictBase, model_forward: Forward | LazyForward) -> Float[Tensor, "batch seq"]:
        scored = torch.zeros(batch.tokens.shape, device=device)
        for chunk in micro_batches(len(train_rows), config.micro_batch):
            micro = take_rows(batch, chunk)
            logits = model_forward(model, micro, dropout_seed=None)
            scored[chunk, : micro.tokens.shape[1]] = masked_token_logprobs(logits, micro, temperature)
        return scored

    return Rollout(
        batch=batch,
        completions=completions,
        rewards=rewards,
        kept=kept,
        advantages=group_advantages(rewards, config.advantage_eps)[kept].flatten(),
        old_logprobs=logprobs(params, forward) if score_old else None,
        reference_logprobs=None if reference is None else logprobs(reference, reference_forward or forward),
    )


def micro_batches(rows: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows (the last may be shorter)."""
    return [slice(start, start + size) for start in range(0, rows, size)]


def take_rows(batch: Batch, rows: slice) -> Batch:
    """The batch's ``rows``, cut to the longest of them: right padding past every row's end is neither attended
    to nor scored, so dropping it changes no log-prob and saves its compute."""
    assert batch.is_token is not None, "rollout batches are right-padded and mark their tokens"
    width = int(batch.is_token[rows].sum(-1).max())
    cut = {f.name: t[rows, :width] for f in fields(batch) if (t := getattr(batch, f.name)) is not None}
    return replace(batch, **cut)


def rollout_loss(
    params: TensorDictBase,
    rollout: Rollout,
    forward: Forward | LazyForward,
    config: GRPOConfig,
    rows: slice = slice(None),
    n_tokens: Tensor | None = None,
) -> tuple[Float[Tensor, ""], Metrics]:
    """The GRPO loss of the current ``params`` on a rollout, or on its ``rows`` with the whole rollout's
    ``n_tokens`` as divisor (a micro-batch's share): what :func:`grpo_step` differentiates."""
    batch = take_rows(rollout.batch, rows)
    width = batch.tokens.shape[1]
    assert batch.loss_mask is not None
    logprobs = masked_token_logprobs(
        forward(params, batch, dropout_seed=None), batch, config.sampling.temperature
    )
    old, reference = rollout.old_logprobs, rollout.reference_logprobs
    return grpo_loss(
        logprobs,
        logprobs.detach() if old is None else old[rows, :width],
        rollout.advantages[rows],
        batch.loss_mask,
        config.clip_eps,
        config.clip_eps_high,
        config.kl_beta,
        None if reference is None else reference[rows, :width],
        n_tokens,
    )


def grpo_step(
    state: TensorDictBase,
    rollout: Rollout,
    *,
    forward: Forward | LazyForward,
    config: GRPOConfig,
    optimizer: OptimizerConfig,
    lr: float,
    decay: TensorDictBase,
    parallel: Parallel = SINGLE,
    donate: bool = False,
) -> tuple[TensorDict, Metrics]:
    """One optimizer step (AdamW or Muon: ``apply_grads``) on the GRPO loss of a rollout; call it mu times per
    rollout for mu passes (a rollout sampled with ``score_old=False`` serves one pass only).

    Data parallel, each rank brings the rollout of its own prompts (the same number on every rank): the loss is
    divided by the completion tokens of all ranks' rollouts, and the step and metrics are those of all of them.

    ``state`` is ``zmaj.train.step.init_state(params, optimizer)`` (AdamW's moments, and Muon's momentum
    for Muon), written into with ``donate`` as ``apply_grads`` does. Metrics: the loss, ``kl`` (with
    reference log-probs), ``clip_fraction``, the mean ``reward`` and ``completion_length`` of every sample,
    ``kept_groups`` (the share of prompts that trained), ``grad_norm``, ``lr``. A rollout that kept no prompt
    still takes the optimizer step, with zero gradients: its moments carry it on, as they would with the zero
    advantages.
    """
    assert rollout.batch.loss_mask is not None
    n_tokens = parallel.all_sum(rollout.batch.loss_mask.sum()).clamp(min=1)
    grad_fn = grad_and_value(rollout_loss, has_aux=True)

    def micro_grads(rows: slice) -> tuple[TensorDictBase, Metrics]:
        grads, (_, metrics) = grad_fn(state["params"], rollout, forward, config, rows, n_tokens)
        return grads, metrics

    grads, metrics = sum_grads(micro_grads, micro_batches(rollout.batch.tokens.shape[0], config.micro_batch))
    if grads is None:  # no prompt kept
        grads = state["params"].clone().zero_()
        zero = torch.zeros((), device=n_tokens.device)
        metrics = {"loss": zero, "clip_fraction": zero} | (
            {} if rollout.reference_logprobs is None else {"kl": zero}
        )
    grads = parallel.reduce_grads(grads)
    new_state, grad_norm = apply_grads(state, grads, optimizer, lr, decay, donate=donate, parallel=parallel)
    lengths = torch.tensor([len(completion) for completion in rollout.completions], dtype=torch.float32)
    means = {
        "reward": rollout.rewards.mean(),
        "completion_length": lengths.mean(),
        "kept_groups": rollout.kept.float().mean(),
    }
    sums = parallel.all_sums(metrics)  # each rank's share of the global divisor
    return new_state, {**sums, **parallel.all_mean(means), "grad_norm": grad_norm, "lr": torch.tensor(lr)}
