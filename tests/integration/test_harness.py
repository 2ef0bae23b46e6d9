"""zmaj's lm-evaluation-harness backend answers every request as the harness's own ``hf`` backend does on the same
weights: the same per-request log-likelihoods (within 1e-4 in float32), the same greedy flags and generations,
and so the same metrics.

The tasks are the tiny offline ones of ``tests/data/harness`` (multiple choice, rolling perplexity, generation
with ``until`` stops and exact match), run with ``max_length=32`` so that rolling texts span several windows and
long prompts are cut. Two models: a small random zmaj GPT saved as a zmaj folder and exported to Hugging Face
(fast), and SmolLM2-135M-Instruct from its GGUF file, which ``transformers`` reads too (slow).
"""

import errno
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lm_eval
import pytest
import torch
import transformers
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tensordict import TensorDict

from tests.integration.gguf_reference import load_reference
from tests.integration.programs import ROOT, run_program
from zmaj import fileio
from zmaj.convert import weights
from zmaj.convert.export import save_hf
from zmaj.convert.load import Pretrained, save_zmaj
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.eval import harness
from zmaj.eval.harness import ZmajLM
from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig

TASKS = ROOT / "tests" / "data" / "harness"
MAX_LENGTH = 32


@pytest.fixture(autouse=True)
def offline_from_the_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the Hub; the tasks' data files are named relative to the repository root."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def tasks() -> TaskManager:
    """The tiny tasks alone: indexing lm-eval's own hundreds of task folders takes seconds."""
    return TaskManager(include_path=str(TASKS), include_defaults=False)


def evaluate(lm: LM, tasks: TaskManager, limit: int | None = None) -> dict[str, Any]:
    results: dict[str, Any] = lm_eval.simple_evaluate(
        model=lm,
        tasks=["zmaj_tiny"],
        task_manager=tasks,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
    )
    return results


