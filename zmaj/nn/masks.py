"""Attention masks as composable predicates over (batch, head, query, key) indices.

Every mask here is a *mask mod*: a pure function ``mod(b, h, q, k) -> Bool`` that says whether query ``q`` of
row ``b`` may attend to key ``k`` (True = may attend). This is exactly the interface of PyTorch's
flex-attention (https://pytorch.org/blog/flexattention/), so one definition serves every backend:

- ``dense`` evaluates a mod on broadcast index grids and gives the boolean ``[batch, q_seq, k_seq]`` matrix that
  the eager and SDPA backends use (``additive_bias`` turns it into ``0 / -inf``);
- ``block_mask`` hands the same mod to ``create_block_mask``, which records which 128x128 tiles hold any allowed
  pair, so flex-attention skips the rest (packed documents cost in proportion to their blocks).

Mods combine by logical AND (``combine``). Indices are positions in the key sequence: a block of fewer queries
than keys, the last ones (``zmaj.nn.attention.prepare_mask``), shifts its query indices with ``offset_queries``;
cached decoding masks by cache slot instead (``zmaj.models.common.cache_mask``).
"""

from collections.abc import Callable
from typing import no_type_check

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""``mod(b, h, q, k) -> Bool``; the index tensors broadcast against each other.

The mods themselves are marked ``no_type_check``: flex-attention traces them with dynamo, and a runtime shape
checker's bookkeeping (a global memo stack) is a side effect that tracing refuses.
"""


@no_type_check
def causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """A query sees itself and the past, never the future."""
    return q >= k


def sliding_window(window: int) -> MaskMod:
    """Causal attention to the last ``window`` keys only (the query itself included), as in Mistral and Gemma 3."""
    if window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")

    @no_type_check
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        # k > q - window, not q - k < window: the difference would be an int64 [q, k] tensor, 8 bytes a pair.
        return (q >= k) & (k > q - window)

    return mod


def document(document_ids: Int[Tensor, "batch seq"]) -> MaskMod:
    """Block-diagonal attention: a token sees only tokens of its own document.

    This is what keeps documents packed into one row independent (the "document masking" of packed
    pre-training, e.g. Llama 3 and torchtitan).
    """

    @no_type_check
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return document_ids[b, q] == document_ids[b, k]

    return mod


def padding(is_token: Bool[Tensor, "batch seq"]) -> MaskMod:
    """No query attends to a padding key.

    A padding *query* may still attend to itself. Its output is never used (the loss ignores it), but this way no
    row of the mask is empty, so no backend ever normalises a softmax over nothing and produces NaN.
    """

    @no_type_check
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return is_token[b, k] | (q == k)

    return mod


def lengths_to_is_token(lengths: Int[Tensor, " batch"], seq_len: int) -> Bool[Tensor, "batch seq"]:
    """Right-padded rows: the first ``lengths[b]`` positions of row ``b`` are tokens."""
    return torch.arange(seq_len, device=lengths.device) < lengths[:, None]


def combine(*mods: MaskMod) -> MaskMod:
    """Logical AND of masks: a pair is allowed only if every mask allows it."""
    if not mods:
        raise ValueError("combine needs at least one mask")

    @no_type_check
    def mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        allowed = mods[0](b, h, q, k)
        for other in mods[1:]:
            allowed = allowed & other(b, h, q, k)
        return allowed

    return mod


def offset_queries(mod: MaskMod, offset: int) -> MaskMod:
    """The same mask for a query block whose first query sits at key position ``offset``."""

    @no_type_check
    def shifted(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return mod(b, h, q + offset, k)

    return shifted


def dense(
    mod: MaskMod, batch: int, q_len: int, k_len: int, device: torch.device | str = "cpu"
) -> Bool[Tensor, "batch q_seq k_seq"]:
    """Evaluate a mask mod on every (row, query, key) triple."""
    b = torch.arange(batch, device=device)[:, None, None]
    h = torch.zeros((), dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device)[None, :, None]
    k = torch.arange(k_len, device=device)[None, None, :]
    return mod(b, h, q, k).expand(batch, q_len, k_len)


def additive_bias(
    mask: Bool[Tensor, "*batch q_seq k_seq"], dtype: torch.dtype = torch.float32
) -> Float[Tensor, "*batch q_seq k_seq"]:
    """The textbook form of a mask: add 0 where attention is allowed and -inf where it is not."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    minus_inf = torch.full((), float("-inf"), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, minus_inf)


def block_mask(
    mod: MaskMod,
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device | str = "cpu",
    block_size: int = 128,
) -> BlockMask:
    """The flex-attention form of a mask: which tiles to compute, and the mod to apply inside partial tiles."""
    return create_block_mask(mod, batch, None, q_len, k_len, device=str(device), BLOCK_SIZE=block_size)


def block_mask_to_dense(mask: BlockMask) -> Bool[Tensor, "batch q_seq k_seq"]:
    """Every (q, k) pair that flex-attention will let through, read back from the block structure.

    A pair is admitted when its tile is listed as full, or listed as partial and the mod allows the pair. Used to
    check that the block structure never drops (or adds) a pair the boolean mask allows.
    """
    batch, _, q_len, k_len = mask.shape
    q_block, k_block = mask.BLOCK_SIZE
    grid = (batch, mask.kv_num_blocks.shape[-1], -(-k_len // k_block))
    partial = _tiles(mask.kv_num_blocks[:, 0], mask.kv_indices[:, 0], grid)
    full = torch.zeros(grid, dtype=torch.bool)
    if mask.full_kv_num_blocks is not None and mask.full_kv_indices is not None:
        full = _tiles(mask.full_kv_num_blocks[:, 0], mask.full_kv_indices[:, 0], grid)

    def per_pair(tiles: Tensor) -> Tensor:
        pairs = tiles.repeat_interleave(q_block, 1).repeat_interleave(k_block, 2)
        return pairs[:, :q_len, :k_len].to(mask.kv_num_blocks.device)

    return per_pair(full) | (
        per_pair(partial) & dense(mask.mask_mod, batch, q_len, k_len, mask.kv_num_blocks.device)
    )


def _tiles(
    num_blocks: Int[Tensor, "batch q_blocks"],
    indices: Int[Tensor, "batch q_blocks max_blocks"],
    grid: tuple[int, int, int],
) -> Bool[Tensor, "batch q_blocks k_blocks"]:
    """Scatter a BlockMask's rows of (count, key-tile indices) into a boolean tile grid."""
    tiles = torch.zeros(grid, dtype=torch.bool)
    for b in range(grid[0]):
        for q_tile in range(grid[1]):
            n = int(num_blocks[b, q_tile])
            tiles[b, q_tile, indices[b, q_tile, :n].long().cpu()] = True
    return tiles
