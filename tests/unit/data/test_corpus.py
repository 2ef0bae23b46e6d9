import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmaj.data import corpus
from zmaj.data.config import FilesSource, HubSource, StdlibSource
from zmaj.data.corpus import Document, documents, in_validation, source_key, stdlib_documents
from zmaj.text import NotTextError

FRACTION = 0.05


@pytest.fixture(scope="module")
def stdlib_splits() -> dict[str, list[Document]]:
    return {split: list(documents(StdlibSource(), split, FRACTION)) for split in ("train", "validation")}


def test_stdlib_corpus_is_code_and_pydoc_topics(stdlib_splits: dict[str, list[Document]]) -> None:
    by_name = {d.name: d.text for split in stdlib_splits.values() for d in split}
    assert len(by_name) > 500
    assert sum(map(len, by_name.values())) > 5_000_000
    assert "stdlib:json/decoder.py" in by_name
    for topic, text in topics.items():
        assert by_name[f"pydoc:{topic}"] == text
    skipped_dirs = {"site-packages", "test", "tests", "idle_test"}
    stdlib = [name.removeprefix("stdlib:") for name in by_name if name.startswith("stdlib:")]
    assert not [name for name in stdlib if skipped_dirs.intersection(name.split("/")[:-1])]
    assert not [name for name in stdlib if name == "pydoc_data/topics.py" or "_sysconfigdata_" in name]
    assert not [name for name in stdlib if name.startswith("config-")]  # python-config.py names the machine


def test_split_is_disjoint_complete_and_deterministic(stdlib_splits: dict[str, list[Document]]) -> None:
    train, validation = ([d.name for d in stdlib_splits[s]] for s in ("train", "validation"))
    assert not set(train) & set(validation)
    everything = [d.name for d in stdlib_documents() if d.text]
    assert sorted(train + validation) == sorted(everything)
    assert [d.name for d in documents(StdlibSource(), "validation", FRACTION)] == validation
    assert 0 < len(validation) < 3 * FRACTION * len(everything)


