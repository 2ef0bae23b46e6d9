"""Uploading a folder to the Hugging Face Hub (https://huggingface.co/docs/huggingface_hub/guides/upload), after
checking that what arrives there is usable.

``huggingface_hub`` does the protocol: ``create_repo`` (``POST /api/repos/create``), ``create_branch``, then
``upload_folder``, one commit: a ``preupload`` call sorts files into small ones sent inline (base64 in the
commit) and large or binary ones stored by content hash (Git LFS, or Xet where ``hf_xet`` is installed), then the
commit (``POST /api/{type}s/{repo}/commit/{revision}``, NDJSON). The token comes from ``HF_TOKEN`` or
``hf auth login`` (``huggingface_hub.get_token``). ``HF_ENDPOINT`` points all of it at another server.

Checks run before any request, so a broken folder never becomes a broken repository: a model folder needs a
``config.json`` that ``transformers`` reads, its weights (every shard an index names), the tokenizer, and a
``README.md`` whose metadata parses as a model card with a license.
"""

import argparse
from pathlib import Path

import yaml
from huggingface_hub import DatasetCard, HfApi, ModelCard, RepoCard
from huggingface_hub.errors import HFValidationError, StrictDataclassError
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from huggingface_hub.utils._validators import validate_repo_id
from loguru import logger
from safetensors import SafetensorError, safe_open

from zmaj.convert import zmaj_gpt
from zmaj.convert.export import INDEX_FILE, WEIGHTS_FILE
from zmaj.data.model_tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from zmaj.data.tokenizer import read_tokenizer_file
from zmaj.extras import needs
from zmaj.text import read_json, read_text

CARD_FILE = "README.md"


def repo_id(text: str) -> str:
    """An argparse type: a repository id the Hub accepts (``USER/NAME``), checked before anything is built or
    sent, and before a card names it."""
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


HUB_LICENSES = frozenset(
    """
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c
ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openmdw-1.0 openmdw-1.1 openrail++ osl-3.0 postgresql ofl-1.1
ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3
llama3.1 llama3.2 llama3.3 llama4 grok2-community gemma unknown other
""".split()  # noqa: SIM905 (83 ids read better as lines of text than one per line)
)
"""The license ids a card's metadata may name: the Hub refuses a commit whose card names another ("license"
must be one of [...]), after the repository was created. From https://huggingface.co/docs/hub/repositories-licenses
(hub-docs, 2026-08-22); ``other`` for a license not listed."""


def license_id(text: str) -> str:
    """An argparse type: a card's license, one of the ids the Hub accepts (``HUB_LICENSES``)."""
    if text not in HUB_LICENSES:
        raise argparse.ArgumentTypeError(f"{text!r}: {not_a_hub_license(text)}")
    return text


def not_a_hub_license(text: str) -> str:
    """Why ``text`` cannot be a card's license, in words that say what to write instead."""
    hint = "" if text.strip() else " (empty)"
    return (
        f"not a license id the Hub accepts{hint}, such as apache-2.0, mit, cc-by-4.0, gemma or llama3.2; the list: "
        "https://huggingface.co/docs/hub/repositories-licenses (other: a license it does not list)"
    )


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """The files ``upload_folder`` sends (it skips ``.git/`` and ``.cache/huggingface/``), with their sizes."""
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return [(path, (folder / path).stat().st_size) for path in kept]


def read_card(folder: Path, kind: type[RepoCard] = ModelCard) -> RepoCard:
    """The folder's ``README.md`` parsed as the Hub parses it; ValueError when it is missing or its metadata is
    not a YAML mapping with a license."""
    path = folder / CARD_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {CARD_FILE} (model card)")
    text = read_text(path)  # a one-line error if not UTF-8
    try:
        card: RepoCard = kind(text)  # what kind.load(path) parses
    except (yaml.YAMLError, ValueError) as error:  # metadata that is not YAML, or not a mapping
        problem = " ".join(str(error).split())
        raise ValueError(f"{path}: the card's metadata cannot be read: {problem}") from None
    license = card.data.to_dict().get("license")  # type: ignore[no-untyped-call]
    if not license:
        raise ValueError(f"{path}: the card's metadata names no license")
    if not isinstance(license, str) or license not in HUB_LICENSES:  # a YAML list is no license id either
        raise ValueError(f"{path}: the card's license {license!r} is {not_a_hub_license(str(license))}")
    return card


