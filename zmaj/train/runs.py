"""Run folders: what a training program does before its first step and after its last, written once.

A run folder holds everything one experiment leaves: ``spec.yaml`` (the validated spec, so the run can be
repeated or resumed), ``checkpoints/``, ``metrics.jsonl``, ``curves.png``, ``log.txt`` and ``run.jsonl`` (a
start and an end line per session). ``open_run`` creates one, or reopens one for ``--resume``, and returns a
:class:`Run`, used as a context manager for the session. From ``open_run`` on, the process holds an exclusive
lock on the folder (``fcntl.flock``, so a second writer, an orphaned process or a second terminal, is refused
naming the first one's PID), and only rank 0 of a ``torchrun`` job writes anything or logs below WARNING.

Bad input at any boundary a user touches (a spec field, a path, a locked run) is a :class:`UserError` or one
of the errors ``BAD_INPUT`` lists; ``bad_input_exits_2`` turns it into one line on stderr and exit status 2
(under ``torchrun``, in its failure summary too: ``tell_torchrun``).
"""

import argparse
import errno
import fcntl
import hashlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Generic, TypeVar

import numpy as np
import torch
import yaml
from loguru import logger
from pydantic import BaseModel
from tensordict import TensorDict, TensorDictBase

from zmaj import checkpoint, fileio
from zmaj.convert.load import LORA_FILE, MODEL_FILE
from zmaj.data.model_tokenizer import GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from zmaj.extras import MissingExtraError
from zmaj.specfile import SpecError, read_yaml
from zmaj.text import read_json, read_text
from zmaj.train import precision, report, trackers
from zmaj.train.muon import OptimizerConfig
from zmaj.train.parallel import Parallel
from zmaj.train.spec import LoopConfig, load, parse
from zmaj.train.step import init_state


class UserError(ValueError):
    """Bad input a user can fix; the message names it."""


BAD_INPUT: tuple[type[Exception], ...] = (
    UserError,
    SpecError,
    FileNotFoundError,
    ValueError,
    MissingExtraError,
)
"""What ``bad_input_exits_2`` reports in one line. ``ValueError`` is the type every input check of zmaj raises
(spec validation, data files, checkpoint files); it is caught only around a program's setup, never its loop.
``MissingExtraError``: the spec asks for a capability whose extra is not installed (a GGUF base model)."""


