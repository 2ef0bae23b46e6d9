"""Log-probabilities of given tokens under a model: what preference and reinforcement-learning losses are made of.

A causal language model gives log p(completion | prompt) = sum_t log p(y_t | prompt, y_<t), one term per
completion token. :func:`completion_batch` lays (prompt, completion) pairs out as one right-padded training
batch whose ``loss_mask`` selects exactly those terms, :func:`token_logprobs` reads every term off the logits
(or off a lazy forward's hidden states, a chunk of positions at a time), and :func:`sequence_logprobs` sums
each row's.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from zmaj.models.common import Batch, LazyLogits
from zmaj.nn.layers import at_least_float32
from zmaj.nn.loss import chunked_token_logprobs
from zmaj.train.step import LOSS_CHUNK


def token_logprobs(
    logits: Float[Tensor, "batch seq vocab"] | LazyLogits,
    targets: Int[Tensor, "batch seq"],
    temperature: float = 1.0,
) -> Float[Tensor, "batch seq"]:
    """log p(target) at every position, the logits divided by ``temperature`` (the distribution sampled from),
    computed in float32 at least (bf16 log-softmax loses the small differences). ``LazyLogits`` (a model's
    ``lazy_forward``) are unembedded a chunk of positions at a time, in the forward and the backward pass
    (``zmaj.nn.loss.chunked_token_logprobs``), never all of them at once."""
    if isinstance(logits, LazyLogits):
        return chunked_token_logprobs(
            logits.hidden, logits.weight, targets, temperature, LOSS_CHUNK, logits.softcap
        )
    scaled = at_least_float32(logits) if temperature == 1 else at_least_float32(logits) / temperature
    return torch.log_softmax(scaled, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def masked_token_logprobs(
    logits: Float[Tensor, "batch seq vocab"] | LazyLogits, batch: Batch, temperature: float = 1.0
) -> Float[Tensor, "batch seq"]:
    """``token_logprobs`` of the batch's targets, zero outside ``loss_mask`` (the completion tokens)."""
    assert batch.targets is not None, "log-prob batches carry targets"
    assert batch.loss_mask is not None, "log-prob batches mark the completion tokens in loss_mask"
    return token_logprobs(logits, batch.targets, temperature) * batch.loss_mask


def sequence_logprobs(
    logits: Float[Tensor, "batch seq vocab"] | LazyLogits, batch: Batch
) -> Float[Tensor, " batch"]:
    """log p(completion | prompt) per row: the masked token log-probs summed."""
    return masked_token_logprobs(logits, batch).sum(-1)


def completion_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
) -> Batch:
    """Rows ``prompt + completion``, right-padded, with targets shifted by one and ``loss_mask`` on the completion.

    Target ``t`` is token ``t + 1``, so the mask is on where token ``t + 1`` belongs to the completion.
    ``is_token`` hides the padding; right padding leaves every real token at its own position 0..n-1 (the
    default), the same positions ``zmaj.infer.generate`` gave it behind its left padding.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError(
            "every prompt needs at least one token: the first completion token is predicted from it"
        )
    rows = [list(prompt) + list(completion) for prompt, completion in zip(prompts, completions, strict=True)]
    width = max((len(row) for row in rows), default=1)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    is_token = torch.zeros(len(rows), width, dtype=torch.bool)
    is_completion = torch.zeros(len(rows), width, dtype=torch.bool)
    for index, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        is_token[index, : len(row)] = True
        is_completion[index, len(prompt) : len(row)] = True
    return Batch(
        tokens=tokens[:, :-1],
        is_token=is_token[:, :-1],
        targets=tokens[:, 1:],
        loss_mask=is_completion[:, 1:],
    ).to(device)
