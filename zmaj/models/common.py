"""What every architecture shares: the batch it reads and the attention mask that batch implies; for
generation with a key/value cache, where a batch of new tokens sits in the cache and what each may attend to;
and what a forward function is, with its config bound (:class:`Forward`, :class:`LazyForward`), as training
and LoRA take one, and its cached form (:class:`CachedForward`), as generation takes one."""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields, replace
from typing import Protocol, no_type_check, runtime_checkable

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.nn import masks
from zmaj.nn.attention import AttentionMask, Backend, prepare_mask
from zmaj.nn.layers import compiling_one_row, matvec
from zmaj.nn.loss import softcap


@dataclass(frozen=True)
class Batch:
    """Token rows plus what a packed or padded row needs to be read correctly.

    ``positions`` restart at 0 in each packed document (default: 0..seq-1), ``document_ids`` keep packed
    documents from attending to each other, ``is_token`` marks real tokens in padded rows. ``targets`` (the
    token after each position: ``targets[b, i]`` is the one ``tokens[b, i]`` predicts) and ``loss_mask`` (which
    positions the loss counts) are only read by losses.
    """

    tokens: Int[Tensor, "batch seq"]
    positions: Int[Tensor, "batch seq"] | None = None
    document_ids: Int[Tensor, "batch seq"] | None = None
    is_token: Bool[Tensor, "batch seq"] | None = None
    targets: Int[Tensor, "batch seq"] | None = None
    loss_mask: Bool[Tensor, "batch seq"] | None = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = {
            f.name: value.to(device, non_blocking=True)
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None
        }
        return replace(self, **moved)

    def position_ids(self) -> Int[Tensor, "batch seq"]:
        if self.positions is not None:
            return self.positions
        batch, seq = self.tokens.shape
        return torch.arange(seq, device=self.tokens.device).expand(batch, seq)


LayerParams = Callable[[TensorDictBase], TensorDictBase]

_materialize: ContextVar[LayerParams | None] = ContextVar("materialize", default=None)


def layers(blocks: TensorDictBase) -> Iterator[TensorDictBase]:
    """Each layer's parameters from blocks stacked ``[n_layers, ...]``, one layer at a time, as it computes.

    Every model walks its blocks through here rather than ``blocks.unbind(0)``, so that fully sharded training
    (``zmaj.train.parallel``), whose blocks hold only this process's piece of each tensor, has one place to
    gather a layer whole just before the layer runs: inside ``materializing(gather)``, the way autocast
    changes what a matmul computes in without the model saying so. Outside it, this is ``unbind``.
    """
    materialize = _materialize.get()
    for block in blocks.unbind(0):
        yield block if materialize is None else materialize(block)


@contextmanager
def materializing(materialize: LayerParams) -> Iterator[None]:
    """Within this context, :func:`layers` passes each layer's parameters through ``materialize`` first."""
    token = _materialize.set(materialize)
    try:
        yield
    finally:
        _materialize.reset(token)


def batch_mask(batch: Batch, backend: Backend, window: int | None = None) -> AttentionMask:
    """The attention mask a batch implies: causal (or a causal sliding window), documents, padding."""
    mods: list[masks.MaskMod] = [masks.causal if window is None else masks.sliding_window(window)]
    if batch.document_ids is not None:
        mods.append(masks.document(batch.document_ids))
    if batch.is_token is not None:
        mods.append(masks.padding(batch.is_token))
    mod = None if len(mods) == 1 and window is None else masks.combine(*mods)
    rows, seq = batch.tokens.shape
    return prepare_mask(mod, rows, seq, seq, backend, batch.tokens.device)