def check_model_folder(folder: Path) -> ModelCard:
    """Its card, when ``folder`` is a complete Hugging Face model folder; else ValueError naming what is wrong."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json; export a model with programs/export.py first")
    with needs("hub", "checking a model folder before it is published"):
        import transformers
    own_code = _check_own_code(folder)
    try:
        transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=own_code)
    # StrictDataclassError: a field of the wrong type ("hidden_size": "64"), which transformers 5 configs check.
    # TypeError: an auto_map that names zmaj's model class where the config class goes.
    except (ValueError, KeyError, OSError, TypeError, StrictDataclassError) as error:
        raise ValueError(f"{folder}/config.json: transformers cannot read it: {error}") from None
    if (folder / INDEX_FILE).is_file():
        index = read_json(folder / INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{folder / INDEX_FILE}: not a shard index (no weight_map mapping)")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ValueError(f"{folder}: {INDEX_FILE} names missing shards {missing}")
    elif not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder}: no weights ({WEIGHTS_FILE} or {INDEX_FILE})")
    else:
        shards = [WEIGHTS_FILE]
    for shard in shards:
        check_weights_file(folder / shard)
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name} (tokenizer)")
    read_tokenizer_file(folder / TOKENIZER_FILE)  # a ValueError naming it, when it is no tokenizer
    card = read_card(folder, ModelCard)
    assert isinstance(card, ModelCard)
    return card


def _check_own_code(folder: Path) -> bool:
    """Whether the folder's model loads with its own code (``config.json``'s ``auto_map``), which must then be the
    code zmaj exports (``zmaj.convert.zmaj_gpt``): checking the config runs that code, so other code is refused
    rather than run."""
    config = read_json(folder / "config.json")
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if auto_map is None:
        return False
    if not isinstance(auto_map, dict) or not all(isinstance(v, str) for v in auto_map.values()):
        raise ValueError(f"{folder}/config.json: auto_map is not a mapping of class names")
    for module in sorted({f"{name.rsplit('.', 1)[0]}.py" for name in auto_map.values()}):
        path = folder / module
        if (
            module != zmaj_gpt.CODE.name
            or not path.is_file()
            or path.read_bytes() != zmaj_gpt.CODE.read_bytes()
        ):
            raise ValueError(
                f"{path}: config.json's auto_map names code that is not the {zmaj_gpt.CODE.name} this zmaj "
                "exports; zmaj publishes only model code it wrote (export the model again)"
            )
    return True


def check_weights_file(path: Path) -> None:
    """Refuse a safetensors file whose header does not describe it (cut short by a copy, or no safetensors at
    all): ``safe_open`` reads the header alone and checks that its tensors cover the file, without the weights."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise ValueError(f"{path}: not a whole safetensors file ({error})") from None


def check_dataset_folder(folder: Path) -> DatasetCard:
    """Its card, when ``folder`` has data files and a dataset card whose ``configs`` name them."""
    card = read_card(folder, DatasetCard)
    assert isinstance(card, DatasetCard)
    configs = card.data.to_dict().get("configs") or []  # type: ignore[no-untyped-call]
    if not configs:
        raise ValueError(f"{folder}/{CARD_FILE}: the card's metadata has no configs (data files)")
    for config in configs:
        for entry in config["data_files"]:
            if not list(folder.glob(entry["path"])):
                raise ValueError(f"{folder}: no file matches {entry['path']} (split {entry['split']})")
    return card


def publish(
    folder: Path,
    repo_id: str,
    token: str,
    *,
    repo_type: str = "model",
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
) -> str:
    """Upload ``folder`` to ``repo_id`` (created if missing; private only if it is created here), on branch
    ``revision`` (created from main if missing), in one commit that also deletes what the folder does not hold;
    the URL of the commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=True if private else None, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type=repo_type).private:  # an existing public one is kept
        raise ValueError(
            f"--private: {repo_id} exists and is public, so the upload would be public; make it private on "
            "the Hub first, or leave out --private"
        )
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    files = upload_files(folder)
    size = sum(size for _, size in files)
    # huggingface_hub draws the transfer's bars itself (unless HF_HUB_DISABLE_PROGRESS_BARS is set).
    logger.info(f"uploading {len(files)} files, {size / 1e6:,.1f} MB, to {repo_type} {repo_id}")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type=repo_type,
        revision=revision,
        commit_message=message or f"Upload {folder.name} with zmaj",
        # The repository becomes the folder: a file of an earlier upload that the folder no longer has (a single
        # model.safetensors where shards came since) would stay, and transformers would load it.
        delete_patterns="*",
    )
    return str(commit.commit_url)
