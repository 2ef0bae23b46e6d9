"""The training loop on a stand-in step: what it saves, keeps, evaluates and refuses, independent of any model.

The step adds the learning rate to a parameter and reports a loss the test chooses, so every checkpoint's content
says which step wrote it, and a non-finite loss or gradient norm can be put at any step.
"""

import argparse
import errno
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import pytest
import torch
from loguru import logger
from matplotlib.figure import Figure
from pydantic import BaseModel
from tensordict import TensorDict
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from zmaj import checkpoint, fileio
from zmaj.models import gpt
from zmaj.specfile import SpecError
from zmaj.train import loop, optim, report, runs
from zmaj.train.loop import Metrics
from zmaj.train.pairs import PAIRS_FILE
from zmaj.train.parallel import Parallel
from zmaj.train.spec import LoopConfig
from zmaj.train.step import init_state

Losses = Callable[[int], tuple[float, float]]
"""``losses(step) -> (loss, grad_norm)`` of the 1-based step."""


class Spec(BaseModel):
    name: str = "loop"
    train: LoopConfig


def fresh(device: torch.device | None = None) -> TensorDict:
    """The stand-in model's parameters, as ``Run.restore`` takes them."""
    return TensorDict({"w": torch.zeros(4, device=device), "seen": torch.zeros((), device=device)})


ADAMW = optim.AdamWConfig()


def stand_in(losses: Losses) -> loop.Step[int]:
    def step(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        new = state.clone()
        new["params", "w"] += lr
        new["params", "seen"] = torch.tensor(float(batch))
        new["opt", "step"] += 1
        loss, grad_norm = losses(int(new["opt", "step"]))
        return new, {"loss": torch.tensor(loss), "grad_norm": torch.tensor(grad_norm)}

    return step


def open_run(
    run_dir: Path, resume: bool = False, stop_after: int | None = None, **train: object
) -> runs.Run[Spec]:
    spec = Spec(
        train=LoopConfig.model_validate({"steps": 10, "checkpoint_every": 2, "eval_every": 5, **train})
    )
    args = argparse.Namespace(resume=run_dir if resume else None, run_dir=run_dir, stop_after=stop_after)
    return runs.open_run(spec, args, Parallel(), frozen=FROZEN)


FROZEN = ("train.schedule",)
"""What the stand-in runs' resumes may not change, as a program's ``read_spec`` list."""


def train(run_dir: Path, losses: Losses = lambda step: (1.0 / step, 1.0), **kwargs: object) -> TensorDict:
    with open_run(run_dir, **kwargs) as run:  # type: ignore[arg-type]
        return loop.train(run, run.restore(fresh, ADAMW), stand_in(losses), lambda index: index)


@contextmanager
def logged(level: str = "ERROR") -> Iterator[list[str]]:
    """The messages logged at ``level`` or above while the block runs (the sink goes, however the block ends)."""
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level=level)
    try:
        yield messages
    finally:
        logger.remove(sink)


def counting(taken: list[int]) -> Losses:
    """The default losses, noting each step taken: a resume that trained from step 0 again would end in the
    same state (training is deterministic), but not take the same steps."""

    def losses(step: int) -> tuple[float, float]:
        taken.append(step)
        return 1.0 / step, 1.0

    return losses


def steps_on_disk(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))


def records(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_steps_to_the_end_reading_each_steps_batch_and_keeps_the_newest_checkpoints(
    tmp_path: Path,
) -> None:
    state = train(tmp_path / "run", keep_checkpoints=2)
    assert int(state["opt", "step"]) == 10
    assert float(state["params", "seen"]) == 9.0  # the last step read batch 9
    assert steps_on_disk(tmp_path / "run") == ["latest", "step-0000008", "step-0000010"]
    lines = [r for r in records(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in lines] == list(range(1, 11))
    assert all(r["seconds"] > 0 for r in lines)
    assert (tmp_path / "run" / "curves.png").is_file()


def test_a_frozen_field_edited_into_spec_yaml_by_hand_is_refused_on_resume(tmp_path: Path) -> None:
    """``read_spec`` compares ``--set`` with the run's ``spec.yaml``, not the file with the run: a frozen field
    edited into the file (a batch size, a sequence length) was taken, and the resumed steps read other rows (here
    the stand-in's frozen field is its schedule).
    The checkpoint records the spec it was trained with; a field that may change (``train.steps``) may."""
    train(tmp_path / "run", stop_after=4)
    with (
        logged() as errors,
        open_run(tmp_path / "run", resume=True, schedule={"kind": "constant"}) as run,
        pytest.raises(SystemExit) as exited,
    ):
        run.restore(fresh, ADAMW)
    assert exited.value.code == 2
    assert errors == [
        f"{tmp_path / 'run'}/checkpoints/step-0000004 was written with another train.schedule.kind than the "
        "run's spec.yaml says: a checkpoint of another run, or a spec.yaml edited since; put the run's own back"
    ]
    with open_run(tmp_path / "run", resume=True, steps=12) as run:
        assert int(run.restore(fresh, ADAMW)["opt", "step"]) == 4


def test_a_corpus_moved_and_named_there_in_spec_yaml_is_the_same_data(tmp_path: Path) -> None:
    """Where the data lies is ``data.json``'s to check (a fingerprint of the data itself): a resume after the
    corpus moved was refused as "written with another data.source.paths"; how it is packed still is not."""

    class DataSpec(BaseModel):
        data: dict[str, Any]

    source: dict[str, Any] = {"kind": "files", "paths": ["/old/corpus.txt"], "format": "text"}
    recorded: dict[str, Any] = {"source": source, "seq_len": 256}
    folder = tmp_path / "step-0000004"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"step": 4, "spec": {"data": recorded}}))
    moved = {**recorded, "source": {**source, "paths": ["/new/corpus.txt"]}}
    runs.check_written_by(folder, DataSpec(data=moved), ("data",))
    hub = {"kind": "hub", "path": "me/corpus", "data_files": "a/*.jsonl"}
    (folder / "state.json").write_text(json.dumps({"step": 4, "spec": {"data": {**recorded, "source": hub}}}))
    elsewhere = {**hub, "path": "/copies/corpus", "data_files": "b/*.jsonl"}
    runs.check_written_by(folder, DataSpec(data={**recorded, "source": elsewhere}), ("data",))
    with pytest.raises(ValueError, match=r"written with another data\.seq_len than the run's spec\.yaml"):
        runs.check_written_by(folder, DataSpec(data={**recorded, "source": hub, "seq_len": 128}), ("data",))


def test_the_records_are_on_disk_before_each_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint is fsynced; the metrics lines up to it were not, so a power cut could keep the checkpoint and
    lose its steps' lines, which a resume (dropping only lines past the checkpoint) never records again."""
    events: list[str] = []
    save = checkpoint.save
    monkeypatch.setattr(fileio, "fsync", lambda path: events.append(Path(path).name))

    def saving(run_dir: Path, state: TensorDict, meta: dict[str, object]) -> Path:
        events.append("save")
        return save(run_dir, state, meta)

    monkeypatch.setattr(checkpoint, "save", saving)
    train(tmp_path / "run", steps=4)
    saves = [i for i, event in enumerate(events) if event == "save"]
    assert len(saves) == 2  # steps 2 and 4
    for i in saves:
        assert events[i - 2 : i] == ["metrics.jsonl", "run.jsonl"]


def test_stop_after_then_resume_is_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = train(tmp_path / "straight")
    first = train(tmp_path / "split", stop_after=3)
    assert int(first["opt", "step"]) == 3
    assert checkpoint.latest(tmp_path / "split").name == "step-0000003"
    taken: list[int] = []
    resumed = train(tmp_path / "split", counting(taken), resume=True)
    assert (resumed == straight).all()
    assert taken == list(range(4, 11))


def test_a_resume_computing_in_another_type_than_the_checkpoint_says_so(tmp_path: Path) -> None:
    """``train.precision: auto`` is bf16 on one machine and fp32 on another (an AVX2-only CPU): a run resumed
    there goes on, in another type than it began, which the user is told. The same type says nothing."""
    train(tmp_path / "run", stop_after=3, precision="fp32")
    assert checkpoint.load_meta(checkpoint.latest(tmp_path / "run"))["precision"] == "float32"
    with logged("WARNING") as warnings:
        train(tmp_path / "run", resume=True, stop_after=3, precision="fp32")
    assert not [w for w in warnings if "computing in" in w]
    with logged("WARNING") as warnings:
        train(tmp_path / "run", resume=True, stop_after=3, precision="bf16")
    assert [w for w in warnings if "computing in" in w] == [
        f"{tmp_path / 'run' / 'checkpoints' / 'step-0000006'} was trained computing in float32, this session "
        "computes in bfloat16 (train.precision: bf16 on cpu): the run goes on, but not bit for bit as it would "
        "have where it began"
    ]
    assert checkpoint.load_meta(checkpoint.latest(tmp_path / "run"))["precision"] == "bfloat16"
    with logged("WARNING") as warnings:
        train(tmp_path / "run", resume=True, precision="fp32")
    assert [w.split(" was trained ")[1][:36] for w in warnings if "computing in" in w] == [
        "computing in bfloat16, this session "
    ]


