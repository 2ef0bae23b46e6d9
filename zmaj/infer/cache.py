"""The key/value cache of autoregressive decoding: a preallocated TensorDict whose shapes never change.

A decoder's keys and values for a token depend only on the tokens up to it, so generation can compute them once
and keep them: each decode step then runs the model on one new token per row instead of the whole sequence
(fairseq's "incremental decoding"; Pope et al., 2022, "Efficiently Scaling Transformer Inference",
arXiv:2211.05102, weigh its memory against batch size and context). The cache is one TensorDict:

- ``k``, ``v``: ``[layers, batch, kv_heads, max_len, head_dim]``, stacked over layers like the parameters, so
  ``cache["k"].unbind(0)`` pairs with ``params["blocks"].unbind(0)``;
- ``positions``: ``[batch, max_len]``, the absolute position of the token in each slot;
- ``is_token``: ``[batch, max_len]``, True where a slot holds a real token (not padding, not yet written);
- ``length``: a 0-d tensor, how many slots are written (the same for every row: a padded prompt fills its
  padding slots too, which ``is_token`` then hides).

Every shape is fixed by ``max_len`` and the length is a tensor, not a Python int, so a compiled decode step
sees the same graph at every position. On the CPU, attention reads the length and attends over the written
slots alone, eagerly and compiled through ``zmaj.infer.generate.compile_step``, so it costs what is written,
not what was allocated. A model's ``forward_cached(params, batch, cache, config)`` returns ``(logits,
new_cache)``; ``zmaj.models.common.cache_step``, ``CacheStep.write`` and ``cache_mask`` do the bookkeeping and
the writing, and ``zmaj.nn.attention.cached_attention`` the attending, so a model adds cached decoding in a
few lines.

Writes are out of place by default: a step returns a new cache and never changes the one it was given, so one
empty cache can start any number of generations, and a prefilled cache can be branched (``repeat_rows``). That
costs two copies of the cache per step (one per layer in ``CacheStep.write``, one stacking the layers). Out of
place against in place, for a SmolLM2-135M-shaped Llama: at batch 1 in float32, 12.6 against 13.5 tokens/s
with a 96-slot cache and 8.0 against 12.3 with a 2048-slot one (an early ``index_copy_`` experiment); at batch
128 in bf16, 297 against 194 ms per step (``donate=True``). So a decode loop that owns its cache donates it
(``forward_cached(..., donate=True)``, as ``jax.jit(donate_argnums=...)`` lets XLA do): the step writes into
the given buffers and returns them. ``zmaj.infer.generate.stream`` prefills out of place, then donates every
step. Compiled steps write in place too: ``CacheStep.write`` writes through the stacked tensor, which Inductor
turns into a write of the new slots alone (through a layer's view, it copied the whole stack back instead).
SmolLM2-135M, bf16, batch 1, 63 steps a round, 6 interleaved rounds in one process (session 19): 35.2 against
48.9 ms a token with a 2071-slot cache, 23.6 against 23.6 with a 71-slot one, the same tokens.
"""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from tensordict import TensorDict, TensorDictBase


@runtime_checkable
class CacheShape(Protocol):
    """What sizes a cache; every zmaj model config has these (GPT's ``n_kv_heads`` is its ``n_heads``)."""

    @property
    def n_layers(self) -> int: ...

    @property
    def n_kv_heads(self) -> int: ...

    @property
    def head_dim(self) -> int: ...


def init_cache(
    config: CacheShape,
    batch: int,
    max_len: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TensorDict:
    """An empty cache with room for ``max_len`` tokens per row; ``dtype`` should be the model's activations'."""
    if max_len < 1 or batch < 1:
        raise ValueError(f"a cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
    return TensorDict(
        {
            "k": torch.zeros(shape, dtype=dtype, device=device),
            "v": torch.zeros(shape, dtype=dtype, device=device),
            "positions": torch.zeros(batch, max_len, dtype=torch.long, device=device),
            "is_token": torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            "length": torch.zeros((), dtype=torch.long, device=device),
        },
        batch_size=[],
    )


def capacity(cache: TensorDictBase) -> int:
    """How many more tokens per row the cache can take."""
    return int(cache["k"].shape[3]) - int(cache["length"])


def repeat_rows(cache: TensorDictBase, copies: int) -> TensorDict:
    """Each row ``copies`` times over, row ``i`` becoming rows ``i * copies`` to ``i * copies + copies - 1``.

    A prefilled prompt then branches into several continuations: GRPO's group of answers to one question reads
    the question's keys and values from one prefill instead of computing them once per answer.
    """
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    assert set(cache.keys()) == {"k", "v", "positions", "is_token", "length"}, (
        "a new cache field needs a row axis here"
    )
    return TensorDict(
        {
            "k": cache["k"].repeat_interleave(copies, 1),
            "v": cache["v"].repeat_interleave(copies, 1),
            "positions": cache["positions"].repeat_interleave(copies, 0),
            "is_token": cache["is_token"].repeat_interleave(copies, 0),
            "length": cache["length"],
        },
        batch_size=[],
    )


def prefix(cache: TensorDictBase, length: int, max_len: int) -> TensorDict:
    """The cache's first ``length`` slots, in a new cache of ``max_len`` slots; the slots after them are empty.

    What a conversation keeps of its cache when the next prompt agrees with the cached tokens only that far
    (``zmaj.infer.chat``): keys and values depend only on the tokens up to theirs, so a slot's content stays
    right as long as every token before it is unchanged, and the positions of the tokens written next follow
    from the ``is_token`` kept (``zmaj.models.common.cache_step``).
    """
    if not 0 <= length <= min(int(cache["length"]), max_len):
        raise ValueError(
            f"cannot keep {length} slots of a cache of {int(cache['length'])} tokens in {max_len} slots"
        )
    assert set(cache.keys()) == {"k", "v", "positions", "is_token", "length"}, (
        "a new cache field needs a slot axis here"
    )
    k: torch.Tensor = cache["k"]
    layers, batch, heads, _, head_dim = k.shape
    kept = init_cache(_Shape(layers, heads, head_dim), batch, max_len, k.dtype, k.device)
    for name, axis in (("k", 3), ("v", 3), ("positions", 1), ("is_token", 1)):
        kept[name].narrow(axis, 0, length).copy_(cache[name].narrow(axis, 0, length))
    kept["length"] = torch.tensor(length, device=k.device)
    return kept


@dataclass(frozen=True)
class _Shape:
    """A ``CacheShape`` read off an existing cache."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
