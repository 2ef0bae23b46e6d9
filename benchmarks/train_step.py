"""Benchmark of a whole training step: zmaj's pure ``train_step`` vs two conventional module + optimizer stacks.

Three stacks train the same GPT shape (GPT-2 style: learned positions, pre-norm LayerNorm blocks, exact-GELU MLP
of width 4 d, tied embeddings, causal attention, no dropout, no biases by default) on the same random batch;
the module stacks attend with SDPA, zmaj with its specs' ``auto`` backend:

- ``zmaj``: ``zmaj.train.step.train_step`` over the parameter TensorDict: ``torch.func.vjp`` of the loss for
  the gradient (``step.grad_and_value``), zmaj's TensorDict AdamW and global-norm clipping, autocast from
  ``zmaj.train.precision``. Its rows take its fusions away one at a time (``ZMAJ_VARIANTS``): ``zmaj`` (q/k/v
  in one matmul, and the unembedding and loss in chunks of positions, ``zmaj.nn.loss.chunked_cross_entropy``,
  never holding the whole logits), ``zmaj-logits`` (the whole logits, then the loss), ``zmaj-unfused`` (also
  q, k and v one matmul each); ``zmaj-sdpa`` is ``zmaj`` with SDPA where ``attention: auto`` would run the
  formula (``zmaj.nn.attention.choose_backend``).
- ``nanoGPT``: karpathy/nanoGPT's ``model.py`` (copied below, its training parts verbatim) with train.py's
  loop: ``configure_optimizers`` (AdamW, weight decay on dim >= 2, fused on CUDA, PyTorch's default
  implementation elsewhere), ``with ctx: logits, loss = model(X, Y)``, ``loss.backward()``, clip,
  ``optimizer.step()``, ``zero_grad(set_to_none=True)``; ``bias=False`` as train.py sets it.
- ``transformers``: ``GPT2LMHeadModel`` (always with biases) + ``torch.optim.AdamW(foreach=True)``;
  ``loss.backward()``, ``clip_grad_norm_``, ``opt.step()``, ``zero_grad(set_to_none=True)``, bf16 through
  ``torch.autocast``.

All use AdamW(betas=(0.9, 0.95), eps=1e-8, weight decay 0.1 on matrices only) and clip at 1.0. ``compiled`` means
``torch.compile`` of the model (nanoGPT, as train.py) or of the model and its loss (transformers); the optimizer
stays eager; for zmaj, ``torch.compile`` of the function that returns loss and
gradients (``accumulate_grads``, i.e. ``grad_and_value`` of the loss, traced in one graph; run under
``step.deterministic``, as ``programs/pretrain.py`` runs it), followed by zmaj's compiled clipping and AdamW.
Compiling only the forward that ``train_step`` takes does not work: dynamo refuses to
trace a compiled function called inside an eager ``torch.func.grad`` (pytorch/pytorch#128711) and runs it eagerly;
the benchmark probes that on a tiny model and says what happened.

FLOPs per token are ``zmaj.train.report.gpt_flops_per_token`` (6 N + 12 L d S) for every stack, so GFLOP/s and MFU
compare like with like. MFU is against a peak measured in the same process, same dtype: the faster of square
matmuls (``common.matmul_peak_gflops``) and the step's own linear-layer products (``matmul_floor_ms``), which on a
Zen 4 EPYC ran at 106% of the square ones' rate. The stacks run
round-robin, several rounds in one process, so that background load hits all of them alike; ms/step is the median
over all timed steps after warm-up. Warm-up runs until a step is no slower than 1.5x the fastest so far (compiled
code can need several calls before it settles); ``compile s`` is the warm-up time in excess of that many median
steps. A profile of the zmaj eager step (top ops by self time, time per op category, time per phase) goes to
``results/train_step_profile.txt``. Run by hand:

    uv run python benchmarks/train_step.py --quick       # a tiny model, a few minutes: is everything wired up?
    uv run python benchmarks/train_step.py               # 6 layers, d=384, vocab 8192, S=256, B=8
    uv run python benchmarks/train_step.py --stacks zmaj,nanoGPT   # fewer rows
    uv run python benchmarks/train_step.py --device cuda --shape gpt2-124m --dtypes bf16

``--shape gpt2-124m`` is GPT-2 small (12 layers, d=768, 12 heads, vocab 50257, context 1024) at batch 16; any of
``--batch``, ``--seq``, ... given with it overrides that field. On a GPU whose datasheet this file knows
(``DATASHEET_BF16_TFLOPS``), the table adds MFU against the datasheet's dense bf16 peak, the usual denominator of
published MFU figures (PaLM, appendix B), next to the one against the peak measured here.

Writes ``benchmarks/results/train_step.md`` (header + table), ``train_step.png`` (tokens/s per stack) and
``train_step_profile.txt`` (with ``--shape``: ``train_step_<shape>.*``).
"""

import argparse
import gc
import inspect
import math
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch._dynamo
import torch._dynamo.utils
import torch.nn.functional as F
import transformers
from common import (
    DTYPES,
    dtype_names,
    markdown_table,
    matmul_peak_gflops,
    median_ms,
    print_header,
    synchronize,
    timeit,
    usable_dtypes,
)
from jaxtyping import Float, Int
from loguru import logger
from torch import Tensor, nn

