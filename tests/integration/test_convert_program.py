"""programs/convert.py end to end: a Hugging Face folder to a zmaj folder and back, bit for bit, and bad input.

The source is a random ``transformers`` Llama saved with ``save_pretrained`` next to a tiny zmaj tokenizer, so
the round trip through zmaj's formats is checked against the library's own writing of the same model.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import zmaj.convert
from tests.integration import parity
from tests.integration.programs import Result, busy_volume, run_program
from zmaj.convert import weights
from zmaj.convert.load import Pretrained, load_model, save_zmaj
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.models import llama
from zmaj.models.common import Batch
from zmaj.models.llama import LlamaConfig

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 300
TEXTS = ["def parse(tokens):\n    return [t for t in tokens if t]\n", "the quick brown fox jumps"] * 4


def convert(*args: str | Path) -> Result:
    return run_program("convert.py", *args)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.PreTrainedModel, Path]:
    """A random Llama (norms off one, so a dropped norm shows) with a tokenizer, as a Hugging Face folder."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    model = parity.random_reference(config)
    folder = tmp_path_factory.mktemp("source") / "llama"
    model.save_pretrained(folder)
    ModelTokenizer.from_zmaj(Tokenizer.train(TEXTS, VOCAB)).save(folder)
    return model, folder


def logits_of(model: transformers.PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(tokens).logits
    return logits


@pytest.mark.slow
def test_hf_to_zmaj_to_hf_keeps_every_tensor(
    source: tuple[transformers.PreTrainedModel, Path], tmp_path: Path
) -> None:
    model, folder = source
    result = convert(folder, tmp_path / "zmaj", "--to", "zmaj")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "zmaj" / "model.json").is_file()
    result = convert(tmp_path / "zmaj", tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "config.json").is_file()

    original, written = (
        load_file(folder / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert set(written) == set(original)
    assert all(torch.equal(written[name], original[name]) for name in original)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(logits_of(reference, tokens), logits_of(model, tokens))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.encode(TEXTS[0]) == ModelTokenizer.load(folder).encode(TEXTS[0])


@pytest.mark.slow
def test_dtype_casts_the_parameters(
    source: tuple[transformers.PreTrainedModel, Path], tmp_path: Path
) -> None:
    _, folder = source
    result = convert(folder, tmp_path / "bf16", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    original, written = (
        load_file(folder / "model.safetensors"),
        load_file(tmp_path / "bf16" / "model.safetensors"),
    )
    assert all(torch.equal(written[name], original[name].to(torch.bfloat16)) for name in original)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "{out}"], "no model at"),
        (["{source}", "{file}"], "is a file"),
        (["{source}", "{file}/model"], "file.txt is a file, not a folder"),
        (["{source}", "{source}"], "is the source"),
        (["{holder}/model.gguf", "{holder}"], "holds the source"),
        (["{source}", "{mine}"], "holds big, which no model folder has"),  # a folder of one's own
        (["{cut_weights}", "{out}"], "model.safetensors: not a readable safetensors file"),
        (["{cut_tokenizer}", "{out}"], "tokenizer.json is not a tokenizer file: not JSON"),
        (["{no_size}", "{out}"], "config.json has no 'hidden_size'"),
        (["{big}", "{out}", "--dtype", "float16"], "the weights of embed.weight overflow float16"),
        (["{file}", "{out}"], "not a .gguf file"),
        (["{source}", "{out}", "--to", "onnx"], "invalid choice"),
        (["{source}", "{out}", "--quantize"], "unrecognized arguments"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(
    source: tuple[transformers.PreTrainedModel, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "file.txt").write_text("not a model")
    (tmp_path / "holder").mkdir()
    (tmp_path / "holder" / "model.gguf").write_text("a model the user keeps")
    broken = {
        name: shutil.copytree(source[1], tmp_path / name)
        for name in ("cut_weights", "cut_tokenizer", "no_size", "big")
    }
    weights = load_file(broken["big"] / "model.safetensors")  # a weight past float16's 65504: written as inf
    weights["model.embed_tokens.weight"][3, 1] = 1e5
    save_file(weights, broken["big"] / "model.safetensors", metadata={"format": "pt"})
    for name, file in (("cut_weights", "model.safetensors"), ("cut_tokenizer", "tokenizer.json")):
        os.truncate(broken[name] / file, (broken[name] / file).stat().st_size // 2)
    config = json.loads((broken["no_size"] / "config.json").read_text())
    del config["hidden_size"]
    (broken["no_size"] / "config.json").write_text(json.dumps(config))
    paths = {
        **broken,
        "holder": tmp_path / "holder",
        "mine": tmp_path,
        "missing": tmp_path / "missing",
        "out": tmp_path / "out",
        "source": source[1],
        "file": tmp_path / "file.txt",
    }
    result = convert(*(arg.format(**paths) for arg in args))
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "holder" / "model.gguf").read_text() == "a model the user keeps"
    if not message.startswith(("invalid", "unrecognized")):  # argparse prints its usage too
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_destination_that_cannot_be_renamed_exits_2_and_keeps_what_it_held(
    source: tuple[transformers.PreTrainedModel, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point cannot be renamed away (EBUSY): one line, and neither the staged model nor a temporary
    folder is left beside it."""
    volume = busy_volume(tmp_path / "volume", monkeypatch)
    result = convert(source[1], volume)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR | cannot write {volume}: [Errno 16] Device or resource busy: '{volume}'"]
    assert [p.name for p in tmp_path.iterdir()] == ["volume"]
    assert [p.name for p in volume.iterdir()] == ["config.json"]


@pytest.mark.slow
def test_a_model_transformers_cannot_express_exits_2(tmp_path: Path) -> None:
    """A Llama with Qwen 2's biases and Qwen 3's QK-norm, which no transformers model has both of, saved as a zmaj
    folder, is refused naming the setting, and nothing is written."""
    config = LlamaConfig(
        vocab_size=VOCAB, context=16, d_model=16, n_layers=1, n_heads=2, qkv_bias=True, qk_norm=True
    )
    tokenizer = ModelTokenizer.from_zmaj(Tokenizer.train(TEXTS, VOCAB))
    save_zmaj(Pretrained(config, llama.init(config, 0), tokenizer), tmp_path / "zmaj")
    result = convert(tmp_path / "zmaj", tmp_path / "hf")
    assert result.returncode == 2
    assert "qkv_bias=True with qk_norm=True" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zmaj"]


@pytest.mark.slow
def test_smollm2_gguf_to_hf_matches_zmaj(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct GGUF, dequantised, as a Hugging Face folder: transformers' logits on a chat
    are zmaj's, and its tokenizer renders and encodes the chat as zmaj does."""
    gguf = weights.smollm2_gguf()
    result = convert(gguf, tmp_path / "smollm2")
    assert result.returncode == 0, result.stderr
    ours = load_model(gguf)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = ours.tokenizer.encode_chat(chat)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    assert (
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        == ids
    )
    tokens = torch.tensor([ids])
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2").eval()
    with torch.no_grad():
        expected = ours.architecture.logits(ours.params, Batch(tokens=tokens), ours.config)
    assert (logits_of(reference, tokens) - expected).abs().max().item() <= 1e-4


def test_convert_of_a_gguf_file_without_the_gguf_extra_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a core install (no ``gguf``) a GGUF source is one line naming the extra, exit 2, nothing written; the
    program's catch of MissingExtraError was untested (dropping it gave a traceback, and every test passed)."""
    for name in [n for n in sys.modules if n == "gguf" or n.startswith("gguf.")] or ["gguf"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import gguf` fails as where it is not installed
    monkeypatch.delitem(sys.modules, "zmaj.convert.gguf", raising=False)
    monkeypatch.delattr(zmaj.convert, "gguf", raising=False)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    result = run_program("convert.py", tmp_path / "model.gguf", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ERROR | loading a GGUF file needs the 'gguf' extra: pip install 'zmaj[gguf]' (gguf is not installed)"
    ]
    assert not (tmp_path / "out").exists()
