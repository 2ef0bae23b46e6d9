"""Datasets as Hub folders: a task's problems, or a tokenised pre-training corpus, as Parquet files and a
dataset card.

The layout is the one ``datasets.DatasetDict.push_to_hub`` writes (https://huggingface.co/docs/hub/datasets-
manual-configuration): ``data/{split}-00000-of-00001.parquet`` per split and a ``README.md`` whose ``configs``
metadata maps split names to files, so ``datasets.load_dataset`` (the Hub's or a local folder's) finds the splits.
Writing the folder first, instead of pushing from memory, lets ``--dry-run`` show exactly what would be uploaded
and sends datasets and models through the same checked upload (``zmaj.publish.hub``).

- ``task:NAME`` (``zmaj.tasks``): the train and test splits of a task, one row per problem with ``prompt``,
  ``answer``, ``solution`` and ``messages`` (the user question and the worked answer, the chat format SFT reads:
  ``zmaj.data.chat.ChatTaskSource``); test problems never occur in train (``zmaj.tasks.base.in_test_split``).
- ``tokens:DIR[,DIR...]`` (``zmaj.data.tokens``): token files of a pre-training corpus, one row per document
  with its ``input_ids`` (ending in ``<|eos|>``), the split named by each file's ``meta.json``.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData

from zmaj.convert.load import staged_folder
from zmaj.data.tokens import TokenFile
from zmaj.tasks import Split, checked_task
from zmaj.text import read_json

DATA_DIR = "data"

TASK_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "solution": datasets.Value("string"),
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    }
)
TOKEN_FEATURES = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))})
"""The columns, given rather than inferred from the rows, which a split without one could not tell."""

Splits = dict[str, datasets.Dataset]
"""Rows per split name. (Not ``datasets.DatasetDict``, which the runtime type checker fails to recognise.)"""


def task_dataset(name: str, options: Mapping[str, Any], n_train: int, n_test: int, seed: int = 0) -> Splits:
    """``n_train`` and ``n_test`` problems of a task, as prompt/answer/solution/messages rows."""
    task = checked_task(name, options)
    splits: Splits = {}
    plan: tuple[tuple[Split, int], ...] = (("train", n_train), ("test", n_test))
    for split, n in plan:
        if n < 1:
            raise ValueError(
                f"n_{split} must be at least 1 (an empty {split} split cannot be loaded), got {n}"
            )
        problems = task.problems(split, n, seed)
        if not problems:
            raise ValueError(f"the task {name!r} has no {split} problems: the {split} split would be empty")
        splits[split] = datasets.Dataset.from_list(
            [
                {
                    "prompt": p.prompt,
                    "answer": p.answer,
                    "solution": p.solution,
                    "messages": [
                        {"role": "user", "content": p.prompt},
                        {"role": "assistant", "content": p.solution},
                    ],
                }
                for p in problems
            ],
            features=TASK_FEATURES,
        )
    return splits


def token_dataset(directories: list[Path]) -> Splits:
    """Token files as one split each (named by their ``meta.json``), one ``input_ids`` row per document."""
    splits: Splits = {}
    for directory in directories:
        if not (directory / "meta.json").is_file():
            raise FileNotFoundError(f"{directory} is not a token file (no meta.json)")
        tokens = TokenFile.open(directory)  # first: it checks that meta.json is an object
        split = read_json(directory / "meta.json").get("split", "train")
        if split in splits:
            raise ValueError(f"{directory}: a second token file for split {split!r}")
        if tokens.n_documents == 0:
            raise ValueError(f"{directory} holds no documents: the {split} split would be empty")
        rows = [np.asarray(tokens.document(i), dtype=np.int64).tolist() for i in range(tokens.n_documents)]
        splits[split] = datasets.Dataset.from_dict({"input_ids": rows}, features=TOKEN_FEATURES)
    return splits


def dataset_card(
    data: Splits, *, name: str, license: str, description: str, repo_id: str | None = None
) -> DatasetCard:
    """The card: ``configs`` mapping each split to its Parquet file, license, tags, and the rows per split;
    ``repo_id`` goes into the loading snippet (a placeholder when not known yet)."""
    metadata = DatasetCardData(
        license=license,
        tags=["zmaj"],
        task_categories=["text-generation"],
        configs=[
            {
                "config_name": "default",
                "data_files": [{"split": s, "path": f"{DATA_DIR}/{s}-*.parquet"} for s in data],
            }
        ],
    )
    rows = "\n".join(
        f"| {split} | {len(data[split]):,} | {', '.join(data[split].column_names)} |" for split in data
    )
    body = (
        f"# {name}\n\n{description}\n\n| split | rows | columns |\n| --- | --- | --- |\n{rows}\n\n"
        "```python\nimport datasets\n\n"
        f'data = datasets.load_dataset("{repo_id or "USER/" + name}")\n```\n'
    )
    return DatasetCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}")


def write_dataset_folder(data: Splits, card: DatasetCard, folder: Path) -> Path:
    """The splits as Parquet files plus the card, staged beside ``folder`` and renamed into place."""
    with staged_folder(folder) as staging:
        (staging / DATA_DIR).mkdir()
        for split, rows in data.items():
            rows.to_parquet(staging / DATA_DIR / f"{split}-00000-of-00001.parquet")
        card.save(staging / "README.md")
    return folder