@given(st.text(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_growing_the_validation_fraction_only_moves_documents_into_it(name: str, a: float, b: float) -> None:
    small, large = sorted([a, b])
    assert not in_validation(name, small) or in_validation(name, large)


def test_validation_fraction_is_respected_on_average() -> None:
    n, fraction = 20_000, 0.1
    held_out = sum(in_validation(f"doc-{i}", fraction) for i in range(n))
    sigma = (n * fraction * (1 - fraction)) ** 0.5
    assert abs(held_out - n * fraction) < 5 * sigma


def _all(source: FilesSource | HubSource) -> list[Document]:
    """Both splits, validation fraction 0.5 so both get documents."""
    return [d for split in ("train", "validation") for d in documents(source, split, 0.5)]


def test_the_split_of_a_name_is_pinned() -> None:
    """Held-out numbers compare across versions only while the same documents are held out: a change of the rule
    (the hash's byte order, what is hashed) must bump ``CORPUS_VERSION`` and say so, not pass."""
    held_out = [
        7,
        19,
        20,
        21,
        49,
        50,
        52,
        59,
        60,
        73,
        80,
        91,
        103,
        107,
        108,
        118,
        154,
        159,
        160,
        161,
        164,
        171,
        178,
    ]
    assert [i for i in range(200) if in_validation(f"doc-{i}", 0.1)] == held_out


def test_a_row_is_named_by_the_sha256_of_its_exact_text(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "x\n"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    names = [d.name for d in corpus.files_documents(FilesSource(paths=[str(path)], format="jsonl"))]
    assert names == [f"sha256:{hashlib.sha256(text.encode()).hexdigest()}" for text in ("x\n", "x")]


def test_jsonl_files_give_one_document_per_line(jsonl_file: Path) -> None:
    rows = [json.loads(line)["text"] for line in jsonl_file.read_text().splitlines()]
    docs = _all(FilesSource(paths=[str(jsonl_file)], format="jsonl"))
    assert sorted(d.text for d in docs) == sorted(rows)


def test_a_row_keeps_its_split_when_rows_come_and_go_or_the_path_is_spelled_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row named by its place would move between the splits (and leak validation text into training) when a
    row before it is deleted, or the same file is named by a relative path; a repeated row sits in one split."""
    rows = [f"document number {i}" for i in range(400)]

    def splits(texts: list[str], path: str) -> dict[str, set[str]]:
        Path(path).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        source = FilesSource(paths=[path], format="jsonl")
        return {split: {d.text for d in documents(source, split, 0.2)} for split in ("train", "validation")}

    monkeypatch.chdir(tmp_path)
    before = splits(rows, str(tmp_path / "c.jsonl"))
    assert all(before.values())
    after = splits([rows[0], *rows[2:], "a new row", rows[5]], "c.jsonl")
    assert after["validation"] - {"a new row"} == before["validation"] - {rows[1]}
    assert after["train"] - {"a new row"} == before["train"] - {rows[1]}


def test_text_files_are_whole_documents(tmp_path: Path) -> None:
    texts = ["first line\nsecond line\n\nafter a blank line\n", "ünïcödé, no final newline"]
    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path, text in zip(paths, texts, strict=True):
        path.write_text(text, encoding="utf-8")
    docs = _all(FilesSource(paths=[str(p) for p in paths], format="text"))
    assert sorted(d.text for d in docs) == sorted(texts)


def test_a_text_file_is_split_by_its_text_not_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By path, a copy of a file could sit on the other side of the split, and the same file moved between the
    splits with the spelling of its path (``a.txt``, ``./a.txt``)."""
    copies = [tmp_path / f"copy{i}.txt" for i in range(40)]
    for path in copies:
        path.write_text("the same text\n")
    monkeypatch.chdir(tmp_path)
    spellings = [*map(str, copies), "copy3.txt", "./copy3.txt", "../" + tmp_path.name + "/copy3.txt"]
    source = FilesSource(paths=spellings, format="text")
    sides = {split: len(list(documents(source, split, 0.5))) for split in ("train", "validation")}
    assert sorted(sides.values()) == [0, len(spellings)]


def test_text_files_keep_their_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "windows.txt"
    path.write_bytes(b"first\r\nsecond\r\n")
    assert [d.text for d in _all(FilesSource(paths=[str(path)], format="text"))] == ["first\r\nsecond\r\n"]


@pytest.mark.parametrize("format_", ["text", "jsonl"])
def test_a_file_that_is_not_utf8_fails_naming_file_and_offset(tmp_path: Path, format_: str) -> None:
    path = tmp_path / "corpus.bin"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    line = ", line 1" if format_ == "jsonl" else ""  # read a line at a time
    with pytest.raises(
        NotTextError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0xe9 at offset 13{line}\)$"
    ):
        _all(FilesSource(paths=[str(path)], format=format_))


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("{'text': 'x'}", "not JSON"),
        ('{"body": "x"}', "string 'text' field"),
        ('["x"]', "string 'text' field"),
        (
            '{"text": "half an emoji: \\ud83d"}',
            "holds a lone surrogate ('\\ud83d' at character 15), not text",
        ),
    ],
)
def test_a_bad_jsonl_line_fails_naming_file_and_line(tmp_path: Path, line: str, complaint: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text(f'{{"text": "fine"}}\n\n{line}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: .*{re.escape(complaint)}"):
        _all(FilesSource(paths=[str(path)], format="jsonl"))


@pytest.mark.parametrize("batch", [corpus.PARQUET_BATCH, 2, 1])
def test_parquet_files_read_the_text_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Every row, whatever the batches it is read in (a thousand rows: pyarrow's 65,536 took 852 MB)."""
    monkeypatch.setattr(corpus, "PARQUET_BATCH", batch)
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["alpha", "beta", "gamma"], "n": [1, 2, 3]}), path)
    docs = _all(FilesSource(paths=[str(path)], format="parquet", text_column="body"))
    assert sorted(d.text for d in docs) == ["alpha", "beta", "gamma"]


def test_a_parquet_file_is_read_by_its_name_not_as_a_glob(tmp_path: Path) -> None:
    """``shard[1].parquet`` is that file, not the pattern matching ``shard1.parquet``."""
    for name in ("shard[1].parquet", "shard1.parquet", "only[2].parquet"):
        pq.write_table(pa.table({"text": [f"from {name}"]}), tmp_path / name)
    for name in ("shard[1].parquet", "only[2].parquet"):
        assert [d.text for d in _all(FilesSource(paths=[str(tmp_path / name)], format="parquet"))] == [
            f"from {name}"
        ]


