"""A corpus is a stream of named documents, split into train and validation by a hash of each name.

Hashing names (rather than shuffling and cutting) makes the split a property of the document alone: it is the
same on every machine and run, needs no pass over the corpus, survives documents being added or removed, and
works for streamed datasets whose length is unknown. A text file, or a row of a table (a jsonl line, a parquet
or ``datasets`` row), is named by a hash of its text: a path can be spelled many ways (``./a.txt``, ``a.txt``)
and a row's index shifts when rows before it come or go, so identical documents share a split and a duplicated
document never sits on both sides. The built-in corpus names a stdlib module by its path inside the standard
library instead (its held-out set, and every number measured on it, predate the rule; two of its files, both
38 bytes, are equal and sit on both sides). That corpus is the running interpreter's own standard library plus
its pydoc topics, so every test and smoke run has real text offline.
"""

import glob
import hashlib
import itertools
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from datasets.data_files import resolve_pattern
from datasets.exceptions import DatasetGenerationError
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCard, DatasetCardData
from loguru import logger

from zmaj.data.config import FilesSource, HubSource, Source, StdlibSource
from zmaj.text import read_jsonl, read_text

Split = Literal["train", "validation"]
SPLITS: tuple[Split, ...] = ("train", "validation")

CORPUS_VERSION = 4
"""Bumped whenever what ``documents`` yields for a given source changes, so caches keyed on it are rebuilt.
2: local text files keep their line endings (``datasets`` had translated ``\\r\\n`` to ``\\n``).
3: rows are named by their text, not their file and index, which moves them between the splits; the stdlib
corpus leaves out ``config-*/python-config.py``.
4: text files are named by their text, not their path, as rows are."""

SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
"""Third-party packages differ per environment, and distributions ship the test suites or not (Debian splits
them out), so including either would make the "same" corpus differ between machines. The test suites also hold
deliberately malformed and undecodable files."""


@dataclass(frozen=True)
class Document:
    """One unit of text: it is split, shuffled and masked as a whole, never mixed with its neighbours."""

    name: str
    text: str


def in_validation(name: str, fraction: float) -> bool:
    """Whether a document is held out: the first 8 bytes of sha256(name), read as a uniform number in [0, 1).

    Python's ``hash`` is salted per process, so it would give a different split on every run.
    """
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def documents(source: Source, split: Split, validation_fraction: float) -> Iterator[Document]:
    """The documents of one split, in a fixed order; empty documents are dropped (they would only add an eos)."""
    for document_split, document in split_documents(source, validation_fraction):
        if document_split == split:
            yield document


def split_documents(source: Source, validation_fraction: float) -> Iterator[tuple[Split, Document]]:
    """Every document with the split it belongs to, in one read of the corpus: what ``documents`` gives for each
    split, interleaved in the corpus's order. Encoding both splits from it reads a streamed corpus (gigabytes
    downloaded and decoded) once instead of once per split."""
    for document in _all_documents(source):
        if document.text:
            yield ("validation" if in_validation(document.name, validation_fraction) else "train"), document


def source_key(source: Source, split: Split, validation_fraction: float) -> str:
    """A sha256 that changes whenever the documents of this split could: the config, plus what it points at.

    For the stdlib, the interpreter (its full version string and stdlib path) and its files' names, sizes and
    modification times (a system Python's packages, such as Debian's python3-venv, add modules to it); for
    local files, named in ``paths`` or read by a hub source (its ``data_files``, or a local folder and its card),
    their absolute paths, sizes and modification times. Datasets on the Hub are keyed by config alone, which
    names the data only with a ``revision`` (a branch such as the default "main" moves).
    """
    # No revision keys a source as before it could name one: a new key encodes a corpus again (hours at scale).
    unread = {"revision"} if isinstance(source, HubSource) and source.revision is None else set()
    identity: dict[str, Any] = {
        "source": source.model_dump(mode="json", exclude=unread),
        "split": split,
        "validation_fraction": validation_fraction,
        "corpus_version": CORPUS_VERSION,
    }
    if isinstance(source, StdlibSource):
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [[str(p), (s := (root / p).stat()).st_size, s.st_mtime_ns] for p in _stdlib_files(root)]
        identity["python"] = [sys.version, str(root), files]
    else:
        paths = source.paths if isinstance(source, FilesSource) else _hub_local_files(source)
        identity["files"] = _stamps(paths)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _stamps(paths: Iterable[str]) -> list[list[Any]]:
    """Each file's absolute path, size and modification time: what says that a local file may have changed
    (a relative path names other files from another working directory)."""
    return [
        [str(Path(path).resolve()), (stat := Path(path).stat()).st_size, stat.st_mtime_ns] for path in paths
    ]


