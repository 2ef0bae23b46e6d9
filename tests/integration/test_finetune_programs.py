"""programs/sft.py, grpo.py, dpo.py and evaluate.py end to end on a tiny random Llama and toy tasks.

The programs run in this process (``runpy``, as ``python programs/X.py`` would), which saves the ~20 s import of
torch and tensordict per run; ``--import`` loads the toy tasks as a user's own module would be loaded.
"""

import errno
import inspect
import json
import math
import os
import random
import runpy
import shutil
import signal
import sys
from dataclasses import replace
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from loguru import logger
from safetensors.torch import load_file

from tests.integration import finetune_fixtures
from tests.integration.programs import ctrl_c, decays_as_asked
from zmaj import fileio
from zmaj.convert.load import load_model, save_zmaj
from zmaj.data import chat_template
from zmaj.infer import generate as infer_generate
from zmaj.models.lora import LoraConfig, init_adapters, merge
from zmaj.nn import loss
from zmaj.tasks import Problem, accuracy_interval, get_task
from zmaj.train import dpo, finetune, grpo, logprobs, loop, optim, precision, runs, step
from zmaj.train.pairs import PAIRS_FILE, read_pairs

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs" / "finetune"
FIXTURES = ["--import", "tests.integration.finetune_fixtures"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune_fixtures.tiny_model(tmp_path_factory.mktemp("finetune") / "model")


def run(program: str, *args: object) -> tuple[int, str, str]:
    """Run ``programs/<program>`` with ``args``; its exit status, stdout and stderr."""
    argv, handler = sys.argv, signal.getsignal(signal.SIGINT)
    sys.argv = [program, *map(str, args)]
    code: int | str | None = 0
    out, err = _Capture(), _Capture()
    sink = logger.add(err.sink, format="{level} | {message}")
    stdout = sys.stdout
    sys.stdout = out
    try:
        runpy.run_path(str(ROOT / "programs" / program), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv, sys.stdout = argv, stdout
        signal.signal(signal.SIGINT, handler)
        logger.remove(sink)
    return int(code or 0), out.text, err.text


class _Capture:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def sink(self, message: object) -> None:
        self.text += str(message)

    def flush(self) -> None:
        pass


def records(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "params.safetensors"))


def assert_equal_files(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sft_lowers_the_loss_loads_as_the_trained_model_and_resumes_exactly(
    model: Path, tmp_path: Path
) -> None:
    spec: list[str | Path] = [SPECS / "sft-tiny.yaml", "--set", f"model={model}"]
    code, _, err = run("sft.py", *spec, "--run-dir", tmp_path / "straight")
    assert code == 0, err
    losses = [r["loss"] for r in records(tmp_path / "straight") if "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.5
    assert [r["step"] for r in records(tmp_path / "straight") if "eval_accuracy" in r] == [0, 3, 6]
    setups = [r["eval_setup"] for r in records(tmp_path / "straight") if "eval_accuracy" in r]
    evaluated = yaml.safe_load((tmp_path / "straight" / "spec.yaml").read_text())["eval"]
    assert setups == [evaluated] * 3  # what a model card labels the rows by
    assert (tmp_path / "straight" / "curves.png").is_file()

    trained, start = load_model(tmp_path / "straight"), load_model(model)
    saved = checkpoint_params(tmp_path / "straight")
    for key in trained.params.keys(True, True):
        assert torch.equal(trained.params.get(key), saved[".".join(key)])
    assert not torch.equal(trained.params["embed", "weight"], start.params["embed", "weight"])
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert trained.tokenizer.encode_chat(messages) == start.tokenizer.encode_chat(messages)

    code, _, err = run("sft.py", *spec, "--run-dir", tmp_path / "split", "--stop-after", "3")
    assert code == 0, err
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    # A SPEC beside --resume used to be ignored: the run went on with its own spec.yaml, silently.
    code, _, err = run("sft.py", SPECS / "sft-tiny.yaml", "--resume", tmp_path / "split")
    assert code == 2
    assert "give no SPEC, and change the run with --set" in err
    # The seed and the data decide the rows the remaining steps read: a resume cannot change them.
    for change in ("train.seed=7", "max_len=32"):
        code, _, err = run("sft.py", "--resume", tmp_path / "split", "--set", change)
        assert code == 2
        assert f"{change.split('=')[0]} differs from the run's; --set cannot change it" in err
    assert (tmp_path / "split" / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    code, _, err = run("sft.py", "--resume", tmp_path / "split")
    assert code == 0, err
    # Training is deterministic: a resume that started again from step 0 would end with the same weights.
    assert f"resumed from {tmp_path / 'split' / 'checkpoints' / 'step-0000003'} (step 3)" in err
    assert_equal_files(checkpoint_params(tmp_path / "straight"), checkpoint_params(tmp_path / "split"))


def test_a_run_dir_that_is_or_lies_inside_the_model_is_refused(model: Path, tmp_path: Path) -> None:
    """``--run-dir MODEL`` used to train, overwrite the model's tokenizer files, and leave a folder that loaded
    as the model's old weights; now the model is left as it was."""
    model = Path(shutil.copytree(model, tmp_path / "model"))
    before = {path.name: path.read_bytes() for path in model.iterdir()}
    spec: list[str | Path] = [SPECS / "sft-tiny.yaml", "--set", f"model={model}", "--set", "eval=null"]
    for run_dir, relation in [(model, "is"), (model / "run", "lies inside")]:
        code, _, err = run("sft.py", *spec, "--run-dir", run_dir, *FIXTURES)
        assert code == 2, err
        assert f"--run-dir {run_dir} {relation} the model {model}" in err
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before


def test_a_lora_sft_run_loads_as_its_base_with_the_adapters_merged(model: Path, tmp_path: Path) -> None:
    lora = ["--set", "lora={rank: 4, alpha: 8, targets: ['attn.*', 'mlp.up']}"]
    code, _, err = run(
        "sft.py", SPECS / "sft-tiny.yaml", "--set", f"model={model}", *lora, "--run-dir", tmp_path / "run"
    )
    assert code == 0, err
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    assert losses[-1] < losses[0]
    base = load_model(model)
    config = LoraConfig(rank=4, alpha=8, targets=("attn.*", "mlp.up"))
    template = init_adapters(base.params, config)
    adapters = checkpoint_params(tmp_path / "run")
    assert set(adapters) == {".".join(k) for k in template.keys(True, True)}  # only adapters are trained
    for key in template.keys(True, True):
        template.set(key, adapters[".".join(key)])
    expected = merge(base.params, template, config)
    loaded = load_model(tmp_path / "run")
    for key in expected.keys(True, True):
        assert torch.equal(loaded.params.get(key), expected.get(key)), key
    assert not torch.equal(
        loaded.params["blocks", "attn", "q", "weight"], base.params["blocks", "attn", "q", "weight"]
    )
    assert torch.equal(
        loaded.params["blocks", "mlp", "down", "weight"], base.params["blocks", "mlp", "down", "weight"]
    )


def test_a_lora_run_refuses_a_base_that_changed_and_merges_a_bfloat16_base_in_float32(tmp_path: Path) -> None:
    """Another model of the same shape put at the base's path (a re-conversion, another fine-tune) was merged
    with the run's adapters, and ``--resume`` trained them on; a moved base was named without its ``lora.json``;
    a damaged ``lora.json`` was a KeyError traceback. A bfloat16 base was merged in bfloat16, which rounded away
    about a fifth of the update's entries: not the model the run trained and evaluated (in float32)."""
    base = finetune_fixtures.tiny_model(tmp_path / "base")
    short = ["--set", "lora={rank: 4, alpha: 8, targets: ['attn.*']}", "--set", "eval=null"]
    short += ["--set", "train.steps=2"]
    code, _, err = run(
        "sft.py", SPECS / "sft-tiny.yaml", "--set", f"model={base}", *short, "--run-dir", tmp_path / "run"
    )
    assert code == 0, err
    trained = load_model(tmp_path / "run")
    # Runs from before attention's default became auto recorded sdpa, which is how the model is computed, not
    # another model: they load (they were refused). A field that makes another model is named.
    model_json = tmp_path / "run" / "model.json"
    recorded = json.loads(model_json.read_text())
    for attention in ("sdpa", "eager"):
        model_json.write_text(
            json.dumps(recorded | {"config": recorded["config"] | {"attention": attention}})
        )
        loaded = load_model(tmp_path / "run")
        assert all(
            torch.equal(loaded.params.get(k), trained.params.get(k)) for k in trained.params.keys(True, True)
        )
    model_json.write_text(json.dumps(recorded | {"config": recorded["config"] | {"norm_eps": 0.5}}))
    with pytest.raises(ValueError, match=r"is not the model model\.json describes \(norm_eps differ\)$"):
        load_model(tmp_path / "run")
    model_json.write_text(json.dumps(recorded))
    shutil.rmtree(base)
    with pytest.raises(
        FileNotFoundError, match=r"lora\.json names the base model .*/base, which cannot be loaded"
    ):
        load_model(tmp_path / "run")
    finetune_fixtures.tiny_model(base, seed=1)  # the same shape, other weights
    with pytest.raises(
        ValueError, match=r"lora\.json: the base model .*/base is not the one this run trained on"
    ):
        load_model(tmp_path / "run")
    code, _, err = run("sft.py", "--resume", tmp_path / "run", "--set", "train.steps=3")
    assert code == 2
    assert "is not the one this run trained on" in err
    record = tmp_path / "run" / "lora.json"
    kept = record.read_text()
    record.write_text(json.dumps({"base": str(base)}))
    with pytest.raises(ValueError, match=r"lora\.json: not a LoRA record"):
        load_model(tmp_path / "run")
    # A record from before the fingerprint cannot tell: the base is taken, and the user told so.
    record.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "base_sha256"}))
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        load_model(tmp_path / "run")
    finally:
        logger.remove(sink)
    assert warnings == [
        f"{record} records no fingerprint of its base model (an older zmaj wrote it): {base} is taken as the base "
        "the adapters were trained on, unchecked"
    ]
    record.write_text(kept)

    # A bfloat16 base: the run trains float32 adapters over its float32 copy, and loads as that model.
    half = save_zmaj(load_model(tmp_path / "base").to(dtype=torch.bfloat16), tmp_path / "half")
    code, _, err = run(
        "sft.py", SPECS / "sft-tiny.yaml", "--set", f"model={half}", *short, "--run-dir", tmp_path / "run16"
    )
    assert code == 0, err
    loaded = load_model(tmp_path / "run16")
    config = LoraConfig(rank=4, alpha=8, targets=("attn.*",))
    start = load_model(half).to(dtype=torch.float32)
    template = init_adapters(start.params, config)
    adapters = checkpoint_params(tmp_path / "run16")
    for key in template.keys(True, True):
        template.set(key, adapters[".".join(key)])
    expected = merge(start.params, template, config)
    for key in expected.keys(True, True):
        assert loaded.params.get(key).dtype == torch.float32, key
        assert torch.equal(loaded.params.get(key), expected.get(key)), key
    assert trained.params["embed", "weight"].dtype == torch.float32


def test_a_full_fine_tune_where_a_lora_run_died_before_its_first_checkpoint_loads_as_itself(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead run's ``lora.json`` used to stay, so the finished full fine-tune's checkpoints were read as
    adapters: generate.py and export.py failed on missing tensors ['attn.q.a', ...]."""
    run_dir = tmp_path / "run"
    spec: list[str | Path] = [SPECS / "sft-tiny.yaml", "--set", f"model={model}", "--set", "eval=null"]
    spec += ["--run-dir", run_dir]

    monkeypatch.setattr(loop, "train", ctrl_c)  # the first checkpoint is written in the loop
    code, _, err = run("sft.py", *spec, "--set", "lora={rank: 2}")
    assert code == 130, err  # (Ctrl-C outside the steps: runs.ctrl_c_exits_130)
    assert (run_dir / "lora.json").is_file()
    monkeypatch.undo()
    code, _, err = run("sft.py", *spec, "--set", "train.steps=1")
    assert code == 0, err
    loaded, saved = load_model(run_dir).params, checkpoint_params(run_dir)
    for key in loaded.keys(True, True):
        assert torch.equal(loaded.get(key), saved[".".join(key)]), key
    assert not (run_dir / "lora.json").exists()
    warnings = [line for line in err.splitlines() if "started afresh" in line]
    assert len(warnings) == 1, err
    assert "lora.json" in warnings[0]


def say_e_grpo(model: Path) -> list[str | Path]:
    """The tiny GRPO spec on ``model``, rewarded for saying "e" (a task of the test fixtures)."""
    return [SPECS / "grpo-tiny.yaml", "--set", f"model={model}", "--set", "task={name: say-e}", *FIXTURES]


def test_grpo_with_lora_raises_the_reward(model: Path, tmp_path: Path) -> None:
    """The adapters train (rollouts sample from the base with the adapters merged in, ``sampler_params``)."""
    lora = "lora={rank: 4, alpha: 8, targets: ['attn.*', 'mlp.*']}"
    spec = [*say_e_grpo(model), "--set", "train.steps=30", "--set", "train.optimizer.lr=0.1", "--set", lora]
    code, _, err = run("grpo.py", *spec, "--run-dir", tmp_path / "run")
    assert code == 0, err
    rewards = [r["reward"] for r in records(tmp_path / "run") if "reward" in r]
    # Slower than full fine-tuning here: the adapters cannot touch the embeddings, where this toy's reward is won.
    assert sum(rewards[-3:]) > 1.5 * sum(rewards[:3]), rewards


def test_grpo_raises_the_reward_and_resumes_exactly(model: Path, tmp_path: Path) -> None:
    spec = [*say_e_grpo(model), "--set", "train.steps=12"]
    code, _, err = run("grpo.py", *spec, "--run-dir", tmp_path / "straight")
    assert code == 0, err
    rows = [r for r in records(tmp_path / "straight") if "reward" in r]
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert all(0 <= r["clip_fraction"] <= 1 and r["completion_length"] > 0 for r in rows)

    code, _, err = run("grpo.py", *spec, "--run-dir", tmp_path / "split", "--stop-after", "5")
    assert code == 0, err
    latest = (
        tmp_path
        / "split"
        / "checkpoints"
        / (tmp_path / "split" / "checkpoints" / "latest").read_text().strip()
    )
    code, _, err = run("grpo.py", "--resume", tmp_path / "split", *FIXTURES)
    assert code == 0, err
    assert f"resumed from {latest} (step" in err  # not from step 0 again, which ends the same
    assert_equal_files(checkpoint_params(tmp_path / "straight"), checkpoint_params(tmp_path / "split"))


def test_grpo_with_a_kl_penalty_reports_it(model: Path, tmp_path: Path) -> None:
    code, _, err = run(
        "grpo.py",
        SPECS / "grpo-tiny.yaml",
        "--set",
        f"model={model}",
        "--set",
        "grpo.kl_beta=0.1",
        "--set",
        "lora={rank: 2}",
        "--run-dir",
        tmp_path / "run",
    )
    assert code == 0, err
    kls = [r["kl"] for r in records(tmp_path / "run") if "kl" in r]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # the first pass starts at the reference
    assert all(kl >= 0 for kl in kls)


def test_dpo_widens_the_margin_from_on_policy_pairs(model: Path, tmp_path: Path) -> None:
    spec: list[str | Path] = [
        SPECS / "dpo-tiny.yaml",
        "--set",
        f"model={model}",
        "--set",
        "pairs.task={name: say-e}",
        *FIXTURES,
    ]
    # fp32 named: auto is bf16 on a CPU with fast bf16 (AVX512-BF16, AMX), where the check below compared bf16
    # with itself.
    fp32 = ["--set", "train.precision=fp32"]
    code, _, err = run("dpo.py", *spec, *fp32, "--set", "train.steps=8", "--run-dir", tmp_path / "run")
    assert code == 0, err
    # dpo-tiny.yaml samples k=4 answers to each of 12 prompts, and says so before it starts
    assert "INFO | sampling 4 answers to each of 12 prompts for DPO pairs" in err
    rows = [row for row in records(tmp_path / "run") if "loss" in row]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    assert rows[-1]["reward_margin"] > 0.1
    end = records(tmp_path / "run")[-1]  # no evaluation in the spec: the end alone
    assert (end["step"], end["final"], sorted(end)) == (8, True, ["final", "step", "wall_s"])
    assert (tmp_path / "run" / "pairs.jsonl").is_file()
    assert load_model(tmp_path / "run").config == load_model(model).config
    # train.precision is honoured, as in SFT and GRPO: bf16 computes the same first step in other bits.
    bf16: list[str | Path] = [
        "--set",
        "train.steps=1",
        "--set",
        "train.precision=bf16",
        "--run-dir",
        tmp_path / "bf16",
    ]
    code, _, err = run("dpo.py", *spec, *bf16)
    assert code == 0, err
    [first] = [row for row in records(tmp_path / "bf16") if "loss" in row]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert first["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=0.1)
    assert first["grad_norm"] != rows[0]["grad_norm"]


def test_evaluate_prints_accuracy_with_its_wilson_interval(model: Path, tmp_path: Path) -> None:
    code, out, err = run(
        "evaluate.py",
        "--model",
        model,
        "--task",
        "always-right",
        "--n",
        "12",
        "--max-new-tokens",
        "3",
        "--answers",
        tmp_path / "answers.jsonl",
        *FIXTURES,
    )
    assert code == 0, err
    result = json.loads(out)
    _, low, high = accuracy_interval(12, 12)
    assert result["task"] == "always-right"
    assert (result["n"], result["accuracy"], result["low"], result["high"]) == (12, 1.0, low, high)
    assert result["format_rate"] == 1.0
    assert 1 <= result["mean_length"] <= 3
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    problems = get_task("always-right").problems("test", 12)
    assert [a["prompt"] for a in answers] == [p.prompt for p in problems]
    assert all(a["correct"] and a["format"] for a in answers)


def test_evaluate_on_a_disk_that_filled_meanwhile_prints_its_result_then_one_line(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--answers is written after the result is printed; a disk full by then was a traceback."""

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(fileio, "atomic_write_text", full)
    answers = tmp_path / "answers.jsonl"
    flags = ["--task", "always-right", "--n", "2", "--max-new-tokens", "2", "--answers", answers]
    code, out, err = run("evaluate.py", "--model", model, *flags, *FIXTURES)
    assert code == 2, err
    assert json.loads(out)["n"] == 2
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR | --answers: cannot write {answers} (No space left on device); nothing was written"
    ]


@pytest.mark.parametrize(
    ("flags", "mode"),
    [(["--few-shot", "2"], {"few_shot": 2}), (["--system", "Be brief."], {"system": "Be brief."})],
)
def test_evaluate_answers_in_the_mode_asked_for(
    model: Path, tmp_path: Path, flags: list[str], mode: dict[str, Any]
) -> None:
    """--few-shot K and --system change the prompts: the program's answers are the library's in that mode, which
    differ from the plain chat mode's (a flag parsed and checked but not passed on evaluated in chat mode)."""
    answers = tmp_path / "answers.jsonl"
    args = [
        "--model",
        model,
        "--task",
        "arithmetic",
        "--n",
        "6",
        "--max-new-tokens",
        "6",
        *flags,
    ]
    code, _, err = run("evaluate.py", *args, "--answers", answers)
    assert code == 0, err
    printed = [json.loads(line)["completion"] for line in answers.read_text().splitlines()]
    pretrained, task = load_model(model), get_task("arithmetic")
    problems = task.problems("test", 6, 0)
    asked = finetune.evaluate_task(pretrained, task, problems, max_new_tokens=6, batch_size=32, **mode)
    chat = finetune.evaluate_task(pretrained, task, problems, max_new_tokens=6, batch_size=32)
    assert printed == list(asked.completions)
    assert asked.completions != chat.completions


def test_evaluate_answers_file_keeps_correctness_and_format_apart(model: Path, tmp_path: Path) -> None:
    """The answers file's "correct" is the checker's correctness and its "format" the format: for a task right
    without the format they differ on every line, as accuracy and format_rate do."""
    answers = tmp_path / "answers.jsonl"
    args = [
        "--model",
        model,
        "--task",
        "right-without-format",
        "--n",
        "4",
        "--max-new-tokens",
        "3",
    ]
    code, out, err = run("evaluate.py", *args, *FIXTURES, "--answers", answers)
    assert code == 0, err
    assert (json.loads(out)["accuracy"], json.loads(out)["format_rate"]) == (1.0, 0.0)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [(line["correct"], line["format"]) for line in lines] == [(True, False)] * 4


def bad_conversations(tmp_path: Path) -> Path:
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    return path


@pytest.mark.parametrize(
    ("program", "args", "message"),
    [
        ("sft.py", ["--set", "train.stepz=3"], "train.stepz"),
        ("sft.py", ["--set", "lora={targets: [attn.nope]}"], "'attn.nope' matches no matrix"),
        ("sft.py", ["--set", "data={kind: files, paths: [CHATS]}"], "chats.jsonl:2"),
        (
            "sft.py",
            ["--set", "data={kind: files, paths: [BINARY]}"],
            "chats.bin: not UTF-8 text (byte 0xff at offset 1, line 1)",
        ),
        (
            "dpo.py",
            ["--set", "pairs={kind: files, paths: [BINARY]}"],
            "chats.bin: not UTF-8 text (byte 0xff at offset 1, line 1)",
        ),
        pytest.param(
            "sft.py",
            ["--set", "train.device=cuda"],
            "train.device: cuda was asked for",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
        ("sft.py", ["--set", "lora={rank: 2}", "--set", "train.parallel.kind=fsdp"], "use dp with lora"),
        ("grpo.py", ["--set", "train.parallel.kind=fsdp"], "GRPO trains data-parallel (dp) only"),
        ("sft.py", ["--set", "model=/no/such/model"], "/no/such/model"),
        ("sft.py", ["--set", "model=pypi:no-such"], "pypi:no-such"),
        ("grpo.py", ["--set", "grpo.sampling={temperature: 0.7, top_k: 5}"], "without top_k/top_p"),
        ("grpo.py", ["--set", "task={name: reward-raises}"], "completion 0"),
        ("grpo.py", ["--set", "task={name: reward-nan}"], "non-finite"),
        # Found before the run (a traceback at its first step, leaving a run folder without a checkpoint).
        ("grpo.py", ["--set", "train.prompts_per_step=250"], "distinct train problems of the 250 asked"),
        ("evaluate.py", ["--task", "no-such-task"], "unknown task 'no-such-task'"),
        ("evaluate.py", ["--task", "arithmetic", "--n", "0"], "--n must be at least 1, got 0"),
        (
            "evaluate.py",
            ["--task", "arithmetic", "--few-shot", "-1"],
            "--few-shot must be at least 0, got -1",
        ),
        # --help's default of 128 new tokens, past the tiny model's context of 128 with any prompt.
        (
            "evaluate.py",
            ["--task", "arithmetic"],
            "plus max_new_tokens=128 is past the model's context of 128",
        ),
        (
            "evaluate.py",
            ["--task", "arithmetic", "--max-new-tokens", "0"],
            "--max-new-tokens must be at least 1",
        ),
        (
            "evaluate.py",
            ["--task", "arithmetic", "--batch-size", "0"],
            "--batch-size must be at least 1, got 0",
        ),
        ("evaluate.py", ["--task", "arithmetic", "--dtype", "float32"], "--dtype cannot be used with --task"),
        (
            "evaluate.py",
            ["--task", "arithmetic", "--output", "r.json"],
            "--output cannot be used with --task",
        ),
        ("evaluate.py", ["--task", "arithmetic", "--set-task", "digits=0"], "digits"),
        ("evaluate.py", ["--task", "arithmetic", "--set-task", "digits=[3"], "digits=[3: not valid YAML"),
        (
            "evaluate.py",
            ["--task", "arithmetic", "--max-new-tokens", "120"],
            "is past the model's context of 128",
        ),
        ("sft.py", ["--set", "eval.max_new_tokens=200"], "eval.max_new_tokens: 201 tokens do not fit"),
        ("sft.py", ["--set", "eval.max_new_tokens=120"], "eval: a prompt of"),
        ("evaluate.py", ["--task", "arithmetic", "--answers", "/no/such/folder/a.jsonl"], "/no/such/folder"),
        ("evaluate.py", ["--task", "arithmetic", "--answers", "/tmp"], "--answers: /tmp is a folder"),
        # A folder it may not write in (/proc even for root): refused before the evaluation, not after it.
        (
            "evaluate.py",
            ["--task", "arithmetic", "--answers", "/proc/a.jsonl"],
            "--answers: cannot write in /proc",
        ),
        (
            "evaluate.py",
            ["--task", "arithmetic", "--few-shot", "2", "--system", "Be brief."],
            "--system goes",
        ),
        ("sft.py", ["--set", "eval={task: arithmetic, few_shot: 2, system: hi}"], "system goes before"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_problem(
    model: Path, tmp_path: Path, program: str, args: list[str], message: str
) -> None:
    (tmp_path / "chats.bin").write_bytes(b"{\xff\xfe}\n")
    args = [a.replace("CHATS", str(bad_conversations(tmp_path))) for a in args]
    args = [a.replace("BINARY", str(tmp_path / "chats.bin")) for a in args]
    if program == "evaluate.py":
        args = ["--model", str(model), *args]
    else:
        args = [str(SPECS / f"{program.removesuffix('.py')}-tiny.yaml"), "--set", f"model={model}", *args]
        args += ["--run-dir", str(tmp_path / "run")]
    code, _, err = run(program, *args, *FIXTURES)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert message in errors[0]


def test_evaluate_names_a_missing_model(tmp_path: Path) -> None:
    code, _, err = run("evaluate.py", "--model", tmp_path / "nothing", "--task", "arithmetic")
    assert code == 2
    assert str(tmp_path / "nothing") in err


EVERY_PROGRAM = [
    ("sft.py", []),
    ("dpo.py", ["pairs.task={name: say-e}"]),
    ("grpo.py", ["task={name: say-e}"]),
]
"""Each fine-tuning program with the ``--set`` its tiny spec needs to run quickly (say-e: short answers)."""


def tiny(program: str, model: Path, *sets: str) -> list[str | Path]:
    """The program's tiny spec fine-tuning ``model``, each of ``sets`` a ``--set``, and the toy tasks."""
    spec = SPECS / f"{program.removesuffix('.py')}-tiny.yaml"
    return [
        spec,
        "--set",
        f"model={model}",
        *(arg for change in sets for arg in ("--set", change)),
        *FIXTURES,
    ]


@pytest.mark.parametrize(
    ("program", "sets", "change"),
    [
        ("sft.py", [], "train.grad_accum=2"),
        ("sft.py", [], "data.n=8"),
        ("sft.py", [], "max_len=100"),  # cuts no conversation, so the data reads the same
        ("sft.py", [], "train.batch_size=2"),
        ("dpo.py", ["pairs.task={name: say-e}"], "pairs.n_prompts=6"),
        ("dpo.py", ["pairs.task={name: say-e}"], "train.batch_size=2"),
        ("grpo.py", ["task={name: say-e}"], "train.passes=1"),
        ("grpo.py", ["task={name: say-e}"], "train.prompts_per_step=2"),
        ("grpo.py", ["task={name: say-e}"], "task.system=Be brief."),  # the same problems, other prompts
    ],
)
def test_resume_refuses_each_frozen_field(
    model: Path, tmp_path: Path, program: str, sets: list[str], change: str
) -> None:
    """README lists what a resume cannot change: SFT's data and accumulation, DPO's pairs and GRPO's passes
    among them (left out of a program's frozen fields, the resumed run read other rows, or other pairs)."""
    code, _, err = run(
        program, *tiny(program, model, "eval=null", *sets), "--run-dir", tmp_path / "run", "--stop-after", "1"
    )
    assert code == 0, err
    code, _, err = run(program, "--resume", tmp_path / "run", "--set", change, *FIXTURES)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert f"{change.split('=')[0]} differs from the run's; --set cannot change it" in errors[0]
    # The same change edited into spec.yaml by hand (read_spec compares --set with the file): the checkpoint
    # records what it was trained with.
    name, value = change.split("=")
    edited = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
    *parents, key = name.split(".")
    section = edited
    for part in parents:
        section = section[part]
    section[key] = yaml.safe_load(value)
    (tmp_path / "run" / "spec.yaml").write_text(yaml.safe_dump(edited))
    code, _, err = run(program, "--resume", tmp_path / "run", *FIXTURES)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    # SFT's data and GRPO's first problems are fingerprinted as well (data.json), which refuses them first.
    fingerprinted = name.startswith("data.") or name == "train.prompts_per_step"
    refusal = "the data differs" if fingerprinted else f"was written with another {name} than the run's"
    assert refusal in errors[0]


@pytest.mark.parametrize(
    ("program", "sets"),
    EVERY_PROGRAM,
)
def test_each_update_writes_into_the_state_it_replaces(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, sets: list[str]
) -> None:
    """The programs donate each step's state to its update (``apply_grads(donate=True)``), as pre-training does:
    an update on copies held a second set of weights and moments (and of clipped gradients) at its peak, 6.9
    against 4.7 GB for SmolLM2-135M's full fine-tuning."""
    donated: list[bool] = []
    real = optim.writable

    def spy(tree: Any, donate: bool) -> Any:
        donated.append(donate)
        return real(tree, donate)

    monkeypatch.setattr(optim, "writable", spy)
    code, _, err = run(
        program, *tiny(program, model, "eval=null", "train.steps=2", *sets), "--run-dir", tmp_path
    )
    assert code == 0, err
    assert donated
    assert all(donated)


@pytest.mark.parametrize(
    ("program", "sets"),
    [
        ("sft.py", []),
        ("sft.py", ["lora={rank: 2, targets: ['attn.*']}"]),
        ("dpo.py", ["pairs.task={name: say-e}"]),
        ("grpo.py", ["task={name: say-e}", "grpo.kl_beta=0.1"]),
    ],
)
def test_losses_and_log_probs_unembed_a_chunk_of_positions_at_a_time(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, sets: list[str]
) -> None:
    """Every loss and log-prob of a fine-tuning step (the policy's, the reference's, a rollout's) is computed
    from the hidden states a chunk of positions at a time (``zmaj.nn.loss``), never from the whole
    ``[batch, seq, vocab]`` logits, which with a large vocabulary were a step's largest tensors, twice over."""
    chunks: list[int] = []
    real = loss._chunk

    def counted(*args: Any, **kwargs: Any) -> Any:
        chunks.append(1)
        return real(*args, **kwargs)

    def whole(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the whole logits were computed")

    monkeypatch.setattr(loss, "_chunk", counted)
    monkeypatch.setattr(step, "token_losses", whole)  # the plain training loss
    monkeypatch.setattr(logprobs, "at_least_float32", whole)  # the plain log-probs
    code, _, err = run(
        program, *tiny(program, model, "eval=null", "train.steps=2", *sets), "--run-dir", tmp_path
    )
    assert code == 0, err
    assert chunks


@pytest.mark.parametrize(("program", "sets"), [("sft.py", ["eval.n=4"]), ("grpo.py", ["task={name: say-e}"])])
def test_sampling_prefills_into_the_caches_made_for_it(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, sets: list[str]
) -> None:
    """Evaluations and GRPO's rollouts make a cache for each batch of prompts, and the prefill writes into it
    (``generate(donate=True)``): a copying prefill held up to three caches at once."""
    donated: list[bool] = []
    real = infer_generate.stream

    def spy(*args: Any, **kwargs: Any) -> Any:
        donated.append(kwargs.get("donate", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(infer_generate, "stream", spy)
    code, _, err = run(program, *tiny(program, model, "train.steps=2", *sets), "--run-dir", tmp_path)
    assert code == 0, err
    assert donated
    assert all(donated)


def test_a_template_that_tells_the_date_gives_a_run_the_day_it_began(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Llama 3.2's template writes today's date into every conversation: a run began one day and resumed the
    next trained on other tokens (now refused: its data changed). The day a run begins is its spec's
    ``chat_date``, which the resumed run keeps; a run from before the field takes the day its first session
    started (``run.jsonl``)."""
    day = datetime(2026, 12, 6, 23, 59)

    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> "Clock":
            return cls.fromtimestamp(day.timestamp(), tz)

    monkeypatch.setattr(chat_template, "datetime", Clock)
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ strftime_now('%d %b %Y') }} {{ m['content'] }}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    spec = tiny("sft.py", model, "eval=null", f"chat_template={json.dumps(template)}")
    split = tmp_path / "split"
    code, _, err = run("sft.py", *spec, "--run-dir", split, "--stop-after", "1")
    assert code == 0, err
    assert yaml.safe_load((split / "spec.yaml").read_text())["chat_date"] == "2026-12-06"
    day = datetime(2026, 12, 7, 0, 1)
    code, _, err = run("sft.py", "--resume", split, "--stop-after", "1", *FIXTURES)
    assert code == 0, err
    # As a run from before chat_date: its spec has none, its first session began on the 6th.
    written = yaml.safe_load((split / "spec.yaml").read_text())
    del written["chat_date"]
    (split / "spec.yaml").write_text(yaml.safe_dump(written))
    sessions = [json.loads(line) for line in (split / "run.jsonl").read_text().splitlines()]
    sessions[0]["time"] = datetime(2026, 12, 6, 23, 59).timestamp()
    (split / "run.jsonl").write_text("".join(json.dumps(record) + "\n" for record in sessions))
    day = datetime(2026, 12, 9, 12, 0)
    code, _, err = run("sft.py", "--resume", split, *FIXTURES)
    assert code == 0, err
    assert yaml.safe_load((split / "spec.yaml").read_text())["chat_date"] == "2026-12-06"
    code, _, err = run("sft.py", *spec, "--set", "chat_date=2026-12-06", "--run-dir", tmp_path / "straight")
    assert code == 0, err
    assert_equal_files(checkpoint_params(split), checkpoint_params(tmp_path / "straight"))


def test_dpo_refuses_a_run_folder_it_cannot_use_before_sampling_its_pairs(
    model: Path, tmp_path: Path
) -> None:
    """Sampling on-policy pairs takes minutes on a real model: a ``--run-dir`` under a file was refused after."""
    (tmp_path / "notes.txt").write_text("mine")
    spec = tiny("dpo.py", model, "pairs.task={name: say-e}")
    code, _, err = run("dpo.py", *spec, "--run-dir", tmp_path / "notes.txt" / "run")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR | cannot create the run folder {tmp_path / 'notes.txt' / 'run'}: Not a directory"
    ]
    assert "sampling" not in err.lower()
    assert "right and a wrong answer" not in err


def test_sft_resume_refuses_conversations_edited_since_the_run_began(model: Path, tmp_path: Path) -> None:
    """The spec names the same file; its conversations changed, so the resumed steps would read other rows.
    Rewritten with the same ones, the run goes on."""
    path = tmp_path / "chats.jsonl"

    def chats(answer: str) -> str:
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} + 1?"},
                    {"role": "assistant", "content": a},
                ]
            }
            for i, a in enumerate([answer, "2", "3", "4", "5", "6"])
        ]
        return "".join(json.dumps(row) + "\n" for row in rows)

    path.write_text(chats("1"))
    spec = tiny("sft.py", model, "eval=null", f"data={{kind: files, paths: [{path}]}}")
    code, _, err = run("sft.py", *spec, "--run-dir", tmp_path / "run", "--stop-after", "1")
    assert code == 0, err
    path.write_text(chats("one"))
    code, _, err = run("sft.py", "--resume", tmp_path / "run", *FIXTURES)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert "the data differs from the run's (data changed since the run began" in errors[0]
    path.write_text(chats("1"))
    code, _, err = run("sft.py", "--resume", tmp_path / "run", *FIXTURES)
    assert code == 0, err


def test_grpo_resume_refuses_a_task_edited_to_draw_other_problems(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task is code the spec names but cannot pin: the user's module, edited between sessions, drew other
    problems, and the resumed steps trained on them unchecked. Put back as it was, the run goes on, with
    another evaluation if asked (its problems are not the steps')."""
    evaluation = "eval={task: say-e, n: 2, max_new_tokens: 2}"
    spec = [*say_e_grpo(model), "--set", "train.steps=2", "--set", evaluation]
    code, _, err = run("grpo.py", *spec, "--run-dir", tmp_path / "run", "--stop-after", "1")
    assert code == 0, err
    assert set(json.loads((tmp_path / "run" / "data.json").read_text())) == {"train problems"}
    drawn = finetune_fixtures.ToyTask.generate

    def edited(self: finetune_fixtures.ToyTask, rng: random.Random) -> Problem:
        problem = drawn(self, rng)
        return replace(problem, prompt=problem.prompt.replace("Say", "Write"))

    monkeypatch.setattr(finetune_fixtures.ToyTask, "generate", edited)
    code, _, err = run("grpo.py", "--resume", tmp_path / "run", *FIXTURES)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert "the data differs from the run's (train problems changed since" in errors[0]
    monkeypatch.undo()
    # The evaluation reads nothing the steps do: its problems may change (a resume with another eval.n).
    code, _, err = run("grpo.py", "--resume", tmp_path / "run", "--set", "eval.n=3", *FIXTURES)
    assert code == 0, err


def pairs_file(folder: Path, n: int) -> str:
    """``pairs=`` a file of ``n`` arithmetic preference pairs: DPO without sampling its pairs first."""
    path = folder / "pairs.jsonl"
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(n)]
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return f"pairs={{kind: files, paths: [{path}]}}"


def drawn_rows(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Every ``finetune.draw`` the programs make from now on: the example indices of each call."""
    seen: list[list[int]] = []
    real = finetune.draw

    def spy(n: int, seed: int, start: int, count: int) -> list[int]:
        rows = real(n, seed, start, count)
        seen.append(list(rows))
        return rows

    monkeypatch.setattr(finetune, "draw", spy)
    return seen


def test_sft_with_grad_accum_reads_each_conversation_once_per_epoch(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step i takes rows [i x batch x accumulation, ...) of the shuffled epochs: with 16 conversations, 2 steps
    of 2 x 4 read all 16 once (starting at i x batch, a step re-read half of the previous one's)."""
    seen = drawn_rows(monkeypatch)
    sets = ["eval=null", "train.steps=2", "train.batch_size=4", "train.grad_accum=2"]
    code, _, err = run("sft.py", *tiny("sft.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert sorted(i for rows in seen for i in rows) == list(range(16))


def test_dpo_steps_read_consecutive_pairs(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step i takes pairs [i x batch, (i + 1) x batch) of the shuffled epochs, so one epoch's steps never share a
    pair (a draw starting at i overlapped by batch - 1 pairs)."""
    seen = drawn_rows(monkeypatch)
    sets = [pairs_file(tmp_path, 8), "train.steps=2", "train.batch_size=2"]
    code, _, err = run("dpo.py", *tiny("dpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    first, second = seen[-2:]
    assert not set(first) & set(second), seen


def test_dpo_resume_reads_the_runs_own_pairs_and_is_exact(model: Path, tmp_path: Path) -> None:
    """Pairs are made once and kept in pairs.jsonl, "so a resumed run reads the same ones" (dpo.py), even when
    their source changed since: the resumed run ends where the straight one does."""
    spec = tiny("dpo.py", model, pairs_file(tmp_path, 8))
    code, _, err = run("dpo.py", *spec, "--run-dir", tmp_path / "straight")
    assert code == 0, err
    code, _, err = run("dpo.py", *spec, "--run-dir", tmp_path / "split", "--stop-after", "1")
    assert code == 0, err
    pairs_file(tmp_path, 2)  # the source changed after the run began
    code, _, err = run("dpo.py", "--resume", tmp_path / "split")
    assert code == 0, err
    assert "; 8 preference pairs" in err
    straight, split = checkpoint_params(tmp_path / "straight"), checkpoint_params(tmp_path / "split")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name


def test_dpo_beta_scales_the_first_gradient(model: Path, tmp_path: Path) -> None:
    """At the reference every pair's margin is 0, so the DPO gradient is beta/2 times the log-ratio's: beta 0.5
    gives 5 times beta 0.1's gradient norm (a step that ignored ``train.beta`` gave the same)."""
    norms = {}
    for beta in (0.1, 0.5):
        sets = [pairs_file(tmp_path, 4), "train.precision=fp32", "train.steps=1", f"train.beta={beta}"]
        code, _, err = run("dpo.py", *tiny("dpo.py", model, *sets), "--run-dir", tmp_path / str(beta))
        assert code == 0, err
        [first] = [r for r in records(tmp_path / str(beta)) if "loss" in r]
        norms[beta] = first["grad_norm"]
    assert norms[0.5] == pytest.approx(5 * norms[0.1], rel=1e-4)


def test_dpo_in_bf16_scores_the_reference_in_the_policys_precision(model: Path, tmp_path: Path) -> None:
    """At the first step policy and reference are the same model: under bf16 the reward margin is exactly 0 and
    the loss log 2 when both run under the same autocast (a float32 reference gave a margin of -4e-5, within
    the 1e-3 the other DPO test allows its loss)."""
    sets = [pairs_file(tmp_path, 4), "train.precision=bf16", "train.steps=1"]
    code, _, err = run("dpo.py", *tiny("dpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    [first] = [r for r in records(tmp_path / "run") if "loss" in r]
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-7)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_grpo_with_two_passes_clips_and_reports_the_mean_of_its_passes(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``train.passes`` > 1 the rollout records the old log-probs, so the second pass's ratio moves and
    clips (without them each pass took its own as the old ones: a ratio of 1, plain policy gradient). A step's
    row is the mean of its passes' metrics, not the last pass's."""
    passes: list[dict[str, float]] = []
    real = grpo.grpo_step

    def spy(*args: Any, **kwargs: Any) -> Any:
        state, metrics = real(*args, **kwargs)
        passes.append({key: float(value) for key, value in metrics.items()})
        return state, metrics

    monkeypatch.setattr(grpo, "grpo_step", spy)
    sets = ["task={name: say-e}", "train.optimizer.lr=0.1", "train.steps=3"]
    code, _, err = run("grpo.py", *tiny("grpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    rows = [r for r in records(tmp_path / "run") if "clip_fraction" in r]
    assert any(r["clip_fraction"] > 0 for r in rows)
    assert len(passes) == 2 * len(rows) == 6
    for row, first, second in zip(rows, passes[::2], passes[1::2], strict=True):
        for key in ("loss", "clip_fraction", "grad_norm"):
            assert row[key] == pytest.approx((first[key] + second[key]) / 2, rel=1e-5), key


def test_grpo_samples_each_step_with_its_own_seed(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sampling seed mixes in the step, so steps do not replay one random stream; and sampling stops at the
    tokenizer's end-of-turn tokens (without them answers ran on past the turn's end, and were trained on)."""
    seeds: list[int] = []
    stops: list[tuple[int, ...]] = []
    real = grpo.sample_rollout

    def spy(*args: Any, **kwargs: Any) -> Any:
        arguments = inspect.signature(real).bind(*args, **kwargs).arguments
        seeds.append(arguments["seed"])
        stops.append(arguments["config"].stop_tokens)
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "sample_rollout", spy)
    sets = ["task={name: say-e}", "train.steps=3", "train.passes=1", "grpo.group_size=2"]
    code, _, err = run("grpo.py", *tiny("grpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert len(set(seeds)) == 3, seeds
    assert all(set(load_model(model).tokenizer.stop_ids) <= set(stop) for stop in stops), stops


def test_grpo_accuracy_counts_right_answers_not_formatted_ones(model: Path, tmp_path: Path) -> None:
    """``accuracy`` and ``format_rate`` are two curves of the run and its card; with a task always well formed
    and never right they are 0 and 1 (the other toy tasks have them equal)."""
    sets = ["task={name: format-only}", "train.steps=1"]
    code, _, err = run("grpo.py", *tiny("grpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    [row] = [r for r in records(tmp_path / "run") if "reward" in r]
    assert (row["accuracy"], row["format_rate"]) == (0.0, 1.0)


def test_grpo_tells_the_task_which_answers_ran_into_the_token_limit(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The program hands the task reward the tokens that end an answer (the tokenizer's stop tokens among
    them): without them every answer reads as cut by the limit, and a right "Answer:" line earns nothing."""
    seen: list[tuple[set[int], set[int]]] = []
    original = grpo.task_reward

    def recording(task, tokenizer, problems, where, scored, stop_tokens):  # type: ignore[no-untyped-def]
        seen.append((set(stop_tokens), set(tokenizer.stop_ids)))
        return original(task, tokenizer, problems, where, scored, stop_tokens)

    monkeypatch.setattr(grpo, "task_reward", recording)
    spec = tiny("grpo.py", model, "eval=null", "task={name: say-e}")
    code, _, err = run("grpo.py", *spec, "--run-dir", tmp_path / "run", "--stop-after", "1")
    assert code == 0, err
    assert seen
    assert all(stops and stops >= ids for stops, ids in seen)


def test_dpo_batches_put_each_pairs_chosen_answer_first(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``preference_batch`` takes the preferred answers, then the rejected ones: swapped, DPO learned the
    opposite preference, and its loss, margin and accuracy (computed on the swapped batch) read the same."""
    seen: set[tuple[tuple[int, ...], ...]] = set()
    real = dpo.preference_batch

    def spy(prompts: Any, chosen: Any, rejected: Any, device: Any) -> Any:
        seen.update(zip(map(tuple, prompts), map(tuple, chosen), map(tuple, rejected), strict=True))
        return real(prompts, chosen, rejected, device)

    monkeypatch.setattr(dpo, "preference_batch", spy)
    sets = [pairs_file(tmp_path, 4), "train.steps=2", "train.batch_size=2"]
    code, _, err = run("dpo.py", *tiny("dpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    made = read_pairs(tmp_path / "run" / PAIRS_FILE, finetune_fixtures.VOCAB)
    assert seen == {(tuple(p.prompt), tuple(p.chosen), tuple(p.rejected)) for p in made}


def test_grpo_prompts_carry_the_tasks_system_message(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``task.system`` begins every training prompt, as it begins the evaluation's: left out, the model was
    trained on prompts other than those it is evaluated and used with."""
    prompts: list[list[int]] = []
    real = grpo.sample_rollout

    def spy(*args: Any, **kwargs: Any) -> Any:
        prompts.extend(inspect.signature(real).bind(*args, **kwargs).arguments["prompts"])
        return real(*args, **kwargs)

    monkeypatch.setattr(grpo, "sample_rollout", spy)
    sets = ["eval=null", "task={name: say-e, system: Be brief.}", "train.steps=1", "train.passes=1"]
    code, _, err = run("grpo.py", *tiny("grpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    tokenizer = load_model(model).tokenizer
    assert len(prompts) == 4
    for ids in prompts:
        problem = tokenizer.decode(ids).split("Say something, number ")[1].split()[0]
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Say something, number {problem}"},
        ]
        assert ids == tokenizer.encode_chat(messages, add_generation_prompt=True)


def test_grpo_stops_at_a_step_whose_prompt_and_answers_pass_the_context(model: Path, tmp_path: Path) -> None:
    """A prompt plus ``grpo.max_new_tokens`` past the model's context is said before sampling, in one line (it
    sampled on past the context in silence)."""
    sets = ["eval=null", "task={name: say-e}", "grpo.max_new_tokens=120"]
    code, _, err = run("grpo.py", *tiny("grpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert "step 1: grpo: a prompt of" in errors[0]
    assert "plus max_new_tokens=120 is past the model's context of 128 tokens" in errors[0]


def test_grpo_accuracy_counts_only_wholly_right_answers(model: Path, tmp_path: Path) -> None:
    """A user's task may give partial credit: ``accuracy`` counts the answers whose correctness is 1, as the
    evaluation does, not those with any (a half-right answer is not a right one)."""
    sets = ["task={name: half-right}", "train.steps=1"]
    code, _, err = run("grpo.py", *tiny("grpo.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    [row] = [r for r in records(tmp_path / "run") if "reward" in r]
    assert (row["accuracy"], row["format_rate"]) == (0.0, 1.0)


@pytest.mark.parametrize(("precision", "decay_all"), [("bf16", False), ("fp32", True)])
def test_sft_steps_take_the_specs_precision_seed_and_decay(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, decay_all: bool
) -> None:
    """Each SFT step runs under ``train.precision``'s autocast, seeds dropout with ``train.seed`` and decays the
    parameters ``decay_norms_and_biases`` says (the tiny model has no dropout and its spec no weight decay, so
    no other test would see a step that ignored them)."""
    seen: list[dict[str, Any]] = []
    real = step.train_step

    def spy(state: Any, batches: Any, /, **kwargs: Any) -> Any:
        seen.append({**kwargs, "decays": decays_as_asked(kwargs["decay"], state["params"], decay_all)})
        return real(state, batches, **kwargs)

    monkeypatch.setattr(step, "train_step", spy)
    sets = [
        "eval=null",
        "train.steps=1",
        "train.seed=7",
        f"train.precision={precision}",
        f"train.optimizer.decay_norms_and_biases={decay_all}",
    ]
    code, _, err = run("sft.py", *tiny("sft.py", model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    [kwargs] = seen
    assert kwargs["seed"] == 7
    if precision == "bf16":
        assert isinstance(kwargs["autocast"], torch.autocast)
        assert kwargs["autocast"].fast_dtype == torch.bfloat16
    else:
        assert not isinstance(kwargs["autocast"], torch.autocast)
    assert kwargs["decays"] == (True, not decay_all)


@pytest.mark.parametrize("decay_all", [False, True])
@pytest.mark.parametrize(
    ("program", "module", "step_name", "sets"),
    [
        ("dpo.py", dpo, "dpo_step", ["pairs.task={name: say-e}", "lora=null"]),  # adapters are matrices only
        ("grpo.py", grpo, "grpo_step", ["task={name: say-e}", "train.passes=1"]),
    ],
)
def test_dpo_and_grpo_steps_decay_what_the_spec_says(
    model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    program: str,
    module: Any,
    step_name: str,
    sets: list[str],
    decay_all: bool,
) -> None:
    """``decay_norms_and_biases`` decides which parameters each update decays, as in SFT (a program that passed
    a constant on decayed the norms and biases of every run, or of none)."""
    same: list[tuple[bool, bool]] = []
    real = getattr(module, step_name)

    def spy(state: Any, batch: Any, /, **kwargs: Any) -> Any:
        same.append(decays_as_asked(kwargs["decay"], state["params"], decay_all))
        return real(state, batch, **kwargs)

    monkeypatch.setattr(module, step_name, spy)
    sets = ["eval=null", "train.steps=1", f"train.optimizer.decay_norms_and_biases={decay_all}", *sets]
    code, _, err = run(program, *tiny(program, model, *sets), "--run-dir", tmp_path / "run")
    assert code == 0, err
    assert same == [(True, not decay_all)]


@pytest.mark.parametrize(
    ("program", "sets"),
    EVERY_PROGRAM,
)
def test_a_resume_reads_the_checkpoint_into_parameters_that_hold_no_values(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, sets: list[str]
) -> None:
    """``--resume`` hands ``Run.restore`` the parameters' shapes alone, on the meta device: the starting model's
    values, kept beside the checkpoint's, were one model more for the whole run."""
    code, _, err = run(
        program, *tiny(program, model, "eval=null", *sets), "--run-dir", tmp_path / "run", "--stop-after", "1"
    )
    assert code == 0, err
    devices: list[set[str]] = []
    real = runs.Run.restore

    def spy(self: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        devices.append({tensor.device.type for tensor in params.values(True, True)})
        return real(self, params, *args, **kwargs)

    monkeypatch.setattr(runs.Run, "restore", spy)
    code, _, err = run(program, "--resume", tmp_path / "run", "--stop-after", "1", *FIXTURES)
    assert code == 0, err
    assert devices == [{"meta"}]


def test_evaluate_samples_its_answers_in_batches_of_batch_size(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--batch-size is how many answers are sampled at once: lowered to fit a model in memory, it was 32 all
    the same."""
    sizes: list[int] = []
    real = infer_generate.generate  # which finetune imported by name

    def spy(*args: Any, **kwargs: Any) -> Any:
        sizes.append(len(inspect.signature(real).bind(*args, **kwargs).arguments["prompts"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune, "generate", spy)
    flags = [
        "--task",
        "arithmetic",
        "--set-task",
        "digits=1",
        "--n",
        5,
        "--batch-size",
        2,
        "--max-new-tokens",
        4,
    ]
    code, out, err = run("evaluate.py", "--model", model, *flags)
    assert code == 0, err
    assert json.loads(out)["n"] == 5
    assert sizes == [2, 2, 1]


@pytest.mark.parametrize(
    ("program", "sets"),
    [
        ("sft.py", ["lora={rank: 4, targets: ['attn.*', 'mlp.*']}"]),
        ("dpo.py", ["pairs.task={name: say-e}", "lora=null"]),  # the reference alone
        # One step of two passes: the next step's rollouts come from the adapters merged into the stored base,
        # round(round(W) + BA) in bf16 where it was round(W + BA) (``finetune.full_params``).
        ("grpo.py", ["task={name: say-e}", "lora={rank: 4, targets: ['attn.*']}", "grpo.kl_beta=0.1"]),
    ],
)
def test_a_start_read_in_bf16_matmuls_takes_the_same_steps_from_bf16_matrices(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, program: str, sets: list[str]
) -> None:
    """Under bf16, a start the run only reads (LoRA's base, DPO's and GRPO's references) keeps its block
    matrices in bf16 (``precision.for_matmuls``) and every other tensor in float32: half the matrices' bytes, and
    every loss and gradient norm the same to the bit as the run whose start stays float32 for autocast to cast
    at each matmul (GRPO's first step: its sampler is the stored base merged)."""
    real = precision.for_matmuls
    stored: list[dict[bool, set[torch.dtype]]] = []  # a block matrix or not -> the dtypes kept

    def spy(params: Any, dtype: torch.dtype) -> Any:
        kept = real(params, dtype)
        dtypes: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
        for key in kept.keys(True, True):
            dtypes[key[0] == "blocks" and kept.get(key).ndim == 3].add(kept.get(key).dtype)
        stored.append(dtypes)
        return kept

    lines: list[list[dict[str, float]]] = []
    for for_matmuls in (spy, lambda params, dtype: params):
        monkeypatch.setattr(finetune, "for_matmuls", for_matmuls)
        out = tmp_path / f"run-{len(lines)}"
        steps = 1 if program == "grpo.py" else 2
        sets_ = ("eval=null", f"train.steps={steps}", "train.precision=bf16", *sets)
        code, _, err = run(program, *tiny(program, model, *sets_), "--run-dir", out)
        assert code == 0, err
        lines.append([{k: v for k, v in r.items() if k in ("loss", "grad_norm")} for r in records(out)])
    assert stored == [{True: {torch.bfloat16}, False: {torch.float32}}]
    assert lines[0] == lines[1]
    assert any("grad_norm" in line for line in lines[0])