from zmaj.models import gpt
from zmaj.models.common import Batch, Forward, LazyForward
from zmaj.nn import attention as attention_module
from zmaj.nn.attention import Backend, eager_attention
from zmaj.nn.layers import linear
from zmaj.train import optim, precision, step
from zmaj.train.report import gpt_flops_per_token

SHAPES: dict[str, dict[str, int]] = {
    "gpt2-124m": {"batch": 16, "seq": 1024, "layers": 12, "d_model": 768, "heads": 12, "vocab": 50257},
}
"""Named shapes for ``--shape``: the fields they set, each still overridable by its own option."""
DATASHEET_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
    ("RTX A6000", 154.8),
]
"""Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's datasheets, by a substring of the device name; the
first match wins, so the more specific names come first. Leads, not measurements."""
MODES = ("eager", "compiled")
ZMAJ_VARIANTS = {
    "zmaj": "fused q/k/v projections, chunked unembedding + loss (gpt.lazy_forward): the default",
    "zmaj-logits": "fused q/k/v, the whole logits then the loss (gpt.forward)",
    "zmaj-unfused": "q, k and v one matmul each, the whole logits: zmaj before issue 18",
    "zmaj-sdpa": "zmaj with SDPA where the specs' attention: auto runs the formula (compiled, 16-bit, CPU)",
}
"""zmaj's rows, one per fusion taken away in turn, so that each one's effect reads off the table."""
STACKS = (*ZMAJ_VARIANTS, "transformers", "nanoGPT")
RESULTS = Path(__file__).parent / "results"
LR = 1e-3
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class Shape:
    """The GPT every stack trains, and the batch it trains on."""

    batch: int
    seq: int
    layers: int
    d_model: int
    heads: int
    vocab: int
    bias: bool
    attention: Backend = "auto"  # zmaj's attention backend; the module stacks use SDPA

    def gpt_config(self) -> gpt.GPTConfig:
        return gpt.GPTConfig(
            vocab_size=self.vocab,
            context=self.seq,
            d_model=self.d_model,
            n_layers=self.layers,
            n_heads=self.heads,
            bias=self.bias,
            activation="gelu",  # nanoGPT's nn.GELU(): the exact (erf) GELU
            attention=self.attention,
        )

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


# --- nanoGPT: karpathy/nanoGPT's model.py (commit 3adf61e, Nov 2025), its training-relevant parts verbatim --------
# Only what a training step never runs is left out (generation, from_pretrained, crop_block_size, the non-flash
# attention fallback, estimate_mfu); names, modules, dropout layers, init and the loss are as there.


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False"""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "NanoGPTConfig") -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()  # noqa: N806 (nanoGPT's names)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        out: Tensor = self.resid_dropout(self.c_proj(y))
        return out


class MLP(nn.Module):
    def __init__(self, config: "NanoGPTConfig") -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        out: Tensor = self.dropout(x)
        return out


class Block(nn.Module):
    def __init__(self, config: "NanoGPTConfig") -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class NanoGPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False  # train.py's default (model.py's dataclass says True, train.py overrides it)


class NanoGPT(nn.Module):
    def __init__(self, config: NanoGPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # type: ignore[union-attr]
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        device = idx.device
        b, t = idx.size()  # noqa: RUF059 (verbatim)
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        tok_emb = self.transformer.wte(idx)  # type: ignore[operator]
        pos_emb = self.transformer.wpe(pos)  # type: ignore[operator]
        x = self.transformer.drop(tok_emb + pos_emb)  # type: ignore[operator]
        for block in self.transformer.h:  # type: ignore[union-attr]
            x = block(x)
        x = self.transformer.ln_f(x)  # type: ignore[operator]
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        param_dict = {pn: p for pn, p in self.named_parameters()}
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)


def nanogpt_step(shape: "Shape", compiled: bool, dtype: torch.dtype, batch: Batch) -> Callable[[], Tensor]:
    """train.py's loop, one micro-step per step: ``with ctx: logits, loss = model(X, Y)``, ``backward()``,
    clip, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, the model ``torch.compile``d when compiling.

    ``ctx`` is autocast to ``dtype``, as train.py sets it on a GPU; on a CPU train.py itself never autocasts
    (its ``ctx`` is a ``nullcontext`` there), which would make its bf16 row an fp32 one. Its GradScaler is only
    enabled for float16, so for fp32 and bf16 its ``scale``/``unscale_``/``step``/``update`` are the plain calls.
    """
    device = batch.tokens.device
    config = NanoGPTConfig(shape.seq, shape.vocab, shape.layers, shape.heads, shape.d_model, bias=shape.bias)
    model = NanoGPT(config).to(device)
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, device.type)
    forward: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = torch.compile(model) if compiled else model
    tokens, targets = batch.tokens, batch.targets
    assert targets is not None

    def run() -> Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = forward(tokens, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return run


# --- the module stacks' step ----------------------------------------------------------------------------------------


class GPT2Logits(nn.Module):
    """``transformers.GPT2LMHeadModel`` of the benchmark's shape, called as ``tokens -> logits``."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=shape.vocab,
            n_positions=shape.seq,
            n_embd=shape.d_model,
            n_layer=shape.layers,
            n_head=shape.heads,
            n_inner=4 * shape.d_model,
            activation_function="gelu",  # the exact (erf) GELU, as nanoGPT's nn.GELU() and zmaj's rows
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(config)
        self.model.set_attn_implementation("sdpa")

    def forward(self, tokens: Int[Tensor, "batch seq"]) -> Float[Tensor, "batch seq vocab"]:
        logits: Tensor = self.model(input_ids=tokens, use_cache=False).logits
        return logits


