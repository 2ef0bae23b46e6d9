from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.utils.data import DataLoader

from tests.strategies import seeds, token_files
from zmaj.data.dataset import LMDataset, Mode, collate, stream_batch
from zmaj.data.tokens import TokenFile
from zmaj.models.common import Batch

seq_lens = st.integers(1, 12)


def _rows(dataset: LMDataset) -> list[dict[str, Tensor]]:
    return [dataset[i] for i in range(len(dataset))]


def _document_of(token_file: TokenFile, tokens: Tensor) -> np.ndarray:
    """Which document each token came from: the strategy's token values are their file indices."""
    return np.searchsorted(token_file.offsets, tokens.numpy(), side="right") - 1


@given(token_files(), seq_lens, seeds)
def test_packing_neither_loses_nor_duplicates_tokens(token_file: TokenFile, seq_len: int, seed: int) -> None:
    rows = _rows(LMDataset(token_file, seq_len, "pack", seed))
    inputs = Counter(int(t) for row in rows for t in row["tokens"])
    dropped = Counter(token_file.tokens.tolist()) - inputs
    # Every input is a distinct token of the file, and what no row reads as input is less than one row's worth
    # plus the overlap token: the stream's tail, cut because it does not fill a row.
    assert not inputs - Counter(token_file.tokens.tolist())
    assert sum(inputs.values()) == len(rows) * seq_len
    assert 1 <= dropped.total() <= seq_len


@given(token_files(), seq_lens, seeds)
def test_rows_tile_the_shuffled_stream(token_file: TokenFile, seq_len: int, seed: int) -> None:
    dataset = LMDataset(token_file, seq_len, "pack", seed)
    assert sorted(dataset.document_order.tolist()) == list(range(token_file.n_documents))
    stream = np.concatenate([token_file.document(int(d)) for d in dataset.document_order]).astype(np.int64)
    starts = []
    for row in _rows(dataset):
        start = int(np.flatnonzero(stream == int(row["tokens"][0]))[0])
        assert row["tokens"].tolist() == stream[start : start + seq_len].tolist()
        assert row["targets"].tolist() == stream[start + 1 : start + seq_len + 1].tolist()
        starts.append(start)
    # Rows overlap by exactly one token (a row's last target is the next row's first input), none is skipped.
    assert sorted(starts) == list(range(0, len(starts) * seq_len, seq_len))
    assert len(stream) - len(starts) * seq_len in range(1, seq_len + 1)


@given(token_files(), seq_lens, seeds)
def test_document_ids_positions_and_loss_mask_follow_the_documents(
    token_file: TokenFile, seq_len: int, seed: int
) -> None:
    for row in _rows(LMDataset(token_file, seq_len, "pack", seed)):
        source = _document_of(token_file, row["tokens"])
        target_source = _document_of(token_file, row["targets"])
        new_document = np.concatenate([[False], source[1:] != source[:-1]])
        assert row["document_ids"].tolist() == np.cumsum(new_document).tolist()
        index_in_document = row["tokens"].numpy() - token_file.offsets[source]
        for j in range(seq_len):
            first = int(np.flatnonzero(source == source[j])[0])
            # A document starting in the row counts from 0 there; one continued from the previous row, from
            # the row start.
            assert row["positions"][j] == j - first
            assert row["positions"][j] == index_in_document[j] - index_in_document[first]
        assert row["loss_mask"].tolist() == (source == target_source).tolist()
        first_of_document = row["targets"].numpy() == token_file.offsets[target_source]
        last_of_document = row["targets"].numpy() == token_file.offsets[target_source + 1] - 1
        # The eos is a target of its own document's last token; no document's first token is ever a target.
        assert row["loss_mask"][torch.from_numpy(last_of_document & ~first_of_document)].all()
        assert not row["loss_mask"][torch.from_numpy(first_of_document)].any()


@given(token_files(), seq_lens, seeds)
def test_padding_holds_one_truncated_document_per_row(token_file: TokenFile, seq_len: int, seed: int) -> None:
    rows = _rows(LMDataset(token_file, seq_len, "pad", seed))
    firsts = sorted(int(row["tokens"][0]) for row in rows)
    assert firsts == token_file.offsets[:-1].tolist()
    for row in rows:
        document = int(_document_of(token_file, row["tokens"][:1])[0])
        n = min(int(np.diff(token_file.offsets)[document]), seq_len + 1)
        ids = torch.cat([row["tokens"], row["targets"][-1:]])
        assert ids[:n].tolist() == token_file.document(document)[:n].tolist()
        assert ids[n:].eq(token_file.pad_id).all()
        index = torch.arange(seq_len)
        assert row["is_token"].equal(index < n)
        assert row["loss_mask"].equal(index < n - 1)
        assert row["targets"][row["loss_mask"]].equal(row["tokens"][row["loss_mask"]] + 1)


