"""Experiment trackers: every line a run writes to ``metrics.jsonl``, also sent where the researcher watches runs.

A spec names its trackers in ``train.trackers`` (none by default); the run folder (``zmaj.train.runs.Run``)
starts them when a session begins, logs each metrics line to them at its step (train steps, evaluations, GRPO's
rewards: whatever the loop records) and finishes them when the session ends. Each tracker run is named after the
run folder and gets the whole spec as its config. Only rank 0 tracks.

A resumed session takes again the steps a kill cut off after the last checkpoint; ``metrics.jsonl`` drops their
records (``zmaj.train.report.drop_records_after``), and so must a tracker that keeps one run across sessions:
the loop tells each where the session starts (``Tracker.begin``).

- trackio (https://github.com/gradio-app/trackio): local-first, a SQLite database under ``TRACKIO_DIR``
  (default ``~/.cache/huggingface/trackio``); ``trackio show`` opens the dashboard.
- Weights & Biases (https://docs.wandb.ai): files under ``RUN_DIR/wandb``; its own environment variables choose
  the mode (``WANDB_MODE=offline`` writes only the folder, ``wandb sync`` uploads it later).
- TensorBoard: event files under ``RUN_DIR/tensorboard``, one scalar series per metric and the spec as text;
  ``tensorboard --logdir RUN_DIR/tensorboard``.

They are the ``trackers`` extra; one asked for but not installed fails in one line when the program starts
(:func:`check_installed`), not at the first metrics line.
"""

from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import yaml

from zmaj.extras import MissingExtraError, installed, message, needs

TrackerName = Literal["trackio", "wandb", "tensorboard"]

MODULES: dict[TrackerName, str] = {"trackio": "trackio", "wandb": "wandb", "tensorboard": "tensorboard"}
"""The package each tracker needs (TensorBoard's writer ships with torch but needs the ``tensorboard`` package)."""


@runtime_checkable  # beartype checks values annotated with a protocol by isinstance
class Tracker(Protocol):
    """One tracker, for one session of one run."""

    def start(self, name: str, run_dir: Path, config: dict[str, Any]) -> None: ...

    def begin(self, step: int) -> None:
        """This session goes on from loop step ``step``: what an earlier session logged past it is void."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


class Trackio:
    def __init__(self, project: str) -> None:
        self.project = project

    def start(self, name: str, run_dir: Path, config: dict[str, Any]) -> None:
        with needs("trackers", "train.trackers: trackio"):
            import trackio
        # No system metrics: the tracker shows what metrics.jsonl holds, nothing that differs from it.
        self.run = trackio.init(
            project=self.project,
            name=name,
            config=config,
            auto_log_cpu=False,
            auto_log_gpu=False,
            embed=False,
        )

    def begin(self, step: int) -> None:
        pass  # each session is a run of its own

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()  # type: ignore[no-untyped-call]


class Wandb:
    def __init__(self, project: str) -> None:
        self.project = project

    def start(self, name: str, run_dir: Path, config: dict[str, Any]) -> None:
        with needs("trackers", "train.trackers: wandb"):
            import wandb
        # console="off": the run folder's log.txt already keeps the log, and wandb's capture of stdout and
        # stderr would wrap the progress bar's stream.
        self.run = wandb.init(
            project=self.project,
            name=name,
            dir=run_dir,
            config=config,
            settings=wandb.Settings(console="off"),
        )

    def begin(self, step: int) -> None:
        pass  # each session is a run of its own

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


class TensorBoard:
    """One folder is one TensorBoard run, whatever the sessions. A resumed session first rewrites the earlier
    event files without what they hold past its first step (the steps it takes again), as ``metrics.jsonl``
    drops their lines. Not TensorBoard's ``purge_step``: its default (Rust) loader ignores the session-start
    event that marks the purge, and showed both sessions' points at those steps."""

    FOLDER = "tensorboard"

    def start(self, name: str, run_dir: Path, config: dict[str, Any]) -> None:
        with needs("trackers", "train.trackers: tensorboard"):
            from torch.utils.tensorboard import SummaryWriter
        self.folder, self.config, self.make = run_dir / self.FOLDER, config, SummaryWriter

    def begin(self, step: int) -> None:
        if self.folder.is_dir():
            drop_events_after(self.folder, step)
        self.writer = self.make(self.folder)
        # At the session's first step: a resume's --set may have changed the spec. Four spaces: TensorBoard
        # renders text as Markdown, and this keeps the YAML a code block.
        spec = yaml.safe_dump(self.config, sort_keys=False)
        self.writer.add_text("spec", "".join(f"    {line}\n" for line in spec.splitlines()), step)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        if hasattr(self, "writer"):  # a session that ended before its loop began has none
            self.writer.close()


def drop_events_after(folder: Path, step: int) -> None:
    """Rewrite each event file of ``folder`` that holds events past ``step`` without them. The new file is
    complete before the old one goes: a crash between leaves both, whose points up to ``step`` are the same."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from torch.utils.tensorboard.writer import FileWriter

    for path in sorted(folder.glob("events.out.tfevents.*")):
        events = [Event.FromString(raw) for raw in RawEventFileLoader(str(path)).Load()]
        if all(event.step <= step for event in events):
            continue
        writer = FileWriter(str(folder), filename_suffix=".kept")  # writes its own file_version event
        for event in events:
            if event.step <= step and not event.HasField("file_version"):
                writer.add_event(event)
        writer.close()
        path.unlink()


def check_installed(names: list[TrackerName]) -> None:
    """Fail in one line naming the extra when a tracker in ``names`` is not installed (checked without importing
    them: wandb alone takes seconds)."""
    for name in names:
        if not installed(MODULES[name]):
            raise MissingExtraError(
                f"{message('trackers', f'train.trackers: {name}')} ({MODULES[name]} is not installed)"
            )


def make(names: list[TrackerName], project: str) -> list[Tracker]:
    """Unstarted trackers for ``names``."""
    made: dict[TrackerName, Tracker] = {
        "trackio": Trackio(project),
        "wandb": Wandb(project),
        "tensorboard": TensorBoard(),
    }
    return [made[name] for name in names]


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """A metrics line as a tracker takes it: its step, and its numbers but the step (``final: true``, the mark of
    the end-of-run evaluation, is a flag, not a metric)."""
    numbers = {
        key: float(value)
        for key, value in record.items()
        if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
    }
    return int(record["step"]), numbers
