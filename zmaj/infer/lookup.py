"""Prompt lookup decoding: greedy generation that drafts its next tokens by copying them from the context, then
checks the whole draft with one forward pass.

Decoding one token at a time reads every weight once per token (at batch 1 a step is bound by memory, not by
arithmetic), so a forward pass over a few tokens costs little more than one over a single token (1.2-1.5x for
SmolLM2-135M's passes of up to 11 tokens, eager on a 2-core CPU: ``benchmarks/prompt_lookup.py``). Speculative
decoding (Leviathan et al., 2023, arXiv:2211.17192; Chen et al., 2023, arXiv:2302.01318) spends that spare
arithmetic on guesses: something cheap drafts ``k`` tokens, the model computes its logits after each of them
in one pass, and the longest prefix of the draft that greedy decoding would have chosen anyway is kept, plus
the model's own token after it. Every step keeps at least one token, so the output is greedy decoding's, only
in fewer passes. Here the drafter is no model at all but a string match (Saxena, 2023,
github.com/apoorvumang/prompt-lookup-decoding; ``transformers``' ``prompt_lookup_num_tokens``): the tokens
that followed an earlier occurrence of the context's last few tokens (:func:`draft` says which), searched in
Python over the whole context at every pass (2 ms at 4k tokens, 13 ms at 32k, against ~90 ms for an eager CPU
step of SmolLM2-135M). Outputs that copy from their context (editing code, quoting, summarising, answers that
restate the question) are drafted right for long stretches; elsewhere a draft is mostly refused and costs a
little more than the plain step it rides on.

The tokens are greedy decoding's up to rounding: a pass over several tokens sums in another order than a pass
over one (other matmul and attention kernels), so a near-tie between two logits may fall the other way, as
between eager and compiled steps (``zmaj.infer.generate.compile_step``): in float32 they agreed in every test
and measurement, in bfloat16 a near-tie one rounding step apart did come out otherwise. One prompt at a time:
rows of a batch would keep drafts of different lengths. Eager steps only: each pass feeds another number of
tokens, which a compiled step (fixed shapes) compiles anew, until dynamo's recompile limit stops it.

The cache (``zmaj.infer.cache``) takes the draft like any tokens; what was refused is dropped by moving its
length back (:func:`truncate`), and the next pass writes over those slots.
"""

from collections.abc import Collection, Iterator, Sequence

import torch
from tensordict import TensorDictBase

from zmaj.infer.cache import capacity
from zmaj.infer.generate import CachedForward, check_logits
from zmaj.models.common import Batch


def draft(context: Sequence[int], max_ngram: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed an earlier occurrence of the context's last ``n`` tokens, for the largest
    ``n <= max_ngram`` that occurs earlier; none when not even the last token does.

    Of the occurrences, the latest that ``k`` tokens follow, else the latest: what the text did most recently is
    the better guess of what it does next (which of two similar functions is being copied), but in a loop the
    latest occurrence is a period back and would draft one period at a time."""
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = list(context[-n:])
        starts = [s for s in range(len(context) - n - 1, -1, -1) if list(context[s : s + n]) == tail]
        if starts:
            whole = [s for s in starts if s + n + k <= len(context)]
            start = (whole or starts)[0] + n
            return list(context[start : start + k])
    return []


def truncate(cache: TensorDictBase, length: int) -> None:
    """Forget every slot from ``length`` on, in place (the caller owns the cache): the next tokens are written
    there, and the positions of tokens to come count only the slots kept (``zmaj.models.common.cache_step``)."""
    is_token: torch.Tensor = cache["is_token"]
    is_token[:, length:] = False
    cache["length"] = torch.tensor(length, device=is_token.device)


@torch.no_grad()
def stream_lookup(
    step: CachedForward,
    params: TensorDictBase,
    cache: TensorDictBase,
    prompt: Sequence[int],
    max_new_tokens: int,
    draft_tokens: int = 10,
    max_ngram: int = 3,
    stop_tokens: Collection[int] = (),
    donate: bool = False,
) -> Iterator[int]:
    """Yield greedy decoding's tokens for one prompt, each pass over the model checking up to ``draft_tokens``
    drafted ones; the stop token that ends the output is yielded too.

    ``cache`` and ``donate`` are as ``zmaj.infer.generate.stream`` takes them, and a cache needs the same room
    (the prompt plus ``max_new_tokens - 1``): drafts are cut to fit it.
    """
    if not prompt:
        raise ValueError("generation needs a prompt of at least one token")
    if draft_tokens < 1 or max_ngram < 1:
        raise ValueError(f"draft_tokens and max_ngram must be at least 1, got {draft_tokens} and {max_ngram}")
    if cache["k"].shape[1] != 1:
        raise ValueError(
            f"prompt lookup decodes one prompt at a time; the cache has {cache['k'].shape[1]} rows"
        )
    if len(prompt) + max_new_tokens - 1 > capacity(cache):
        raise ValueError(
            f"the cache has room for {capacity(cache)} tokens, this generation needs "
            f"{len(prompt) + max_new_tokens - 1}"
        )
    if max_new_tokens == 0:
        return
    device = cache["k"].device
    prompt_batch = Batch(tokens=torch.tensor([list(prompt)], device=device))
    # The last position's logits alone, as generate's prefill: a long prompt's every logit is the memory peak.
    logits, cache = step(params, prompt_batch, cache, donate=donate, last_only=True)
    context, emitted = list(prompt), 0
    token = int(_checked(logits[0, -1:], logits[0, -1:].argmax(-1))[0])
    while True:
        yield token
        context.append(token)
        emitted += 1
        if token in stop_tokens or emitted == max_new_tokens:
            return
        # Every token the pass is fed but the first is one more emitted if kept, and the model's own next token
        # one more: the room checked on entry then also holds every token fed.
        room = min(draft_tokens, max_new_tokens - emitted - 1)
        guess = draft(context, max_ngram, room) if room > 0 else []
        start = int(cache["length"])
        fed = torch.tensor([[token, *guess]], device=device)
        logits, cache = step(params, Batch(tokens=fed), cache, donate=True)
        best = logits[0].argmax(-1)
        chosen = best.tolist()  # chosen[i]: greedy decoding's token after fed[i]
        accepted = 0
        while accepted < len(guess) and chosen[accepted] == guess[accepted]:
            accepted += 1
        # Only the logits greedy decoding reads are checked: those after a refused token are never used.
        _checked(logits[0, : accepted + 1], best[: accepted + 1])
        for kept in guess[:accepted]:
            yield kept
            context.append(kept)
            emitted += 1
            if kept in stop_tokens or emitted == max_new_tokens:
                return
        truncate(cache, start + 1 + accepted)
        token = chosen[accepted]


def _checked(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens``, the most likely after each row of ``logits``, once their logits are known finite (as
    ``choose`` refuses them: argmax takes a NaN for the largest)."""
    check_logits(logits.gather(-1, tokens[:, None]))
    return tokens
