"""Stateless training and evaluation steps: ``train_step(state, batches) -> (state, metrics)``.

The whole training state is one TensorDict (parameters, optimizer moments, step counter), so a step is a pure
function of it and the batch: no hidden optimizer object, no module state. Gradients come from ``torch.func``
over the parameter TensorDict (:func:`grad_and_value`: the loss's vector-Jacobian product). Gradient
accumulation divides every micro-batch's summed loss by the number of target tokens in *all* of them, so k
micro-batches give exactly the gradient of one k-times larger batch.
"""

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial, wraps
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.data.dataset import LMDataset, stream_batch
from zmaj.models.common import Batch, Forward, LazyForward, LazyLogits
from zmaj.nn.layers import at_least_float32
from zmaj.nn.loss import chunked_cross_entropy
from zmaj.progress import progress
from zmaj.train.muon import MuonConfig, OptimizerConfig, muon_init, muon_update
from zmaj.train.optim import adamw_init, adamw_update, clip_by_global_norm, global_norm
from zmaj.train.parallel import SINGLE, Parallel, tensors

Metrics = dict[str, Tensor]
LOSS_CHUNK = 256
"""Positions the chunked training loss unembeds at once (``zmaj.nn.loss.chunked_cross_entropy``): a chunk's
float32 logits then take 1 KiB per vocabulary entry, 8 MiB at 8k, 50 MiB at GPT-2's 50k. At 8k they stay in a
CPU's last-level cache between the loss's elementwise passes: session 11's default spec's loss (4096 positions,
soft-capped, bf16, forward and backward) took 124-141 ms with chunks of 256 and 188-241 ms with 1024 on 2 Zen 4
cores. Not measured on a GPU; under ``torch.compile`` the loop unrolls, one copy per chunk."""


def init_state(params: TensorDictBase, optimizer: OptimizerConfig | None = None) -> TensorDict:
    """A fresh training state: the parameters and ``optimizer``'s zeroed state (AdamW's moments by default)."""
    opt = muon_init(params, optimizer) if isinstance(optimizer, MuonConfig) else adamw_init(params)
    return TensorDict({"params": params, "opt": opt})


def token_losses(logits: Float[Tensor, "batch seq vocab"], batch: Batch) -> Float[Tensor, "batch seq"]:
    """Next-token cross-entropy at every position, zero where ``loss_mask`` is off; computed in float32 at
    least."""
    assert batch.targets is not None, "training batches carry targets"
    losses = F.cross_entropy(
        at_least_float32(logits).flatten(0, 1), batch.targets.flatten(), reduction="none"
    )
    losses = losses.view_as(batch.targets)
    return losses if batch.loss_mask is None else losses * batch.loss_mask


def n_targets(batch: Batch) -> Tensor:
    assert batch.targets is not None
    if batch.loss_mask is None:
        return torch.tensor(batch.targets.numel(), device=batch.targets.device)
    return batch.loss_mask.sum()


def summed_loss(
    params: TensorDictBase,
    batch: Batch,
    forward: Forward | LazyForward,
    normalizer: Tensor,
    dropout_seed: int | None,
    autocast: AbstractContextManager[object],
) -> Tensor:
    """Summed token loss divided by ``normalizer``; what the gradient is taken of.

    A ``LazyForward`` leaves the unembedding to the loss, which then computes the logits and their gradient a
    chunk of positions at a time (``zmaj.nn.loss.chunked_cross_entropy``) instead of holding them all: the same
    value and gradients as the plain path, in less memory.
    """
    assert batch.targets is not None, "training batches carry targets"
    with autocast:
        out = forward(params, batch, dropout_seed=dropout_seed)
        if isinstance(out, LazyLogits):  # under autocast: the unembedding's matmuls belong to the forward
            weights = None if batch.loss_mask is None else batch.loss_mask.float()
            total = chunked_cross_entropy(
                out.hidden, out.weight, batch.targets, weights, LOSS_CHUNK, out.softcap
            )
            return total / normalizer
    return token_losses(out, batch).sum() / normalizer


P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


