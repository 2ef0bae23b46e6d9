"""Optional capabilities: what ``pip install zmaj`` leaves out, and the one line a user gets when asking for one.

The core (``[project.dependencies]``) pre-trains, fine-tunes, evaluates on zmaj's own tasks and generates from
zmaj runs and Hugging Face folders. Each capability that needs a heavier package is an extra of
``pyproject.toml``: ``gguf`` (GGUF files and their tokenizers), ``hub`` (checking and publishing model folders,
which ``transformers`` must read), ``eval`` (the lm-evaluation-harness backend) and ``trackers`` (trackio, wandb,
TensorBoard). A module that needs an extra imports it inside :func:`needs`, at the top of the module or in the
function that uses it, so that the ImportError a user would see becomes one line naming the extra to install:

    with needs("gguf", "loading a GGUF file"):
        from gguf.quants import dequantize

``uv run`` in the repository installs every extra (the ``dev`` group), so there all of them are present.
"""

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

EXTRAS: dict[str, frozenset[str]] = {
    "gguf": frozenset({"gguf", "transformers"}),
    "hub": frozenset({"transformers", "huggingface_hub"}),
    "eval": frozenset({"lm_eval", "transformers"}),
    "trackers": frozenset({"trackio", "wandb", "tensorboard"}),
}
"""The top-level modules each extra installs (``pyproject.toml``'s ``[project.optional-dependencies]``)."""


class MissingExtraError(ModuleNotFoundError):
    """A capability was asked for whose extra is not installed; the message says which and how to install it."""


def message(extra: str, purpose: str) -> str:
    """The one line a user without ``extra`` reads when asking for ``purpose``."""
    return f"{purpose} needs the '{extra}' extra: pip install 'zmaj[{extra}]'"


@contextmanager
def needs(extra: str, purpose: str) -> Iterator[None]:
    """Imports inside this block that fail for want of one of ``extra``'s packages raise
    :class:`MissingExtraError` naming the extra; any other failed import is raised as it is (a bug, not a
    missing extra)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {', '.join(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in EXTRAS[extra]:
            raise
        raise MissingExtraError(f"{message(extra, purpose)} ({missing} is not installed)") from error


def installed(module: str) -> bool:
    """Whether ``module`` (a top-level name) can be imported, without importing it (some take seconds)."""
    return importlib.util.find_spec(module) is not None
