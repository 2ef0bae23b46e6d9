"""A token file: one split of a corpus encoded once, kept on disk and memory-mapped for training.

Encoding text is slow next to a training step, so it is done once per (tokenizer, source, split) and cached:
a flat array of token ids (uint16 while the vocabulary fits, halving the file) plus the offset of each document
in it, the layout of nanoGPT's ``train.bin`` with document boundaries kept, so packing can mask across them.
Every document ends with ``<|eos|>``: the model learns where documents end, and decoding a packed row shows it.

The cache directory is built under a temporary name and renamed into place, so it either exists whole or not at
all: a crash or an interrupted run never leaves a half-written file that a later run would trust.
"""

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Int64, UInt
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field

from zmaj import specfile
from zmaj.data.config import Source
from zmaj.data.corpus import Document, Split, documents, source_key
from zmaj.data.tokenizer import Tokenizer
from zmaj.fileio import cache_writes, fsync, sweep, writing
from zmaj.progress import progress
from zmaj.text import read_json

TOKENS_VERSION = 1
"""Bumped whenever the on-disk layout or what is written per document changes."""

ENCODE_CHUNK = 512
"""Documents handed to the tokenizer at once: enough to keep its threads busy, few enough to bound memory."""


FINGERPRINT_CHUNK = 1 << 24
"""Tokens hashed at a time by ``TokenFile.fingerprint`` (32-64 MB)."""


@dataclass(frozen=True, eq=False)
class TokenFile:
    """Token ids of every document back to back; document ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: UInt[np.ndarray, " tokens"]
    offsets: Int64[np.ndarray, " offsets"]
    vocab_size: int
    eos_id: int
    pad_id: int
    recorded: str | None = None
    """The fingerprint ``tokenize_split`` recorded in ``meta.json`` when it wrote the file (none in older
    caches): what :meth:`fingerprint` gives without reading the file again."""

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def fingerprint(self) -> str:
        """A sha256 of the ids, then of where each document starts: what the rows cut from this file depend on
        (a run records it, so that a resume on other data is refused). ``tokenize_split`` computes it as it
        writes the file (``recorded``), where reading 4 GB of tokens again would take seconds at every session;
        an older cache's is read in chunks, never held whole."""
        if self.recorded is not None:
            return self.recorded
        digest = hashlib.sha256()
        for start in range(0, self.n_tokens, FINGERPRINT_CHUNK):
            digest.update(np.ascontiguousarray(self.tokens[start : start + FINGERPRINT_CHUNK]).tobytes())
        digest.update(np.ascontiguousarray(self.offsets, dtype=np.int64).tobytes())
        return digest.hexdigest()

    def document(self, index: int) -> UInt[np.ndarray, " length"]:
        """The ids of one document, its trailing ``<|eos|>`` included."""
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @classmethod
    def open(cls, directory: str | Path) -> "TokenFile":
        """Memory-map a token file written by ``tokenize_split``: nothing is read until it is indexed. A file
        whose ``meta.json`` is damaged or whose sizes disagree with it is a ValueError naming the folder."""
        directory = Path(directory)
        damaged = f"damaged token cache {directory}: delete the folder to encode the split again"
        try:  # not UTF-8, not JSON, or not the record tokenize_split writes
            meta = specfile.parse(TokenMeta, read_json(directory / "meta.json"), "meta.json")
        except ValueError as error:
            raise ValueError(f"{damaged} ({str(error).removeprefix(f'{directory}{os.sep}')})") from None
        dtype, n_tokens = np.dtype(meta.dtype), meta.n_tokens
        if (directory / "tokens.bin").stat().st_size != n_tokens * dtype.itemsize:
            raise ValueError(f"{damaged} (tokens.bin does not hold the {n_tokens} tokens meta.json records)")
        try:
            offsets = np.load(directory / "offsets.npy")
        except (ValueError, EOFError) as error:  # numpy names no file
            raise ValueError(f"{damaged} (offsets.npy: {error})") from None
        if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != n_tokens:
            raise ValueError(
                f"{damaged} (offsets.npy does not end at the {n_tokens} tokens meta.json records)"
            )
        # mmap cannot map an empty file; an empty split (a tiny corpus's validation set) is an empty array.
        tokens = (
            np.memmap(directory / "tokens.bin", dtype=dtype, mode="r", shape=(n_tokens,))
            if n_tokens
            else np.zeros(0, dtype=dtype)
        )
        return cls(tokens, offsets, meta.vocab_size, meta.eos_id, meta.pad_id, meta.fingerprint)


