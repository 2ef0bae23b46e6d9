"""A model as a Hugging Face folder with its model card: what ``programs/export.py`` writes and
``programs/publish.py`` uploads.

The folder is ``zmaj.convert.export.save_hf``'s (config, safetensors, tokenizer, generation config) plus
``README.md`` (``zmaj.publish.card``) and, for a run, its training-curve plot. It is written beside the
destination and renamed into place, so a failed export never leaves half a folder.
"""

import re
from pathlib import Path

import torch
from loguru import logger

from zmaj.convert.export import DEFAULT_MAX_SHARD_BYTES, write_hf
from zmaj.convert.load import load_model, staged_folder
from zmaj.publish.card import known_license, model_card, read_run, write_card

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes in ``5GB``, ``500MB``, ``2GiB`` or ``1000``: decimal units as ``transformers`` reads them."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if match is None or match.group(2).upper() not in UNITS:
        raise ValueError(f"size {text!r} is not a number of bytes with a unit (e.g. 5GB, 500MB, 2GiB)")
    size = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def export_model(
    source: str | Path,
    folder: Path,
    *,
    license: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    repo_id: str | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Write the model at ``source`` (any model PATH; a run gives the fullest card) as a Hugging Face folder
    with its card. Raises ValueError (nothing written) for a model ``transformers`` cannot compute exactly, or
    without a ``license`` where zmaj cannot know the model's (``card.known_license``)."""
    model = load_model(source)  # first: a source that is no model says so, whatever the flags
    run = read_run(Path(source))
    known = known_license(source, run)
    if license is None and known is None:
        raise ValueError(
            f"the license of {source} is not known to zmaj (not a zmaj pre-training run, a shipped model, a "
            "model folder whose card names one, or a fine-tune of one of these): name it with --license"
        )
    if license is not None and known is not None and license != known:
        logger.warning(f"--license {license}, where the model it comes from is under {known}")
    license = license or known
    assert license is not None
    if dtype is not None:
        model = model.to(dtype=dtype)  # refused where it overflows
    card = model_card(model, run, name=folder.name, license=license, repo_id=repo_id, datasets=datasets)
    with staged_folder(folder) as staging:
        write_hf(model, staging, max_shard_bytes)
        write_card(staging, card, run)
    return folder
