"""``transformers`` loading a GGUF file, the reference of the GGUF parity tests, with the file parsed once.

``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` builds gguf-py's ``GGUFReader`` once for the
config and again for the weights, and ``AutoTokenizer`` a third time. Each build of Gemma 3 270M's took 20 s
on a 2-core AVX2 CPU (its 262,144-token vocabulary, element by element), SmolLM2's 5 s. The reader only reads
the file, so the three loads share one here; what ``transformers`` computes from it is unchanged.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
import transformers


@contextmanager
def one_reader_per_file() -> Iterator[None]:
    """``gguf.GGUFReader(path)`` gives the first reader built for ``path`` while this is open."""
    readers: dict[Path, gguf.GGUFReader] = {}
    build = gguf.GGUFReader

    def shared(path: str | Path, mode: str = "r") -> gguf.GGUFReader:
        key = Path(path).resolve()
        if key not in readers:
            readers[key] = build(path, mode)  # type: ignore[arg-type]  # gguf-py types mode as a Literal
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared)
        yield


def load_reference(path: Path) -> tuple[transformers.PreTrainedModel, Any]:
    """The float32 model ``transformers`` loads from the GGUF file at ``path`` (in eval mode), and its
    tokenizer."""
    with one_reader_per_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer
