"""The training programs under ``torchrun`` with 2 CPU processes (gloo): the same run as one process, exact
resumption, checkpoints that move between world sizes and layouts, and a job that fails together and fast.

Each ``torchrun`` launch starts 2 fresh interpreters (about 10 s of imports on 2 cores), so the cases share
launches where they can.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.integration import finetune_fixtures
from tests.integration.programs import run_program
from tests.integration.test_distributed import torchrun
from tests.integration.test_pretrain_program import tiny_spec
from zmaj.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pre-training spec without dropout (whose masks depend on the rank) in float32."""
    train = {
        "steps": 6,
        "batch_size": 4,
        "grad_accum": 2,
        "precision": "fp32",
        "eval_every": 3,
        "eval_batches": 2,
        "checkpoint_every": 100,
    }
    return tiny_spec(tmp_path_factory.mktemp("distributed-pretrain"), train, max_new_tokens=3)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "params.safetensors"))


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool = False) -> None:
    """Equal (``exact``), or within 1e-6 of the parameters' norm (see ``test_distributed``)."""
    assert got.keys() == want.keys()
    if exact:
        for key in want:
            assert torch.equal(got[key], want[key]), key
        return
    error = torch.stack([(got[k] - want[k]).double().norm() for k in want]).norm()
    scale = torch.stack([want[k].double().norm() for k in want]).norm()
    assert error <= 1e-6 * scale, float(error / scale)


