"""A byte-level BPE tokenizer (Sennrich et al., 2016; byte-level as in GPT-2, Radford et al., 2019).

Text is first turned into UTF-8 bytes, each byte mapped to a printable character, then the most frequent
adjacent pairs are merged until the vocabulary is full. Because all 256 bytes are in the vocabulary, every string
encodes and ``decode(encode(s)) == s`` exactly: there is no unknown token and no normalisation. Each ordinary
token stands for a fixed number of bytes (``token_bytes``), which turns a loss in nats per token into bits per
byte, a number comparable across tokenizers.

Special tokens are reserved first (ids 0..6) and are never produced by ``encode``: a document that happens to
contain the text ``<|eos|>`` is encoded as that text, so only code can insert a real separator or chat role.
Training uses the Hugging Face ``tokenizers`` library (https://huggingface.co/docs/tokenizers); its BPE trainer
is deterministic for a given multiset of texts.
"""

import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence, Sized
from pathlib import Path

import tokenizers
import torch
from jaxtyping import Int
from loguru import logger
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch import Tensor

from zmaj.data.config import N_SPECIAL_TOKENS, DataConfig
from zmaj.data.corpus import documents, source_key
from zmaj.fileio import atomic_write_text, cache_writes
from zmaj.progress import is_main_process
from zmaj.text import read_text

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END)
assert len(SPECIAL_TOKENS) == N_SPECIAL_TOKENS

