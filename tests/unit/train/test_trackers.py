"""Experiment trackers on the loop's stand-in step: what each tracker stored, read back with the tracker's own
reader, equals ``metrics.jsonl`` line for line; a tracker that is not installed fails in one line at the start.

The conftest points trackio at a temporary ``TRACKIO_DIR`` and puts wandb offline.
"""

import json
import struct
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tensordict import TensorDict

from tests.unit.train.test_loop import ADAMW, Spec, fresh, logged, open_run, stand_in
from zmaj.extras import MissingExtraError
from zmaj.specfile import SpecError
from zmaj.train import loop, runs, trackers
from zmaj.train.spec import LoopConfig, parse

Series = dict[str, list[tuple[int, float]]]
"""Each metric's ``(step, value)`` pairs, in the order they were logged."""


class KilledError(Exception):
    """What a kill at a step looks like to the test: the session ends there."""


def train_with(
    run_dir: Path,
    names: list[str],
    project: str = "zmaj",
    resume: bool = False,
    killed_at: int | None = None,
    offset: float = 0.0,
) -> None:
    """A 10-step run on the stand-in step with evaluations (at steps 0, 5 and 10) and checkpoints every 2 steps,
    tracked by ``names``; ``killed_at`` ends the session as a kill there would, its step's line unwritten."""

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float | int]:
        return {"score": float(state["params", "w"][0]) + 0.25 + offset}

    def losses(step: int) -> tuple[float, float]:
        if step == killed_at:
            raise KilledError
        return 1.0 / step + offset, 2.0 + step

    with open_run(run_dir, resume, trackers=names, tracker_project=project) as run:
        loop.train(run, run.restore(fresh, ADAMW), stand_in(losses), lambda i: i, evaluate=evaluate)


def jsonl_series(run_dir: Path) -> Series:
    """What ``metrics.jsonl`` holds, as a tracker is given it (its numbers but the step and the final flag)."""
    series: Series = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        at, numbers = trackers.scalars(json.loads(line))
        for key, value in numbers.items():
            series.setdefault(key, []).append((at, value))
    return series


def spec_of(run_dir: Path) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((run_dir / "spec.yaml").read_text())
    return spec


def tensorboard_series(run_dir: Path) -> tuple[Series, dict[str, Any]]:
    """The scalars and the spec text of the run's TensorBoard event files, read by TensorBoard's own reader
    (values as it stores them, float32)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    series = {key: [(e.step, e.value) for e in events.Scalars(key)] for key in events.Tags()["scalars"]}
    *_, text = events.Tensors("spec/text_summary")  # each session's, at its first step: the last one's
    return series, yaml.safe_load(text.tensor_proto.string_val[0].decode())


def tensorboard_events(run_dir: Path) -> Series:
    """Every scalar the run's event files hold, file by file as written: what any TensorBoard loader may show.
    The Python reader above applies purge events and drops out-of-order steps; TensorBoard's default (Rust)
    loader does neither."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    series: Series = {}
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {key: sorted(pairs) for key, pairs in series.items()}


