"""programs/pretrain.py with every tracker: each holds what the run's ``metrics.jsonl`` holds (loss, learning
rate, gradient norm, throughput, evaluations) and the spec; a tracker that is not installed stops the program at
its start in one line. The readers are the unit tests' (tests/unit/train/test_trackers.py)."""

import sys
from pathlib import Path

import pytest

from tests.integration.programs import run_program
from tests.integration.test_pretrain_program import tiny_spec
from tests.unit.train.test_trackers import (
    assert_same_series,
    jsonl_series,
    spec_of,
    tensorboard_series,
    trackio_series,
    wandb_series,
)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    train = {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 100}
    return tiny_spec(tmp_path, train)


@pytest.mark.slow
def test_pretrain_logs_its_metrics_and_spec_to_every_tracker(spec: Path, tmp_path: Path) -> None:
    project = f"zmaj-test-{tmp_path.name}"
    run_dir = tmp_path / "tracked-run"
    result = run_program(
        "pretrain.py",
        spec,
        "--run-dir",
        run_dir,
        "--cache-dir",
        tmp_path / "cache",
        "--set",
        "train.trackers=[trackio, wandb, tensorboard]",
        "--set",
        f"train.tracker_project={project}",
    )
    assert result.returncode == 0, result.stderr
    expected = jsonl_series(run_dir)
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "val_loss", "val_bpb"} <= set(expected)
    spec_dict = spec_of(run_dir)

    series, text = tensorboard_series(run_dir)
    assert_same_series(series, expected, rel=1e-6)  # float32
    assert text == spec_dict

    series, config = trackio_series(project, run_dir.name, expected)
    assert series == expected
    assert {key: config[key] for key in spec_dict} == spec_dict

    series, config = wandb_series(run_dir)
    assert series == expected
    assert {key: config[key] for key in spec_dict} == spec_dict


def test_a_tracker_that_is_not_installed_exits_2_at_the_start_naming_the_extra(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        sys.modules, "trackio", None
    )  # what a missing package looks like to the import system
    result = run_program(
        "pretrain.py", spec, "--run-dir", tmp_path / "run", "--set", "train.trackers=[tensorboard, trackio]"
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ERROR | train.trackers: trackio needs the 'trackers' extra: pip install 'zmaj[trackers]' "
        "(trackio is not installed)"
    ]
    assert not (tmp_path / "run").exists()  # nothing was started
