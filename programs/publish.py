"""Publish a model folder (``programs/export.py``'s) or a dataset to the Hugging Face Hub.

    uv run programs/publish.py exports/stdlib-gpt2-2019 --repo-id me/stdlib-gpt2-2019 --dry-run
    uv run programs/publish.py exports/stdlib-gpt2-2019 --repo-id me/stdlib-gpt2-2019 --private --revision v1
    uv run programs/publish.py --dataset task:arithmetic --set-task digits=2 --n-train 10000 --n-test 500 \\
        --repo-id me/arithmetic-2
    uv run programs/publish.py --dataset tokens:~/.cache/zmaj/tokens/train-ab12,~/.cache/zmaj/tokens/validation-cd34 \\
        --repo-id me/stdlib-tokens --license mit

A model FOLDER is checked first (config.json that transformers reads, the weights, the tokenizer, a README.md
model card with a license). ``--dataset task:NAME`` writes a task's train and test splits (prompt, answer,
solution, messages) as Parquet with a dataset card; ``--dataset tokens:DIR[,DIR...]`` writes token files of a
pre-training corpus (one ``input_ids`` row per document); ``--out DIR`` keeps that folder. Then the repository is
created if missing (private with ``--private``), the branch ``--revision`` if missing, and the folder uploaded
in one commit. The token is ``HF_TOKEN`` or the one ``hf auth login`` saved; ``HF_ENDPOINT`` names another Hub.
``--dry-run`` lists the files with their sizes and prints the card, contacting nothing and needing no token.
A missing token or a failed check is a one-line error with exit status 2, before any request.
"""

import argparse
import re
import sys
import tempfile
from pathlib import Path

import httpx2
from huggingface_hub import get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from loguru import logger

from zmaj.convert.load import check_destination, check_replaceable
from zmaj.extras import MissingExtraError
from zmaj.fileio import atomic_write_text
from zmaj.publish.card import with_repo_id
from zmaj.publish.dataset import DATA_DIR, dataset_card, task_dataset, token_dataset, write_dataset_folder
from zmaj.publish.hub import (
    CARD_FILE,
    check_dataset_folder,
    check_model_folder,
    license_id,
    publish,
    repo_id,
    upload_files,
)
from zmaj.specfile import key_values, seed_argument
from zmaj.text import read_text
from zmaj.train import runs
from zmaj.train.runs import positive

N_TRAIN, N_TEST, LICENSE = 1000, 200, "apache-2.0"
TASK_FLAGS = {"--n-train": "n_train", "--n-test": "n_test", "--seed": "seed"}
"""Flags only a ``task:`` dataset reads, and their argparse names."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", nargs="?", type=Path, help="a model folder written by programs/export.py")
    parser.add_argument("--repo-id", required=True, type=repo_id, help="USER/NAME (or ORG/NAME) on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if missing)")
    parser.add_argument("--message", help="the commit message")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact nothing")
    group = parser.add_argument_group("datasets (instead of FOLDER)")
    group.add_argument("--dataset", metavar="SOURCE", help="task:NAME or tokens:DIR[,DIR...]")
    group.add_argument("--set-task", dest="task_options", action="append", default=[], metavar="KEY=VALUE")
    group.add_argument("--n-train", type=positive, help=f"task problems in train (default: {N_TRAIN})")
    group.add_argument("--n-test", type=positive, help=f"task problems in test (default: {N_TEST})")
    group.add_argument("--seed", type=seed_argument, help="which task problems (default: 0)")
    group.add_argument(
        "--license",
        type=license_id,
        help=f"the dataset card's license (default for task: datasets, which zmaj writes: {LICENSE}; required "
        "for tokens:, whose license is the corpus')",
    )
    group.add_argument(
        "--out", type=Path, help="write the dataset folder here and keep it (default: a temp dir)"
    )
    args = parser.parse_args()
    if (args.folder is None) == (args.dataset is None):
        parser.error("give a model FOLDER or --dataset SOURCE (one of them)")
    # A flag the chosen source does not read would be ignored in silence: refuse it instead.
    task = args.dataset is not None and args.dataset.startswith("task:")
    unused = {
        "--set-task": args.task_options and not task,
        **{flag: getattr(args, name) is not None and not task for flag, name in TASK_FLAGS.items()},
        "--license": args.license is not None and args.dataset is None,
        "--out": args.out is not None and args.dataset is None,
    }
    if misplaced := [flag for flag, given in unused.items() if given]:
        source = "a model FOLDER" if args.dataset is None else "--dataset tokens:"
        parser.error(f"{', '.join(misplaced)} cannot be used with {source}")
    if args.dataset is not None and not task and args.license is None:
        parser.error("--dataset tokens: needs --license: the tokens are the corpus', under its license")
    defaults = {"n_train": N_TRAIN, "n_test": N_TEST, "seed": 0, "license": LICENSE}
    for name, default in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def build_dataset(args: argparse.Namespace, folder: Path) -> Path:
    """The dataset folder for ``--dataset SOURCE``."""
    kind, _, value = args.dataset.partition(":")
    name = args.repo_id.split("/")[-1]
    if kind == "task":
        options = key_values(args.task_options, "--set-task")
        data = task_dataset(value, options, args.n_train, args.n_test, args.seed)
        description = (
            f"Problems of the zmaj task `{value}` (options {options}, seed {args.seed}): each with the prompt, "
            "the canonical answer, a worked solution ending in `Answer: ...`, and the same as a two-turn "
            "conversation (`messages`). No test prompt occurs in train."
        )
    elif kind == "tokens":
        sources = [Path(d).expanduser() for d in value.split(",")]
        for source in sources:
            check_destination(folder, source)
        data = token_dataset(sources)
        description = (
            "A pre-training corpus tokenised by zmaj: one row per document, its token ids ending in <|eos|>."
        )
    else:
        raise ValueError(f"--dataset {args.dataset}: expected task:NAME or tokens:DIR[,DIR...]")
    if args.out is not None:
        check_out(args.out)
    card = dataset_card(data, name=name, license=args.license, description=description, repo_id=args.repo_id)
    return write_dataset_folder(data, card, folder)


def check_out(folder: Path) -> None:
    """``--out`` is replaced whole: refuse one that holds anything but a dataset folder this program wrote
    (its card and ``data/``), so that a mistyped path deletes nothing."""
    check_replaceable(folder)
    if folder.is_dir() and not _written_here(folder):
        raise ValueError(
            f"--out {folder} holds files a dataset folder does not, and writing it replaces the whole folder: "
            "name a new folder, or one this program wrote"
        )


def _written_here(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but what ``write_dataset_folder`` writes: its card, and in ``data/`` one
    parquet file per split (a project's own ``README.md`` and ``data/`` folder are not that)."""
    names = {entry.name for entry in folder.iterdir()}
    if not names:
        return True
    data = folder / DATA_DIR
    if not names <= {CARD_FILE, DATA_DIR} or not data.is_dir():  # a README.md alone is a project's own
        return False
    shards = list(data.iterdir())
    return bool(shards) and all(
        shard.is_file() and re.fullmatch(r"\w+-00000-of-00001\.parquet", shard.name) for shard in shards
    )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="zmaj-dataset-") as scratch:
        upload(args, Path(scratch))