def one_line(error: BaseException) -> str:
    """An error message on one line (pydantic's span several), for a program's exit-2 report."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


@contextmanager
def bad_input_exits_2(
    parallel: Parallel | None = None,
    errors: tuple[type[Exception], ...] = BAD_INPUT,
    every_rank: bool = False,
) -> Iterator[None]:
    """Turn bad input (``errors``) raised inside into one error line and exit status 2. The line comes from rank 0
    (input every rank reads alike fails alike on all), or with ``every_rank`` from whichever rank it failed on
    (a rank's own batch)."""
    try:
        yield
    except errors as error:
        # Before the job is joined, the rank is what torchrun set in the environment.
        main = parallel.main if parallel is not None else os.environ.get("RANK", "0") == "0"
        line = one_line(error)
        if main or every_rank:
            logger.error(line)
        tell_torchrun(line)
        sys.exit(2)


TRAINING_INTERRUPTED = (
    "interrupted (Ctrl-C) outside the training steps; every file written is whole, and --resume RUN goes on from "
    "a run's latest checkpoint"
)
"""What a training program says when it is interrupted outside its steps (the loop takes one inside as a stop)."""


def ctrl_c_exits_130(main: Callable[[], None], said: str = TRAINING_INTERRUPTED) -> None:
    """Run a program's ``main``: a Ctrl-C ends in the one line ``said`` and status 130 (a shell's for SIGINT),
    not a traceback from inside whatever was running (preparing a training run's data, sampling DPO's pairs, a
    final evaluation, an export's writing). ``said`` tells what the Ctrl-C left: zmaj writes every file and folder
    whole or not at all."""
    try:
        main()
    except KeyboardInterrupt:
        logger.warning(said)
        sys.exit(130)


def tell_torchrun(message: str) -> None:
    """Leave a failing rank's one line in the error file ``torchrun`` gives each process
    (``TORCHELASTIC_ERROR_FILE``), whose failure summary shows it: on its own, a rank other than 0 that fails
    where rank 0 does not (a file one node lacks, say) exits with its status and no word of why.

    The file holds ``torch.distributed.elastic``'s plain form, ``{"message": str, "timestamp": int}``, which the
    summary prints as it stands (the other form, which ``@record`` writes, shows a traceback instead)."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        # A full disk under it: the message is logged all the same, and the exit status says the rest.
        with suppress(OSError):
            record = {"message": message, "timestamp": int(time.time())}
            fileio.atomic_write_text(Path(path), json.dumps(record))


S = TypeVar("S", bound=BaseModel)


def cli(doc: str | None, default_spec: Path | None = None) -> argparse.ArgumentParser:
    """The arguments every training program takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = f"default: {default_spec}; " if default_spec else ""
    help_spec = f"YAML spec ({default}none with --resume, which goes on with the run's own)"
    # No argparse default: read_spec tells a SPEC given with --resume from none, and fills in default_spec.
    parser.add_argument("spec", nargs="?", type=Path, help=help_spec)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue a run from its latest checkpoint"
    )
    parser.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/NAME-TIMESTAMP)")
    parser.add_argument(
        "--stop-after",
        type=positive,
        metavar="N",
        help="run at most N steps now, then checkpoint and exit (resumable)",
    )
    return parser


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the flag in its error)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def read_spec(
    kind: type[S], args: argparse.Namespace, frozen: Sequence[str], default_spec: Path | None = None
) -> S:
    """The spec of a new run (``args.spec``, else ``default_spec``, with ``--set`` overrides), or of the run
    ``--resume`` names: its own ``spec.yaml``, where ``--set`` may change anything but the ``frozen`` fields
    (dotted names: what is trained, and how its checkpoints count steps). A SPEC given with ``--resume`` is
    refused rather than ignored: its changes would silently not apply."""
    if args.resume is None:
        path = args.spec or default_spec
        if path is None:
            raise SpecError("give a SPEC file, or --resume RUN_DIR")
        if path.is_dir():
            raise SpecError(f"SPEC {path} is a folder, not a YAML file")
        return load(kind, path, args.overrides)
    if args.spec is not None:
        raise SpecError(
            f"--resume {args.resume} goes on with the run's own spec.yaml: give no SPEC, and change the run "
            "with --set"
        )
    if getattr(args, "run_dir", None) is not None:  # the run would go on in --resume's folder, not there
        raise SpecError(
            f"--resume {args.resume} goes on in its own folder: give no --run-dir (to start another run from "
            "this one's state, copy the folder and resume the copy)"
        )
    saved = args.resume / "spec.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume {args.resume}: no spec.yaml there, so it is not a zmaj run folder")
    spec = load(kind, saved, args.overrides)
    original = parse(kind, read_yaml(read_text(saved), str(saved)), str(saved))
    for name in frozen:
        if field_of(spec, name) != field_of(original, name):
            changed = first_difference(name, field_of(spec, name), field_of(original, name))
            raise SpecError(
                f"--resume {args.resume}: {changed} differs from the run's; --set cannot change it"
            )
    checkpoint.check_resumable(args.resume)
    return spec


LOCATIONS = ("paths", "path", "data_files")
"""Where a source's data lies, which ``check_written_by`` leaves to ``data.json``'s fingerprint of the data
itself: a corpus moved, and ``spec.yaml`` edited to name it there, is the same data."""


def check_written_by(path: Path, spec: BaseModel, frozen: Sequence[str] = ()) -> None:
    """Refuse a checkpoint whose ``state.json`` records another model, seed or ``frozen`` field (what a resume
    may not change, ``read_spec``'s) than ``spec``: one copied in from another run, or a run's ``spec.yaml``
    edited by hand since (``read_spec`` compares ``--set`` with the file, not the file with the run), loaded
    (the shapes alike) and trained on as something it was not. Fields the record lacks (added to zmaj since,
    with the old behaviour as default) are not compared."""
    meta = checkpoint.load_meta(path)
    now = spec.model_dump(mode="json")
    recorded = meta["spec"] if isinstance(meta.get("spec"), dict) else {}
    for name in dict.fromkeys(("model", "train.seed", *frozen)):
        then = _dotted(recorded, name)
        if name == "model" and not isinstance(then, dict):
            # A pre-training run's model is its config; a fine-tune's is a path, which may be moved and edited
            # to match (the LoRA base's fingerprint guards the weights: load.check_lora_base).
            continue
        if name == "train.seed" and then is None:  # recorded beside the spec before the spec was
            then = meta.get("seed")
        if (
            then is not None
            and (field := checkpoint.recorded_difference(name, then, _dotted(now, name), LOCATIONS))
            is not None
        ):
            raise checkpoint.written_otherwise(path, field)


