"""programs/export.py end to end: every kind of zmaj run (a GPT pre-trained from scratch with the default spec's
model options, a fully fine-tuned Llama, a LoRA run merged) becomes a folder that ``transformers`` loads offline
(the GPT with the code zmaj writes for it, ``trust_remote_code=True``) and that computes what zmaj computes, with
a model card that ``huggingface_hub`` parses and that reports what the run recorded.

The runs are made by the programs themselves (in this process, see ``test_finetune_programs``), tiny.
"""

import json
import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load

from tests.integration import finetune_fixtures
from tests.integration.programs import busy_volume, run_program
from tests.integration.test_finetune_programs import run
from tests.integration.test_pretrain_program import corpus
from zmaj import checkpoint
from zmaj.convert.load import Pretrained, load_model, save_zmaj
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import generate
from zmaj.models import llama
from zmaj.models.common import Batch
from zmaj.models.llama import LlamaConfig

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs" / "finetune"
KINDS = {"pretrain": "pretraining", "sft": "sft", "lora": "sft"}
MODERN = {
    key: value
    for key, value in yaml.safe_load((ROOT / "specs" / "pretrain" / "stdlib-tiny.yaml").read_text())[
        "model"
    ].items()
    if key not in ("vocab_size", "context", "d_model", "n_layers", "n_heads")
}
"""The default spec's model options (rotary positions, RMSNorm, QK-norm, U-net skips...), which GPT-2 lacks."""
START_LICENSE = "llama3.2"
"""The license the fine-tunes' starting model folder's card names, which their cards inherit."""


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may come from the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    spec = {
        "name": "tiny",
        "model": {"vocab_size": 300, "context": 32, "d_model": 32, "n_layers": 2, "n_heads": 2} | MODERN,
        "data": {
            "source": {"kind": "files", "paths": [str(corpus(root / "corpus.jsonl"))], "format": "jsonl"},
            "validation_fraction": 0.2,
            "seq_len": 32,
            "vocab_size": 300,
        },
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 2, "checkpoint_every": 100},
        "sample": {"prompts": ["def "], "max_new_tokens": 3},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(spec))
    code, _, err = run(
        "pretrain.py", root / "tiny.yaml", "--run-dir", root / "pretrain", "--cache-dir", root / "cache"
    )
    assert code == 0, err
    model = finetune_fixtures.tiny_model(root / "model")
    (model / "README.md").write_text(f"---\nlicense: {START_LICENSE}\n---\n")  # as a Hub download's card
    sft: list[str | Path] = [SPECS / "sft-tiny.yaml", "--set", f"model={model}"]
    code, _, err = run("sft.py", *sft, "--run-dir", root / "sft")
    assert code == 0, err
    lora = ["--set", "lora={rank: 4, alpha: 8, targets: ['attn.*', 'mlp.up']}"]
    code, _, err = run("sft.py", *sft, *lora, "--run-dir", root / "lora")
    assert code == 0, err
    return {kind: root / kind for kind in KINDS}


@pytest.fixture(scope="module", params=list(KINDS))
def exported(
    request: pytest.FixtureRequest, runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    folder = tmp_path_factory.mktemp("export") / f"tiny-{request.param}"
    code, _, err = run("export.py", runs[request.param], folder, "--repo-id", f"me/tiny-{request.param}")
    assert code == 0, err
    if (
        request.param == "pretrain"
    ):  # the program says why the model goes with its own code, and how to load it
        assert "GPT norm='rmsnorm': GPT-2 (GPT2LMHeadModel) cannot express it" in err
        assert "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)" in err
    return request.param, runs[request.param], folder


def test_transformers_computes_what_zmaj_computes(exported: tuple[str, Path, Path]) -> None:
    kind, run_dir, folder = exported
    ours = load_model(run_dir)
    own_code = kind == "pretrain"
    assert (folder / "modeling_zmaj_gpt.py").exists() == own_code
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=own_code).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = "def parse(tokens): 2 + 3"
    assert tokenizer(text).input_ids == ours.tokenizer.encode(text)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = theirs(tokens).logits
        logits = ours.architecture.logits(ours.params, Batch(tokens=tokens), ours.config)
    assert (reference - logits).abs().max().item() <= 1e-4

    prompt = ours.tokenizer.encode("def ")
    cache = init_cache(ours.config, 1, len(prompt) + 8)
    step = ours.architecture.cached(ours.config)
    [greedy] = generate(step, ours.params, cache, [prompt], 8, stop_tokens=ours.tokenizer.stop_ids)
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert greedy == out[0, len(prompt) :].tolist()


