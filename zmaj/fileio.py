"""Writing a user's files whole or not at all, and as readable as a plain ``open`` would make them.

A small file (``spec.yaml``, ``latest``, ``tokenizer.json``, a metrics file rewritten) goes through a temporary
sibling and a rename: a kill or a full disk mid-write leaves the old file, never a half-written one. The bytes
and then the rename are flushed to disk (``fsync``), so that this holds across a power cut too: without the
flushes the file system may put a rename on disk before the data it names (Pillai et al., "All File Systems Are
Not Created Equal", OSDI 2014). ``zmaj.checkpoint`` and ``zmaj.convert.load.staged_folder`` write whole
folders the same way.

This module sits below every package that writes (data, convert, train, publish), so none of them imports
another for it.
"""

import ctypes
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from loguru import logger
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor


class CacheWriteError(ValueError):
    """A cache folder could not be written: one line naming it, not a traceback (a ``ValueError``, which the
    programs report as such)."""


WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
"""A full disk or quota, a read-only file system: what no read meets, and what a user answers with space."""


@contextmanager
def cache_writes(folder: Path, what: str) -> Iterator[None]:
    """Within this block, a failure to write into the cache ``folder`` (a full disk or quota, a read-only or
    unwritable folder) is a :class:`CacheWriteError` naming it and what to do: it comes after the minutes a
    tokenizer or an encoding took, and the user's answer is another folder. Errors that name a file elsewhere
    (reading the data that is being cached, another cache filling up) pass through as they are."""
    try:
        yield
    except OSError as error:
        if error.filename is None:  # a write's full disk names no file
            mine = error.errno in WRITE_ERRORS
        else:
            mine = Path(error.filename).resolve().is_relative_to(folder.resolve())
        if not mine:
            raise
        raise CacheWriteError(
            f"cannot write {what} in {folder} ({error.strerror or error}); free space there, or choose another "
            "cache folder (--cache-dir, or ZMAJ_CACHE)"
        ) from error


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file whole or not at all (:func:`atomic_write_bytes`), in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a small file through a temporary sibling and a rename, both flushed to disk (module docstring),
    with a plain write's permissions; a failed write leaves the old file and no temporary one."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        set_default_mode(Path(temporary))
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync(path.parent)


WRITER_LOCK = ".zmaj-writer.lock"
"""The lock file in a staging folder while its writer lives (:func:`writing`)."""


@contextmanager
def writing(staging: Path) -> Iterator[None]:
    """Mark the hidden ``staging`` folder as being written for as long as the block runs: a lock file in it,
    locked (``flock``) before it takes its name, so that no :func:`sweep` ever finds it free while its writer
    lives, and removed as the block ends (the folder is then renamed into place or removed). The kernel frees the
    lock of a killed writer, which is what tells its leftover (a whole model or split: gigabytes) from work under
    way. Where the file system has no locks (NFS without its lock daemon, Lustre mounted ``noflock``) the folder
    is left unmarked: the write goes on, and what a kill leaves there stays. Where its locks are each host's own
    (NFS mounted ``nolock`` or ``local_lock``, Lustre ``localflock``), a sweep on another host cannot see the
    writer's lock and would remove the folder under it: two hosts must not write the same destination (or encode
    the same corpus into one cache) at once there."""
    unnamed = staging / f"{WRITER_LOCK}.new"
    held = os.open(unnamed, os.O_RDWR | os.O_CREAT)  # read-write: NFS locks only what is open for writing
    try:
        try:
            fcntl.flock(held, fcntl.LOCK_EX)
        except OSError:  # no locks here (ENOLCK, ENOSYS, ...): a fresh file has no other holder to wait for
            unnamed.unlink()
        else:
            os.rename(unnamed, staging / WRITER_LOCK)
        yield
    finally:
        (staging / WRITER_LOCK).unlink(missing_ok=True)  # while still locked: no sweep sees it free
        os.close(held)


def sweep(parent: Path, prefix: str) -> None:
    """Remove the staging folders in ``parent`` named ``prefix...`` whose writer was killed (:func:`writing`: its
    lock is free). One being written (its lock held), made a moment ago or finished (no lock file), one whose lock
    cannot be taken to tell (someone else's, a file system without locks), and any folder zmaj did not mark are
    left alone."""
    for folder in [path for path in parent.iterdir() if path.name.startswith(prefix)]:
        lock = folder / WRITER_LOCK
        try:
            handle = os.open(lock, os.O_RDWR)
        except OSError:  # no lock file (FileNotFoundError, NotADirectoryError), or not ours to open
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Still the folder's lock file, not one its finishing writer unlinked while this waited to open it.
            if os.fstat(handle).st_ino != os.stat(lock).st_ino:
                continue
        except OSError:  # held (BlockingIOError), gone meanwhile, or no locks on this file system
            continue
        finally:
            os.close(handle)
        logger.info(f"removing {folder}, left by a writer that was killed")
        shutil.rmtree(folder, ignore_errors=True)  # (another sweep may be removing it too)


def check_readable(path: Path) -> None:
    """Raise what a plain ``open`` of ``path`` raises (``PermissionError`` for a file this user may not read),
    before a reader that misreports it: safetensors calls such a file missing (``FileNotFoundError``)."""
    with open(path, "rb"):
        pass


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths (folders) in one step, whether it was done: Linux's ``renameat2`` with
    ``RENAME_EXCHANGE``. Replacing a folder takes two renames otherwise (the old one away, the new one in), and a
    kill between them leaves neither under the folder's name. False where the system or file system has no such
    call (not Linux, an old kernel or glibc, a file system without it), for the caller to fall back."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2  # AT_FDCWD and RENAME_EXCHANGE, from <fcntl.h> and <linux/fs.h>
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(second))  # the path being replaced, which the caller names


def set_default_mode(path: Path) -> None:
    """Give a file or folder the permissions a plain ``open`` or ``mkdir`` would: 0666 or 0777 less the umask.
    ``tempfile`` makes files 0600 and folders 0700, and safetensors writes 0600, so a model, run or checkpoint
    written through them would be unreadable to the other users of a shared machine."""
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())


def _umask() -> int:
    """The process's umask, as Linux reports it; elsewhere set and put back, which a thread creating a file at
    that moment would see (with the stricter mask set meanwhile)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Flush a file's bytes, or a folder's names (what a rename changes), from the kernel's cache to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def containment(folder: Path, path: Path) -> Literal["is", "holds", "lies inside"] | None:
    """How ``folder`` stands to ``path`` (both resolved): it is it, holds it, lies inside it, or none of these;
    what a program that writes ``folder`` checks against what it reads."""
    folder, path = folder.resolve(), path.resolve()
    if folder == path:
        return "is"
    if path.is_relative_to(folder):
        return "holds"
    return "lies inside" if folder.is_relative_to(path) else None


def save_tensors(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, whose I/O failures (a full disk) are its own ``SafetensorError``, not an
    ``OSError``: raised as an ``OSError`` naming the file, which every caller that writes a folder reports in one
    line (a traceback before)."""
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as error:
        raise OSError(f"cannot write {path}: {error}") from error
