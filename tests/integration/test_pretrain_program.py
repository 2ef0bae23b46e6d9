"""programs/pretrain.py and programs/sample.py end to end on a tiny spec and a tiny local corpus."""

import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.integration.programs import ctrl_c, decays_as_asked, interrupted, run_program
from tests.unit.train.test_loop import HOLD_LOCK
from zmaj.data import dataset, pipeline
from zmaj.data.corpus import in_validation
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer import sample as infer_sample
from zmaj.models import gpt
from zmaj.train import loop, report, step

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "def",
    "class",
    "return",
    "import",
    "yield",
    "lambda",
    "value",
    "index",
    "parse",
    "token",
    "print",
    "self",
    "list",
    "dict",
    "None",
    "True",
]


def corpus(path: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for doc in range(80):
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (60,), generator=generator)]
            f.write(json.dumps({"text": f"# file {doc}\n" + " ".join(words)}) + "\n")
    return path


def tiny_spec(
    root: Path,
    train: Mapping[str, object],
    model: Mapping[str, object] | None = None,
    max_new_tokens: int = 2,
) -> Path:
    """A tiny pre-training spec over :func:`corpus` (written into ``root``): a 2-layer GPT of width 32 on 32-token
    sequences of a 300-token vocabulary; ``train`` is the whole train section, ``model`` adds to the model's."""
    spec = {
        "name": "tiny",
        "model": {
            "vocab_size": 300,
            "context": 32,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 2,
            **(model or {}),
        },
        "data": {
            "source": {"kind": "files", "paths": [str(corpus(root / "corpus.jsonl"))], "format": "jsonl"},
            "validation_fraction": 0.2,
            "seq_len": 32,
            "vocab_size": 300,
        },
        "train": dict(train),
        "sample": {"prompts": ["def "], "max_new_tokens": max_new_tokens},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    train = {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "checkpoint_every": 100}
    return tiny_spec(tmp_path_factory.mktemp("pretrain"), train, {"dropout": 0.1}, max_new_tokens=5)


def run(program: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "programs" / program), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "params.safetensors"))