@runtime_checkable
class HubLike(Protocol):
    """What a ``datasets`` source of text (``HubSource``) and of conversations (``zmaj.data.chat``) share."""

    @property
    def path(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def data_files(self) -> str | list[str] | None: ...
    @property
    def revision(self) -> str | None: ...
    @property
    def split(self) -> str: ...
    @property
    def streaming(self) -> bool: ...


def _hub_local_files(source: HubLike) -> list[str]:
    """The local files a hub source reads, found as ``datasets`` finds them: for a builder ("json", "parquet":
    one of ``datasets``' packaged modules, which it looks up before any folder of that name) its ``data_files``
    patterns, relative to the working directory; for a local folder, those patterns relative to it, with its
    card (whose options, a parquet filter say, shape the rows too), or else every file in it outside hidden
    directories and every file its metadata's ``configs`` name wherever they are (:func:`_config_patterns`): a
    superset of what ``datasets`` picks, found in one walk (``load_dataset_builder`` resolving its own patterns
    took 2 s for 2,000 files). A Hub dataset's ``data_files`` name files of its repository, which are not
    listed."""
    folder = Path(source.path)
    patterns = _patterns(source.data_files)
    if _is_builder(source):
        return _resolved(patterns, os.getcwd())
    if not folder.is_dir():
        return []
    if patterns:
        return _resolved([*patterns, *([CARD] if (folder / CARD).is_file() else [])], source.path)
    visible = (p for p in folder.rglob("*") if p.is_file())
    files = {str(p) for p in visible if not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    standalone = folder / STANDALONE_YAML
    named = _resolved(_config_patterns(folder), source.path)
    return sorted(files.union(named, [str(standalone)] if standalone.is_file() else []))


def _resolved(patterns: list[str], base: str) -> list[str]:
    """The local files ``patterns`` name relative to ``base``; a glob that matches nothing names none, as in
    ``datasets`` (``DataFilesList.from_patterns``), and a plain path that does not exist is an error."""
    files: set[str] = set()
    for pattern in patterns:
        if "://" in pattern:
            continue
        try:
            files.update(resolve_pattern(pattern, base))
        except FileNotFoundError:
            if not glob.has_magic(pattern):
                raise
    return sorted(files)


def _config_patterns(folder: Path) -> list[str]:
    """Every path pattern a local folder's metadata names, relative to the folder: each ``configs`` entry's
    ``data_files`` under its ``data_dir``, or its whole ``data_dir``, from the card merged with
    ``.huggingface.yaml`` as ``datasets`` merges them. Metadata that cannot be read is one line naming its file
    (``datasets`` fails on YAML that is not with a traceback)."""
    card, standalone = folder / CARD, folder / STANDALONE_YAML
    try:
        data = DatasetCard.load(card).data.to_dict() if card.is_file() else {}
        if standalone.is_file() and (extra := yaml.safe_load(standalone.read_text())):
            data.update(extra)
        configs = MetadataConfigs.from_dataset_card_data(DatasetCardData(**data))
    except (yaml.YAMLError, ValueError) as error:
        files = " and ".join(str(f) for f in (card, standalone) if f.is_file())
        raise ValueError(
            f"{files}: the dataset's metadata cannot be read: {' '.join(str(error).split())}"
        ) from error
    patterns = []
    for config in configs.values():
        data_dir = Path(config.get("data_dir") or "")
        named = _patterns(config.get("data_files"))
        patterns += [str(data_dir / pattern) for pattern in named] if named else [str(data_dir / "**")]
    return patterns


def _patterns(data_files: Any) -> list[str]:
    """The path patterns of a ``data_files`` value in any of the forms ``datasets`` takes: a pattern, a list of
    them, or a list of ``{split, path}`` entries (a card's), each path a pattern or a list."""
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):  # {split, path}, or {split name: patterns}
        values = [data_files["path"]] if "path" in data_files else list(data_files.values())
        return [pattern for value in values for pattern in _patterns(value)]
    return [pattern for entry in data_files for pattern in _patterns(entry)]


CARD = "README.md"
"""A dataset folder's card, whose ``configs`` name its files and the options ``datasets`` reads them with."""
STANDALONE_YAML = ".huggingface.yaml"
"""Metadata ``datasets`` merges over the card's, if the folder has it."""


def _is_builder(source: HubLike) -> bool:
    """Whether ``datasets`` reads the source with one of its builders (json, parquet, csv, text...: its own list),
    which it looks up before a folder of the same name. A name without a "/", such as "wikitext", may be a Hub
    dataset."""
    return source.path in datasets.packaged_modules._PACKAGED_DATASETS_MODULES


def hub_where(source: HubLike) -> str:
    """A ``datasets`` source as errors name it: ``json, split train, files chats.jsonl``."""
    path = source.path if source.revision is None else f"{source.path}@{source.revision}"
    where = [path, *([source.name] if source.name else []), f"split {source.split}"]
    if source.data_files is not None:
        where.append(f"files {source.data_files}")
    return ", ".join(where)


def load_hub(source: HubLike) -> datasets.Dataset | datasets.IterableDataset:
    """``datasets.load_dataset`` of a source, where a source that cannot be read fails in one line naming it and
    what to do, not in a traceback from deep inside ``datasets`` (and, offline, after 20 s of retries)."""
    where = hub_where(source)
    try:
        dataset = datasets.load_dataset(
            source.path,
            source.name,
            data_files=source.data_files,
            revision=source.revision,
            split=source.split,
            streaming=source.streaming,
            cache_dir=_folder_cache(source),
        )
    except StopIteration as error:  # the json builder reads a first batch for the columns, and there is none
        raise ValueError(f"{where}: no rows to read (an empty file?)") from error
    except DatasetGenerationError as error:
        cause = error.__cause__ or error  # what the builder hit: ArrowInvalid, say
        raise ValueError(
            f"{where}: datasets cannot read it (an empty or malformed file?): {type(cause).__name__}: {cause}"
        ) from error
    except ValueError as error:  # datasets' own complaint (an unknown split, say), named by the source
        raise ValueError(f"{where}: {error}") from error
    except ConnectionError as error:
        hint = (
            "no copy of it is cached (HF_HUB_OFFLINE is set): use a local source, or read it once online"
            if datasets.config.HF_HUB_OFFLINE
            else "use a local source, or set HF_HUB_OFFLINE=1 to read a copy cached earlier"
        )
        raise ValueError(f"{where}: not reachable ({error}): {hint}") from error
    if source.revision is not None and datasets.config.HF_HUB_OFFLINE and not _is_local(source):
        _check_cached_revision(source, dataset, where)
    return dataset


def _is_local(source: HubLike) -> bool:
    """Whether ``datasets`` reads local files: with a builder, or from a folder."""
    return _is_builder(source) or Path(source.path).is_dir()


def _check_cached_revision(
    source: HubLike, dataset: datasets.Dataset | datasets.IterableDataset, where: str
) -> None:
    """Offline, ``datasets`` reads the newest cached copy of a Hub dataset whatever revision it is asked for,
    and the token caches would keep another commit's rows under the pinned key. A copy read from the cache lies
    in a folder named by its commit, which must be the pinned one; a streamed copy cannot show it."""
    files = dataset.cache_files if isinstance(dataset, datasets.Dataset) else []
    folders = sorted({Path(file["filename"]).parent.name for file in files})
    if folders != [source.revision]:
        read = f"it read {', '.join(folders)}" if folders else "a streamed copy cannot show which it read"
        raise ValueError(
            f"{where}: offline (HF_HUB_OFFLINE), datasets reads the newest cached copy whatever the revision, "
            f"and {read}: read it once online, or pin the commit of a cached copy (its 40 hex digits), unstreamed"
        )


def _folder_cache(source: HubLike) -> str | None:
    """Where ``datasets`` caches the rows of a local folder: a cache of its own for each state of the folder's
    files (None, ``datasets``' usual cache, for any other source).

    ``datasets`` (5.2) keys its cache of a folder whose card lists its files (``configs``, as ``publish.py
    --out`` writes) by the folder's name and the card's unresolved patterns alone
    (``create_builder_configs_from_metadata_configs`` in its ``load.py``), where it keys other local files by
    their modification times: a folder rewritten in place would be read as the rows it held when first loaded.
    A stream reads the files themselves, and needs no cache."""
    if source.streaming or _is_builder(source) or not Path(source.path).is_dir():
        return None
    stamps = json.dumps(_stamps(_hub_local_files(source))).encode()
    return str(
        Path(datasets.config.HF_DATASETS_CACHE) / "zmaj-folders" / hashlib.sha256(stamps).hexdigest()[:16]
    )


T = TypeVar("T")


def reading(rows: Iterable[T], where: str, unit: str = "row") -> Iterator[T]:
    """``rows``, where an error met while reading the next one (a corrupt parquet page, a malformed line that
    a streaming source reaches only now) is one line naming the source and the row, not a traceback."""
    iterator = iter(rows)
    for index in itertools.count():
        try:
            row = next(iterator)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, DatasetGenerationError) as error:
            raise ValueError(
                f"{where}: cannot read {unit} {index}: {type(error).__name__}: {error}"
            ) from error
        yield row