def step_records(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def eval_records(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_n" in r]


def pretrain(spec: Path, run_dir: Path, *args: str, nproc: int = 2) -> str:
    """``torchrun`` of ``programs/pretrain.py``; its output, after checking it succeeded."""
    done = torchrun(
        "programs/pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", spec.parent, *args, nproc=nproc
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def test_two_ranks_train_the_one_process_run_resume_exactly_and_move_between_layouts(
    spec: Path, tmp_path: Path
) -> None:
    alone, straight, split = tmp_path / "alone", tmp_path / "straight", tmp_path / "split"
    alone_done = run_program("pretrain.py", spec, "--run-dir", alone, "--cache-dir", spec.parent)
    assert alone_done.returncode == 0, alone_done.stderr

    output = pretrain(spec, straight)
    assert_close(final_params(straight), final_params(alone))
    pretrain(
        spec, tmp_path / "sharded", "--set", "train.parallel.kind=fsdp"
    )  # a fresh fsdp run, each its share
    assert_close(final_params(tmp_path / "sharded"), final_params(alone))
    # The metrics are global, and only rank 0 writes them and logs.
    assert [r["tokens"] for r in step_records(straight)] == [r["tokens"] for r in step_records(alone)]
    assert output.count("done in") == 1
    assert all(line.startswith("rank 1 | WARNING") for line in output.splitlines() if "rank 1 |" in line)

    pretrain(spec, split, "--stop-after", "3")
    for layout in ("fsdp", "one"):
        shutil.copytree(split, tmp_path / layout)
    done = torchrun("programs/pretrain.py", "--resume", split, "--cache-dir", spec.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {split / 'checkpoints' / 'step-0000003'} (step 3)" in done.stderr
    assert_close(final_params(split), final_params(straight), exact=True)

    # Written by 2 data-parallel ranks, resumed by 2 fully sharded ones and by one process.
    done = torchrun(
        "programs/pretrain.py",
        "--resume",
        tmp_path / "fsdp",
        "--cache-dir",
        spec.parent,
        "--set",
        "train.parallel.kind=fsdp",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert_close(final_params(tmp_path / "fsdp"), final_params(straight))
    one = run_program("pretrain.py", "--resume", tmp_path / "one", "--cache-dir", spec.parent)
    assert one.returncode == 0, one.stderr
    assert_close(final_params(tmp_path / "one"), final_params(straight))

    # Written by one process, resumed by 2 data-parallel ranks.
    begun = run_program(
        "pretrain.py", spec, "--run-dir", tmp_path / "two", "--cache-dir", spec.parent, "--stop-after", "3"
    )
    assert begun.returncode == 0, begun.stderr
    done = torchrun("programs/pretrain.py", "--resume", tmp_path / "two", "--cache-dir", spec.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_close(final_params(tmp_path / "two"), final_params(alone))


def test_a_world_size_that_cannot_split_the_batch_is_refused_by_rank_0_before_anything_is_written(
    spec: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    first = run_program(
        "pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", spec.parent, "--stop-after", "1"
    )
    assert first.returncode == 0, first.stderr
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    done = torchrun("programs/pretrain.py", "--resume", run_dir, "--cache-dir", spec.parent, nproc=3)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "train.batch_size is 4, which 3 ranks cannot split evenly" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_run_folder_rank_0_cannot_create_stops_every_rank_with_one_line(spec: Path, tmp_path: Path) -> None:
    """Rank 0 alone claims the run folder; when it cannot, the other ranks learn it from rank 0 and exit too,
    instead of waiting for a folder name that never comes or failing later with their own tracebacks."""
    (tmp_path / "a-file").touch()
    done = torchrun(
        "programs/pretrain.py", spec, "--run-dir", tmp_path / "a-file" / "run", "--cache-dir", spec.parent
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "cannot create the run folder" in errors[0]
    assert "a-file/run: Not a directory" in errors[0]
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr[-3000:]  # torchrun's own is fine


def test_a_rank_that_fails_stops_the_whole_job_within_seconds(tmp_path: Path) -> None:
    model = finetune_fixtures.tiny_model(tmp_path / "model")
    started = time.monotonic()
    done = torchrun(
        "programs/grpo.py",
        ROOT / "specs" / "finetune" / "grpo-tiny.yaml",
        "--set",
        f"model={model}",
        "--set",
        "task={name: raises-on-rank-1}",
        "--run-dir",
        tmp_path / "run",
        "--import",
        "tests.integration.finetune_fixtures",
        timeout=120,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 60  # start-up included; a hang would wait for the 30-minute timeout
    failing = [line for line in done.stderr.splitlines() if "the checker broke on rank 1" in line]
    assert failing, done.stderr[-3000:]
    assert "rank 1 | ERROR | step 1, completion 0" in failing[0]  # (rank 0's progress bar may share the line)


def test_bad_input_rank_1_alone_meets_is_named_in_torchruns_summary(tmp_path: Path) -> None:
    """Rank 0 logs bad input for all (they read it alike); one that only rank 1 met was exit status 2 and no
    word of why. Rank 1 leaves its line for ``torchrun``, whose summary of the failure shows it."""
    done = torchrun(
        "programs/grpo.py",
        ROOT / "specs" / "finetune" / "grpo-tiny.yaml",
        "--set",
        f"model={finetune_fixtures.tiny_model(tmp_path / 'model')}",
        "--run-dir",
        tmp_path / "run",
        "--import",
        "tests.integration.fails_on_rank_1",
        timeout=120,
    )
    assert done.returncode != 0
    assert "ERROR" not in done.stderr, done.stderr[-3000:]  # rank 1 does not log it: rank 0 would for all
    assert "traceback : tasks.txt: no such file on this node\n" in done.stderr, done.stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr[-3000:]


def test_a_prompt_too_long_for_the_context_on_one_rank_is_told_by_rank_0(tmp_path: Path) -> None:
    """Every rank checks the longest prompt of the whole step, so all refuse it together and rank 0 says why;
    checked on its own share, only rank 1 refused, silently (its error left to rank 0 to report), and rank 0
    died in the next collective with gloo's "Connection closed by peer"."""
    task, per_step = get_task("long-or-short"), 4
    # A seed whose first step has its long prompts on rank 1 only (the spec's seed * 1_000_003 + step).
    seed = next(
        s
        for s in range(100)
        if [len(p.prompt) > 100 for p in task.problems("train", per_step, seed=s * 1_000_003)]
        == [False, False, True, True]
    )
    done = torchrun(
        "programs/grpo.py",
        ROOT / "specs" / "finetune" / "grpo-tiny.yaml",
        "--set",
        f"model={finetune_fixtures.tiny_model(tmp_path / 'model')}",
        "--set",
        "task={name: long-or-short}",
        "--set",
        f"train.seed={seed}",
        "--set",
        "grpo.max_new_tokens=64",  # short prompts fit the context of 128, long ones do not
        "--run-dir",
        tmp_path / "run",
        "--import",
        "tests.integration.finetune_fixtures",
        timeout=120,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "step 1: grpo: a prompt of" in errors[0]
    assert "past the model's context of 128 tokens" in errors[0]
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr[-3000:]


def test_dpo_pairs_rank_0_cannot_make_stop_every_rank_with_one_line(tmp_path: Path) -> None:
    """Rank 0 alone samples the on-policy pairs; when it finds none, the others learn it from rank 0 and exit
    with it, rather than die in the broadcast that waited for the pairs."""
    done = torchrun(
        "programs/dpo.py",
        ROOT / "specs" / "finetune" / "dpo-tiny.yaml",
        "--set",
        f"model={finetune_fixtures.tiny_model(tmp_path / 'model')}",
        "--set",
        "pairs.task={name: always-right}",  # every answer right: no pair prefers one to another
        "--run-dir",
        tmp_path / "run",
        "--import",
        "tests.integration.finetune_fixtures",
        timeout=120,
    )
    codes = re.findall(r"exitcode *: (\d+)", done.stderr)  # torchrun names each rank's, and may say one again
    assert len(codes) >= 2, done.stderr[-3000:]
    assert set(codes) == {"2"}, done.stderr[-3000:]  # bad input, on both ranks
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "pairs: no preference pair was found" in errors[0]
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_its_one_line(
    spec: Path, tmp_path: Path
) -> None:
    """Rank 0 writes checkpoints; when a write fails (here: files over 200 KB refused, as on a full disk), the
    other ranks learn it and exit with it, instead of dying in the next step's all-reduce with a traceback."""
    pretrain(
        spec, tmp_path / "warm", "--set", "train.steps=1"
    )  # the tokenizer and token caches, written whole

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "programs/pretrain.py"]
    options = ["--run-dir", tmp_path / "run", "--cache-dir", spec.parent, "--set", "train.checkpoint_every=2"]
    done = subprocess.run(
        [*command, spec, *map(str, options)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=small_files,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "could not save" in errors[0]
    assert "File too large" in errors[0]
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr[-3000:]


@pytest.mark.parametrize("steps", [2, 1])
def test_damaged_records_rank_0_reads_on_resume_stop_every_rank_with_one_line(
    spec: Path, tmp_path: Path, steps: int
) -> None:
    """Rank 0 alone reads the run's metrics when a resume starts (to drop records past its checkpoint; of a
    finished run, to find its final evaluation); a damaged line there is one line and exit 2 on every rank,
    where rank 1 used to wait in the next collective and die there with a gloo traceback."""
    run_dir = tmp_path / "run"
    alone = run_program(
        "pretrain.py", spec, "--run-dir", run_dir, "--cache-dir", spec.parent, "--set", "train.steps=1"
    )
    assert alone.returncode == 0, alone.stderr
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 1, "loss": \n{"step": 1}\n')  # a torn line, then a whole one
    done = torchrun(
        "programs/pretrain.py",
        "--resume",
        run_dir,
        "--cache-dir",
        spec.parent,
        "--set",
        f"train.steps={steps}",
    )
    codes = re.findall(r"exitcode *: (\d+)", done.stderr)
    assert len(codes) >= 2, done.stderr[-3000:]
    assert set(codes) == {"2"}, done.stderr[-3000:]  # bad input, on both ranks
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr[-3000:]
    assert f"{run_dir / 'metrics.jsonl'}:" in errors[0]
    assert "not JSON" in errors[0]
    assert not re.search(r"\[rank\d\]: Traceback", done.stderr), done.stderr[-3000:]


def test_ctrl_c_stops_every_rank_after_the_same_step_and_saves(spec: Path, tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches ``torchrun`` and every rank (one process group); ``torchrun`` then sends the
    ranks SIGTERM, which the loop takes as a stop too: the ranks agree on the step, save it, and exit."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "programs/pretrain.py"]
    args = [
        str(spec),
        "--run-dir",
        str(run_dir),
        "--cache-dir",
        str(spec.parent),
        "--set",
        "train.steps=100000",
    ]
    job = subprocess.Popen(
        [*command, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(step_records(run_dir)) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert saved >= 3
    assert f"stopped at step {saved}; continue with --resume {run_dir}" in stderr
    assert max(r["step"] for r in step_records(run_dir)) == saved


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune_fixtures.tiny_model(tmp_path_factory.mktemp("distributed-finetune") / "model")


def finetune_args(program: str, model: Path, *sets: str) -> list[str | Path]:
    """``program``'s tiny spec fine-tuning ``model`` in float32 (bf16 rounds the one-process and the 2-rank
    batches differently), with ``sets`` and the toy tasks."""
    changes = [f"model={model}", "train.precision=fp32", *sets]
    return [
        ROOT / "specs" / "finetune" / f"{program.removesuffix('.py')}-tiny.yaml",
        *(arg for change in changes for arg in ("--set", change)),
        "--import",
        "tests.integration.finetune_fixtures",
    ]


@pytest.mark.parametrize(
    ("program", "sets"),
    [
        ("sft.py", ["train.parallel.kind=fsdp", "train.grad_accum=2", "eval.n=4"]),
        ("dpo.py", ["pairs={kind: files, paths: [PAIRS]}"]),  # LoRA, data-parallel
        ("dpo.py", ["pairs={kind: files, paths: [PAIRS]}", "lora=null", "train.parallel.kind=fsdp"]),
    ],
)
def test_fine_tuning_on_two_ranks_trains_the_one_process_run(
    tiny_model: Path, tmp_path: Path, program: str, sets: list[str]
) -> None:
    """SFT and DPO through ``torchrun``, each layout they take: the programs' own batches and steps on 2 ranks
    give the one-process run (the steps alone are tested in ``test_distributed``)."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(8)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = finetune_args(program, tiny_model, *(change.replace("PAIRS", str(pairs)) for change in sets))
    alone = run_program(program, *args, "--run-dir", tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr
    done = torchrun(f"programs/{program}", *args, "--run-dir", tmp_path / "two", timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count("done in") == 1  # rank 0 alone logs
    assert_close(final_params(tmp_path / "two"), final_params(tmp_path / "alone"))
    two, one = step_records(tmp_path / "two"), step_records(tmp_path / "alone")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for key in ("loss", "tokens") if program == "sft.py" else ("loss", "reward_margin"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    if program == "sft.py":
        # Each rank answers its share of eval.n's problems, pooled into one score of all of them.
        two, one = eval_records(tmp_path / "two"), eval_records(tmp_path / "alone")
        assert [r["step"] for r in two] == [r["step"] for r in one]
        assert {r["eval_n"] for r in two + one} == {4}


def test_grpo_on_two_ranks_resumes_exactly(tiny_model: Path, tmp_path: Path) -> None:
    """GRPO's ranks sample their own completions (seeds that include the rank), so 2 ranks are not one process;
    what holds is that a stopped and resumed 2-rank run draws the same rollouts as the uninterrupted one."""
    args = finetune_args("grpo.py", tiny_model, "task={name: say-e}")
    straight = torchrun("programs/grpo.py", *args, "--run-dir", tmp_path / "straight", timeout=120)
    assert straight.returncode == 0, straight.stderr[-4000:]
    begun = torchrun(
        "programs/grpo.py", *args, "--run-dir", tmp_path / "split", "--stop-after", "2", timeout=120
    )
    assert begun.returncode == 0, begun.stderr[-4000:]
    done = torchrun("programs/grpo.py", "--resume", tmp_path / "split", *args[-2:], timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_close(final_params(tmp_path / "split"), final_params(tmp_path / "straight"), exact=True)
    losses = [r["loss"] for r in step_records(tmp_path / "straight")]
    assert len(losses) == 4
    assert len(set(losses)) > 1  # rewards differed: the steps did train
    assert [r["loss"] for r in step_records(tmp_path / "split")] == losses


def test_every_rank_renders_rank_0s_day(tiny_model: Path, tmp_path: Path) -> None:
    """A chat template that writes the date renders ``chat_date``, the day the run began; each rank filled it
    from its own clock, and ranks in time zones a day apart trained on other conversations than rank 0 recorded."""
    args = finetune_args("sft.py", tiny_model, "eval=null", "train.steps=1")
    done = torchrun(
        "tests/integration/sft_in_time_zones.py", *args, "--run-dir", tmp_path / "run", timeout=120
    )
    assert done.returncode == 0, done.stderr[-4000:]
    days = sorted(line for line in done.stdout.splitlines() if " renders " in line)
    assert len(days) == 2, done.stdout
    recorded = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())["chat_date"]
    assert days == [f"rank 0 renders {recorded}", f"rank 1 renders {recorded}"]
