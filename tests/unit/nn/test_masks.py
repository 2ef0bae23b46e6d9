"""Properties of the mask mods, their dense form and their flex BlockMask form."""

from collections.abc import Callable

import torch
from hypothesis import given
from hypothesis import strategies as st

from tests import strategies
from zmaj.nn import masks


def naive_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal reference built document by document: a causal square per document span."""
    batch, seq = document_ids.shape
    out = torch.zeros(batch, seq, seq, dtype=torch.bool)
    for b in range(batch):
        start = 0
        while start < seq:
            end = start
            while end < seq and document_ids[b, end] == document_ids[b, start]:
                end += 1
            out[b, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            start = end
    return out


MaskSetup = tuple[Callable[[torch.device], masks.MaskMod], int, int, torch.Tensor]


@st.composite
def mask_setups(draw: st.DrawFn) -> MaskSetup:
    """A random composition of causal / sliding-window / document / padding masks, with its real-token mask.

    The mask comes as a function of the device, since the document and padding mods hold their tensors.
    """
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 48))
    first = draw(st.sampled_from([masks.causal, masks.sliding_window(draw(st.integers(1, 8)))]))
    ids = draw(strategies.document_ids(batch, seq)) if draw(st.booleans()) else None
    is_token = torch.ones(batch, seq, dtype=torch.bool)
    padded = draw(st.booleans())
    if padded:
        is_token = masks.lengths_to_is_token(draw(strategies.lengths(batch, seq)), seq)

    def mod(device: torch.device) -> masks.MaskMod:
        mods: list[masks.MaskMod] = [first]
        if ids is not None:
            mods.append(masks.document(ids.to(device)))
        if padded:
            mods.append(masks.padding(is_token.to(device)))
        return masks.combine(*mods)

    return mod, batch, seq, is_token


@given(seq=st.integers(1, 64))
def test_causal_never_sees_a_later_key(device: torch.device, seq: int) -> None:
    mask = masks.dense(masks.causal, 1, seq, seq, device)[0]
    positions = torch.arange(seq, device=device)
    q, k = torch.meshgrid(positions, positions, indexing="ij")
    assert not mask[k > q].any()
    assert mask[k <= q].all()


@given(st.data(), st.integers(1, 3), st.integers(1, 48))
def test_document_mask_never_crosses_documents(
    device: torch.device, data: st.DataObject, batch: int, seq: int
) -> None:
    ids = data.draw(strategies.document_ids(batch, seq)).to(device)
    mask = masks.dense(masks.document(ids), batch, seq, seq, device)
    same_document = ids[:, :, None] == ids[:, None, :]
    assert torch.equal(mask, same_document)


@given(st.data(), st.integers(1, 3), st.integers(1, 48))
def test_causal_document_mask_equals_naive_block_diagonal(
    device: torch.device, data: st.DataObject, batch: int, seq: int
) -> None:
    ids = data.draw(strategies.document_ids(batch, seq))
    mask = masks.dense(masks.combine(masks.causal, masks.document(ids.to(device))), batch, seq, seq, device)
    assert torch.equal(mask, naive_document_mask(ids).to(device))


@given(mask_setups())
def test_every_row_has_an_allowed_key(device: torch.device, setup: MaskSetup) -> None:
    mod, batch, seq, is_token = setup[0](device), setup[1], setup[2], setup[3].to(device)
    mask = masks.dense(mod, batch, seq, seq, device)
    assert mask.any(-1).all(), "an empty row would make softmax produce NaN"
    # Real queries never see padding: only the padding queries' own diagonal entry touches a padding key.
    assert not (mask & is_token[:, :, None] & ~is_token[:, None, :]).any()


@given(mask_setups(), mask_setups())
def test_combine_is_logical_and(device: torch.device, first: MaskSetup, second: MaskSetup) -> None:
    batch, seq = min(first[1], second[1]), min(first[2], second[2])
    a, b = first[0](device), second[0](device)
    expected = masks.dense(a, batch, seq, seq, device) & masks.dense(b, batch, seq, seq, device)
    assert torch.equal(masks.dense(masks.combine(a, b), batch, seq, seq, device), expected)


@given(seq=st.integers(1, 64), extra=st.integers(0, 10))
def test_sliding_window_at_least_the_sequence_is_causal(device: torch.device, seq: int, extra: int) -> None:
    window = masks.dense(masks.sliding_window(seq + extra), 1, seq, seq, device)
    assert torch.equal(window, masks.dense(masks.causal, 1, seq, seq, device))


@given(seq=st.integers(1, 64), window=st.integers(1, 16))
def test_sliding_window_sees_exactly_the_last_window_keys(
    device: torch.device, seq: int, window: int
) -> None:
    allowed = masks.dense(masks.sliding_window(window), 1, seq, seq, device)[0].sum(-1)
    assert torch.equal(allowed, torch.clamp(torch.arange(seq, device=device) + 1, max=window))


@given(st.data(), st.integers(1, 3), st.integers(1, 32))
def test_padding_allows_every_real_key_and_a_padding_query_itself(
    device: torch.device, data: st.DataObject, batch: int, seq: int
) -> None:
    """Against the naive form: key k is allowed where it is a token, and on the diagonal (so that a padding
    query's row is never empty); ``lengths_to_is_token`` marks the first ``length`` positions."""
    lengths = data.draw(strategies.lengths(batch, seq)).to(device)
    is_token = masks.lengths_to_is_token(lengths, seq)
    assert torch.equal(is_token, torch.arange(seq, device=device) < lengths[:, None])
    expected = is_token[:, None, :] | torch.eye(seq, dtype=torch.bool, device=device)
    assert torch.equal(masks.dense(masks.padding(is_token), batch, seq, seq, device), expected)


@given(seq=st.integers(2, 32), offset=st.integers(0, 16))
def test_offset_queries_is_a_slice_of_the_full_mask(device: torch.device, seq: int, offset: int) -> None:
    full = masks.dense(masks.causal, 1, offset + seq, offset + seq, device)[:, offset:]
    shifted = masks.dense(masks.offset_queries(masks.causal, offset), 1, seq, offset + seq, device)
    assert torch.equal(shifted, full)


def test_additive_bias_is_zero_where_allowed_and_minus_inf_elsewhere(device: torch.device) -> None:
    mask = masks.dense(masks.causal, 1, 4, 4, device)
    bias = masks.additive_bias(mask)
    assert torch.equal(bias[mask], torch.zeros(int(mask.sum()), device=device))
    assert torch.isneginf(bias[~mask]).all()


@given(mask_setups(), st.sampled_from([16, 32]))
def test_block_mask_admits_exactly_the_dense_pairs(
    device: torch.device, setup: MaskSetup, block_size: int
) -> None:
    mod, batch, seq = setup[0](device), setup[1], setup[2]
    block = masks.block_mask(mod, batch, seq, seq, device, block_size=block_size)
    assert torch.equal(masks.block_mask_to_dense(block), masks.dense(mod, batch, seq, seq, device))


def test_block_mask_skips_tiles_outside_documents(device: torch.device) -> None:
    """Four 64-token documents in 256 tokens with 32-token tiles: only the diagonal tiles of each document."""
    ids = (torch.arange(256, device=device) // 64)[None]
    block = masks.block_mask(
        masks.combine(masks.causal, masks.document(ids)), 1, 256, 256, device, block_size=32
    )
    assert block.full_kv_num_blocks is not None
    partial, full = int(block.kv_num_blocks.sum()), int(block.full_kv_num_blocks.sum())
    assert (partial, full) == (
        4 * 2,
        4 * 1,
    )  # per document of 2x2 tiles: 2 diagonal (partial), 1 below (full)
