"""What a killed writer leaves is removed by the next write there, and nothing else is (``fileio.sweep``)."""

import errno
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zmaj import fileio
from zmaj.convert.load import staged_folder

ROOT = Path(__file__).resolve().parents[2]


def test_a_sweep_removes_the_staging_of_killed_writers_only(tmp_path: Path) -> None:
    """A killed writer's folder (its lock file free) goes; one being written (locked), one made a moment ago or
    renamed away by ``replace_folder`` (no lock file), a file, and a folder of another name stay."""
    for name in (".out.dead", ".out.live", ".out.new", ".out.old.x", ".outer.dead", "out"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(bytes(100))
    for name in (".out.dead", ".out.live", ".outer.dead"):
        (tmp_path / name / fileio.WRITER_LOCK).touch()
    (tmp_path / ".out.file").write_text("a file")
    with open(tmp_path / ".out.live" / fileio.WRITER_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's write, under way
        fileio.sweep(tmp_path, ".out.")
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".out.file",
        ".out.live",
        ".out.new",
        ".out.old.x",
        ".outer.dead",
        "out",
    ]


@pytest.mark.parametrize("moment", ["writing", "flushing"])
def test_a_model_folder_written_while_another_write_is_killed_sweeps_its_staging(
    tmp_path: Path, moment: str
) -> None:
    """A SIGKILL (the OOM killer, a scheduler's kill) mid-export leaves a whole model in a hidden folder beside the
    destination, which nothing else removes; the next write of that destination does, and leaves no lock file in
    the folder it writes. Killed while the files were flushed to disk (seconds, for gigabytes) too: the folder was
    unmarked by then."""
    out = tmp_path / "out"
    writer = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from zmaj import fileio\n"
        "from zmaj.convert.load import staged_folder\n"
        "def flushing(path):\n"
        "    print('flushing', flush=True)\n"
        "    time.sleep(600)\n"
        "if sys.argv[2] == 'flushing':\n"
        "    fileio.fsync = flushing\n"
        "with staged_folder(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'model.safetensors').write_bytes(bytes(1000))\n"
        "    if sys.argv[2] == 'writing':\n"
        "        print('writing', flush=True)\n"
        "        time.sleep(600)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", writer, str(out), moment], stdout=subprocess.PIPE, text=True, env=environment
    )
    assert process.stdout is not None
    try:
        assert process.stdout.readline() == f"{moment}\n"
    finally:  # killed however the line went, so that no writer sleeps on
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".out.")
    assert (left / "model.safetensors").is_file()
    with staged_folder(out) as staging:
        (staging / "config.json").write_text("{}")
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in out.iterdir()] == ["config.json"]


def test_a_sweep_leaves_a_folder_whose_writer_finished_as_the_sweep_opened_its_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer unlinks its lock file, still holding it, then closes it and renames the folder into place: a
    sweep that opened the file just before the unlink takes a lock nobody holds any more, and must not take the
    folder for a dead writer's (it checks the file it locked is still the folder's)."""
    (tmp_path / ".out.finishing").mkdir()
    (tmp_path / ".out.finishing" / fileio.WRITER_LOCK).touch()
    opened = os.open

    def then_finished(path: Path, flags: int, *args: Any, **kwargs: Any) -> int:
        handle = opened(path, flags, *args, **kwargs)
        if Path(path).name == fileio.WRITER_LOCK:
            Path(path).unlink()  # the writer finishing, between the sweep's open and its lock
        return handle

    monkeypatch.setattr(os, "open", then_finished)
    fileio.sweep(tmp_path, ".out.")
    assert [path.name for path in tmp_path.iterdir()] == [".out.finishing"]


def test_where_the_file_system_has_no_locks_a_folder_is_written_unmarked_and_no_sweep_removes_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NFS without its lock daemon (ENOLCK), Lustre mounted ``noflock`` (ENOSYS): the export goes on, as it did
    before writers marked their folders, and a sweep that cannot tell a dead writer from a live one removes
    nothing."""
    (tmp_path / ".out.unknown").mkdir()
    (tmp_path / ".out.unknown" / fileio.WRITER_LOCK).touch()

    def no_locks(*args: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with staged_folder(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.unknown", "out"]
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["config.json"]
