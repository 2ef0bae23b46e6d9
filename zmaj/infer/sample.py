"""Autoregressive sampling by full recomputation: simple and obviously correct, for short contexts.

Each new token reruns the model over the (last ``context``) tokens; the token is chosen exactly as
``zmaj.infer.generate`` chooses it (temperature 0 is greedy). The KV-cache generator is the fast path; this one
needs nothing but a forward function, which makes it the reference the cache is tested against.
"""

from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from zmaj.data.tokenizer import Tokenizer
from zmaj.infer.generate import Sampling, choose
from zmaj.models.common import Batch

Logits = Callable[[Batch], Float[Tensor, "batch seq vocab"]]


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
    """Up to ``max_new_tokens`` continuation tokens of each prompt row: fewer when every row has hit
    ``stop_token`` (a row that hit it first repeats it until then)."""
    generator = torch.Generator(prompt.device).manual_seed(seed)
    sampling = Sampling(temperature=temperature, top_k=top_k)
    tokens = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(Batch(tokens=tokens[:, -context:]))[:, -1]
        token = choose(logits, sampling, generator)
        if stop_token is not None:
            token = torch.where(done, stop_token, token)
            done = done | (token == stop_token)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        if stop_token is not None and bool(done.all()):
            break
    return tokens[:, prompt.shape[1] :]


def continue_texts(
    model: Logits,
    tokenizer: Tokenizer,
    context: int,
    seed: int,
    device: torch.device,
    *,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
) -> list[str]:
    """Each prompt followed by its sampled continuation (prompt ``i`` with seed ``seed + i``), stopping at the
    tokenizer's end-of-document token: what a pre-training run shows of its model as it learns."""
    out = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer.encode(prompt)], device=device)
        new = sample(model, ids, max_new_tokens, context, temperature, top_k, seed + i, tokenizer.eos_id)
        out.append(prompt + tokenizer.decode(new[0].tolist()))
    return out
