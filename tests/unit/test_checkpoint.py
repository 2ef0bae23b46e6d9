"""Checkpoints: what is saved loads back exactly, damage is one line naming the file, and neither a crash at any
moment nor a full disk leaves ``latest`` naming anything but a complete checkpoint."""

import errno
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger
from safetensors import SafetensorError
from tensordict import TensorDict, TensorDictBase

from zmaj import checkpoint, fileio
from zmaj.checkpoint import CheckpointWriteError, DamagedCheckpointError
from zmaj.models import gpt

FORK = multiprocessing.get_context("fork")


def make_state(step: int, version: float, rows: int = 4) -> TensorDict:
    """A training state whose every value is ``version``, so that a loaded state tells which save wrote it."""
    params = TensorDict(
        {"embed": {"weight": torch.full((rows, 8), version)}, "norm": {"weight": torch.full((8,), version)}}
    )
    opt = TensorDict({"m": params.clone(), "v": params.clone(), "step": torch.tensor(step)})
    return TensorDict({"params": params, "opt": opt})


def assert_same(a: TensorDictBase, b: TensorDictBase) -> None:
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        assert torch.equal(a.get(key), b.get(key)), key


def loaded_version(folder: Path) -> float:
    """The version a checkpoint holds (``make_state``), after checking that every tensor agrees with it."""
    version = float(checkpoint.load_meta(folder)["version"])
    state = checkpoint.load_state(folder, make_state(0, 0.0))
    assert_same(state, make_state(int(state["opt", "step"]), version))
    return version


def hidden(run: Path) -> list[str]:
    return sorted(
        entry.name for entry in (run / checkpoint.CHECKPOINTS).iterdir() if entry.name.startswith(".")
    )


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The messages loguru warns with during the test."""
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="WARNING")
    yield messages
    logger.remove(sink)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with one checkpoint, to be copied before it is damaged."""
    run = tmp_path_factory.mktemp("saved")
    checkpoint.save(run, make_state(5, 1.5), {"version": 1.5})
    return run


@pytest.fixture
def run(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "run"))


def test_a_saved_state_loads_back_exactly(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, make_state(7, 2.5), {"version": 2.5, "data_position": 123})
    assert path == tmp_path / "checkpoints" / "step-0000007" == checkpoint.latest(tmp_path)
    assert loaded_version(path) == 2.5
    assert checkpoint.load_meta(path)["data_position"] == 123
    assert checkpoint.load_meta(path)["step"] == 7
    assert hidden(tmp_path) == []


def test_state_json_records_each_files_size_and_sha256(run: Path) -> None:
    folder = checkpoint.latest(run)
    files = checkpoint.load_meta(folder)["files"]
    assert set(files) == {"params.safetensors", "optimizer.safetensors"}
    for name, record in files.items():
        data = (folder / name).read_bytes()
        assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def assert_one_line_naming(error: pytest.ExceptionInfo[Exception], path: Path, problem: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert f"damaged checkpoint file {path}: {problem}" in message, message


@given(st.sampled_from(checkpoint.TENSOR_FILES), st.data())
def test_a_file_cut_short_is_named_with_its_size(saved: Path, name: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(shutil.copytree(checkpoint.latest(saved), Path(scratch) / "step-0000005"))
        size = (folder / name).stat().st_size
        kept = data.draw(st.integers(0, size - 1), label="bytes kept")
        os.truncate(folder / name, kept)
        with pytest.raises(DamagedCheckpointError) as error:
            checkpoint.load_state(folder, make_state(0, 0.0))
        assert_one_line_naming(error, folder / name, f"{kept} bytes, expected {size}")


@given(st.sampled_from(checkpoint.TENSOR_FILES), st.data())
def test_a_changed_byte_is_a_checksum_mismatch(saved: Path, name: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(shutil.copytree(checkpoint.latest(saved), Path(scratch) / "step-0000005"))
        content = bytearray((folder / name).read_bytes())
        position = data.draw(st.integers(0, len(content) - 1), label="position")
        content[position] ^= data.draw(st.integers(1, 255), label="flipped bits")
        (folder / name).write_bytes(content)
        with pytest.raises(DamagedCheckpointError) as error:
            checkpoint.load_state(folder, make_state(0, 0.0))
        assert_one_line_naming(error, folder / name, "checksum mismatch")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "unreadable (Expecting value"),
        (b'{"step": 5, "files": {"params.saf', "unreadable (Unterminated string"),
        (b"\xff\xfe\x00", "unreadable ("),
        (b"[5]", "unreadable (not a JSON object)"),
        (b'{"files": {"params.safetensors": 123}}', "unreadable (its 'files' record"),
        (b'{"files": {}}', "it records no checksum of params.safetensors"),
        (None, "missing"),
    ],
)
def test_an_unreadable_state_json_is_named(run: Path, content: bytes | None, problem: str) -> None:
    folder = checkpoint.latest(run)
    if content is None:
        (folder / "state.json").unlink()
    else:
        (folder / "state.json").write_bytes(content)
    with pytest.raises(DamagedCheckpointError) as error:
        checkpoint.load_params(folder, make_state(0, 0.0)["params"])
    assert_one_line_naming(error, folder / "state.json", problem)