class LanguageModelLoss(nn.Module):
    """Mean next-token cross-entropy of a ``tokens -> logits`` module: logits under autocast, the loss in fp32.

    The loss sits inside the module so that ``torch.compile`` of it captures the same work as zmaj's compiled
    loss-and-gradients function.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.device_type = device.type

    def forward(self, tokens: Int[Tensor, "batch seq"], targets: Int[Tensor, "batch seq"]) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """torch's AdamW with zmaj's settings: weight decay on matrices, not on norm scales and biases."""
    params = list(model.parameters())  # tied weights appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-8, foreach=True, fused=False)


def module_step(model: nn.Module, compiled: bool, dtype: torch.dtype, batch: Batch) -> Callable[[], Tensor]:
    """The conventional step: forward + loss, ``backward()``, clip, ``opt.step()``, ``zero_grad``."""
    assert batch.targets is not None
    loss_module = LanguageModelLoss(model, dtype, batch.tokens.device)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = torch.compile(loss_module) if compiled else loss_module
    opt = adamw(model)
    tokens, targets = batch.tokens, batch.targets

    def run() -> Tensor:
        loss = loss_fn(tokens, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return run


# --- zmaj's step ----------------------------------------------------------------------------------------------------


def zmaj_step(
    shape: Shape, compiled: bool, dtype: torch.dtype, batch: Batch, variant: str = "zmaj"
) -> Callable[[], Tensor]:
    """zmaj's ``train_step`` as ``programs/pretrain.py`` runs it: eager, or its loss-and-gradients and its
    clip + AdamW (donating the old state) each compiled; ``variant`` is one of ``ZMAJ_VARIANTS``."""
    device = batch.tokens.device
    config = shape.gpt_config()
    if variant == "zmaj-sdpa":
        config = config.model_copy(update={"attention": "sdpa"})
    state = step.init_state(gpt.init(config, 0, device))
    forward: Forward | LazyForward = (
        step.bind_lazy(gpt.lazy_forward, config=config)
        if variant in ("zmaj", "zmaj-sdpa")
        else step.bind(gpt.forward, config=config)
    )
    adamw_config = optim.AdamWConfig(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    decay = optim.decay_mask(state["params"])
    autocast = precision.autocast(dtype, device)
    projections = SeparateProjections() if variant == "zmaj-unfused" else nullcontext()

    grad_fn, update_fn = step.step_functions(compiled)  # as programs/pretrain.py

    def run() -> Tensor:
        nonlocal state
        with projections:
            state, metrics = step.train_step(
                state,
                [batch],
                forward=forward,
                optimizer=adamw_config,
                lr=LR,
                decay=decay,
                seed=0,
                autocast=autocast,
                grad_fn=grad_fn,
                update_fn=update_fn,
            )
        return metrics["loss"]

    return run


class SeparateProjections(AbstractContextManager[None]):
    """Within it, zmaj's attention projects q, k and v with one matmul each (``linear`` per projection) instead
    of ``fused_linear``'s one: the ablation of that fusion, by swapping the function ``zmaj.nn.attention`` calls
    for the length of one step. (Compiled, dynamo guards on that function and keeps one graph for each.)"""

    def __enter__(self) -> None:
        self.fused = attention_module.fused_linear  # type: ignore[attr-defined]
        attention_module.fused_linear = lambda params, x: [linear(p, x) for p in params]  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        attention_module.fused_linear = self.fused  # type: ignore[attr-defined]


def probe_compiled_forward(device: torch.device) -> str:
    """What happens when ``train_step`` gets ``forward=torch.compile(bind(...))``, the obvious way to compile zmaj.

    Run on a tiny model: dynamo either captures graphs or refuses each frame and runs it eagerly (it does not raise).
    """
    shape = Shape(batch=2, seq=32, layers=1, d_model=32, heads=2, vocab=64, bias=True)
    config = shape.gpt_config()
    state = step.init_state(gpt.init(config, 0, device))
    batch = random_batch(shape, device)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        step.train_step(
            state,
            [batch],
            forward=torch.compile(step.bind(gpt.forward, config=config)),
            optimizer=optim.AdamWConfig(),
            lr=LR,
            decay=optim.decay_mask(state["params"]),
            seed=0,
        )
    except Exception as e:  # report any failure instead of stopping the benchmark
        outcome = f"raised {type(e).__name__}: {first_line(str(e))}"
    else:
        refusals = [k for k in counters["unimplemented"] if "functorch" in k]
        graphs = counters["stats"]["unique_graphs"]
        if refusals:
            # The message's first line names the refusal; its "- Calling ..." line says why.
            why = [ln.strip()[2:] for ln in refusals[0].splitlines() if ln.strip().startswith("- Calling")]
            outcome = (
                f"runs eagerly: dynamo refuses the frames without raising ({graphs} graphs captured): "
                f"{first_line(refusals[0])}" + (f" ({why[0]})" if why else "")
            )
        else:
            outcome = f"compiled: {graphs} graphs captured, no functorch refusal"
    torch._dynamo.reset()
    return outcome


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


# --- timing ---------------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """One stack at one dtype and mode: its step, and what the rounds measured."""

    stack: str
    dtype: str
    mode: str
    run: Callable[[], Tensor]
    times: list[float] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.stack} {self.dtype} {self.mode}"

    @property
    def compile_s(self) -> float:
        """Warm-up time beyond as many median steps: compilation, mostly (~0 for eager)."""
        return max(0.0, sum(self.warmup_times) - len(self.warmup_times) * statistics.median(self.times))


def random_batch(shape: Shape, device: torch.device, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, shape.vocab, (shape.batch, shape.seq + 1), generator=generator).to(device)
    return Batch(tokens=rows[:, :-1].contiguous(), targets=rows[:, 1:].contiguous())


def timed(runner: Runner, device: torch.device) -> float:
    """Seconds one step of ``runner`` takes, its loss kept for the sanity check."""
    synchronize(device)
    start = time.perf_counter()
    loss = runner.run()
    synchronize(device)
    seconds = time.perf_counter() - start
    runner.losses.append(float(loss))
    return seconds


def warm_up(runner: Runner, min_steps: int, max_steps: int, device: torch.device) -> None:
    """At least ``min_steps`` steps, then more until a step is within 1.5x of the fastest one (or ``max_steps``)."""
    while len(runner.warmup_times) < max_steps:
        runner.warmup_times.append(timed(runner, device))
        n = len(runner.warmup_times)
        if n >= min_steps and runner.warmup_times[-1] <= 1.5 * min(runner.warmup_times):
            break
    logger.info(
        f"{runner.name}: warm-up {', '.join(f'{t:.2f}' for t in runner.warmup_times)} s"
        f" ({len(runner.warmup_times)} steps)"
    )


def build_runners(
    args: argparse.Namespace, shape: Shape, dtypes: list[str], batch: Batch, device: torch.device
) -> list[Runner]:
    runners = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for mode in args.modes:
            compiled = mode == "compiled"
            for stack in args.stacks:
                torch.manual_seed(0)
                if stack.startswith("zmaj"):
                    run = zmaj_step(shape, compiled, dtype, batch, stack)
                elif stack == "nanoGPT":
                    run = nanogpt_step(shape, compiled, dtype, batch)
                else:
                    run = module_step(GPT2Logits(shape).to(device), compiled, dtype, batch)
                runners.append(Runner(stack, dtype_name, mode, run))
    return runners


def measure(args: argparse.Namespace, runners: list[Runner], device: torch.device) -> None:
    """Warm every runner up, then ``rounds`` round-robin rounds of ``steps`` timed steps each."""
    for runner in runners:
        min_steps = args.warmup + (1 if runner.mode == "compiled" else 0)
        warm_up(runner, min_steps, args.max_warmup, device)
    for r in range(args.rounds):
        # Rotate the starting runner so that no stack always runs right after the same neighbour.
        order = runners[r % len(runners) :] + runners[: r % len(runners)]
        for runner in order:
            runner.times += [timed(runner, device) for _ in range(args.steps)]
        summary = ", ".join(f"{x.name} {median_ms(x.times):.0f}" for x in runners)
        logger.info(f"round {r + 1}/{args.rounds}: median ms so far: {summary}")


# --- profile of the zmaj eager step ---------------------------------------------------------------------------------

CATEGORIES: list[tuple[str, str]] = [
    ("matmul", r"^(mm|addmm|bmm|baddbmm|addmv|mv|matmul|linear)$"),
    ("attention (SDPA fwd+bwd)", r"scaled_dot_product|flash_attention|efficient_attention"),
    ("log-softmax + NLL (loss)", r"log_softmax|nll_loss|cross_entropy"),
    ("layer norm", r"layer_norm"),
    ("GELU", r"gelu"),
    ("embedding gather/scatter", r"embedding|^index|scatter|gather"),
    (
        "views (t, select, unbind, ...)",
        r"^(t|transpose|permute|view|_unsafe_view|reshape|select|slice|unbind|split|chunk|expand|unsqueeze|"
        r"squeeze|as_strided|alias|detach|flatten|unflatten|narrow|lift_fresh)$",
    ),
    (
        "copies, stack, cat (incl. select/unbind backward)",
        r"copy_|clone|^stack$|^cat$|contiguous|_to_copy|^to$|^(select|slice|unbind)_backward$",
    ),
    ("allocation, fill", r"fill_|zero_|zeros|empty|ones|full|new_"),
    (
        "elementwise math (AdamW, clip, residuals, grad sums)",
        r"^_?(foreach_)?(add|sub|rsub|mul|div|lerp|sqrt|rsqrt|pow|clamp|norm|linalg_vector_norm|sum|mean|neg|"
        r"reciprocal|where|tanh|addcmul|addcdiv|maximum|exp)",
    ),
]
"""Op categories of the profile summary: the first whose regex matches the op's name (without ``aten::``) wins."""