def _all_documents(source: Source) -> Iterator[Document]:
    if isinstance(source, StdlibSource):
        return stdlib_documents()
    if isinstance(source, HubSource):
        return hub_documents(source)
    return files_documents(source)


def stdlib_documents() -> Iterator[Document]:
    """Every ``.py`` file of the standard library (a sorted walk), then each pydoc topic as its own document."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    for relative in _stdlib_files(root):
        try:
            text = (root / relative).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            logger.debug("skipping {}: not UTF-8", relative)
            continue
        yield Document(f"stdlib:{relative.as_posix()}", text)
    for topic in sorted(topics):
        yield Document(f"pydoc:{topic}", topics[topic])


def _stdlib_files(root: Path) -> Iterator[Path]:
    """The standard library's ``.py`` files that are code, relative to ``root``, in a sorted walk."""
    for directory, subdirectories, files in os.walk(root):
        # Pruned in place so os.walk never descends into them (site-packages alone can hold 10k files), and
        # sorted so the walk order, hence the document order, is the same on every file system.
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_STDLIB_DIRS)
        for file in sorted(f for f in files if f.endswith(".py")):
            relative = Path(directory, file).relative_to(root)
            if not _generated(relative):
                yield relative


def _generated(relative: Path) -> bool:
    """Files that are data, not code: the pydoc topics (yielded one per topic instead) and the build settings,
    which differ per machine (``_sysconfigdata_*.py``, and ``config-3.11-x86_64-linux-gnu/``, whose
    ``python-config.py`` is named for the platform and starts with the interpreter's path)."""
    return (
        relative.as_posix() == "pydoc_data/topics.py"
        or relative.name.startswith("_sysconfigdata_")
        or relative.parts[0].startswith("config-")
    )


