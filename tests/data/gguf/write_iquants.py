"""Writes ``iquants.npz``: random blocks of each of llama.cpp's I-quant types and the values ggml's own C kernels
(``dequantize_row_*`` in ``ggml-quants.c``) dequantise them to, the reference of
``tests/unit/convert/test_gguf.py::test_i_quants_dequantise_as_ggml_does``.

The I-quants look their codes up in lattice grids of up to 2,048 entries (IQ1_S) that a test could only copy,
not write independently, so the reference is ggml itself, as llama-cpp-python ships it:

    uv run --group llama-cpp python tests/data/gguf/write_iquants.py

Bytes are random except each block's float16 scale, kept small and finite (IQ1_M spreads its scale over the
top nibbles of its last four 16-bit words; blocks whose values are not all finite are drawn again).
"""

import ctypes
import importlib.util
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType

IQUANTS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS")
BLOCKS = 2
HERE = Path(__file__).parent


def ggml_dequantize(library: ctypes.CDLL, kind: str, blocks: np.ndarray) -> np.ndarray:
    block_size, _ = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    values = np.zeros(len(blocks) * block_size, np.float32)
    kernel = getattr(library, f"dequantize_row_{kind.lower()}")
    kernel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    kernel(np.ascontiguousarray(blocks).ctypes.data, values.ctypes.data, len(values))
    return values


def main() -> None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise SystemExit("llama-cpp-python is not installed: run with `uv run --group llama-cpp`")
    library = ctypes.CDLL(str(Path(spec.origin).parent / "lib" / "libggml-base.so"))
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {}  # Any: numpy types savez_compressed's keywords as its allow_pickle flag
    for kind in IQUANTS:
        _, block_bytes = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        while True:
            blocks = rng.integers(0, 256, (BLOCKS, block_bytes), dtype=np.uint8)
            if kind != "IQ1_M":  # the others start with their float16 scale
                blocks[:, :2] = rng.normal(0, 0.1, (BLOCKS, 1)).astype(np.float16).view(np.uint8)
            values = ggml_dequantize(library, kind, blocks)
            if np.isfinite(values).all():
                break
        arrays[f"{kind}_blocks"], arrays[f"{kind}_values"] = blocks, values
    np.savez_compressed(HERE / "iquants.npz", **arrays)


if __name__ == "__main__":
    main()