@dataclass(frozen=True)
class CacheStep:
    """Where a batch of new tokens goes in a key/value cache (layout in ``zmaj.infer.cache``), and where they are.

    ``slots`` are the cache slots the new tokens fill, the same for every row; ``positions`` are their absolute
    positions (what RoPE or a position table reads). ``key_positions`` and ``key_is_token`` describe every slot
    once the new tokens are written: its token's position, and whether it holds a real token (False for padding
    and for slots not written yet). ``length`` is the number of slots written afterwards.
    """

    slots: Int[Tensor, " q_seq"]
    positions: Int[Tensor, "batch q_seq"]
    key_positions: Int[Tensor, "batch k_seq"]
    key_is_token: Bool[Tensor, "batch k_seq"]
    length: Int[Tensor, ""]

    def write(
        self,
        cache: TensorDictBase,
        layer: int,
        k: Float[Tensor, "batch kv_heads q_seq head_dim"],
        v: Float[Tensor, "batch kv_heads q_seq head_dim"],
        donate: bool = False,
    ) -> tuple[
        Float[Tensor, "batch kv_heads k_seq head_dim"], Float[Tensor, "batch kv_heads k_seq head_dim"]
    ]:
        """Layer ``layer``'s keys and values with the new tokens' in their ``slots``: what its attention reads.

        By default new tensors (``index_copy``), so the caller's cache never changes. With ``donate`` the
        caller gives the cache up and the new keys and values go into its stacked buffers, indexed by layer
        and slot on the stacked tensor itself: Inductor copies the whole stack back when a layer's view of an
        input is written, but writes only the new slots when the input is indexed (``zmaj.infer.cache`` has
        the measurements). Eagerly that indexed write costs ~12 us more per write than ``index_copy_`` on the
        view (bf16, batch 1), 60 writes a step: 0.7 ms of an eager SmolLM2-135M bf16 step's ~75.
        """
        if not donate:
            cache_k, cache_v = cache["k"][layer], cache["v"][layer]
            return cache_k.index_copy(2, self.slots, k), cache_v.index_copy(2, self.slots, v)
        # The layer as a tensor index, not an int: an int would select the layer's view and write through it.
        # With the two index tensors apart, the indexed slots come first in the values' axes.
        layers = torch.full_like(self.slots, layer)
        for name, new in (("k", k), ("v", v)):
            cache[name][layers, :, :, self.slots] = rearrange(new, "b h q d -> q b h d")
        return cache["k"][layer], cache["v"][layer]  # views taken after the writes, as the graph reads them

    def advance(
        self,
        keys: Sequence[Float[Tensor, "batch kv_heads k_seq head_dim"]],
        values: Sequence[Float[Tensor, "batch kv_heads k_seq head_dim"]],
        written_into: TensorDictBase | None = None,
    ) -> TensorDict:
        """The cache after this step, from each layer's keys and values (``write``'s outputs).

        ``written_into`` is the cache ``write`` wrote into in place (``donate=True``): its stacked buffers
        already hold every layer's keys and values, so they are taken over, not stacked anew.
        """
        return TensorDict(
            {
                "k": torch.stack(list(keys)) if written_into is None else written_into["k"],
                "v": torch.stack(list(values)) if written_into is None else written_into["v"],
                "positions": self.key_positions,
                "is_token": self.key_is_token,
                "length": self.length,
            },
            batch_size=[],
        )


# runtime_checkable: beartype checks parameters annotated with a protocol by isinstance.
@runtime_checkable
class CachedForward(Protocol):
    """``step(params, batch, cache, donate=False, last_only=False) -> (logits [batch, seq, vocab], new_cache)``:
    a model's ``forward_cached``. ``donate=True`` lets it write into ``cache``'s buffers (``jax.jit``'s
    ``donate_argnums`` in spirit): the caller promises never to read that cache again (``CacheStep.write``).
    ``last_only=True`` returns the last position's logits alone (``[batch, 1, vocab]``), all a prefill needs."""

    def __call__(
        self,
        params: TensorDictBase,
        batch: Batch,
        cache: TensorDictBase,
        *,
        donate: bool = False,
        last_only: bool = False,
    ) -> tuple[Tensor, TensorDictBase]: ...


def cache_step(batch: Batch, cache: TensorDictBase) -> CacheStep:
    """Place ``batch``'s tokens in the next free slots of ``cache``.

    Positions are ``batch.positions`` when given; otherwise a token's position is the number of real tokens
    before it in its row, cache included. That default gives a left- or right-padded prompt, and every token
    decoded after it, the positions it would have alone, so padding changes nothing but the mask. The caller
    must leave room: a slot past the end of the cache is an indexing error. A cache holds one sequence a row,
    so packed documents (``batch.document_ids``) are refused: the cached mask would let them see each other.
    """
    if batch.document_ids is not None:
        raise ValueError(
            "a cached forward pass takes one sequence a row: packed documents (document_ids) would attend to "
            "each other; give each document its own row"
        )
    tokens = batch.tokens
    length: Tensor = cache["length"]
    cached_is_token: Tensor = cache["is_token"]
    slots = length + torch.arange(tokens.shape[1], device=tokens.device)
    is_token = batch.is_token if batch.is_token is not None else torch.ones_like(tokens, dtype=torch.bool)
    positions = batch.positions
    if positions is None:
        before = cached_is_token.sum(-1, keepdim=True)
        positions = (before + is_token.long().cumsum(-1) - 1).clamp(min=0)
    return CacheStep(
        slots=slots,
        positions=positions,
        key_positions=cache["positions"].index_copy(1, slots, positions),
        key_is_token=cached_is_token.index_copy(1, slots, is_token),
        length=length + tokens.shape[1],
    )


