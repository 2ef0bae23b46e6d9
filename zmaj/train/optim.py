"""AdamW, gradient clipping and learning-rate schedules as pure functions over TensorDicts.

AdamW (Loshchilov & Hutter, 2019) keeps running means of the gradient (``m``) and of its square (``v``) and
moves each parameter by the bias-corrected ratio m / (sqrt(v) + eps); weight decay shrinks the parameter
directly instead of being added to the gradient. The arithmetic below follows ``torch.optim.AdamW`` operation by
operation, so the two agree to float rounding.
"""

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tensordict import TensorDict, TensorDictBase
from torch import Tensor


class AdamWGroup(BaseModel):
    """AdamW's settings for the parameters it updates: all of them (:class:`AdamWConfig`), or those Muon leaves
    to it (``zmaj.train.muon.MuonConfig.adamw``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    lr: float = Field(1e-3, gt=0)
    # Each in [0, 1), as torch.optim.AdamW asks: at 1 the bias correction divides by zero.
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    decay_norms_and_biases: bool = False


class AdamWConfig(AdamWGroup):
    """AdamW for every parameter: the default optimizer (``kind`` may be left out)."""

    kind: Literal["adamw"] = "adamw"
    grad_clip: float | None = Field(1.0, gt=0, description="global grad-norm clip; None disables it")

    @property
    def groups(self) -> str:
        """Which parameters each optimizer updates, in words: what shapes the optimizer state, so that a resumed
        run may not change it."""
        return "adamw: every parameter"


class ScheduleConfig(BaseModel):
    """Linear warmup, then cosine decay or warmup-stable-decay (WSD, Hägele et al., 2024) toward
    ``final_lr_fraction`` of the peak, which the step after the last would take (nanoGPT's and modded-nanogpt's
    convention): the last step runs a decay step above it, ``peak / 70`` for the default's WSD to 0.

    Why warm up: in the first steps AdamW's second-moment estimate rests on a few gradients, so full-rate updates
    would be large and noisy, while the weights are furthest from anything good."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of the steps spent decaying")
    final_lr_fraction: float = Field(0.1, ge=0, le=1)


def adamw_init(params: TensorDictBase) -> TensorDict:
    """Zero first and second moments shaped like the parameters."""
    zeros = params.detach().apply(torch.zeros_like)
    return TensorDict({"m": zeros, "v": zeros.clone(), "step": torch.zeros((), dtype=torch.long)})


def adamw_update(
    params: TensorDictBase,
    grads: TensorDictBase,
    state: TensorDictBase,
    config: AdamWGroup,
    lr: float | Tensor,
    decay: TensorDictBase,
    donate: bool = False,
) -> tuple[TensorDictBase, TensorDict]:
    """One AdamW step; returns new parameters and a new optimizer state, the inputs untouched (unless donated).

    ``decay`` holds, per parameter, 1.0 where weight decay applies and 0.0 where it does not. Per parameter:
    ``m <- lerp(m, g, 1 - beta1)``, ``v <- beta2 v + (1 - beta2) g^2``, then
    ``p <- p (1 - lr wd decay) - s m / (sqrt(v) / sqrt(bias2) + eps)`` with ``s = lr / bias1``, each operation
    written into its operand. The formulas exist once: without ``donate`` they run on copies of ``params`` and
    ``m``, ``v``.

    The last term is one ``addcdiv`` with the scalars folded into its denominator, as torch's capturable AdamW
    does: ``(sqrt(v) + eps sqrt(bias2)) / (-s sqrt(bias2))``, the same value (within 1e-6 of torch's AdamW over
    20 steps, tested), with ``v``'s update one ``addcmul``: one temporary per parameter instead of three and eight
    passes over it instead of twelve, 82 -> 58 ms for the benchmark model's 13.9M parameters eagerly on a 2-core
    Xeon (torch's foreach AdamW: 52). ``lr = 0`` makes the denominator -inf, a zero step, never NaN.

    ``donate=True`` writes the new values into the buffers of ``params`` and ``state``, and the denominator into
    ``grads``', which the caller gives up (as ``jax.jit``'s ``donate_argnums``), and returns them: the same bits,
    and no copies of the weights and moments, nor temporaries. That matters on the CPU, where each fresh tensor
    that large is a new ``mmap`` whose every page faults in when first written.
    """
    beta1, beta2 = config.betas
    step: Tensor = state["step"] + 1
    step_size, bias2_sqrt = lr / (1 - beta1**step), (1 - beta2**step).sqrt()
    new_params, m, v = (writable(tree, donate) for tree in (params, state["m"], state["v"]))
    for key in leaf_keys(new_params):
        p_, g, m_, v_ = new_params.get(key), grads.get(key), m.get(key), v.get(key)
        m_.lerp_(g, 1 - beta1)
        v_.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # Donated, the gradient (read for the last time above) holds the denominator: no fresh tensor.
        denominator = torch.sqrt(v_, out=g) if donate else v_.sqrt()
        denominator.add_(config.eps * bias2_sqrt).div_(-step_size * bias2_sqrt)
        p_.mul_(1 - lr * config.weight_decay * decay.get(key)).addcdiv_(m_, denominator)
    return new_params, TensorDict({"m": m, "v": v, "step": step})


