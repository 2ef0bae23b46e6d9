"""Benchmark of zmaj's attention backends: eager vs SDPA vs compiled flex-attention, causal and document masks.

For each sequence length, dtype and mask it times ``zmaj.nn.attention.attention`` forward (under ``no_grad``) and
forward+backward (forward, then ``autograd.grad`` for q, k and v), and separately the construction of the mask by
``prepare_mask``, which a model does once per forward pass and shares between its layers. Masks:

- ``causal``: SDPA runs it twice, with ``mask=None`` (its ``is_causal`` fast path, what zmaj uses) and with a dense
  boolean causal mask, to show what a dense mask costs; eager gets the dense mask; flex a causal ``BlockMask``.
- ``causal+docN``: packed documents of N tokens (``document_ids = position // N``) AND causal. Eager and SDPA need
  the dense mask; flex skips the 128x128 tiles that no pair of the same document touches, so ``tiles`` (the fraction
  of tiles it computes) should predict its cost.

Timings are the median of several calls after warm-up; flex's compile time is excluded from them (every new shape
compiles anew) and reported in its own column. Configurations whose estimated memory or time is too large are
skipped with the reason in the table, as are the ones a backend does not support (flex-attention has no backward
on CPU). Run by hand:

    uv run python benchmarks/attention.py --quick        # a minute: is everything wired up?
    uv run python benchmarks/attention.py                # the full table (tens of minutes on a small CPU)
    uv run python benchmarks/attention.py --device cuda

Writes ``benchmarks/results/attention.md`` (header + table) and ``attention.png`` (ms vs sequence length).
"""

import argparse
import gc
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch._dynamo.config
from common import (
    DTYPES,
    dtype_names,
    markdown_table,
    matmul_peak_gflops,
    median_ms,
    print_header,
    timeit,
    usable_dtypes,
)
from loguru import logger
from matplotlib.ticker import NullLocator
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from zmaj.nn import attention, masks

PASSES = ("fwd", "fwd+bwd")
RESULTS = Path(__file__).parent / "results"

# compile(flex_attention, dynamic=False) compiles one graph per shape, dtype, mask and pass. Past dynamo's default
# limit of 8 graphs per function it would silently run the uncompiled flex reference (dense and slow) instead.
torch._dynamo.config.recompile_limit = 1024
torch._dynamo.config.accumulated_recompile_limit = 4096


@dataclass(frozen=True)
class Variant:
    """One way to run one mask: the backend, and the mask mod handed to ``prepare_mask`` (None = SDPA is_causal)."""

    mask: str
    label: str
    backend: attention.Backend
    mod: masks.MaskMod | None


@dataclass
class Row:
    """One line of the table: a variant at one sequence length and dtype, both passes."""

    seq: int
    dtype: str
    mask: str
    label: str
    mask_ms: float | None = None
    ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    tiles: float | None = None
    computed_tiles: int | None = None


def variants(seq: int, batch: int, doc_lens: list[int], device: torch.device) -> list[Variant]:
    """Every (mask, backend) pair measured at one sequence length."""
    out = [
        Variant("causal", "eager", "eager", masks.causal),
        Variant("causal", "sdpa, is_causal", "sdpa", None),
        Variant("causal", "sdpa, dense mask", "sdpa", masks.causal),
        Variant("causal", "flex", "flex", masks.causal),
    ]
    for doc_len in doc_lens:
        document_ids = (torch.arange(seq, device=device) // doc_len).expand(batch, seq)
        mod = masks.combine(masks.causal, masks.document(document_ids))
        name = f"causal+doc{doc_len}"
        out += [
            Variant(name, "eager", "eager", mod),
            Variant(name, "sdpa, dense mask", "sdpa", mod),
            Variant(name, "flex", "flex", mod),
        ]
    return out


def estimated_gb(
    variant: Variant, batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, pass_: str
) -> float:
    """Rough peak memory of one call: eager holds a few [batch, heads, seq, seq] score-sized tensors at once."""
    itemsize = torch.finfo(dtype).bits // 8
    qkv = 8 * batch * heads * seq * head_dim * itemsize  # q, k, v, out and their gradients
    scores = batch * heads * seq * seq
    if variant.backend == "eager":
        # forward: scores, scaled+biased scores, the float softmax; backward keeps them and adds their gradients.
        per_score = 4 + 2 * itemsize if pass_ == "fwd" else 3 * 4 + 3 * itemsize
        return (qkv + scores * per_score) / 1e9
    if variant.backend == "sdpa" and variant.mod is not None:
        return (qkv + batch * seq * seq * (1 + 4)) / 1e9  # the boolean mask and its float (additive) form
    return qkv / 1e9


def estimated_seconds(flops: float, dtype: torch.dtype, device: torch.device) -> float:
    """A lower bound on one call's time: its matmul flops at the measured matmul peak."""
    return flops / (matmul_peak_gflops(dtype, device) * 1e9)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, density: float, pass_: str) -> float:
    """Matmul flops of attention: q k^T and weights v, 2 * seq^2 * head_dim each; backward does 2.5x the forward."""
    forward = 4 * batch * heads * seq * seq * head_dim * density
    return forward if pass_ == "fwd" else 3.5 * forward