def _dotted(values: object, name: str) -> object:
    """The value at a dotted ``name`` of nested dicts, or None where a part is missing."""
    for part in name.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def field_of(spec: BaseModel, name: str) -> object:
    """A spec's field by its dotted name (``train.passes``)."""
    value: object = spec
    for part in name.split("."):
        value = getattr(value, part)
    return value


def first_difference(name: str, now: object, then: object) -> str:
    """The dotted name of the innermost field in which two differing values of the spec field ``name`` differ:
    ``model.d_model``, not ``model``."""
    if isinstance(now, BaseModel) and type(now) is type(then):
        for part in type(now).model_fields:
            if getattr(now, part) != getattr(then, part):
                return first_difference(f"{name}.{part}", getattr(now, part), getattr(then, part))
    return name


def join(train: LoopConfig) -> Parallel:
    """This process's device and place in the job (``torchrun``'s environment; ranks other than 0 log warnings
    and errors only from here on), and every source of randomness seeded from the spec: Python's, NumPy's and
    torch's global generators (zmaj's own randomness takes explicit seeds; these cover libraries that do not).
    A tracker the spec names that is not installed fails here."""
    trackers.check_installed(train.trackers)  # here, before any work, not at the first metrics line
    parallel = Parallel.from_environment(train.parallel, precision.device(train.device))
    if not parallel.main:
        quiet_logging(parallel)
    random.seed(train.seed)
    np.random.seed(train.seed)
    torch.manual_seed(train.seed)
    return parallel


class RunFailedError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message says why, what was kept, and how to go on.
    ``said``: rank 0 has logged it already."""

    def __init__(self, message: str, said: bool = False) -> None:
        super().__init__(message)
        self.said = said


def on_rank_0(parallel: Parallel, write: Callable[[], None], what: str) -> None:
    """``write()`` on rank 0 alone, which alone writes a run's files; when it fails there, every rank stops: rank
    0 with its error, the others with a ``RunFailedError`` saying rank 0 could not ``what`` (rank 0 says why),
    rather than each waiting in its next collective for a rank that has gone, where gloo's "Connection closed by
    peer" ends it with a traceback."""
    failed: Exception | None = None
    if parallel.main:
        try:
            write()
        except Exception as error:  # raised below, once the others know
            failed = error
    stop_together(parallel, failed, f"rank 0 could not {what}")


def stop_together(parallel: Parallel, failed: Exception | None, elsewhere: str) -> None:
    """Raise rank 0's ``failed`` on rank 0 and a ``RunFailedError`` saying ``elsewhere`` on the others, when
    rank 0's write failed: every rank learns it, rather than wait in a collective for a rank that has gone.
    Rank 0 says why; the others' error is already said."""
    if parallel.agree(failed is not None):
        raise failed or RunFailedError(elsewhere)


class RunLockedError(UserError):
    """Another process holds the run folder."""


