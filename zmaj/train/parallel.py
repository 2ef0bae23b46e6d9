"""Data-parallel and fully sharded training on ``torch.distributed``: where each leaf of the state lives, and the
few collectives a step needs.

``torchrun --nproc-per-node N programs/X.py ...`` starts N copies of a program; each is one *rank* and reads its
rank and the world size from the environment that ``torchrun`` sets (``Parallel.from_environment``). Every rank
runs the same loop over a disjoint slice of each global batch (``Parallel.rows``). Two layouts of the state:

- **dp** (data parallel, the semantics of DDP): every rank holds the whole state. Each computes the gradient of
  its slice's share of the loss, one all-reduce in a single flat buffer sums them (``reduce_grads``), and the
  identical update keeps the ranks identical.
- **fsdp** (fully sharded, the semantics of FSDP / ZeRO-3): every leaf of the parameters and of the AdamW moments
  is cut along its first dimension after the stacked-layer axis, and rank r keeps the r-th piece, about 1/N of
  the state (``shard``); the vectors outside the blocks stay whole on every rank (``shard_dim``), their
  gradients all-reduced as data parallel's are. The forward gathers the non-block parameters once and each
  block's parameters just before the block computes (``sharded_forward``, through
  ``zmaj.models.common.layers``); autograd turns each gather into a reduce-scatter of the gradient, so every
  rank ends the backward with the gradient of exactly its shard, summed over all ranks. AdamW's update is
  elementwise, so each rank updates its own shard; Muon's momentum is sharded the same way, but each update is
  gathered whole to be orthogonalised (one all-gather per Muon tensor per step, in the Newton-Schulz
  precision, ``zmaj.train.muon.muon_update``). The gradient norm for clipping is one all-reduce of the shards'
  sums of squares.

This is the SimpleFSDP pattern (Zhang et al., 2024, arXiv:2411.00284): the gather is an operation in the forward,
and the reduce-scatter is its derivative. Two departures, both forced by ``torch.func``, which the training steps
use for gradients: the shards are plain tensors, not DTensors (``torch.func``'s wrappers hide a DTensor's subclass
from the function it differentiates, so ``redistribute`` is not there to call), and the gather is a small
``torch.autograd.Function`` over the functional collectives rather than ``DTensor.redistribute``. FSDP2's
``fully_shard`` is the other road, and a closed one here: it works per ``nn.Module`` (the stacked blocks are one
tensor per kind, so it would gather every layer at once) and on module hooks, which ``torch.func`` never runs.

A global batch is split evenly, and every loss is normalised by the *global* count of what it averages
(``all_sum`` of the local counts), so one step on N ranks is one step on the concatenated batch. The layout is
all a rank needs to know; the models never import ``torch.distributed``.
"""

import atexit
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar, cast

import torch
import torch.distributed as dist
from loguru import logger
from pydantic import BaseModel, ConfigDict
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models.common import Batch, materializing
from zmaj.nn.layers import maps_apart
from zmaj.train.optim import global_norm, leaf_keys

Kind = Literal["dp", "fsdp"]
T = TypeVar("T")
Out = TypeVar("Out")  # what a forward returns: logits, or LazyLogits for a chunked loss