class TokenMeta(BaseModel):
    """What :meth:`TokenFile.open` reads of a token file's ``meta.json`` (``_write`` writes more: the source,
    the split, the document count)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    dtype: Literal["uint16", "uint32"]
    n_tokens: int = Field(ge=0)
    vocab_size: int = Field(gt=0)
    eos_id: int = Field(ge=0)
    pad_id: int = Field(ge=0)
    fingerprint: str | None = None


def token_dtype(vocab_size: int) -> np.dtype[np.unsignedinteger]:
    """The smallest unsigned type that holds every id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_split(
    tokenizer: Tokenizer, source: Source, split: Split, validation_fraction: float, cache_dir: str | Path
) -> TokenFile:
    """The token file of one split: opened from the cache, or encoded once and written there atomically."""
    identity = [
        tokenizer.fingerprint(),
        source_key(source, split, validation_fraction),
        split,
        TOKENS_VERSION,
    ]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    root = Path(cache_dir) / "tokens"
    final = root / f"{split}-{key}"
    if final.is_dir():
        return TokenFile.open(final)
    started = time.perf_counter()
    # The temporary folder is removed on the way out, crash or not; only its finished "data" folder moves.
    with cache_writes(Path(cache_dir), f"the {split} split's tokens"), _staging(root) as temporary:
        staging = Path(temporary) / "data"
        staging.mkdir()
        what = f"encoding the {split} split into tokens, {ENCODE_CHUNK:,} documents at a time"
        docs = progress(documents(source, split, validation_fraction), None, what, unit="doc")
        meta = _write(tokenizer, iter(docs), staging) | {"source": identity[1], "split": split}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        # On disk before the rename, as a checkpoint's files are: a power cut cannot publish empty files.
        for path in [*staging.iterdir(), staging]:
            fsync(path)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process (another rank of the same run) finished first: its file is the same, use it.
            if not final.is_dir():
                raise
        fsync(root)
    logger.info(
        "encoded {} split: {} documents, {} tokens in {:.1f}s -> {}",
        split,
        meta["n_documents"],
        meta["n_tokens"],
        time.perf_counter() - started,
        final,
    )
    return TokenFile.open(final)


STAGING = ".tmp-"


@contextmanager
def _staging(root: Path) -> Iterator[str]:
    """A new temporary folder in ``root`` (made if missing), removed on the way out, and marked as being written
    (``fileio.writing``): what a killed encoding left (a whole split, gigabytes on a real corpus) has no living
    writer, and the next encoding in ``root`` removes it (``fileio.sweep``)."""
    root.mkdir(parents=True, exist_ok=True)
    sweep(root, STAGING)
    with tempfile.TemporaryDirectory(dir=root, prefix=STAGING) as temporary, writing(Path(temporary)):
        yield temporary


def _write(tokenizer: Tokenizer, docs: Iterator[Document], directory: Path) -> dict[str, int | str]:
    """Encode ``docs`` into ``directory``'s files; their meta, with the file's fingerprint, hashed as it is
    written (``TokenFile.fingerprint``)."""
    dtype = token_dtype(tokenizer.vocab_size)
    offsets = [0]
    digest = hashlib.sha256()
    with (directory / "tokens.bin").open("wb") as file:
        while chunk := list(islice(docs, ENCODE_CHUNK)):
            for ids in tokenizer.encode_batch([d.text for d in chunk]):
                ids.append(tokenizer.eos_id)
                encoded = np.asarray(ids, dtype=dtype).tobytes()
                file.write(encoded)
                digest.update(encoded)
                offsets.append(offsets[-1] + len(ids))
    starts = np.asarray(offsets, dtype=np.int64)
    np.save(directory / "offsets.npy", starts)
    digest.update(starts.tobytes())
    return {
        "fingerprint": digest.hexdigest(),
        "dtype": dtype.name,
        "n_tokens": offsets[-1],
        "n_documents": len(offsets) - 1,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
    }