def test_a_checkpoint_records_the_runs_seed_and_join_seeds_the_global_generators(tmp_path: Path) -> None:
    """``state.json``'s seed is the spec's (a checkpoint from before specs recorded it is read by it), and
    ``join`` seeds Python's, NumPy's and torch's generators from it, for libraries and a user's ``--import``
    module that draw from them."""
    train(tmp_path / "run", stop_after=2, seed=7)
    assert checkpoint.load_meta(checkpoint.latest(tmp_path / "run"))["seed"] == 7

    def joined(seed: int) -> tuple[float, float, list[float]]:
        runs.join(LoopConfig(steps=1, seed=seed))
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    first = joined(3)
    assert joined(3) == first  # the draws moved each generator on: the second join put them back
    assert all(a != b for a, b in zip(joined(4), first, strict=True))  # each generator follows the seed


def test_a_resume_under_other_code_than_the_checkpoints_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user pulls a newer zmaj (or edits it) mid-run: an old run's WSD decay length, SFT mask and corpus split
    changed under it without a word (an audit resumed runs of three older commits). The same code says nothing;
    other code, torch, or a checkpoint from before the fingerprint, is named."""
    train(tmp_path / "run", stop_after=3)
    meta = checkpoint.load_meta(checkpoint.latest(tmp_path / "run"))
    assert (meta["code"], meta["torch"]) == (runs.code_fingerprint(), torch.__version__)
    with logged("WARNING") as warnings:
        train(tmp_path / "run", resume=True, stop_after=3)
    assert not [w for w in warnings if "was written by" in w]
    monkeypatch.setattr(runs, "code_fingerprint", lambda: "0123456789abcdef")
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    with logged("WARNING") as warnings:
        train(tmp_path / "run", resume=True, stop_after=2)
    assert [w for w in warnings if "was written by" in w] == [
        f"{tmp_path / 'run' / 'checkpoints' / 'step-0000006'} was written by zmaj code {meta['code']} (this "
        f"session's: 0123456789abcdef) and torch {meta['torch']} (this session's: 9.9.9): the run goes on with "
        "this session's code, but where the change touches what a step computes (a schedule, a mask, a data "
        "split), not as it would have gone on unchanged"
    ]
    state = tmp_path / "run" / "checkpoints" / "step-0000008" / "state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "code"}))
    with logged("WARNING") as warnings:
        train(tmp_path / "run", resume=True, stop_after=1)
    assert [w.split(" was written by ")[1].split(":")[0] for w in warnings if "was written by" in w] == [
        "an older zmaj, which recorded no fingerprint of its code"
    ]


def test_the_source_fingerprint_follows_every_module_and_the_program_and_nothing_else(tmp_path: Path) -> None:
    package, program = tmp_path / "zmaj", tmp_path / "programs" / "pretrain.py"
    (package / "train").mkdir(parents=True)
    (package / "train" / "step.py").write_text("x = 1\n")
    (package / "models.py").write_text("y = 2\n")
    program.parent.mkdir()
    program.write_text("main()\n")
    before = runs.source_fingerprint([package, program])
    (package / "train" / "__pycache__").mkdir()
    (package / "train" / "__pycache__" / "step.pyc").write_bytes(b"\0")
    (package / "notes.txt").write_text("not code")
    (package / "train" / ".#step.py").symlink_to(
        "user@host.123:1733500000"
    )  # Emacs's lock: a link to nowhere
    (package / "train" / "._step.py").write_bytes(b"\0\5\26\7")  # macOS's metadata beside it on a share
    assert runs.source_fingerprint([package, program]) == before
    assert runs.source_fingerprint([package]) != before
    for change in [
        lambda: (package / "train" / "step.py").write_text("x = 2\n"),  # an edit
        lambda: (package / "train" / "step.py").rename(package / "train" / "steps.py"),  # a rename
        lambda: (package / "extra.py").write_text(""),  # a new module, empty
        lambda: program.write_text("main(fast=True)\n"),  # the program edited
    ]:
        change()
        after = runs.source_fingerprint([package, program])
        assert after != before
        before = after


def test_the_code_fingerprint_is_the_package_and_the_running_program() -> None:
    """(Asked afresh: a program run in this process, as the integration tests do, is ``__main__`` while it runs,
    and the fingerprint is that of whichever program opened a run first.)"""
    package = Path(runs.__file__).resolve().parents[1]
    program = Path(sys.modules["__main__"].__file__ or "")  # pytest's: a program is what __main__ runs
    assert (package / "train" / "runs.py").is_file()
    runs.code_fingerprint.cache_clear()
    assert runs.code_fingerprint() == runs.source_fingerprint([package, program])
    assert runs.code_fingerprint() not in {
        runs.source_fingerprint([package]),
        runs.source_fingerprint([program]),
    }


def test_a_run_records_the_code_it_opened_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull before the first checkpoint is not the run's code: the checkpoint records what ran its steps, so a
    resume under the pulled code warns."""
    on_disk = {"code": "opened"}
    monkeypatch.setattr(runs, "source_fingerprint", lambda roots: on_disk["code"])
    runs.code_fingerprint.cache_clear()

    def pulled_during_the_first_step(step: int) -> tuple[float, float]:
        on_disk["code"] = "pulled"
        return 1.0 / step, 1.0

    try:
        train(tmp_path / "run", pulled_during_the_first_step, stop_after=2)
    finally:
        runs.code_fingerprint.cache_clear()
    assert checkpoint.load_meta(checkpoint.latest(tmp_path / "run"))["code"] == "opened"


def test_a_resumed_run_records_each_step_once(tmp_path: Path) -> None:
    """A run killed after its last checkpoint recorded steps the resumed run takes again: those records go, and
    ``metrics.jsonl`` holds each step once, as the uninterrupted run's does (a model card sums its tokens)."""
    train(tmp_path / "straight")
    train(tmp_path / "split", stop_after=3)
    checkpoints = tmp_path / "split" / "checkpoints"
    shutil.rmtree(checkpoints / "step-0000003")  # as if killed after step 3 was recorded, before its save
    (checkpoints / "latest").write_text("step-0000002\n")
    taken: list[int] = []
    train(tmp_path / "split", counting(taken), resume=True)
    assert taken == list(range(3, 11))

    def records(run: Path) -> list[tuple[int, float | None]]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss")) for r in map(json.loads, lines)]

    assert records(tmp_path / "split") == records(tmp_path / "straight")


def test_a_resume_drops_a_cut_short_session_record_and_refuses_damaged_metrics_in_one_line(
    tmp_path: Path,
) -> None:
    """A session killed while it wrote its end record left the last line of ``run.jsonl`` cut short, and the
    next session's start ran into it: a line no export could read, ever after. That line goes now, as a cut-short
    metrics line does. A damaged metrics line stopped the resume with a JSONDecodeError or KeyError traceback:
    it is bad input, one line naming ``file:line`` and exit 2, and the file is left as it was."""
    run_dir = tmp_path / "run"
    train(run_dir, stop_after=3)
    sessions = run_dir / "run.jsonl"
    sessions.write_text(sessions.read_text()[:-20])  # killed in the middle of its end record
    train(run_dir, resume=True, stop_after=2)
    events = [json.loads(line)["event"] for line in sessions.read_text().splitlines()]
    assert events == ["start", "start", "end"]

    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    for text, problem in (
        (lines[0] + '{"step\n' + "".join(lines[1:]), "metrics.jsonl:2: not JSON"),
        ("".join(lines) + '{"loss": 1.0}\n', f"metrics.jsonl:{len(lines) + 1}: damaged, not a record"),
    ):
        metrics.write_text(text)
        with logged() as messages, pytest.raises(SystemExit) as stopped:
            train(run_dir, resume=True)
        assert stopped.value.code == 2
        assert len(messages) == 1
        assert f"{run_dir}/{problem}" in messages[0]
        assert metrics.read_text() == text