def test_the_card_parses_and_reports_the_run(exported: tuple[str, Path, Path]) -> None:
    kind, run_dir, folder = exported
    card = ModelCard.load(folder / "README.md")
    metadata = card.data.to_dict()
    assert metadata_load(folder / "README.md") == metadata
    assert ModelCardData(**metadata).to_dict() == metadata
    assert metadata["license"] == ("apache-2.0" if kind == "pretrain" else START_LICENSE)
    assert metadata["pipeline_tag"] == "text-generation"
    assert metadata["library_name"] == "transformers"
    assert {"zmaj", KINDS[kind]} <= set(metadata["tags"])
    assert ("lora" in metadata["tags"]) == (kind == "lora")
    assert "base_model" not in metadata  # a local starting model has no Hub id

    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    [spec_block] = re.findall(r"```yaml\n(.*?)```", card.text, re.DOTALL)
    assert yaml.safe_load(spec_block) == spec
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if kind == "pretrain":
        final = records[-1]
        assert f"| bits per byte | {final['val_bpb']:.4f} |" in card.text
    else:
        last = [r for r in records if "eval_accuracy" in r][-1]
        row = f"| {last['step']} | {last['eval_accuracy']:.3f} | [{last['eval_low']:.3f}, {last['eval_high']:.3f}]"
        assert row in card.text
    # The tokens each step recorded (pre-training: at most steps x batch x seq_len, less the masked targets).
    seen = int(sum(r["tokens"] for r in records if "loss" in r))
    assert f"{seen:,} tokens" in card.text
    assert kind != "pretrain" or 4 * 4 * 31 <= seen <= 4 * 4 * 32
    plot = "curves.png"
    assert f"]({plot})" in card.text
    assert (folder / plot).read_bytes() == (run_dir / plot).read_bytes()
    sessions = [json.loads(line) for line in (run_dir / "run.jsonl").read_text().splitlines()]
    assert [s["event"] for s in sessions] == ["start", "end"]
    assert f"Hardware: {sessions[0]['hardware']}." in card.text
    # The type the matmuls computed in, as the checkpoint records it (auto: bf16 or fp32 by machine).
    recorded = checkpoint.load_meta(checkpoint.latest_intact(run_dir))["precision"]
    assert {s["precision"] for s in sessions} == {recorded}
    assert f"Matmuls computed in {sessions[0]['precision']}." in card.text
    assert f"({sessions[1]['time'] - sessions[0]['time']:,.1f} s)" in card.text


def test_the_cards_snippet_loads_and_runs_the_folder(exported: tuple[str, Path, Path]) -> None:
    kind, _, folder = exported
    [snippet] = re.findall(r"```python\n(.*?)```", ModelCard.load(folder / "README.md").text, re.DOTALL)
    assert f'"me/tiny-{kind}"' in snippet
    with redirect_stdout(StringIO()):
        exec(snippet.replace(f"me/tiny-{kind}", str(folder)), {})
    assert ("apply_chat_template" in snippet) == (kind != "pretrain")


