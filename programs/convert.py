"""Convert a model to a Hugging Face folder (for ``transformers`` and the tools that read its format) or to a zmaj
model folder.

    uv run programs/convert.py runs/stdlib-gpt2-2019-20261126-101500 exports/stdlib-gpt2-2019
    uv run programs/convert.py SmolLM2-135M-Instruct-Q8_0.gguf models/smollm2 --to zmaj --dtype bfloat16

SRC is any model PATH ``zmaj.convert.load.load_model`` reads: a .gguf file, a Hugging Face folder, a zmaj model
folder, a zmaj run or one of its checkpoints. DST is a folder, replaced whole once the new one is written; an
existing one must be a model folder zmaj wrote, so that a mistyped path deletes nothing. A
model that ``transformers`` cannot compute exactly is refused, naming the setting, rather than exported
approximately.
"""

import argparse
import sys
from pathlib import Path

from loguru import logger

from zmaj.convert.export import save_hf
from zmaj.convert.hf import DTYPES
from zmaj.convert.load import check_model_destination, load_model, save_zmaj
from zmaj.extras import MissingExtraError
from zmaj.train import runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="the model to convert (any model PATH)")
    parser.add_argument("dst", type=Path, help="the folder to write")
    parser.add_argument(
        "--to",
        choices=["hf", "zmaj"],
        default="hf",
        help="hf: a Hugging Face folder (default); zmaj: a zmaj model folder",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="cast the floating-point parameters (default: as stored)"
    )
    args = parser.parse_args()
    try:
        check_model_destination(args.dst, args.src)
        model = load_model(args.src)
        if args.dtype is not None:
            model = model.to(dtype=DTYPES[args.dtype])  # refused where it overflows
    except (OSError, ValueError, MissingExtraError) as error:  # OSError: missing, or not this user's to read
        logger.error(str(error))
        sys.exit(2)
    save = save_hf if args.to == "hf" else save_zmaj
    try:
        save(model, args.dst)
    except ValueError as error:
        logger.error(f"cannot write {args.src} as a {args.to} folder: {error}")
        sys.exit(2)
    except OSError as error:  # a full disk, no permission, a destination that is a mount point
        logger.error(f"cannot write {args.dst}: {error}")
        sys.exit(2)
    logger.info(f"wrote {args.dst} ({args.to}, {model.architecture.name})")


if __name__ == "__main__":
    runs.ctrl_c_exits_130(
        main, "interrupted (Ctrl-C); DST is as it was: a model folder is written whole or not at all"
    )
