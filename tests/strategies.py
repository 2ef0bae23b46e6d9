"""Hypothesis strategies shared by the mask, attention and data tests, and the modern GPT block's options."""

from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from torch import Tensor

from zmaj.data.tokens import TokenFile

MODERN_BLOCK: dict[str, Any] = {
    "positions": "rope",
    "norm": "rmsnorm",
    "activation": "relu2",
    "qk_norm": True,
    "tie_embeddings": False,
    "unet_skips": True,
}
"""The speedrun block's options (README "A modern block"), which a test's GPT config adds its sizes and the
options it also tests (soft-cap, value embeddings, biases) to."""


@st.composite
def document_ids(draw: st.DrawFn, batch: int, seq: int) -> Tensor:
    """Rows of non-decreasing document ids: documents of random lengths packed back to back."""
    rows = []
    for _ in range(batch):
        cuts = (
            draw(st.lists(st.integers(1, seq - 1), max_size=min(6, seq - 1), unique=True)) if seq > 1 else []
        )
        row = torch.zeros(seq, dtype=torch.long)
        for cut in cuts:
            row[cut:] += 1
        rows.append(row)
    return torch.stack(rows)


@st.composite
def lengths(draw: st.DrawFn, batch: int, seq: int) -> Tensor:
    """Right-padding lengths, each row holding at least one token."""
    return torch.tensor(draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch)))


@st.composite
def attention_shapes(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(batch, heads, kv_heads, seq, head_dim) with heads a multiple of kv_heads, as grouped-query attention needs."""
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 3]))
    return (
        draw(st.integers(1, 3)),
        kv_heads * group,
        kv_heads,
        draw(st.integers(1, 40)),
        draw(st.sampled_from([8, 16])),
    )


seeds = st.integers(0, 2**31 - 1)


@st.composite
def token_files(draw: st.DrawFn, max_documents: int = 8, max_length: int = 20) -> TokenFile:
    """A token file whose token at file index ``i`` is ``i``.

    Unique values make every test independent of the code under test: a token alone says which document it
    belongs to (``searchsorted(offsets, token)``) and where in it. ``pad_id`` is the one value no token has.
    """
    lengths = draw(st.lists(st.integers(1, max_length), min_size=1, max_size=max_documents))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return TokenFile(np.arange(n, dtype=np.uint16), offsets, vocab_size=n + 1, eos_id=n, pad_id=n)