def tile_counts(mask: BlockMask) -> tuple[int, float]:
    """How many 128x128 tiles flex computes (partial and full, summed over the batch), and what fraction that is."""
    computed = int(mask.kv_num_blocks.sum())
    if mask.full_kv_num_blocks is not None:
        computed += int(mask.full_kv_num_blocks.sum())
    return computed, 1 - mask.sparsity() / 100


def flex_backward_error(device: torch.device) -> str | None:
    """Why flex-attention cannot run backward on ``device`` (None if it can), probed on tiny inputs.

    The probe calls the uncompiled function on purpose: when the compiled one raises, torch.compile leaves that
    function on a slow fallback for the rest of the process (flex then ran ~10x slower at S=512 on CPU).
    """
    q, k, v = (torch.randn(1, 1, 128, 16, device=device, requires_grad=True) for _ in range(3))
    try:
        out = flex_attention(q, k, v)
        assert isinstance(out, Tensor)
        torch.autograd.grad(out.sum(), (q, k, v))
    except NotImplementedError as e:
        return str(e).split(". ")[0]
    return None


def make_call(
    variant: Variant, mask: attention.AttentionMask, q: Tensor, k: Tensor, v: Tensor, pass_: str
) -> Callable[[], object]:
    """A closure that runs one forward (no autograd) or one forward+backward of the variant."""
    if pass_ == "fwd":

        def forward() -> Tensor:
            with torch.no_grad():
                return attention.attention(q, k, v, mask, variant.backend)

        return forward
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn_like(q)

    def forward_backward() -> tuple[Tensor, ...]:
        out = attention.attention(q, k, v, mask, variant.backend)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    return forward_backward


def measure(
    fn: Callable[[], object], warmup: int, repeats: int, budget_s: float, device: torch.device
) -> tuple[list[float], float]:
    """Timings of ``fn`` after warm-up, and the seconds its first call took (compilation, for flex).

    Slow calls get fewer repeats (at least 3) so that one configuration stays within about ``budget_s``.
    """
    first = timeit(fn, warmup=0, repeats=1, device=device)[0]
    warm = timeit(fn, warmup=0, repeats=max(1, warmup), device=device)
    n = max(3, min(repeats, int(budget_s / min(warm))))
    return timeit(fn, warmup=0, repeats=n, device=device), first


