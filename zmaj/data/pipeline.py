"""From a ``DataConfig`` to ready datasets: corpus -> tokenizer -> token files -> rows, each stage cached.

A program calls ``prepare`` once; the first run trains the tokenizer and encodes both splits into the cache
directory, later runs (and other ranks) only open the cached files.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zmaj.data.config import DataConfig
from zmaj.data.dataset import LMDataset
from zmaj.data.tokenizer import Tokenizer, load_or_train
from zmaj.data.tokens import tokenize_splits

UNIGRAM_CHUNK = 2**24
"""Tokens counted at once for the unigram baseline: 128 MiB as int64."""


@dataclass(frozen=True)
class Prepared:
    """What a training program needs from the data: the tokenizer (for sampling, bits per byte) and both splits."""

    tokenizer: Tokenizer
    train: LMDataset
    validation: LMDataset

    def fingerprints(self) -> dict[str, str]:
        """Each split's token file fingerprint (``TokenFile.fingerprint``): what a run records of its data."""
        return {
            "train": self.train.token_file.fingerprint(),
            "validation": self.validation.token_file.fingerprint(),
        }

    def unigram_bpb(self) -> float:
        """Held-out bits per byte of the best context-free model: train-set token frequencies (add-one
        smoothed), the baseline any model of context must beat."""
        vocab = self.tokenizer.vocab_size
        tokens = self.train.token_file.tokens
        # Counted a chunk at a time: bincount casts its input to int64, which for the whole split took 8 bytes
        # a token on every rank (20 GB for FineWeb's 2 billion tokens), where the memory-mapped file takes 2.
        counts = np.ones(vocab, dtype=np.float64)
        for start in range(0, len(tokens), UNIGRAM_CHUNK):
            counts += np.bincount(np.asarray(tokens[start : start + UNIGRAM_CHUNK]), minlength=vocab)
        log_probs = np.log2(counts / counts.sum())
        held_out = np.asarray(self.validation.token_file.tokens)
        token_bytes = self.tokenizer.token_bytes().numpy()
        return float(-log_probs[held_out].sum() / token_bytes[held_out].sum())


def prepare(config: DataConfig, cache_dir: str | Path, seed: int = 0) -> Prepared:
    """The tokenizer and both splits of ``config``; the seed fixes the tokenizer sample and the row orders."""
    tokenizer = load_or_train(config, cache_dir, seed)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but data.vocab_size is {config.vocab_size} (a corpus "
            "too small to learn that many merges?)"
        )
    token_files = tokenize_splits(tokenizer, config.source, config.validation_fraction, cache_dir)
    splits = {
        split: LMDataset(token_file, config.seq_len, config.mode, seed)
        for split, token_file in token_files.items()
    }
    for split, rows in splits.items():
        if len(rows) == 0:  # held out, every loss would read 0 and the unigram baseline NaN
            raise ValueError(
                f"the {split} split holds {rows.token_file.n_tokens} tokens ({rows.token_file.n_documents} "
                f"documents), not one row of data.seq_len={config.seq_len} + 1: raise "
                "data.validation_fraction, shorten data.seq_len, or give a larger corpus"
            )
    return Prepared(tokenizer, splits["train"], splits["validation"])