@dataclass
class Run(Generic[S]):
    """An open run folder and what the loop needs to know about this session; a context manager that holds the
    folder's lock and records the session's start and end."""

    dir: Path
    spec: S
    parallel: Parallel
    resumed: bool
    stop_after: int | None = None
    frozen: Sequence[str] = ()
    """What a resume may not change (``read_spec``'s): compared with the checkpoint's record when resuming."""
    started: float = field(default_factory=time.perf_counter)
    _lock: IO[str] | None = field(default=None, repr=False)
    _sinks: list[int] = field(default_factory=list, repr=False)
    _trackers: list[trackers.Tracker] = field(default_factory=list, repr=False)

    @property
    def train(self) -> LoopConfig:
        train: LoopConfig = getattr(self.spec, "train")  # noqa: B009 (every training spec has one)
        return train

    @property
    def name(self) -> str:
        name: str = getattr(self.spec, "name")  # noqa: B009
        return name

    @property
    def device(self) -> torch.device:
        return self.parallel.device

    @property
    def dtype(self) -> torch.dtype:
        """The type the matmuls compute in (``train.precision``; parameters stay float32)."""
        return precision.resolve(self.train.precision, self.device)

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    def record(self, line: dict[str, Any]) -> None:
        """Append a metrics line (``step`` and numbers) to ``metrics.jsonl`` and log it to the trackers, on rank
        0 (:func:`on_rank_0`: a write that fails there, a full disk, stops every rank)."""
        on_rank_0(self.parallel, partial(self._record, line), "write the run's metrics")

    def _record(self, line: dict[str, Any]) -> None:
        report.append_jsonl(self.metrics, line)
        step, numbers = trackers.scalars(line)
        for tracker in self._trackers:
            tracker.log(numbers, step)

    def begin(self, step: int) -> None:
        """The loop goes on from ``step``: the trackers forget what an earlier session logged past it, as
        ``metrics.jsonl`` has (``zmaj.train.trackers``)."""
        for tracker in self._trackers:
            tracker.begin(step)

    def write_spec(self) -> None:
        """The spec the run goes on with (a resume's ``--set`` included), written by rank 0."""
        on_rank_0(self.parallel, partial(write_spec, self.dir, self.spec), "write the run's spec.yaml")

    def restore(
        self,
        params: TensorDictBase | Callable[[torch.device | None], TensorDictBase],
        optimizer: OptimizerConfig,
    ) -> TensorDict:
        """The state to start from, in this job's layout on this rank's device: ``params``, this rank's share
        (``Parallel.shard``) of the parameters a new run starts from, with ``optimizer``'s fresh state made
        beside them on the device; or, when resuming, the run's newest intact checkpoint, read into their
        shapes (the whole checkpoint is read on every rank, each keeping its share). ``params`` may be a
        function making them on a device (None: where the program keeps them, best on the CPU), so that a
        resume builds none it drops, only their shapes on the meta device: a random one took 2.4 s and 3 GB for
        a 268M-parameter GPT's state on every rank, and would take 96 GB at 8B.

        The optimizer's state is made for this rank's share alone: made whole and then cut, AdamW's two
        moments of an 8B model would be 64 GB on every rank before the first step.
        """
        make = params if callable(params) else lambda device: params if device is None else params.to(device)
        if not self.resumed:
            return init_state(make(None).to(self.device), optimizer).to(self.device)
        # No intact checkpoint left, or one that does not fit the spec's model: one line, exit 2, as every
        # loader of a damaged file reports it.
        with bad_input_exits_2(self.parallel):
            path = checkpoint.latest_intact(self.dir)
            check_written_by(path, self.spec, self.frozen)
            # On the CPU, where a rank's shard is cut from it; latest_intact has verified it.
            shapes = self.parallel.whole_shapes(make(torch.device("meta")))
            state = checkpoint.load_state(path, init_state(shapes, optimizer), verified=True)
        meta = checkpoint.load_meta(path)
        recorded = meta.get("precision")
        if self.parallel.main and recorded not in (None, _type_name(self.dtype)):
            logger.warning(
                f"{path} was trained computing in {recorded}, this session computes in "
                f"{_type_name(self.dtype)} (train.precision: {self.train.precision} on {self.device}): the "
                "run goes on, but not bit for bit as it would have where it began"
            )
        if self.parallel.main and (other := other_code(meta)):
            logger.warning(
                f"{path} was written by {other}: the run goes on with this session's code, but where the "
                "change touches what a step computes (a schedule, a mask, a data split), not as it would "
                "have gone on unchanged"
            )
        logger.info(f"resumed from {path} (step {int(state['opt', 'step'])})")
        return self.parallel.shard(state).to(self.device)

    def __enter__(self) -> "Run[S]":
        try:
            on_rank_0(self.parallel, self._start, "start the session")
        except BaseException as error:
            # A failed __enter__ gets no __exit__: end the session (lock, log, trackers started) here; it exits 1
            # where the user can act (a full disk, a tracker's refusal), else the error goes on as it is.
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def _start(self) -> None:
        """Rank 0's start of the session: the log file, the session's start record, the trackers."""
        self._sinks.append(logger.add(self.dir / "log.txt"))
        report.record_session(self.dir, "start", self.device, _type_name(self.dtype), self.parallel.size)
        config = self.spec.model_dump(mode="json")
        names = self.train.trackers
        for name, tracker in zip(names, trackers.make(names, self.train.tracker_project), strict=True):
            try:
                tracker.start(self.dir.resolve().name, self.dir, config)
            except MissingExtraError:
                raise
            except Exception as error:
                # A tracker's own refusal (wandb not logged in) is the user's to act on: one line, exit 1.
                raise RunFailedError(f"train.trackers: {name} could not start: {one_line(error)}") from error
            self._trackers.append(tracker)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        """End the session; a run that failed in a way the user can act on (``RunFailedError``, a checkpoint that
        could not be written, a full or read-only disk under the run's records) exits with status 1 and one line
        saying so, not a traceback."""
        full = isinstance(error, OSError) and error.errno in fileio.WRITE_ERRORS
        failed = full or isinstance(error, (RunFailedError, checkpoint.CheckpointWriteError))
        said = isinstance(error, RunFailedError) and (error.said or not self.parallel.main)
        if failed and error is not None:
            line = one_line(error)
            if full:  # (a failed write names no file)
                then = (
                    f"--resume {self.dir} goes on from its latest checkpoint"
                    if checkpoint.resumable(self.dir)
                    else "run the same command again (it saved no checkpoint to resume from)"
                )
                line = f"the run stopped writing in {self.dir}: {line}; once it can be written again, {then}"
            if not said:
                logger.error(line)  # every rank raises a RunFailedError; rank 0 says it
            tell_torchrun(line)
        if self.parallel.main:
            for tracker in self._trackers:
                tracker.finish()
            try:
                report.record_session(
                    self.dir, "end", self.device, _type_name(self.dtype), self.parallel.size
                )
            except OSError:
                if not full:  # else the disk that stopped the run refuses this record too: said above
                    raise
            for sink in self._sinks:
                logger.remove(sink)
            if self._lock is not None:
                self._lock.close()  # closing the file releases the lock
        if failed:
            raise SystemExit(1) from None