def test_a_missing_file_is_named(run: Path) -> None:
    folder = checkpoint.latest(run)
    (folder / "optimizer.safetensors").unlink()
    checkpoint.load_params(folder, make_state(0, 0.0)["params"])  # a model needs no optimizer state
    with pytest.raises(DamagedCheckpointError) as error:
        checkpoint.load_state(folder, make_state(0, 0.0))
    assert_one_line_naming(error, folder / "optimizer.safetensors", "missing")


def without_checksums(folder: Path) -> None:
    """Make ``folder`` a checkpoint as written before checksums: ``state.json`` without its ``files``."""
    meta = checkpoint.load_meta(folder)
    del meta["files"]
    (folder / "state.json").write_text(json.dumps(meta))


def test_a_checkpoint_written_before_checksums_loads(run: Path) -> None:
    folder = checkpoint.latest(run)
    without_checksums(folder)
    assert loaded_version(folder) == 1.5
    assert checkpoint.latest_intact(run) == folder


@given(st.sampled_from(checkpoint.TENSOR_FILES), st.data())
def test_a_cut_file_without_checksums_is_named_as_unreadable(
    saved: Path, name: str, data: st.DataObject
) -> None:
    """Without a recorded size, safetensors' header check (the data must cover the file) catches the cut."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(shutil.copytree(checkpoint.latest(saved), Path(scratch) / "step-0000005"))
        without_checksums(folder)
        os.truncate(folder / name, data.draw(st.integers(0, (folder / name).stat().st_size - 1)))
        with pytest.raises(DamagedCheckpointError) as error:
            checkpoint.verify(folder)
        assert_one_line_naming(error, folder / name, "unreadable (Error while deserializing header")
        with pytest.raises(DamagedCheckpointError):
            checkpoint.load_state(folder, make_state(0, 0.0))


@pytest.mark.parametrize("pointer", ["", "step-0000009", "..", "step-0000005/params.safetensors"])
def test_latest_naming_no_checkpoint_folder_is_named(run: Path, pointer: str) -> None:
    (run / "checkpoints" / "latest").write_text(pointer + "\n")
    with pytest.raises(DamagedCheckpointError) as error:
        checkpoint.latest(run)
    assert_one_line_naming(error, run / "checkpoints" / "latest", f"it names {pointer!r}")


def test_a_run_without_checkpoints_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        checkpoint.latest(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        checkpoint.latest_intact(tmp_path)


def save_steps(run: Path, steps: list[int]) -> dict[int, Path]:
    """A checkpoint of each step, ``version`` = step, the last one ``latest``."""
    return {
        step: checkpoint.save(run, make_state(step, float(step)), {"version": float(step)}) for step in steps
    }


def cut(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_latest_intact_is_latest_when_it_is_intact(tmp_path: Path, warnings: list[str]) -> None:
    folders = save_steps(tmp_path, [1, 2, 3])
    assert checkpoint.latest_intact(tmp_path) == folders[3]
    assert warnings == []


def test_latest_intact_falls_back_loudly_to_the_newest_intact_before(
    tmp_path: Path, warnings: list[str]
) -> None:
    folders = save_steps(tmp_path, [1, 2, 3, 4])
    cut(folders[4] / "params.safetensors")
    (folders[3] / "state.json").write_text("{")
    assert checkpoint.latest_intact(tmp_path) == folders[2]
    assert loaded_version(folders[2]) == 2.0
    [warning] = warnings
    assert f"{folders[4] / 'params.safetensors'}: " in warning
    assert f"{folders[3] / 'state.json'}: unreadable" in warning
    assert f"Resuming from {folders[2]} instead" in warning


def test_latest_intact_ignores_checkpoints_newer_than_latest_and_set_aside(
    tmp_path: Path, warnings: list[str]
) -> None:
    """A folder newer than ``latest`` is a save that a crash stopped before ``latest`` moved; a state set aside is
    for inspection only."""
    folders = save_steps(tmp_path, [1, 2, 3])
    checkpoint.save_aside(tmp_path, make_state(2, 9.0), {"version": 9.0}, "nonfinite")
    (tmp_path / "checkpoints" / "latest").write_text("step-0000002\n")
    cut(folders[2] / "optimizer.safetensors")
    assert checkpoint.latest_intact(tmp_path) == folders[1]
    assert len(warnings) == 1


def test_latest_intact_falls_back_when_latest_names_nothing(tmp_path: Path, warnings: list[str]) -> None:
    folders = save_steps(tmp_path, [1, 2])
    (tmp_path / "checkpoints" / "latest").write_text("step-0000003\n")
    assert checkpoint.latest_intact(tmp_path) == folders[2]
    (tmp_path / "checkpoints" / "latest").unlink()
    assert checkpoint.latest_intact(tmp_path) == folders[2]
    assert "latest is missing" in warnings[-1]


def test_latest_intact_names_every_damaged_file_when_none_is_intact(tmp_path: Path) -> None:
    folders = save_steps(tmp_path, [1, 2])
    cut(folders[2] / "params.safetensors")
    (folders[1] / "optimizer.safetensors").unlink()
    with pytest.raises(DamagedCheckpointError) as error:
        checkpoint.latest_intact(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert str(folders[2] / "params.safetensors") in message
    assert f"{folders[1] / 'optimizer.safetensors'}: missing" in message
    assert message.endswith("no intact checkpoint to resume from")


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    folders = save_steps(tmp_path, [1, 2])
    assert checkpoint.save(tmp_path, make_state(2, 7.0), {"version": 7.0}) == folders[2]
    assert loaded_version(folders[2]) == 7.0
    assert checkpoint.latest(tmp_path) == folders[2]
    assert checkpoint.save(tmp_path, make_state(1, 8.0), {"version": 8.0}) == folders[1]  # not latest
    assert loaded_version(folders[1]) == 8.0
    assert checkpoint.latest(tmp_path) == folders[1]
    assert hidden(tmp_path) == []


def test_the_next_save_removes_what_a_crash_left(tmp_path: Path) -> None:
    save_steps(tmp_path, [1])
    root = tmp_path / "checkpoints"
    for leftover in [".staging-step-0000002-abc", ".trash-step-0000001-def/step-0000001"]:
        (root / leftover).mkdir(parents=True)
        (root / leftover / "params.safetensors").write_bytes(b"half")
    (root / ".latest.ghi").write_text("step-")
    (root / ".keep-me").write_text("not a leftover of a save")
    save_steps(tmp_path, [2])
    assert hidden(tmp_path) == [".keep-me"]


def test_a_hidden_folder_latest_names_is_kept_until_latest_moves(tmp_path: Path) -> None:
    """A crash while re-saving the step ``latest`` names can leave ``latest`` naming the staged copy."""
    root = tmp_path / "checkpoints"
    staged = shutil.copytree(save_steps(tmp_path, [1])[1], root / ".staging-step-0000001-abc")
    (root / "latest").write_text(staged.name + "\n")
    assert checkpoint.latest_intact(tmp_path) == staged
    checkpoint.prune(tmp_path, keep=1)
    assert hidden(tmp_path) == [staged.name]
    save_steps(tmp_path, [2])
    assert hidden(tmp_path) == []


def full_disk_after(calls: int) -> Callable[..., None]:
    """A ``save_file`` that writes ``calls`` files, then half of the next before the disk is full, and fails as
    safetensors' does: with its own ``SafetensorError`` (a plain ``Exception``, not an ``OSError``)."""
    count = itertools.count()

    def save_file(tensors: dict[str, torch.Tensor], filename: str) -> None:
        data = safetensors.torch.save(tensors)
        if next(count) < calls:
            Path(filename).write_bytes(data)
            return
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SafetensorError(
            f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC})"
        )

    return save_file