def cache_mask(step: CacheStep, window: int | None = None) -> Bool[Tensor, "batch q_seq k_seq"]:
    """What each new token may attend to among all cache slots: ``batch_mask`` for a cached forward pass.

    Causal over slots (a slot is filled after every slot to its left, so this is causal in time and hides the
    slots not written yet, as ``masks.offset_queries(masks.causal, length)`` would), no padding keys (a padding
    query still sees itself, as in ``masks.padding``), and with ``window``, only keys fewer than ``window``
    positions back (``masks.sliding_window``, over absolute positions, so right-padding gaps do not count).
    Gemma-style models build one mask per distinct window and pick each layer's.
    """
    batch, q_len = step.positions.shape
    k_len = step.key_positions.shape[1]
    return masks.dense(_cache_mod(step, window), batch, q_len, k_len, step.slots.device)


def _cache_mod(step: CacheStep, window: int | None) -> masks.MaskMod:
    """The mask mod of ``cache_mask``; ``q`` indexes the new tokens, ``k`` the cache slots."""

    @no_type_check
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        q_slot = step.slots[q]
        allowed = (k <= q_slot) & (step.key_is_token[b, k] | (k == q_slot))
        if window is not None:
            # Not positions[q] - key_positions[k] < window: that is an int64 [q, k] tensor, 8 bytes a pair.
            allowed = allowed & (step.key_positions[b, k] > step.positions[b, q] - window)
        return allowed

    typed: masks.MaskMod = mod  # mods are no_type_check (see zmaj.nn.masks), so mypy sees Any
    return typed


def unembed(
    params: TensorDictBase, hidden: Float[Tensor, "batch seq d_model"], tied: bool
) -> Float[Tensor, "batch seq vocab"]:
    """Logits from hidden states, through the embedding matrix itself when the two are tied (Press & Wolf, 2017).

    A compiled decode step at batch 1 takes ``matvec`` here too: PyTorch's GEMV streamed SmolLM2's embedding at
    12.7 GB/s, where Inductor's loop streams near the read bandwidth (24-27 of 28 GB/s; AVX2-only EPYC, fp32,
    ``benchmarks/README.md``, session 23). Not measured since on the AMX Xeon, where the unembedding through
    ``matvec`` was slower before ``matvec`` stored its input, nor on GPUs.
    """
    weight = unembedding(params, tied)
    if compiling_one_row(hidden):
        return matvec(weight, hidden)
    return hidden @ weight.T


def unembedding(params: TensorDictBase, tied: bool) -> Float[Tensor, "vocab d_model"]:
    """The matrix that maps hidden states to logits: the embedding itself when the two are tied."""
    weight: Tensor = params["embed", "weight"] if tied else params["unembed", "weight"]
    return weight


@dataclass(frozen=True)
class LazyLogits:
    """Logits not computed yet: the final hidden states and the unembedding that maps them to the vocabulary.

    What a model's ``lazy_forward`` returns, so that a training loss can compute the logits a chunk of positions
    at a time and never hold all of them (``zmaj.nn.loss.chunked_cross_entropy``): ``[batch, seq, vocab]`` is a
    small model's largest activation by far. ``logits()`` is what the model's ``forward`` returns.
    """

    hidden: Float[Tensor, "batch seq d_model"]
    weight: Float[Tensor, "vocab d_model"]
    softcap: float | None = None  # logits become softcap * tanh(logits / softcap) (Gemma 2)

    def logits(self) -> Float[Tensor, "batch seq vocab"]:
        return softcap(self.hidden @ self.weight.T, self.softcap)


@runtime_checkable
class Forward(Protocol):
    """``forward(params, batch, dropout_seed=...) -> logits``: a model's pure forward with its config bound."""

    def __call__(
        self, params: TensorDictBase, batch: Batch, *, dropout_seed: int | None
    ) -> Float[Tensor, "batch seq vocab"]: ...


@runtime_checkable
class LazyForward(Protocol):
    """``forward(params, batch, dropout_seed=...) -> LazyLogits``: a model's ``lazy_forward`` with its config
    bound. The training loss then unembeds a chunk of positions at a time
    (``zmaj.train.step.summed_loss``)."""

    def __call__(self, params: TensorDictBase, batch: Batch, *, dropout_seed: int | None) -> LazyLogits: ...
