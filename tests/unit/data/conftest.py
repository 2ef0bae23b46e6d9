"""Fixtures shared by the data tests: a small tokenizer trained once, and small corpora written to disk."""

import json
from itertools import islice
from pathlib import Path

import pytest

from zmaj.data.corpus import stdlib_documents
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