@pytest.mark.parametrize("files_written", [0, 1])
@pytest.mark.parametrize("step", [5, 6], ids=["same step", "new step"])
def test_a_full_disk_keeps_the_previous_checkpoint_latest(
    run: Path, monkeypatch: pytest.MonkeyPatch, files_written: int, step: int
) -> None:
    previous = checkpoint.latest(run)
    monkeypatch.setattr(checkpoint, "save_file", full_disk_after(files_written))
    with pytest.raises(CheckpointWriteError) as error:
        checkpoint.save(run, make_state(step, 2.5), {"version": 2.5})
    message = str(error.value)
    assert "\n" not in message
    assert "No space left on device" in message
    assert message.endswith(f"; {previous} is intact and latest")
    assert checkpoint.latest_intact(run) == previous
    assert loaded_version(previous) == 1.5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000005"]


def test_a_full_disk_at_the_first_save_says_there_is_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "save_file", full_disk_after(1))
    with pytest.raises(CheckpointWriteError, match=r"there is no earlier checkpoint$"):
        checkpoint.save(tmp_path, make_state(1, 1.0), {"version": 1.0})
    assert hidden(tmp_path) == []
    assert list((tmp_path / "checkpoints").iterdir()) == []


def failing_fsync(at: int) -> Callable[[int], None]:
    """An ``os.fsync`` that fails as a full network or thin-provisioned disk does, at its ``at``-th call."""
    count, fsync = itertools.count(), os.fsync

    def failing(descriptor: int) -> None:
        if next(count) == at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(descriptor)

    return failing


