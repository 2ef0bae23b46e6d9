"""Generation with a key/value cache: run the prompts once ("prefill"), then one new token per row per step.

Prompts of different lengths are left-padded into one batch, so every row's next token lands in the same cache
slot and a decode step is one ``[batch, 1]`` forward pass; ``is_token`` keeps the padding out of attention and
the default positions (``zmaj.models.common.cache_step``) give each row the positions it would have alone.

Each step picks a token per row from the last position's logits: greedy at temperature 0, else a sample from
``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (Fan et al., 2018,
arXiv:1805.04833) and then to the nucleus: the smallest set of most likely tokens whose probability reaches
``top_p`` (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration", arXiv:1904.09751, eq. 2).
A row stops at one of ``stop_tokens`` or once its text contains one of ``stop_strings`` (the stopping token is
part of the output, as in ``transformers``); generation ends when every row has stopped.

The loop knows nothing of the architecture: it takes ``step(params, batch, cache, donate=False,
last_only=False) -> (logits, cache)`` (``zmaj.models.common.CachedForward``), e.g. ``llama.cached(config)``,
and a cache from ``zmaj.infer.cache.init_cache``. ``stream`` yields each step's tokens as they come; ``generate``
collects them.
"""

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from pydantic import BaseModel, ConfigDict, Field
from tensordict import TensorDictBase
from torch import Tensor

from zmaj.infer.cache import capacity, repeat_rows
from zmaj.models.common import Batch

# Re-exported: generation's contract with a model.
from zmaj.models.common import CachedForward as CachedForward


