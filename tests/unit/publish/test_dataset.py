"""Dataset folders that ``datasets.load_dataset`` reads back: columns typed even where rows could not tell, and
no empty split (which it cannot read)."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from zmaj.publish.dataset import dataset_card, task_dataset, token_dataset, write_dataset_folder


def token_file(directory: Path, split: str, documents: list[list[int]]) -> Path:
    """A token file as ``zmaj.data.tokens.tokenize_splits`` lays it out."""
    directory.mkdir()
    np.asarray([t for d in documents for t in d], dtype=np.uint16).tofile(directory / "tokens.bin")
    np.save(directory / "offsets.npy", np.cumsum([0, *map(len, documents)]).astype(np.int64))
    meta = {"dtype": "uint16", "n_tokens": sum(map(len, documents)), "vocab_size": 300, "eos_id": 1}
    (directory / "meta.json").write_text(json.dumps(meta | {"pad_id": 0, "split": split}))
    return directory


def test_a_token_file_that_names_no_split_is_the_train_split(tmp_path: Path) -> None:
    """Token files written before ``meta.json`` recorded the split were training data."""
    directory = token_file(tmp_path / "old", "train", [[5, 1]])
    meta = json.loads((directory / "meta.json").read_text())
    del meta["split"]
    (directory / "meta.json").write_text(json.dumps(meta))
    assert list(token_dataset([directory])) == ["train"]


def test_a_token_dataset_loads_back_with_its_columns(tmp_path: Path) -> None:
    data = token_dataset([token_file(tmp_path / "train", "train", [[5, 6, 1], [7, 1]])])
    assert data["train"].features == datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
    card = dataset_card(data, name="t", license="mit", description="tokens")
    folder = write_dataset_folder(data, card, tmp_path / "out")
    assert datasets.load_dataset(str(folder))["train"]["input_ids"] == [[5, 6, 1], [7, 1]]


def test_an_empty_split_is_refused_naming_it(tmp_path: Path) -> None:
    train = token_file(tmp_path / "train", "train", [[5, 1]])
    empty = token_file(tmp_path / "validation", "validation", [])
    with pytest.raises(
        ValueError, match="validation holds no documents: the validation split would be empty"
    ):
        token_dataset([train, empty])
    for n_train, n_test in [(0, 2), (-5, 2), (2, 0)]:
        split = "train" if n_train < 1 else "test"
        with pytest.raises(ValueError, match=f"n_{split} must be at least 1"):
            task_dataset("arithmetic", {"digits": 1}, n_train, n_test)


def test_a_meta_json_that_is_no_object_is_refused_naming_the_folder(tmp_path: Path) -> None:
    """The split is read from ``meta.json`` after the token file is opened, which checks it (it was an
    AttributeError from ``.get`` on a list)."""
    train = token_file(tmp_path / "train", "train", [[5, 1]])
    (train / "meta.json").write_text("[]")
    with pytest.raises(
        ValueError, match=f"^damaged token cache {train}: .*meta.json: .top level.: Input should"
    ):
        token_dataset([train])


def test_the_cards_snippet_loads_the_repository_when_known(tmp_path: Path) -> None:
    data = token_dataset([token_file(tmp_path / "train", "train", [[5, 1]])])
    card = dataset_card(data, name="tok", license="mit", description="tokens", repo_id="me/tok")
    assert 'datasets.load_dataset("me/tok")' in card.content
    assert (
        'load_dataset("USER/tok")' in dataset_card(data, name="tok", license="mit", description="x").content
    )


def test_a_task_dataset_follows_its_seed_and_keeps_the_worked_solution() -> None:
    """``--seed`` picks the problems (the program test uses seed 0 only), and ``solution`` is the worked answer,
    not the bare one; the card counts each split's rows."""
    seed0 = task_dataset("arithmetic", {"digits": 2}, 5, 3, seed=0)
    seed1 = task_dataset("arithmetic", {"digits": 2}, 5, 3, seed=1)
    assert seed0["train"]["prompt"] != seed1["train"]["prompt"]
    for row in seed0["train"]:
        assert row["solution"] != row["answer"]
        assert row["solution"].endswith(f"Answer: {row['answer']}")
        assert row["messages"][1]["content"] == row["solution"]
    content = dataset_card(seed0, name="a", license="mit", description="x").content
    assert "| train | 5 | prompt, answer, solution, messages |" in content
    assert "| test | 3 | prompt, answer, solution, messages |" in content


def test_two_token_files_of_one_split_are_refused(tmp_path: Path) -> None:
    """Kept silently, the second would replace the first: half a corpus published as the whole."""
    first = token_file(tmp_path / "a", "train", [[5, 1]])
    second = token_file(tmp_path / "b", "train", [[7, 7, 1]])
    with pytest.raises(ValueError, match="a second token file for split 'train'"):
        token_dataset([first, second])