def category(op: str) -> str:
    name = op.removeprefix("aten::")
    return next((label for label, pattern in CATEGORIES if re.search(pattern, name)), "other ops")


def profile_zmaj(shape: Shape, batch: Batch, device: torch.device, steps: int) -> str:
    """Top ops, time per op category and time per phase of zmaj's eager fp32 step, as text."""
    run = zmaj_step(shape, False, torch.float32, batch)
    for _ in range(2):
        run()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            run()
        synchronize(device)
    wall_us = (time.perf_counter() - start) * 1e6
    averages = prof.key_averages()
    on_device = device.type == "cuda"
    sort_by = "self_device_time_total" if on_device else "self_cpu_time_total"

    def self_us(evt: object) -> float:
        return float(getattr(evt, sort_by))

    top = averages.table(sort_by=sort_by, row_limit=12, max_name_column_width=60)
    by_category: dict[str, float] = {}
    for evt in averages:
        if evt.key.startswith("aten::"):
            by_category[category(evt.key)] = by_category.get(category(evt.key), 0.0) + self_us(evt)
    ops_us = sum(by_category.values())
    lines = [
        f"# zmaj eager fp32 train_step profile: {shape}",
        "",
        f"{steps} steps profiled, wall {wall_us / 1e3 / steps:.0f} ms/step under the profiler "
        f"(profiling adds overhead per op).",
        "",
        f"## Top 12 ops by {sort_by}",
        "",
        top,
        "",
        f"## Self {'device' if on_device else 'CPU'} time of aten ops by category",
        "",
        "| category | ms/step | % of op time | % of wall |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, us in sorted(by_category.items(), key=lambda kv: -kv[1]):
        lines.append(
            f"| {name} | {us / 1e3 / steps:.1f} | {100 * us / ops_us:.1f} | {100 * us / wall_us:.1f} |"
        )
    if not on_device:
        outside = wall_us - ops_us
        lines.append(
            f"| outside aten ops (Python, TensorDict, autograd engine, profiler) | {outside / 1e3 / steps:.1f} "
            f"| - | {100 * outside / wall_us:.1f} |"
        )
    lines += [
        "",
        "## Phases of the step, each timed on its own (fastest of 5, no profiler)",
        "",
        phases(shape, batch),
    ]
    return "\n".join(lines) + "\n"


def matmul_floor_ms(shape: Shape, dtype: torch.dtype, device: torch.device) -> float:
    """Milliseconds of one step's linear-layer matmuls alone, on PyTorch's kernels: for each weight matrix (q/k/v
    fused, attention output, MLP up and down per layer, the tied unembedding) the forward product and the two
    backward ones (input and weight gradients), fastest of 5, nothing else: no attention, norms, loss or
    optimizer. A stack whose matmuls go through these kernels cannot take less, so it bounds the speed-up over
    any other such stack: (its ms/step) / floor."""
    tokens = shape.tokens_per_step
    generator = torch.Generator().manual_seed(0)
    operands = [
        (
            torch.randn(tokens, d_in, generator=generator).to(device, dtype),
            torch.randn(d_out, d_in, generator=generator).to(device, dtype),
            torch.randn(tokens, d_out, generator=generator).to(device, dtype),
        )
        for d_in, d_out in linear_shapes(shape)
    ]

    def products() -> None:
        for x, weight, grad_out in operands:
            F.linear(x, weight)
            grad_out @ weight  # input gradient
            grad_out.t() @ x  # weight gradient

    return 1000 * min(timeit(products, warmup=2, repeats=5, device=device))


def linear_shapes(shape: Shape) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every weight matrix a step multiplies by, q/k/v fused, the tied unembedding once."""
    d = shape.d_model
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * shape.layers + [(d, shape.vocab)]


def matmul_floor_gflop(shape: Shape) -> float:
    """GFLOP of ``matmul_floor_ms``'s products: three per matrix (forward, input and weight gradients)."""
    return 3 * 2 * shape.tokens_per_step * sum(d_in * d_out for d_in, d_out in linear_shapes(shape)) / 1e9


def attention_floor_ms(shape: Shape, dtype: torch.dtype, device: torch.device) -> tuple[float, str]:
    """Milliseconds of one step's attention alone (every layer's forward and backward, fastest of 5), on the
    faster of PyTorch's causal SDPA kernel and the compiled formula (``zmaj.nn.attention.eager_attention``):
    with ``matmul_floor_ms`` and ``optimizer_floor_ms``, what any stack on these kernels must spend."""
    head_dim = shape.d_model // shape.heads
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (
        torch.randn(shape.batch, shape.heads, shape.seq, head_dim, generator=generator).to(device, dtype)
        for _ in range(4)
    )
    # One row for the whole batch, as the model builds it
    causal = torch.ones(shape.seq, shape.seq, dtype=torch.bool, device=device).tril()[None]
    scale = head_dim**-0.5
    kernels: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
        "SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
        "compiled formula": torch.compile(lambda q, k, v: eager_attention(q, k, v, causal, scale)),
    }
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    times = {}
    for name, kernel in kernels.items():

        def forward_backward(kernel: Callable[[Tensor, Tensor, Tensor], Tensor] = kernel) -> None:
            for _ in range(shape.layers):
                torch.autograd.grad(kernel(*leaves), leaves, grad_out)

        times[name] = 1000 * min(timeit(forward_backward, warmup=3, repeats=5, device=device))
    fastest = min(times, key=times.__getitem__)
    return times[fastest], ", ".join(f"{name} {ms:.0f} ms" for name, ms in times.items())


