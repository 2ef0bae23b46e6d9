"""Sample from a pre-trained zmaj run: prints the prompt's continuation.

uv run programs/sample.py runs/stdlib-tiny-20261126-101500 --prompt "def parse(" --max-new-tokens 64
"""

import argparse
import sys
from pathlib import Path

from generate import checked_sampling
from loguru import logger

from zmaj import checkpoint
from zmaj.convert.load import LORA_FILE, READ_ANYWAY, check_weights, run_config
from zmaj.data.tokenizer import Tokenizer
from zmaj.infer.generate import NonFiniteLogitsError
from zmaj.infer.sample import continuation
from zmaj.models import gpt
from zmaj.models.gpt import GPTConfig
from zmaj.specfile import SpecError, seed_argument
from zmaj.text import utf8
from zmaj.train import precision, runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--prompt", required=True, type=utf8, help="text to continue (documents start without a BOS token)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)")
    parser.add_argument(
        "--top-k", type=int, default=50, help="sample among the k most likely tokens (default: 50; 0: all)"
    )
    parser.add_argument("--seed", type=seed_argument, default=0)
    args = parser.parse_args()
    sampling = checked_sampling(args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    try:
        # The model section alone, as load_model reads it: a run whose training files moved (or a relative
        # path read from another folder) is still a model to sample from.
        config = run_config(args.run_dir)
        if not isinstance(config, GPTConfig) or (args.run_dir / LORA_FILE).is_file():
            raise ValueError(f"{args.run_dir} is not a zmaj GPT pre-training run: sample it with generate.py")
        latest = checkpoint.newest(args.run_dir)
        # The model the checkpoint recorded, or a one-line refusal (as load_model's run_config checks it).
        checkpoint.check_recorded_model(latest, config.model_dump(mode="json"), READ_ANYWAY)
        tokenizer = Tokenizer.load(args.run_dir / "tokenizer.json")
        params = checkpoint.load_params(latest, gpt.init(config, 0, device="meta"))
        check_weights(params, str(latest))
    except (SpecError, OSError, ValueError) as error:  # OSError: missing or unreadable; ValueError: damaged
        logger.error(str(error))
        sys.exit(2)
    if tokenizer.vocab_size != config.vocab_size:
        logger.error(
            f"{args.run_dir}/tokenizer.json has {tokenizer.vocab_size} tokens, the model {config.vocab_size}"
        )
        sys.exit(2)
    device = precision.default_device()
    params = params.to(device)
    if not args.prompt:
        logger.error("--prompt must not be empty: the model needs at least one token to continue")
        sys.exit(2)
    prompt = tokenizer.encode(args.prompt)
    try:
        new = continuation(
            params,
            config,
            prompt,
            args.max_new_tokens,
            sampling.temperature,
            sampling.top_k,
            args.seed,
            stop_token=tokenizer.eos_id,
        )
    except NonFiniteLogitsError as error:  # activations past float's range: one line
        logger.error(str(error))
        sys.exit(2)
    ids = [i for i in new if i != tokenizer.eos_id]
    print(args.prompt + tokenizer.decode(ids))


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main, "interrupted (Ctrl-C)")