def grad_and_value(
    fn: Callable[Concatenate[TensorDictBase, P], R], has_aux: bool = False
) -> Callable[Concatenate[TensorDictBase, P], tuple[TensorDictBase, R]]:
    """``torch.func.grad_and_value(fn, has_aux=has_aux)`` for a training step: the gradient of the loss with
    respect to the parameters (``fn``'s first argument), and ``fn``'s value, the loss or ``(loss, aux)``.

    Computed as ``torch.func.vjp`` of the loss with the cotangent 1 and ``create_graph=False``. ``grad_and_value``
    always runs the backward pass with ``create_graph=True`` (``torch/_functorch/eager_transforms.py``), so that an
    outer transform could differentiate the gradients again; autograd then records a graph of the backward pass
    too, and sums the gradients that meet at a tensor out of place. A step's gradients are never differentiated
    again, so that graph is pure cost: 6-11% of the eager step (``benchmarks/README.md``, "The eager step,
    sessions 14-15"). The gradients are the same bits (tested), and under ``torch.compile`` both trace to the
    same graph.
    """

    # The annotations are strings: ``torch.compile`` traces this ``def`` inside a compiled step, and an evaluated
    # ``P.args`` is a new object each time, on whose identity dynamo's guard then fails.
    @wraps(fn)
    def run(params: TensorDictBase, /, *args: "P.args", **kwargs: "P.kwargs") -> "tuple[TensorDictBase, R]":
        def of_params(p: TensorDictBase) -> Any:
            return fn(p, *args, **kwargs)

        # vjp returns (loss, vjp_fn), or (loss, vjp_fn, aux) with has_aux.
        loss, vjp_fn, *aux = torch.func.vjp(of_params, params, has_aux=has_aux)
        value = (loss, *aux) if has_aux else loss
        if loss.dim() != 0:
            raise ValueError(f"the differentiated loss must be a scalar, got shape {tuple(loss.shape)}")
        (grads,) = vjp_fn(torch.ones_like(loss), retain_graph=False, create_graph=False)
        return grads, value  # type: ignore[return-value]  # R is fn's return: the loss or (loss, aux)

    return run


def accumulate_grads(
    params: TensorDictBase,
    batches: Sequence[Batch],
    forward: Forward | LazyForward,
    seeds: Sequence[int | None],
    autocast: AbstractContextManager[object] | None = None,
    normalizer: Tensor | None = None,
) -> tuple[TensorDictBase, Tensor, Tensor]:
    """Gradient of the summed token loss over all micro-batches divided by ``normalizer`` (default: their
    target count, which makes it the mean token loss); also that loss and the normalizer. Data-parallel steps
    pass the target count of every rank's micro-batches, so that the ranks' gradients add up to the mean's."""
    if normalizer is None:
        normalizer = count_targets(batches).clamp(min=1)
    grad_fn = grad_and_value(summed_loss)

    # String annotations: torch.compile traces this def, and dynamo cannot evaluate subscripted types.
    def micro_grads(micro: "tuple[Batch, int | None]") -> "tuple[TensorDictBase, Metrics]":
        grads, loss = grad_fn(params, micro[0], forward, normalizer, micro[1], autocast or nullcontext())
        return grads, {"loss": loss.detach()}

    grads, sums = sum_grads(micro_grads, zip(batches, seeds, strict=True))
    assert grads is not None, "a step needs at least one batch"
    return grads, sums["loss"], normalizer


def count_targets(batches: Sequence[Batch]) -> Tensor:
    """The number of target tokens in ``batches``."""
    return sum((n_targets(b) for b in batches), torch.tensor(0))


def sum_grads(
    micro_grads: Callable[[T], tuple[TensorDictBase, Metrics]], micro_batches: Iterable[T]
) -> tuple[TensorDictBase | None, Metrics]:
    """The sums of ``micro_grads``' gradients and metrics over ``micro_batches`` (None and {} for none):
    gradient accumulation, for any loss whose micro-batch parts add up to the whole.

    Two gradients are alive at a time, the sum and the micro-batch's being computed: each is added into the sum
    in place and let go before the next is computed (summed out of place, and held by a generator's loop
    variable meanwhile, three were: a whole model's more memory, 32 GB at 8B parameters in fp32), and one
    micro-batch's activations are freed before the next one's are made."""
    grads: TensorDictBase | None = None
    metrics: Metrics = {}
    for micro in micro_batches:
        g, values = micro_grads(micro)
        grads = g if grads is None else grads.add_(g)
        del g
        metrics = {key: metrics[key] + value if key in metrics else value for key, value in values.items()}
    return grads, metrics


