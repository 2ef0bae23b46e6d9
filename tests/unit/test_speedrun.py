"""The speedrun benchmark's bookkeeping (``benchmarks/speedrun.py``): which overrides each row trains with, and
how its table reads the curves. The runs themselves are hand-run measurements (README); what turns them into
the README's table is logic, tested here against hand-worked values."""

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def speedrun() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCHMARKS))  # the benchmarks import their shared ``common`` as a top-level module
    try:
        yield importlib.import_module("speedrun")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_row_is_a_spec_the_program_accepts_and_kept_rows_accumulate(speedrun: ModuleType) -> None:
    planned = speedrun.plan(speedrun.ROWS)
    assert [p.refused for p in planned] == [None] * len(speedrun.ROWS)
    chain: list[str] = []
    for p in planned:
        assert p.overrides == chain + list(p.row.overrides)  # a row trains with every kept row before it
        if p.row.kept:
            chain = p.overrides
    dropped = [o for p in planned if not p.row.kept for o in p.row.overrides]
    assert dropped  # ReLU² and the untied unembedding were tried and left out
    assert not set(dropped) & set(planned[-1].overrides)


def test_a_row_the_spec_refuses_is_skipped_and_the_rows_after_it_go_on_without_it(
    speedrun: ModuleType,
) -> None:
    row = speedrun.Row
    rows = [
        row("base", "-"),
        row("qk", "-", ("model.qk_norm=true",)),
        row("bad", "-", ("model.no_such_field=1",)),
        row("rope", "-", ("model.positions=rope",)),
    ]
    planned = speedrun.plan(rows)
    assert planned[2].refused is not None
    assert "no_such_field" in planned[2].refused
    assert planned[2].overrides == ["model.qk_norm=true"]
    assert planned[3].overrides == ["model.qk_norm=true", "model.positions=rope"]


def test_one_row_is_the_default_run(speedrun: ModuleType) -> None:
    """README's speedrun table says which row ``stdlib-tiny.yaml`` is; a change to either must keep them one."""
    said = speedrun.against_default(speedrun.plan(speedrun.ROWS))
    assert said.startswith("- row ")
    assert "is `specs/pretrain/stdlib-tiny.yaml`, the default run" in said


def test_the_curve_is_read_linearly_between_evaluations(speedrun: ModuleType) -> None:
    curve = [(0.0, 4.0), (10.0, 3.0), (30.0, 2.0), (40.0, 1.5)]
    assert speedrun.bpb_at(curve, 5.0) == pytest.approx(3.5)
    assert speedrun.bpb_at(curve, 20.0) == pytest.approx(2.5)
    assert speedrun.bpb_at(curve, 99.0) == 1.5  # past the end: the final value
    assert speedrun.time_to(curve, 2.5) == pytest.approx(20.0)
    assert speedrun.time_to(curve, 3.0) == pytest.approx(10.0)
    assert speedrun.time_to(curve, 4.5) == 0.0  # already there at the start
    assert speedrun.time_to(curve, 1.0) is None  # never reached
    # Off the midpoints, where reading from the wrong end of an interval gives another value.
    assert speedrun.bpb_at(curve, 2.0) == pytest.approx(3.8)
    assert speedrun.time_to(curve, 3.8) == pytest.approx(2.0)
    assert speedrun.time_to([(0.0, 2.0), (10.0, 2.0)], 2.0) == 0.0  # a flat curve at the target: no 0 / 0


def test_a_runs_curve_counts_only_the_steps_own_seconds(speedrun: ModuleType, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        '{"step": 0, "val_bpb": 4.0}',
        '{"step": 1, "loss": 3.0, "seconds": 2.5}',
        '{"step": 2, "loss": 2.9, "seconds": 1.5}',
        '{"step": 2, "val_bpb": 3.2}',
    ]
    metrics.write_text("\n".join(lines) + "\n")
    result = speedrun.read_result(metrics, wall_s=60.0, tokens_per_step=2048)
    assert result.curve == [(0.0, 4.0), (4.0, 3.2)]
    assert (result.train_s, result.steps, result.final_bpb) == (4.0, 2, 3.2)