def test_curves_are_saved_whole_or_not_at_all_and_drawn_again_when_a_finished_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``curves.png`` was saved in place, so a kill while saving left a cut-short PNG, and a finished run resumed
    returned before drawing it: export then copied the broken plot into the model repository."""
    png = b"\x89PNG\r\n\x1a\n"

    def killed(figure: Figure, target: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(target, os.PathLike):
            Path(target).write_bytes(png + bytes(92))  # saved in place
        else:
            target.write(png + bytes(92))
        raise KeyboardInterrupt

    def run_loop(resume: bool = False) -> None:
        with open_run(tmp_path / "run", resume) as run:
            loop.train(
                run,
                run.restore(fresh, ADAMW),
                stand_in(lambda step: (1.0, 1.0)),
                lambda i: i,
                evaluate=lambda *_: {},
            )

    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        run_loop()
    assert not [p.name for p in (tmp_path / "run").iterdir() if "curves" in p.name]
    monkeypatch.undo()
    (tmp_path / "run" / "curves.png").write_bytes(png + bytes(92))  # as the in-place save left it
    run_loop(resume=True)
    curves = (tmp_path / "run" / "curves.png").read_bytes()
    assert curves.startswith(png)
    assert curves.endswith(b"IEND\xaeB`\x82")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "run" / "curves.png").stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain write's


def test_the_curves_end_with_the_final_evaluation_drawn_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop evaluates every ``eval_every`` steps before the last, and at the last the final evaluation, which
    the plot left out: every held-out curve stopped one ``eval_every`` short of the end (a fine-tune's accuracy
    at step 40 of 80), and one with no periodic point had nothing to draw."""
    drawn: list[tuple[Any, ...]] = []
    monkeypatch.setattr("matplotlib.axes.Axes.plot", lambda self, *args, **kwargs: drawn.append(args))
    monkeypatch.setattr("matplotlib.axes.Axes.legend", lambda self, *args, **kwargs: None)  # nothing drawn
    lines = [
        {"step": 0, "score": 0.5},
        {"step": 5, "loss": 1.0},
        {"step": 5, "score": 0.25},
        {"step": 10, "loss": 0.5},
        {"step": 10, "score": 0.125, "final": True},
        {"step": 10, "only_final": 3.0, "final": True},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = report.read_records(tmp_path / "metrics.jsonl", report.METRIC)
    assert report.curve_points(records, "score") == ([(0, 0.5), (5, 0.25)], [(10, 0.125)])
    assert report.curve_points(records, "loss") == ([(5, 1.0), (10, 0.5)], [])
    panels = [("loss", "loss"), ("score", "score"), ("only_final", "only final")]
    report.plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", panels)
    assert drawn == [
        ((5, 10), (1.0, 0.5), "o-"),
        ((0, 5), (0.5, 0.25), "o-"),
        ((10,), (0.125,), "*"),
        ((10,), (3.0,), "*"),
    ]
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_a_finished_run_resumed_does_nothing_and_one_past_its_steps_is_refused(tmp_path: Path) -> None:
    """Resumed where it finished, a run neither saves nor records a second final evaluation; killed during its
    final evaluation, it takes just that again. A resume's ``--set`` is written to ``spec.yaml`` (a plain
    ``--resume`` after an extension used to go back to the old ``train.steps``), and a checkpoint past
    ``train.steps`` is refused (it used to be evaluated as step ``train.steps``)."""
    evaluations: list[tuple[int, bool]] = []

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float | int]:
        evaluations.append((step, final))
        return {"score": float(step)}

    def run_loop(resume: bool = False, stop_after: int | None = None, **train: object) -> None:
        with open_run(tmp_path / "run", resume, stop_after, **train) as run:
            loop.train(
                run,
                run.restore(fresh, ADAMW),
                stand_in(lambda step: (1.0, 1.0)),
                lambda i: i,
                evaluate=evaluate,
            )

    def finals() -> list[float]:
        return [r["step"] for r in records(tmp_path / "run") if r.get("final")]

    run_loop()
    metrics, saved = (tmp_path / "run" / "metrics.jsonl").read_text(), steps_on_disk(tmp_path / "run")
    evaluations.clear()
    run_loop(resume=True)
    assert (evaluations, steps_on_disk(tmp_path / "run")) == ([], saved)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics

    lines = metrics.splitlines(keepends=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(lines[:-1]))  # killed in the final evaluation
    run_loop(resume=True)
    assert (evaluations, finals(), steps_on_disk(tmp_path / "run")) == ([(10, True)], [10], saved)

    run_loop(resume=True, steps=12, stop_after=1)
    assert "steps: 12" in (tmp_path / "run" / "spec.yaml").read_text()
    with pytest.raises(SystemExit) as stopped:
        run_loop(resume=True, steps=10)
    assert stopped.value.code == 1
    assert (finals(), steps_on_disk(tmp_path / "run")[-1]) == ([10], "step-0000011")
    assert "steps: 12" in (tmp_path / "run" / "spec.yaml").read_text()  # a refused resume changes nothing