def test_dtype_shards_and_license(runs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "out"
    args = ["--license", "mit", "--dtype", "bfloat16", "--max-shard-size", "20KB", "--dataset", "me/corpus"]
    code, _, err = run("export.py", runs["pretrain"], folder, *args)
    assert code == 0, err
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    metadata = ModelCard.load(folder / "README.md").data.to_dict()
    assert metadata["license"] == "mit"
    assert metadata["datasets"] == ["me/corpus"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert model.dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_an_earlier_export_is_replaced_whole_a_folder_of_other_files_is_refused(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model-00002-of-00002.safetensors").write_text("an earlier export's second shard")
    code, _, err = run("export.py", runs["sft"], folder)
    assert code == 0, err
    assert not (folder / "model-00002-of-00002.safetensors").exists()
    assert (folder / "README.md").is_file()
    code, _, err = run("export.py", runs["sft"], tmp_path)  # a mistyped path: the folder holding out/
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert f"{tmp_path} holds out, which no model folder has, and writing it replaces the whole" in errors[0]
    assert (folder / "README.md").is_file()


def test_a_folder_holding_the_source_is_refused_and_left_alone(runs: dict[str, Path]) -> None:
    """Writing OUT_DIR replaces it whole: a checkpoint exported into its own run would delete the run."""
    run_dir = runs["sft"]
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    code, _, err = run("export.py", checkpoint, run_dir)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert "holds the source" in errors[0]
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_a_destination_that_cannot_be_renamed_exits_2_and_keeps_what_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point cannot be renamed away (EBUSY): one line, and neither the staged model nor a temporary
    folder is left beside it."""
    model = finetune_fixtures.tiny_model(tmp_path / "models" / "tiny")
    volume = busy_volume(tmp_path / "volume", monkeypatch)
    code, _, err = run("export.py", model, volume, "--license", "mit")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR | cannot export {model}: [Errno 16] Device or resource busy: '{volume}'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "volume"]
    assert [p.name for p in volume.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        ("qwen-qk-norm", [], "qk_norm"),
        ("missing", [], "no model at"),
        ("sft", ["--max-shard-size", "lots"], "'lots'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    runs: dict[str, Path], tmp_path: Path, make: str, extra: list[str], message: str
) -> None:
    if make == "qwen-qk-norm":  # Qwen 2's biases with Qwen 3's QK-norm: no transformers model has both
        config = LlamaConfig(
            vocab_size=300, context=16, d_model=16, n_layers=1, n_heads=2, qkv_bias=True, qk_norm=True
        )
        tokenizer = ModelTokenizer.from_zmaj(Tokenizer.train(["some text here"] * 20, vocab_size=300))
        source = save_zmaj(Pretrained(config, llama.init(config, 0), tokenizer), tmp_path / "qwen")
    else:
        source = runs[make] if make in runs else tmp_path / "nothing"
    code, _, err = run("export.py", source, tmp_path / "out", "--license", "mit", *extra)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert message in errors[0].lower() or message in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_model_whose_license_zmaj_cannot_know_needs_license(tmp_path: Path) -> None:
    """A card stamped apache-2.0 on any model, Gemma's fine-tunes and third-party folders among them."""
    model = finetune_fixtures.tiny_model(tmp_path / "model")  # a folder without a card
    code, _, err = run("export.py", model, tmp_path / "out")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, err
    assert f"the license of {model} is not known to zmaj" in errors[0]
    assert errors[0].endswith("name it with --license")
    assert not (tmp_path / "out").exists()
    code, _, err = run("export.py", model, tmp_path / "out", "--license", "cc-by-4.0")
    assert code == 0, err
    assert ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()["license"] == "cc-by-4.0"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--license", " "], "argument --license: ' ': not a license id the Hub accepts (empty)"),
        (["--license", "MIT License"], "argument --license: 'MIT License': not a license id the Hub accepts"),
        (["--repo-id", "not a repo!!"], "argument --repo-id: Repo id must"),
        (["--dataset", ""], "argument --dataset: Repo id must"),
    ],
)
def test_card_flags_the_hub_would_refuse_exit_2_before_anything_is_written(
    runs: dict[str, Path], tmp_path: Path, flags: list[str], message: str
) -> None:
    """They used to be written into the card (``license: ''``, a snippet loading ``not a repo!!``), which
    ``publish.py`` then refused."""
    result = run_program("export.py", runs["sft"], tmp_path / "out", *flags)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_a_license_other_than_the_models_is_taken_with_a_warning(tmp_path: Path) -> None:
    """export_model warns where --license differs from the license zmaj knows the model is under (a fine-tune
    of a llama3.2 model published as mit), and the card says what the user named."""
    from tests.unit.train.test_loop import logged
    from zmaj.publish.export import export_model

    model = finetune_fixtures.tiny_model(tmp_path / "model")
    (model / "README.md").write_text("---\nlicense: llama3.2\n---\n")
    with logged("WARNING") as messages:
        export_model(model, tmp_path / "out", license="mit")
    assert messages == ["--license mit, where the model it comes from is under llama3.2"]
    assert ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()["license"] == "mit"
