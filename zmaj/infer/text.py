"""Generated tokens as text, piece by piece as they come: what a program streams to its user.

Tokens are not characters. A byte-level BPE token can hold half of a multi-byte UTF-8 character, and a
SentencePiece-style decoder turns a token's leading ``▁`` into a space or not depending on what precedes it, so
decoding each token alone garbles text. Decoding all the new tokens so far and emitting the part not yet shown is
exact; an incomplete character decodes to U+FFFD (the replacement character) until its last byte arrives, so a
trailing U+FFFD is held back. (``transformers``' ``TextStreamer`` does the same, holding back up to the last space.)
"""

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence

from tensordict import TensorDictBase

from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.infer.generate import GREEDY, CachedForward, Sampling, stream
from zmaj.infer.lookup import stream_lookup

REPLACEMENT = "\ufffd"


def detokenize(
    tokens: Iterable[int], decode: Callable[[list[int]], str], held: Collection[int] = frozenset()
) -> Iterator[str]:
    """The text of ``tokens`` in pieces whose concatenation is ``decode(all tokens)``, each emitted as soon as it is
    final.

    ``held``: tokens after which nothing is emitted, because what follows can change their text. A SentencePiece
    model's byte tokens (``<0xF0>``, :func:`byte_tokens`) are decoded a run at a time, and a run that is not UTF-8
    turns into one U+FFFD per byte, the valid characters at its start included; its text is final only once an
    ordinary token ends it. Re-decoding every step costs time quadratic in the answer's length, negligible next to
    the model for the thousands of tokens of an answer.
    """
    ids: list[int] = []
    shown = ""
    for token in tokens:
        ids.append(token)
        if token in held:
            continue
        text = decode(ids).rstrip(REPLACEMENT)
        if len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
    rest = decode(ids)[len(shown) :]
    if rest:
        yield rest


def byte_tokens(tokenizer: ModelTokenizer) -> frozenset[int]:
    """The ids of a byte-fallback vocabulary's byte tokens (``<0x00>`` to ``<0xFF>``; Gemma's, Llama 2's); none in
    a byte-level BPE's, whose tokens hold bytes in their spelling."""
    inner = tokenizer.tokenizer  # 256 lookups, not a pass over a 262,144-token vocabulary at every answer
    return frozenset(i for byte in range(256) if (i := inner.token_to_id(f"<0x{byte:02X}>")) is not None)


def held_tokens(tokenizer: ModelTokenizer) -> frozenset[int]:
    """What :func:`detokenize` holds for a tokenizer's text, skipping special tokens: its byte tokens, and its
    special tokens, which decode to nothing, so the bytes on either side of one join into a single run (Gemma's
    ``<0x6A> <unused2594> <0x93>`` shows as "j", then decodes as a two-byte run that is not UTF-8: "\ufffd\ufffd")."""
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    return byte_tokens(tokenizer) | {i for i, token in added.items() if token.special}


def complete(
    step: CachedForward,
    params: TensorDictBase,
    cache: TensorDictBase,
    prompt: Sequence[int],
    tokenizer: ModelTokenizer,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    donate: bool = False,
    draft_tokens: int = 0,
) -> Iterator[str]:
    """The continuation of one prompt as text pieces, ending at one of the tokenizer's stop tokens (not shown)
    or after ``max_new_tokens``; special tokens are skipped. ``cache`` and ``donate`` are as
    ``zmaj.infer.generate.stream`` takes them. ``draft_tokens`` above 0 decodes greedily by prompt lookup
    (``zmaj.infer.lookup``), checking up to that many tokens copied from the context in each pass."""
    stops = tokenizer.stop_ids
    if draft_tokens > 0:
        if sampling != GREEDY:
            raise ValueError(f"prompt lookup decodes greedily, not with {sampling}")
        new = stream_lookup(
            step, params, cache, prompt, max_new_tokens, draft_tokens, stop_tokens=stops, donate=donate
        )
    else:
        emitted = stream(
            step, params, cache, [prompt], max_new_tokens, sampling, seed, stop_tokens=stops, donate=donate
        )
        new = (int(each.tokens[0]) for each in emitted)
    tokens = (token for token in new if token not in stops)
    return detokenize(tokens, tokenizer.decode, held_tokens(tokenizer))
