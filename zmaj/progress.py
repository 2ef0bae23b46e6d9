"""Progress of long steps: one log line saying what is being done and how much, then a bar with a count and an ETA.

A step that runs for minutes without a word (sampling thousands of answers for DPO pairs, training a tokenizer,
de-quantising a GGUF file) cannot be told from a hang. Every such step goes through ``progress`` so that they all
look alike: the line goes through loguru with the rest of the log, the bar (``tqdm``) to stderr, where loguru
writes too. Only rank 0 of a distributed job shows a bar (every rank does the same work, and N bars on one
terminal overwrite each other); the other ranks log warnings only (``zmaj.train.runs.quiet_logging``).
"""

import sys
from collections.abc import Iterable
from typing import TypeVar

import torch.distributed as dist
from loguru import logger
from tqdm import tqdm

T = TypeVar("T")


def is_main_process() -> bool:
    """Whether this process is rank 0 of its job, or not in a distributed job at all."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress(
    items: Iterable[T] | None, total: int | None, what: str, unit: str = "it", unit_scale: bool = False
) -> "tqdm[T]":
    """``items`` as they come, after logging ``what`` (say how much: "sampling 8 answers to each of 2,000 prompts
    for DPO pairs"), with a bar of ``total`` ``unit``s on rank 0.

    With ``items=None`` the bar is advanced by hand (``bar.update(n)``), for work done in batches of several units;
    use it as a context manager so that the bar is closed however the step ends. ``unit_scale`` writes large
    counts with k, M, G (for bytes).
    """
    logger.info(what)
    return tqdm(
        items,
        total=total,
        unit=unit,
        unit_scale=unit_scale,
        file=sys.stderr,  # looked up now, not at import: where the program's stderr is at the time
        dynamic_ncols=True,
        disable=not is_main_process(),
    )