def test_a_run_killed_before_its_first_latest_resumes_from_its_step_folder(tmp_path: Path) -> None:
    """A kill between renaming the first checkpoint into place and writing ``latest`` leaves a ``step-*`` folder
    and no ``latest``: ``--resume`` continues from the folder (``read_spec`` used to refuse it, and a new run
    in the folder is refused too, which left the run stuck)."""
    straight = train(tmp_path / "straight")
    train(tmp_path / "split", stop_after=3)
    (tmp_path / "split" / "checkpoints" / "latest").unlink()
    args = argparse.Namespace(resume=tmp_path / "split", spec=None, overrides=[])
    assert runs.read_spec(Spec, args, frozen=["train.steps"]).train.steps == 10
    taken: list[int] = []
    resumed = train(tmp_path / "split", counting(taken), resume=True)
    assert (resumed == straight).all()
    assert taken == list(range(4, 11))
    (tmp_path / "straight" / "checkpoints" / "latest").write_text("step-0000099\n")
    for folder in (tmp_path / "straight" / "checkpoints").glob("step-*"):
        shutil.rmtree(folder)
    args.resume = tmp_path / "straight"
    with pytest.raises(checkpoint.DamagedCheckpointError, match="it names 'step-0000099'"):
        runs.read_spec(Spec, args, frozen=[])
    shutil.rmtree(tmp_path / "straight" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        runs.read_spec(Spec, args, frozen=[])


def test_resume_refuses_a_spec_beside_it_and_a_new_run_a_folder_as_its_spec(tmp_path: Path) -> None:
    """``--resume`` goes on with the run's own ``spec.yaml``: a SPEC given too (another one, or one that does not
    exist) used to be ignored without a word, so its changes silently did not apply. A folder given as SPEC was
    reported as a spec file not found."""
    train(tmp_path / "run", stop_after=2)
    (tmp_path / "other.yaml").write_text((tmp_path / "run" / "spec.yaml").read_text())
    for spec in (tmp_path / "other.yaml", tmp_path / "nope.yaml"):
        args = argparse.Namespace(resume=tmp_path / "run", spec=spec, overrides=[])
        with pytest.raises(SpecError, match="give no SPEC, and change the run with --set"):
            runs.read_spec(Spec, args, frozen=[])
    args = argparse.Namespace(resume=None, spec=tmp_path, overrides=[])
    with pytest.raises(SpecError, match=f"SPEC {tmp_path} is a folder, not a YAML file"):
        runs.read_spec(Spec, args, frozen=[])
    # Without SPEC, a new run reads the program's default spec; --resume still takes none.
    args = runs.cli(None, tmp_path / "other.yaml").parse_args(["--set", "train.steps=3"])
    assert runs.read_spec(Spec, args, [], tmp_path / "other.yaml").train.steps == 3
    args = runs.cli(None, tmp_path / "other.yaml").parse_args(["--resume", str(tmp_path / "run")])
    assert runs.read_spec(Spec, args, [], tmp_path / "other.yaml").train.steps == 10


def test_resume_refuses_a_run_dir_and_names_the_frozen_field_that_changed(tmp_path: Path) -> None:
    """``--run-dir`` beside ``--resume`` was ignored: the run went on, and wrote, in the folder ``--resume``
    named. A frozen section's change was named by the section alone (``model differs``)."""
    train(tmp_path / "run", stop_after=2)
    parser = runs.cli(None)
    args = parser.parse_args(["--resume", str(tmp_path / "run"), "--run-dir", str(tmp_path / "fork")])
    with pytest.raises(SpecError, match=r"goes on in its own folder: give no --run-dir"):
        runs.read_spec(Spec, args, frozen=[])
    assert not (tmp_path / "fork").exists()
    args = parser.parse_args(["--resume", str(tmp_path / "run"), "--set", "train.eval_every=3"])
    with pytest.raises(
        SpecError, match=r": train\.eval_every differs from the run's; --set cannot change it$"
    ):
        runs.read_spec(Spec, args, frozen=["train"])
    assert runs.read_spec(Spec, args, frozen=["train.steps"]).train.eval_every == 3


@pytest.mark.parametrize(
    ("bad_step", "bad"),
    [(5, "loss"), (5, "grad_norm"), (4, "loss"), (10, "grad_norm"), (1, "loss"), (3, "loss")],
)
def test_a_non_finite_step_stops_the_run_and_nothing_resumes_from_its_state(
    tmp_path: Path, bad_step: int, bad: str
) -> None:
    def losses(step: int) -> tuple[float, float]:
        value = math.nan if step == bad_step else 1.0
        return (value, 1.0) if bad == "loss" else (1.0, math.inf if step == bad_step else 1.0)

    with logged() as messages, pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run", losses)
    assert stopped.value.code == 1
    assert len(messages) == 1
    aside = tmp_path / "run" / "checkpoints" / f"nonfinite-step-{bad_step:07d}"
    assert aside.is_dir()
    assert f"at step {bad_step}" in messages[0]
    assert str(aside) in messages[0]
    started_from = tmp_path / "run" / "checkpoints" / f"nonfinite_start-step-{bad_step - 1:07d}"
    assert started_from.is_dir() == (bad_step % 2 == 1 and bad_step > 1)  # checkpoints every 2 steps
    if bad_step <= 3:
        assert "no good checkpoint" in messages[0]
        return
    # The last checkpoint (every 2 steps) before the state the bad step started from: the loss of step 5 is
    # that of step 4's state, so resuming from step 4 would fail again (a bad step 4 or 10 saved nothing).
    good = f"step-{2 * ((bad_step - 2) // 2):07d}"
    assert checkpoint.latest(tmp_path / "run").name == good
    assert checkpoint.latest_intact(tmp_path / "run").name == good
    assert f"--resume {tmp_path / 'run'}" in messages[0]
    resumed = train(tmp_path / "run", resume=True)  # finite from here on
    assert int(resumed["opt", "step"]) == 10


@pytest.mark.parametrize(
    ("bad_step", "leaf", "checkpoint_every"),
    [
        (4, ("params", "w"), 2),
        (10, ("params", "w"), 2),  # the last step: the run ended with exit 0
        (4, ("opt", "m", "w"), 1),  # an optimizer moment: the square of a finite gradient can overflow
        (5, ("params", "w"), 100),  # no checkpoint due: the evaluation of step 5 would read it
    ],
)
def test_a_state_the_update_made_non_finite_is_never_saved_or_evaluated(
    tmp_path: Path, bad_step: int, leaf: tuple[str, ...], checkpoint_every: int
) -> None:
    """The loss and gradient norm a step reports are those of the state it started from, so an update that
    overflowed float32 (a learning rate of 1e39) went unseen: the run ended with exit 0 and a model of
    infinities as its ``latest``, or its evaluation failed with a traceback. The state the step started from
    was good, so ``latest`` stays where it was, even where that was the step before."""
    finite = stand_in(lambda step: (1.0, 1.0))
    evaluated: list[TensorDict] = []

    def step(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        new, metrics = finite(state, batch, lr=lr)
        if int(new["opt", "step"]) == bad_step:
            new[leaf][1] = math.inf
        return new, metrics

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float]:
        evaluated.append(state)
        return {"val_loss": 1.0}

    run_dir = tmp_path / "run"
    with (
        logged() as messages,
        pytest.raises(SystemExit) as stopped,
        open_run(run_dir, checkpoint_every=checkpoint_every, eval_every=5) as run,
    ):
        loop.train(run, run.restore(fresh, ADAMW), step, lambda index: index, evaluate=evaluate)
    assert stopped.value.code == 1
    assert len(messages) == 1
    aside = run_dir / "checkpoints" / f"nonfinite-step-{bad_step:07d}"
    assert messages[0].startswith(
        f"the update of step {bad_step} made the state non-finite ({'.'.join(leaf)}); that state is kept in "
        f"{aside}"
    )
    assert all(not checkpoint.non_finite_leaves(state) for state in evaluated)
    on_disk = steps_on_disk(run_dir)
    assert f"nonfinite-step-{bad_step:07d}" in on_disk
    assert not [name for name in on_disk if name.startswith("nonfinite_start")]
    if checkpoint_every < bad_step:
        last_good = bad_step - 1 if checkpoint_every == 1 else bad_step - 2
        assert checkpoint.latest(run_dir).name == f"step-{last_good:07d}"
    else:
        assert "no good checkpoint was saved before it" in messages[0]
    assert not report.finished(run_dir / "metrics.jsonl")


def test_a_state_saved_and_evaluated_at_one_step_is_checked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints and evaluations every 5 steps of 10: the state is read for finiteness at the first
    evaluation and at each save, not again by the evaluation of the same state (a read of the whole state and
    an agreement of the ranks each)."""
    read: list[int] = []
    non_finite_leaves = checkpoint.non_finite_leaves

    def counted(td: TensorDict) -> list[str]:
        read.append(int(td["opt", "step"]))
        return non_finite_leaves(td)

    monkeypatch.setattr(checkpoint, "non_finite_leaves", counted)
    with open_run(tmp_path / "run", checkpoint_every=5, eval_every=5) as run:
        loop.train(
            run,
            run.restore(fresh, ADAMW),
            stand_in(lambda step: (1.0, 1.0)),
            lambda i: i,
            evaluate=lambda state, step, final: {"val_loss": 1.0},
        )
    assert read == [0, 5, 10]


def test_a_resume_builds_no_fresh_state_and_hashes_its_checkpoint_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The template a checkpoint is read into is made on the meta device: a real one (random, then dropped)
    cost every rank the whole state's memory and its initialisation, 96 GB at 8B parameters. Its files are
    hashed once (they were twice: by ``latest_intact``, then by the read)."""
    made: list[torch.device | None] = []
    verified: list[Path] = []
    verify = checkpoint.verify

    def counted(path: Path, *files: Sequence[str]) -> None:
        verified.append(path)
        verify(path, *files)

    monkeypatch.setattr(checkpoint, "verify", counted)

    def recorded(device: torch.device | None) -> TensorDict:
        made.append(device)
        return fresh(device)

    straight = train(tmp_path / "straight")
    with open_run(tmp_path / "run") as run:
        loop.train(run, run.restore(recorded, ADAMW), stand_in(lambda step: (1.0 / step, 1.0)), lambda i: i)
    assert made == [None]
    made.clear()
    train(tmp_path / "split", stop_after=4)
    with open_run(tmp_path / "split", resume=True) as run:
        state = loop.train(
            run, run.restore(recorded, ADAMW), stand_in(lambda step: (1.0 / step, 1.0)), lambda i: i
        )
    assert made == [torch.device("meta")]
    assert verified == [tmp_path / "split" / "checkpoints" / "step-0000004"]
    assert (state == straight).all()


@pytest.mark.parametrize(
    ("leaf", "eval_every"),
    [
        (("params", "w"), 4),  # its step is an evaluation's: checked before the evaluation reads it
        (("opt", "m", "w"), 5),  # an infinite moment leaves the parameters finite (m / sqrt(inf) is 0)
    ],
)
def test_a_resumed_checkpoint_that_is_not_finite_is_set_aside_as_it_is(
    tmp_path: Path, leaf: tuple[str, ...], eval_every: int
) -> None:
    """A checkpoint saved before zmaj checked states may hold NaNs or infinities: the resume stops at once and
    moves it aside (not saved a second time), ``latest`` back to the one before. An infinite moment went unseen
    until the next save, which blamed a later update and kept ``latest`` on it: every resume failed again."""
    run_dir = tmp_path / "run"
    train(run_dir, stop_after=4)  # checkpoints at steps 2 and 4
    with open_run(run_dir, resume=True) as run:  # step 4 saved again, not finite, as an older zmaj would have
        state = checkpoint.load_state(checkpoint.latest(run_dir), init_state(fresh(), ADAMW))
        state[leaf][0] = math.inf
        checkpoint.save(run_dir, state, runs.describe_meta(run))
    evaluated: list[TensorDict] = []

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float]:
        evaluated.append(state)
        return {"val_loss": 1.0}

    with (
        logged() as messages,
        pytest.raises(SystemExit) as stopped,
        open_run(run_dir, resume=True, eval_every=eval_every) as run,
    ):
        loop.train(
            run, run.restore(fresh, ADAMW), stand_in(lambda step: (1.0, 1.0)), lambda i: i, evaluate=evaluate
        )
    assert stopped.value.code == 1
    assert evaluated == []
    assert messages == [
        f"the checkpoint of step 4 is not finite ({'.'.join(leaf)}); it is set aside as nonfinite-step-0000004 "
        f"for inspection; latest is step-0000002: --resume {run_dir} continues from there"
    ]
    assert steps_on_disk(run_dir) == ["latest", "nonfinite-step-0000004", "step-0000002"]
    train(run_dir, resume=True)  # from step 2, finite


def test_a_step_non_finite_again_after_the_resume_sets_its_start_aside_again(tmp_path: Path) -> None:
    """The resumed run saves step 4 again and fails at step 5 again: the second set-aside replaces the first
    (renaming onto it raised OSError, a traceback with ``latest`` already moved)."""

    def losses(step: int) -> tuple[float, float]:
        return (math.nan if step == 5 else 1.0, 1.0)

    with pytest.raises(SystemExit):
        train(tmp_path / "run", losses)
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run", losses, resume=True)
    assert stopped.value.code == 1
    assert checkpoint.latest(tmp_path / "run").name == "step-0000002"
    assert steps_on_disk(tmp_path / "run") == [
        "latest",
        "nonfinite-step-0000005",
        "nonfinite_start-step-0000004",
        "step-0000002",
    ]


@pytest.mark.parametrize("failing", ["save_aside", "set_aside_latest"])
def test_a_non_finite_state_the_disk_cannot_keep_stops_the_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """Setting the bad state aside fails (a full disk), in either of its moves: one line says both what went
    wrong at the step and what the write met. Rank 0 says it once every rank knows (under torchrun the others
    stopped in the broadcast of rank 0's message, with gloo's traceback)."""

    def full(*args: object) -> Path:
        raise checkpoint.CheckpointWriteError(
            "could not save nonfinite-step-0000005 (No space left on device)"
        )

    monkeypatch.setattr(checkpoint, failing, full)
    with logged() as messages, pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run", lambda step: (math.nan if step == 5 else 1.0, 1.0))
    assert stopped.value.code == 1
    assert messages == [
        "loss nan, grad_norm 1.0 at step 5, and could not save nonfinite-step-0000005 (No space left on device)"
    ]
    assert checkpoint.latest(tmp_path / "run").name == "step-0000004"


def test_a_prune_that_fails_stops_the_run_in_one_line_saying_the_checkpoint_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(run_dir: Path, keep: int) -> list[Path]:
        raise PermissionError(13, "Permission denied", str(run_dir / "checkpoints" / "step-0000002"))

    monkeypatch.setattr(checkpoint, "prune", denied)
    with logged() as messages, pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run")
    assert stopped.value.code == 1
    assert len(messages) == 1
    assert messages[0].startswith(f"saved {tmp_path / 'run' / 'checkpoints' / 'step-0000002'}, but could not")
    assert "Permission denied" in messages[0]
    assert checkpoint.latest(tmp_path / "run").name == "step-0000002"