class ParallelConfig(BaseModel):
    """How the state is laid out across the ranks of a ``torchrun`` job (a single process ignores it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind = "dp"


COLLECTIVE_TIMEOUT = timedelta(minutes=30)
"""How long a rank waits in a collective before it fails instead of hanging: long enough for rank 0 to write a
large checkpoint while the others wait at the next step."""
RANK_0_ALONE_TIMEOUT = timedelta(hours=24)
"""How long the other ranks wait for work rank 0 does alone (``rank_0_first``, ``from_rank_0``) before they
fail: preparing a corpus (downloading, training a tokenizer, tokenising billions of tokens) can take
hours. A rank 0 that dies ends the job at once all the same (``torchrun`` stops the others)."""


@dataclass(frozen=True)
class Parallel:
    """This process's place in the job: its rank, the world size, its device and the state's layout.
    ``patient`` is the group the ranks wait for rank 0 in (gloo, ``RANK_0_ALONE_TIMEOUT``)."""

    kind: Kind = "dp"
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    patient: dist.ProcessGroup | None = field(default=None, compare=False, repr=False)

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp" and self.size > 1

    @staticmethod
    def from_environment(config: ParallelConfig, device: torch.device) -> "Parallel":
        """Join the ``torchrun`` job this process belongs to (NCCL on CUDA, gloo on the CPU), or be a single
        process when no launcher set ``WORLD_SIZE``. Each rank takes the GPU of its local rank."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return Parallel(config.kind, 0, 1, device)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            if local_rank >= (count := torch.cuda.device_count()):
                problem = (
                    f"rank {local_rank} of this machine has no GPU of its own: it has {count}; start at most "
                    f"{count} processes per machine (torchrun --nproc-per-node)"
                )
                # Said here: the ranks this fails on are never rank 0, the one that reports bad input.
                logger.error(problem)
                raise ValueError(problem)
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
            # PyTorch asks every process to destroy its group before exiting (NCCL warns otherwise, and an
            # unordered exit can leave other ranks waiting); a caller that destroyed it already is left alone.
            atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
        # On the CPU whatever the device: it carries one small object, and the first NCCL call, which sets up
        # the communicators under the short timeout, then comes after rank 0's work.
        patient = dist.new_group(backend="gloo", timeout=RANK_0_ALONE_TIMEOUT)
        assert isinstance(patient, dist.ProcessGroup)  # (every rank is in it)
        return Parallel(config.kind, dist.get_rank(), dist.get_world_size(), device, patient)

    # ------------------------------------------------------------------------------------------ the data

    def rows(self, rows: Sequence[T]) -> Sequence[T]:
        """This rank's contiguous share of a global micro-batch's rows: concatenated over the ranks in order,
        the shares are the rows again."""
        if len(rows) % self.size != 0:
            raise ValueError(f"{len(rows)} rows do not split evenly over {self.size} ranks")
        share = len(rows) // self.size
        return rows[self.rank * share : (self.rank + 1) * share]

    def check_divides(self, count: int, what: str) -> None:
        """A global batch of ``count`` must split evenly over the ranks; a clear error when it does not."""
        if count % self.size != 0:
            raise ValueError(
                f"{what} is {count}, which {self.size} ranks cannot split evenly; "
                f"use a world size that divides it, or change {what}"
            )

    def barrier(self) -> None:
        """Wait until every rank is here (e.g. until rank 0 has filled a cache the others then read)."""
        if self.distributed:
            dist.barrier()

    def rank_0_first(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0, then on the others: for work that fills a cache the others then read. When it
        fails on rank 0, the others raise too, with rank 0's message, instead of waiting for it."""
        if not self.distributed:
            return make()
        made = self._on_rank_0(make)
        return made[0] if made else make()

    def from_rank_0(self, make: Callable[[], T]) -> T:
        """``make()`` on rank 0 alone, its result (not None: see :meth:`broadcast`) on every rank: for what
        exactly one process may do (claim a run folder). When it fails on rank 0, the others raise too, with rank
        0's message."""
        if not self.distributed:
            return make()
        made = self._on_rank_0(make)
        return self.broadcast(made[0] if made else None)

    def check_on_rank_0(self, check: Callable[[], None]) -> None:
        """``check()`` on rank 0 alone, for what only rank 0 will touch (the run folder); when it fails, the
        others raise too, with rank 0's message."""
        self._on_rank_0(check)

    def _on_rank_0(self, make: Callable[[], T]) -> tuple[T] | tuple[()]:
        """``(make(),)`` on rank 0, which then tells the others whether it worked; they return ``()``, or raise
        rank 0's error as a ``ValueError`` (rank 0 reports it), rather than wait on a rank that has gone. They
        wait in the patient group: however long ``make`` takes, the collectives' timeout is not reached."""
        if self.main:
            try:
                made = make()
            except Exception as error:  # told to the other ranks, then raised here as it is
                self.broadcast(f"rank 0 failed: {error}", patient=True)
                raise
            self.broadcast("", patient=True)
            return (made,)
        failure: str = self.broadcast(None, patient=True)
        if failure:
            raise ValueError(failure)
        return ()

    def broadcast(self, value: T | None, patient: bool = False) -> T:
        """Rank 0's ``value`` on every rank (the others pass None): for what one rank makes and all use;
        ``patient`` waits for rank 0 up to ``RANK_0_ALONE_TIMEOUT``, not ``COLLECTIVE_TIMEOUT``."""
        box = [value]
        if self.distributed:
            dist.broadcast_object_list(box, src=0, group=self.patient if patient else None)
        assert box[0] is not None
        return box[0]

    # ---------------------------------------------------------------------------------- reductions

    def all_sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over the ranks (a new tensor; ``value`` itself on a single process)."""
        if not self.distributed:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def all_sums(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each scalar metric summed over the ranks, in one all-reduce. The ranks must hold the same keys; they
        are reduced in sorted order, so the order each rank built its dict in does not matter."""
        if not self.distributed or not metrics:
            return metrics
        keys = sorted(metrics)
        summed = self.all_sum(torch.stack([metrics[key].detach().float().to(self.device) for key in keys]))
        return {key: summed[i] for i, key in enumerate(keys)}

    def all_mean(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each scalar metric averaged over the ranks, in one all-reduce: the global mean of a per-row
        quantity when every rank holds the same number of rows."""
        return {key: value / self.size for key, value in self.all_sums(metrics).items()}

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any: a stop that one rank sees (Ctrl-C) is a stop for all."""
        if not self.distributed:
            return flag
        return bool(self.all_sum(torch.tensor(float(flag), device=self.device)) > 0)

    def reduce_grads(self, grads: TensorDictBase) -> TensorDictBase:
        """The gradients summed over the ranks. Data parallel: one all-reduce over a single flat buffer of every
        gradient (one collective per step instead of one per tensor). Sharded: each shard's reduce-scatter ran
        in the backward; the leaves every rank keeps whole (``shard_dim``) are all-reduced here, as data
        parallel's are."""
        if not self.distributed:
            return grads
        keys = [key for key in leaf_keys(grads) if not self.sharded or shard_dim(grads, key) is None]
        if not keys:
            return grads
        leaves = [cast(Tensor, grads.get(key)) for key in keys]
        flat = torch.cat([g.reshape(-1) for g in leaves])
        dist.all_reduce(flat)
        summed = dict(zip(keys, torch.split(flat, [g.numel() for g in leaves]), strict=True))
        return _map_leaves(grads, lambda key, g: summed[key].view_as(g) if key in summed else g)

    def global_norm(self, grads: TensorDictBase) -> Tensor:
        """The L2 norm of the whole gradient (``optim.global_norm``); sharded, of every rank's shards together
        (the square root of the summed squares of each rank's norm) and of the leaves every rank keeps whole,
        counted once."""
        if not self.sharded:
            return global_norm(grads)
        whole = [key for key in leaf_keys(grads) if shard_dim(grads, key) is None]
        squares = self.all_sum(global_norm(grads.exclude(*whole)).square())
        if whole:
            squares = squares + global_norm(grads.select(*whole)).square()
        return squares.sqrt()

    def shard(self, td: TensorDictBase) -> TensorDict:
        """This rank's piece of every leaf (fully sharded), or ``td`` itself (data parallel, one process)."""
        if not self.sharded:
            assert isinstance(td, TensorDict)
            return td
        return _map_leaves(td, lambda key, tensor: self.piece(td, key, tensor).clone())

    def piece(self, td: TensorDictBase, key: tuple[str, ...], whole: Tensor) -> Tensor:
        """This rank's piece (a view) of ``whole``, a tensor shaped like ``td``'s leaf ``key`` whole; ``whole``
        itself unless sharded."""
        dim = shard_dim(td, key) if self.sharded else None
        return whole if dim is None else whole.chunk(self.size, dim)[self.rank]

    def unshard(self, td: TensorDictBase) -> TensorDict:
        """Every leaf whole on every rank: all-gathered where sharded (for evaluation)."""
        if not self.sharded:
            assert isinstance(td, TensorDict)
            return td
        return _map_leaves(td, lambda key, tensor: self.whole(td, key, tensor))

    def gather_to_main(self, td: TensorDictBase) -> TensorDict | None:
        """Every leaf whole on rank 0 (None on the other ranks): what a checkpoint saves. Sharded, the leaves
        are gathered onto rank 0's CPU one at a time, so a device holds one whole leaf beyond its shards at any
        moment; otherwise the state is returned where it is."""
        if not self.sharded:
            assert isinstance(td, TensorDict)
            return td if self.main else None
        out = td.empty(recurse=True).clear_device_() if self.main else None
        for key in leaf_keys(td):
            whole = self.whole(td, key, td.get(key))
            if out is not None:
                out.set(key, whole.cpu())
        assert out is None or isinstance(out, TensorDict)
        return out

    def whole(self, td: TensorDictBase, key: tuple[str, ...], tensor: Tensor) -> Tensor:
        """``tensor``, this rank's piece of ``td``'s leaf ``key`` (or a tensor shaped like it), all-gathered
        whole where sharded; ``tensor`` itself otherwise."""
        dim = shard_dim(td, key) if self.sharded else None
        if dim is None:
            return tensor
        pieces = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(pieces, tensor.contiguous())
        return torch.cat(pieces, dim)

    def whole_shape(self, td: TensorDictBase, key: tuple[str, ...]) -> torch.Size:
        """The shape of ``td``'s leaf ``key`` whole, of which this rank may hold a piece."""
        shape = list(td.get(key).shape)
        dim = shard_dim(td, key) if self.sharded else None
        if dim is not None:
            shape[dim] *= self.size
        return torch.Size(shape)

    def whole_shapes(self, td: TensorDictBase) -> TensorDict:
        """Empty tensors on the meta device shaped as the leaves of ``td`` whole, ``td`` being this rank's share
        of them: a checkpoint's template."""
        return _map_leaves(
            td, lambda key, tensor: torch.empty(self.whole_shape(td, key), dtype=tensor.dtype, device="meta")
        )

    def each_matrix(
        self, td: TensorDictBase, key: tuple[str, ...], tensor: Tensor, fn: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """This rank's piece of ``fn`` applied to the whole of ``td``'s leaf ``key``, of which ``tensor`` is
        this rank's piece; ``fn`` maps a batch of matrices ``[n, rows, cols]`` to one of the same shape, each
        matrix on its own (Muon's Newton-Schulz).

        On more than one rank the matrices of a stacked leaf (``[layers, rows, cols]``) are split between the
        ranks, a contiguous share of ``ceil(layers / ranks)`` each: every rank runs ``fn`` on its share alone
        and one all-gather brings the results to every rank, so N ranks do 1/N of the work each rather than
        all of it. The price is that all-gather (the leaf's size in ``tensor``'s dtype), one per leaf: data
        parallel, on top of the gradients' all-reduce (modded-nanogpt reduce-scatters the gradients instead,
        so that its all-gather is the all-reduce's second half); fully sharded, on top of the all-gather of
        the leaf whole (two all-to-alls would move 1/N of those bytes). A single matrix, or a single process,
        is computed whole where it is.
        """
        whole = self.whole(td, key, tensor)
        if not self.distributed or whole.ndim < 3:
            return self.piece(td, key, fn(whole))
        matrices = whole.flatten(0, -3)
        share = -(-len(matrices) // self.size)
        mine = fn(matrices[self.rank * share : (self.rank + 1) * share])
        # all_gather takes equal sizes: the last ranks' shares may be short, or empty.
        padded = torch.cat([mine, mine.new_zeros(share - len(mine), *mine.shape[1:])])
        results = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(results, padded)
        return self.piece(td, key, torch.cat(results)[: len(matrices)].view_as(whole))

    def check_shardable(self, params: TensorDictBase) -> None:
        """Every parameter must split evenly along its sharded dimension; the error names the first that does
        not (padding would change the parameter counts that checkpoints and exports rely on)."""
        if not self.sharded:
            return
        for key in leaf_keys(params):
            dim = shard_dim(params, key)
            size = params.get(key).shape[dim] if dim is not None else 0
            if dim is not None and size % self.size != 0:
                name = ".".join(key)
                raise ValueError(
                    f"train.parallel.kind=fsdp: parameter {name} has {size} rows along dimension {dim}, which "
                    f"{self.size} ranks cannot split evenly; choose a model size or a world size that divides it"
                )

    def forward(self, forward: Callable[..., Out], dtype: torch.dtype = torch.float32) -> Callable[..., Out]:
        """The forward the training step differentiates: ``forward`` itself, or, sharded, ``sharded_forward``
        (whose blocks' matrices are gathered in ``dtype``, the matmuls' precision)."""
        return sharded_forward(forward, self, dtype) if self.sharded else forward


SINGLE = Parallel()
"""One process: no collectives, the whole state here."""


def shard_dim(td: TensorDictBase, key: tuple[str, ...]) -> int | None:
    """The dimension a leaf is sharded along: the first after its stacked-layer axes (so a layer's piece is
    ``blocks[i]``'s first dimension), or None for a leaf every rank keeps whole: a scalar (the step counter)
    and a vector outside the blocks (the final norm's scale, the U-net skips' weights).

    Those vectors are a few thousand numbers of the model, read whole at every step, so sharding them saves
    nothing and costs a collective each; and some cannot be split: a 4-layer GPT has 2 skip weights, which
    4 ranks cannot share evenly. DeepSpeed's ZeRO-3 likewise keeps its small parameters whole on every rank
    (``stage3_param_persistence_threshold``). A vector outside the blocks is one whose parent has no batch
    dimensions, so ``td`` is a whole tree (parameters, gradients, a state), not a block's slice of one."""
    parent = td.get(key[:-1]) if len(key) > 1 else td
    dim = parent.batch_dims
    ndim = td.get(key).ndim
    return dim if ndim > dim and not (dim == 0 and ndim == 1) else None


def tensors(td: TensorDictBase) -> list[Tensor]:
    """The leaves of ``td``, in key order."""
    return [cast(Tensor, td.get(key)) for key in td.keys(True, True)]


def _map_leaves(td: TensorDictBase, fn: Callable[[tuple[str, ...], Tensor], Tensor]) -> TensorDict:
    out = td.empty(recurse=True)
    for key in leaf_keys(td):
        out.set(key, fn(key, td.get(key)))
    assert isinstance(out, TensorDict)
    return out


class Gathered:
    """The whole tensors one sharded forward gathered, layer by layer, and how many bytes of them are held.

    After a layer's forward its whole tensors are freed (their storage resized to nothing; autograd keeps the
    tensor objects it saved, now empty), and before that layer's backward they are gathered again into the
    same storage; after its backward they are freed for good. This is FSDP's "reshard after forward": a rank
    holds the blocks' shards, the parameters outside the blocks, and one or two blocks whole at any moment,
    however deep the model.
    """

    def __init__(self) -> None:
        self.layers: list[list[tuple[Tensor, Tensor]]] = []
        self.held = 0
        self.peak = 0
        self.freed: set[int] = set()
        self._regathered: set[int] = set()

    def add(self, layer: int | None, shard: Tensor, whole: Tensor) -> None:
        if layer is not None:
            while len(self.layers) <= layer:
                self.layers.append([])
            self.layers[layer].append((shard, whole))
        self._count(whole.untyped_storage().nbytes())

    def release(self, layer: int, index: int) -> None:
        """Drop one whole tensor; autograd's references to it stay, empty."""
        whole = self.layers[layer][index][1]
        self._count(-whole.untyped_storage().nbytes())
        whole.untyped_storage().resize_(0)

    def free(self, layer: int) -> None:
        """Drop a layer's whole tensors once its forward is done."""
        self.freed.add(layer)
        for index in range(len(self.layers[layer])):
            self.release(layer, index)

    def check_whole(self, layer: int) -> None:
        """Fail loudly if a layer freed after its forward reached its backward without being gathered again:
        its backward has then read empty storage (see ``_Gather`` for the order this relies on)."""
        if layer in self.freed and layer not in self._regathered:
            raise RuntimeError(
                f"sharded_forward: layer {layer}'s backward ran before its parameters were gathered again; a model "
                "whose blocks share parameters, or feed the loss other than through the next block, breaks the "
                "order the sharded forward relies on"
            )

    def regather(self, layer: int) -> None:
        """Gather a freed layer again, into the storage its saved tensors still point to (once per backward)."""
        if layer < 0 or layer in self._regathered:
            return
        self._regathered.add(layer)
        for shard, whole in self.layers[layer]:
            if whole.untyped_storage().nbytes() == 0:
                whole.untyped_storage().resize_(whole.numel() * whole.element_size())
                self._count(whole.untyped_storage().nbytes())
                dist.all_gather_into_tensor(whole, shard.to(whole.dtype).contiguous())

    def _count(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)


class _Gather(torch.autograd.Function):
    """All-gather along dimension 0 in the forward; in the backward, gather the layer below again (its backward
    comes next) and reduce-scatter (sum) the gradient.

    Written over the functional collectives (``torch.ops._c10d_functional``), which return new tensors instead
    of writing into given ones (``torch.func`` refuses an in-place write to a tensor created outside the
    transform), and called under ``no_grad``, which skips the ops' own autograd wrapper (it lacks the
    ``setup_context`` that ``torch.func`` requires); this Function is their derivative instead.

    Why the layer below's backward comes after this: among the nodes that are ready, autograd runs the one
    created last first (its sequence number), and the gathers of layer i are created after every node of layer
    i - 1. Layer i - 1's last node becomes ready only when all of layer i's backward is done, since layer i - 1
    reaches the loss only through layer i's input, and by then the gradient of every one of layer i's
    parameters is complete, so its gathers are ready too, and run first. That holds for models whose blocks
    use only their own parameters and feed the loss only through the next block (the residual stream), with
    the parameters outside the blocks (tied embeddings) gathered once and never freed: every zmaj model.
    ``Gathered.check_whole`` fails loudly if a model breaks it.
    """

    @staticmethod
    def forward(
        shard: Tensor, dim: int, dtype: torch.dtype, size: int, group: str, book: Gathered, layer: int | None
    ) -> Tensor:
        # The collectives join pieces along their first dimension: a leaf cut along another is moved there.
        with torch.no_grad():
            ops = torch.ops._c10d_functional
            piece = shard.to(dtype).movedim(dim, 0).contiguous()
            whole: Tensor = ops.wait_tensor(ops.all_gather_into_tensor(piece, size, group)).movedim(0, dim)
        book.add(layer, shard, whole)
        return whole

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Tensor, int, torch.dtype, int, str, Gathered, int | None], output: Tensor
    ) -> None:
        shard, ctx.dim, _, ctx.size, ctx.group, ctx.book, ctx.layer = inputs
        ctx.shard_dtype = shard.dtype
        if ctx.layer is not None:  # (``forward`` has just added it to its layer's list)
            ctx.index = len(ctx.book.layers[ctx.layer]) - 1

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None, None, None]:
        if ctx.layer is not None:
            ctx.book.check_whole(ctx.layer)
            ctx.book.regather(ctx.layer - 1)
        with torch.no_grad():
            ops = torch.ops._c10d_functional
            full = grad.to(ctx.shard_dtype).movedim(ctx.dim, 0).contiguous()
            summed = ops.wait_tensor(ops.reduce_scatter_tensor(full, "sum", ctx.size, ctx.group))
        if ctx.layer is not None:
            ctx.book.release(ctx.layer, ctx.index)  # every use of it in the backward is done
        return summed.movedim(0, ctx.dim), None, None, None, None, None, None


def sharded_forward(
    forward: Callable[..., Out], parallel: Parallel, dtype: torch.dtype
) -> Callable[..., Out]:
    """``forward`` over this rank's shards, FSDP's way. The parameters outside the blocks (the embeddings; the
    vectors among them every rank holds whole) are gathered up front and kept for the step; each block's are
    gathered just before the block runs (``zmaj.models.common.layers``), freed when the next block starts, and
    gathered again for its backward (``Gathered``). The block's projections run apart
    (``zmaj.nn.layers.maps_apart``): joined, their weights' copy would outlive the freeing.

    A block's matrices are gathered in ``dtype``, the matmuls' precision (bf16 under bf16 autocast): they only
    feed linear maps, which autocast would cast to it anyway, and a cast copy is what autograd would keep. Its
    vectors (norm scales, biases) and the matrices outside the blocks are gathered as stored, float32, which is
    what the same forward on one process computes with.
    """
    group = dist.group.WORLD
    assert group is not None

    def run(params: TensorDictBase, batch: Batch, **kwargs: Any) -> Out:
        book = Gathered()
        walked = 0

        def gather(td: TensorDictBase, layer: int | None) -> TensorDictBase:
            def whole(key: tuple[str, ...], shard: Tensor) -> Tensor:
                # A block's slice is cut along its first dimension; outside the blocks, as its tree says.
                dim = 0 if layer is not None else shard_dim(td, key)
                if dim is None:  # every rank holds it whole
                    return shard
                as_dtype = dtype if layer is not None and shard.ndim >= 2 else shard.dtype
                return cast(
                    Tensor, _Gather.apply(shard, dim, as_dtype, parallel.size, group.group_name, book, layer)
                )

            return _map_leaves(td, whole)

        def next_layer(block: TensorDictBase) -> TensorDictBase:
            nonlocal walked
            if walked > 0:
                book.free(walked - 1)  # the layer before has run its forward
            walked += 1
            return gather(block, walked - 1)

        whole = gather(params.exclude("blocks"), None)
        whole.set("blocks", params["blocks"])
        with materializing(next_layer), maps_apart():
            return forward(whole, batch, **kwargs)

    return run
