"""Benchmark of prompt lookup decoding (``zmaj.infer.lookup``) against plain greedy decoding, on SmolLM2-135M.

For each of a few chat prompts, the same greedy answer is generated both ways in one process, eagerly (what
``programs/generate.py`` runs without ``--compile``): one token per pass (``zmaj.infer.generate.stream``), then
with up to ``--draft-tokens`` tokens drafted from the context and checked per pass (``--prompt-lookup K``).
Answers that copy from their prompt (editing code, quoting) are where drafts are kept; a free answer is where they
cost. Printed per prompt: tokens, passes over the model, tokens/s of each, the speedup, and whether the tokens
are the same. Run by hand:

    uv run python benchmarks/prompt_lookup.py                 # fp32, drafts of up to 10 tokens
    uv run python benchmarks/prompt_lookup.py --dtype bf16    # where bf16 is fast

Writes ``benchmarks/results/prompt_lookup.md`` (``--name``).
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from common import DTYPES, markdown_table, print_header, usable_dtypes
from tensordict import TensorDictBase
from torch import Tensor

from zmaj.convert import weights
from zmaj.convert.load import load_model
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import CachedForward, stream
from zmaj.infer.lookup import stream_lookup
from zmaj.models.common import Batch

RESULTS = Path(__file__).parent / "results"


class Counting:
    """A decode step that records how many tokens each pass over the model was fed."""

    def __init__(self, step: CachedForward) -> None:
        self.step, self.fed = step, list[int]()

    def __call__(
        self, params: TensorDictBase, batch: Batch, cache: TensorDictBase, **kwargs: bool
    ) -> tuple[Tensor, TensorDictBase]:
        self.fed.append(batch.tokens.shape[1])
        return self.step(params, batch, cache, **kwargs)


CODE = """def mean(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)


def variance(values):
    center = mean(values)
    total = 0
    for value in values:
        total = total + (value - center) ** 2
    return total / len(values)
"""
PROMPTS = {
    "edit code": f"Add a docstring to each of these Python functions; change nothing else.\n\n{CODE}",
    "quote": (
        "Repeat this sentence exactly, then say who wrote it: It was the best of times, it was the worst of "
        "times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief."
    ),
    "free answer": "Explain in three sentences why the sky is blue.",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--draft-tokens", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument(
        "--runs", type=int, default=3, help="timed rounds, fastest kept (default %(default)s)"
    )
    parser.add_argument("--name", default="prompt_lookup", help="results/NAME.md (default %(default)s)")
    args = parser.parse_args()
    if args.runs < 1 or args.draft_tokens < 1:
        parser.error(f"--runs and --draft-tokens: at least 1, got {args.runs} and {args.draft_tokens}")
    device = torch.device("cpu")
    head = print_header(device)
    dtypes, notes = usable_dtypes([args.dtype], device, "decoding")
    if not dtypes:
        sys.exit("; ".join(notes))
    model = load_model(weights.smollm2_gguf()).to(dtype=DTYPES[args.dtype])
    step = model.architecture.cached(model.config)
    stops = model.tokenizer.stop_ids
    rows = []
    for name, text in PROMPTS.items():
        prompt = model.tokenizer.encode_chat([{"role": "user", "content": text}])

        cache = init_cache(model.config, 1, len(prompt) + args.max_new_tokens, DTYPES[args.dtype])
        counting = Counting(step)
        # A warm-up round (allocations, first-call overheads), then --runs timed rounds, plain then lookup in
        # each, so that load coming and going on the host falls on both alike; the fastest of each is kept.
        plain_s = lookup_s = float("inf")
        for round_ in range(args.runs + 1):
            start = time.perf_counter()
            emitted = stream(step, model.params, cache, [prompt], args.max_new_tokens, stop_tokens=stops)
            plain = [int(each.tokens[0]) for each in emitted]
            plain_s = min(plain_s, time.perf_counter() - start) if round_ else plain_s
            counting.fed.clear()
            start = time.perf_counter()
            new = stream_lookup(
                counting,
                model.params,
                cache,
                prompt,
                args.max_new_tokens,
                args.draft_tokens,
                stop_tokens=stops,
            )
            drafted = list(new)
            lookup_s = min(lookup_s, time.perf_counter() - start) if round_ else lookup_s
        passes = len(counting.fed)
        rows.append(
            {
                "prompt": name,
                "prompt tokens": len(prompt),
                "new tokens": len(plain),
                "passes (lookup)": passes,
                "plain tok/s": f"{len(plain) / plain_s:.1f}",
                "lookup tok/s": f"{len(drafted) / lookup_s:.1f}",
                "speedup": f"{plain_s / lookup_s * len(drafted) / len(plain):.2f}",
                "same tokens": "yes" if drafted == plain else "no",
            }
        )
        print(rows[-1], flush=True)
    table = markdown_table(rows, list(rows[0]))
    print(table)
    RESULTS.mkdir(exist_ok=True)
    lines = [
        f"# Prompt lookup decoding (`{shlex.join(['python', *sys.argv])}`)",
        "",
        head,
        f"- SmolLM2-135M-Instruct, {args.dtype}, eager, batch 1, greedy; drafts of up to {args.draft_tokens} "
        f"tokens, at most {args.max_new_tokens} new tokens, stopping at the model's stop tokens; the fastest "
        f"of {args.runs} rounds, plain and lookup in turn",
        *(f"- {note}" for note in notes),
        "",
        table,
        "",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