class Sampling(BaseModel):
    """How a token is picked from logits; the default, temperature 0, is greedy decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0, description="divides the logits; 0 picks the most likely token")
    top_k: int | None = Field(None, gt=0, description="sample only among the k most likely tokens")
    top_p: float | None = Field(
        None, gt=0, le=1, description="sample only from the smallest set of tokens with probability >= top_p"
    )


GREEDY = Sampling()


@dataclass(frozen=True)
class Emitted:
    """One decode step's tokens; ``tokens[b]`` belongs to row ``b``'s output only where ``emitted[b]``.

    A row that has stopped keeps being computed (the batch keeps its shape) but emits nothing. ``cache`` holds the
    prompts and every token before these, whose logits chose them: the last step's is where a conversation
    continues from (``zmaj.infer.chat``). Later steps write only past its length, so it stays valid once the
    stream moves on; nothing may write into it (``donate``) while the stream still runs.
    """

    tokens: Int[Tensor, " batch"]
    emitted: Bool[Tensor, " batch"]
    cache: TensorDictBase


def top_k_filter(logits: Float[Tensor, "batch vocab"], k: int) -> Float[Tensor, "batch vocab"]:
    """Logits outside each row's ``k`` largest set to -inf (ties with the k-th are kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Float[Tensor, "batch vocab"], p: float) -> Float[Tensor, "batch vocab"]:
    """Logits outside each row's nucleus set to -inf: the most likely tokens, in order, until their mass >= p.

    A token is kept when the mass of the tokens ranked above it is still below ``p``, so the most likely one
    always is. Ties are ranked by token id (a stable sort), so the kept set is exactly the smallest one. The
    masses are summed in float64: in float32, from the most likely token down, a 49k vocabulary's running mass
    drifts by ~1e-5, which dropped hundreds of the nucleus's last tokens at p = 0.999.
    """
    probs = torch.softmax(logits.double(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass = sorted_probs.cumsum(-1)
    mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=-1)
    keep = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter(-1, order, mass_before < p)
    return logits.masked_fill(~keep, float("-inf"))


def choose(
    logits: Float[Tensor, "batch vocab"], sampling: Sampling, generator: torch.Generator
) -> Int[Tensor, " batch"]:
    """One token per row: greedy, or sampled after temperature, top-k and top-p, in that order (as ``transformers``)."""
    if sampling.temperature == 0.0:
        token = logits.argmax(-1)
        # argmax takes a NaN for the largest logit: the logit it chose says whether the row had any.
        check_logits(logits.gather(-1, token[:, None]))
        return token
    # Shifted to a maximum of 0 first (softmax is the same): a tiny temperature then cannot overflow to inf. One
    # below float32's smallest subnormal number (~1.4e-45) would round to 0 there and make the top logit 0/0;
    # clamped to the smallest normal number, it samples the top token as surely.
    logits = logits.float()
    temperature = max(sampling.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        logits = top_p_filter(logits, sampling.top_p)
    return sample_categorical(torch.softmax(logits, dim=-1), generator)


class NonFiniteLogitsError(ValueError):
    """The model's logits hold a NaN or an infinity: no token follows from them (activations past the range
    of the type it computes in; weights that are not finite are refused when a model loads)."""


def check_logits(values: Tensor) -> None:
    """Refuse logits (or a distribution's totals) that hold a NaN or an infinity."""
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteLogitsError(
            "the model's logits are not finite (NaN or infinite): no token follows from them"
        )


def sample_categorical(
    probs: Float[Tensor, "batch vocab"], generator: torch.Generator, monotone: bool | None = None
) -> Int[Tensor, " batch"]:
    """One index per row, drawn from ``probs`` by inverting the row's CDF at one uniform number.

    ``torch.multinomial`` draws an exponential variate for every vocabulary entry, which on the CPU took 128 ms
    for 128 rows of SmolLM2's 49,152 (two thirds of a bf16 decode step at that batch); this draws one uniform
    per row, and the cumulative sum (3-8 ms here) is the only pass over the vocabulary. Each token's interval of the
    float32 CDF is its probability to within one rounding of the running sum (6e-8); a token of probability
    zero (cut by top-k or top-p) adds exactly nothing to the CPU's sequential sum, so its interval is empty. A
    GPU's cumulative sum is a parallel scan that may wobble by a rounding step there, so on a GPU such tokens
    take their predecessor's value (``cummax``, which costs 31 ms on this CPU and is not needed on it);
    ``monotone`` forces that step on or off (default: on off the CPU).
    """
    cdf = probs.float().cumsum(-1)
    # Checked before the GPU's step, which reads a NaN probability as zero: a row of NaN became token 0.
    check_logits(cdf[:, -1])  # searchsorted would return the vocabulary size, no token
    monotone = cdf.device.type != "cpu" if monotone is None else monotone
    if monotone:
        cdf = torch.where(probs > 0, cdf, 0.0).cummax(-1).values
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    # 1 - u lies in (0, 1]: the target is above zero, so a leading zero-probability token is never picked, and at
    # most the total, so the search always lands on a token.
    return torch.searchsorted(cdf, (1 - u) * cdf[:, -1:]).squeeze(-1)


def left_padded(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> Batch:
    """Prompts right-aligned in one batch, ``is_token`` marking the real tokens (padding id 0, never read)."""
    width = max(len(prompt) for prompt in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    is_token = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        is_token[row, width - len(prompt) :] = True
    return Batch(tokens=tokens, is_token=is_token).to(device)


def compile_step(step: CachedForward) -> CachedForward:
    """``step`` through ``torch.compile(fullgraph=True, dynamic=False)``, its graphs traced with
    ``capture_scalar_outputs`` on, so that a CPU decode step attends over the slots written so far, not the
    whole cache (``zmaj.nn.attention.cached_attention``).

    Fixed shapes give one graph for every decode step; the prefill compiles its own. The option is set for the
    step's calls alone, where dynamo reads it (while tracing), not for the rest of the process. zmaj's
    attention reads it too, as its switch: with ``fullgraph=True`` torch 2.15 traces ``.item()`` without it,
    but a compile without ``fullgraph`` would break the graph at every layer, so a plain ``torch.compile``
    keeps attending over every slot.
    """
    compiled = torch.compile(step, fullgraph=True, dynamic=False)

    def run(
        params: TensorDictBase,
        batch: Batch,
        cache: TensorDictBase,
        *,
        donate: bool = False,
        last_only: bool = False,
    ) -> tuple[Tensor, TensorDictBase]:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            logits, new_cache = compiled(params, batch, cache, donate=donate, last_only=last_only)
        return logits, new_cache

    return run


@torch.no_grad()
def stream(
    step: CachedForward,
    params: TensorDictBase,
    cache: TensorDictBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_tokens: Collection[int] = (),
    stop_strings: Collection[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    copies: int = 1,
    donate: bool = False,
) -> Iterator[Emitted]:
    """Yield each decode step's tokens until every row has stopped or ``max_new_tokens`` steps.

    ``cache`` must have one row per prompt and room for the longest prompt plus ``max_new_tokens - 1`` tokens
    (the last token is never fed back); it may already hold tokens, which the prompts then continue (a
    conversation's earlier turns). It is not changed, so one empty cache serves any number of calls: the
    prefill writes a new cache, which the decode steps that follow own and write in place. ``donate`` gives
    the cache up to the prefill too, which then writes into it: a caller that made the cache for this call
    passes it, since a prefill that copies held up to three caches at once (the caller's, each layer's new
    keys and values, their stack): 8.6 GB each for an 8B model's bf16 cache at 32 x 2048 tokens.
    ``seed`` makes sampling reproducible; ``decode`` (token ids to text) is needed for ``stop_strings``.
    ``copies`` continues each prompt in that many rows, prompt-major (prompt ``i`` in rows ``i * copies`` to
    ``i * copies + copies - 1``), from one prefill (``zmaj.infer.cache.repeat_rows``): the same tokens as the
    prompts repeated, for a fraction of the prefill's work.
    """
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode: the tokenizer's ids -> text")
    if not prompts or min(len(prompt) for prompt in prompts) == 0:
        raise ValueError("generation needs at least one prompt, each of at least one token")
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    cache_rows = cache["k"].shape[1]
    if len(prompts) != cache_rows:
        raise ValueError(f"{len(prompts)} prompts, but the cache has {cache_rows} rows")
    needed = max(len(prompt) for prompt in prompts) + max_new_tokens - 1
    if needed > capacity(cache):
        raise ValueError(
            f"the cache has room for {capacity(cache)} tokens per row, this generation needs {needed}"
        )
    if max_new_tokens == 0:  # nothing to yield; a prefill would write the whole prompt, one past a cache of
        return  # exactly the room asked for (a pre-training spec's sample.max_new_tokens: 0 crashed its run)
    device = cache["k"].device
    generator = torch.Generator(device).manual_seed(seed)
    stops = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    # Left-padded, every row's prompt ends at the last position: its logits are all the prefill needs.
    logits, cache = step(params, left_padded(prompts, device), cache, donate=donate, last_only=True)
    if copies > 1:
        logits, cache = logits.repeat_interleave(copies, 0), repeat_rows(cache, copies)
    texts: list[list[int]] = [[] for _ in range(len(prompts) * copies)]
    # A stop string completed by the newest token lies in the text of the last 4 x its length tokens (a token
    # is at least a byte, a character at most four); 8 tokens more keep a tokenizer's start-of-text rules (a
    # first token's space dropped, a character cut mid-bytes) away from it. Decoding each row's whole text at
    # every step (once per stop string) cost O(length^2): 1.2-1.4 s for SmolLM2's tokenizer, 64 rows x 256
    # tokens and three stop strings, against 0.14 s for the tail decoded once. Tokens that decode to nothing (a
    # special token that is no stop token) can push a stop string out of the tail: generation then runs on,
    # and its callers cut the whole text at the first stop string anyway.
    window = 4 * max(map(len, stop_strings), default=0) + 8
    live = torch.ones(len(texts), dtype=torch.bool, device=device)
    for index in range(max_new_tokens):
        token = choose(logits[:, -1], sampling, generator)
        emitted = live
        live = live & ~torch.isin(token, stops)
        if stop_strings:
            assert decode is not None
            hit = []
            for row, (new, was_live) in enumerate(zip(token.tolist(), emitted.tolist(), strict=True)):
                if was_live:
                    texts[row].append(new)
                tail = decode(texts[row][-window:]) if was_live else ""
                hit.append(any(stop in tail for stop in stop_strings))
            live = live & ~torch.tensor(hit, device=device)
        yield Emitted(tokens=token, emitted=emitted, cache=cache)
        if index == max_new_tokens - 1 or not bool(live.any()):
            return
        logits, cache = step(params, Batch(tokens=token[:, None]), cache, donate=True)


def generate(
    step: CachedForward,
    params: TensorDictBase,
    cache: TensorDictBase,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_tokens: Collection[int] = (),
    stop_strings: Collection[str] = (),
    decode: Callable[[list[int]], str] | None = None,
    copies: int = 1,
    donate: bool = False,
) -> list[list[int]]:
    """Each row's new tokens (its stop token, or the token completing a stop string, included): ``stream``
    collected; one row per prompt, or ``copies`` per prompt. ``donate`` as ``stream``'s."""
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * copies)]
    for step_tokens in stream(
        step,
        params,
        cache,
        prompts,
        max_new_tokens,
        sampling,
        seed,
        stop_tokens,
        stop_strings,
        decode,
        copies,
        donate=donate,
    ):
        rows = zip(step_tokens.tokens.tolist(), step_tokens.emitted.tolist(), strict=True)
        for output, (token, emitted) in zip(outputs, rows, strict=True):
            if emitted:
                output.append(token)
    return outputs