GradFn = Callable[
    [
        TensorDictBase,
        Sequence[Batch],
        Forward | LazyForward,
        Sequence[int | None],
        AbstractContextManager[object] | None,
        Tensor | None,
    ],
    tuple[TensorDictBase, Tensor, Tensor],
]
"""The signature of :func:`accumulate_grads`, or of a compiled version of it."""


@runtime_checkable
class UpdateFn(Protocol):
    """The signature of :func:`apply_grads` (its ``donate`` bound), or of a compiled version of it."""

    def __call__(
        self,
        state: TensorDictBase,
        grads: TensorDictBase,
        optimizer: OptimizerConfig,
        lr: float | Tensor,
        decay: TensorDictBase,
        grad_norm: Tensor | None = None,
        *,
        parallel: Parallel = SINGLE,
    ) -> tuple[TensorDict, Float[Tensor, ""]]: ...


def step_functions(compile: bool) -> tuple[GradFn, UpdateFn]:
    """``train_step``'s ``grad_fn`` and ``update_fn`` as the training programs run them: the update donates the
    old state (a loop never reads a state again once its step has run); compiled, the gradient runs under
    deterministic algorithms (:func:`deterministic`) and the update is one graph (clipping and AdamW fused),
    which takes the learning rate as a tensor.

    dynamo compiles a Python number it reads as a constant and, when another value arrives, compiles the graph
    again with the number as an input. A schedule's learning rate and the dropout seeds change every step, so
    the second step compiled both graphs again: 100 s for the first step and 44 s for the second, for a
    2-layer GPT on a 2-core AVX2 CPU with an empty Inductor cache; 94 s and none now, the same values. A
    0-dimensional tensor is an input from the first compile on, and the models read the seed only where
    dropout is on.
    """
    update: UpdateFn = partial(apply_grads, donate=True)
    if not compile:
        return accumulate_grads, update
    compiled = torch.compile(update, fullgraph=True)

    def update_with_lr_input(
        state: TensorDictBase,
        grads: TensorDictBase,
        optimizer: OptimizerConfig,
        lr: float | Tensor,
        *rest: Any,
        **kw: Any,
    ) -> tuple[TensorDict, Float[Tensor, ""]]:
        lr = torch.as_tensor(lr, dtype=torch.float32, device=state["opt", "step"].device)
        return compiled(state, grads, optimizer, lr, *rest, **kw)

    return deterministic(torch.compile(accumulate_grads)), update_with_lr_input


