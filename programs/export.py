"""Export a model, usually a zmaj run, as a Hugging Face folder with a model card, ready for
``programs/publish.py`` (or ``transformers``' ``from_pretrained`` on the folder).

    uv run programs/export.py runs/stdlib-gpt2-2019-20261126-101500 exports/stdlib-gpt2-2019 --license mit
    uv run programs/export.py runs/sft-smollm2-arithmetic exports/smollm2-arithmetic --dtype bfloat16 \\
        --repo-id me/smollm2-arithmetic --max-shard-size 2GB

RUN_DIR is any model PATH ``zmaj.convert.load.load_model`` reads; a run folder (pre-training or fine-tuning,
LoRA adapters merged) gives the full card: spec, data and tokens seen, final metrics, curves, hardware and wall
time. OUT_DIR is replaced whole once the new folder is written; an existing one must be a model folder zmaj
wrote (an earlier export), so that a mistyped path deletes nothing. A model ``transformers`` cannot compute
exactly (e.g. a GPT with RMSNorm) is refused with a one-line error and exit status 2, as is any other bad input.
"""

import argparse
import sys
from pathlib import Path

from loguru import logger

from zmaj.convert.hf import DTYPES
from zmaj.convert.load import check_model_destination
from zmaj.extras import MissingExtraError
from zmaj.publish.export import export_model, parse_size
from zmaj.publish.hub import license_id, repo_id
from zmaj.train import runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", help="the model to export: a zmaj run, or any model PATH")
    parser.add_argument("out_dir", type=Path, help="the folder to write (replaced if it exists)")
    parser.add_argument(
        "--license",
        type=license_id,
        help="the card's license id (default: the model's where zmaj knows it: apache-2.0 for a model "
        "pre-trained with zmaj, a shipped model's for its fine-tunes; required otherwise)",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), help="cast the floating-point parameters (default: as stored)"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file (default: %(default)s)"
    )
    parser.add_argument(
        "--repo-id", type=repo_id, help="USER/NAME for the card's loading snippet (default: a placeholder)"
    )
    parser.add_argument(
        "--dataset",
        dest="datasets",
        type=repo_id,
        action="append",
        default=[],
        metavar="HUB_ID",
        help="a Hub dataset the model learned from, for the card's metadata (repeatable)",
    )
    args = parser.parse_args()
    try:
        check_model_destination(args.out_dir, Path(args.run_dir))
        max_shard_bytes = parse_size(args.max_shard_size)
        dtype = None if args.dtype is None else DTYPES[args.dtype]
        export_model(
            args.run_dir,
            args.out_dir,
            license=args.license,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            repo_id=args.repo_id,
            datasets=args.datasets,
        )
    except (OSError, ValueError, MissingExtraError) as error:  # OSError: a missing model, a full disk
        logger.error(f"cannot export {args.run_dir}: {error}")
        sys.exit(2)
    logger.info(f"wrote {args.out_dir}")


if __name__ == "__main__":
    runs.ctrl_c_exits_130(
        main, "interrupted (Ctrl-C); OUT_DIR is as it was: an export replaces it whole or not at all"
    )