def optimizer_floor_ms(shape: Shape, device: torch.device) -> tuple[float, str]:
    """Milliseconds of one clip + AdamW update (float32 state) of the shape's parameters, fastest of 5, on the
    faster of PyTorch's fused kernel (``torch.optim.AdamW(fused=True)`` after a foreach clip) and zmaj's
    compiled, donating ``apply_grads``. It reads parameters, gradients and both moments and writes three of
    them back: memory bandwidth, not arithmetic, sets it."""
    state = step.init_state(gpt.init(shape.gpt_config(), 0, device))
    grads = state["params"].apply(torch.randn_like)
    adamw_config = optim.AdamWConfig(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    decay = optim.decay_mask(state["params"])
    _, update = step.step_functions(compile=True)  # the compiled, donating update that training runs
    leaves = [p.detach().clone().requires_grad_() for p in state["params"].values(True, True)]
    for leaf, grad in zip(leaves, grads.values(True, True), strict=True):
        leaf.grad = grad.clone()
    fused = torch.optim.AdamW(leaves, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)

    def torch_update() -> None:
        nn.utils.clip_grad_norm_(leaves, GRAD_CLIP, foreach=True)
        fused.step()

    times = {
        "fused AdamW": 1000 * min(timeit(torch_update, warmup=3, repeats=5, device=device)),
        "zmaj compiled": 1000
        * min(
            timeit(lambda: update(state, grads, adamw_config, LR, decay), warmup=3, repeats=5, device=device)
        ),
    }
    fastest = min(times, key=times.__getitem__)
    return times[fastest], ", ".join(f"{name} {ms:.0f} ms" for name, ms in times.items())


def phases(shape: Shape, batch: Batch) -> str:
    """Forward alone, forward + backward (``accumulate_grads``), clipping and AdamW, as train_step calls them.

    The forward alone is the step's own (the lazy forward and the chunked loss, ``step.summed_loss``) under
    ``no_grad``, so that subtracting it from forward + backward leaves the backward; the plain forward would
    materialise the whole logits, which the step never does."""
    device = batch.tokens.device
    config = shape.gpt_config()
    params = gpt.init(config, 0, device)
    opt_state = optim.adamw_init(params)
    adamw_config = optim.AdamWConfig(lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    decay = optim.decay_mask(params)
    lazy = step.bind_lazy(gpt.lazy_forward, config=config)  # the default zmaj row's forward
    grads, _, _ = step.accumulate_grads(params, [batch], lazy, [None])

    normalizer = step.count_targets([batch]).clamp(min=1)  # as accumulate_grads divides

    def forward_loss() -> None:
        with torch.no_grad():
            step.summed_loss(params, batch, lazy, normalizer, None, nullcontext())

    parts: dict[str, Callable[[], object]] = {
        "forward + chunked loss (no_grad)": forward_loss,
        "forward + backward (accumulate_grads)": lambda: step.accumulate_grads(params, [batch], lazy, [None]),
        "clip_by_global_norm": lambda: optim.clip_by_global_norm(grads, GRAD_CLIP, optim.global_norm(grads)),
        "adamw_update": lambda: optim.adamw_update(params, grads, opt_state, adamw_config, LR, decay),
    }
    # The fastest of 5: other work on the machine only adds time, and the phases are not timed round-robin.
    ms = {name: 1000 * min(timeit(fn, warmup=1, repeats=5, device=device)) for name, fn in parts.items()}
    step_ms = ms["forward + backward (accumulate_grads)"] + ms["clip_by_global_norm"] + ms["adamw_update"]
    lines = ["| phase | ms | % of grads + clip + AdamW |", "| --- | ---: | ---: |"]
    for name, value in ms.items():
        lines.append(f"| {name} | {value:.1f} | {100 * value / step_ms:.1f} |")
    backward = ms["forward + backward (accumulate_grads)"] - ms["forward + chunked loss (no_grad)"]
    lines.append(
        f"| backward (difference of the two above) | {backward:.1f} | {100 * backward / step_ms:.1f} |"
    )
    return "\n".join(lines)


# --- report ---------------------------------------------------------------------------------------------------------


def datasheet_bf16_tflops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak by its datasheet (``DATASHEET_BF16_TFLOPS``), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in DATASHEET_BF16_TFLOPS if key in name), None)