@pytest.mark.slow
def test_pretrain_then_resume_is_exact_then_sample(spec: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = run("pretrain.py", spec, "--run-dir", straight, "--cache-dir", cache)
    assert done.returncode == 0, done.stderr
    for name in ("spec.yaml", "tokenizer.json", "metrics.jsonl", "curves.png", "log.txt", "run.jsonl"):
        assert (straight / name).is_file(), name
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["final"]
    assert final["val_bpb"] > 0
    assert final["unigram_bpb"] > 0
    assert sum("loss" in r for r in records) == 6

    first = run("pretrain.py", spec, "--run-dir", split, "--cache-dir", cache, "--stop-after", "3")
    assert first.returncode == 0, first.stderr
    assert (split / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    resumed = run("pretrain.py", "--resume", split, "--cache-dir", cache)
    assert resumed.returncode == 0, resumed.stderr
    # Training is deterministic: a resume that started again from step 0 would end with the same weights.
    assert f"resumed from {split / 'checkpoints' / 'step-0000003'} (step 3)" in resumed.stderr
    a, b = final_params(straight), final_params(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    sampled = run("sample.py", straight, "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("def ")
    # A copy whose training files are gone (moved, or a relative path read from another folder) is still a
    # model: sample.py validated the whole spec, data section included, and refused it.
    moved = tmp_path / "moved"
    shutil.copytree(straight, moved)
    written = yaml.safe_load((moved / "spec.yaml").read_text())
    written["data"]["source"]["paths"] = [str(tmp_path / "gone.jsonl")]
    (moved / "spec.yaml").write_text(yaml.safe_dump(written))
    again = run("sample.py", moved, "--prompt", "def ", "--max-new-tokens", "5", "--temperature", "0")
    assert again.returncode == 0, again.stderr
    assert again.stdout == sampled.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.stepz=3"], "train.stepz"),
        (["--set", "train.steps=lots"], "train.steps"),
        (["--set", "data.source.paths=[/no/such/file.jsonl]"], "/no/such/file.jsonl"),
        (["--set", "model.attention=flex"], "model.attention: flex-attention cannot be differentiated"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(spec: Path, args: list[str], message: str) -> None:
    result = run("pretrain.py", spec, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_resume_takes_no_spec_and_a_spec_is_no_folder(spec: Path, tmp_path: Path) -> None:
    """SPEC has a default, so a SPEC given with ``--resume`` (even one that does not exist) used to be taken for
    no SPEC and ignored; and a folder given as SPEC was reported as a spec file not found."""
    cases: list[tuple[list[object], str]] = [
        ([spec, "--resume", tmp_path / "run"], "give no SPEC, and change the run with --set"),
        ([tmp_path / "nope.yaml", "--resume", tmp_path / "run"], "give no SPEC"),
        (["--resume", "/no/such/run"], "--resume /no/such/run: no spec.yaml there"),
        ([tmp_path], f"SPEC {tmp_path} is a folder, not a YAML file"),
    ]
    for args, message in cases:
        result = run_program("pretrain.py", *args, "--cache-dir", tmp_path / "cache")
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1, result.stderr
        assert message in errors[0]


@pytest.mark.parametrize("cache", ["notes.txt", "notes.txt/cache"])
def test_a_cache_dir_that_cannot_be_a_folder_exits_2_before_training(
    spec: Path, tmp_path: Path, cache: str
) -> None:
    """Not after the tokenizer is trained, with a traceback."""
    (tmp_path / "notes.txt").write_text("mine")
    done = run_program("pretrain.py", spec, "--run-dir", tmp_path / "run", "--cache-dir", tmp_path / cache)
    assert done.returncode == 2
    problem = (
        " is a file, not a folder" if cache == "notes.txt" else ": cannot make the folder (Not a directory)"
    )
    assert done.stderr.strip().splitlines() == [f"ERROR | --cache-dir {tmp_path / cache}{problem}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Its own spec and corpus, which it edits below.
    spec = tiny_spec(tmp_path, {"steps": 6, "batch_size": 4, "eval_every": 3, "eval_batches": 2})
    assert (
        run(
            "pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", tmp_path, "--stop-after", "1"
        ).returncode
        == 0
    )
    # What the weights' shapes or the rows a step reads depend on; the refusal names the field itself.
    for change in ("model.d_model=64", "train.seed=7", "data.seq_len=16", "train.batch_size=8"):
        result = run("pretrain.py", "--resume", run_dir, "--set", change)
        assert result.returncode == 2
        assert f"{change.split('=')[0]} differs from the run's" in result.stderr.strip().splitlines()[-1]
    # A spec.yaml edited by hand, or a checkpoint of another run: the same shapes, another model (2 -> 4 heads).
    saved_spec = (run_dir / "spec.yaml").read_text()
    edited = yaml.safe_load(saved_spec)
    edited["model"]["n_heads"] = 4
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(edited))
    result = run("pretrain.py", "--resume", run_dir, "--cache-dir", tmp_path)
    assert result.returncode == 2
    assert "was written with another model.n_heads than the run's spec.yaml" in result.stderr.splitlines()[-1]
    # So are the rows a step reads, edited into spec.yaml (read_spec checks --set against the file): taken, the
    # resumed steps read other rows.
    for section, key, value in (("data", "seq_len", 16),):  # the rest: test_loop, in milliseconds
        edited = yaml.safe_load(saved_spec)
        edited[section][key] = value
        (run_dir / "spec.yaml").write_text(yaml.safe_dump(edited))
        result = run("pretrain.py", "--resume", run_dir, "--cache-dir", tmp_path)
        assert result.returncode == 2
        line = result.stderr.splitlines()[-1]
        assert f"was written with another {section}.{key} than the run's spec.yaml" in line
    (run_dir / "spec.yaml").write_text(saved_spec)
    # A document added to the held-out split leaves the tokenizer (trained on the train split) as it was, and
    # changes the rows: the run's data.json says so.
    path = Path(yaml.safe_load(spec.read_text())["data"]["source"]["paths"][0])
    original = path.read_text()
    held_out = next(
        text
        for text in (f"# file held out {i}\nreturn value" for i in range(1000))
        if in_validation(f"sha256:{hashlib.sha256(text.encode()).hexdigest()}", 0.2)
    )
    path.write_text(original + json.dumps({"text": held_out}) + "\n")
    result = run("pretrain.py", "--resume", run_dir, "--cache-dir", tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    assert "the data differs from the run's (validation changed since the run began" in errors[0]
    path.write_text(original)
    # The same spec over a corpus edited since trains another tokenizer, whose ids would mean other text to
    # the checkpoint.
    lines = path.read_text().splitlines()
    path.write_text("".join(json.dumps({"text": json.loads(line)["text"].upper()}) + "\n" for line in lines))
    saved = (run_dir / "tokenizer.json").read_bytes()
    result = run("pretrain.py", "--resume", run_dir, "--cache-dir", tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, result.stderr
    assert "the corpus changed since the run began" in errors[0]
    assert (run_dir / "tokenizer.json").read_bytes() == saved
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000001"


@pytest.mark.slow
def test_a_muon_run_resumes_exactly_and_refuses_another_optimizer(spec: Path, tmp_path: Path) -> None:
    """Issue 18: with ``train.optimizer.kind=muon`` a run stopped at step 3 and resumed ends with the parameters
    of a run straight through; a resume that would change the optimizer's kind or groups is one line, exit 2."""
    cache, straight, split = tmp_path / "cache", tmp_path / "straight", tmp_path / "split"
    muon: list[str | Path] = [
        "--cache-dir",
        cache,
        "--set",
        "train.optimizer={kind: muon, weight_decay: 0.01}",
    ]
    assert run("pretrain.py", spec, "--run-dir", straight, *muon).returncode == 0
    first = run("pretrain.py", spec, "--run-dir", split, *muon, "--stop-after", "3")
    assert first.returncode == 0, first.stderr
    for change, field in (("={kind: adamw}", "kind"), (".muon_params=[blocks.mlp.*.weight]", "groups")):
        refused = run(
            "pretrain.py", "--resume", split, "--cache-dir", cache, "--set", f"train.optimizer{change}"
        )
        assert refused.returncode == 2, refused.stderr
        assert f"train.optimizer.{field} differs from the run's" in refused.stderr.strip().splitlines()[-1]
    resumed = run("pretrain.py", "--resume", split, "--cache-dir", cache)
    assert resumed.returncode == 0, resumed.stderr
    # Training is deterministic: a resume that started again from step 0 would end with the same weights.
    assert f"resumed from {split / 'checkpoints' / 'step-0000003'} (step 3)" in resumed.stderr
    a, b = final_params(straight), final_params(split)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(spec: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    extra = ["--cache-dir", str(tmp_path), "--set", "train.steps=100000"]
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "programs" / "pretrain.py"),
            str(spec),
            "--run-dir",
            str(run_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert step >= 2
    assert f"--resume {run_dir}" in stderr


@pytest.mark.slow
def test_sample_refuses_a_tokenizer_that_does_not_fit_the_model(spec: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert (
        run(
            "pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", tmp_path, "--stop-after", "1"
        ).returncode
        == 0
    )
    other = Tokenizer.train(["some other text " * 50], vocab_size=280)
    assert other.vocab_size != 300
    other.save(run_dir / "tokenizer.json")
    result = run("sample.py", run_dir, "--prompt", "def ")
    assert result.returncode == 2
    assert f"tokenizer.json has {other.vocab_size} tokens, the model 300" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_gpu_spec_is_refused_in_one_line_on_a_machine_without_one(tmp_path: Path) -> None:
    done = run_program(
        "pretrain.py", ROOT / "specs" / "pretrain" / "gpt2-124m-fineweb.yaml", "--run-dir", tmp_path / "run"
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    assert "train.device: cuda was asked for, but this machine has no usable CUDA GPU" in errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_runs_of_one_spec_on_two_threads_end_with_identical_parameters(
    spec: Path, tmp_path: Path
) -> None:
    """Issue 19: the same spec and seed give the same run, bit for bit, at the default thread count.

    16 rows x 32 positions x 64 features reach ATen's ``GRAIN_SIZE`` (32768 elements), above which a CPU kernel
    splits its work between threads; the corpus repeats a few words, so many positions read one embedding row.
    Before ``zmaj.nn.layers.embedding``, the embedding gradients summed in the threads' arrival order here.
    In-process (``run_program``), so that the thread count set here is the one the program runs with.
    """
    overrides = ["model.d_model=64", "train.batch_size=16", "train.steps=3", "train.precision=fp32"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [tmp_path / "first", tmp_path / "second"]
        for run_dir in runs:
            done = run_program(
                "pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", tmp_path / "cache", *sets
            )
            assert done.returncode == 0, done.stderr
    finally:
        torch.set_num_threads(saved)
    first, second = (final_params(run_dir) for run_dir in runs)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_a_run_folder_the_run_cannot_use_is_refused_before_the_data_is_prepared(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preparing a corpus (training the tokenizer, encoding) can take hours: a ``--run-dir`` under a file, a model
    folder, or one another process holds was refused only after it. Nothing is trained, nothing written."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "held").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "held")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        for run_dir, message in (
            (tmp_path / "notes.txt" / "run", "cannot create the run folder .*notes.txt/run: Not a directory"),
            (tmp_path / "model", "is a model folder, whose files the run would overwrite"),
            (tmp_path / "held", f"is being written by another process \\(PID {holder.pid}\\)"),
        ):
            done = run_program("pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", tmp_path / "cache")
            assert done.returncode == 2, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert re.search(message, done.stderr), done.stderr
            assert not (tmp_path / "cache" / "tokenizers").exists()
    finally:
        holder.kill()
        holder.wait()
    # Without --run-dir the run makes its folder under runs/, which here is a file.
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "runs").write_text("notes")
    monkeypatch.chdir(tmp_path / "here")
    done = run_program("pretrain.py", spec, "--cache-dir", tmp_path / "cache")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["ERROR | cannot create a run folder in runs: Not a directory"]
    assert not (tmp_path / "cache" / "tokenizers").exists()


def test_ctrl_c_while_the_data_is_prepared_is_one_line_and_status_130(
    spec: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the training steps the loop does not take a Ctrl-C as a stop: it ended in a traceback from inside
    the tokenizer's training; now one line, a shell's status for SIGINT, and no cache or run folder written."""
    monkeypatch.setattr(Tokenizer, "train", ctrl_c)
    done = interrupted("pretrain.py", spec, "--run-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache")
    assert done.returncode == 130
    lines = [line for line in done.stderr.splitlines() if "|" in line and not line.startswith("INFO")]
    assert lines == [
        "WARNING | interrupted (Ctrl-C) outside the training steps; every file written is whole, and --resume RUN "
        "goes on from a run's latest checkpoint"
    ]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").rglob("*.json"))


@pytest.mark.slow
def test_a_second_writer_exits_2_naming_the_first_and_a_damaged_checkpoint_resumes_from_an_intact_one(
    spec: Path, tmp_path: Path
) -> None:
    """Issue 19, items 5 and 2, through the program: ``--resume`` of a run another process holds is one line
    naming that process, exit 2, nothing written; ``--resume`` of a run whose newest checkpoint is cut short says
    which file is damaged and which checkpoint it continues from, and finishes the run from there."""
    run_dir = tmp_path / "run"
    common = ["--cache-dir", tmp_path / "cache", "--set", "train.checkpoint_every=2", "--stop-after", "4"]
    first = run_program("pretrain.py", spec, "--run-dir", run_dir, *common)
    assert first.returncode == 0, first.stderr
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        before = (run_dir / "metrics.jsonl").read_bytes()
        locked = run_program("pretrain.py", "--resume", run_dir, "--cache-dir", tmp_path / "cache")
        assert locked.returncode == 2
        errors = [line for line in locked.stderr.splitlines() if "ERROR" in line]
        assert len(errors) == 1
        assert f"is being written by another process (PID {holder.pid})" in errors[0]
        assert (run_dir / "metrics.jsonl").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()

    newest = run_dir / "checkpoints" / "step-0000004"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == newest.name
    os.truncate(newest / "params.safetensors", 100)
    resumed = run_program("pretrain.py", "--resume", run_dir, "--cache-dir", tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr
    warning = [
        line for line in resumed.stderr.splitlines() if "params.safetensors" in line and "WARNING" in line
    ]
    assert warning, resumed.stderr
    assert "step-0000002" in warning[0]
    assert "resumed from" in resumed.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000006"


def test_pretrain_resume_refuses_another_grad_accum(tmp_path: Path) -> None:
    """``train.grad_accum`` decides the rows step i reads (from i x batch x accumulation): README freezes it,
    and test_resume_refuses_a_different_model tried every frozen field but this one."""
    spec = tiny_spec(tmp_path, {"steps": 4, "batch_size": 4, "eval_every": 100, "eval_batches": 1})
    common = ["--cache-dir", tmp_path / "cache"]
    done = run_program("pretrain.py", spec, "--run-dir", tmp_path / "run", *common, "--stop-after", "1")
    assert done.returncode == 0, done.stderr
    refused = run_program("pretrain.py", "--resume", tmp_path / "run", *common, "--set", "train.grad_accum=2")
    assert refused.returncode == 2, refused.stderr
    assert "train.grad_accum differs from the run's" in refused.stderr.strip().splitlines()[-1]


def test_pretrain_with_grad_accum_reads_consecutive_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Micro-batch m of step i reads rows i x batch x accumulation + m x batch ...: 3 steps of 2 x 4 read rows
    0..23 once each. Only the distributed test ran grad_accum=2, comparing the program with itself."""
    seen: list[int] = []
    real = dataset.stream_batch

    def spy(source: Any, rows: range) -> Any:
        seen.extend(rows)
        return real(source, rows)

    monkeypatch.setattr(dataset, "stream_batch", spy)
    train = {"steps": 3, "batch_size": 4, "grad_accum": 2, "eval_every": 100, "eval_batches": 1}
    spec = tiny_spec(tmp_path, train)
    done = run_program("pretrain.py", spec, "--run-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert seen == list(range(24))


def test_the_final_evaluation_reads_the_whole_validation_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train.eval_batches``: "validation batches per periodic eval (the final eval uses all)"; the final
    record's val_loss and val_bpb (which the model card reports) came from eval_batches batches when the program
    passed eval_batches to the final evaluation too, and no test told."""
    limits: list[int | None] = []
    sizes: set[int] = set()
    real = step.held_out

    def spy(*args: Any, **kwargs: Any) -> Any:
        arguments = inspect.signature(real).bind(*args, **kwargs).arguments
        limits.append(arguments["max_batches"])
        sizes.add(arguments["batch_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "held_out", spy)
    train = {"steps": 2, "batch_size": 2, "grad_accum": 2, "eval_every": 1, "eval_batches": 1}
    spec = tiny_spec(tmp_path, train)
    done = run_program("pretrain.py", spec, "--run-dir", tmp_path / "run", "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert limits[-1] is None
    assert set(limits[:-1]) == {1}
    # No activations are kept for a backward pass: batches 4x a micro-batch (accumulation saves memory, and
    # the evaluation should not spend it).
    assert sizes == {4 * 2}


@pytest.mark.parametrize("decay_all", [True, False])
def test_pretrain_passes_on_the_specs_seed_decay_and_sequence_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decay_all: bool
) -> None:
    """``train.seed`` seeds the initial weights, the data's order, each step's dropout and the samples each
    evaluation logs (of the spec's prompts); each step decays the
    parameters ``decay_norms_and_biases`` says; MFU counts the FLOPs of ``data.seq_len``-token rows, not of the
    context; and a --cache-dir whose parents do not exist yet is made. No other test could see a program that passed a seed of 0 on, an inverted decay mask or the
    context (the tiny specs' rows fill it)."""
    seen: dict[str, list[Any]] = {"init": [], "prepare": [], "step": [], "flops": [], "samples": []}
    real_init, real_prepare, real_step, real_train = gpt.init, pipeline.prepare, step.train_step, loop.train
    real_samples = infer_sample.continue_texts

    def init(config: Any, seed: int, device: Any = "cpu") -> Any:
        if str(device) != "meta":  # shapes alone, for the parameter count and the sharding check
            seen["init"].append(seed)
        return real_init(config, seed, device)

    def prepare(config: Any, cache_dir: Any, seed: int = 0) -> Any:
        seen["prepare"].append(seed)
        return real_prepare(config, cache_dir, seed)

    def train_step(state: Any, batches: Any, /, **kwargs: Any) -> Any:
        seen["step"].append((kwargs["seed"], *decays_as_asked(kwargs["decay"], state["params"], decay_all)))
        return real_step(state, batches, **kwargs)

    def train(*args: Any, **kwargs: Any) -> Any:
        seen["flops"].append(kwargs["flops_per_token"])
        return real_train(*args, **kwargs)

    def continue_texts(*args: Any, **kwargs: Any) -> Any:
        seen["samples"].append(inspect.signature(real_samples).bind(*args, **kwargs).arguments["seed"])
        return real_samples(*args, **kwargs)

    monkeypatch.setattr(gpt, "init", init)
    monkeypatch.setattr(pipeline, "prepare", prepare)
    monkeypatch.setattr(step, "train_step", train_step)
    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(infer_sample, "continue_texts", continue_texts)
    train_section = {
        "steps": 2,
        "batch_size": 2,
        "eval_every": 1,
        "eval_batches": 1,
        "seed": 7,
        "optimizer": {"decay_norms_and_biases": decay_all},
    }
    spec = tiny_spec(tmp_path, train_section, {"dropout": 0.1})
    cache = tmp_path / "a" / "b" / "cache"
    done = run_program(
        "pretrain.py", spec, "--run-dir", tmp_path / "run", "--cache-dir", cache, "--set", "data.seq_len=16"
    )
    assert done.returncode == 0, done.stderr
    assert cache.is_dir()
    assert seen["init"] == [7]
    assert seen["prepare"] == [7]
    assert seen["step"] == [(7, True, not decay_all)] * 2
    assert seen["samples"] == [7] * 3  # at steps 0, 1 and the final evaluation
    config = gpt.GPTConfig(vocab_size=300, context=32, d_model=32, n_layers=2, n_heads=2, dropout=0.1)
    assert seen["flops"] == [report.gpt_flops_per_token(config, 16)]
    assert report.gpt_flops_per_token(config, 16) != report.gpt_flops_per_token(config, 32)
    samples = [line for line in done.stderr.splitlines() if "sample at step" in line]
    assert [line.split("sample at step ")[1].split(":")[0] for line in samples] == ["0", "1", "2"]


def test_pretrain_compiles_its_step_as_the_spec_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``train.compile`` chooses the compiled step functions (the spy hands back the eager ones: compiling
    takes a minute here); a program that passed False on trained eagerly whatever the spec said."""
    asked: list[bool] = []
    real = step.step_functions

    def spy(compile: bool) -> Any:
        asked.append(compile)
        return real(False)

    monkeypatch.setattr(step, "step_functions", spy)
    for compile in (True, False):
        train = {"steps": 1, "batch_size": 2, "eval_every": 100, "eval_batches": 1, "compile": compile}
        spec = tiny_spec(tmp_path, train)
        run_dir = tmp_path / f"run-{compile}"
        done = run_program("pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", tmp_path / "cache")
        assert done.returncode == 0, done.stderr
    assert asked == [True, False]