def open_run(
    spec: S,
    args: argparse.Namespace,
    parallel: Parallel,
    write: Callable[[Path], None] | None = None,
    data: Callable[[], Mapping[str, str]] | None = None,
    frozen: Sequence[str] = (),
) -> Run[S]:
    """The run folder of this session: ``--resume``'s, or a new one (``--run-dir``, default
    ``runs/NAME-TIMESTAMP``) with ``spec.yaml`` and whatever ``write(run_dir)`` adds. Rank 0 creates it; every
    rank gets the same path.

    ``data()`` fingerprints what the steps and evaluations read (a name and a hash for each part, e.g. each
    split's tokens; called on rank 0 alone): a new run records it in ``data.json``, and a resume whose data
    differs from its run's is refused, naming the part. The spec alone cannot say it: the same spec reads
    edited files. ``frozen`` are the fields ``read_spec`` kept from ``--set``; a resume also compares them with
    what its checkpoint recorded (``Run.restore``), so that one edited into ``spec.yaml`` by hand is refused."""
    resumed = args.resume is not None
    name: str = getattr(spec, "name")  # noqa: B009
    held: IO[str] | None = None

    def claim() -> Path:
        nonlocal held
        run_dir = Path(args.resume) if resumed else args.run_dir or _new_run_dir(RUNS, name)
        if not resumed:
            _check_not_a_model(run_dir)
        _make_dir(run_dir)
        _check_writable(run_dir)
        # A run makes its .lock before it writes anything: a folder without one never held a run, and the
        # files in it (a spec.yaml of the user's own, say) are not a dead run's to remove.
        held_a_run = (run_dir / LOCK_FILE).is_file()
        held = lock(run_dir)  # before anything is written, so that two writers never interleave
        try:
            _check_free(run_dir, resumed, held_a_run)
            fingerprints = data() if data is not None else None
            if resumed and fingerprints is not None:
                _check_same_data(run_dir, fingerprints)
        except BaseException:
            held.close()
            raise
        if not resumed and held_a_run:
            _start_afresh(run_dir)
        try:
            if not resumed:  # a resume writes its spec once the loop has checked it (Run.write_spec)
                write_spec(run_dir, spec)
            # A resumed run from before data.json records its data now, for the resumes to come.
            if fingerprints is not None and not (run_dir / DATA_FILE).is_file():
                fileio.atomic_write_text(run_dir / DATA_FILE, json.dumps(fingerprints, indent=1) + "\n")
            if not resumed and write is not None:
                write(run_dir)
        except OSError as error:  # a full disk: a new run in this folder starts afresh
            held.close()
            raise _cannot(f"write in the run folder {run_dir}", error) from error
        return run_dir

    if parallel.main:
        code_fingerprint()  # now: a pull or an edit before the first checkpoint is not this run's code
    run_dir = parallel.from_rank_0(claim)
    return Run(run_dir, spec, parallel, resumed, args.stop_after, frozen, _lock=held)