def count_fsyncs(work: Callable[[], Any], monkeypatch: pytest.MonkeyPatch) -> int:
    calls, fsync = itertools.count(), os.fsync

    def counted(descriptor: int) -> None:
        next(calls)
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", counted)
    work()
    monkeypatch.undo()
    return next(calls)


@pytest.mark.parametrize("step", [5, 6], ids=["same step", "new step"])
def test_a_failed_write_anywhere_leaves_latest_naming_a_complete_checkpoint(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """Whichever flush fails, the save cleans up, and ``latest`` names the previous checkpoint or (re-saving the
    step it names) the complete new copy; the error says which."""
    dry_run = Path(shutil.copytree(saved, tmp_path / "dry-run"))
    n = count_fsyncs(lambda: checkpoint.save(dry_run, make_state(step, 2.5), {"version": 2.5}), monkeypatch)
    assert n >= 6
    for at in range(n):
        run = Path(shutil.copytree(saved, tmp_path / f"run-{at}"))
        monkeypatch.setattr(os, "fsync", failing_fsync(at))
        with pytest.raises(CheckpointWriteError) as error:
            checkpoint.save(run, make_state(step, 2.5), {"version": 2.5})
        monkeypatch.undo()
        named = checkpoint.latest(run)
        assert str(error.value).endswith(f"; {named} is intact and latest")
        assert checkpoint.latest_intact(run) == named
        assert (checkpoint.load_meta(named)["step"], loaded_version(named)) in {(5, 1.5), (step, 2.5)}
        assert hidden(run) in ([], [named.name])


def test_atomic_write_text_leaves_the_old_file_and_no_temporary_one_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notes.txt"
    fileio.atomic_write_text(path, "old")
    monkeypatch.setattr(os, "fsync", failing_fsync(0))
    with pytest.raises(OSError, match="No space left"):
        fileio.atomic_write_text(path, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert path.read_text() == "old"


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=["umask 022", "umask 002", "umask 077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    """The permission bits of everything under ``root``, by relative path."""
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in sorted(root.rglob("*"))}


def test_what_a_save_writes_has_the_modes_a_plain_write_gives(tmp_path: Path, umask: int) -> None:
    """Not tempfile's 0600 and 0700 or safetensors' 0600: a shared machine's other users read runs like any
    other files (or not, as the umask says). A re-save of the latest step goes through its linked copy."""
    (tmp_path / "plain.txt").write_text("")
    (tmp_path / "plain").mkdir()
    file_mode, folder_mode = (
        (tmp_path / "plain.txt").stat().st_mode & 0o777,
        (tmp_path / "plain").stat().st_mode & 0o777,
    )
    run = tmp_path / "run"
    for version in (1.0, 2.0):
        checkpoint.save(run, make_state(5, version), {"version": version})
        fileio.atomic_write_text(run / "notes.txt", "notes")
        expected = {
            "checkpoints": folder_mode,
            "checkpoints/latest": file_mode,
            "checkpoints/step-0000005": folder_mode,
            **{
                f"checkpoints/step-0000005/{name}": file_mode
                for name in (*checkpoint.TENSOR_FILES, "state.json")
            },
            "notes.txt": file_mode,
        }
        assert modes(run) == expected
    assert file_mode == 0o666 & ~umask
    assert folder_mode == 0o777 & ~umask


class Recorder:
    """The flushes and renames of a save, by inode, to check what was on disk before each rename."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int, Path]] = []
        fsync, replace = os.fsync, os.replace

        def recorded_fsync(descriptor: int) -> None:
            fsync(descriptor)
            self.events.append(("fsync", os.fstat(descriptor).st_ino, Path()))

        def recorded_replace(source: str | Path, target: str | Path) -> None:
            inode = os.stat(source).st_ino
            replace(source, target)
            self.events.append(("replace", inode, Path(target)))

        monkeypatch.setattr(os, "fsync", recorded_fsync)
        monkeypatch.setattr(os, "replace", recorded_replace)

    def flushed_before(self, index: int) -> set[int]:
        return {inode for kind, inode, _ in self.events[:index] if kind == "fsync"}

    def last_rename_to(self, target: Path) -> int:
        return max(i for i, (kind, _, path) in enumerate(self.events) if kind == "replace" and path == target)


@pytest.mark.parametrize("step", [5, 6], ids=["same step", "new step"])
def test_a_checkpoint_is_on_disk_before_latest_names_it(
    run: Path, monkeypatch: pytest.MonkeyPatch, step: int
) -> None:
    """Each file and folder is flushed before the rename that names it; each rename's folder after it, before
    the next step depends on it (the module docstring's sequence; a power cut may otherwise keep the renames and
    lose the data)."""
    recorder = Recorder(monkeypatch)
    folder = checkpoint.save(run, make_state(step, 2.5), {"version": 2.5})
    root, events = run / "checkpoints", recorder.events
    renamed, pointed = recorder.last_rename_to(folder), recorder.last_rename_to(root / "latest")
    assert renamed < pointed
    flushed = recorder.flushed_before(renamed)
    assert {(folder / name).stat().st_ino for name in ("state.json", *checkpoint.TENSOR_FILES)} <= flushed
    assert folder.stat().st_ino in flushed
    root_flushes = [
        i for i, (kind, inode, _) in enumerate(events) if kind == "fsync" and inode == root.stat().st_ino
    ]
    assert any(renamed < i < pointed for i in root_flushes)
    assert (root / "latest").stat().st_ino in recorder.flushed_before(pointed)
    assert root_flushes[-1] > pointed


def prune_case() -> st.SearchStrategy[tuple[list[int], int, int]]:
    """Checkpoint steps, the index of the one ``latest`` names, and how many to keep."""
    steps = st.lists(st.integers(1, 60), min_size=1, max_size=8, unique=True)
    return steps.flatmap(lambda s: st.tuples(st.just(s), st.integers(0, len(s) - 1), st.integers(1, 9)))


@given(prune_case())
def test_prune_keeps_the_newest_and_the_latest(saved: Path, case: tuple[list[int], int, int]) -> None:
    steps, named, keep = case
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch)
        folders = {
            s: Path(shutil.copytree(checkpoint.latest(saved), run / f"checkpoints/step-{s:07d}"))
            for s in steps
        }
        (run / "checkpoints" / "latest").write_text(f"step-{steps[named]:07d}\n")
        newest = sorted(steps, reverse=True)[:keep]
        expected = sorted(folders[s] for s in steps if s not in newest and s != steps[named])
        assert sorted(checkpoint.prune(run, keep)) == expected
        remaining = {p.name for p in (run / "checkpoints").iterdir()}
        assert remaining == {"latest"} | {folders[s].name for s in steps} - {p.name for p in expected}
        assert checkpoint.latest_intact(run) == folders[steps[named]]


def test_prune_deletes_only_complete_checkpoints(tmp_path: Path) -> None:
    folders = save_steps(tmp_path, [1, 2, 3])
    root = tmp_path / "checkpoints"
    (root / "step-0000000").mkdir()  # not written by save: left alone
    (root / "notes.txt").write_text("mine")
    aside = checkpoint.save_aside(tmp_path, make_state(0, 9.0), {"version": 9.0}, "nonfinite")
    assert checkpoint.prune(tmp_path, keep=1) == [folders[2], folders[1]]
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        aside.name,
        "notes.txt",
        "step-0000000",
        "step-0000003",
    ]
    with pytest.raises(ValueError, match="at least 1"):
        checkpoint.prune(tmp_path, keep=0)


def test_a_state_saved_aside_loads_but_never_becomes_latest(tmp_path: Path) -> None:
    folders = save_steps(tmp_path, [1])
    aside = checkpoint.save_aside(tmp_path, make_state(2, 9.0), {"version": 9.0}, "nonfinite")
    assert aside == tmp_path / "checkpoints" / "nonfinite-step-0000002"
    assert loaded_version(aside) == 9.0
    assert checkpoint.latest(tmp_path) == checkpoint.latest_intact(tmp_path) == folders[1]
    assert checkpoint.save_aside(tmp_path, make_state(2, 8.0), {"version": 8.0}, "nonfinite") == aside
    assert loaded_version(aside) == 8.0
    assert hidden(tmp_path) == []
    with pytest.raises(ValueError, match="label"):
        checkpoint.save_aside(tmp_path, make_state(2, 8.0), {}, "../up")


# Crash safety. A crash (SIGKILL, a segfault, the OOM killer) leaves on disk exactly what the save had done up to
# that moment. So the test of the default run checks, in this process, what is on disk before each file-system
# operation of a save; the slow ones kill a forked copy of this process (no torch import to wait for) at each
# moment and at random moments, and check that the next save cleans up what the kill left.

INITIAL = [(1, 1.0), (2, 2.0)]
"""The run before ``scenario``: (step, version) saved in order, so ``latest`` names step 2."""
POSSIBLE = {(2, 2.0), (2, 3.0), (3, 4.0)}
"""The (step, version) that ``latest`` may name during ``scenario``."""


def scenario(run: Path) -> None:
    """Re-save the step ``latest`` names, save a new one, prune, set a state aside."""
    checkpoint.save(run, make_state(2, 3.0), {"version": 3.0})
    checkpoint.save(run, make_state(3, 4.0), {"version": 4.0})
    checkpoint.prune(run, keep=1)
    checkpoint.save_aside(run, make_state(3, 5.0), {"version": 5.0}, "nonfinite")


def before_each_file_operation(
    monkeypatch: pytest.MonkeyPatch, act: Callable[[str, tuple[Any, ...]], None]
) -> None:
    """Call ``act(name, args)`` before every operation by which a save changes the disk."""

    def instrumented(name: str, operation: Callable[..., Any]) -> Callable[..., Any]:
        def operate(*args: Any, **kwargs: Any) -> Any:
            act(name, args)
            return operation(*args, **kwargs)

        return operate

    for module, name in [
        (os, "replace"),
        (os, "link"),
        (os, "fsync"),
        (shutil, "rmtree"),
        (checkpoint, "save_file"),
    ]:
        monkeypatch.setattr(module, name, instrumented(name, getattr(module, name)))


def assert_latest_is_complete(run: Path) -> None:
    """``latest`` names a checkpoint that verifies and holds a state ``scenario`` saved; every ``step-*`` folder
    is complete."""
    named = checkpoint.latest(run)
    checkpoint.verify(named)
    assert (checkpoint.load_meta(named)["step"], loaded_version(named)) in POSSIBLE
    for folder in (run / "checkpoints").glob("step-*"):
        checkpoint.verify(folder)


def test_latest_names_a_complete_checkpoint_at_every_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step, version in INITIAL:
        checkpoint.save(tmp_path, make_state(step, version), {"version": version})
    moments = itertools.count()

    def check(name: str, args: tuple[Any, ...]) -> None:
        next(moments)
        assert_latest_is_complete(tmp_path)

    before_each_file_operation(monkeypatch, check)
    scenario(tmp_path)
    monkeypatch.undo()
    assert_latest_is_complete(tmp_path)
    assert next(moments) > 20


def killed_at(moment: int, run: Path) -> None:
    """Run ``scenario`` and SIGKILL this process at its ``moment``-th file operation (a file write halfway)."""
    torch.set_num_threads(1)
    moments = itertools.count()

    def crash(name: str, args: tuple[Any, ...]) -> None:
        if next(moments) == moment:
            if name == "save_file":
                data = safetensors.torch.save(args[0])
                Path(args[1]).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    before_each_file_operation(pytest.MonkeyPatch(), crash)
    scenario(run)


@pytest.mark.slow
def test_a_crash_at_any_moment_leaves_latest_complete_and_the_next_save_cleans_up(tmp_path: Path) -> None:
    template = tmp_path / "template"
    for step, version in INITIAL:
        checkpoint.save(template, make_state(step, version), {"version": version})
    for moment in itertools.count():
        run = Path(shutil.copytree(template, tmp_path / f"run-{moment}"))
        child = FORK.Process(target=killed_at, args=(moment, run))
        child.start()
        child.join()
        if child.exitcode == 0:  # the scenario ran to its end before this moment
            break
        assert child.exitcode == -signal.SIGKILL, f"the child failed at moment {moment}"
        assert_latest_is_complete(run)
        assert checkpoint.latest_intact(run) == checkpoint.latest(run)
        checkpoint.save(run, make_state(9, 9.0), {"version": 9.0})
        assert hidden(run) == []
    assert moment > 20


def save_forever(run: Path, states: list[tuple[int, float]]) -> None:
    """Save, prune and set aside in a loop, each flush slowed down so that a kill lands anywhere in a save."""
    torch.set_num_threads(1)
    fsync = os.fsync

    def slow_fsync(descriptor: int) -> None:
        time.sleep(0.002)
        fsync(descriptor)

    pytest.MonkeyPatch().setattr(os, "fsync", slow_fsync)
    for i in itertools.count():
        step, version = states[i % len(states)]
        state = make_state(step, version, rows=1 << 14)
        checkpoint.save(run, state, {"version": version})
        checkpoint.prune(run, keep=2)
        if i % 3 == 0:
            checkpoint.save_aside(run, state, {"version": version}, "nonfinite")


@pytest.mark.slow
def test_a_run_killed_mid_save_again_and_again_resumes_from_a_complete_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    states = [(5, 1.0), (6, 2.0), (6, 3.0), (7, 4.0), (5, 5.0)]  # re-saves, and a step before latest
    checkpoint.save(run, make_state(4, 0.0, rows=1 << 14), {"version": 0.0})
    rng = random.Random(0)
    for _ in range(12):
        child = FORK.Process(target=save_forever, args=(run, states))
        child.start()
        time.sleep(rng.uniform(0.05, 0.4))
        child.kill()
        child.join()
        assert child.exitcode == -signal.SIGKILL
        named = checkpoint.latest(run)
        assert checkpoint.latest_intact(run) == named
        version = float(checkpoint.load_meta(named)["version"])
        assert (int(checkpoint.load_meta(named)["step"]), version) in [(4, 0.0), *states]
        state = checkpoint.load_state(named, make_state(0, 0.0, rows=1 << 14))
        assert_same(state, make_state(int(state["opt", "step"]), version, rows=1 << 14))
    checkpoint.save(run, make_state(8, 8.0), {"version": 8.0})
    assert hidden(run) == []


def _tiny_state(step: int) -> TensorDict:
    return TensorDict({"params": {"w": torch.full((2,), float(step))}, "opt": {"step": torch.tensor(step)}})


def test_latest_naming_a_folder_outside_the_runs_checkpoints_is_damaged(tmp_path: Path) -> None:
    """``latest`` holds a folder name of ``checkpoints/``; a path (``../../other/checkpoints/step-1``) would resume
    another run's state. The suite's slash pointer named a file, refused by ``is_dir`` alone."""
    checkpoint.save(tmp_path / "other", _tiny_state(1), {})
    checkpoint.save(tmp_path / "run", _tiny_state(1), {})
    (tmp_path / "run" / "checkpoints" / "latest").write_text("../../other/checkpoints/step-0000001\n")
    with pytest.raises(DamagedCheckpointError, match="no folder of"):
        checkpoint.latest(tmp_path / "run")


def test_the_fallback_names_the_damage_of_latest_once(tmp_path: Path, warnings: list[str]) -> None:
    """The damaged ``latest`` is not verified again among the older ones (the suite checked only that it is
    named)."""
    checkpoint.save(tmp_path, _tiny_state(1), {})
    newest = checkpoint.save(tmp_path, _tiny_state(2), {})
    (newest / "params.safetensors").write_bytes(b"cut")
    assert checkpoint.latest_intact(tmp_path) == tmp_path / "checkpoints" / "step-0000001"
    [warning] = warnings
    assert warning.count(str(newest / "params.safetensors")) == 1


def test_setting_latest_aside_points_latest_at_the_checkpoint_before_it(tmp_path: Path) -> None:
    """After a non-finite start is set aside, ``latest`` names the newest checkpoint *before* it (``<=`` left
    ``latest`` naming the renamed folder; only the training loop's tests touched this, never ``latest`` itself)."""
    checkpoint.save(tmp_path, _tiny_state(1), {})
    checkpoint.save(tmp_path, _tiny_state(2), {})
    assert checkpoint.set_aside_latest(tmp_path, 2, "nonfinite_start")
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "step-0000001"
    assert (tmp_path / "checkpoints" / "nonfinite_start-step-0000002").is_dir()


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C during the write is a failed write too: catching only ``Exception`` left a hidden
    ``.notes.txt.*`` beside the file on every interrupt."""
    path = tmp_path / "notes.txt"
    fileio.atomic_write_text(path, "old")

    def interrupted(descriptor: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_text(path, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert path.read_text() == "old"


def test_non_finite_leaves_names_every_tensor_with_a_nan_or_an_infinity_in_any_float_type() -> None:
    """Read from each tensor's largest and smallest values (NaN propagates through both): checked against
    ``isfinite`` over every element, for each type a model is stored in."""
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        leaves = {
            name: torch.randn(3, 5, generator=generator).to(dtype) for name in ("nan", "inf", "neg", "ok")
        }
        leaves["nan"][1, 2], leaves["inf"][2, 4], leaves["neg"][0, 0] = math.nan, math.inf, -math.inf
        td = TensorDict(
            {
                **leaves,
                "empty": torch.ones(0, dtype=dtype),
                "ids": torch.tensor([2**40]),
                "deep": {"x": leaves["nan"]},
            }
        )
        want = [
            key
            for key, t in checkpoint.flatten(td).items()
            if t.is_floating_point() and not t.isfinite().all()
        ]
        assert checkpoint.non_finite_leaves(td) == want == ["nan", "inf", "neg", "deep.x"]
    # Extremes read in float64: a float64 weight of 1e300 is finite (in float32 it was infinity).
    assert (
        checkpoint.non_finite_leaves(TensorDict({"w": torch.tensor([1e300, -1e300], dtype=torch.float64)}))
        == []
    )


def test_newest_without_latest_is_the_highest_step(tmp_path: Path, warnings: list[str]) -> None:
    """A kill between a save's rename and ``latest``'s write, after earlier checkpoints: readers take the newest
    step, as a resume does (``latest_intact``), not the oldest."""
    folders = save_steps(tmp_path, [1, 2, 3])
    (tmp_path / "checkpoints" / "latest").unlink()
    assert checkpoint.newest(tmp_path) == folders[3] == checkpoint.latest_intact(tmp_path)
    assert "latest is missing" in warnings[0]


def test_recorded_difference_compares_only_what_the_checkpoint_recorded() -> None:
    """A field added to zmaj since (``now`` only) is not compared; one the checkpoint recorded and the config no
    longer has is a difference; the first differing field is named by its dotted path."""
    then = {"a": 1, "inner": {"b": 2, "c": 3}}
    assert checkpoint.recorded_difference("model", then, {**then, "new": 4}) is None
    assert checkpoint.recorded_difference("model", {**then, "gone": 2}, then) == "model.gone"
    assert (
        checkpoint.recorded_difference("model", then, {**then, "inner": {"b": 2, "c": 4}}) == "model.inner.c"
    )
    assert checkpoint.recorded_difference("model", then, {**then, "inner": {"b": 5, "c": 4}}, ("b",)) == (
        "model.inner.c"
    )


def test_parameters_of_another_shape_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    """A checkpoint of a narrower model loaded into a wider one: named in one line, not loaded (a forward
    traceback later, or another network read)."""
    small = gpt.GPTConfig(vocab_size=32, context=8, d_model=16, n_layers=1, n_heads=2)
    state = TensorDict({"params": gpt.init(small, 0), "opt": {"step": torch.tensor(1)}})
    folder = checkpoint.save(tmp_path, state, {})
    wide = gpt.init(small.model_copy(update={"d_model": 32}), 0, device="meta")
    with pytest.raises(ValueError, match=r"tensor 'embed\.weight' has shape \(32, 16\), expected \(32, 32\)"):
        checkpoint.load_params(folder, wide)
