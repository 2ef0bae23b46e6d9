"""What a run leaves for people (``zmaj.train.report``): the metrics file read and cut back as its docstrings
promise, the session record's clock, the curves' panels, and the FLOP counts MFU is computed from."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure

from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig
from zmaj.train import report


def write_lines(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_a_cut_short_last_line_goes_even_with_no_record_past_the_step(tmp_path: Path) -> None:
    """A run killed while appending leaves half a line; cut back to a step every whole line is at or before, the
    file must still lose it, or the resumed run's first record runs into it and no reader parses the file again.
    A cut-short line is no record, so none is counted as dropped."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert report.drop_records_after(path, 2) == 0
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_periodic_evaluation_is_not_the_final_one(tmp_path: Path) -> None:
    """The loop asks whether the final evaluation at the last step was recorded before it runs it again: a run
    killed after the periodic evaluation of that step but before the final one would skip its final evaluation
    (and a model card would miss its end-of-run scores)."""
    path = write_lines(
        tmp_path / "metrics.jsonl",
        [{"step": 10, "lr": 0.1, "loss": 1.0}, {"step": 10, "loss": 0.9}],
    )
    assert report.has_evaluation(path, 10, final=False)
    assert not report.has_evaluation(path, 10, final=True)
    write_lines(path, [{"step": 10, "lr": 0.1, "loss": 1.0}, {"step": 10, "loss": 0.8, "final": True}])
    assert report.has_evaluation(path, 10, final=True)
    assert not report.has_evaluation(path, 10, final=False)


def test_a_run_continued_past_its_final_line_is_still_finished(tmp_path: Path) -> None:
    """The docstring's promise: a run that ran to its end once stays finished when it was continued since
    (``--set train.steps`` raised and resumed); reading the last line alone called it unfinished."""
    path = write_lines(
        tmp_path / "metrics.jsonl",
        [
            {"step": 10, "lr": 0.1, "loss": 1.0},
            {"step": 10, "final": True},
            {"step": 11, "lr": 0.1, "loss": 0.9},
        ],
    )
    assert report.finished(path)
    write_lines(path, [{"step": 10, "lr": 0.1, "loss": 1.0}, {"step": 10, "loss": 0.9}])
    assert not report.finished(path)


def test_a_blank_line_is_skipped_and_a_step_that_is_no_number_is_refused_by_line(tmp_path: Path) -> None:
    """A blank line (an editor's, a copy's) is no damage: without skipping it every reader of the file failed.
    A step written as a string ("3") is: read as a record, it would be compared with numbers later and fail far
    from the file (or sort as text); it is refused naming ``file:line``."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n')
    assert report.read_records(path, report.METRIC) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": "3"}\n')
    with pytest.raises(
        ValueError, match=r"metrics\.jsonl:1: damaged, not a record \(a JSON object with step\)"
    ):
        report.read_records(path, report.METRIC)


def test_a_session_is_recorded_at_wall_clock_time(tmp_path: Path) -> None:
    """A model card prints when a run trained from ``run.jsonl``'s times: a monotonic clock's seconds since boot
    would date every run to January 1970."""
    before = time.time()
    report.record_session(tmp_path, "start", torch.device("cpu"), "float32")
    after = time.time()
    (record,) = report.read_records(tmp_path / report.RUN_FILE, report.SESSION)
    assert before <= record["time"] <= after


def test_a_metric_no_record_holds_gets_no_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fine-tune has no ``bpb``, a run without evaluations no held-out loss: each would be an empty panel."""
    figures: list[Figure] = []
    close = plt.close

    def keep(fig: Figure) -> None:
        figures.append(fig)
        close(fig)

    monkeypatch.setattr(plt, "close", keep)
    metrics = write_lines(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "score": 0.5}])
    panels = [("loss", "training loss"), ("bpb", "bits per byte"), ("score", "score")]
    report.plot_curves(metrics, tmp_path / "curves.png", panels)
    (figure,) = figures
    assert [ax.get_title() for ax in figure.axes] == ["training loss", "score"]


def test_a_metrics_file_no_panel_can_show_draws_nothing(tmp_path: Path) -> None:
    """A run stopped before its first record (an empty metrics.jsonl) has no curve to draw: no PNG, and no
    ``plt.subplots(1, 0)`` error ending the run that only wanted to save its checkpoint."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    report.plot_curves(metrics, tmp_path / "curves.png", [("loss", "training loss")])
    assert not (tmp_path / "curves.png").exists()


def matmul_params(config: GPTConfig) -> int:
    """The weights that multiply activations, counted from the parameters ``gpt.init`` makes: each block's
    attention and MLP matrices and the unembedding (the embedding table itself when tied); biases, norms and
    position tables are no matmul."""
    params = gpt.init(config, 0, device="meta")
    blocks = params["blocks"]
    matrices = [blocks["attn", name, "weight"] for name in ("q", "k", "v", "o")]
    matrices += [blocks["mlp", name, "weight"] for name in ("up", "down")]
    unembedding = params["embed", "weight"] if config.tie_embeddings else params["unembed", "weight"]
    return sum(m.numel() for m in matrices) + unembedding.numel()


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        # d=16, L=3, ff=40, V=100, S=7: 6 * (3 * (4*256 + 2*16*40) + 100*16) + 12 * 3 * 16 * 7
        ({"d_ff": 40}, 6 * (3 * 2304 + 1600) + 4032),
        # ff = 4 d = 64 when unset
        ({}, 6 * (3 * 3072 + 1600) + 4032),
        # An untied unembedding is the same matmul; value embeddings and skips are lookups and scalars.
        (
            {"d_ff": 40, "tie_embeddings": False, "value_embeds": 1, "unet_skips": True, "bias": False},
            6 * (3 * 2304 + 1600) + 4032,
        ),
    ],
)
def test_flops_per_token_is_the_palm_closed_form(update: dict[str, Any], expected: int) -> None:
    """MFU divides measured throughput by these FLOPs: a wrong count (attention projections, the unembedding or
    the attention scores left out or halved) reports a utilisation that is off by that much. It is 6 N + 12 L d
    S, with N the matrices ``gpt.init`` actually builds."""
    config = GPTConfig.model_validate(
        {"vocab_size": 100, "context": 8, "d_model": 16, "n_layers": 3, "n_heads": 2, **update}
    )
    assert report.gpt_flops_per_token(config, 7) == expected
    assert report.gpt_flops_per_token(config, 7) == 6 * matmul_params(config) + 12 * 3 * 16 * 7


def test_the_matmul_peak_is_two_n_cubed_over_the_fastest_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """An n x n matmul is n^3 multiply-adds, 2 n^3 FLOPs; the ceiling is the fastest run's (the warm-up's too,
    which a cold start never is), not the first's or the last's. Counted as n^3, every MFU read twice too high."""
    durations = iter([0.9, 0.7, 0.25, 0.5, 0.6, 0.8])  # the warm-up and 5 repeats, each start then end

    def ticks() -> Iterator[float]:
        now = 0.0
        for duration in durations:
            yield now
            now += duration
            yield now

    clock = ticks()
    # A stand-in for report's ``time`` alone: the process's own clock stays as it is.
    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    peak = report.measure_matmul_peak(torch.float32, torch.device("cpu"), n=64, repeats=5)
    assert peak == pytest.approx(2 * 64**3 / 0.25 / 1e9)
