"""programs/sft.py, grpo.py, dpo.py and evaluate.py end to end on a tiny random Llama and toy tasks.

The programs run in this process (``runpy``, as ``python programs/X.py`` would), which saves the ~20 s import of
torch and tensordict per run; ``--import`` loads the toy tasks as a user's own module would be loaded.
"""

import json
import runpy
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from loguru import logger
from safetensors.torch import load_file

from tests.integration import finetune_fixtures
from zmaj.convert.load import load_model, save_zmaj
from zmaj.models.lora import LoraConfig, init_adapters, merge
from zmaj.tasks import accuracy_interval, get_task
from zmaj.train import finetune, loop

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs" / "finetune"
FIXTURES = ["--import", "tests.integration.finetune_fixtures"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune_fixtures.tiny_model(tmp_path_factory.mktemp("finetune") / "model")


def run(program: str, *args: str | Path) -> tuple[int, str, str]:
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

    def ctrl_c(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", ctrl_c)  # the first checkpoint is written in the loop
    with pytest.raises(KeyboardInterrupt):
        run("sft.py", *spec, "--set", "lora={rank: 2}")
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
    rows = records(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    assert rows[-1]["reward_margin"] > 0.1
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
    args: list[str | Path] = [
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
    args: list[str | Path] = [
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
            "chats.bin: not UTF-8 text (byte 0xff at offset 1)",
        ),
        (
            "dpo.py",
            ["--set", "pairs={kind: files, paths: [BINARY]}"],
            "chats.bin: not UTF-8 text (byte 0xff at offset 1)",
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
