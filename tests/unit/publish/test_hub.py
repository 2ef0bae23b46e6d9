"""What a folder is before it is uploaded: shards filled as ``save_pretrained`` fills them, a broken folder
refused before any request, and the dry run's list of the files the upload sends."""

import json
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest
from safetensors import safe_open

from zmaj.convert import zmaj_gpt
from zmaj.convert.export import INDEX_FILE, save_hf
from zmaj.convert.load import Pretrained
from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig
from zmaj.publish import card
from zmaj.publish.dataset import dataset_card, task_dataset, write_dataset_folder
from zmaj.publish.hub import check_dataset_folder, check_model_folder, read_card, upload_files


def _model_folder(model: Pretrained, folder: Path) -> Path:
    save_hf(model, folder, max_shard_bytes=20_000)
    card.write_card(folder, card.model_card(model, None, name=folder.name, license="mit"), None)
    return folder


@pytest.mark.parametrize("removed", ["first shard", "last shard", "tokenizer_config.json"])
def test_a_model_folder_missing_a_shard_or_the_tokenizer_config_is_refused(
    model: Pretrained, tmp_path: Path, removed: str
) -> None:
    """The program test breaks the index and tokenizer.json only: a folder whose index names a shard that is
    gone (any of them, the first as the last), or without tokenizer_config.json (BOS/EOS, chat template), would
    be uploaded as a broken repository."""
    folder = _model_folder(model, tmp_path / "m")
    check_model_folder(folder)  # whole, it passes
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    gone = {"first shard": shards[0], "last shard": shards[-1]}.get(removed, folder / removed)
    gone.unlink()
    message = (
        rf"names missing shards \['{gone.name}'\]"
        if removed.endswith("shard")
        else "no tokenizer_config.json"
    )
    with pytest.raises(ValueError, match=message):
        check_model_folder(folder)


def test_a_model_folder_with_code_other_than_zmajs_is_refused_not_run(
    model: Pretrained, tmp_path: Path
) -> None:
    """Checking an exported GPT's config runs its code (``trust_remote_code``): only the code zmaj exports is
    run; a folder whose code was changed, or whose ``auto_map`` names another file, is refused first."""
    assert isinstance(model.config, GPTConfig)
    modern = model.config.model_copy(update={"qk_norm": True})
    own = replace(model, config=modern, params=gpt.init(modern, 0))
    folder = _model_folder(own, tmp_path / "m")
    check_model_folder(folder)  # as exported, it passes
    code = folder / zmaj_gpt.CODE.name
    ran = tmp_path / "ran"  # code that says when it runs
    code.write_text(code.read_text() + f"\nopen({str(ran)!r}, 'w').close()\n")
    with pytest.raises(
        ValueError, match=r"modeling_zmaj_gpt\.py: config.json's auto_map names code that is not"
    ):
        check_model_folder(folder)
    assert not ran.exists()
    code.write_bytes(zmaj_gpt.CODE.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoConfig"] = "elsewhere.ZmajGPTConfig"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"elsewhere\.py: config.json's auto_map names code"):
        check_model_folder(folder)
    config["auto_map"]["AutoConfig"] = zmaj_gpt.AUTO_MAP[
        "AutoModelForCausalLM"
    ]  # zmaj's code, the wrong class
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: transformers cannot read it: "):
        check_model_folder(folder)


def test_a_dataset_folder_missing_a_split_file_is_refused(tmp_path: Path) -> None:
    """The card's ``configs`` name each split's files; one that matches nothing would load as an error."""
    data = task_dataset("arithmetic", {"digits": 1}, 3, 2)
    folder = write_dataset_folder(
        data, dataset_card(data, name="a", license="mit", description="x"), tmp_path / "a"
    )
    check_dataset_folder(folder)
    (folder / "data" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"no file matches data/test-\*\.parquet \(split test\)"):
        check_dataset_folder(folder)


def test_a_dataset_card_whose_metadata_has_no_configs_is_refused(tmp_path: Path) -> None:
    """The card's ``configs`` are what tie the data files to splits; a card without them (its data files all
    there) is refused, not uploaded for the Hub to guess the splits from the file names."""
    data = task_dataset("arithmetic", {"digits": 1}, 3, 2)
    folder = write_dataset_folder(
        data, dataset_card(data, name="a", license="mit", description="x"), tmp_path / "a"
    )
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a\n")
    with pytest.raises(ValueError, match=r"README\.md: the card's metadata has no configs"):
        check_dataset_folder(folder)


@pytest.mark.parametrize("metadata", ["- mit\n- apache-2.0\n", "just words\n"])
def test_a_card_whose_metadata_is_not_a_mapping_is_refused_naming_the_card(
    tmp_path: Path, metadata: str
) -> None:
    """YAML that parses, to a list or a string, is no metadata: huggingface_hub says so with a ValueError that
    names no file (not a YAML error), which ``read_card`` turns into its refusal naming the card all the same."""
    (tmp_path / "README.md").write_text(f"---\n{metadata}---\n# a\n")
    with pytest.raises(
        ValueError, match=r"README\.md: the card's metadata cannot be read: .*should be a dict"
    ):
        read_card(tmp_path)


def test_the_upload_list_leaves_out_what_upload_folder_skips(tmp_path: Path) -> None:
    """``--dry-run`` promises the files that would be sent: not a ``.git`` folder's."""
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]\n")
    (tmp_path / "README.md").write_text("x")
    assert upload_files(tmp_path) == [("README.md", 1)]


def test_shards_are_filled_up_to_the_limit_before_the_next_is_started(
    model: Pretrained, tmp_path: Path
) -> None:
    """As ``save_pretrained`` fills them: a size counter never reset after a new shard put every later tensor
    in a file of its own (16 shards where 8 do) and still passed the tests, which checked only the upper bound."""
    limit = 20_000
    folder = save_hf(model, tmp_path / "m", max_shard_bytes=limit)
    weight_map: dict[str, str] = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    shards: dict[str, list[int]] = {}
    for name, shard in weight_map.items():  # in the order written
        with safe_open(folder / shard, framework="pt") as f:
            tensor = f.get_tensor(name)
        shards.setdefault(shard, []).append(tensor.numel() * tensor.element_size())
    assert len(shards) > 1
    for this, following in pairwise(shards.values()):
        assert sum(this) + following[0] > limit


def test_a_shard_size_that_is_not_positive_is_refused_before_anything_is_written(
    model: Pretrained, tmp_path: Path
) -> None:
    """``parse_size`` guards the program; ``save_hf`` called from Python has only its own check (without it,
    0 wrote one file per tensor)."""
    with pytest.raises(ValueError, match="max_shard_bytes must be positive"):
        save_hf(model, tmp_path / "m", max_shard_bytes=0)
    assert list(tmp_path.iterdir()) == []


def test_the_upload_list_names_the_files_of_a_subfolder_and_not_the_subfolder(tmp_path: Path) -> None:
    """A dataset folder keeps its Parquet files under ``data/``: each is listed by its path in the repository, with
    its size, in order; the folder itself is no file that is sent (its "size" is the filesystem's)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.parquet").write_bytes(b"abc")
    (tmp_path / "README.md").write_text("x")
    assert upload_files(tmp_path) == [("README.md", 1), ("data/train.parquet", 3)]
