"""From a ``DataConfig`` to ready datasets: corpus -> tokenizer -> token files -> rows, each stage cached.

A program calls ``prepare`` once; the first run trains the tokenizer and encodes both splits into the cache
directory, later runs (and other ranks) only open the cached files.
"""

from dataclasses import dataclass
from pathlib import Path

from zmaj.data.config import DataConfig
from zmaj.data.dataset import LMDataset
from zmaj.data.tokenizer import Tokenizer, load_or_train
from zmaj.data.tokens import tokenize_split


@dataclass(frozen=True)
class Prepared:
    """What a training program needs from the data: the tokenizer (for sampling, bits per byte) and both splits."""

    tokenizer: Tokenizer
    train: LMDataset
    validation: LMDataset


def prepare(config: DataConfig, cache_dir: str | Path, seed: int = 0) -> Prepared:
    """The tokenizer and both splits of ``config``; the seed fixes the tokenizer sample and the row orders."""
    tokenizer = load_or_train(config, cache_dir, seed)
    splits = {
        split: LMDataset(
            tokenize_split(tokenizer, config.source, split, config.validation_fraction, cache_dir),
            config.seq_len,
            config.mode,
            seed,
        )
        for split in ("train", "validation")
    }
    return Prepared(tokenizer, splits["train"], splits["validation"])