def test_a_full_disk_at_a_save_keeps_the_previous_checkpoint_and_exits_1_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up halfway through step 6's first file: the save cleans up, says which checkpoint is
    intact, and the run stops there."""
    real_save_file = checkpoint.save_file  # type: ignore[attr-defined]
    calls = 0

    def save_file(tensors: dict[str, torch.Tensor], path: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:  # steps 2 and 4 wrote two files each
            Path(path).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with logged() as messages, pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run")
    assert stopped.value.code == 1
    assert len(messages) == 1
    assert f"traceback : {messages[0]}\n" in torchrun_summary(tmp_path / "error.json", exitcode=1)
    assert "step-0000006" in messages[0]
    assert "No space left on device" in messages[0]
    assert f"{tmp_path / 'run' / 'checkpoints' / 'step-0000004'} is intact and latest" in messages[0]
    assert checkpoint.latest(tmp_path / "run").name == "step-0000004"
    assert steps_on_disk(tmp_path / "run") == ["latest", "step-0000002", "step-0000004"]


def test_a_full_disk_under_the_runs_records_exits_1_in_one_line_and_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up where the run appends its metrics (step 5's line, after step 4's checkpoint): one line
    naming the run and what to do, not a traceback, also when the record of the session's end meets the same
    full disk, and when a resume meets it at the record of its start; with space again, ``--resume`` goes on
    from the checkpoint (a run with none is started again)."""
    real_append = report.append_jsonl
    full: set[object] = {5, "end"}

    def append_jsonl(path: Path, record: dict[str, object]) -> None:
        if record.get("step") in full or record.get("event") in full:
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write says it: no file named
        real_append(path, record)

    monkeypatch.setattr(report, "append_jsonl", append_jsonl)
    run_dir = tmp_path / "run"
    said = (
        f"the run stopped writing in {run_dir}: [Errno 28] No space left on device; once it can be written again, "
        f"--resume {run_dir} goes on from its latest checkpoint"
    )
    with logged() as messages, pytest.raises(SystemExit) as stopped:
        train(run_dir)
    assert stopped.value.code == 1
    assert messages == [said]
    assert checkpoint.latest(run_dir).name == "step-0000004"
    full = {"start"}
    with logged() as messages, pytest.raises(SystemExit) as stopped:
        train(run_dir, resume=True)
    assert stopped.value.code == 1
    assert messages == [said]
    full = set()
    assert int(train(run_dir, resume=True)["opt", "step"]) == 10
    # Before its first checkpoint a run has nothing to resume: the same command starts it afresh.
    full = {1}
    with logged() as messages, pytest.raises(SystemExit):
        train(tmp_path / "new")
    assert messages == [
        f"the run stopped writing in {tmp_path / 'new'}: [Errno 28] No space left on device; once it can be "
        "written again, run the same command again (it saved no checkpoint to resume from)"
    ]


def test_a_loop_step_of_several_updates_resumes_where_it_stopped(tmp_path: Path) -> None:
    """GRPO's passes: each loop step makes two optimizer updates, and a resumed run counts loop steps from them."""

    def two_updates(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        for _ in range(2):
            state, metrics = stand_in(lambda step: (1.0, 1.0))(state, batch, lr=lr)
        return state, metrics

    def run(run_dir: Path, **kwargs: object) -> TensorDict:
        with open_run(run_dir, **kwargs) as run:  # type: ignore[arg-type]
            return loop.train(run, run.restore(fresh, ADAMW), two_updates, lambda i: i, updates_per_step=2)

    straight = run(tmp_path / "straight")
    assert int(straight["opt", "step"]) == 20
    run(tmp_path / "split", stop_after=3)
    run(tmp_path / "split", resume=True, stop_after=2)  # then killed after step 5's record, before its save
    checkpoints = tmp_path / "split" / "checkpoints"
    shutil.rmtree(checkpoints / "step-0000010")
    (checkpoints / "latest").write_text("step-0000006\n")
    resumed = run(tmp_path / "split", resume=True)
    assert (resumed == straight).all()
    assert [r["step"] for r in records(tmp_path / "split") if "loss" in r] == list(range(1, 11))


def test_resuming_from_a_damaged_newest_checkpoint_takes_the_newest_intact_one(tmp_path: Path) -> None:
    train(tmp_path / "run", stop_after=4)
    newest = checkpoint.latest(tmp_path / "run")
    os.truncate(newest / "params.safetensors", 10)
    with logged("WARNING") as messages, open_run(tmp_path / "run", resume=True) as run:
        state = run.restore(fresh, ADAMW)
    assert int(state["opt", "step"]) == 2
    assert any("params.safetensors" in m and "step-0000002" in m for m in messages), messages


def torchrun_summary(error_file: Path, exitcode: int) -> str:
    """What ``torchrun`` prints when a process that left ``error_file`` exits with ``exitcode``."""
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=exitcode, error_file=str(error_file))
    return ChildFailedError("programs/pretrain.py", {1: failure}).format_msg()


def test_bad_input_on_a_rank_other_than_0_is_left_for_torchrun_to_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only rank 0 logs bad input (every rank reads it alike), so a rank that failed where rank 0 did not said
    nothing: ``torchrun``'s summary showed exit status 2 and "To enable traceback see...". It now names the
    error, in the one line rank 0 would have logged."""
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it, before the job is joined
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    with logged() as messages, pytest.raises(SystemExit) as stopped, runs.bad_input_exits_2():
        raise FileNotFoundError("data.paths: corpus.txt:\n  no such file")
    assert stopped.value.code == 2
    assert messages == []
    assert "traceback : data.paths: corpus.txt:; no such file\n" in torchrun_summary(
        tmp_path / "error.json", 2
    )


def test_a_resume_with_no_intact_checkpoint_left_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """It was a ``DamagedCheckpointError`` traceback and exit 1; every other loader of a damaged file says one
    line and exits 2."""
    train(tmp_path / "run", stop_after=4)
    for folder in (tmp_path / "run" / "checkpoints").glob("step-*"):
        os.truncate(folder / "params.safetensors", 10)
    with (
        logged() as messages,
        pytest.raises(SystemExit) as stopped,
        open_run(tmp_path / "run", resume=True) as run,
    ):
        run.restore(fresh, ADAMW)
    assert stopped.value.code == 2
    assert len(messages) == 1
    assert "no intact checkpoint to resume from" in messages[0]
    assert "step-0000002" in messages[0]
    assert "step-0000004" in messages[0]


def test_evaluations_come_at_the_start_on_schedule_and_at_the_end(tmp_path: Path) -> None:
    seen: list[tuple[int, bool]] = []

    def evaluate(state: TensorDict, step: int, final: bool) -> dict[str, float | int]:
        seen.append((step, final))
        return {"score": float(state["params", "w"][0])}

    with open_run(tmp_path / "run") as run:
        loop.train(
            run, run.restore(fresh, ADAMW), stand_in(lambda step: (1.0, 1.0)), lambda i: i, evaluate=evaluate
        )
    assert seen == [(0, False), (5, False), (10, True)]
    final = records(tmp_path / "run")[-1]
    assert final["final"]
    assert final["step"] == 10
    assert final["wall_s"] > 0

    # Stopped at step 5, where an evaluation is due, the run evaluates before it returns: the resumed run
    # starts after step 5, and that evaluation used to be skipped for good. Killed during it (its record
    # missing), the resumed run takes it first.
    def split(kill_in_evaluation: bool) -> list[tuple[int, bool]]:
        seen.clear()
        shutil.rmtree(tmp_path / "split", ignore_errors=True)
        for resume in (False, True):
            with open_run(tmp_path / "split", resume, stop_after=5) as run:
                state = run.restore(fresh, ADAMW)
                loop.train(run, state, stand_in(lambda step: (1.0, 1.0)), lambda i: i, evaluate=evaluate)
            if kill_in_evaluation and not resume:
                lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines(keepends=True)
                (tmp_path / "split" / "metrics.jsonl").write_text("".join(lines[:-1]))
        return seen

    assert split(kill_in_evaluation=False) == [(0, False), (5, False), (10, True)]
    assert split(kill_in_evaluation=True) == [(0, False), (5, False), (5, False), (10, True)]
    assert [r["step"] for r in records(tmp_path / "split") if "lr" not in r] == [0, 5, 10]


def test_a_new_run_where_one_died_before_its_first_checkpoint_starts_its_records_afresh(
    tmp_path: Path,
) -> None:
    """Its metrics (nothing resumes them) used to stay, and the new run's were appended to them."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runs.LOCK_FILE).touch()  # a run makes its lock before it writes anything
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 91, "loss": 7.0, "lr": 0.1}\n')
    train(tmp_path / "run")
    assert [r["step"] for r in records(tmp_path / "run") if "lr" in r] == list(range(1, 11))


