"""A conversation's key/value cache, kept from one answer to the next so that each prefills only the new turn.

A chat model answers the whole conversation rendered by its template, and answer n's prompt mostly repeats answer
n-1's prompt and answer, whose keys and values the cache already holds. "Mostly" is checked, not assumed: a
template may render an earlier turn differently once a later one follows (the end-of-turn token after an answer;
Qwen3 drops the thinking of earlier answers), an answer's text may tokenize differently from the tokens that were
generated, and forgetting the oldest turns to fit the context changes the beginning itself. So each prompt is
compared with the tokens in the cache: the cache keeps their longest common beginning
(``zmaj.infer.cache.prefix``) and the rest of the prompt is prefilled. The logits are then those of encoding the
whole conversation afresh (tests/unit/infer/test_chat.py checks it turn by turn).
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from loguru import logger
from tensordict import TensorDictBase

from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.infer.cache import CacheShape, init_cache, prefix
from zmaj.infer.generate import CachedForward, Emitted, Sampling, stream
from zmaj.infer.text import detokenize, held_tokens


@dataclass(frozen=True)
class Context:
    """A one-row cache and the tokens in its slots, in order."""

    cache: TensorDictBase
    tokens: tuple[int, ...]


def empty_context(config: CacheShape, dtype: torch.dtype, device: torch.device | str) -> Context:
    """The context of a conversation not begun (or just reset)."""
    return Context(init_cache(config, 1, 1, dtype, device), ())


def resume(context: Context, prompt: Sequence[int], max_len: int) -> tuple[TensorDictBase, list[int]]:
    """A cache of ``max_len`` slots holding the longest common beginning of ``prompt`` and the context's tokens,
    and the rest of ``prompt``, which the next forward pass prefills.

    At least the prompt's last token is left to prefill, since its logits choose the answer's first token. The
    cache is copied to its new size every turn (``max_len`` is what this answer needs, no more, since a decode
    step on a GPU, or compiled without ``zmaj.infer.generate.compile_step``, attends over every slot): a
    memory copy, small next to the forward pass of the new turn.
    """
    kept = 0
    for cached, token in zip(context.tokens, prompt[:-1], strict=False):
        if cached != token:
            break
        kept += 1
    return prefix(context.cache, kept, max_len), list(prompt[kept:])


def reply(
    step: CachedForward,
    params: TensorDictBase,
    context: Context,
    prompt: Sequence[int],
    tokenizer: ModelTokenizer,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int,
    show: Callable[[str], None],
) -> tuple[str, Context]:
    """The answer to ``prompt`` (the whole conversation's tokens), continuing from ``context``, shown piece by piece
    as it comes (as ``zmaj.infer.text.complete``), and the context after it: the prompt and the answer's tokens but
    the last (the stop token, or the last of ``max_new_tokens``), which no forward pass has read yet."""
    cache, new = resume(context, prompt, len(prompt) + max_new_tokens - 1)
    reused = len(prompt) - len(new)
    if reused < len(context.tokens):
        logger.debug(
            f"the conversation differs from its cache after {reused} of {len(context.tokens)} tokens: "
            "re-encoding from there"
        )
    logger.debug(f"prefilling {len(new)} new tokens after {reused} cached ones")
    steps: list[Emitted] = []

    def tokens() -> Iterator[int]:
        stops = tokenizer.stop_ids
        # The cache is resume's copy, made for this answer: the prefill writes into it.
        for each in stream(
            step, params, cache, [new], max_new_tokens, sampling, seed, stop_tokens=stops, donate=True
        ):
            steps.append(each)
            if (token := int(each.tokens[0])) not in stops:
                yield token

    pieces = []
    for piece in detokenize(tokens(), tokenizer.decode, held_tokens(tokenizer)):
        show(piece)
        pieces.append(piece)
    answer = [int(each.tokens[0]) for each in steps]
    return "".join(pieces), Context(steps[-1].cache, (*prompt, *answer[:-1]))