def trackio_series(project: str, run: str, keys: Iterable[str]) -> tuple[Series, dict[str, Any]]:
    """The metrics ``keys`` and the config of trackio's run ``run``, read by trackio's storage (the project's
    SQLite file under ``TRACKIO_DIR``)."""
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs(project) == [run]
    series: Series = {}
    for log in SQLiteStorage.get_logs(project, run):
        for key in keys:
            if key in log:
                series.setdefault(key, []).append((log["step"], log[key]))
    (config,) = SQLiteStorage.get_all_run_configs(project).values()  # keyed by trackio's run id
    return series, config


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a wandb transaction log (``run-ID.wandb``): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks, each ``crc32 u32, length u16, kind u8`` then the bytes; kind 1 is a whole record,
    2-4 its first, middle and last pieces), each record a ``wandb_internal.proto`` ``Record``."""
    from wandb.proto.wandb_internal_pb2 import Record  # type: ignore[attr-defined]

    data, block, position, pieces = path.read_bytes(), 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or kind == 0:  # the zero padding at a block's end
            position += left
            continue
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_series(run_dir: Path) -> tuple[Series, dict[str, Any]]:
    """The history and config of the one offline wandb run in the run folder.

    wandb's service process writes the log: read right after ``run.finish``, it once held no history (CI,
    under load). ``wandb.teardown`` waits for that process to exit, as a program's exit does, before the log
    is read."""
    import wandb

    wandb.teardown()
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    series: Series = {}
    config: dict[str, Any] = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                (key,) = item.nested_key
                if not key.startswith("_"):  # wandb's own: _step, _runtime, _timestamp
                    series.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return series, config


def assert_same_series(stored: Series, expected: Series, rel: float = 0.0) -> None:
    assert set(stored) == set(expected)
    for key, pairs in expected.items():
        assert [step for step, _ in stored[key]] == [step for step, _ in pairs], key
        assert [value for _, value in stored[key]] == pytest.approx([value for _, value in pairs], rel=rel), (
            key
        )


def test_scalars_are_the_numbers_of_a_line_but_its_step_and_final_flag() -> None:
    line = {"step": 7, "loss": 0.5, "tokens": 64, "final": True, "wall_s": 1.5}
    assert trackers.scalars(line) == (7, {"loss": 0.5, "tokens": 64.0, "wall_s": 1.5})


def test_tensorboard_holds_every_metrics_line_and_the_spec(tmp_path: Path) -> None:
    train_with(tmp_path / "run", ["tensorboard"])
    series, spec = tensorboard_series(tmp_path / "run")
    assert_same_series(series, jsonl_series(tmp_path / "run"), rel=1e-6)  # float32
    assert spec == spec_of(tmp_path / "run")


def test_tensorboard_forgets_the_steps_a_resume_takes_again_as_metrics_jsonl_does(tmp_path: Path) -> None:
    """Killed at step 8, the run's last checkpoint is step 6: the resumed session takes step 7 again (with other
    values here) and TensorBoard shows it once, the new values, as ``metrics.jsonl`` does. Event files of both
    sessions are in the folder (one TensorBoard run): both step 7s were shown, and with a purge step still by
    TensorBoard's default loader, which ignores it. Each session's spec is shown at its first step."""
    with pytest.raises(KilledError):
        train_with(tmp_path / "run", ["tensorboard"], killed_at=8)
    train_with(tmp_path / "run", ["tensorboard"], resume=True, offset=0.5)
    series, _ = tensorboard_series(tmp_path / "run")
    expected = jsonl_series(tmp_path / "run")
    assert [step for step, _ in expected["loss"]] == list(range(1, 11))
    assert dict(expected["loss"])[7] == pytest.approx(1 / 7 + 0.5)
    assert_same_series(series, expected, rel=1e-6)
    assert_same_series(tensorboard_events(tmp_path / "run"), expected, rel=1e-6)
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [text.step for text in events.Tensors("spec/text_summary")] == [0, 6]


def test_a_run_started_afresh_in_a_dead_runs_folder_shows_none_of_its_curves(tmp_path: Path) -> None:
    with pytest.raises(KilledError):  # before its first checkpoint (step 2)
        train_with(tmp_path / "run", ["tensorboard"], killed_at=2)
    train_with(tmp_path / "run", ["tensorboard"], offset=0.5)
    series, _ = tensorboard_series(tmp_path / "run")
    assert_same_series(series, jsonl_series(tmp_path / "run"), rel=1e-6)
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1


def test_a_tracker_that_cannot_start_ends_the_session_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """wandb installed but not logged in: its error, one line naming the tracker, exit 1, the folder released."""

    def refuse(self: trackers.TensorBoard, name: str, run_dir: Path, config: dict[str, Any]) -> None:
        raise ValueError("No API key configured.\nUse `wandb login` to log in.")

    monkeypatch.setattr(trackers.TensorBoard, "start", refuse)
    with logged() as errors, pytest.raises(SystemExit) as exited:
        train_with(tmp_path / "run", ["tensorboard"])
    assert exited.value.code == 1
    assert errors == [
        "train.trackers: tensorboard could not start: No API key configured.; Use `wandb login` to log in."
    ]
    runs.lock(tmp_path / "run").close()
    assert json.loads((tmp_path / "run" / "run.jsonl").read_text().splitlines()[-1])["event"] == "end"


def test_trackio_holds_every_metrics_line_and_the_spec_named_after_the_run_folder(tmp_path: Path) -> None:
    project = f"zmaj-test-{tmp_path.name}"  # one project per test: TRACKIO_DIR is shared by the session
    train_with(tmp_path / "run-a", ["trackio"], project)
    expected = jsonl_series(tmp_path / "run-a")
    series, config = trackio_series(project, "run-a", expected)
    assert series == expected
    spec = spec_of(tmp_path / "run-a")
    assert {key: config[key] for key in spec} == spec


def test_wandb_offline_writes_its_run_folder_with_every_metrics_line_and_the_spec(tmp_path: Path) -> None:
    train_with(tmp_path / "run", ["wandb"])
    series, config = wandb_series(tmp_path / "run")
    assert series == jsonl_series(tmp_path / "run")
    spec = spec_of(tmp_path / "run")
    assert {key: config[key] for key in spec} == spec


def test_a_tracker_that_is_not_installed_fails_in_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what a missing package looks like to the import system
    with pytest.raises(MissingExtraError) as raised:
        runs.join(LoopConfig(steps=1, trackers=["tensorboard", "wandb"]))
    assert str(raised.value) == (
        "train.trackers: wandb needs the 'trackers' extra: pip install 'zmaj[trackers]' (wandb is not installed)"
    )
    # A tracker run without the check (a program that skips join) says the same at its start.
    with pytest.raises(MissingExtraError, match=r"pip install 'zmaj\[trackers\]'"):
        train_with(tmp_path / "run", ["wandb"])
    runs.lock(tmp_path / "run").close()  # the failed start released the run folder
    assert json.loads((tmp_path / "run" / "run.jsonl").read_text().splitlines()[-1])["event"] == "end"


@pytest.mark.parametrize(
    ("trackers_", "message"),
    [
        (["tensorboard", "tensorboard"], "train.trackers: each tracker once"),
        (["mlflow"], "train.trackers.0: Input should be 'trackio', 'wandb' or 'tensorboard'"),
    ],
)
def test_the_spec_refuses_a_repeated_or_unknown_tracker(trackers_: list[str], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse(Spec, {"train": {"steps": 1, "trackers": trackers_}}, "spec.yaml")