@pytest.mark.parametrize("evaluates", [True, False])
def test_a_new_run_in_a_finished_run_whose_checkpoints_were_removed_is_refused_and_removes_nothing(
    tmp_path: Path, evaluates: bool
) -> None:
    """Its checkpoints removed by hand (to keep the exported model alone, say), a finished run looked like one
    that died before its first checkpoint, and a new run in its folder deleted its metrics, curves and model.
    A run without evaluations (a fine-tuning spec without ``eval``) records its end all the same."""
    scores = {"score": 1.0} if evaluates else {}
    with open_run(tmp_path / "run") as run:
        evaluate = (lambda *_: scores) if evaluates else None
        loop.train(
            run, run.restore(fresh, ADAMW), stand_in(lambda step: (1.0, 1.0)), lambda i: i, evaluate=evaluate
        )
    end = records(tmp_path / "run")[-1]
    assert end == {"step": 10, **scores, "final": True, "wall_s": end["wall_s"]}
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "model.json").write_text("{}")  # as a fine-tuning run's model files
    before = {path: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()}
    with pytest.raises(
        runs.UserError, match=r"run holds a finished run \(its metrics.jsonl records its end\)"
    ):
        open_run(tmp_path / "run")
    assert {path: path.read_bytes() for path in (tmp_path / "run").iterdir() if path.is_file()} == before


def test_a_new_run_where_one_died_before_its_first_checkpoint_removes_the_files_that_run_wrote(
    tmp_path: Path,
) -> None:
    """What the dead run wrote and this one does not write again used to stay: a LoRA run's ``lora.json``
    made a full fine-tune's checkpoints load as adapters (and fail), a fine-tune's ``model.json`` would be
    read as a pre-training run's model. Only a folder with a run's ``.lock`` (made before it writes anything)
    and ``spec.yaml`` had a run: elsewhere, files of those names are someone else's, a ``spec.yaml`` too."""
    assert PAIRS_FILE in runs.LEFTOVERS
    for folder in ("died", "other"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "spec.yaml").write_text("name: loop\n")
        for name in runs.LEFTOVERS:
            (tmp_path / folder / name).write_text("{}")
    (tmp_path / "died" / runs.LOCK_FILE).touch()
    for folder in ("died", "other"):
        train(tmp_path / folder)
    kept = {"spec.yaml", "metrics.jsonl", runs.LOCK_FILE, "log.txt", "checkpoints", "run.jsonl", "curves.png"}
    assert {path.name for path in (tmp_path / "died").iterdir()} == kept
    assert {path.name for path in (tmp_path / "other").iterdir()} == kept | set(runs.LEFTOVERS)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from zmaj.train import runs
held = runs.lock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_first_ones_pid(tmp_path: Path) -> None:
    train(tmp_path / "run", stop_after=2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunLockedError, match=f"PID {holder.pid}"):
            open_run(tmp_path / "run", resume=True)
    finally:
        holder.kill()
        holder.wait()
    train(tmp_path / "run", resume=True)  # the lock dies with its holder


def test_runs_started_in_the_same_second_get_folders_of_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default folder is named to the second; a second run that second (the README's walkthrough starts
    two within one) takes ``-2`` instead of being refused as a resume of the first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "_stamp", lambda: "20261202-120000")
    spec = Spec(train=LoopConfig(steps=2, checkpoint_every=1, eval_every=5))
    folders = []
    for _ in range(3):
        args = argparse.Namespace(resume=None, run_dir=None, stop_after=None)
        with runs.open_run(spec, args, Parallel()) as run:
            loop.train(run, run.restore(fresh, ADAMW), stand_in(lambda step: (1.0, 1.0)), lambda index: index)
            folders.append(run.dir)
    assert folders == [
        Path("runs") / name
        for name in ("loop-20261202-120000", "loop-20261202-120000-2", "loop-20261202-120000-3")
    ]
    assert all(steps_on_disk(folder) for folder in folders)


def test_a_run_folder_that_cannot_be_created_is_bad_input_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``--run-dir`` under a file, or a default ``runs/`` that cannot be made: one message with the path
    (a program reports it in one line and exits 2), not an ``OSError`` traceback."""
    (tmp_path / "a-file").touch()
    with pytest.raises(runs.UserError, match=r"cannot create the run folder .*a-file/run: Not a directory"):
        open_run(tmp_path / "a-file" / "run")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").touch()
    spec = Spec(train=LoopConfig(steps=2, checkpoint_every=1, eval_every=5))
    args = argparse.Namespace(resume=None, run_dir=None, stop_after=None)
    with pytest.raises(runs.UserError, match="cannot create the runs' folder runs: File exists"):
        runs.open_run(spec, args, Parallel())


@pytest.mark.parametrize(
    "files", [["config.json"], ["model.json", "params.safetensors"], ["state.json", "params.safetensors"]]
)
def test_a_new_run_in_a_model_folder_is_refused_and_writes_nothing(tmp_path: Path, files: list[str]) -> None:
    """A Hugging Face, zmaj or checkpoint folder as ``--run-dir``: the run wrote its files over the model's, and
    the folder went on loading as the model's weights, not the run's."""
    model = tmp_path / "model"
    model.mkdir()
    for name in files:
        (model / name).write_text("{}")
    with pytest.raises(runs.UserError, match=r"--run-dir .*/model is a model folder, whose files the run"):
        open_run(model)
    assert sorted(path.name for path in model.iterdir()) == sorted(files)
    (model / files[0]).unlink()  # a fine-tuning run's folder holds model.json, but no weights
    train(model)


def test_a_run_folder_without_write_permission_is_bad_input_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only ``runs/`` (the new run's folder cannot be made in it), or a ``--resume`` folder where its lock
    file cannot be opened (a read-only mount). The suite may run as root, which permissions do not stop, so the
    operating system's refusal is simulated where it would come."""
    train(tmp_path / "run", stop_after=2)
    refused = {tmp_path / "runs" / "loop-20261202-120000", tmp_path / "run" / runs.LOCK_FILE}
    mkdir, open_ = Path.mkdir, Path.open

    def denying(method: Callable[..., Any]) -> Callable[..., Any]:
        def denied(path: Path, *args: Any, **kwargs: Any) -> Any:
            if path.absolute() in refused:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return method(path, *args, **kwargs)

        return denied

    monkeypatch.setattr(Path, "mkdir", denying(mkdir))
    monkeypatch.setattr(Path, "open", denying(open_))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs, "_stamp", lambda: "20261202-120000")
    spec = Spec(train=LoopConfig(steps=2, checkpoint_every=1, eval_every=5))
    args = argparse.Namespace(resume=None, run_dir=None, stop_after=None)
    with pytest.raises(
        runs.UserError, match="cannot create the run folder runs/loop-20261202-120000: Permission"
    ):
        runs.open_run(spec, args, Parallel())
    with pytest.raises(runs.UserError, match=r"cannot write in the run folder .*/run: Permission denied"):
        open_run(tmp_path / "run", resume=True)