def _check_same_data(run_dir: Path, data: Mapping[str, str]) -> None:
    """Refuse to resume on data other than the run's: its steps would read other rows than the run it continues
    (README: what a resume cannot change). A run from before ``data.json`` is not checked (it records it now)."""
    path = run_dir / DATA_FILE
    if not path.is_file():
        return
    recorded = read_json(path)
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: not a record of the run's data (delete it to resume unchecked)")
    if changed := [name for name, fingerprint in data.items() if recorded.get(name) != fingerprint]:
        raise ValueError(
            f"--resume {run_dir}: the data differs from the run's ({', '.join(changed)} changed since the run "
            f"began, {path}: the files, or how this zmaj reads them), so the resumed steps would read other rows; "
            "resume with the run's data and zmaj, or start a new run"
        )


RUNS = Path("runs")
"""Where a new run without ``--run-dir`` makes its folder (``runs/NAME-TIMESTAMP``)."""
DATA_FILE = "data.json"
RECORDS = ("metrics.jsonl", report.RUN_FILE)
"""The files a run appends to."""

LEFTOVERS = (
    "curves.png",
    MODEL_FILE,
    LORA_FILE,
    "pairs.jsonl",  # zmaj.train.pairs.PAIRS_FILE (which imports this module)
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    DATA_FILE,
)
"""The other files a training program writes in its run folder, besides ``spec.yaml``, ``log.txt`` and
``checkpoints/``: a fine-tuning run's model files (LoRA's ``lora.json``, DPO's pairs), a pre-training run's
tokenizer, the fingerprints of the data (``open_run``)."""


def _check_free(run_dir: Path, resumed: bool, held_a_run: bool) -> None:
    """Refuse a folder this session may not write in: one whose ``checkpoints`` is not a folder, and for a new
    run, one that holds another run's checkpoints or a finished run (a final line says so) whose checkpoints
    are gone (removed by hand, say, to keep its model alone: not a dead run's files to remove)."""
    checkpoints = run_dir / checkpoint.CHECKPOINTS
    if checkpoints.exists() and not checkpoints.is_dir():
        raise UserError(
            f"{checkpoints} is not a folder, where the run saves its checkpoints: use another --run-dir"
        )
    if resumed:
        return
    if saved := checkpoint.saved(run_dir):
        if checkpoint.resumable(run_dir):
            raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
        # Set aside (the first step, or the one after the first checkpoint, went non-finite) and kept for
        # inspection, pinned for a run that starts from it, or a latest naming no folder: nothing resumes.
        raise UserError(
            f"{run_dir} holds checkpoints no run resumes from ({', '.join(saved)}): use another --run-dir"
        )
    if held_a_run and report.finished(run_dir / RECORDS[0]):
        raise UserError(
            f"{run_dir} holds a finished run (its {RECORDS[0]} records its end) whose checkpoints are gone: use "
            "another --run-dir"
        )


def _start_afresh(run_dir: Path) -> None:
    """Remove what an earlier run in ``run_dir`` left without a checkpoint (its ``.lock`` shows it was there:
    killed before its first checkpoint, or its first save failed), since nothing resumes it: its records (this
    run's would be appended to them), what its first save left in ``checkpoints/``, and where its ``spec.yaml``
    shows it got that far, the files it wrote. This run may not write them all again, and those left would
    describe another model: a ``lora.json`` under a full fine-tune's checkpoints made the folder unloadable, a
    ``model.json`` under a pre-training run's would be read as its model."""
    names = RECORDS + (LEFTOVERS if (run_dir / "spec.yaml").is_file() else ())
    stale = [run_dir / name for name in names if (run_dir / name).is_file()]
    # Its TensorBoard events too: the folder is one TensorBoard run, which would show both runs' curves.
    events = run_dir / trackers.TensorBoard.FOLDER
    stale += [events] if events.is_dir() else []
    if stale:
        left = ", ".join(path.name for path in stale)
        logger.warning(f"{run_dir} holds a run with no checkpoint: started afresh, without its {left}")
    checkpoint.remove_leftovers(run_dir)
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_spec(run_dir: Path, spec: BaseModel) -> None:
    """The run's ``spec.yaml``: what a new run is, and what a resumed one goes on with."""
    fileio.atomic_write_text(run_dir / "spec.yaml", yaml.safe_dump(spec.model_dump(mode="json")))