def test_an_empty_parquet_file_has_no_documents(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    assert _all(FilesSource(paths=[str(path)], format="parquet")) == []


@pytest.mark.parametrize(
    ("content", "complaint"),
    [(b"not parquet", "not a parquet file"), (None, "no 'text' column (has body, n)")],
)
def test_a_bad_parquet_file_fails_naming_it(tmp_path: Path, content: bytes | None, complaint: str) -> None:
    path = tmp_path / "docs.parquet"
    if content is None:
        pq.write_table(pa.table({"body": ["alpha"], "n": [1]}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {re.escape(complaint)}"):
        _all(FilesSource(paths=[str(path)], format="parquet"))


def test_a_parquet_file_damaged_inside_fails_naming_it(tmp_path: Path) -> None:
    """Its footer reads, a compressed page does not: a traceback from pyarrow before (an OSError)."""
    path = tmp_path / "docs.parquet"
    pq.write_table(
        pa.table({"text": [f"document {i} " * 20 for i in range(2000)]}), path, compression="snappy"
    )
    damaged = bytearray(path.read_bytes())
    damaged[200:2200] = bytes(byte ^ 0x5A for byte in damaged[200:2200])
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot read batch of rows 0: OSError"):
        _all(FilesSource(paths=[str(path)], format="parquet"))


@pytest.mark.parametrize(
    ("cells", "complaint"),
    [
        ([1, 2], "row 0: the 'text' column holds a value of type int"),
        (["fine", None], "row 1: the 'text' column holds a null"),
        ([["a", "b"], ["c", "d"]], "row 0: the 'text' column holds a value of type list"),
    ],
)
@pytest.mark.parametrize("kind", ["files parquet", "hub json", "hub parquet"])
def test_a_cell_that_is_not_text_fails_naming_source_row_and_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, cells: list[object], complaint: str
) -> None:
    """Not stringified, skipped, nor (a list of two) encoded as a pair of texts: refused, as a jsonl line is."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    path = tmp_path / ("docs.jsonl" if kind == "hub json" else "docs.parquet")
    if kind == "hub json":
        path.write_text("".join(json.dumps({"text": cell}) + "\n" for cell in cells))
    else:
        pq.write_table(pa.table({"text": cells}), path)
    if kind == "files parquet":
        source: FilesSource | HubSource = FilesSource(paths=[str(path)], format="parquet")
        where = str(path)
    else:
        source = HubSource(path=kind.removeprefix("hub "), data_files=str(path))
        where = f"{source.path}, split train, files {path}"
    with pytest.raises(ValueError, match=rf"^{re.escape(f'{where}, {complaint}')}, not text$"):
        _all(source)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_reads_local_builders(
    jsonl_file: Path, streaming: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")  # keep ~/.cache clean
    rows = [json.loads(line)["text"] for line in jsonl_file.read_text().splitlines()]
    source = HubSource(path="json", data_files=str(jsonl_file), streaming=streaming)
    assert sorted(d.text for d in _all(source)) == sorted(rows)
    first = HubSource(path="json", data_files=str(jsonl_file), streaming=streaming, max_documents=5)
    assert sorted(d.text for d in _all(first)) == sorted(rows[:5])


@pytest.mark.parametrize(
    ("path", "complaint"),
    [
        ("json", "no rows to read (an empty file?)"),
        ("parquet", "datasets cannot read it (an empty or malformed file?): ArrowInvalid: "),
        ("someuser/some-corpus", "not reachable (Couldn't reach 'someuser/some-corpus' on the Hub"),
    ],
)
def test_a_datasets_source_that_cannot_be_read_fails_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str, complaint: str
) -> None:
    """An empty local file or a Hub name offline: one line naming the source, not a traceback from datasets."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network in tests, and no retries
    empty = tmp_path / f"empty.{path}"
    if path == "json":
        empty.write_text("")
    elif path == "parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    source = HubSource(path=path) if "/" in path else HubSource(path=path, data_files=str(empty))
    where = path + ", split train" + ("" if "/" in path else f", files {empty}")
    with pytest.raises(ValueError, match=f"^{re.escape(f'{where}: {complaint}')}"):
        _all(source)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"split": "test"}, r"split test, files .*: (Unknown split \"test\"|Bad split: test)"),
        (
            {"text_column": "body"},
            r"split train, files .*: no 'body' column \(has text, id\): set text_column$",
        ),
    ],
)
def test_a_datasets_source_without_its_split_or_column_fails_naming_the_source(
    jsonl_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    streaming: bool,
    change: dict[str, str],
    complaint: str,
) -> None:
    """datasets' own words, but prefixed by the source they are about, as every other corpus error is."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf")
    source = HubSource(path="json", data_files=str(jsonl_file), streaming=streaming, **change)
    with pytest.raises(ValueError, match=rf"^json, {complaint}"):
        _all(source)


def test_source_key_changes_with_whatever_changes_the_documents(jsonl_file: Path) -> None:
    source = FilesSource(paths=[str(jsonl_file)], format="jsonl")
    key = source_key(source, "train", FRACTION)
    assert source_key(source, "train", FRACTION) == key
    assert source_key(source, "validation", FRACTION) != key
    assert source_key(source, "train", 0.1) != key
    assert source_key(FilesSource(paths=[str(jsonl_file)], format="text"), "train", FRACTION) != key
    stat = jsonl_file.stat()
    os.utime(jsonl_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert source_key(source, "train", FRACTION) != key


def test_a_hub_revision_is_read_and_keys_the_documents(
    jsonl_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub dataset's branch moves: the commit a spec names is what datasets reads, and another one is another
    corpus to the caches."""
    asked: list[dict[str, Any]] = []
    rows = datasets.Dataset.from_dict({"text": ["a document"]})

    def load_dataset(*args: Any, **kwargs: Any) -> datasets.Dataset:
        asked.append(kwargs)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    pinned = HubSource(path="someuser/some-corpus", revision="0123abc")
    assert [d.text for d in _all(pinned)] == ["a document"]
    assert [kwargs["revision"] for kwargs in asked] == ["0123abc", "0123abc"]
    keys = {
        source_key(HubSource(path="someuser/some-corpus", revision=r), "train", FRACTION) for r in ("a", "b")
    }
    assert len(keys | {source_key(HubSource(path="someuser/some-corpus"), "train", FRACTION)}) == 3