def assert_same_answers(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Request by request: the same prompts, log-likelihoods within 1e-4, greedy flags and texts equal."""
    assert set(ours["samples"]) == set(theirs["samples"]) == set(ours["results"])
    for task, samples in theirs["samples"].items():
        assert len(ours["samples"][task]) == len(samples) > 0
        for mine, reference in zip(ours["samples"][task], samples, strict=True):
            assert mine["arguments"] == reference["arguments"]
            for answer, expected in zip(mine["resps"], reference["resps"], strict=True):
                (answer,), (expected,) = answer, expected
                if isinstance(expected, str):
                    assert answer == expected, (task, mine["arguments"])
                elif isinstance(expected, tuple):
                    assert answer[0] == pytest.approx(expected[0], abs=1e-4), (task, mine["arguments"])
                    assert answer[1] == expected[1], (task, mine["arguments"])
                else:
                    assert answer == pytest.approx(expected, abs=1e-4), (task, mine["arguments"])
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float) and not math.isnan(value):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def tiny_texts() -> list[str]:
    lines = [json.loads(line) for path in TASKS.glob("*.jsonl") for line in path.read_text().splitlines()]
    return [" ".join(str(value) for value in line.values()) for line in lines] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random GPT (every parameter off its init value) as a zmaj model folder and as its HF export."""
    config = GPTConfig(vocab_size=300, context=64, d_model=32, n_layers=2, n_heads=4)
    tokenizer = ModelTokenizer.from_zmaj(Tokenizer.train(tiny_texts(), config.vocab_size))
    generator = torch.Generator().manual_seed(1)
    params = gpt.init(config, 0).apply(lambda t: t + 0.1 * torch.randn(t.shape, generator=generator))
    assert isinstance(params, TensorDict)
    model = Pretrained(config, params, tokenizer)
    folder = tmp_path_factory.mktemp("tiny")
    return save_zmaj(model, folder / "zmaj"), save_hf(model, folder / "hf")


@pytest.fixture(scope="module")
def tiny_results(tiny: tuple[Path, Path], tasks: TaskManager) -> tuple[dict[str, Any], dict[str, Any]]:
    zmaj_folder, hf_folder = tiny
    ours = ZmajLM(path=str(zmaj_folder), dtype="float32", batch_size=4, device="cpu", max_length=MAX_LENGTH)
    theirs = HFLM(
        pretrained=transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(hf_folder),
        batch_size=4,
        max_length=MAX_LENGTH,
        device="cpu",
    )
    return evaluate(ours, tasks), evaluate(theirs, tasks)


def test_a_zmaj_gpt_answers_as_the_hf_backend_on_its_export(
    tiny_results: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    ours, theirs = tiny_results
    assert_same_answers(ours, theirs)
    # The test means something: rolling texts span several windows and some generations stopped at a stop string.
    generations = [s["resps"][0][0] for s in ours["samples"]["zmaj_tiny_generation"]]
    assert any(len(g) > 0 for g in generations)


@pytest.mark.slow
def test_smollm2_answers_as_the_hf_backend_on_its_gguf(tasks: TaskManager) -> None:
    path = weights.smollm2_gguf()
    ours = ZmajLM(path=str(path), dtype="float32", batch_size=3, device="cpu", max_length=MAX_LENGTH)
    reference, tokenizer = load_reference(path)
    theirs = HFLM(
        pretrained=reference,
        tokenizer=tokenizer,
        batch_size=3,
        max_length=MAX_LENGTH,
        device="cpu",
    )
    assert_same_answers(evaluate(ours, tasks, limit=3), evaluate(theirs, tasks, limit=3))


@pytest.mark.slow  # the whole program: lm-eval indexes its hundreds of task folders
def test_evaluate_program_reports_the_harness_results(
    tiny: tuple[Path, Path], tiny_results: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    output = tmp_path / "results.json"
    result = run_program(
        "evaluate.py",
        *("--model", tiny[0], "--harness", "zmaj_tiny", "--harness-include", TASKS, "--limit", 2),
        *("--dtype", "float32", "--batch-size", 4, "--output", output),
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    ours, _ = tiny_results
    # The multiple-choice scores of the first two documents, as the library call scored them (the program's model
    # reads the whole context of 64, the fixture's 32, which changes only the rolling and generation scores).
    first_two = [s for s in ours["samples"]["zmaj_tiny_multiple_choice"] if s["doc_id"] < 2]
    for metric in ("acc", "acc_norm"):
        expected = sum(s[metric] for s in first_two) / 2
        assert printed["results"]["zmaj_tiny_multiple_choice"][f"{metric},none"] == pytest.approx(expected)
    assert set(printed["results"]) == set(ours["results"])
    assert "samples" not in printed
    assert set(json.loads(output.read_text())["samples"]) == set(ours["results"])
    # The results table, its columns named (pytablewriter 0.38, which the lock once chose, named them A, B, C).
    assert "zmaj_tiny_generation" in result.stderr
    assert "|Metric|" in result.stderr.replace(" ", "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--harness", "no_such_task"), "--harness: unknown tasks no_such_task"),
        (("--harness", " , "), "--harness: no task given"),
        (("--harness", "zmaj_tiny", "--harness-include", "no/such/folder"), "--harness-include: no folder"),
        (("--harness", "zmaj_tiny", "--few-shot", "2"), "--few-shot cannot be used with --harness"),
        (("--harness", "zmaj_tiny", "--n", "5", "--seed", "3"), "--n, --seed cannot be used with --harness"),
        (("--task", "arithmetic", "--limit", "5"), "--limit cannot be used with --task"),
        (("--harness", "zmaj_tiny", "--batch-size", "0"), "--batch-size must be at least 1"),
        (("--harness", "zmaj_tiny", "--limit", "nan"), "--limit must be a number above 0, got nan"),
        (("--harness", "zmaj_tiny", "--limit", "inf"), "--limit must be a number above 0, got inf"),
        # lm-eval reads 0 as no document at all: a ValueError traceback from inside it.
        (("--harness", "zmaj_tiny", "--limit", "0"), "--limit must be a number above 0, got 0.0"),
        (("--harness", "zmaj_tiny", "--num-fewshot", "-1"), "--num-fewshot must be at least 0, got -1"),
        (("--harness", "zmaj_tiny", "--output", "/proc/r.json"), "--output: cannot write in /proc"),
    ],
)
def test_evaluate_program_refuses_bad_harness_input_in_one_line(
    tiny: tuple[Path, Path], args: tuple[str, ...], message: str
) -> None:
    result = run_program("evaluate.py", "--model", tiny[0], "--harness-include", TASKS, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_evaluate_program_passes_its_harness_flags_to_lm_eval(
    tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """--chat, --num-fewshot, --limit and --dtype are checked, then handed to lm-eval and the backend: dropped,
    every benchmark ran zero-shot, without the template, over every document, in the machine's default dtype
    (each dtype differs from ``auto`` on some machine)."""
    seen: dict[str, Any] = {}

    def record(**kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {"results": {}, "versions": {}, "n-shot": {}, "higher_is_better": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", record)
    name = str(dtype).removeprefix("torch.")
    flags = ("--chat", "--num-fewshot", "2", "--limit", "3", "--dtype", name)
    result = run_program(
        "evaluate.py", "--model", tiny[0], "--harness", "zmaj_tiny", "--harness-include", TASKS, *flags
    )
    assert result.returncode == 0, result.stderr
    assert (seen["apply_chat_template"], seen["num_fewshot"], seen["limit"]) == (True, 2, 3)
    assert {tensor.dtype for tensor in seen["model"].model.params.values(True, True)} == {dtype}


def test_what_a_task_asks_and_the_backend_cannot_do_is_one_line(
    tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend refuses a task's generation settings it cannot honour (``zmaj.eval.harness``) with a
    ValueError from inside ``simple_evaluate``: a traceback, after the model had loaded and any earlier tasks
    had run."""

    def refused(*args: object, **kwargs: object) -> None:
        harness.sampling_from({"repetition_penalty": 1.2})  # what the backend raises for such a task

    monkeypatch.setattr(lm_eval, "simple_evaluate", refused)
    result = run_program(
        "evaluate.py", "--model", tiny[0], "--harness", "zmaj_tiny", "--harness-include", TASKS
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ERROR | --harness: the zmaj backend does not support generation_kwargs ['repetition_penalty']"
    ]

    def bug(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug inside the evaluation")

    monkeypatch.setattr(lm_eval, "simple_evaluate", bug)  # not the user's input: its traceback stays
    with pytest.raises(ValueError, match="a bug inside the evaluation"):
        run_program("evaluate.py", "--model", tiny[0], "--harness", "zmaj_tiny", "--harness-include", TASKS)


def test_a_disk_full_before_the_output_is_written_is_one_line_after_the_results(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--output is written after the results are printed; a disk that filled by then was a traceback."""
    results = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1}},
        "versions": {"t": 1},
        "n-shot": {"t": 0},
        "higher_is_better": {"t": {"acc": True}},
    }

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: dict(results))
    monkeypatch.setattr(fileio, "atomic_write_text", full)
    output = tmp_path / "results.json"
    args = ("--harness", "zmaj_tiny", "--harness-include", TASKS, "--output", output)
    result = run_program("evaluate.py", "--model", tiny[0], *args)
    assert result.returncode == 2, result.stderr
    assert json.loads(result.stdout)["results"] == results["results"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR | --output: cannot write {output} (No space left on device); nothing was written"
    ]


def test_chat_with_a_model_without_a_template_is_refused_in_one_line(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    """Found before lm-eval builds its requests, where the template's absence was a traceback."""
    folder = shutil.copytree(tiny[0], tmp_path / "no-template")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    args = ("--harness", "zmaj_tiny_multiple_choice", "--harness-include", TASKS, "--chat", "--limit", "2")
    result = run_program("evaluate.py", "--model", folder, *args)
    assert result.returncode == 2
    assert f"--chat: the tokenizer of {folder} has no chat template" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_without_lm_eval_harness_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tiny: tuple[Path, Path]
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an import finds when lm-eval is not installed
    result = run_program("evaluate.py", "--model", tiny[0], "--harness", "zmaj_tiny")
    assert result.returncode == 2
    assert "pip install 'zmaj[eval]'" in result.stderr


@pytest.mark.slow  # the whole program: lm-eval indexes its hundreds of task folders
def test_the_harness_command_line_knows_zmaj_and_its_own_backends(
    tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``python -m zmaj.eval.harness`` is lm-eval's command with ``zmaj`` registered; ``hf`` is still there."""
    assert lm_eval.api.registry.get_model("zmaj") is ZmajLM
    assert lm_eval.api.registry.get_model("hf") is HFLM
    model_args = f"path={tiny[0]},dtype=float32,max_length={MAX_LENGTH}"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            *("lm_eval", "--model", "zmaj", "--model_args", model_args),
            *("--tasks", "zmaj_tiny_multiple_choice", "--include_path", str(TASKS), "--batch_size", "4"),
            *("--device", "cpu"),
        ],
    )
    harness.main()
    assert "zmaj_tiny_multiple_choice" in capsys.readouterr().out