def _new_run_dir(parent: Path, name: str) -> Path:
    """``parent/NAME-TIMESTAMP``, newly created. If a run started in the same second (a script launching two)
    has taken that name, the later one takes ``-2``, ``-3``...: each claims its folder with ``mkdir``, which
    exactly one process can win, so two runs never share one."""
    _make_dir(parent, "the runs' folder")
    base = f"{name}-{_stamp()}"
    for attempt in itertools.count(1):
        candidate = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise _cannot(f"create the run folder {candidate}", error) from error
        break
    return candidate


def _check_not_a_model(run_dir: Path) -> None:
    """Refuse a new run's folder that is a model folder (Hugging Face's ``config.json``, or ``params.safetensors``
    beside zmaj's ``model.json`` or a checkpoint's ``state.json``): the run's ``model.json`` and tokenizer files
    would overwrite the model's, and the folder would go on loading as those weights, not as the run's."""
    weights = (run_dir / checkpoint.PARAMS).is_file() and any(
        (run_dir / name).is_file() for name in (MODEL_FILE, checkpoint.STATE)
    )
    if (run_dir / "config.json").is_file() or weights:
        raise UserError(
            f"--run-dir {run_dir} is a model folder, whose files the run would overwrite: use another --run-dir"
        )


def _make_dir(path: Path, what: str = "the run folder") -> None:
    """``path.mkdir(parents=True, exist_ok=True)``, failing as bad input that names the folder (a ``--run-dir``
    under a file, a folder without write permission) rather than with a traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cannot(f"create {what} {path}", error) from error


def _check_writable(run_dir: Path) -> None:
    """Fail now, naming the folder, if the run cannot create files in its folder or in its checkpoints folder
    (a read-only ``--resume`` folder, whose existing lock and logs can still be appended to): otherwise the
    first checkpoint would fail after the training it was to keep.

    The probe is a ``TemporaryFile``: on Linux an unnamed file (``O_TMPFILE``), which needs the folder's write
    permission like any other but never has a name there, so a process killed while probing leaves nothing
    behind (elsewhere, a ``.write-probe-*`` file removed at once)."""
    for folder, what in ((run_dir, "run folder"), (run_dir / checkpoint.CHECKPOINTS, "checkpoints folder")):
        if not folder.is_dir():
            continue
        try:
            tempfile.TemporaryFile(dir=folder, prefix=".write-probe-").close()
        except OSError as error:
            raise _cannot(f"write in the {what} {folder}", error) from error


def _cannot(what: str, error: OSError) -> UserError:
    """Bad input: the run folder cannot be made or written, as the operating system says why."""
    return UserError(f"cannot {what}: {error.strerror or error}")


def _stamp() -> str:
    """The local time to the second, as run folders are named."""
    return time.strftime("%Y%m%d-%H%M%S")


def quiet_logging(parallel: Parallel) -> None:
    """Ranks other than 0 log warnings and errors only, each line marked with its rank."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format=f"rank {parallel.rank} | {{level}} | {{message}}")


LOCK_FILE = ".lock"


def check_run_folder(args: argparse.Namespace) -> None:
    """What :func:`open_run` would refuse of ``--run-dir`` (or ``--resume``'s folder, or ``runs/`` for a new
    one of its own), checked without creating anything: for a program to call on rank 0 before work that may
    take long (preparing a corpus, sampling DPO's pairs), so that a folder the run cannot use is said at once
    rather than after it. ``open_run`` checks again: the folder may change in between."""
    resumed = args.resume is not None
    run_dir: Path | None = Path(args.resume) if resumed else args.run_dir
    if run_dir is None:  # a new folder of its own under runs/
        _check_creatable(RUNS / "NAME-TIMESTAMP", f"a run folder in {RUNS}")
        return
    if not resumed:
        _check_not_a_model(run_dir)
    if not run_dir.is_dir():
        _check_creatable(run_dir, f"the run folder {run_dir}")
        return
    _check_writable(run_dir)
    _check_free(run_dir, resumed, (run_dir / LOCK_FILE).is_file())
    if (run_dir / LOCK_FILE).is_file():
        # Whether another process holds the lock: a shared lock is refused by its exclusive one, and unlike an
        # exclusive lock needs no descriptor open for writing (which NFS asks for); released on close.
        with (run_dir / LOCK_FILE).open() as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _locked(run_dir, handle.read()) from None
            except OSError as error:
                raise _cannot(f"lock the run folder {run_dir}", error) from error


