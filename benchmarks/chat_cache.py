"""Benchmark of chat: time to the first token of each answer, re-encoding the conversation against keeping the cache.

SmolLM2-135M-Instruct (its GGUF, dequantised to fp32) answers the same ten user messages greedily, twice: once
encoding the whole conversation afresh for every answer (what ``programs/chat.py`` did before it kept its cache),
once continuing each answer from the cache the previous one left (``zmaj.infer.chat``). Greedy answers are the
same both ways (checked), so both conversations are the same tokens and only the prefill differs. Time to first
token is from the call to the first piece of text shown; the table gives each turn's best of ``--runs``
conversations. Run by hand:

    uv run python benchmarks/chat_cache.py               # 10 turns, 48 new tokens each
    uv run python benchmarks/chat_cache.py --quick       # 4 turns, 16 new tokens

Writes ``benchmarks/results/chat_cache.md`` (``chat_cache_quick.md`` with ``--quick``).
"""

import argparse
import time
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import torch
from common import markdown_table, print_header

from zmaj.convert import weights
from zmaj.convert.load import Pretrained, load_model
from zmaj.data.chat_template import Message
from zmaj.infer.chat import empty_context, reply
from zmaj.infer.generate import GREEDY

RESULTS = Path(__file__).parent / "results"
USER = [
    "Hi! Who are you?",
    "What is the capital of France?",
    "Tell me one fact about it.",
    "How many people live there?",
    "What is a good dish to eat there?",
    "How do I cook it?",
    "How long does that take?",
    "What wine goes with it?",
    "Summarise our conversation in one sentence.",
    "Thank you, goodbye!",
]


@dataclass(frozen=True)
class Turn:
    prompt: int
    cached: int
    ttft: float
    answer: str


def conversation(model: Pretrained, turns: int, new: int, keep: bool) -> list[Turn]:
    """One greedy conversation; each turn's prompt length, tokens prefilled, time to first token and answer."""
    step = model.architecture.cached(model.config)
    weight = model.params["embed", "weight"]
    context = empty_context(model.config, weight.dtype, weight.device)
    messages: list[Message] = []
    rows: list[Turn] = []
    for user in USER[:turns]:
        messages.append({"role": "user", "content": user})
        prompt = model.tokenizer.encode_chat(messages)
        if not keep:
            context = empty_context(model.config, weight.dtype, weight.device)
        same = (a == b for a, b in zip(context.tokens, prompt[:-1], strict=False))
        cached = sum(1 for _ in takewhile(bool, same))
        shown: list[float] = []  # when each piece of the answer was shown
        start = time.perf_counter()
        answer, context = reply(
            step, model.params, context, prompt, model.tokenizer, new, GREEDY, 0,
            show=lambda _, shown=shown: shown.append(time.perf_counter()),  # type: ignore[misc]
        )  # fmt: skip
        rows.append(Turn(len(prompt), cached, shown[0] - start, answer))
        messages.append({"role": "assistant", "content": answer})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--turns", type=int, default=len(USER))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if not 1 <= args.turns <= len(USER):
        parser.error(f"--turns: from 1 to {len(USER)} (one per built-in user message), got {args.turns}")
    if args.runs < 1:
        parser.error(f"--runs: at least 1, got {args.runs}")
    turns, new = (4, 16) if args.quick else (args.turns, args.new_tokens)
    torch.manual_seed(0)
    head = print_header("cpu")
    model = load_model(weights.smollm2_gguf())
    runs = {keep: [conversation(model, turns, new, keep) for _ in range(args.runs)] for keep in (False, True)}
    fresh, kept = runs[False][0], runs[True][0]
    assert [row.answer for row in fresh] == [row.answer for row in kept], "greedy answers differ"
    table = []
    for turn in range(turns):
        before = min(run[turn].ttft for run in runs[False])
        after = min(run[turn].ttft for run in runs[True])
        table.append(
            {
                "turn": turn + 1,
                "prompt tokens": kept[turn].prompt,
                "prefilled (cache kept)": kept[turn].prompt - kept[turn].cached,
                "TTFT re-encoding (ms)": round(before * 1e3, 1),
                "TTFT cache kept (ms)": round(after * 1e3, 1),
                "speed-up": f"{before / after:.1f}x",
            }
        )
    text = markdown_table(table, list(table[0]))
    print(text)
    RESULTS.mkdir(exist_ok=True)
    settings = (
        f"SmolLM2-135M-Instruct fp32, greedy, {new} new tokens per answer, best of {args.runs} conversations"
    )
    name = "chat_cache_quick" if args.quick else "chat_cache"  # a wiring check keeps the measured results
    (RESULTS / f"{name}.md").write_text(f"{head}\n\n{settings}\n\n{text}\n")


if __name__ == "__main__":
    main()