TOKENIZER_VERSION = 1
"""Bumped whenever training changes, so cached tokenizers (and the token files keyed on them) are rebuilt."""


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` that fixes the conventions the rest of zmaj relies on."""

    def __init__(self, inner: tokenizers.Tokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if inner.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with Tokenizer.train")
        # Text is data: a literal "<|eos|>" inside a document must not become the separator.
        inner.encode_special_tokens = True
        self._inner = inner

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, seed: int = 0, max_texts: int | None = None
    ) -> "Tokenizer":
        """Train on ``texts``, or on a seeded uniform sample of ``max_texts`` of them to bound the time it takes.

        The seed only picks the sample; given the texts, BPE training has no randomness.
        """
        if max_texts is not None:
            texts = _sample(texts, max_texts, seed)
        how_many = f"{len(texts):,} texts" if isinstance(texts, Sized) else "a stream of texts"
        logger.info(f"training a byte-level BPE tokenizer of {vocab_size:,} tokens on {how_many}")
        inner = tokenizers.Tokenizer(models.BPE())
        # No prefix space and no normaliser: either would break the exact round trip.
        inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        inner.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=is_main_process(),  # the trainer's own bars, one per phase, on a terminal
        )
        inner.train_from_iterator(texts, trainer)
        return cls(inner)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a tokenizer saved by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(read_tokenizer_file(path))

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file, then a rename, both flushed to disk), so a crash never leaves half
        a tokenizer, and a failed write no temporary file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_json())

    def to_json(self) -> str:
        """The serialised tokenizer (``tokenizer.json``), for building other tokenizers from this one."""
        text: str = self._inner.to_str()
        return text

    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer (what ``save`` writes): the cache key of anything encoded with it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts on all cores (the library's thread pool)."""
        return [e.ids for e in self._inner.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens are kept, written as their names, so samples show where documents and turns end."""
        return self._inner.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a special token such as ``USER``."""
        if token not in SPECIAL_TOKENS:
            raise KeyError(f"{token!r} is not one of the special tokens {SPECIAL_TOKENS}")
        token_id = self._inner.token_to_id(token)
        assert token_id is not None  # checked in __init__
        return token_id

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    def token_bytes(self) -> Int[Tensor, " vocab"]:
        """How many UTF-8 bytes each token stands for; 0 for special tokens, which stand for no text.

        Summed over the targets of a batch it is the number of bytes the loss was paid on, so
        ``bits_per_byte = sum(loss_nats) / (ln 2 * sum(token_bytes[targets]))`` exactly. A byte-level token is
        written with one printable character per byte, so its byte count is its length.
        """
        counts = [0] * self.vocab_size
        for token, token_id in self._inner.get_vocab(with_added_tokens=True).items():
            counts[token_id] = 0 if token in SPECIAL_TOKENS else len(token)
        return torch.tensor(counts, dtype=torch.long)


def _sample(texts: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of ``k`` texts in one pass and O(k) memory (reservoir sampling, Vitter's algorithm R)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for index, text in enumerate(texts):
        if index < k:
            reservoir.append((index, text))
        elif (slot := rng.randrange(index + 1)) < k:
            reservoir[slot] = (index, text)
    return [text for _, text in sorted(reservoir)]


def tokenizer_path(config: DataConfig, cache_dir: str | Path, seed: int) -> Path:
    """Where the tokenizer for this corpus, vocabulary size and sample lives in a cache directory. Without a
    sample (``tokenizer_documents``) the seed draws nothing and every seed trains the same tokenizer, so all
    share seed 0's entry (a sweep over ``train.seed`` trains it once)."""
    identity = [
        source_key(config.source, "train", config.validation_fraction),
        config.vocab_size,
        config.tokenizer_documents,
        seed if config.tokenizer_documents is not None else 0,
        TOKENIZER_VERSION,
        tokenizers.__version__,
    ]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    return Path(cache_dir) / "tokenizers" / f"{key}.json"


def read_tokenizer_file(path: Path) -> tokenizers.Tokenizer:
    """The library's tokenizer from a ``tokenizer.json``; a file that is not one (cut short, say) is a ValueError
    naming it, where the library raises a bare ``Exception`` that names no file."""
    text = read_text(path)  # a bad byte is a corrupt file: replacing it would change the vocabulary
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a tokenizer file: not JSON ({error})") from error
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{path} is not a tokenizer file: JSON without a 'model' entry")
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # the library's only error type, for any content it rejects
        raise ValueError(f"{path} is not a tokenizer file: {error}") from error


def load_or_train(config: DataConfig, cache_dir: str | Path, seed: int = 0) -> Tokenizer:
    """The tokenizer of ``config``'s training split: loaded from the cache, or trained once and saved there."""
    path = tokenizer_path(config, cache_dir, seed)
    if path.is_file():
        return Tokenizer.load(path)
    logger.info("training a {}-token BPE on {} -> {}", config.vocab_size, config.source.kind, path)
    non_empty = 0

    def texts() -> Iterator[str]:
        nonlocal non_empty
        for document in documents(config.source, "train", config.validation_fraction):
            non_empty += bool(document.text)
            yield document.text

    tokenizer = Tokenizer.train(texts(), config.vocab_size, seed, config.tokenizer_documents)
    # Checked before saving: a tokenizer of the bare alphabet would be cached for the next run.
    if non_empty == 0:
        raise ValueError(
            f"data.source ({config.source.kind}): the train split holds no document with any text, nothing to "
            "train a tokenizer on (empty files, an empty text column?)"
        )
    with cache_writes(Path(cache_dir), "the trained tokenizer"):
        tokenizer.save(path)
    return tokenizer


def check_unchanged(saved: Path, tokenizer: Tokenizer) -> None:
    """Refuse to resume a run whose ``saved`` tokenizer differs from ``tokenizer``, the one its spec's data gives
    now: the corpus changed since the run began (edited files, another Python's standard library), or the way
    zmaj splits it (a newer zmaj), so the cache trained another tokenizer, whose ids would mean other text to the
    checkpoint."""
    if Tokenizer.load(saved).fingerprint() != tokenizer.fingerprint():
        raise ValueError(
            f"{saved} differs from the tokenizer the spec's data gives now: the corpus changed since the run "
            "began, or how zmaj splits it did (a newer zmaj), so the checkpoint's token ids would mean other "
            "text; resume where the data and zmaj are the run's, or start a new run"
        )
