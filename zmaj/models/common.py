"""What every architecture shares: the batch it reads and the attention mask that batch implies."""

from dataclasses import dataclass, fields, replace

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from zmaj.nn import masks
from zmaj.nn.attention import AttentionMask, Backend, prepare_mask


@dataclass(frozen=True)
class Batch:
    """Token rows plus what a packed or padded row needs to be read correctly.

    ``positions`` restart at 0 in each packed document (default: 0..seq-1), ``document_ids`` keep packed
    documents from attending to each other, ``is_token`` marks real tokens in padded rows. ``targets`` and
    ``loss_mask`` are only read by losses.
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
