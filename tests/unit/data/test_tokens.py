import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zmaj import fileio
from zmaj.data import corpus, tokens
from zmaj.data.config import FilesSource, Source, StdlibSource
from zmaj.data.corpus import SPLITS, Document, Split, documents, in_validation, source_key, split_documents
from zmaj.data.tokenizer import Tokenizer
from zmaj.data.tokens import TOKENS_VERSION, TokenFile, token_dtype, tokenize_splits

FRACTION = 0.2


@pytest.fixture
def source(jsonl_file: Path) -> FilesSource:
    return FilesSource(paths=[str(jsonl_file)], format="jsonl")


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "tokens").iterdir())


def test_token_file_is_each_document_encoded_then_eos(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path
) -> None:
    for split, token_file in tokenize_splits(tokenizer, source, FRACTION, tmp_path).items():
        docs = list(documents(source, split, FRACTION))
        assert token_file.n_documents == len(docs) > 0
        assert token_file.tokens.dtype == np.uint16
        for i, doc in enumerate(docs):
            assert token_file.document(i).tolist() == [*tokenizer.encode(doc.text), tokenizer.eos_id]
        assert token_file.n_tokens == token_file.offsets[-1]
        assert (token_file.eos_id, token_file.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
        assert token_file.vocab_size == tokenizer.vocab_size


def test_second_call_opens_the_cache(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    entries = _entries(tmp_path)  # one finished directory per split, no temporary left
    assert [name.split("-")[0] for name in entries] == ["train", "validation"]

    def fail(*args: object) -> None:
        raise AssertionError("read the corpus again instead of opening the cache")

    monkeypatch.setattr(tokens, "split_documents", fail)
    second = tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    for split in SPLITS:
        assert isinstance(second[split].tokens, np.memmap)
        assert np.array_equal(second[split].tokens, first[split].tokens)
        assert np.array_equal(second[split].offsets, first[split].offsets)
    shutil.rmtree(tmp_path / "tokens" / entries[1])
    with pytest.raises(AssertionError, match="read the corpus again"):
        tokenize_splits(tokenizer, source, FRACTION, tmp_path)


def test_a_crash_leaves_nothing_behind(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crashing(source: Source, fraction: float) -> Iterator[tuple[Split, Document]]:
        yield from list(split_documents(source, fraction))[:3]
        raise KeyboardInterrupt

    monkeypatch.setattr(tokens, "ENCODE_CHUNK", 2)  # so some tokens are written before the crash
    monkeypatch.setattr(tokens, "split_documents", crashing)
    with pytest.raises(KeyboardInterrupt):
        tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert _entries(tmp_path) == []


def test_a_full_cache_is_one_line_naming_it_and_a_corpus_error_stays_itself(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk met while encoding (minutes into a run) is a ``ValueError`` naming the cache and what to do,
    which programs report in one line, and leaves no partial file; an error of reading the corpus is not the
    cache's, and keeps its own type and words."""
    real = tokens._write

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tokens, "_write", full)
    with pytest.raises(
        ValueError,
        match=rf"cannot write the train and validation splits' tokens in {tmp_path} \(No space left",
    ):
        tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert _entries(tmp_path) == []

    def unwritable(*args: object) -> None:  # a cache folder without write permission: the error names a file
        raise PermissionError(
            errno.EACCES, "Permission denied", str(tmp_path / "tokens" / "x" / "tokens.bin")
        )

    monkeypatch.setattr(tokens, "_write", unwritable)
    with pytest.raises(
        ValueError, match=rf"cannot write the train and validation splits' tokens in {tmp_path} \(Permission"
    ):
        tokenize_splits(tokenizer, source, FRACTION, tmp_path)

    def unreadable(source: Source, fraction: float) -> Iterator[tuple[Split, Document]]:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/data/corpus/part-7.jsonl")
        yield  # a generator, as split_documents() is

    monkeypatch.setattr(tokens, "_write", real)
    monkeypatch.setattr(tokens, "split_documents", unreadable)
    with pytest.raises(FileNotFoundError, match=r"part-7\.jsonl"):
        tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert _entries(tmp_path) == []


def test_an_encoding_marks_its_staging_folder_while_it_writes(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes a killed encoding's leftover sweepable: each split's folder holds the writer's lock file,
    locked."""
    write, seen = tokens._write, []

    def watched(
        tokenizer: Tokenizer, docs: Iterator[tuple[Split, Document]], directories: dict[Split, Path]
    ) -> dict[Split, dict[str, int | str]]:
        for directory in directories.values():
            lock = directory.parent / fileio.WRITER_LOCK
            with open(lock, "a+") as other, pytest.raises(BlockingIOError):  # another process's view: taken
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(lock)
        return write(tokenizer, docs, directories)

    monkeypatch.setattr(tokens, "_write", watched)
    tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert len(set(seen)) == 2


def test_what_a_killed_encoding_left_is_removed_by_the_next_one(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path
) -> None:
    """A SIGKILL (the OOM killer, say) mid-encoding leaves a whole split's staging folder, which nothing else
    removes; the next encoding in the cache removes those whose writer is gone, and leaves one being written
    (its lock held) and one not locked yet."""
    root = tmp_path / "tokens"
    for name in ("dead", "live", "new"):
        (root / f".tmp-{name}" / "data").mkdir(parents=True)
        (root / f".tmp-{name}" / "data" / "tokens.bin").write_bytes(bytes(1000))
    for name in ("dead", "live"):
        (root / f".tmp-{name}" / fileio.WRITER_LOCK).touch()
    with open(root / ".tmp-live" / fileio.WRITER_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's encoding, under way
        tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    hidden = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    assert hidden == [".tmp-live", ".tmp-new"]


def test_an_empty_split_is_an_empty_token_file(tokenizer: Tokenizer, tmp_path: Path) -> None:
    texts = (f"text of doc{i}.txt" for i in range(1000))  # a text file is split by its text's hash
    train_only: list[Path] = []
    for text in texts:
        if not in_validation(f"sha256:{hashlib.sha256(text.encode()).hexdigest()}", FRACTION):
            train_only.append(tmp_path / f"doc{len(train_only)}.txt")
            train_only[-1].write_text(text)
        if len(train_only) == 3:
            break
    source = FilesSource(paths=[str(p) for p in train_only], format="text")
    token_files = tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert token_files["train"].n_documents == 3
    assert (token_files["validation"].n_documents, token_files["validation"].n_tokens) == (0, 0)


def test_dtype_is_the_smallest_that_holds_the_vocabulary() -> None:
    assert token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32


def test_open_reads_what_was_written(tokenizer: Tokenizer, source: FilesSource, tmp_path: Path) -> None:
    written = tokenize_splits(tokenizer, source, FRACTION, tmp_path)["train"]
    (directory,) = (tmp_path / "tokens").glob("train-*")
    opened = TokenFile.open(directory)
    assert opened.n_documents == written.n_documents
    assert (
        opened.document(opened.n_documents - 1).tolist() == written.document(written.n_documents - 1).tolist()
    )


def _ending_early(saved: bytes) -> bytes:
    """An ``offsets.npy`` whose last boundary is one token short of the tokens it indexes."""
    offsets = np.load(io.BytesIO(saved))
    offsets[-1] -= 1
    out = io.BytesIO()
    np.save(out, offsets)
    return out.getvalue()


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        (
            "tokens.bin",
            lambda b: b[:-2],
            "tokens.bin does not hold the",
        ),  # mmap said only "length is greater"
        ("offsets.npy", lambda b: b"", "offsets.npy: "),  # numpy's EOFError, a traceback
        ("offsets.npy", lambda b: b[:-8], "offsets.npy: "),
        # Whole, but ending before the last token: the trailing tokens were dropped from training in silence.
        ("offsets.npy", lambda b: _ending_early(b), "offsets.npy does not end at the"),
        ("meta.json", lambda b: b"[]", "(meta.json: (top level): Input should be"),  # a TypeError
        ("meta.json", lambda b: b.replace(b'"n_tokens"', b'"n"'), "(meta.json: n_tokens: Field required)"),
        ("meta.json", lambda b: b.replace(b'"uint16"', b'"uint99"'), "(meta.json: dtype: Input should be"),
        ("meta.json", lambda b: b[:-2], "(meta.json:"),  # said without what to do
        ("meta.json", lambda b: b"\xff" + b, "(meta.json: not UTF-8 text"),
    ],
)
def test_a_damaged_cache_is_named_with_what_to_do(
    tokenizer: Tokenizer,
    source: FilesSource,
    tmp_path: Path,
    file: str,
    damage: Callable[[bytes], bytes],
    message: str,
) -> None:
    tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    (directory,) = (tmp_path / "tokens").glob("train-*")
    (directory / file).write_bytes(damage((directory / file).read_bytes()))
    with pytest.raises(ValueError, match="damaged token cache") as caught:
        tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert str(directory) in str(caught.value)
    assert message in str(caught.value)
    assert "delete the folder" in str(caught.value)


def test_the_fingerprint_changes_with_any_token_or_document_boundary(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a run records of its data (``data.json``): the rows cut from a file depend on every id and on where
    each document starts, and on nothing else (the fingerprint recorded when the file was written is the one
    computed from it, in chunks of any size)."""
    monkeypatch.setattr(tokens, "FINGERPRINT_CHUNK", 7)  # the file spans many chunks, the last one short
    written = tokenize_splits(tokenizer, source, FRACTION, tmp_path)["train"]
    assert written.recorded is not None
    ids, offsets = np.asarray(written.tokens).copy(), written.offsets.copy()

    def made(ids: np.ndarray, offsets: np.ndarray) -> TokenFile:  # (nothing recorded: computed)
        return TokenFile(ids, offsets, written.vocab_size, written.eos_id, written.pad_id)

    assert made(ids.copy(), offsets.copy()).fingerprint() == written.fingerprint()
    one_token, last = ids.copy(), ids.copy()
    one_token[-2] = (one_token[-2] + 1) % written.vocab_size
    last[-1] = (last[-1] + 1) % written.vocab_size  # in the last, short chunk
    moved = offsets.copy()
    moved[1] += 1  # the same ids, the first two documents split one token later
    changed = [made(one_token, offsets), made(ids, moved), made(last, offsets)]
    assert len({written.fingerprint(), *(file.fingerprint() for file in changed)}) == 4
    monkeypatch.setattr(tokens, "FINGERPRINT_CHUNK", 1 << 24)
    assert made(ids.copy(), offsets.copy()).fingerprint() == written.fingerprint()  # chunks do not matter


def _encoded_alone(tokenizer: Tokenizer, source: Source, split: Split) -> dict[str, bytes]:
    """The files of one split as encoding it on its own wrote them (before both splits shared a read of the
    corpus), by path in the cache's ``tokens`` folder: each non-empty document of the corpus that
    ``in_validation`` puts in the split, encoded alone, then eos, back to back, in the folder named by the key
    those caches were found under."""
    dtype = token_dtype(tokenizer.vocab_size)
    held_out = split == "validation"
    encoded = [
        np.asarray([*tokenizer.encode(d.text), tokenizer.eos_id], dtype=dtype)
        for d in corpus._all_documents(source)
        if d.text and in_validation(d.name, FRACTION) == held_out
    ]
    ids = np.concatenate([np.zeros(0, dtype=dtype), *encoded]).tobytes()
    starts = np.cumsum([0, *map(len, encoded)]).astype(np.int64)
    offsets = io.BytesIO()
    np.save(offsets, starts)
    meta = {
        "fingerprint": hashlib.sha256(ids + starts.tobytes()).hexdigest(),
        "dtype": dtype.name,
        "n_tokens": int(starts[-1]),
        "n_documents": len(encoded),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "source": source_key(source, split, FRACTION),
        "split": split,
    }
    identity = [tokenizer.fingerprint(), source_key(source, split, FRACTION), split, TOKENS_VERSION]
    folder = f"{split}-{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]}"
    return {
        f"{folder}/tokens.bin": ids,
        f"{folder}/offsets.npy": offsets.getvalue(),
        f"{folder}/meta.json": json.dumps(meta, indent=1).encode(),
    }


def _cached(cache: Path) -> dict[str, bytes]:
    return {
        p.relative_to(cache / "tokens").as_posix(): p.read_bytes() for p in (cache / "tokens").rglob("*.*")
    }


def _corpus(kind: str, tmp_path: Path, jsonl_file: Path, texts: list[str]) -> Source:
    """A small corpus of each local kind, with empty documents (dropped) among them; the stdlib's own."""
    if kind == "jsonl":
        return FilesSource(paths=[str(jsonl_file)], format="jsonl")
    if kind == "parquet":
        paths = [tmp_path / f"part-{i}.parquet" for i in range(3)]
        for i, path in enumerate(paths):
            pq.write_table(pa.table({"text": ["", *(t[: 100 + 50 * i] for t in texts[i::3])]}), path)
        return FilesSource(paths=[str(p) for p in paths], format="parquet")
    if kind == "text":
        for i, text in enumerate([*texts[:30], ""]):
            (tmp_path / f"doc-{i:02}.txt").write_text(text[:200], newline="")
        return FilesSource(paths=[str(p) for p in sorted(tmp_path.glob("doc-*.txt"))], format="text")
    return StdlibSource()


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "text", pytest.param("stdlib", marks=pytest.mark.slow)])
def test_one_read_writes_the_files_encoding_each_split_alone_wrote(
    tokenizer: Tokenizer,
    jsonl_file: Path,
    sample_texts: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Both splits from one read of the corpus, in chunks that mix them, are byte for byte the files (and the
    cache folders) of each split encoded alone: a cache written before still hits, and one written now is the
    same. Nothing else is left in the cache."""
    source = _corpus(kind, tmp_path, jsonl_file, sample_texts)
    if kind != "stdlib":
        monkeypatch.setattr(tokens, "ENCODE_CHUNK", 3)  # many chunks, most holding both splits
    token_files = tokenize_splits(tokenizer, source, FRACTION, tmp_path / "cache")
    expected = {
        path: data for split in SPLITS for path, data in _encoded_alone(tokenizer, source, split).items()
    }
    assert all(token_files[split].n_documents > 0 for split in SPLITS)
    assert _cached(tmp_path / "cache") == expected
    assert all(not p.name.startswith(".") for p in (tmp_path / "cache" / "tokens").iterdir())


def test_both_splits_are_encoded_in_one_read_of_the_corpus(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, corpus_reads: list[Source]
) -> None:
    """A streamed corpus is downloaded and decoded once per read: the encoding of both splits opens it once, and
    a cache that holds them does not open it."""
    tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert corpus_reads == [source]
    tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert corpus_reads == [source]


def test_a_cache_missing_one_split_encodes_that_split_alone(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache that holds one split (the other's folder deleted) encodes only the other, to the same files, and
    leaves the one it holds as it is."""
    tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    before = _cached(tmp_path)
    (train,) = (tmp_path / "tokens").glob("train-*")
    (validation,) = (tmp_path / "tokens").glob("validation-*")
    kept = (train / "tokens.bin").stat().st_ino
    shutil.rmtree(validation)
    write, written = tokens._write, []

    def watched(
        tokenizer: Tokenizer, docs: Iterator[tuple[Split, Document]], directories: dict[Split, Path]
    ) -> dict[Split, dict[str, int | str]]:
        written.append(list(directories))
        return write(tokenizer, docs, directories)

    monkeypatch.setattr(tokens, "_write", watched)
    tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert written == [["validation"]]
    assert _cached(tmp_path) == before
    assert (train / "tokens.bin").stat().st_ino == kept


def test_each_split_is_on_disk_before_its_folder_is_renamed_into_place(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut cannot publish empty files: each split's three files and its folder are fsynced before the
    rename that publishes it, and the ``tokens`` folder (the renames) after both."""
    events: list[tuple[str, Path]] = []
    real_fsync, real_rename = fileio.fsync, os.rename

    def fsync(path: Path) -> None:
        events.append(("fsync", Path(path)))
        real_fsync(path)

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == tmp_path / "tokens":  # a split published (not the staging folder's lock file)
            events.append(("rename", Path(src)))
        real_rename(src, dst)

    monkeypatch.setattr("zmaj.data.tokens.fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert len(renames) == len(SPLITS)
    for i in renames:
        staging = events[i][1]
        synced = {path for kind, path in events[:i] if kind == "fsync"}
        assert {staging, *(staging / name for name in ("tokens.bin", "offsets.npy", "meta.json"))} <= synced
    assert events[-1] == ("fsync", tmp_path / "tokens")


def test_a_split_another_process_published_first_is_used_as_it_is(
    tokenizer: Tokenizer, source: FilesSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ranks of one run encode the same splits at once: the one whose rename comes second (refused, a
    folder is in the way) opens the folder there, and leaves no staging folder behind."""
    real_rename = os.rename

    def raced(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == tmp_path / "tokens":  # a split published (not the staging folder's lock file)
            shutil.copytree(src, dst)  # another rank's identical folder lands first
        real_rename(src, dst)  # then refused: ENOTEMPTY

    monkeypatch.setattr(os, "rename", raced)
    token_files = tokenize_splits(tokenizer, source, FRACTION, tmp_path)
    assert all(token_files[split].n_documents > 0 for split in SPLITS)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "tokens").iterdir()) == ["train", "validation"]