def deterministic(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` with PyTorch's deterministic algorithms on during each call: what makes a compiled step, such as
    ``deterministic(torch.compile(accumulate_grads))``, give the same gradients on every run (issue 19).

    Inductor compiles the embedding's backward (a scatter-add into the rows that were read) to its own CPU loop,
    whose threads add with atomics, so a row read at several positions sums in the order the threads arrive.
    With the flag on while it compiles, it calls ATen's ``index_put_`` there instead (``index_put_impl_`` in
    ``torch/_inductor/lowering.py``), and with the flag on while that runs, ATen adds serially. On only during
    the calls: dynamo's guard on the flag then holds at every step, and the rest of the program (evaluation,
    sampling) keeps its kernels. Eager steps need none of this (``zmaj.nn.layers.embedding``).
    """

    @wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with deterministic_algorithms():
            return fn(*args, **kwargs)

    return run


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside the block, the previous settings after it.

    ``warn_only``: where a kernel has no deterministic version (some CUDA ones; cuBLAS without
    ``CUBLAS_WORKSPACE_CONFIG``), PyTorch warns instead of stopping the run. On CUDA that also keeps the
    non-deterministic backward of SDPA's memory-efficient and flash kernels (PyTorch picks their deterministic
    form only without ``warn_only``), so a CUDA step is not bit-reproducible; on the CPU it is. ``fill_uninitialized_memory`` stays
    off: NaN-filling every new tensor is a check for kernels that read memory they never wrote, not something
    determinism needs, and it writes over every new tensor.
    """
    settings: Any = torch.utils.deterministic  # torch's stubs lack its fill_uninitialized_memory property
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = settings.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    settings.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        settings.fill_uninitialized_memory = fill


def train_step(
    state: TensorDictBase,
    batches: Sequence[Batch],
    *,
    forward: Forward | LazyForward,
    optimizer: OptimizerConfig,
    lr: float,
    decay: TensorDictBase,
    seed: int,
    autocast: AbstractContextManager[object] | None = None,
    grad_fn: GradFn | None = None,
    update_fn: UpdateFn | None = None,
    parallel: Parallel = SINGLE,
) -> tuple[TensorDict, Metrics]:
    """One optimizer step over ``len(batches)`` accumulated micro-batches (this rank's share of each).

    ``grad_fn`` defaults to :func:`accumulate_grads`; pass ``deterministic(torch.compile(accumulate_grads))`` to
    compile the forward and backward (:func:`deterministic` keeps them repeatable). (Compiling only ``forward``
    does not work: dynamo refuses a compiled function called inside an eager ``torch.func`` transform,
    pytorch/pytorch#128711.) ``update_fn`` defaults to :func:`apply_grads`;
    ``torch.compile(apply_grads)`` fuses clipping and AdamW's elementwise passes over every parameter (eight,
    eagerly) into a few loops, and ``partial(apply_grads, donate=True)`` writes them into the old state when the
    caller is done with it. :func:`step_functions` gives both pairs as the programs run them (compiled, the
    learning rate a tensor, so that a schedule does not compile the update again).

    Under ``parallel`` (``zmaj.train.parallel``) the loss is normalised by the target count of all ranks, the
    gradients are summed over the ranks, and the metrics are global: the same step as one process would take
    on the ranks' micro-batches concatenated. ``forward`` is then the layout's (``parallel.forward``).
    """
    params = state["params"]
    step = int(state["opt", "step"])
    # Dropout randomness is a pure function of (seed, step, micro-batch, rank), so a resumed run repeats it.
    seeds = [
        (seed * 1_000_003 + (step * len(batches) + i) * parallel.size + parallel.rank) % 2**63
        for i in range(len(batches))
    ]
    # Clamped once summed (a rank may hold no target; all ranks together rarely do), so it can divide.
    normalizer = parallel.all_sum(count_targets(batches)).clamp(min=1).to(params.device)
    grads, loss, n_tokens = (grad_fn or accumulate_grads)(
        params, batches, forward, seeds, autocast, normalizer
    )
    grads = parallel.reduce_grads(grads)
    norm = parallel.global_norm(grads) if parallel.sharded else None
    update = update_fn or apply_grads
    new_state, grad_norm = update(state, grads, optimizer, lr, decay, norm, parallel=parallel)
    metrics = {
        "loss": parallel.all_sum(loss),
        "grad_norm": grad_norm,
        "lr": torch.tensor(lr),
        "tokens": n_tokens,
    }
    return new_state, metrics


def apply_grads(
    state: TensorDictBase,
    grads: TensorDictBase,
    optimizer: OptimizerConfig,
    lr: float | Tensor,
    decay: TensorDictBase,
    grad_norm: Tensor | None = None,
    donate: bool = False,
    *,
    parallel: Parallel = SINGLE,
) -> tuple[TensorDict, Float[Tensor, ""]]:
    """The state after one AdamW or Muon step on ``grads`` (clipped first when ``optimizer.grad_clip`` is set, by
    one norm over all parameters, Muon's too), and the gradients' global norm before clipping: the update every
    step function (LM, DPO, GRPO) ends with.
    ``grad_norm`` is that norm when the caller has it (a sharded state's takes a collective,
    ``Parallel.global_norm``); otherwise it is computed here. ``parallel`` is the state's layout: fully
    sharded, Muon gathers each matrix's update whole (``zmaj.train.muon.muon_update``).

    ``donate=True`` (``partial(apply_grads, donate=True)`` as ``train_step``'s ``update_fn``) writes the new
    state into the old one's tensors and uses ``grads``' as scratch (the clipped gradients, then AdamW's
    denominators): for a loop that reads neither the old state nor the gradients again, it saves allocating
    the parameters, moments and gradients anew each step (``zmaj.train.optim.adamw_update``).
    """
    if grad_norm is None:
        grad_norm = global_norm(grads)
    if optimizer.grad_clip is not None:
        grads = clip_by_global_norm(grads, optimizer.grad_clip, grad_norm, donate)
    params, opt_state = state["params"], state["opt"]
    if isinstance(optimizer, MuonConfig):
        new_params, opt = muon_update(params, grads, opt_state, optimizer, lr, decay, donate, parallel)
    else:
        new_params, opt = adamw_update(params, grads, opt_state, optimizer, lr, decay, donate)
    return TensorDict({"params": new_params, "opt": opt}), grad_norm


def eval_step(
    params: TensorDictBase,
    batch: Batch,
    forward: Forward | LazyForward,
    token_bytes: Tensor,
    autocast: AbstractContextManager[object] | None = None,
) -> Metrics:
    """Summed loss, target count and target bytes; sums so that the caller can pool them over batches. With a
    ``LazyForward`` the loss is chunked as the training loss is (:func:`summed_loss`): the whole logits of an
    evaluation batch, in float32 for the softmax, would take several times a training step's memory."""
    assert batch.targets is not None
    with torch.no_grad():
        loss_sum = summed_loss(params, batch, forward, torch.ones(()), None, autocast or nullcontext())
    mask = torch.ones_like(batch.targets, dtype=torch.bool) if batch.loss_mask is None else batch.loss_mask
    return {
        "loss_sum": loss_sum,
        "tokens": mask.sum(),
        "bytes": (token_bytes.to(batch.targets.device)[batch.targets] * mask).sum(),
    }


def held_out(
    params: TensorDictBase,
    dataset: LMDataset,
    forward: Forward | LazyForward,
    batch_size: int,
    max_batches: int | None,
    token_bytes: Tensor,
    autocast: AbstractContextManager[object] | None = None,
    parallel: Parallel = SINGLE,
) -> dict[str, float]:
    """Held-out loss and bits per byte of ``params`` (whole) over the first ``max_batches`` batches of
    ``batch_size`` rows of ``dataset`` (all when None), the same rows at any world size: each rank takes its
    share of every batch, as in training, so that a batch's logits take ``1 / N`` of the memory on each of N
    ranks, and the sums are pooled over the ranks."""
    n_batches = -(-len(dataset) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    device = tensors(params)[0].device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    what = f"held-out loss over {n_batches:,} batches of {batch_size}"
    for index in progress(range(n_batches), None, what, unit="batch"):
        rows = range(index * batch_size, min((index + 1) * batch_size, len(dataset)))
        share = rows[
            parallel.rank * len(rows) // parallel.size : (parallel.rank + 1) * len(rows) // parallel.size
        ]
        if not share:  # the last batch may have fewer rows than there are ranks
            continue
        metrics = eval_step(params, stream_batch(dataset, share).to(device), forward, token_bytes, autocast)
        sums += torch.stack([metrics[key].double() for key in ("loss_sum", "tokens", "bytes")])
    loss_sum, tokens, n_bytes = parallel.all_sum(sums).tolist()
    return pooled_eval(
        [{"loss_sum": torch.tensor(loss_sum), "tokens": torch.tensor(tokens), "bytes": torch.tensor(n_bytes)}]
    )


def pooled_eval(metrics: Sequence[Metrics]) -> dict[str, float]:
    """Mean loss per token (nats) and bits per byte, the tokenizer-independent measure of compression."""
    loss_sum = sum(float(m["loss_sum"]) for m in metrics)
    tokens = sum(int(m["tokens"]) for m in metrics)
    n_bytes = sum(int(m["bytes"]) for m in metrics)
    return {"val_loss": loss_sum / max(tokens, 1), "val_bpb": loss_sum / math.log(2) / max(n_bytes, 1)}


def bind(forward: Callable[..., Tensor], **config: object) -> Forward:
    """Bind a model's config so it reads ``forward(params, batch, dropout_seed=...)``."""
    bound: Forward = partial(forward, **config)
    return bound


def bind_lazy(lazy_forward: Callable[..., LazyLogits], **config: object) -> LazyForward:
    """Bind a model's config to its ``lazy_forward`` (the training forward whose loss unembeds in chunks)."""
    bound: LazyForward = partial(lazy_forward, **config)
    return bound
