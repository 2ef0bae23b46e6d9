"""Checkpoints: the training state in safetensors plus JSON for everything that is not a tensor.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding ``params.safetensors``, ``optimizer.safetensors``
and ``state.json``: step, seed, spec, the job that wrote it, and the size and SHA-256 of each safetensors file. SHA-256
is what ``sha256sum`` prints, so a copy can be checked by hand too; at about 1.5 GB/s on CPUs with SHA
instructions it adds about a second per 1.5 GB to a save and to a load (xxh3 would be ten times faster, but no
standard tool checks it). ``checkpoints/latest``, a one-line file, names the newest checkpoint.

**Writing** survives a crash at any moment: ``latest`` always names a complete checkpoint, the previous one or
the new one. A checkpoint is written into a hidden staging folder, each file and then the folder are flushed to
disk (``fsync``), and the folder is renamed into place in one step, after which the folder holding it is flushed
too; only then is ``latest`` replaced the same way. The flushes make this hold across a power cut as well as a
killed process: without them the file system may put a rename on disk before the data it names (Pillai et al.,
"All File Systems Are Not Created Equal", OSDI 2014). Re-saving a step that exists (Ctrl-C right after a periodic
save) cannot rename the old folder away first, since ``latest`` may name it: ``latest`` names the complete staged
copy meanwhile, and the new files reach their final name as hard links, renamed into place in one step. A save
that fails (a full disk) removes what it wrote and raises :class:`CheckpointWriteError` naming the checkpoint
``latest`` names, the previous one (or that staged copy). What a crash leaves (hidden ``.staging-*`` and
``.trash-*`` folders) is removed by the next save, except a staged copy ``latest`` still names.

**Reading** checks first: each file's size and checksum against ``state.json``, so a file cut short (a full disk,
an interrupted copy) or altered is one :class:`DamagedCheckpointError` line naming the file and what is wrong,
not a parser's traceback. Checkpoints written before checksums are checked by parsing their safetensors headers.

**Resuming** (:func:`latest_intact`) uses the checkpoint ``latest`` names when it is intact. When it is damaged,
it says so loudly, naming the damage, and resumes from the newest intact checkpoint before it: that costs the
steps since then, where stopping would cost the rest of the run. Loading a model (``zmaj.convert.load``) does not
fall back: it reports the damage, and an older checkpoint folder can be named instead.

:func:`prune` keeps the newest few checkpoints. :func:`save_aside` writes a state for inspection (the one where
the loss became non-finite) as ``checkpoints/LABEL-step-NNNNNNN/``: it never becomes ``latest``, and nothing
resumes from it or prunes it. :func:`pin` keeps a checkpoint's parameters, never pruned, for another run that
starts from them.

The format sits below every package, as ``zmaj.fileio`` does: training writes it, loading a model
(``zmaj.convert``) and publishing (``zmaj.publish``) read it, and none of them imports another for it.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tensordict import TensorDict, TensorDictBase

from zmaj.fileio import atomic_write_text, fsync, set_default_mode

CHECKPOINTS, LATEST = "checkpoints", "latest"
PARAMS, OPTIMIZER, STATE = "params.safetensors", "optimizer.safetensors", "state.json"
TENSOR_FILES = (PARAMS, OPTIMIZER)
STAGING, TRASH, PINNING = ".staging-", ".trash-", ".pinning-"
"""Prefixes of the hidden folders saves (and pins) work in; the next save removes what a crash leaves of the first
two (not of a pin, which may be in progress in another process)."""
STEP = re.compile(r"step-(\d+)")
FILES = "files"
"""The key of ``state.json`` that records each safetensors file's size and checksum."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file is missing, cut short, altered or unparsable; the message names the file and how."""


class CheckpointWriteError(OSError):
    """A save failed (a full disk) and removed what it wrote; the message names the checkpoint still latest."""


