"""Rows for next-token prediction, cut from a token file by packing documents or by padding each one.

**pack** (the default of GPT-style pre-training): documents, in an order shuffled by the seed, are laid back to
back into one stream, and row ``r`` is ``stream[r * seq_len : r * seq_len + seq_len + 1]``: the first ``seq_len``
tokens are the inputs, the last ``seq_len`` the targets. Neighbouring rows share one token (the last target of a
row is the first input of the next), so the inputs tile the stream and every transition is trained exactly once;
only the final ``< seq_len`` tokens of the stream are dropped. No compute is spent on padding, and what packing
would otherwise leak is masked instead (as in Llama 3 and torchtitan):

- ``document_ids`` number the documents of a row from 0, so attention stays inside each one;
- ``positions`` restart at 0 where a document starts. A document continued from the previous row counts from 0
  at the row start (not from its true offset), so positions stay below ``seq_len`` and learned absolute position
  tables never overflow; within a row, what a token can see is exactly what its position says;
- ``loss_mask`` is false where input and target belong to different documents. A document's last token *is*
  trained to predict its ``<|eos|>`` (the model learns to end documents); that ``<|eos|>`` is *not* trained to
  predict the next document's first token, which it cannot know. So no document's first token is ever a target.

**pad**: one document per row, truncated to ``seq_len + 1`` tokens and right-padded; ``is_token`` marks the real
inputs and ``loss_mask`` the inputs whose target is real. Simpler and wasteful; it suits short documents.

Rows are visited in an order shuffled by the seed, so a plain ``DataLoader(dataset, batch_size, collate_fn=collate)``
is deterministic; ``stream_batch`` reads the rows of any stretch of the endless stream of epochs.
"""

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from zmaj.data.tokens import TokenFile
from zmaj.models.common import Batch

Mode = Literal["pack", "pad"]


class LMDataset(Dataset[dict[str, Tensor]]):
    """Row ``i`` as a dict of ``[seq]`` tensors named like the fields of ``Batch``; see the module docstring."""

    def __init__(self, token_file: TokenFile, seq_len: int, mode: Mode, seed: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.token_file = token_file
        self.seq_len = seq_len
        self.mode = mode
        rng = np.random.default_rng(seed)
        lengths = np.diff(token_file.offsets)
        self.document_order = rng.permutation(token_file.n_documents)
        # starts[k]: where the k-th document of the shuffled order begins in the packed stream.
        self._starts = np.concatenate([[0], np.cumsum(lengths[self.document_order])])
        n_rows = max(0, (int(self._starts[-1]) - 1) // seq_len) if mode == "pack" else token_file.n_documents
        self.row_order = rng.permutation(n_rows)

    def __len__(self) -> int:
        return len(self.row_order)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        row = int(self.row_order[index])
        return self._packed(row) if self.mode == "pack" else self._padded(row)

    def _packed(self, row: int) -> dict[str, Tensor]:
        begin = row * self.seq_len
        end = begin + self.seq_len + 1
        first, last = np.searchsorted(self._starts, [begin, end - 1], side="right") - 1
        tokens, document, document_start = [], [], []
        for local, k in enumerate(range(first, last + 1)):
            lo, hi = max(begin, self._starts[k]), min(end, self._starts[k + 1])
            offset = self.token_file.offsets[self.document_order[k]] - self._starts[k]
            tokens.append(self.token_file.tokens[offset + lo : offset + hi].astype(np.int64))
            document.append(np.full(hi - lo, local))
            document_start.append(lo - begin)
        ids = torch.from_numpy(np.concatenate(tokens))
        documents = torch.from_numpy(np.concatenate(document))
        input_documents = documents[:-1]
        starts = torch.tensor(document_start)
        return {
            "tokens": ids[:-1],
            "targets": ids[1:],
            "positions": torch.arange(self.seq_len) - starts[input_documents],
            "document_ids": input_documents,
            "loss_mask": input_documents == documents[1:],
        }

    def _padded(self, row: int) -> dict[str, Tensor]:
        document = self.token_file.document(row)[: self.seq_len + 1]
        n = len(document)
        ids = torch.full((self.seq_len + 1,), self.token_file.pad_id, dtype=torch.long)
        ids[:n] = torch.from_numpy(document.astype(np.int64))
        index = torch.arange(self.seq_len)
        return {"tokens": ids[:-1], "targets": ids[1:], "is_token": index < n, "loss_mask": index < n - 1}


def collate(items: Sequence[dict[str, Tensor]]) -> Batch:
    """Stack rows into a ``Batch``: the ``collate_fn`` of a ``DataLoader`` over an ``LMDataset``."""
    return Batch(**{name: torch.stack([item[name] for item in items]) for name in items[0]})


def stream_batch(dataset: LMDataset, positions: Iterable[int]) -> Batch:
    """The rows at ``positions`` of the endless stream that repeats the dataset's (seeded) row order epoch after
    epoch: position ``p`` is row ``p mod len(dataset)``.

    A training step reads the positions its step number gives (``programs/pretrain.py``), so the data is a pure
    function of the step: a resumed run reads exactly the batches of an uninterrupted one, and the ranks of a
    data-parallel job read disjoint slices of the same stream.
    """
    if len(dataset) < 1:
        raise ValueError("the dataset has no rows: is the corpus shorter than one sequence?")
    return collate([dataset[p % len(dataset)] for p in positions])
