"""Fixtures shared by the data tests: a small tokenizer trained once, small corpora written to disk, and a count
of the corpus's reads."""

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pytest

from zmaj.data import corpus
from zmaj.data.config import Source
from zmaj.data.corpus import Document, stdlib_documents
from zmaj.data.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """A few hundred kilobytes of real text: stdlib modules (code, docstrings, non-ASCII) and pydoc topics."""
    texts = [d.text for d in islice(stdlib_documents(), 60) if d.text]
    return texts + [d.text for d in stdlib_documents() if d.name.startswith("pydoc:")][:10]


@pytest.fixture(scope="session")
def tokenizer(sample_texts: list[str]) -> Tokenizer:
    return Tokenizer.train(sample_texts, vocab_size=400)


@pytest.fixture
def jsonl_file(tmp_path: Path, sample_texts: list[str]) -> Path:
    """40 short documents, one JSON object per line, with an extra column the reader must ignore."""
    path = tmp_path / "docs.jsonl"
    rows = [{"text": text[:300], "id": i} for i, text in enumerate(sample_texts[:40])]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def corpus_reads(monkeypatch: pytest.MonkeyPatch) -> list[Source]:
    """The sources read from the start, one entry per read: a streamed corpus is downloaded and decoded again at
    each (FineWeb's 10 GB)."""
    reads: list[Source] = []
    read = corpus._all_documents

    def counted(source: Source) -> Iterator[Document]:
        reads.append(source)
        return read(source)

    monkeypatch.setattr(corpus, "_all_documents", counted)
    return reads