class FileRecord(BaseModel):
    """What ``state.json`` records of a file, to recognise it later as the file that was written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int
    """In bytes: a file cut short is named as such without reading it."""
    sha256: str


FILE_RECORDS = TypeAdapter(dict[str, FileRecord])


def flatten(td: TensorDictBase) -> dict[str, torch.Tensor]:
    """``{"blocks.attn.q.weight": tensor, ...}``, contiguous and on the CPU, as safetensors wants."""
    return {_name(key): td.get(key).detach().cpu().contiguous() for key in td.keys(True, True)}


def _name(key: str | tuple[str, ...]) -> str:
    return key if isinstance(key, str) else ".".join(key)


def non_finite_leaves(td: TensorDictBase) -> list[str]:
    """The dotted names of ``td``'s floating-point tensors that hold a NaN or an infinity: what no saved state or
    loaded model may hold.

    A tensor's largest and smallest values say it (``amax`` and ``amin`` propagate NaN, and an infinity is one
    of them): each a read of the tensor, where ``isfinite(t).all()`` writes a boolean copy first, which took
    4.9 s of Gemma 3 270M's 7.8 s load on a 2-core CPU against 0.23 s. Read back together, once, as float64,
    which holds every stored type's values (float32 would read a float64 weight of 1e300 as inf)."""
    leaves = [
        (key, t)
        for key, t in td.items(True, True)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0
    ]
    if not leaves:
        return []
    extremes = torch.stack([torch.stack([t.amax(), t.amin()]).double() for _, t in leaves])
    finite = extremes.isfinite().all(-1).tolist()
    return [_name(key) for (key, _), ok in zip(leaves, finite, strict=True) if not ok]