def _check_creatable(folder: Path, what: str) -> None:
    """Refuse a folder to be made (``what``, for the message) that cannot be: under a file, or in a folder where
    nothing can be written."""
    if folder.is_dir():
        return
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise _cannot(f"create {what}", NotADirectoryError(errno.ENOTDIR, "Not a directory"))
    try:
        tempfile.TemporaryFile(dir=existing, prefix=".write-probe-").close()
    except OSError as error:
        raise _cannot(f"create {what}", error) from error


def _locked(run_dir: Path, holder: str) -> RunLockedError:
    return RunLockedError(
        f"{run_dir} is being written by another process (PID {holder.strip() or 'unknown'}); stop it first, or "
        "use another --run-dir"
    )


def lock(run_dir: Path) -> IO[str]:
    """An exclusive lock on ``run_dir`` for as long as the returned file stays open; the file names its holder.

    ``flock`` locks belong to the open file, so the operating system releases them when the process dies,
    however it dies: a stale lock cannot outlive a killed run.
    """
    try:
        handle = (run_dir / LOCK_FILE).open("a+")
    except OSError as error:  # a folder where no new .lock can be made (an existing one can be appended to)
        raise _cannot(f"write in the run folder {run_dir}", error) from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read()
        handle.close()
        raise _locked(run_dir, holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _type_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_meta(run: Run[Any]) -> dict[str, Any]:
    """What every checkpoint records besides the tensors: the seed, the type the matmuls computed in (what
    ``train.precision`` resolved to on that machine), the spec, the job it was written by, and the code (a
    fingerprint of zmaj's source, :func:`code_fingerprint`, and the torch version)."""
    return {
        "seed": run.train.seed,
        "precision": _type_name(run.dtype),
        "spec": run.spec.model_dump(mode="json"),
        "world_size": run.parallel.size,
        "parallel": run.parallel.kind,
        "code": code_fingerprint(),
        "torch": torch.__version__,
    }


def other_code(meta: Mapping[str, Any]) -> str | None:
    """What wrote a checkpoint, in words, where it is not this session's code (zmaj's source or torch), else
    None. Users pull a newer zmaj, or edit it, in the middle of a run; a resume then computes its steps with
    other code, which no check of the spec or the data sees."""
    if "code" not in meta:
        return "an older zmaj, which recorded no fingerprint of its code"
    changed = [
        f"{what} {meta[key]} (this session's: {now})"
        for key, what, now in [
            ("code", "zmaj code", code_fingerprint()),
            ("torch", "torch", torch.__version__),
        ]
        if meta.get(key) != now
    ]
    return " and ".join(changed) or None


@cache
def code_fingerprint() -> str:
    """The code this process runs, as it was when first asked (``open_run`` asks before the first step): zmaj's
    package, installed or a checkout, and the program that runs it (``programs/pretrain.py``)."""
    program = getattr(sys.modules.get("__main__"), "__file__", None)
    return source_fingerprint([Path(__file__).resolve().parents[1], *([Path(program)] if program else [])])


def source_fingerprint(roots: Sequence[Path]) -> str:
    """A short hash of ``roots``' Python: a folder's ``.py`` files by their path under its parent, a file by its
    name, each with its bytes. Any edit, added, removed or renamed module changes it; caches, data and an
    editor's hidden files (Emacs's ``.#name.py`` lock, a link to nowhere) do not."""
    digest = hashlib.sha256()
    for root in roots:
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            if path.name.startswith(".") or not path.is_file():
                continue
            name = (path.relative_to(root.parent) if root.is_dir() else Path(path.name)).as_posix().encode()
            digest.update(len(name).to_bytes(8, "little") + name)
            body = path.read_bytes()
            digest.update(len(body).to_bytes(8, "little") + body)
    return digest.hexdigest()[:16]
