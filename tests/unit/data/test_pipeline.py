import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from zmaj.data import pipeline
from zmaj.data.config import DataConfig, FilesSource, Source
from zmaj.data.dataset import LMDataset, collate
from zmaj.data.pipeline import Prepared, prepare
from zmaj.data.tokenizer import Tokenizer
from zmaj.data.tokens import TokenFile


def test_prepare_builds_once_then_rows_decode_to_the_corpus(tmp_path: Path) -> None:
    # ASCII only, so that any run of tokens decodes to whole characters.
    rng = random.Random(0)
    words = ["def", "return", "self", "import", "value", "None", "for", "in", "(", ")", ":", "\n", "    "]
    texts = [" ".join(rng.choices(words, k=rng.randint(5, 60))) for _ in range(60)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    source = FilesSource(paths=[str(path)], format="jsonl")
    config = DataConfig(source=source, vocab_size=300, seq_len=16, validation_fraction=0.2)

    prepared = prepare(config, tmp_path / "cache", seed=0)
    again = prepare(config, tmp_path / "cache", seed=0)
    assert again.tokenizer.fingerprint() == prepared.tokenizer.fingerprint()
    assert all(again.train[i]["tokens"].equal(prepared.train[i]["tokens"]) for i in range(len(again.train)))
    assert len(prepared.train) > len(prepared.validation) > 0
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "tokens").iterdir()) == [
        "train",
        "validation",
    ]

    eos = "<|eos|>"
    for batch in DataLoader(prepared.train, batch_size=8, collate_fn=collate):
        assert batch.document_ids is not None
        for tokens, documents in zip(batch.tokens, batch.document_ids, strict=True):
            for document in documents.unique():
                text = prepared.tokenizer.decode(tokens[documents == document].tolist())
                # Each document of a row is one unbroken piece of one text, ending with eos if the text does.
                assert eos not in text.removesuffix(eos)
                assert any(text.removesuffix(eos) in t for t in texts)
                assert not text.endswith(eos) or any(t.endswith(text.removesuffix(eos)) for t in texts)


def code_corpus(folder: Path) -> DataConfig:
    """300 one-line functions in a jsonl file, as rows of 8 tokens of a 300-token vocabulary."""
    path = folder / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"def f{i}(x): return x * {i} + {i % 7}"}) + "\n" for i in range(300))
    )
    return DataConfig(
        source=FilesSource(paths=[str(path)], format="jsonl"),
        vocab_size=300,
        seq_len=8,
        validation_fraction=0.2,
    )


def test_a_preparation_reads_the_corpus_once_for_the_tokenizer_and_once_for_both_splits(
    tmp_path: Path, corpus_reads: list[Source]
) -> None:
    """Each read of a streamed corpus downloads and decodes it again (FineWeb's 10 GB): the tokenizer's sample
    takes one (it must be trained before anything is encoded), encoding the train and validation splits one
    more, and a cached preparation none."""
    config = code_corpus(tmp_path)
    prepare(config, tmp_path / "cache", seed=0)
    assert corpus_reads == [config.source, config.source]
    prepare(config, tmp_path / "cache", seed=0)
    assert len(corpus_reads) == 2