def test_a_hub_source_without_a_revision_keeps_the_key_it_had_before_revisions() -> None:
    """A spec naming no revision keys its caches as before ``revision`` existed (a new key encodes the corpus
    again: hours at scale). The values are source_key's at ecf0f62 (CORPUS_VERSION 4): update them only with
    CORPUS_VERSION."""
    assert source_key(HubSource(path="someuser/some-corpus"), "train", 0.1) == (
        "8dc90932aba9b23cc967f7000ce9211073a765e50c7ce9bffb4c80ec559ae22f"
    )
    assert source_key(HubSource(path="someuser/some-corpus", name="x", split="test"), "validation", 0.05) == (
        "aeb03c9a5733b151784f1307afe256825db29e3d964d7e2ede7148d66da6a139"
    )


def test_offline_a_revision_is_read_only_from_its_own_cached_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, datasets reads the newest cached copy whatever the revision (its cache falls back to the last
    one written): the pinned run read another commit's rows and cached their tokens under the pinned key. A
    cached copy lies in a folder named by its commit (as datasets' cache lays them out: .../0.0.0/<commit>/)."""
    commit, other = "a" * 40, "b" * 40
    datasets.Dataset.from_dict({"text": ["rows of commit B"]}).save_to_disk(tmp_path / other)
    cached = datasets.load_from_disk(str(tmp_path / other))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: cached)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert [d.text for d in _all(HubSource(path="someuser/some-corpus", revision=other))] == [
        "rows of commit B"
    ]
    with pytest.raises(ValueError, match=f"datasets reads the newest cached copy .* and it read {other}: "):
        _all(HubSource(path="someuser/some-corpus", revision=commit))
    streamed = datasets.Dataset.from_dict({"text": ["rows"]}).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: streamed)
    with pytest.raises(ValueError, match="a streamed copy cannot show which it read"):
        _all(HubSource(path="someuser/some-corpus", revision=other, streaming=True))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # online, datasets resolves the revision
    assert [d.text for d in _all(HubSource(path="someuser/some-corpus", revision=commit))] == ["rows"]