def writable(tree: TensorDictBase, donate: bool) -> TensorDictBase:
    """What an update writes its formulas into: ``tree`` itself when the caller donated it, else a copy, so that
    each formula exists once, in place (``adamw_update``, ``clip_by_global_norm``, Muon's update)."""
    return tree if donate else tree.clone()


def decay_mask(params: TensorDictBase, norms_and_biases: bool = False) -> TensorDict:
    """1.0 for matrices (embeddings, projections), 0.0 for vectors (norm scales, biases): decay would pull a
    norm's scale toward 0 rather than its neutral 1 (Gemma's, stored as ``w`` in ``1 + w``, aside), and these
    few vector parameters are not what overfits (nanoGPT's convention).

    A parameter's rank is counted without the stacked-layer axis, so a ``[n_layers, d]`` bias stays a vector.
    """

    def flag(key: tuple[str, ...]) -> Tensor:
        tensor = params.get(key)
        layer_dims = (params.get(key[:-1]) if len(key) > 1 else params).batch_dims
        is_matrix = tensor.ndim - layer_dims >= 2
        # Shaped to broadcast against the parameter, and to sit under the same stacked-layer batch size.
        shape = tensor.shape[:layer_dims] + (1,) * (tensor.ndim - layer_dims)
        return torch.full(shape, 1.0 if norms_and_biases or is_matrix else 0.0, device=tensor.device)

    mask: TensorDict = params.detach().clone(recurse=False)
    for key in leaf_keys(params):
        mask.set(key, flag(key))
    return mask


def leaf_keys(td: TensorDictBase) -> list[tuple[str, ...]]:
    """The keys of ``td``'s leaves, each a tuple (``keys(True, True)`` gives a top-level leaf's as a string)."""
    return [key if isinstance(key, tuple) else (key,) for key in td.keys(True, True)]


def global_norm(grads: TensorDictBase) -> Tensor:
    """The L2 norm of all gradients taken as one vector."""
    leaves = [g.float() for g in grads.values(True, True)]
    norm: Tensor = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in leaves]))
    return norm


def clip_by_global_norm(
    grads: TensorDictBase, max_norm: float, norm: Tensor, donate: bool = False
) -> TensorDictBase:
    """Scale all gradients by min(1, max_norm / norm), ``norm`` being their global norm, as
    ``torch.nn.utils.clip_grad_norm_`` does: in place with ``donate``, on a copy otherwise (as ``adamw_update``)."""
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    clipped = writable(grads, donate)
    for key in leaf_keys(clipped):
        clipped.get(key).mul_(scale)
    return clipped


def schedule_warning(total_steps: int, schedule: ScheduleConfig) -> str | None:
    """What is odd about ``schedule`` over a run of ``total_steps``, or None: a warmup the run never finishes,
    or one that runs into WSD's decay, so that the rate drops at once from the peak to partway down. A warning,
    not a refusal: a short trial run (``--set train.steps=3``) keeps the spec's schedule on purpose."""
    warmup = f"train.schedule.warmup_steps ({schedule.warmup_steps})"
    if schedule.warmup_steps > total_steps:
        return f"{warmup} exceeds train.steps ({total_steps}): the learning rate never reaches its peak"
    decay_start = total_steps - decay_steps(total_steps, schedule.decay_fraction)
    if schedule.kind == "wsd" and schedule.warmup_steps > decay_start + 1:  # + 1: one step early is the slope
        return (
            f"{warmup} runs into the decay, which starts at step {decay_start} (decay_fraction "
            f"{schedule.decay_fraction}): the learning rate jumps down when warmup ends"
        )
    return None


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """WSD's decay length: the whole steps of the fraction, at least one and at most all, a float's rounding
    error allowed for (0.7 of 90 steps is 62.99999999999999 in floats, which decayed over 62)."""
    return min(total_steps, max(1, math.floor(decay_fraction * total_steps + 1e-9)))


def learning_rate(step: int, total_steps: int, peak: float, schedule: ScheduleConfig) -> float:
    """The learning rate for (0-based) ``step`` of ``total_steps`` (:class:`ScheduleConfig`)."""
    if step < schedule.warmup_steps:
        return peak * (step + 1) / schedule.warmup_steps
    floor = peak * schedule.final_lr_fraction
    if schedule.kind == "constant":
        return peak
    if schedule.kind == "cosine":
        progress = (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = total_steps - decay_steps(total_steps, schedule.decay_fraction)
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, total_steps - decay_start)
    return peak + (floor - peak) * min(progress, 1.0)