def upload(args: argparse.Namespace, scratch: Path) -> None:
    """Check (or build) the folder, then list it (``--dry-run``) or upload it; ``scratch`` holds a built dataset
    without ``--out``."""
    try:
        if args.dataset is None:
            folder, repo_type = args.folder, "model"
            check_model_folder(folder)
            # The snippet loads the repository the card is published to, not the placeholder (or another id)
            # that export.py wrote it with.
            card = with_repo_id(read_text(folder / CARD_FILE), args.repo_id)
        else:
            folder, repo_type = build_dataset(args, args.out or scratch / "dataset"), "dataset"
            check_dataset_folder(folder)
            card = read_text(folder / CARD_FILE)
    except (OSError, ValueError, MissingExtraError) as error:  # OSError: an --out on a full or read-only disk
        logger.error(str(error).replace("\n", "; "))
        sys.exit(2)
    files = upload_files(folder)
    if args.dry_run:
        files = [(path, len(card.encode()) if path == CARD_FILE else size) for path, size in files]  # as sent
        for path, size in files:
            print(f"{size:>14,}  {path}")
        print(
            f"{sum(size for _, size in files):>14,}  total, {len(files)} files -> {repo_type} {args.repo_id}"
        )
        print(card)
        return
    token = get_token()
    if token is None:
        logger.error("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
        sys.exit(2)
    if card != read_text(folder / CARD_FILE):  # the folder's card says what was uploaded, for the next time
        try:
            atomic_write_text(folder / CARD_FILE, card)
        except OSError as error:  # a read-only folder
            logger.error(f"cannot update {folder / CARD_FILE} to name {args.repo_id}: {error}")
            sys.exit(2)
        logger.info(f"{folder / CARD_FILE}: its loading snippet names {args.repo_id} now")
    try:
        url = publish(
            folder,
            args.repo_id,
            token,
            repo_type=repo_type,
            private=args.private,
            revision=args.revision,
            message=args.message,
        )
    # The Hub refused it, cannot be reached, or HF_HUB_OFFLINE is set.
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as error:
        logger.error(f"upload to {args.repo_id} failed: {str(error).splitlines()[0]}")
        sys.exit(1)
    except ValueError as error:  # a repository that cannot take this upload as asked
        logger.error(str(error))
        sys.exit(2)
    logger.info(f"uploaded {len(files)} files to {args.repo_id}: {url}")


if __name__ == "__main__":
    runs.ctrl_c_exits_130(
        main,
        "interrupted (Ctrl-C); an upload is one commit, made whole or not at all (a repository or branch made for "
        "it stays), and an --out folder is written whole or not at all",
    )