@pytest.mark.parametrize("mode", ["pack", "pad"])
@given(token_file=token_files(), seq_len=seq_lens, seed=seeds)
def test_same_seed_same_rows(mode: Mode, token_file: TokenFile, seq_len: int, seed: int) -> None:
    first, second = (_rows(LMDataset(token_file, seq_len, mode, seed)) for _ in range(2))
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_different_seeds_shuffle_differently(mode: Mode) -> None:
    offsets = np.arange(0, 20 * 7 + 1, 7, dtype=np.int64)  # 20 documents of 7 tokens
    token_file = TokenFile(np.arange(140, dtype=np.uint16), offsets, vocab_size=141, eos_id=140, pad_id=140)
    orders = [
        [int(row["tokens"][0]) for row in _rows(LMDataset(token_file, 5, mode, seed))] for seed in (0, 1)
    ]
    assert orders[0] != orders[1]
    if mode == "pad":  # the same rows, in another order
        assert sorted(orders[0]) == sorted(orders[1])


def test_packing_lays_the_documents_in_an_order_the_seed_shuffles() -> None:
    """Neighbouring documents of the corpus (one package's files) do not share rows by default: the row shuffle
    alone, which the test above also sees, left each row's documents in corpus order."""
    offsets = np.arange(0, 20 * 7 + 1, 7, dtype=np.int64)
    token_file = TokenFile(np.arange(140, dtype=np.uint16), offsets, vocab_size=141, eos_id=140, pad_id=140)
    orders = [LMDataset(token_file, 5, "pack", seed).document_order.tolist() for seed in (0, 1)]
    assert orders[0] != orders[1]
    for order in orders:
        assert sorted(order) == list(range(20))
        assert order != list(range(20))
    # The rows, in whatever order they are read, tile the documents laid out in that order.
    dataset = LMDataset(token_file, 5, "pack", 0)
    stream = np.concatenate([token_file.tokens[offsets[d] : offsets[d + 1]] for d in orders[0]])
    rows = _rows(dataset)
    assert {tuple(row["tokens"].tolist()) for row in rows} == {
        tuple(stream[k * 5 : k * 5 + 5].tolist()) for k in range(len(rows))
    }


def test_too_short_a_stream_gives_no_rows() -> None:
    token_file = TokenFile(np.arange(4, dtype=np.uint16), np.array([0, 4]), vocab_size=5, eos_id=4, pad_id=4)
    assert len(LMDataset(token_file, 3, "pack", 0)) == 1
    assert len(LMDataset(token_file, 4, "pack", 0)) == 0


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_data_loader_collates_batches(mode: Mode) -> None:
    offsets = np.array([0, 3, 10, 11, 30, 31, 40], dtype=np.int64)
    token_file = TokenFile(np.arange(40, dtype=np.uint16), offsets, vocab_size=41, eos_id=40, pad_id=40)
    dataset = LMDataset(token_file, 8, mode, 0)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert isinstance(batch, Batch)
    assert batch.tokens.shape == batch.targets.shape == batch.loss_mask.shape == (3, 8)  # type: ignore[union-attr]
    assert batch.tokens.dtype == torch.long
    if mode == "pack":
        assert batch.is_token is None
        assert batch.document_ids is not None
        assert batch.positions is not None
    else:
        assert batch.document_ids is None
        assert batch.positions is None
        assert batch.is_token is not None
        assert batch.is_token.dtype == torch.bool


@given(token_files(), st.integers(0, 200), st.integers(1, 40))
def test_the_stream_repeats_the_row_order_epoch_after_epoch(
    token_file: TokenFile, start: int, taken: int
) -> None:
    dataset = LMDataset(token_file, 2, "pad", 0)
    n = len(dataset)
    batch = stream_batch(dataset, range(start, start + taken))
    for i, position in enumerate(range(start, start + taken)):
        assert torch.equal(batch.tokens[i], dataset[position % n]["tokens"])
    epoch = stream_batch(dataset, range(3 * n, 4 * n))  # any whole epoch visits every row once
    assert sorted(epoch.tokens[:, 0].tolist()) == sorted(int(row["tokens"][0]) for row in _rows(dataset))


def test_an_empty_stream_is_refused_by_name() -> None:
    token_file = TokenFile(np.arange(4, dtype=np.uint16), np.array([0, 4]), vocab_size=5, eos_id=4, pad_id=4)
    with pytest.raises(ValueError, match="no rows"):
        stream_batch(LMDataset(token_file, 4, "pack", 0), range(1))