@pytest.mark.parametrize("offline", [False, True])
def test_an_unreachable_hub_dataset_says_what_to_do(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """Offline already, the hint to go offline was no help: what is missing is a cached copy. The line names the
    source as read, its revision included."""

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'someuser/some-corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    hint = "no copy of it is cached (HF_HUB_OFFLINE is set)" if offline else "or set HF_HUB_OFFLINE=1 to read"
    for revision, where in ((None, "someuser/some-corpus"), ("0123abc", "someuser/some-corpus@0123abc")):
        with pytest.raises(
            ValueError, match=f"^{re.escape(where)}, split train: not reachable .*{re.escape(hint)}"
        ):
            _all(HubSource(path="someuser/some-corpus", revision=revision))


def test_stdlib_key_names_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    key = source_key(StdlibSource(), "train", FRACTION)
    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    assert source_key(StdlibSource(), "train", FRACTION) != key


def test_stdlib_key_changes_with_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module added or edited in the standard library (a system Python's packages add some) is another
    corpus: keyed by the interpreter alone, the caches of the old one were reused."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    key = source_key(StdlibSource(), "train", FRACTION)
    assert source_key(StdlibSource(), "train", FRACTION) == key
    (root / "pkg" / "new.py").write_text("y = 2\n")
    added = source_key(StdlibSource(), "train", FRACTION)
    assert added != key
    (root / "a.py").write_text("x = 10\n")
    assert source_key(StdlibSource(), "train", FRACTION) != added
    resized = source_key(StdlibSource(), "train", FRACTION)
    stat = (root / "a.py").stat()
    (root / "a.py").write_text("x = 20\n")  # the same size: its time tells
    os.utime(root / "a.py", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert source_key(StdlibSource(), "train", FRACTION) != resized
    (root / "notes.txt").write_text("not code")  # not read, so no change
    edited = source_key(StdlibSource(), "train", FRACTION)
    (root / "more.txt").write_text("not code either")
    assert source_key(StdlibSource(), "train", FRACTION) == edited


def test_one_relative_path_from_two_folders_is_two_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``paths: [c.jsonl]`` names another file from another folder: of one size and time, the two were one key,
    and the other corpus's tokenizer and tokens were reused."""
    for folder, text in (("a", "aaaa"), ("b", "bbbb")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "c.jsonl").write_text(json.dumps({"text": text}) + "\n")
    stat = (tmp_path / "a" / "c.jsonl").stat()
    os.utime(tmp_path / "b" / "c.jsonl", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    keys = set()
    for folder in ("a", "b"):
        monkeypatch.chdir(tmp_path / folder)
        keys.add(source_key(FilesSource(paths=["c.jsonl"], format="jsonl"), "train", FRACTION))
    assert len(keys) == 2


@pytest.mark.parametrize("pattern", ["exact", "glob", "folder"])
def test_a_hub_source_of_local_files_is_keyed_by_those_files(
    jsonl_file: Path, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Editing a file the json builder reads must rebuild the tokenizer and token files, as for files sources;
    the data_files of a Hub dataset name files of its repository, not of the working directory."""
    monkeypatch.chdir(jsonl_file.parent)
    for hub_name in ("someone/corpus", "wikitext"):  # a legacy Hub name has no "/" and is no builder either
        assert source_key(HubSource(path=hub_name, data_files="train/*.jsonl"), "train", FRACTION)
    source = {
        "exact": HubSource(path="json", data_files=str(jsonl_file)),
        "glob": HubSource(path="json", data_files=["*.jsonl"]),  # relative to the working directory
        "folder": HubSource(path=str(jsonl_file.parent)),
    }[pattern]
    key = source_key(source, "train", FRACTION)
    assert source_key(source, "train", FRACTION) == key
    stat = jsonl_file.stat()
    os.utime(jsonl_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert source_key(source, "train", FRACTION) != key


def test_the_stdlib_walk_is_sorted_whatever_order_the_file_system_lists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The document order (hence the token file and the packed stream) must be the same on every file system;
    the suite compared two walks of the same directory, which agree whether or not they are sorted."""
    root = tmp_path / "lib"
    for relative in ("a.py", "b.py", "pkg/c.py", "pkg/d.py", "zpkg/e.py"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(f"# {relative}\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(root)})
    walk = os.walk

    def unsorted_walk(top: str | Path) -> Iterator[tuple[str, list[str], list[str]]]:
        """os.walk listing each directory in descending order, as another file system may."""
        for directory, subdirectories, files in walk(top):
            subdirectories.sort(reverse=True)  # in place: the caller's pruning must still reach the walk
            files.sort(reverse=True)
            yield directory, subdirectories, files

    monkeypatch.setattr(os, "walk", unsorted_walk)
    names = [d.name for d in stdlib_documents() if d.name.startswith("stdlib:")]
    assert names == ["stdlib:a.py", "stdlib:b.py", "stdlib:pkg/c.py", "stdlib:pkg/d.py", "stdlib:zpkg/e.py"]


def test_source_key_changes_with_the_corpus_version(
    jsonl_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CORPUS_VERSION is bumped so that caches built by the old reading are rebuilt; left out of the key, a
    bump silently reused tokenizers and token files of the old documents."""
    for source in (FilesSource(paths=[str(jsonl_file)], format="jsonl"), StdlibSource()):
        key = source_key(source, "train", 0.05)
        monkeypatch.setattr(corpus, "CORPUS_VERSION", corpus.CORPUS_VERSION + 1)
        assert source_key(source, "train", 0.05) != key
        monkeypatch.undo()


def test_a_hub_folder_is_keyed_without_its_hidden_directories(jsonl_file: Path) -> None:
    """A folder's key covers its files outside hidden directories (a ``.git`` beside the data changes with
    every commit, and would rebuild the tokenizer and token files for nothing)."""
    folder = jsonl_file.parent
    source = HubSource(path=str(folder))
    key = source_key(source, "train", 0.05)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert source_key(source, "train", 0.05) == key


@pytest.mark.parametrize("streaming", [False, True])
def test_a_hub_folder_rewritten_in_place_is_read_anew(tmp_path: Path, streaming: bool) -> None:
    """A folder with a card listing its files (as ``publish.py --out`` writes one), rewritten in place, gives
    its new rows: ``datasets`` keys its cache of such a folder by name and card alone, and served the old ones
    (a stream reads the files themselves: that case keeps it so)."""
    from zmaj.publish.dataset import dataset_card, write_dataset_folder

    folder = tmp_path / "out"
    source = HubSource(path=str(folder), streaming=streaming)
    seen = []
    for texts in (["first", "second"], ["third", "fourth", "fifth"]):
        data = {"train": datasets.Dataset.from_dict({"text": texts})}
        write_dataset_folder(data, dataset_card(data, name="out", license="mit", description="."), folder)
        seen.append([document.text for document in corpus.hub_documents(source)])
    assert seen == [["first", "second"], ["third", "fourth", "fifth"]]


def test_a_folder_whose_card_header_is_not_yaml_is_one_line_naming_the_card(tmp_path: Path) -> None:
    """``datasets`` fails on it with a YAML parser's traceback."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "out" / "README.md").write_text("---\nconfigs: [default\n---\n")
    with pytest.raises(
        ValueError, match=r"out/README.md: the dataset's metadata cannot be read: while parsing"
    ):
        source_key(HubSource(path=str(tmp_path / "out")), "train", 0.05)


@pytest.mark.parametrize(
    ("card", "standalone", "name", "where"),
    [
        # The card names a file in a hidden folder, or outside the folder (as publish.py's card names its files).
        *(
            (
                f"- config_name: default\n  data_files:\n  - split: train\n    path: {where}\n",
                None,
                None,
                where,
            )
            for where in (".data/train.jsonl", "../shared/train.jsonl")
        ),
        # A config's data_files lie under its data_dir (here a hidden one, which the walk skips).
        (
            "- config_name: a\n  data_files: a.jsonl\n- config_name: b\n  data_dir: .b\n  data_files: x.jsonl\n",
            None,
            "b",
            ".b/x.jsonl",
        ),
        # A config of a data_dir alone reads every file in it.
        (
            "- config_name: a\n  data_files: a.jsonl\n- config_name: b\n  data_dir: .b\n",
            None,
            "b",
            ".b/t.jsonl",
        ),
        # .huggingface.yaml's configs override the card's.
        (None, "configs:\n- config_name: default\n  data_files: .data/x.jsonl\n", None, ".data/x.jsonl"),
    ],
)
def test_the_files_a_folders_metadata_names_are_read_anew_when_they_change(
    tmp_path: Path, card: str | None, standalone: str | None, name: str | None, where: str
) -> None:
    """Where ``datasets`` reads besides the folder's visible files, which zmaj keyed the folder on: rewriting
    those gave the first rows, under the first key."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "not this"}\n')
    if card is not None:
        (folder / "README.md").write_text(f"---\nconfigs:\n{card}---\n")
    if standalone is not None:
        (folder / ".huggingface.yaml").write_text(standalone)
    data = folder / where
    data.parent.mkdir(parents=True, exist_ok=True)
    source = HubSource(path=str(folder), name=name)
    seen, keys = [], set()
    for texts in (["first", "second"], ["third"]):
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        seen.append([document.text for document in corpus.hub_documents(source)])
        keys.add(source_key(source, "train", 0.05))
    assert seen == [["first", "second"], ["third"]]
    assert len(keys) == 2


def test_a_glob_that_matches_nothing_names_no_file_as_in_datasets(tmp_path: Path) -> None:
    """``datasets`` reads a folder whose ``data_files`` hold a glob that matches nothing (yet); keying it
    refused the folder."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.jsonl").write_text('{"text": "a"}\n')
    source = HubSource(path=str(tmp_path / "out"), data_files=["a.jsonl", "extra/*.jsonl"])
    assert [document.text for document in corpus.hub_documents(source)] == ["a"]
    source_key(source, "train", 0.05)
    with pytest.raises(FileNotFoundError, match=r"b\.jsonl"):  # a plain path that does not exist
        source_key(HubSource(path=str(tmp_path / "out"), data_files=["a.jsonl", "b.jsonl"]), "train", 0.05)


def test_a_builder_name_is_a_builder_even_beside_a_folder_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``datasets`` looks up its builders before folders: ``path: parquet`` with ``data_files`` relative to the
    working directory is the parquet builder even where a folder ``parquet/`` holds the file (zmaj looked for
    ``parquet/parquet/...`` and refused the source)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "parquet" / "text.parquet")
    source = HubSource(path="parquet", data_files="parquet/text.parquet")
    assert [document.text for document in corpus.hub_documents(source)] == ["a", "b"]
    key = source_key(source, "train", 0.05)
    pq.write_table(pa.table({"text": ["c"]}), tmp_path / "parquet" / "text.parquet")
    assert source_key(source, "train", 0.05) != key


def test_a_folders_key_covers_its_card_when_data_files_are_named(tmp_path: Path) -> None:
    """The card's options (a parquet filter, say) shape the rows read even when ``data_files`` names the files:
    a card edited since gives another key, so token files made from the old rows are not reused."""
    folder = tmp_path / "out"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["keep", "drop"]}), folder / "data" / "train.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files: data/*.parquet\n---\n"
    )
    source = HubSource(path=str(folder), data_files="data/train.parquet")
    key = source_key(source, "train", 0.05)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files: data/*.parquet\n  filters: [[text, '==', keep]]\n---\n"
    )
    assert source_key(source, "train", 0.05) != key


def test_two_folders_at_one_relative_path_are_two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``path: out`` from two working directories names two folders, though their files have the same names,
    sizes and times (as a copy that keeps times makes): each gives its own rows, under its own key."""
    from zmaj.publish.dataset import dataset_card, write_dataset_folder

    for where, texts in (("a", ["aaaa", "bbbb"]), ("b", ["cccc", "dddd"])):
        data = {"train": datasets.Dataset.from_dict({"text": texts})}
        write_dataset_folder(
            data, dataset_card(data, name="out", license="mit", description="."), tmp_path / where / "out"
        )
    for file in (tmp_path / "a" / "out").rglob("*"):
        twin = tmp_path / "b" / "out" / file.relative_to(tmp_path / "a" / "out")
        assert twin.stat().st_size == file.stat().st_size
        os.utime(twin, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns))
    seen, keys = [], set()
    for where in ("a", "b"):
        monkeypatch.chdir(tmp_path / where)
        seen.append([document.text for document in corpus.hub_documents(HubSource(path="out"))])
        keys.add(source_key(HubSource(path="out"), "train", 0.05))
    assert seen == [["aaaa", "bbbb"], ["cccc", "dddd"]]
    assert len(keys) == 2