def run(args: argparse.Namespace, dtypes: list[str], device: torch.device) -> list[Row]:
    """Measure every configuration; returns one row per (sequence length, dtype, mask, backend)."""
    rows: list[Row] = []
    mask_ms: dict[tuple[int, str, str], float] = {}  # the mask does not depend on the dtype: build-time once
    references: dict[tuple[int, str, str], Tensor] = {}
    b, h, d = args.batch, args.heads, args.head_dim
    no_flex_backward = flex_backward_error(device)
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for seq in args.seqs:
            gen = torch.Generator(device=device).manual_seed(seq)
            q, k, v = (torch.randn(b, h, seq, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
            references.clear()
            # A single document (doc_len >= seq) is just the causal mask: not measured twice.
            doc_lens = [n for n in args.doc_lens if n < seq] + [
                n for n in args.extra_doc if seq == args.extra_doc[n]
            ]
            for variant in variants(seq, b, sorted(set(doc_lens), reverse=True), device):
                row = Row(seq, dtype_name, variant.mask, variant.label)
                rows.append(row)

                def build(variant: Variant = variant, seq: int = seq) -> attention.AttentionMask:
                    return attention.prepare_mask(variant.mod, b, seq, seq, variant.backend, device)

                key = (seq, variant.mask, variant.label)
                if key not in mask_ms:
                    mask_ms[key] = median_ms(
                        timeit(build, warmup=1, repeats=args.mask_repeats, device=device)
                    )
                row.mask_ms = mask_ms[key]
                mask = build()
                density = 0.5 if variant.mod is None else 1.0  # SDPA's is_causal kernels skip the upper half
                if isinstance(mask, BlockMask):
                    row.computed_tiles, row.tiles = tile_counts(mask)
                    density = row.tiles
                for pass_ in PASSES:
                    name = f"S={seq} {dtype_name} {variant.mask} {variant.label} {pass_}"
                    reason = skip_reason(args, variant, seq, dtype, pass_, density, no_flex_backward, device)
                    if reason is not None:
                        row.skipped[pass_] = reason
                        logger.info(f"{name}: {reason}")
                        continue
                    fn = make_call(variant, mask, q, k, v, pass_)
                    try:
                        times, first = measure(fn, args.warmup, args.repeats, args.max_seconds, device)
                    except NotImplementedError as e:
                        row.skipped[pass_] = f"{pass_} unsupported: {str(e).split('. ')[0]}"
                        if variant.backend == "flex":
                            logger.warning(
                                "compiled flex raised: later flex timings may be of a slow fallback"
                            )
                        logger.info(f"{name}: {row.skipped[pass_]}")
                        continue
                    row.ms[pass_] = median_ms(times)
                    compiled = ""
                    if variant.backend == "flex":
                        # ~0 where an earlier graph was reused (same shapes, same mask code: doc128 after doc256)
                        row.compile_s[pass_] = max(0.0, first - row.ms[pass_] / 1000)
                        compiled = f" (compiled in {row.compile_s[pass_]:.1f} s)"
                    logger.info(f"{name}: {row.ms[pass_]:.2f} ms, median of {len(times)}{compiled}")
                    if pass_ == "fwd":
                        check(fn, references, (seq, dtype_name, variant.mask), name)
                    del fn
                del mask
                gc.collect()
    return rows


def skip_reason(
    args: argparse.Namespace,
    variant: Variant,
    seq: int,
    dtype: torch.dtype,
    pass_: str,
    density: float,
    no_flex_backward: str | None,
    device: torch.device,
) -> str | None:
    """Why one pass of a variant is not measured: unsupported, too much memory, or too slow (None: measure it)."""
    b, h, d = args.batch, args.heads, args.head_dim
    gb = estimated_gb(variant, b, h, seq, d, dtype, pass_)
    est_s = estimated_seconds(attention_flops(b, h, seq, d, density, pass_), dtype, device)
    if variant.backend == "flex" and pass_ == "fwd+bwd" and no_flex_backward:
        return f"{pass_} unsupported: {no_flex_backward}"
    if gb > args.max_gb:
        return f"{pass_} skipped: est. {gb:.1f} GB > {args.max_gb:g} GB"
    if est_s * (args.warmup + 3) > args.max_seconds:
        return f"{pass_} skipped: est. >{est_s:.0f} s a call"
    return None


def check(
    fn: Callable[[], object],
    references: dict[tuple[int, str, str], Tensor],
    key: tuple[int, str, str],
    name: str,
) -> None:
    """Warn if a backend's output disagrees with the first backend measured on the same inputs and mask."""
    out = fn()
    assert isinstance(out, Tensor)
    if key not in references:
        references[key] = out
        return
    error = float((out.float() - references[key].float()).abs().max())
    tolerance = 1e-3 if out.dtype == torch.float32 else 5e-2
    if error > tolerance:
        logger.warning(f"{name}: max |difference| from the reference backend is {error:.2e}")


def table(rows: list[Row], heads: int) -> str:
    """The results as markdown: one line per configuration, skipped passes explained in ``note``."""
    columns = [
        "S",
        "dtype",
        "mask",
        "backend",
        "mask ms",
        "fwd ms",
        "fwd+bwd ms",
        "tiles",
        "fwd us/tile",
        "compile s",
        "note",
    ]
    lines = []
    for r in rows:
        fwd, bwd = r.ms.get("fwd"), r.ms.get("fwd+bwd")
        per_tile = ""
        if fwd is not None and r.computed_tiles:
            per_tile = f"{1000 * fwd / (r.computed_tiles * heads):.2f}"
        lines.append(
            {
                "S": r.seq,
                "dtype": r.dtype,
                "mask": r.mask,
                "backend": r.label,
                "mask ms": _ms(r.mask_ms),
                "fwd ms": _ms(fwd) if fwd is not None else "-",
                "fwd+bwd ms": _ms(bwd) if bwd is not None else "-",
                "tiles": f"{r.tiles:.3f}" if r.tiles is not None else "",
                "fwd us/tile": per_tile,
                "compile s": " / ".join(f"{r.compile_s[p]:.0f}" for p in PASSES if p in r.compile_s),
                "note": "; ".join(r.skipped[p] for p in PASSES if p in r.skipped),
            }
        )
    return markdown_table(lines, columns)


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def plot(rows: list[Row], dtypes: list[str], path: Path, title: str) -> None:
    """ms per call against sequence length, log-log: a panel per dtype and pass, a line per mask and backend."""
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(12, 4.5 * len(dtypes)), squeeze=False, sharex=True)
    labels = sorted({r.label for r in rows})
    colours = {label: f"C{i}" for i, label in enumerate(labels)}
    mask_names = sorted({r.mask for r in rows})
    styles = {mask: ["-", ":", "--", "-."][i % 4] for i, mask in enumerate(mask_names)}
    markers = {mask: "os^v"[i % 4] for i, mask in enumerate(mask_names)}
    for i, dtype in enumerate(dtypes):
        for j, pass_ in enumerate(PASSES):
            ax = axes[i][j]
            for mask in mask_names:
                for label in labels:
                    points = sorted(
                        (r.seq, r.ms[pass_])
                        for r in rows
                        if r.dtype == dtype and r.mask == mask and r.label == label and pass_ in r.ms
                    )
                    if not points:
                        continue
                    xs, ys = zip(*points, strict=True)
                    ax.plot(
                        xs,
                        ys,
                        styles[mask],
                        marker=markers[mask],
                        color=colours[label],
                        label=f"{mask} · {label}",
                    )
            ax.set_xscale("log", base=2)
            seqs = sorted({r.seq for r in rows})
            ax.set_xticks(seqs, [str(s) for s in seqs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_title(f"{dtype}, {pass_}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("ms per call")
            ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.14 if len(dtypes) == 1 else 0.09, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", type=dtype_names, default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--seqs", default="256,512,1024,2048,4096", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed calls per configuration (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--mask-repeats", type=int, default=5)
    parser.add_argument(
        "--doc-len", type=int, default=256, help="document length of the packed-document mask"
    )
    parser.add_argument("--max-gb", type=float, default=4.0, help="skip calls estimated to need more memory")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="rough time budget of one configuration"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny run to check it works: S=256,512, one dtype"
    )
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix (.md and .png)")
    parser.add_argument("--note", default="", help="free text written under the header (e.g. machine load)")
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.dtypes, args.repeats, args.warmup, args.mask_repeats = "256,512", ["fp32"], 3, 1, 2
    args.seqs = [int(s) for s in args.seqs.split(",")]
    args.doc_lens = [args.doc_len]
    # 128-token documents at one length: the case where flex skips most tiles of a short sequence.
    args.extra_doc = {} if args.quick else {128: 1024}
    if args.out is None:
        args.out = RESULTS / ("attention_quick" if args.quick else "attention")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = torch.device(args.device)
    command = "uv run python " + shlex.join(sys.argv)
    print(f"# Attention backends\n\n`{command}`\n")
    header = print_header(device)
    dtypes, notes = usable_dtypes(args.dtypes, device, "attention")
    for note in notes:
        logger.warning(note)
    rows = run(args, dtypes, device)
    elapsed = time.perf_counter() - start
    notes += [
        f"B={args.batch}, H={args.heads}, D={args.head_dim}; ms = median of up to {args.repeats} calls after "
        f"{args.warmup} warm-up calls; total run time {elapsed / 60:.1f} min.",
        "fwd runs under no_grad; fwd+bwd is the forward plus autograd.grad for q, k and v. `mask ms` is "
        "prepare_mask alone (built once per forward pass, shared by all layers), not included in the other columns.",
        "tiles: fraction of 128x128 tiles flex computes; fwd us/tile: flex forward time per computed tile per head "
        "(constant if flex costs in proportion to its tiles). compile s: flex's first call less a timed one, fwd / "
        "fwd+bwd (inductor's on-disk cache makes repeated shapes compile faster; point TORCHINDUCTOR_CACHE_DIR at "
        "an empty folder for cold compiles).",
    ]
    if args.note:
        notes.append(args.note)
    text = table(rows, args.heads)
    print("\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = f"# Attention backends\n\n`{command}`\n\n{header}\n" + "".join(f"- {n}\n" for n in notes)
    args.out.with_suffix(".md").write_text(f"{report}\n{text}\n")
    title = f"attention, B={args.batch} H={args.heads} D={args.head_dim}, {args.device}"
    plot(rows, dtypes, args.out.with_suffix(".png"), title)
    logger.info(
        f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')} in {elapsed / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