@pytest.mark.parametrize(
    ("faster_curve", "target"),
    [([(0.0, 3.5), (25.0, 2.0), (60.0, 1.6)], 2.0), ([(0.0, 3.5), (25.0, 1.9), (50.0, 1.8)], None)],
    ids=["target-bpb", "row-0-final"],
)
def test_the_speed_up_compares_each_rows_time_to_the_target_with_row_0s(
    speedrun: ModuleType, faster_curve: list[tuple[float, float]], target: float | None
) -> None:
    """Row 0's own speed-up is 1.00x, and a row reaching the target in half its time 2.00x: with
    ``--target-bpb``, which row 0 reaches before its run ends (not its training time over its time to the
    target), and with the default target, row 0's final bpb, which it reaches only at its last evaluation (a
    strict comparison there made it "never", which blanked every row's speed-up)."""
    planned = speedrun.plan(speedrun.ROWS)
    row0 = speedrun.Result(
        curve=[(0.0, 3.5), (50.0, 2.0), (100.0, 1.8)],
        train_s=100.0,
        wall_s=120.0,
        steps=450,
        tokens_per_step=2048,
    )
    faster = speedrun.Result(
        curve=faster_curve, train_s=faster_curve[-1][0], wall_s=80.0, steps=175, tokens_per_step=4096
    )
    target = row0.final_bpb if target is None else target
    table = speedrun.table([(planned[0], row0), (planned[1], faster)], budget=100.0, target=target)
    speed_ups = [line.rstrip(" |").rsplit("|", 1)[1].strip() for line in table.splitlines()[2:]]
    assert speed_ups == ["1.00x", "2.00x"]


def test_the_bpb_at_the_first_evaluation_is_the_first_bpb(speedrun: ModuleType) -> None:
    assert speedrun.bpb_at([(0.0, 4.0), (10.0, 3.0)], 0.0) == 4.0


def test_each_row_is_evaluated_about_evals_times(speedrun: ModuleType) -> None:
    """--evals 6 on row 0's steps: an evaluation every sixth of them, and no checkpoint inside the run."""
    from zmaj.train.spec import PretrainSpec, load

    spec = load(PretrainSpec, speedrun.OLD_DEFAULT)
    sets = speedrun.measurement_overrides(spec, evals=6, precision=None, quick=False)
    assert f"train.eval_every={spec.train.steps // 6}" in sets
    assert f"train.checkpoint_every={spec.train.steps + 1}" in sets
    # Every held-out row (the README's table is over all of them), and the spec's own precision.
    batches = next(int(s.split("=")[1]) for s in sets if s.startswith("train.eval_batches="))
    assert batches >= 10**6  # more than any held-out split has: all of them
    assert not any(s.startswith("train.precision") for s in sets)
    # More evaluations than steps: one every step, not every 0 (which the spec refuses).
    many = speedrun.measurement_overrides(spec, evals=10 * spec.train.steps, precision="fp32", quick=False)
    assert "train.eval_every=1" in many
    assert "train.precision=fp32" in many  # README's command for AVX2-only CPUs


def run_table(
    speedrun: ModuleType, curve: list[tuple[float, float]], budget: float, target: float
) -> list[dict[str, str]]:
    """The table of row 0 (2.0 bpb at 50 s, 1.8 at 100 s) and a row of ``curve``, as one dict per line."""
    planned = speedrun.plan(speedrun.ROWS)
    row0 = speedrun.Result([(0.0, 3.5), (50.0, 2.0), (100.0, 1.8)], 100.0, 120.0, 450, 2048)
    other = speedrun.Result(curve, curve[-1][0], 80.0, 175, 4096)
    lines = speedrun.table(
        [(planned[0], row0), (planned[1], other)], budget=budget, target=target
    ).splitlines()
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]
    ]


def test_the_bpb_at_the_budget_is_read_at_the_budget(speedrun: ModuleType) -> None:
    """ "bpb @ budget" is each row's held-out bpb at the same training time, not at its own end."""
    rows = run_table(speedrun, [(0.0, 3.5), (25.0, 2.0), (60.0, 1.6)], budget=50.0, target=2.0)
    assert [row["bpb @ budget"] for row in rows] == ["2.000", f"{2.0 - 0.4 * 25 / 35:.3f}"]


def test_a_row_at_the_target_from_the_start_has_no_speed_up(speedrun: ModuleType) -> None:
    """A time of 0 to the target is no ratio (it divided by zero)."""
    rows = run_table(speedrun, [(0.0, 1.9), (25.0, 1.7)], budget=50.0, target=2.0)
    assert (rows[1]["to target (s)"], rows[1]["speed-up"]) == ("0", "-")


def test_the_final_bpb_is_the_last_evaluations(speedrun: ModuleType) -> None:
    """Not the curve's best: a run that got worse at its end ends where it ends."""
    result = speedrun.Result([(0.0, 4.0), (10.0, 2.0), (20.0, 2.5)], 20.0, 30.0, 2, 1)
    assert result.final_bpb == 2.5