@pytest.mark.parametrize("read_only", ["run", "run/checkpoints"])
def test_a_resume_folder_where_no_file_can_be_made_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_only: str
) -> None:
    """``chmod a-w`` on a run folder or its checkpoints folder (the folder, not its files): its lock and logs
    can still be appended to, but no new file made, so the first checkpoint would fail after the training it
    was to keep. The start refuses it, naming the folder, and leaves the run as it was (simulated, as in the
    test above, for a suite that may run as root)."""
    train(tmp_path / "run", stop_after=2)
    before = sorted(path.name for path in (tmp_path / "run").rglob("*"))
    temporary_file = tempfile.TemporaryFile

    def denying(dir: Path, **kwargs: Any) -> IO[bytes]:
        if dir == tmp_path / read_only:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return temporary_file(dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", denying)
    folder = "run folder" if read_only == "run" else "checkpoints folder"
    with pytest.raises(
        runs.UserError, match=rf"cannot write in the {folder} .*/{read_only}: Permission denied"
    ):
        open_run(tmp_path / "run", resume=True)
    assert sorted(path.name for path in (tmp_path / "run").rglob("*")) == before
    monkeypatch.undo()
    with open_run(tmp_path / "run", resume=True):  # writable again, it resumes (and the probe leaves nothing)
        pass
    assert sorted(path.name for path in (tmp_path / "run").rglob("*")) == before


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_stop_after_takes_a_whole_number_of_steps(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        runs.cli(None).parse_args(["spec.yaml", "--stop-after", value])
    assert exited.value.code == 2
    assert f"--stop-after: expected a whole number of at least 1, got '{value}'" in capsys.readouterr().err
    assert runs.cli(None).parse_args(["spec.yaml", "--stop-after", "3"]).stop_after == 3


def test_each_step_runs_at_the_schedules_rate_for_its_zero_based_index(tmp_path: Path) -> None:
    """Warmup's first step at 1/warmup of the peak, not 2/warmup: the stand-in step never checked its rate."""
    schedule = optim.ScheduleConfig(kind="cosine", warmup_steps=3, final_lr_fraction=0.1)
    rates: list[float] = []

    def recording(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        rates.append(lr)
        return stand_in(lambda step: (1.0, 1.0))(state, batch, lr=lr)

    with open_run(tmp_path / "run", schedule=schedule.model_dump()) as run:
        loop.train(run, run.restore(fresh, ADAMW), recording, lambda i: i)
    peak = run.train.optimizer.lr
    expected = [optim.learning_rate(i, 10, peak, schedule) for i in range(10)]
    assert rates == expected
    assert [r["lr"] for r in records(tmp_path / "run") if "lr" in r] == expected


def test_a_non_finite_loop_step_of_several_updates_sets_aside_the_checkpoint_it_started_from(
    tmp_path: Path,
) -> None:
    """GRPO's passes: a loop step makes two updates, and checkpoints are named by update. The step that went
    non-finite started from the state of update 2 * (step - 1); that checkpoint must be set aside and ``latest``
    moved back, or ``--resume`` starts from it and fails again at the same step (``started`` counted one update
    per loop step, and no checkpoint of that name existed, so nothing was set aside)."""

    def two_updates(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        for _ in range(2):
            state, metrics = stand_in(lambda update: (math.nan if update == 10 else 1.0, 1.0))(
                state, batch, lr=lr
            )
        return state, metrics  # update 10: the 2nd of loop step 5

    # Checkpoints every 2 loop steps: updates 4 and 8.
    with logged() as messages, pytest.raises(SystemExit) as stopped, open_run(tmp_path / "run") as run:
        loop.train(run, run.restore(fresh, ADAMW), two_updates, lambda i: i, updates_per_step=2)
    assert stopped.value.code == 1
    assert "step 8" in messages[0]
    assert checkpoint.latest(tmp_path / "run").name == "step-0000004"
    assert "nonfinite_start-step-0000008" in steps_on_disk(tmp_path / "run")


def test_a_steps_line_reports_throughput_and_model_flop_utilisation() -> None:
    """tokens/s and MFU are only checked to exist elsewhere: a rate multiplied by the time, or a peak taken as
    TFLOP/s, would go unnoticed. 1000 tokens in 2 s at 6e6 FLOPs per token on a 1000 GFLOP/s peak: 500 tokens/s,
    3e9 FLOP/s, 0.3% of the peak."""
    line = loop.describe_step(3, 0.1, {"loss": 1.0, "tokens": 1000.0}, 2.0, 6e6, 1000.0)
    assert line["tokens_per_s"] == 500.0
    assert line["mfu"] == pytest.approx(0.003)
    assert "mfu" not in loop.describe_step(3, 0.1, {"tokens": 1000.0}, 2.0, None, None)


def test_a_resume_with_another_seed_than_its_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    """A ``spec.yaml`` edited by hand to another ``train.seed`` (``--set`` is refused for frozen fields): the
    checkpoint's recorded seed must be compared, or the run goes on reading other batches and dropout masks."""
    train(tmp_path / "run", stop_after=2)
    with logged() as messages, pytest.raises(SystemExit) as stopped:
        train(tmp_path / "run", resume=True, seed=7)
    assert stopped.value.code == 2
    assert len(messages) == 1
    assert "was written with another train.seed than the run's spec.yaml" in messages[0]


class ModelSpec(BaseModel):
    name: str = "loop"
    model: gpt.GPTConfig
    train: LoopConfig


def test_a_model_field_set_when_recorded_and_unset_now_is_a_difference(tmp_path: Path) -> None:
    """``logit_softcap: 30`` recorded, ``null`` in the edited ``spec.yaml``: the same shapes, another model,
    which must be refused like any other changed field, not skipped as a field the record lacks."""
    config = gpt.GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=1, n_heads=2, logit_softcap=30.0)
    then = ModelSpec(model=config, train=LoopConfig(steps=2))
    saved = checkpoint.save(tmp_path, init_state(fresh()), {"spec": then.model_dump(mode="json"), "seed": 0})
    now = ModelSpec(model=config.model_copy(update={"logit_softcap": None}), train=LoopConfig(steps=2))
    with pytest.raises(ValueError, match=r"written with another model\.logit_softcap"):
        runs.check_written_by(saved, now)
    runs.check_written_by(saved, then)


def test_a_new_run_where_one_died_before_writing_its_spec_keeps_the_folders_other_files(
    tmp_path: Path,
) -> None:
    """A ``.lock`` without ``spec.yaml``: a run died before it wrote anything, so a ``tokenizer.json`` or
    ``model.json`` there is the user's, and only the records go."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runs.LOCK_FILE).touch()
    for name in runs.LEFTOVERS:
        (tmp_path / "run" / name).write_text("{}")
    train(tmp_path / "run")
    assert all((tmp_path / "run" / name).is_file() for name in runs.LEFTOVERS if name != "curves.png")


def test_a_new_run_where_one_left_a_step_folder_without_latest_is_refused(tmp_path: Path) -> None:
    """A kill between renaming the first checkpoint into place and writing ``latest``: ``--resume`` continues
    from the step folder, so a new run there must be refused, not train over it."""
    train(tmp_path / "run", stop_after=3)
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    with pytest.raises(runs.UserError, match="already holds a run; use --resume"):
        open_run(tmp_path / "run")


def test_a_new_run_where_only_a_set_aside_checkpoint_is_left_says_so(tmp_path: Path) -> None:
    """The step after the first checkpoint went non-finite: that checkpoint is set aside and ``latest`` removed,
    so ``--resume`` finds nothing. A new run there must not be told to use ``--resume`` (the folder would be
    stuck), nor delete the set-aside checkpoint kept for inspection: it is refused, naming what is there."""
    train(tmp_path / "run", stop_after=2)
    assert checkpoint.set_aside_latest(tmp_path / "run", 2, "nonfinite_start")
    with pytest.raises(
        runs.UserError, match=r"holds checkpoints no run resumes from \(nonfinite_start-step-0000002\)"
    ):
        open_run(tmp_path / "run")
    assert steps_on_disk(tmp_path / "run") == ["nonfinite_start-step-0000002"]


@pytest.mark.parametrize("linked", [False, True], ids=["folder", "link to another disk"])
def test_a_run_whose_first_checkpoint_could_not_be_written_can_start_again(
    tmp_path: Path, linked: bool
) -> None:
    """The disk was full at the first save: ``--resume`` finds no checkpoint, so a new run in the folder must not
    be refused as one that "already holds a run; use --resume". It starts afresh, without what the failed save
    left, and keeps ``checkpoints/`` itself: the usual answer to a full disk is a link to a bigger one, which a
    removal of the folder refused with a traceback, and a file of the user's in it stays."""
    run = tmp_path / "run"
    if linked:
        run.mkdir()
        (tmp_path / "big-disk").mkdir()
        (run / "checkpoints").symlink_to(tmp_path / "big-disk")
        (run / "checkpoints" / ".keep").touch()

    def full(tensors: dict[str, torch.Tensor], path: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "save_file", full)
        with pytest.raises(SystemExit):
            train(run)
    (run / "checkpoints" / f"{checkpoint.STAGING}step-0000002-x").mkdir()  # as a kill mid-save leaves it
    args = argparse.Namespace(resume=run, spec=None, overrides=[], run_dir=None)
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        runs.read_spec(Spec, args, frozen=[])
    with open_run(run):  # started afresh: the leftovers go at once, not at the first save (a disk still full)
        hidden = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))
        assert hidden == ([".keep"] if linked else [])
    state = train(run)
    assert int(state["opt", "step"]) == 10
    assert (run / "checkpoints").is_symlink() == linked
    assert steps_on_disk(run) == ["latest", "step-0000006", "step-0000008", "step-0000010"]  # the newest 3
    hidden = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))
    assert hidden == ([".keep"] if linked else [])


def test_a_run_folder_whose_checkpoints_is_a_file_or_whose_latest_names_nothing_is_refused(
    tmp_path: Path,
) -> None:
    """A file where the checkpoints go failed at the first save (a traceback, the steps lost); a ``latest``
    naming no folder (the step folders deleted by hand) is no run to resume: each refused at once, by name."""
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / "checkpoints").write_text("my notes")
    with pytest.raises(
        runs.UserError, match=r"checkpoints is not a folder, where the run saves its checkpoints"
    ):
        open_run(tmp_path / "file")
    assert (tmp_path / "file" / "checkpoints").read_text() == "my notes"
    train(tmp_path / "run", stop_after=2)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000002")
    with pytest.raises(runs.UserError, match=r"holds checkpoints no run resumes from \(latest\)"):
        open_run(tmp_path / "run")
    # A folder, but not one of checkpoints/.
    (tmp_path / "run" / "checkpoints" / "latest").write_text("../checkpoints\n")
    with pytest.raises(runs.UserError, match=r"holds checkpoints no run resumes from \(latest\)"):
        open_run(tmp_path / "run")


def test_stop_after_then_resume_follows_the_schedule_of_the_whole_run(tmp_path: Path) -> None:
    """With the default schedule's warmup (100 steps) longer than these runs, the rate never depends on
    ``train.steps``, so a resumed session that computed it over the steps left (``steps - first``) instead of
    the run's looked exact; under a short cosine schedule it does not."""
    schedule = {"kind": "cosine", "warmup_steps": 2, "final_lr_fraction": 0.1}
    straight = train(tmp_path / "straight", schedule=schedule)
    train(tmp_path / "split", stop_after=3, schedule=schedule)
    resumed = train(tmp_path / "split", resume=True, schedule=schedule)
    assert (resumed == straight).all()


