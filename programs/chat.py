"""Chat with a model in the terminal, in its own chat template, streaming each answer.

    uv run programs/chat.py --model pypi:smollm2-135m-instruct --system "You are a terse assistant."

Reads one user message per line from stdin; each answer goes to stdout as it is generated, ending with a newline.
"/reset" forgets the conversation, "/exit", end of input (Ctrl-D) or Ctrl-C end the chat. The whole conversation
is the prompt of every answer; when it no longer fits the model's context, the oldest turns are forgotten. The
key/value cache is kept from one answer to the next, so each answer computes only the new turn's tokens
(``zmaj.infer.chat``).
The "> " prompt goes to stderr, and only when stdin is a terminal, so piped output holds only the answers.
"""

import argparse
import io
import sys
from collections.abc import Iterator

from generate import DTYPE_HELP, DTYPES, MODEL_HELP, fail, load, params_dtype_device, sampling_from
from loguru import logger

from zmaj.convert.load import Pretrained
from zmaj.data.chat_template import Message
from zmaj.infer.chat import Context, empty_context, reply
from zmaj.infer.generate import NonFiniteLogitsError, Sampling
from zmaj.specfile import seed_argument
from zmaj.text import not_utf8, utf8
from zmaj.train import runs


def main() -> None:
    args = parse_args()
    sampling = sampling_from(args)
    if sys.stdin is None:  # started with stdin closed (`<&-`): said before the model loads, not after
        fail("stdin is closed: chat.py reads the user's messages from it")
    model = load(args.model, args.dtype)
    if model.tokenizer.chat_template is None:
        fail(f"--model {args.model}: its tokenizer has no chat template, so it cannot chat")
    system: list[Message] = [] if args.system is None else [{"role": "system", "content": args.system}]
    # The template and system message around an empty message, and a token for the message itself: what every
    # message takes at least. Said now, not at each message; so is a template that refuses the system message.
    try:
        least = len(model.tokenizer.encode_chat([*system, {"role": "user", "content": ""}]))
    except ValueError as error:
        fail(f"--system: {error}" if system else str(error))
    if least + 1 + args.max_new_tokens > model.config.context:
        around = "the chat template and --system alone take" if system else "the chat template alone takes"
        fail(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the model's context of "
            f"{model.config.context} tokens ({around} {least})"
        )
    history: list[Message] = []
    context = empty_context(model.config, *params_dtype_device(model))
    answers = 0
    try:
        for line in user_lines(interactive=sys.stdin.isatty()):
            if line == "/exit":
                break
            if line == "/reset":
                history, context = [], empty_context(model.config, *params_dtype_device(model))
                logger.info("conversation forgotten")
                continue
            if not line.strip():
                continue
            if (problem := not_utf8(line)) is not None:  # say so, and keep the conversation
                logger.error(f"this message is {problem}: the model reads text")
                continue
            user: Message = {"role": "user", "content": line}
            try:
                alone = model.tokenizer.encode_chat([*system, user])
            except ValueError as error:  # the template refuses it: say so, and keep the conversation
                logger.error(str(error))
                continue
            # Checked alone, before any of the history is forgotten to make room for it.
            if len(alone) + args.max_new_tokens > model.config.context:
                logger.error(
                    f"this message and --max-new-tokens do not fit the model's context of "
                    f"{model.config.context} tokens, even without the conversation before it"
                )
                continue
            history = fitting(model, system, history, user, args.max_new_tokens)
            ids = model.tokenizer.encode_chat([*system, *history, user])
            answer, context = say(
                model, context, ids, args.max_new_tokens, sampling, (args.seed + answers) % 2**64
            )
            history = [*history, user, {"role": "assistant", "content": answer}]
            answers += 1
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    except NonFiniteLogitsError as error:  # activations past float's range: one line, on a line of its own
        sys.stdout.write("\n")
        fail(str(error))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    parser.add_argument("--system", type=utf8, help="a system message opening the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="per answer (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens only")
    parser.add_argument("--top-p", type=float, help="sample from the nucleus of probability p only")
    parser.add_argument(
        "--seed",
        type=seed_argument,
        default=0,
        help="answer i is sampled with seed + i (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    return parser.parse_args()


def user_lines(interactive: bool) -> Iterator[str]:
    """The user's messages, one a line, until the end of input; a terminal gets a "> " prompt.

    Bytes that are not UTF-8 come as lone surrogates whatever the locale (under a UTF-8 one, Python's stdin
    would raise on them, ending the conversation), so that the line is refused and the conversation goes on.
    """
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\r\n")


def fitting(
    model: Pretrained, system: list[Message], history: list[Message], user: Message, max_new_tokens: int
) -> list[Message]:
    """``history`` without its oldest exchanges, as few as need to go for the next answer to fit the context."""
    while history:
        prompt = model.tokenizer.encode_chat([*system, *history, user])
        if len(prompt) + max_new_tokens <= model.config.context:
            break
        logger.warning("the conversation no longer fits the model's context: forgetting its oldest exchange")
        history = history[2:]
    return history


def say(
    model: Pretrained, context: Context, prompt: list[int], max_new_tokens: int, sampling: Sampling, seed: int
) -> tuple[str, Context]:
    """Stream the answer to ``prompt`` to stdout; return it and the cache that the next answer continues."""
    step = model.architecture.cached(model.config)
    answer, context = reply(
        step, model.params, context, prompt, model.tokenizer, max_new_tokens, sampling, seed, show=write
    )
    write("\n")
    return answer, context


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main, "interrupted (Ctrl-C)")
