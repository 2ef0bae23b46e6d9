"""Perplexity of a text under a model: ``exp`` of the mean negative log-likelihood of its tokens, each predicted
from the tokens before it.

A text longer than the model's context is scored in windows. Cutting it into independent chunks (stride equal to
the context) is cheap but predicts each chunk's first tokens from almost nothing; sliding the window by a
smaller ``stride`` gives every scored token at least ``context - stride`` tokens of context, at the cost of
recomputing the overlap. Each window scores only the tokens the previous windows have not (the sliding-window
method of the ``transformers`` perplexity guide, https://huggingface.co/docs/transformers/perplexity), so no
token counts twice; the text's first token is never predicted, having nothing before it.

The guide's loop weighs each window's mean loss by one token fewer than it scores after the first window, which
biases its average slightly; here the count is the number of tokens actually scored.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from zmaj.models.common import Batch

Hidden = Callable[[Batch], Float[Tensor, "batch seq d_model"]]
"""A model's final hidden states for a batch (its forward pass without the unembedding)."""
Unembed = Callable[[Float[Tensor, "batch seq d_model"]], Float[Tensor, "batch seq vocab"]]
"""A model's unembedding: hidden states to next-token logits."""


@dataclass(frozen=True)
class Window:
    """Tokens ``begin:end`` run through the model together; it scores the tokens ``scored_from:end``."""

    begin: int
    end: int
    scored_from: int


@dataclass(frozen=True)
class Perplexity:
    """``tokens`` predicted, with a mean negative log-likelihood of ``nll`` nats each."""

    tokens: int
    nll: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows of the ``transformers`` guide: starting every ``stride`` tokens, each ``context`` long (the last
    cut short by the text's end), until one reaches the end.

    Each scores the tokens after the previous window's end; a token with no context in its window (the text's
    first, and with ``stride == context`` every chunk's first) is not scored, and a window scoring nothing is left
    out.
    """
    if context < 2:
        raise ValueError(f"a window needs room for a token and its context: context >= 2, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"the stride must be between 1 and the context ({context}), got {stride}")
    windows: list[Window] = []
    scored_until = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        scored_from = max(scored_until, begin + 1)
        if scored_from < end:
            windows.append(Window(begin, end, scored_from))
        scored_until = end
        if end == n_tokens:
            break
    return windows


LOGITS_PER_CHUNK = 2**25
"""Logits ``window_nll`` computes at once (128 MiB in float32, as much again for their log-softmax): 682
positions of SmolLM2's 49,152-token vocabulary, 128 of Gemma 3's 262,144."""


def window_nll(
    hidden: Hidden,
    unembed: Unembed,
    tokens: Int[Tensor, " seq"],
    window: Window,
    chunk: int | None = None,
) -> Float[Tensor, " scored"]:
    """The negative log-likelihood, in float32, of each token the window scores, given the tokens before it in
    the window.

    Logits are computed ``chunk`` positions at a time (by default as many as :data:`LOGITS_PER_CHUNK` allows):
    a whole window's at once is the memory peak of scoring (an 8192-token window over a 49152-token
    vocabulary is 1.6 GB in float32), and a fixed count of positions is not a bound either (1024 of Gemma 3's
    positions are 1 GiB, and its log-softmax another).
    """
    inputs = tokens[window.begin : window.end - 1]
    targets = tokens[window.scored_from : window.end]
    states = hidden(Batch(tokens=inputs[None]))[0, window.scored_from - 1 - window.begin :]
    if chunk is None:
        vocab = unembed(states[None, :1]).shape[-1]  # one position's logits: the vocabulary's size
        chunk = max(1, LOGITS_PER_CHUNK // vocab)
    losses = [
        F.cross_entropy(
            unembed(states[None, start : start + chunk])[0].float(),
            targets[start : start + chunk],
            reduction="none",
        )
        for start in range(0, len(targets), chunk)
    ]
    return torch.cat(losses)


@torch.no_grad()
def perplexity(
    hidden: Hidden, unembed: Unembed, tokens: Int[Tensor, " seq"], context: int, stride: int | None = None
) -> Perplexity:
    """The text's perplexity scored in ``sliding_windows`` (``stride`` defaults to the context: plain chunks)."""
    if len(tokens) < 2:
        raise ValueError(
            f"perplexity needs at least 2 tokens (the first is never predicted), got {len(tokens)}"
        )
    total, count = 0.0, 0
    for window in sliding_windows(len(tokens), context, context if stride is None else stride):
        nll = window_nll(hidden, unembed, tokens, window)
        total += float(nll.double().sum())
        count += len(nll)
    return Perplexity(tokens=count, nll=total / count)