def hub_documents(source: HubSource) -> Iterator[Document]:
    """Rows of a ``datasets`` dataset, in the dataset's order."""
    dataset = load_hub(source)
    where = hub_where(source)
    columns = dataset.column_names  # None for a stream whose features are read with its first rows
    if columns is not None and source.text_column not in columns:
        raise ValueError(
            f"{where}: no {source.text_column!r} column (has {', '.join(columns)}): set text_column"
        )
    rows = islice(dataset.select_columns([source.text_column]), source.max_documents)  # None: all rows
    for index, row in enumerate(reading(rows, where)):
        yield _row(row[source.text_column], source.text_column, f"{where}, row {index}")


def files_documents(source: FilesSource) -> Iterator[Document]:
    """Each file in turn: a text file is one document, a jsonl line or parquet row another.

    Text and jsonl files are read by ``zmaj.text``, so a file that is not UTF-8 text or a line that is not
    JSON fails in one line naming the file and the place; parquet is binary and read by ``pyarrow``.
    """
    for path in source.paths:
        if source.format == "text":
            yield _by_text(read_text(path))
        elif source.format == "jsonl":
            for number, row in read_jsonl(path):
                where = f"{path}:{number}"
                yield _row(_text_field(row, source.text_column, where), source.text_column, where)
        else:
            for index, text in enumerate(_parquet_column(path, source.text_column)):
                yield _row(text, source.text_column, f"{path}, row {index}")


def _parquet_column(path: str, column: str) -> Iterator[Any]:
    """A parquet file's column, value by value, read by ``pyarrow`` batch by batch: ``datasets`` would take the
    path for a glob (``shard[1].parquet`` matching ``shard1.parquet``) and fails on a file with no rows."""
    try:
        file = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path}: not a parquet file ({error})") from error
    names = file.schema_arrow.names
    if column not in names:
        raise ValueError(f"{path}: no {column!r} column (has {', '.join(names)})")
    # A thousand rows at a time: pyarrow's default of 65,536 documents held 852 MB beside 200 MB of text.
    batches = file.iter_batches(batch_size=PARQUET_BATCH, columns=[column])
    for batch in reading(batches, path, "batch of rows"):
        yield from batch.column(0).to_pylist()


PARQUET_BATCH = 1024
"""Rows a parquet file is read in at once."""


def _row(text: Any, column: str, where: str) -> Document:
    """A row of a table, named by its text's hash (see the module's docstring); a cell that is not text (a number,
    a list, a null) is a broken row, an error naming it, not something to stringify or skip."""
    if not isinstance(text, str):
        held = "a null" if text is None else f"a value of type {type(text).__name__}"
        raise ValueError(f"{where}: the {column!r} column holds {held}, not text")
    return _by_text(text)


def _by_text(text: str) -> Document:
    """A document named by its text's hash (see the module's docstring)."""
    return Document(f"sha256:{hashlib.sha256(text.encode()).hexdigest()}", text)


def _text_field(row: Any, column: str, where: str) -> str:
    """A jsonl row's text, or an error naming the row's ``file:line``; JSON can spell a lone surrogate
    (``"\\ud83d"``, half an emoji a truncating scraper left), which is no text UTF-8 can encode."""
    if not isinstance(row, dict) or not isinstance(row.get(column), str):
        raise ValueError(f"{where}: expected a JSON object with a string {column!r} field")
    text: str = row[column]
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where}: the {column!r} field holds a lone surrogate ({text[error.start]!r} at character "
            f"{error.start}), not text"
        ) from error
    return text