def named(names: Sequence[str], most: int = 3) -> str:
    """The first ``most`` of ``names``, and "..." for the rest: a message's list that stays one line."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def unflatten_like(
    tensors: dict[str, torch.Tensor], template: TensorDictBase, what: str, cast: bool = True
) -> TensorDict:
    """Rebuild a TensorDict with the structure and batch sizes of ``template``, checking every name and shape;
    each tensor cast to the template's dtype, or kept as stored (``cast=False``)."""
    expected = {_name(key): template.get(key) for key in template.keys(True, True)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    out = template.empty(recurse=True).clear_device_()
    for name, like in expected.items():
        tensor = tensors[name]
        if tensor.shape != like.shape:
            raise ValueError(
                f"{what}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}"
            )
        out.set(tuple(name.split(".")), tensor.to(like.dtype) if cast else tensor)
    return out


def save(run_dir: Path, state: TensorDictBase, meta: dict[str, Any]) -> Path:
    """Save ``state`` (``params`` + ``opt``) and ``meta`` as the newest checkpoint of ``run_dir``, the one
    ``latest`` names from now on; a failed write raises :class:`CheckpointWriteError`."""
    step = int(state["opt", "step"])
    return _save(run_dir, f"step-{step:07d}", step, state, meta, make_latest=True)


def save_aside(run_dir: Path, state: TensorDictBase, meta: dict[str, Any], label: str) -> Path:
    """Save ``state`` for inspection as ``checkpoints/LABEL-step-NNNNNNN/`` (``label="nonfinite"`` when the loss
    became NaN): a checkpoint folder ``load_state`` and ``load_model`` read, which never becomes ``latest`` and
    which :func:`latest_intact` and :func:`prune` ignore."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", label):
        raise ValueError(
            f"checkpoint label {label!r}: use lowercase letters, digits and _, starting with a letter"
        )
    step = int(state["opt", "step"])
    return _save(run_dir, f"{label}-step-{step:07d}", step, state, meta, make_latest=False)


def set_aside_latest(run_dir: Path, step: int, label: str) -> bool:
    """When ``latest`` names the checkpoint of ``step``, rename it ``LABEL-step-NNNNNNN`` (kept for inspection
    and ignored, as :func:`save_aside`'s are) and point ``latest`` at the newest checkpoint before it, or at
    none; whether it did. A step that went non-finite started from that state: resuming there fails again."""
    root = run_dir / CHECKPOINTS
    current = root / f"step-{step:07d}"
    if _pointer(root) != current.name:
        return False
    earlier = next((folder for other, folder in _step_folders(root) if other < step), None)
    if earlier is None:
        (root / LATEST).unlink()
    else:
        atomic_write_text(root / LATEST, earlier.name + "\n")
    aside = root / f"{label}-{current.name}"
    if aside.exists():  # set aside before: the resumed run failed again at the same step
        _move_to_trash(root, aside)
    os.replace(current, aside)
    fsync(root)
    _remove_leftovers(root)
    return True


def _save(
    run_dir: Path, name: str, step: int, state: TensorDictBase, meta: dict[str, Any], make_latest: bool
) -> Path:
    root = run_dir / CHECKPOINTS
    final = root / name
    try:
        if not root.is_dir():
            root.mkdir(parents=True)
            fsync(run_dir)
        _remove_leftovers(root)
        staging = _write_staged(root, name, {"step": step, **meta}, state)
        _publish(root, staging, final)
        if make_latest:
            atomic_write_text(root / LATEST, name + "\n")
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        _remove_leftovers(root)
        named = _pointer(root)
        previous = (
            "there is no earlier checkpoint" if named is None else f"{root / named} is intact and latest"
        )
        raise CheckpointWriteError(f"could not save {final} ({error}); {previous}") from error
    _remove_leftovers(root)
    return final


def _write_staged(root: Path, name: str, meta: dict[str, Any], state: TensorDictBase) -> Path:
    """A new hidden folder holding the checkpoint, every byte of it flushed to disk."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING}{name}-"))
    set_default_mode(staging)
    records = {}
    for file, tensors in ((PARAMS, state["params"]), (OPTIMIZER, state["opt"])):
        save_file(flatten(tensors), str(staging / file))
        set_default_mode(staging / file)
        fsync(staging / file)
        records[file] = FileRecord(size=(staging / file).stat().st_size, sha256=_sha256(staging / file))
    meta = {**meta, FILES: {file: record.model_dump() for file, record in records.items()}}
    (staging / STATE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    fsync(staging / STATE)
    fsync(staging)
    return staging


def _publish(root: Path, staging: Path, final: Path) -> None:
    """Give the finished ``staging`` folder the name ``final``, replacing a folder of that name, such that
    ``latest`` names a complete checkpoint at every moment (module docstring)."""
    if final.exists():
        if _pointer(root) == final.name:  # it must not name a missing folder, even for a moment
            atomic_write_text(root / LATEST, staging.name + "\n")
            staging = _linked_copy(root, staging, final.name)  # the staged copy stays where latest says
        _move_to_trash(root, final)
    os.replace(staging, final)
    fsync(root)


def pin(checkpoint: Path) -> Path:
    """A checkpoint's parameters kept for another run that starts from them (a fine-tune's base or reference),
    where :func:`prune` never deletes them: ``checkpoints/pinned-step-NNNNNNN-HASH/`` beside it, holding
    ``state.json`` and ``params.safetensors`` as hard links (no byte copied while the original lives).

    HASH, the first 12 hex digits of the parameters' SHA-256, makes the same weights pinned twice one folder, and a
    step taken again with other weights (resumed from an earlier checkpoint) another. Like :func:`save_aside`'s
    folders it never becomes ``latest``, and nothing resumes from it; it loads as a model.
    """
    verify(checkpoint, (PARAMS,))
    records = _file_records(checkpoint)
    digest = records[PARAMS].sha256 if records is not None else _sha256(checkpoint / PARAMS)
    final = checkpoint.parent / f"pinned-step-{int(load_meta(checkpoint)['step']):07d}-{digest[:12]}"
    if not final.is_dir():
        # Staged under its own prefix: a save of the run meanwhile removes its own leftovers (.staging-*).
        staged = _linked_copy(checkpoint.parent, checkpoint, final.name, (STATE, PARAMS), PINNING)
        try:
            os.replace(staged, final)
        except OSError:
            shutil.rmtree(staged)
            if not final.is_dir():
                raise
            # Pinned by another process meanwhile (each rank of a torchrun job pins): the same weights.
        fsync(checkpoint.parent)
    return final


def _linked_copy(
    root: Path, folder: Path, name: str, files: Sequence[str] | None = None, prefix: str = STAGING
) -> Path:
    """A new hidden folder holding a second name for each of ``folder``'s files (or of those named), flushed to
    disk: a hard link (no byte copied), or a copy where the file system has no hard links."""
    twin = Path(tempfile.mkdtemp(dir=root, prefix=f"{prefix}{name}-"))
    set_default_mode(twin)
    for file in folder.iterdir() if files is None else (folder / f for f in files):
        try:
            os.link(file, twin / file.name)
        except OSError:
            shutil.copyfile(file, twin / file.name)
            fsync(twin / file.name)
    fsync(twin)
    return twin


def _move_to_trash(root: Path, folder: Path) -> None:
    """Hide ``folder`` in one step, so that nothing reads it while it is deleted (by :func:`_remove_leftovers`,
    now or after a crash)."""
    trash = Path(tempfile.mkdtemp(dir=root, prefix=f"{TRASH}{folder.name}-"))
    os.replace(folder, trash / folder.name)


def _remove_leftovers(root: Path) -> None:
    """Delete the hidden folders and files saves work in, except one that ``latest`` names (module docstring)."""
    if not root.is_dir():
        return
    named = _pointer(root)
    for entry in root.iterdir():
        if entry.name == named or not entry.name.startswith((STAGING, TRASH, f".{LATEST}.")):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete the checkpoints older than the newest ``keep``, except the one ``latest`` names; the deleted ones.

    Only complete ``step-*`` folders count and go; anything else in ``checkpoints/`` stays. Each is hidden by a
    rename before it is deleted, so a crash midway leaves nothing that looks like a checkpoint.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = run_dir / CHECKPOINTS
    named = _pointer(root)
    complete = [
        f for _, f in _step_folders(root) if all((f / file).is_file() for file in (STATE, *TENSOR_FILES))
    ]
    doomed = [folder for folder in complete[keep:] if folder.name != named]
    for folder in doomed:
        _move_to_trash(root, folder)
    if doomed:
        fsync(root)
    _remove_leftovers(root)
    return doomed


def run_of(checkpoint_dir: Path) -> Path:
    """The run a checkpoint folder belongs to (``RUN/checkpoints/step-N``), from its absolute path: one named from
    inside its run (``step-0000004`` from ``checkpoints/``, or ``.``) has its run above it too."""
    return checkpoint_dir.absolute().parent.parent


def latest(run_dir: Path) -> Path:
    """The checkpoint ``checkpoints/latest`` names; a clear error when there is none or it names no folder."""
    root = run_dir / CHECKPOINTS
    name = _pointer(root)
    if name is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({root / LATEST} is missing)")
    if not _names_a_folder(root, name):
        raise DamagedCheckpointError(
            f"damaged checkpoint file {root / LATEST}: it names {name!r}, no folder of {root}"
        )
    return root / name


def newest(run_dir: Path) -> Path:
    """The checkpoint a reader of the run takes: the one ``latest`` names, or, where there is no ``latest`` (a
    kill between a first checkpoint's rename and the write of ``latest``), the newest ``step-*`` folder, as a
    resume would take it (:func:`latest_intact`), with a warning."""
    root = run_dir / CHECKPOINTS
    if _pointer(root) is None and (folders := _step_folders(root)):
        logger.warning(f"{root / LATEST} is missing: reading {folders[0][1]}, the newest checkpoint")
        return folders[0][1]
    return latest(run_dir)


def check_resumable(run_dir: Path) -> None:
    """Fail early, naming the path, when ``run_dir`` holds no checkpoint at all. Which one to resume from, and
    whether it is intact, :func:`latest_intact` decides later: a run killed between renaming its first
    checkpoint into place and writing ``latest`` has a ``step-*`` folder and no ``latest``, and resumes."""
    if not _step_folders(run_dir / CHECKPOINTS):
        # No step folder: the pointer must name a checkpoint, else its error names the problem.
        latest(run_dir)


def saved(run_dir: Path) -> list[str]:
    """What the saves of ``run_dir`` made (checkpoint folders, ``latest``): none where the first save failed or
    was killed, leaving only hidden folders, from which nothing resumes, so that a new run may start afresh."""
    root = run_dir / CHECKPOINTS
    return (
        sorted(entry.name for entry in root.iterdir() if not entry.name.startswith("."))
        if root.is_dir()
        else []
    )


def resumable(run_dir: Path) -> bool:
    """Whether ``--resume`` has a checkpoint to look at: a ``step-*`` folder, or a folder ``latest`` names
    (:func:`check_resumable` does not refuse it; whether it is intact, :func:`latest_intact` says)."""
    root = run_dir / CHECKPOINTS
    named = _pointer(root)
    return bool(_step_folders(root)) or (named is not None and _names_a_folder(root, named))


def remove_leftovers(run_dir: Path) -> None:
    """Delete what failed or killed saves left in ``run_dir``'s ``checkpoints/`` (hidden staging and trash
    folders), for a run that starts afresh where the first one saved nothing: on a full disk, the bytes of
    a half-written checkpoint. The folder itself stays (it may be a link to another disk)."""
    _remove_leftovers(run_dir / CHECKPOINTS)


def latest_intact(run_dir: Path) -> Path:
    """The checkpoint to resume from: the one ``latest`` names when it is intact, else, after a loud warning, the
    newest intact one before it (module docstring).

    Raises :class:`DamagedCheckpointError` naming every damaged file when no checkpoint is intact, and
    ``FileNotFoundError`` when the run has none.
    """
    root = run_dir / CHECKPOINTS
    try:
        named = latest(run_dir)
        verify(named)
        return named
    except DamagedCheckpointError as error:
        problems = [str(error)]
    except FileNotFoundError:
        if not _step_folders(root):
            raise
        problems = [f"{root / LATEST} is missing"]
    before = _step(_pointer(root) or "")
    for step, folder in _step_folders(root):
        if before is not None and step >= before:
            continue
        try:
            verify(folder)
        except DamagedCheckpointError as error:
            problems.append(str(error))
            continue
        logger.warning(
            f"{'; '.join(problems)}. Resuming from {folder} instead, the newest intact checkpoint before it: "
            f"the steps after {step} are trained again"
        )
        return folder
    raise DamagedCheckpointError(f"{'; '.join(problems)}; no intact checkpoint to resume from")


def _pointer(root: Path) -> str | None:
    """The name ``latest`` holds, or None when there is no ``latest``."""
    try:
        return (root / LATEST).read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def _names_a_folder(root: Path, name: str) -> bool:
    """Whether ``latest``'s ``name`` is a folder of ``root`` (not a path that leads out of it)."""
    return name not in ("", ".", "..") and "/" not in name and (root / name).is_dir()


def _step(name: str) -> int | None:
    """The step in a checkpoint's folder name (also in its staging folder's name), or None."""
    found = STEP.search(name)
    return None if found is None else int(found[1])


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """The ``step-*`` folders of ``root`` and their steps, newest first."""
    if not root.is_dir():
        return []
    named = ((STEP.fullmatch(entry.name), entry) for entry in root.iterdir() if entry.is_dir())
    return sorted(((int(found[1]), entry) for found, entry in named if found), reverse=True)


def verify(checkpoint: Path, files: Sequence[str] = TENSOR_FILES) -> None:
    """Check ``files`` of ``checkpoint`` against the sizes and checksums its ``state.json`` records (or, for a
    checkpoint written before checksums, that safetensors can parse them); :class:`DamagedCheckpointError`
    naming the first damaged file and what is wrong with it."""
    records = _file_records(checkpoint)
    for file in files:
        path = checkpoint / file
        if not path.is_file():
            raise _damaged(path, "missing")
        if records is None:
            _parse_header(path)
            continue
        if file not in records:
            raise _damaged(checkpoint / STATE, f"it records no checksum of {file}")
        size, record = path.stat().st_size, records[file]
        if size != record.size:
            raise _damaged(path, f"{size} bytes, expected {record.size}")
        if _sha256(path) != record.sha256:
            raise _damaged(path, f"checksum mismatch (its sha256 is not the one {STATE} records)")


def _file_records(checkpoint: Path) -> dict[str, FileRecord] | None:
    """The sizes and checksums ``state.json`` records, or None for a checkpoint written before them."""
    meta = load_meta(checkpoint)
    if FILES not in meta:
        return None
    try:
        return FILE_RECORDS.validate_python(meta[FILES])
    except ValidationError as error:
        message = f"unreadable (its {FILES!r} record is not sizes and checksums)"
        raise _damaged(checkpoint / STATE, message) from error


def _parse_header(path: Path) -> None:
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as error:
        raise _damaged(path, f"unreadable ({error})") from error


def _damaged(path: Path, problem: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"damaged checkpoint file {path}: {problem}")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_meta(checkpoint: Path) -> dict[str, Any]:
    """``state.json``: the step and the ``meta`` given to ``save``, with each file's size and checksum."""
    path = checkpoint / STATE
    try:
        meta = json.loads(path.read_bytes())
    except FileNotFoundError as error:
        raise _damaged(path, "missing") from error
    except ValueError as error:  # JSON, or UTF-8, that does not decode
        raise _damaged(path, f"unreadable ({error})") from error
    if not isinstance(meta, dict):
        raise _damaged(path, "unreadable (not a JSON object)")
    return meta


def recorded_difference(name: str, then: object, now: object, skip: Collection[str] = ()) -> str | None:
    """The dotted name of the first field where ``then`` (as a checkpoint recorded it) and ``now`` differ,
    comparing only what ``then`` records (a field added to zmaj since, with the old behaviour as default, is
    not compared); None when they agree. A field named in ``skip``, by its dotted name or its last part (at any
    depth), is not compared."""
    if name in skip or name.rpartition(".")[2] in skip:
        return None
    if isinstance(then, dict) and isinstance(now, dict):
        return next(
            (
                found
                for key in then
                if (found := recorded_difference(f"{name}.{key}", then[key], now.get(key), skip)) is not None
            ),
            None,
        )
    return None if then == now else name


def check_recorded_model(checkpoint: Path, model: dict[str, Any], skip: Collection[str] = ()) -> None:
    """Refuse a checkpoint of a pre-training run whose record names another model than ``model`` (the config its
    run's ``spec.yaml`` gives now), ``skip`` aside: shaped alike, its weights would be read as another network,
    an activation or a rope base edited into ``spec.yaml`` since, or a checkpoint copied in from another run."""
    spec = load_meta(checkpoint).get("spec")
    recorded = spec.get("model") if isinstance(spec, dict) else None
    if (
        isinstance(recorded, dict)
        and (field := recorded_difference("model", recorded, model, skip)) is not None
    ):
        raise written_otherwise(checkpoint, field)


def written_otherwise(checkpoint: Path, field: str) -> ValueError:
    """The refusal of a checkpoint whose record and the run's ``spec.yaml`` differ in ``field``."""
    return ValueError(
        f"{checkpoint} was written with another {field} than the run's spec.yaml says: a checkpoint of another "
        "run, or a spec.yaml edited since; put the run's own back"
    )


def load_tensors(checkpoint: Path, file: str = PARAMS) -> dict[str, torch.Tensor]:
    """The tensors of one file of ``checkpoint`` by name, verified first (:func:`verify`)."""
    verify(checkpoint, (file,))
    return _read(checkpoint, file)


def _read(checkpoint: Path, file: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(checkpoint / file))
    except SafetensorError as error:
        raise _damaged(checkpoint / file, f"unreadable ({error})") from error


def load_params(checkpoint: Path, template: TensorDictBase) -> TensorDict:
    """Parameters only (for sampling or export), shaped like ``template`` (e.g. ``init`` on the meta device)."""
    return unflatten_like(load_tensors(checkpoint, PARAMS), template, str(checkpoint))


def load_state(checkpoint: Path, template: TensorDictBase, verified: bool = False) -> TensorDict:
    """The full training state, shaped like ``template`` (a fresh state of the same model, or its shapes on the
    meta device). ``verified``: the caller has just verified the checkpoint (:func:`latest_intact` does), so its
    files are not hashed a second time (at 96 GB, a minute or two on every rank)."""
    if not verified:
        verify(checkpoint, (PARAMS, OPTIMIZER))
    params = unflatten_like(_read(checkpoint, PARAMS), template["params"], str(checkpoint))
    opt = unflatten_like(_read(checkpoint, OPTIMIZER), template["opt"], str(checkpoint))
    return TensorDict({"params": params, "opt": opt})
