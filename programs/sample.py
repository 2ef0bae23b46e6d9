"""Sample from a pre-trained zmaj run: prints the prompt's continuation.

uv run programs/sample.py runs/stdlib-tiny-20261126-101500 --prompt "def parse(" --max-new-tokens 64
"""

import argparse
import sys
from pathlib import Path

import torch
from generate import checked_sampling, seed
from loguru import logger

from zmaj import checkpoint
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer.sample import sample
from zmaj.models import gpt
from zmaj.specfile import SpecError
from zmaj.text import utf8
from zmaj.train import precision
from zmaj.train.spec import PretrainSpec, load


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--prompt", required=True, type=utf8, help="text to continue (documents start without a BOS token)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    parser.add_argument(
        "--top-k", type=int, default=50, help="sample among the k most likely tokens (default: 50; 0: all)"
    )
    parser.add_argument("--seed", type=seed, default=0)
    args = parser.parse_args()
    sampling = checked_sampling(args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    try:
        spec = load(PretrainSpec, args.run_dir / "spec.yaml")
        latest = checkpoint.latest(args.run_dir)
        tokenizer = Tokenizer.load(args.run_dir / "tokenizer.json")
        params = checkpoint.load_params(latest, gpt.init(spec.model, 0, device="meta"))
    except (SpecError, FileNotFoundError, ValueError) as error:  # ValueError: also a damaged checkpoint
        logger.error(str(error))
        sys.exit(2)
    if tokenizer.vocab_size != spec.model.vocab_size:
        logger.error(
            f"{args.run_dir}/tokenizer.json has {tokenizer.vocab_size} tokens, the model {spec.model.vocab_size}"
        )
        sys.exit(2)
    device = precision.default_device()
    params = params.to(device)
    if not args.prompt:
        logger.error("--prompt must not be empty: the model needs at least one token to continue")
        sys.exit(2)
    prompt = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    new = sample(
        lambda batch: gpt.forward(params, batch, spec.model),
        prompt,
        args.max_new_tokens,
        spec.model.context,
        sampling.temperature,
        sampling.top_k,
        args.seed,
        stop_token=tokenizer.eos_id,
    )
    ids = [i for i in new[0].tolist() if i != tokenizer.eos_id]
    print(args.prompt + tokenizer.decode(ids))


if __name__ == "__main__":
    main()
