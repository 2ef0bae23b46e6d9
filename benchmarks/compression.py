"""What "good compression" means on the held-out stdlib files: xz and gzip, in bits per byte.

A language model's validation loss in bits per byte is a compression rate (arithmetic coding turns one into the
other), so classic compressors on the same held-out files are the bar to clear. Each is run file by file, as a
model sees each document fresh, and on the concatenation. Prints a markdown table and writes it to
benchmarks/results/compression.md.

    uv run benchmarks/compression.py
"""

import argparse
import gzip
import lzma
from pathlib import Path

from loguru import logger

from zmaj.data.config import StdlibSource
from zmaj.data.corpus import documents

RESULTS = Path(__file__).resolve().parent / "results"


def bits_per_byte(compressed: int, raw: int) -> float:
    return 8.0 * compressed / raw


def main() -> None:
    # No options; parsed so that --help (or a typo) explains the script instead of running it.
    argparse.ArgumentParser(description=__doc__).parse_args()
    docs = [d.text.encode() for d in documents(StdlibSource(), "validation", 0.05)]
    raw = sum(len(d) for d in docs)
    logger.info(f"{len(docs)} held-out documents, {raw} bytes")
    xz_files = sum(len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)) for d in docs)
    # The .xz container (headers, index, CRC64) is about 57 bytes a file: the compressed stream alone, as a
    # model's bits count only its predictions, is the fairer bar file by file.
    lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    raw_files = sum(len(lzma.compress(d, format=lzma.FORMAT_RAW, filters=lzma2)) for d in docs)
    gzip_files = sum(len(gzip.compress(d, compresslevel=9)) for d in docs)
    joined = b"".join(docs)
    xz_joined = len(lzma.compress(joined, preset=9 | lzma.PRESET_EXTREME))
    gzip_joined = len(gzip.compress(joined, compresslevel=9))
    rows = [
        ("xz -9e, file by file", bits_per_byte(xz_files, raw)),
        ("LZMA2 -9e without the .xz container, file by file", bits_per_byte(raw_files, raw)),
        ("xz -9e, concatenated", bits_per_byte(xz_joined, raw)),
        ("gzip -9, file by file", bits_per_byte(gzip_files, raw)),
        ("gzip -9, concatenated", bits_per_byte(gzip_joined, raw)),
    ]
    table = "| compressor | bits per byte |\n| --- | --- |\n" + "\n".join(
        f"| {n} | {v:.3f} |" for n, v in rows
    )
    table += f"\n\n{len(docs)} held-out stdlib documents (validation_fraction 0.05), {raw:,} bytes.\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compression.md").write_text(table)


if __name__ == "__main__":
    main()