def table(runners: list[Runner], shape: Shape, device: torch.device, peaks: dict[str, float]) -> str:
    """One line per stack, dtype and mode; speed ratios against the other stacks at the same dtype and mode;
    MFU against ``peaks`` (GFLOP/s by dtype name)."""
    flops_per_step = gpt_flops_per_token(shape.gpt_config(), shape.seq) * shape.tokens_per_step
    datasheet = datasheet_bf16_tflops(device)
    tokens_per_s = {
        (r.stack, r.dtype, r.mode): shape.tokens_per_step / statistics.median(r.times) for r in runners
    }
    rows = []
    for r in runners:
        seconds = statistics.median(r.times)
        gflops = flops_per_step / seconds / 1e9
        peak = peaks[r.dtype]
        q1, _, q3 = statistics.quantiles(r.times, n=4) if len(r.times) > 1 else (seconds, seconds, seconds)

        def ratio(other: str, r: Runner = r) -> str:
            base = tokens_per_s.get((other, r.dtype, r.mode))
            return (
                ""
                if base is None or other == r.stack
                else f"{tokens_per_s[(r.stack, r.dtype, r.mode)] / base:.2f}"
            )

        rows.append(
            {
                "stack": r.stack,
                "dtype": r.dtype,
                "mode": r.mode,
                "ms/step": _ms(seconds),
                "IQR ms": _ms(q3 - q1),
                "best ms": _ms(min(r.times)),
                "tokens/s": f"{tokens_per_s[(r.stack, r.dtype, r.mode)]:.0f}",
                "GFLOP/s": f"{gflops:.1f}",
                "MFU %": f"{100 * gflops / peak:.1f}",
                **(
                    {
                        "MFU % datasheet": f"{100 * gflops / (datasheet * 1e3):.1f}"
                        if r.dtype == "bf16"
                        else ""
                    }
                    if datasheet is not None
                    else {}
                ),
                "x transformers": ratio("transformers"),
                "x nanoGPT": ratio("nanoGPT"),
                "compile s": f"{r.compile_s:.0f}" if r.mode == "compiled" else "",
                "loss first -> last": f"{r.losses[0]:.3f} -> {r.losses[-1]:.3f}",
                "steps run": len(r.losses),
            }
        )
    columns = list(rows[0]) if rows else []
    return markdown_table(rows, columns)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}" if seconds >= 0.1 else f"{1000 * seconds:.1f}"