class StopQuestion:
    """What this rank's own stop flag says (False), handed to ``agree`` by the loop's stop decision alone: the
    fake below tells that question, and no other the loop asks the ranks, that another rank wants to stop."""

    def __bool__(self) -> bool:
        return False


ASKED = StopQuestion()


class OtherRankInterrupted(Parallel):
    """One process that plays a job whose other rank received SIGTERM during step 3: the loop's next stop
    decision is where this rank learns it."""

    pending = False

    def agree(self, flag: object) -> bool:
        if flag is not ASKED:  # another question (did rank 0 write its metrics?): the other rank agrees
            return bool(flag)
        told, OtherRankInterrupted.pending = OtherRankInterrupted.pending, False
        return told


def test_a_stop_that_another_rank_saw_stops_this_one_at_the_same_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM sent to one rank (a scheduler, ``kill PID``) must stop every rank after the same step: the loop
    asks the ranks (``Parallel.agree``) rather than its own flag, or the rank that stopped leaves the others
    waiting in the next step's all-reduce (30 minutes, then a timeout). The Ctrl-C test signals every rank at
    once, so it cannot tell."""

    @contextmanager
    def not_interrupted_here() -> Iterator[Callable[[], bool]]:
        yield lambda: cast(bool, ASKED)  # False, and recognisable by the fake

    monkeypatch.setattr(loop, "interruptible", not_interrupted_here)

    def step(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        new, metrics = stand_in(lambda step: (1.0, 1.0))(state, batch, lr=lr)
        OtherRankInterrupted.pending = int(new["opt", "step"]) == 3
        return new, metrics

    spec = Spec(train=LoopConfig(steps=10, checkpoint_every=100, eval_every=100))
    args = argparse.Namespace(resume=None, run_dir=tmp_path / "run", stop_after=None)
    parallel = OtherRankInterrupted()
    with runs.open_run(spec, args, parallel) as run:
        state = loop.train(run, run.restore(fresh, ADAMW), step, lambda i: i)
    assert int(state["opt", "step"]) == 3
    assert checkpoint.latest(tmp_path / "run").name == "step-0000003"


def test_a_run_records_its_data_and_a_resume_on_other_data_is_refused(tmp_path: Path) -> None:
    """``data.json``: what a new run's steps read, checked by every resume; a run from before it records it at
    its next resume, so that later ones are checked."""
    spec = Spec(train=LoopConfig.model_validate({"steps": 10}))

    def opened(resume: bool, data: dict[str, str]) -> None:
        args = argparse.Namespace(resume=tmp_path if resume else None, run_dir=tmp_path, stop_after=None)
        with runs.open_run(spec, args, Parallel(), data=lambda: data):
            pass

    opened(False, {"train": "a", "validation": "b"})
    assert json.loads((tmp_path / runs.DATA_FILE).read_text()) == {"train": "a", "validation": "b"}
    opened(True, {"train": "a", "validation": "b"})
    with pytest.raises(
        ValueError, match=r"the data differs from the run's \(validation changed since the run"
    ):
        opened(True, {"train": "a", "validation": "c"})
    with pytest.raises(ValueError, match=r"the data differs from the run's \(train changed since the run"):
        opened(True, {"train": "c", "validation": "b"})
    (tmp_path / runs.DATA_FILE).unlink()  # a run from before data.json
    opened(True, {"train": "a", "validation": "c"})
    assert json.loads((tmp_path / runs.DATA_FILE).read_text()) == {"train": "a", "validation": "c"}


def test_a_run_folder_is_checked_before_the_work_that_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``check_run_folder`` refuses what ``open_run`` would, creating nothing: here a folder holding a run (a
    rerun without ``--resume``) and one where nothing can be written; a resume of that run passes."""
    run_dir = tmp_path / "run"
    train(run_dir, stop_after=2)

    def args(resume: bool, run_dir: Path) -> argparse.Namespace:
        return argparse.Namespace(resume=run_dir if resume else None, run_dir=run_dir, stop_after=None)

    with pytest.raises(runs.UserError, match=f"{run_dir} already holds a run; use --resume {run_dir}"):
        runs.check_run_folder(args(False, run_dir))
    runs.check_run_folder(args(True, run_dir))
    (tmp_path / "runs").mkdir()  # runs/ of a shared checkout, another user's
    before = sorted(tmp_path.rglob("*"))

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(runs.UserError, match="cannot create a run folder in runs: Permission denied"):
        runs.check_run_folder(argparse.Namespace(resume=None, run_dir=None, stop_after=None))
    for folder, message in (
        (tmp_path / "new" / "run", "create the run folder"),
        (run_dir, "write in the run folder"),
    ):
        with pytest.raises(runs.UserError, match=f"cannot {message} {folder}: Permission denied"):
            runs.check_run_folder(args(folder == run_dir, folder))
    assert sorted(tmp_path.rglob("*")) == before


def test_a_new_run_folder_whose_files_cannot_be_written_is_one_line_and_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the new run's ``spec.yaml``: one line naming the folder, and the lock let go, so that the
    same folder can be used once there is space."""
    real = fileio.atomic_write_text

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "atomic_write_text", full)
    with pytest.raises(
        runs.UserError, match=f"cannot write in the run folder {tmp_path}: No space left on device"
    ) as failed:
        open_run(tmp_path)
    monkeypatch.setattr(fileio, "atomic_write_text", real)
    # The error (and its traceback's frames) kept alive: a lock file left open there would still hold the lock.
    with open_run(tmp_path):
        pass
    del failed


def test_each_batch_is_made_once_while_the_step_before_it_runs(tmp_path: Path) -> None:
    """The loop asks for step i + 1's batch before it reads step i's metrics (which wait for a GPU's kernels),
    so that the host assembles it while the device computes; each batch once, none past the last step."""
    events: list[str] = []

    class Waited(float):
        """A metric that notes when the loop waits for it."""

        def __float__(self) -> float:
            events.append("wait")
            return float.__float__(self)

    def step(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        events.append(f"step {batch}")
        new = state.clone()
        new["opt", "step"] += 1
        return new, cast(Metrics, {"loss": Waited(1.0)})

    def batches(index: int) -> int:
        events.append(f"batch {index}")
        return index

    with open_run(tmp_path / "run", steps=3, eval_every=10, checkpoint_every=10) as run:
        loop.train(run, run.restore(fresh, ADAMW), step, batches)
    assert events == [
        "batch 0",
        "step 0",
        "batch 1",
        "wait",
        "step 1",
        "batch 2",
        "wait",
        "step 2",
        "wait",
    ]


def test_a_resumed_run_makes_the_batch_of_its_first_step_and_none_past_its_last(tmp_path: Path) -> None:
    """Resumed at step 2 (stopped after 2 of 4), the first batch made, and the first trained on, is step 2's;
    resumed at its last step (killed in its final evaluation), no batch is made (step 4's is past the end)."""
    made: list[int] = []
    trained: list[int] = []
    inner = stand_in(lambda step: (1.0, 1.0))

    def step(state: TensorDict, batch: int, /, *, lr: float) -> tuple[TensorDict, Metrics]:
        trained.append(batch)
        return inner(state, batch, lr=lr)

    def batches(index: int) -> int:
        made.append(index)
        return index

    def session(**kwargs: object) -> None:
        with open_run(tmp_path / "run", steps=4, eval_every=10, checkpoint_every=10, **kwargs) as run:  # type: ignore[arg-type]
            loop.train(run, run.restore(fresh, ADAMW), step, batches)

    session(stop_after=2)
    assert (made, trained) == ([0, 1, 2], [0, 1])  # step 2's batch made early, then the stop
    made.clear()
    trained.clear()
    session(resume=True)
    assert (made, trained) == ([2, 3], [2, 3])
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(
        "".join(metrics.read_text().splitlines(keepends=True)[:-1])
    )  # killed in the final evaluation
    made.clear()
    trained.clear()
    session(resume=True)
    assert (made, trained) == ([], [])


def test_a_record_that_cannot_be_flushed_stops_the_run_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync of metrics.jsonl that fails (EIO) before a checkpoint stops the run as a failed save does: exit 1,
    one line, no traceback, and no checkpoint that the lost lines would be missing from."""

    flush = fileio.fsync

    def failing(path: Path) -> None:
        if Path(path).name == "metrics.jsonl":
            raise OSError(errno.EIO, "Input/output error")
        flush(path)

    monkeypatch.setattr(fileio, "fsync", failing)
    with logged() as errors, pytest.raises(SystemExit) as exited:
        train(tmp_path / "run", steps=4)
    assert exited.value.code == 1
    assert len(errors) == 1
    assert errors[0].startswith("could not flush the run's records to disk before a checkpoint ([Errno 5]")
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_a_checkpoint_that_recorded_its_seed_beside_the_spec_is_compared_by_it(tmp_path: Path) -> None:
    """Checkpoints written before the spec was recorded keep the seed in state.json's "seed"."""

    class SeedSpec(BaseModel):
        train: dict[str, Any]

    folder = tmp_path / "step-0000004"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({"step": 4, "seed": 1, "spec": {"train": {"steps": 10}}}))
    with pytest.raises(ValueError, match=r"written with another train\.seed than"):
        runs.check_written_by(folder, SeedSpec(train={"steps": 10, "seed": 0}))
    runs.check_written_by(folder, SeedSpec(train={"steps": 10, "seed": 1}))
