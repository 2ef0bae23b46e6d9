"""Autoregressive sampling by full recomputation: simple and obviously correct, for short contexts.

Each new token reruns the model over the (last ``context``) tokens. Temperature divides the logits before the
softmax; top-k keeps only the k most likely tokens (Fan et al., 2018); temperature 0 is greedy decoding.
"""

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from zmaj.models.common import Batch

Logits = Callable[[Batch], Float[Tensor, "batch seq vocab"]]


def next_token(
    logits: Float[Tensor, "batch vocab"], temperature: float, top_k: int | None, generator: torch.Generator
) -> Int[Tensor, " batch"]:
    """Pick one token per row from last-position logits."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def sample(
    model: Logits,
    prompt: Int[Tensor, "batch prompt"],
    max_new_tokens: int,
    context: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    stop_token: int | None = None,
) -> Int[Tensor, "batch new"]:
    """``max_new_tokens`` continuation tokens of each prompt row (rows that hit ``stop_token`` repeat it)."""
    generator = torch.Generator(prompt.device).manual_seed(seed)
    tokens = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(Batch(tokens=tokens[:, -context:]))[:, -1]
        token = next_token(logits, temperature, top_k, generator)
        if stop_token is not None:
            token = torch.where(done, stop_token, token)
            done = done | (token == stop_token)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        if stop_token is not None and bool(done.all()):
            break
    return tokens[:, prompt.shape[1] :]