def test_a_split_without_one_row_is_refused_naming_it(tmp_path: Path) -> None:
    """A held-out split shorter than one row would report a loss of 0 and a NaN baseline as results."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"def f{i}(x): return x + {i}"}) + "\n" for i in range(200)))
    config = DataConfig(
        source=FilesSource(paths=[str(path)], format="jsonl"),
        vocab_size=300,
        seq_len=256,
        validation_fraction=0.05,
    )
    with pytest.raises(ValueError, match=r"the validation split holds \d+ tokens .* data\.seq_len=256 \+ 1"):
        prepare(config, tmp_path / "cache", seed=0)


@pytest.mark.parametrize("lines", [[], ["", ""]], ids=["empty file", "empty texts"])
def test_a_corpus_without_text_is_refused_before_a_tokenizer_is_cached(
    tmp_path: Path, lines: list[str]
) -> None:
    """Not "the tokenizer has 263 tokens but data.vocab_size is 8192", after caching a tokenizer of nothing."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in lines))
    config = DataConfig(source=FilesSource(paths=[str(path)], format="jsonl"), vocab_size=300, seq_len=8)
    with pytest.raises(
        ValueError, match=r"^data.source \(files\): the train split holds no document with any text"
    ):
        prepare(config, tmp_path / "cache", seed=0)
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_a_corpus_too_small_for_the_vocabulary_is_refused_naming_both(tmp_path: Path) -> None:
    """BPE stops merging when the corpus has no pair left: a tokenizer smaller than the embedding would train
    on silently, its rows never used."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": f"ab {i} ab"}) + "\n" for i in range(50)))
    config = DataConfig(source=FilesSource(paths=[str(path)], format="jsonl"), vocab_size=2000, seq_len=4)
    with pytest.raises(ValueError, match=r"tokens but data\.vocab_size is 2000"):
        prepare(config, tmp_path / "cache", seed=0)


class ThreeTokens(Tokenizer):
    """A vocabulary of three tokens spelling 1, 2 and 1 bytes: all the baseline reads of a tokenizer."""

    def __init__(self) -> None:
        pass

    @property
    def vocab_size(self) -> int:
        return 3

    def token_bytes(self) -> torch.Tensor:
        return torch.tensor([1, 2, 1])


@pytest.mark.parametrize("chunk", [pipeline.UNIGRAM_CHUNK, 3, 1])
def test_the_unigram_baseline_is_its_closed_form(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """Add-one smoothed train frequencies, in bits, per held-out byte: a token the train split never holds costs
    log2(total), not infinity (the one test before checked the baseline was above zero, which inf is). Counted a
    chunk of the split at a time (whole, it took 8 bytes a token in memory), the same for any chunk."""
    monkeypatch.setattr(pipeline, "UNIGRAM_CHUNK", chunk)
    train = TokenFile(
        np.array([0, 0, 0, 1], dtype=np.uint16), np.array([0, 4]), vocab_size=3, eos_id=2, pad_id=2
    )
    # Token 1 spells 2 bytes: bits per byte and bits per token differ.
    held_out = TokenFile(
        np.array([0, 2, 1], dtype=np.uint16), np.array([0, 3]), vocab_size=3, eos_id=2, pad_id=2
    )
    prepared = Prepared(ThreeTokens(), LMDataset(train, 1, "pack", 0), LMDataset(held_out, 1, "pack", 0))
    counts = [3 + 1, 1 + 1, 0 + 1]  # of 7
    bits = -(math.log2(counts[0] / 7) + math.log2(counts[2] / 7) + math.log2(counts[1] / 7))
    assert prepared.unigram_bpb() == pytest.approx(bits / (1 + 1 + 2))


def test_the_seed_orders_the_rows_of_both_splits(tmp_path: Path) -> None:
    """``train.seed`` is how a user repeats a run with other data orders (a seed sweep): the same seed gives the
    same rows in the same order, another seed the same token files (one tokenizer, one cache entry) read in
    another order. Ignored, every seed of a sweep trained on the same batches."""
    config = code_corpus(tmp_path)

    def rows(prepared: Prepared) -> dict[str, list[list[int]]]:
        splits = {"train": prepared.train, "validation": prepared.validation}
        return {
            name: [split[i]["tokens"].tolist() for i in range(len(split))] for name, split in splits.items()
        }

    first, again, other = (prepare(config, tmp_path / "cache", seed=seed) for seed in (0, 0, 1))
    assert other.fingerprints() == first.fingerprints()
    assert rows(again) == rows(first)
    for split, order in rows(other).items():
        assert order != rows(first)[split], split


def test_the_fingerprints_are_each_splits_token_file(tmp_path: Path) -> None:
    """A run records both fingerprints so that a resume on other data is refused: recording the train file's as
    the validation one's let a resume on another held-out set through. Each is the sha256 of the split's ids
    then of its document offsets (``TokenFile.fingerprint``), computed here by hand."""

    def token_file(ids: list[int], offsets: list[int]) -> TokenFile:
        return TokenFile(np.array(ids, dtype=np.uint16), np.array(offsets), vocab_size=3, eos_id=2, pad_id=2)

    def sha256(ids: list[int], offsets: list[int]) -> str:
        data = np.array(ids, dtype=np.uint16).tobytes() + np.array(offsets, dtype=np.int64).tobytes()
        return hashlib.sha256(data).hexdigest()

    train, held_out = ([0, 0, 1, 2], [0, 4]), ([1, 2, 0, 2], [0, 2, 4])
    prepared = Prepared(
        ThreeTokens(),
        LMDataset(token_file(*train), 1, "pack", 0),
        LMDataset(token_file(*held_out), 1, "pack", 0),
    )
    assert prepared.fingerprints() == {"train": sha256(*train), "validation": sha256(*held_out)}
