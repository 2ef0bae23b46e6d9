"""Where pre-training text comes from and how it is cut into rows: the ``data:`` part of an experiment spec.

A *source* names a corpus; the rest of the pipeline (corpus -> tokenizer -> token file -> dataset) only sees
documents, so swapping the built-in offline corpus for a Hub dataset or local files is a one-line spec change:

    data:
      source: {kind: hub, path: json, data_files: [shards/*.jsonl], max_documents: 100000}
      seq_len: 1024

Every model is frozen and forbids unknown keys, so a typo in a spec fails loudly, naming the field.
"""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

N_BYTE_TOKENS = 256
"""A byte-level BPE always holds every byte, so no text is ever out of vocabulary."""

N_SPECIAL_TOKENS = 7
"""``<|bos|> <|eos|> <|pad|> <|system|> <|user|> <|assistant|> <|end|>``; see ``zmaj.data.tokenizer``."""


class StdlibSource(BaseModel):
    """The running interpreter's standard library and its pydoc topics: ~12 MB of text, offline, always there."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["stdlib"] = "stdlib"


class HubSource(BaseModel):
    """Anything ``datasets.load_dataset`` reads: a Hub dataset, or a local builder ("json", "parquet", "text")."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["hub"] = "hub"
    path: str
    name: str | None = None
    data_files: str | list[str] | None = None
    revision: str | None = None
    """A commit, tag or branch of a Hub dataset (``datasets``' own default: "main", which moves): the commit pins
    the rows read, and with them the token caches. Offline, only the commit of a cached copy, unstreamed."""
    split: str = "train"
    """The dataset split read; our own train/validation split is cut from it by hashing each row's text."""
    text_column: str = "text"
    streaming: bool = False
    max_documents: int | None = Field(default=None, ge=1)
    """Read only the first rows: a cheap way to bound a run on a huge dataset."""


class FilesSource(BaseModel):
    """Local files: each text file is one document, each jsonl line or parquet row is one document."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1)
    format: Literal["text", "jsonl", "parquet"]
    text_column: str = "text"

    @field_validator("paths")
    @classmethod
    def _paths_exist(cls, paths: list[str]) -> list[str]:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ValueError(f"data file(s) not found: {', '.join(missing)}")
        return paths


Source = Annotated[StdlibSource | HubSource | FilesSource, Field(discriminator="kind")]


class DataConfig(BaseModel):
    """A corpus, its held-out fraction, the tokenizer trained on it and the shape of the rows fed to the model."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    source: Source = StdlibSource()
    validation_fraction: float = Field(default=0.05, gt=0.0, lt=1.0)
    seq_len: int = Field(default=256, ge=1)
    mode: Literal["pack", "pad"] = "pack"
    """``pack``: documents back to back with document masking; ``pad``: one (truncated) document per row."""
    vocab_size: int = Field(default=8192, ge=N_BYTE_TOKENS + N_SPECIAL_TOKENS)
    tokenizer_documents: int | None = Field(default=None, ge=1)
    """Train the tokenizer on a seeded sample of this many training documents (None: all of them)."""
