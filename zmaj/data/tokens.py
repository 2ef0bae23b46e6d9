"""A token file: one split of a corpus encoded once, kept on disk and memory-mapped for training.

Encoding text is slow next to a training step, so it is done once per (tokenizer, source, split) and cached:
a flat array of token ids (uint16 while the vocabulary fits, halving the file) plus the offset of each document
in it, the layout of nanoGPT's ``train.bin`` with document boundaries kept, so packing can mask across them.
Every document ends with ``<|eos|>``: the model learns where documents end, and decoding a packed row shows it.
Both splits are encoded in one read of the corpus, each document to its split's file: a streamed corpus is
downloaded and decoded once, not once per split.

The cache directory is built under a temporary name and renamed into place, so it either exists whole or not at
all: a crash or an interrupted run never leaves a half-written file that a later run would trust.
"""

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
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
from zmaj.data.corpus import SPLITS, Document, Split, source_key, split_documents
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
    """The fingerprint ``tokenize_splits`` recorded in ``meta.json`` when it wrote the file (none in older
    caches): what :meth:`fingerprint` gives without reading the file again."""

    @property
    def n_documents(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def fingerprint(self) -> str:
        """A sha256 of the ids, then of where each document starts: what the rows cut from this file depend on
        (a run records it, so that a resume on other data is refused). ``tokenize_splits`` computes it as it
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
        """Memory-map a token file written by ``tokenize_splits``: nothing is read until it is indexed. A file
        whose ``meta.json`` is damaged or whose sizes disagree with it is a ValueError naming the folder."""
        directory = Path(directory)
        damaged = f"damaged token cache {directory}: delete the folder to encode the split again"
        try:  # not UTF-8, not JSON, or not the record tokenize_splits writes
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


def tokenize_splits(
    tokenizer: Tokenizer, source: Source, validation_fraction: float, cache_dir: str | Path
) -> dict[Split, TokenFile]:
    """The token file of each split: opened from the cache, or, for those it lacks, encoded in one read of the
    corpus (each document to its split's file) and written there atomically, each split on its own."""
    source_keys = {split: source_key(source, split, validation_fraction) for split in SPLITS}
    finals = {split: _cache_folder(tokenizer, source_keys[split], split, cache_dir) for split in SPLITS}
    missing = {split: final for split, final in finals.items() if not final.is_dir()}
    if missing:
        _encode(tokenizer, source, validation_fraction, Path(cache_dir), missing, source_keys)
    return {split: TokenFile.open(final) for split, final in finals.items()}


def _cache_folder(tokenizer: Tokenizer, documents_key: str, split: Split, cache_dir: str | Path) -> Path:
    """Where one split's token file lives in the cache: named by a key of the tokenizer, the split's documents
    (``corpus.source_key``) and the layout."""
    identity = [tokenizer.fingerprint(), documents_key, split, TOKENS_VERSION]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return Path(cache_dir) / "tokens" / f"{split}-{key}"


def _encode(
    tokenizer: Tokenizer,
    source: Source,
    validation_fraction: float,
    cache_dir: Path,
    finals: dict[Split, Path],
    source_keys: dict[Split, str],
) -> None:
    """Encode the splits ``finals`` names in one read of the corpus, each into a staging folder of its own that
    is renamed into place whole (module docstring)."""
    started = time.perf_counter()
    root = cache_dir / "tokens"
    named = "the train and validation splits'" if len(finals) > 1 else f"the {next(iter(finals))} split's"
    # The temporary folders are removed on the way out, crash or not; only their finished "data" folders move.
    with cache_writes(cache_dir, f"{named} tokens"), ExitStack() as stack:
        staging = {split: Path(stack.enter_context(_staging(root))) / "data" for split in finals}
        for folder in staging.values():
            folder.mkdir()
        what = f"encoding {named} documents into tokens, {ENCODE_CHUNK:,} documents at a time"
        docs = progress(split_documents(source, validation_fraction), None, what, unit="doc")
        metas = _write(tokenizer, (pair for pair in docs if pair[0] in finals), staging)
        for split, folder in staging.items():
            meta = metas[split] | {"source": source_keys[split], "split": split}
            (folder / "meta.json").write_text(json.dumps(meta, indent=1))
            # On disk before the rename, as a checkpoint's files are: a power cut cannot publish empty files.
            for path in [*folder.iterdir(), folder]:
                fsync(path)
            try:
                os.rename(folder, finals[split])
            except OSError:
                # Another process (another rank of the same run) finished first: its file is the same, use it.
                if not finals[split].is_dir():
                    raise
        fsync(root)
    for split, final in finals.items():
        logger.info(
            "encoded {} split: {} documents, {} tokens in {:.1f}s -> {}",
            split,
            metas[split]["n_documents"],
            metas[split]["n_tokens"],
            time.perf_counter() - started,
            final,
        )


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


def _write(
    tokenizer: Tokenizer, docs: Iterator[tuple[Split, Document]], directories: dict[Split, Path]
) -> dict[Split, dict[str, int | str]]:
    """Encode each of ``docs`` into its split's files in ``directories``; each split's meta, with its file's
    fingerprint, hashed as it is written (``TokenFile.fingerprint``). A document's ids do not depend on the
    others encoded beside it, so a chunk mixes the splits and each file holds what encoding its split alone
    would write."""
    dtype = token_dtype(tokenizer.vocab_size)
    offsets: dict[Split, list[int]] = {split: [0] for split in directories}
    digests = {split: hashlib.sha256() for split in directories}
    with ExitStack() as stack:
        files = {
            split: stack.enter_context((d / "tokens.bin").open("wb")) for split, d in directories.items()
        }
        while chunk := list(islice(docs, ENCODE_CHUNK)):
            encoded_chunk = tokenizer.encode_batch([document.text for _, document in chunk])
            for (split, _), ids in zip(chunk, encoded_chunk, strict=True):
                ids.append(tokenizer.eos_id)
                encoded = np.asarray(ids, dtype=dtype).tobytes()
                files[split].write(encoded)
                digests[split].update(encoded)
                offsets[split].append(offsets[split][-1] + len(ids))
    metas: dict[Split, dict[str, int | str]] = {}
    for split, directory in directories.items():
        starts = np.asarray(offsets[split], dtype=np.int64)
        np.save(directory / "offsets.npy", starts)
        digests[split].update(starts.tobytes())
        metas[split] = {
            "fingerprint": digests[split].hexdigest(),
            "dtype": dtype.name,
            "n_tokens": offsets[split][-1],
            "n_documents": len(offsets[split]) - 1,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
        }
    return metas