def plot(runners: list[Runner], shape: Shape, peaks: dict[str, float], path: Path, title: str) -> None:
    """Grouped bars: tokens/s per stack for each dtype and mode, MFU written on each bar."""
    groups = list(dict.fromkeys((r.dtype, r.mode) for r in runners))
    stacks = list(dict.fromkeys(r.stack for r in runners))
    flops_per_token = gpt_flops_per_token(shape.gpt_config(), shape.seq)
    width = 0.8 / len(stacks)
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 3, 4.5))
    for i, stack in enumerate(stacks):
        for j, (dtype, mode) in enumerate(groups):
            match = [r for r in runners if (r.stack, r.dtype, r.mode) == (stack, dtype, mode)]
            if not match:
                continue
            tps = shape.tokens_per_step / statistics.median(match[0].times)
            mfu = 100 * tps * flops_per_token / 1e9 / peaks[dtype]
            x = j + (i - (len(stacks) - 1) / 2) * width
            ax.bar(x, tps, width, color=f"C{i}", label=stack if j == 0 else None)
            ax.annotate(f"{mfu:.0f}%", (x, tps), ha="center", va="bottom", fontsize="small")
    ax.set_xticks(range(len(groups)), [f"{d}, {m}" for d, m in groups])
    ax.set_ylabel("tokens/s (label: MFU vs same-dtype peak)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="a named shape (gpt2-124m: GPT-2 small at batch 16); --batch, --seq, ... override its fields",
    )
    parser.add_argument("--dtypes", type=dtype_names, default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--modes", default="eager,compiled", help="comma-separated: eager,compiled")
    parser.add_argument("--stacks", default=",".join(STACKS), help="comma-separated: " + ",".join(STACKS))
    parser.add_argument("--rounds", type=int, default=8, help="round-robin rounds over all stacks")
    parser.add_argument(
        "--steps", type=int, default=1, help="timed steps per stack per round (1 spreads load bursts evenly)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="least warm-up steps (compiled: one more)")
    parser.add_argument("--max-warmup", type=int, default=10, help="most warm-up steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--bias",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="biases in linears and norms (GPT-2; nanoGPT's train.py turns them off)",
    )
    parser.add_argument(
        "--zmaj-attention",
        choices=["auto", "sdpa", "eager"],
        default="auto",
        help="zmaj's attention: as the specs choose it (zmaj.nn.attention.choose_backend), SDPA's fused "
        "kernels, or the formula (softmax(QK^T) V), which Inductor fuses",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=2, help="zmaj eager fp32 steps profiled (0: none)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: is everything wired up?")
    parser.add_argument("--out", type=Path, default=None, help="results path without suffix (.md and .png)")
    parser.add_argument("--note", default="", help="free text written under the header (e.g. machine load)")
    known, _ = parser.parse_known_args(argv)
    if known.shape is not None:
        parser.set_defaults(**SHAPES[known.shape])
    args = parser.parse_args(argv)
    if args.quick and args.shape is not None:
        parser.error("--quick sets its own tiny shape; leave out --shape")
    if args.quick:
        args.batch, args.seq, args.layers, args.d_model, args.heads, args.vocab = 4, 64, 2, 64, 2, 512
        args.rounds, args.steps, args.warmup, args.max_warmup = 3, 1, 1, 6
    args.modes = [m.strip() for m in args.modes.split(",")]
    args.stacks = [s.strip() for s in args.stacks.split(",")]
    for value, allowed in ((args.modes, MODES), (args.stacks, STACKS)):
        unknown = set(value) - set(allowed)
        if unknown:
            parser.error(f"unknown {sorted(unknown)}; choose from {allowed}")
    if args.out is None:
        name = "train_step_quick" if args.quick else "train_step"
        args.out = RESULTS / (f"{name}_{args.shape}" if args.shape else name)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = torch.device(args.device)
    shape = Shape(
        args.batch,
        args.seq,
        args.layers,
        args.d_model,
        args.heads,
        args.vocab,
        args.bias,
        args.zmaj_attention,
    )
    command = "uv run python " + shlex.join(sys.argv)
    print(f"# Training step: zmaj vs transformers vs nanoGPT\n\n`{command}`\n")
    header = print_header(device)
    dtypes, notes = usable_dtypes(args.dtypes, device, "the training step")
    for note in notes:
        logger.warning(note)
    config = shape.gpt_config()
    n_params = sum(t.numel() for t in gpt.init(config, 0, "meta").values(True, True))
    flops = gpt_flops_per_token(config, shape.seq)
    logger.info(f"{shape}: {n_params / 1e6:.2f} M parameters, {flops / 1e6:.1f} MFLOP per token")
    if "compiled" in args.modes and "zmaj" in args.stacks:
        probe = probe_compiled_forward(device)
        logger.info(f"train_step(forward=torch.compile(forward)): {probe}")
        notes.append(f"zmaj `train_step(forward=torch.compile(bind(gpt.forward, ...)))` {probe}.")
    batch = random_batch(shape, device)
    runners = build_runners(args, shape, dtypes, batch, device)
    measure(args, runners, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    profile_path = args.out.parent / f"{args.out.name}_profile.txt"
    if args.profile_steps > 0:
        logger.info(f"profiling {args.profile_steps} zmaj eager fp32 steps")
        gc.collect()
        profile_path.write_text(profile_zmaj(shape, batch, device, args.profile_steps))
        notes.append(f"Profile of the zmaj eager fp32 step: `{profile_path.name}`.")
    optimizer_ms, optimizer_kernels = optimizer_floor_ms(shape, device)
    peaks: dict[str, float] = {}
    for name in dtypes:
        floor = matmul_floor_ms(shape, DTYPES[name], device)
        square, own = matmul_peak_gflops(DTYPES[name], device), matmul_floor_gflop(shape) / (floor / 1000)
        peaks[name] = max(square, own)
        notes.append(
            f"peak, {name}: {peaks[name]:.0f} GFLOP/s, the faster of the square matmuls' ({square:.0f}, header) "
            f"and the step's own products' in the matmul floor ({own:.0f}): a peak the step's matmuls outrun "
            "is no ceiling."
        )
        attention_ms, attention_kernels = attention_floor_ms(shape, DTYPES[name], device)
        best = min(
            (
                statistics.median(r.times) * 1000
                for r in runners
                if r.dtype == name and r.stack not in ZMAJ_VARIANTS
            ),
            default=float("nan"),
        )
        notes.append(
            f"matmul floor, {name}: {floor:.0f} ms per step (`matmul_floor_ms`: the linear layers' forward and "
            f"backward products alone, on PyTorch's kernels); the fastest module stack's median is {best:.0f} ms, "
            f"so no stack on these kernels can be more than {best / floor:.2f}x faster than it, and only by "
            f"spending {best - floor:.0f} ms less than it on everything else."
        )
        kernels = floor + attention_ms + optimizer_ms
        notes.append(
            f"kernel floor, {name}: {kernels:.0f} ms per step = matmul floor {floor:.0f} + attention "
            f"{attention_ms:.0f} (`attention_floor_ms`, {shape.layers} layers' forward and backward, the faster of "
            f"{attention_kernels}) + clip and AdamW {optimizer_ms:.0f} (`optimizer_floor_ms`, the faster of "
            f"{optimizer_kernels}); norms, "
            f"activations, residuals, embedding and loss come on top. On these kernels no stack can be more than "
            f"{best / kernels:.2f}x faster than the fastest module stack."
        )
    elapsed = time.perf_counter() - start
    notes += [
        f"Shape: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}, "
        f"S={args.seq}, B={args.batch}, bias={args.bias}, tied embeddings, no dropout: {n_params / 1e6:.2f} M "
        f"parameters; {flops / 1e6:.1f} MFLOP per token (6 N + 12 L d S, all stacks); "
        f"{shape.tokens_per_step} tokens per step.",
        f"ms/step: median of {args.rounds} round-robin rounds x {args.steps} steps per stack, after warm-up; "
        "IQR: interquartile range of those steps; best: the fastest (other work on the machine only adds time). MFU: GFLOP/s over the peak of the same dtype "
        "(above). x transformers / x nanoGPT: this row's tokens/s over theirs at the same dtype and mode.",
        "compiled: torch.compile of model + loss (module stacks; AdamW(foreach) stays eager) or of zmaj's "
        "loss-and-gradients function (accumulate_grads) and of its clip + AdamW (apply_grads, donating the old state). compile s: warm-up time "
        "beyond as many median steps (inductor's on-disk cache makes repeated runs compile faster).",
        f"total run time {elapsed / 60:.1f} min; load average at the end (1, 5, 15 min): {load_average()}.",
    ]
    if not args.bias and "transformers" in args.stacks:
        notes.append("GPT2LMHeadModel always has biases: its rows keep them although --no-bias was given.")
    if args.note:
        notes.append(args.note)
    text = table(runners, shape, device, peaks)
    print("\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + text)
    report = f"# Training step: zmaj vs transformers vs nanoGPT\n\n`{command}`\n\n{header}\n"
    report += "".join(f"- {n}\n" for n in notes)
    args.out.with_suffix(".md").write_text(f"{report}\n{text}\n")
    title = (
        f"training step, {args.layers}L d={args.d_model} V={args.vocab} S={args.seq} B={args.batch}, "
        f"{args.device}"
    )
    plot(runners, shape, peaks, args.out.with_suffix(".png"), title)
    logger.info(
        f"wrote {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')} and {profile_path.name}"
    )


if __name__ == "__main__":
    main()
