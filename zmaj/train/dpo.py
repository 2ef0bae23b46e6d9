"""DPO: learn from preference pairs directly, with the reference model standing in for the reward model.

Rafailov et al. (2023, "Direct Preference Optimization", arXiv:2305.18290) show that the KL-regularised reward
maximisation of RLHF has its optimum at ``pi(y|x) ∝ pi_ref(y|x) exp(r(x, y) / beta)``, so the reward a policy
implies is ``beta * log(pi(y|x) / pi_ref(y|x))`` (up to a term of x alone). Putting that into the Bradley-Terry
likelihood of "y_w preferred to y_l" gives their eq. 7:

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

a classification loss on sequence log-probs (``zmaj.train.logprobs``), with the reference frozen. Both take
their forward without dropout (as TRL's ``disable_dropout`` does by default): the implied rewards compare the two
models' log-probs, and with dropout in the policy's alone, a policy equal to its reference would have rewards
of noise rather than 0, its loss off log 2 by that noise's bias.

A preference batch here is one ``Batch`` of ``2n`` rows, the n chosen completions first and then their n
rejected ones (:func:`preference_batch`), so that policy and reference each take one forward pass.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models.common import Batch, Forward, LazyForward
from zmaj.train.logprobs import completion_batch, sequence_logprobs
from zmaj.train.muon import OptimizerConfig
from zmaj.train.parallel import SINGLE, Parallel
from zmaj.train.step import Metrics, apply_grads, grad_and_value


def preference_batch(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
) -> Batch:
    """``2n`` rows: each prompt with its chosen completion, then each prompt with its rejected one."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(
            f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected completions"
        )
    return completion_batch([*prompts, *prompts], [*chosen, *rejected], device)


def dpo_loss(
    policy_chosen: Float[Tensor, " pairs"],
    policy_rejected: Float[Tensor, " pairs"],
    reference_chosen: Float[Tensor, " pairs"],
    reference_rejected: Float[Tensor, " pairs"],
    beta: float,
) -> tuple[Float[Tensor, ""], Metrics]:
    """Eq. 7 of Rafailov et al. (2023) averaged over pairs, from sequence log-prob sums; and the implied rewards.

    ``reward_margin`` is the mean of beta times the chosen-minus-rejected log-ratio difference, ``accuracy`` the
    share of pairs where the implied reward already prefers the chosen completion.
    """
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "loss": loss.detach(),
        "reward_chosen": chosen_reward.detach().mean(),
        "reward_rejected": rejected_reward.detach().mean(),
        "reward_margin": margin.detach().mean(),
        "accuracy": (margin.detach() > 0).to(margin.dtype).mean(),
    }
    return loss, metrics


def _halves(logprobs: Float[Tensor, " rows"]) -> tuple[Float[Tensor, " pairs"], Float[Tensor, " pairs"]]:
    pairs = logprobs.shape[0] // 2
    return logprobs[:pairs], logprobs[pairs:]


def reference_logprobs(
    reference: TensorDictBase, batch: Batch, forward: Forward | LazyForward
) -> tuple[Float[Tensor, " pairs"], Float[Tensor, " pairs"]]:
    """The frozen reference's sequence log-probs of the chosen and the rejected rows; no graph is built."""
    with torch.no_grad():
        logits = forward(reference, batch, dropout_seed=None)
    return _halves(sequence_logprobs(logits, batch))


def _policy_loss(
    params: TensorDictBase,
    batch: Batch,
    forward: Forward | LazyForward,
    reference: tuple[Tensor, Tensor],
    beta: float,
    share: float,
) -> tuple[Tensor, Metrics]:
    """The DPO loss of this rank's pairs, times their ``share`` of all ranks' pairs: what the ranks' gradients
    must sum to the mean's."""
    policy_chosen, policy_rejected = _halves(
        sequence_logprobs(forward(params, batch, dropout_seed=None), batch)
    )
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, *reference, beta)
    return loss * share, metrics


def dpo_step(
    state: TensorDictBase,
    batch: Batch,
    *,
    forward: Forward | LazyForward,
    reference: TensorDictBase,
    beta: float,
    optimizer: OptimizerConfig,
    lr: float,
    decay: TensorDictBase,
    reference_forward: Forward | LazyForward | None = None,
    parallel: Parallel = SINGLE,
    donate: bool = False,
) -> tuple[TensorDict, Metrics]:
    """One optimizer step (AdamW or Muon: ``apply_grads``) on the DPO loss of a preference batch (chosen rows,
    then rejected rows).

    ``state`` is ``zmaj.train.step.init_state(params, optimizer)`` (AdamW's moments, and Muon's momentum
    for Muon), written into with ``donate`` as ``apply_grads`` does. The reference log-probs are computed by
    ``reference_forward`` (default ``forward``) on ``reference`` without gradient; with LoRA
    (``zmaj.models.lora.lora_forward``) the reference is usually the base model under its plain forward.
    Under ``parallel`` each rank holds an equal share of the pairs, and the step and its metrics are those of
    all ranks' pairs together.
    """
    if batch.tokens.shape[0] % 2 != 0:
        raise ValueError(
            f"a preference batch has chosen rows then rejected rows, got {batch.tokens.shape[0]} rows"
        )
    params = state["params"]
    ref = reference_logprobs(reference, batch, reference_forward or forward)
    grad_fn = grad_and_value(_policy_loss, has_aux=True)
    grads, (_, metrics) = grad_fn(params, batch, forward, ref, beta, 1 / parallel.size)
    grads = parallel.reduce_grads(grads)
    norm = parallel.global_norm(grads) if parallel.sharded else None
    new_state, grad_norm = apply_grads(state, grads, optimizer, lr, decay, norm, donate, parallel=parallel)
    return new_state, {**parallel.all_mean(metrics), "grad_norm": grad_norm, "lr": torch.tensor(lr)}
