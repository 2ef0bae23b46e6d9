"""Experiment trackers on the loop's stand-in step: what each tracker stored, read back with the tracker's own
reader, equals ``metrics.jsonl`` line for line; a tracker that is not installed fails in one line at the start.

The conftest points trackio at a temporary ``TRACKIO_DIR`` and puts wandb offline.
"""

import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tensordict import TensorDict

from tests.unit.train.test_loop import Spec, fresh, open_run, stand_in
from zmaj.extras import MissingExtraError
from zmaj.train import loop, runs, trackers
from zmaj.train.spec import LoopConfig, SpecError, parse

Series = dict[str, list[tuple[int, float]]]


def train_with(run_dir: Path, names: list[str], project: str = "zmaj") -> Series:
    """A 10-step run with evaluations (at steps 0, 5 and 10), tracked by ``names``; each metric's ``(step, value)`` series as
    ``metrics.jsonl`` holds it."""

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float | int]:
        return {"score": float(state["params", "w"][0]) + 0.25}

    with open_run(run_dir, trackers=names, tracker_project=project) as run:
        step = stand_in(lambda step: (1.0 / step, 2.0 + step))
        loop.train(run, run.restore(fresh()), step, lambda i: i, evaluate=evaluate)
    series: Series = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        at, numbers = trackers.scalars(json.loads(line))
        for key, value in numbers.items():
            series.setdefault(key, []).append((at, value))
    return series


def test_scalars_are_the_numbers_of_a_line_but_its_step_and_final_flag() -> None:
    line = {"step": 7, "loss": 0.5, "tokens": 64, "final": True, "wall_s": 1.5}
    assert trackers.scalars(line) == (7, {"loss": 0.5, "tokens": 64.0, "wall_s": 1.5})


def test_tensorboard_holds_every_metrics_line_and_the_spec(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = train_with(tmp_path / "run", ["tensorboard"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, series in expected.items():
        stored = [(event.step, event.value) for event in events.Scalars(key)]
        assert [step for step, _ in stored] == [step for step, _ in series], key
        # TensorBoard stores float32.
        assert [value for _, value in stored] == pytest.approx([value for _, value in series], rel=1e-6), key
    (text,) = events.Tensors("spec/text_summary")
    spec = yaml.safe_load(text.tensor_proto.string_val[0].decode())
    assert spec == yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())


def test_trackio_holds_every_metrics_line_and_the_spec_named_after_the_run_folder(tmp_path: Path) -> None:
    from trackio.sqlite_storage import SQLiteStorage

    project = f"zmaj-test-{tmp_path.name}"  # one project per test: TRACKIO_DIR is shared by the session
    expected = train_with(tmp_path / "run-a", ["trackio"], project)
    logs = SQLiteStorage.get_logs(project, "run-a")
    stored: Series = {}
    for log in logs:
        for key in expected:
            if key in log:
                stored.setdefault(key, []).append((log["step"], log[key]))
    assert stored == expected
    assert SQLiteStorage.get_runs(project) == ["run-a"]
    (config,) = SQLiteStorage.get_all_run_configs(project).values()  # keyed by trackio's run id
    spec = yaml.safe_load((tmp_path / "run-a" / "spec.yaml").read_text())
    assert {key: config[key] for key in spec} == spec


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a wandb transaction log (``run-ID.wandb``): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks, each ``crc32 u32, length u16, kind u8`` then the bytes; kind 1 is a whole record,
    2-4 its first, middle and last pieces), each record a ``wandb_internal.proto`` ``Record``."""
    from wandb.proto.wandb_internal_pb2 import Record

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


def test_wandb_offline_writes_its_run_folder_with_every_metrics_line_and_the_spec(tmp_path: Path) -> None:
    expected = train_with(tmp_path / "run", ["wandb"])
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log,) = folder.glob("run-*.wandb")
    stored: Series = {}
    config = {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                if not item.nested_key[0].startswith("_"):  # wandb's own: _step, _runtime, _timestamp
                    stored.setdefault(item.nested_key[0], []).append(
                        (record.history.step.num, json.loads(item.value_json))
                    )
    assert stored == expected
    spec = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
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
