"""The data-parallel and fully sharded steps on 2 ranks, for ``test_distributed.py`` to compare with one process.

Run as ``torchrun --nproc-per-node 2 tests/integration/distributed_steps.py OUT``. Every rank takes its share of
the same fixed global batches (``Parallel.rows``) and trains from the same initial state; rank 0 writes what the
job ended with (the whole state, gathered), each rank writes what it holds itself, and a checkpoint written by
the sharded job is read back on both ranks. One launch does every case: starting 2 processes costs more than
the steps themselves.
"""

import errno
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from unittest.mock import patch

import torch
from pydantic import BaseModel
from safetensors.torch import save_file
from tensordict import TensorDict

from tests.integration.distributed_cases import (
    MODELS,
    MUON,
    dpo_batches,
    global_batches,
    grpo_rollout,
    run_dpo,
    run_grpo,
    run_lm,
)
from zmaj import checkpoint
from zmaj.models import gpt, llama
from zmaj.models.common import Batch
from zmaj.train import muon, report
from zmaj.train import parallel as zmaj_parallel
from zmaj.train.parallel import Parallel, ParallelConfig, tensors
from zmaj.train.runs import Run
from zmaj.train.spec import LoopConfig
from zmaj.train.step import bind, init_state


def main(out: Path) -> None:
    dp = Parallel.from_environment(ParallelConfig(kind="dp"), torch.device("cpu"))
    counts: dict[str, dict[str, int]] = {}
    for name, (module, config) in MODELS.items():
        for kind in ("dp", "fsdp"):
            parallel = replace(dp, kind=kind)
            metrics: list[dict[str, float]] = []
            state = run_lm(module, config, parallel, global_batches(config.vocab_size), metrics=metrics)
            (out / f"{name}-{kind}-metrics-rank{dp.rank}.json").write_text(json.dumps(metrics))
            counts[f"{name}-{kind}"] = {
                "local": sum(t.numel() for t in tensors(state)),
                "total": sum(t.numel() for t in tensors(init_state(module.init(config, 0)))),
            }
            save(parallel, state, out / f"{name}-{kind}")
            if name == "gpt":
                gpt_cases(parallel, state, out)
    (out / f"held-rank{dp.rank}.json").write_text(json.dumps(whole_bytes_held(replace(dp, kind="fsdp"))))
    kept = {
        name: kept_by_autograd(replace(dp, kind="fsdp"), module)
        for name, module in (("gpt", gpt), ("llama", llama))
    }
    (out / f"kept-rank{dp.rank}.json").write_text(json.dumps(kept))
    (out / f"each-matrix-rank{dp.rank}.json").write_text(json.dumps(each_matrix_errors(dp)))
    dpo_metrics: list[dict[str, float]] = []
    save(dp, run_dpo(dp, dpo_batches(), dpo_metrics), out / "dpo-dp")
    (out / f"dpo-metrics-rank{dp.rank}.json").write_text(json.dumps(dpo_metrics))
    for name, every_rank_trains in (("grpo", False), ("grpo-every-rank", True)):
        grpo_state, grpo_metrics = run_grpo(dp, grpo_rollout(every_rank_trains))
        save(dp, grpo_state, out / f"{name}-dp")
        (out / f"{name}-metrics-rank{dp.rank}.json").write_text(json.dumps(grpo_metrics))
    with counting_orthogonalized(out / f"orthogonalized-grpo-rank{dp.rank}.json"):
        save(dp, run_grpo(dp, grpo_rollout(False), MUON)[0], out / "grpo-muon-dp")
    # A stop one rank saw (rank 1's SIGTERM), none, and one every rank saw.
    said = [dp.agree(dp.rank == 1), dp.agree(False), dp.agree(True)]
    (out / f"agree-rank{dp.rank}.json").write_text(json.dumps(said))
    (out / f"rank-0-write-fails-rank{dp.rank}.json").write_text(
        json.dumps(rank_0_write_fails(dp, out / "records"))
    )
    if dp.main:
        (out / "counts.json").write_text(json.dumps(counts))


def gpt_cases(parallel: Parallel, state: TensorDict, out: Path) -> None:
    """The GPT's further cases in ``parallel``'s layout, from its AdamW run's ``state``: Muon (counting its
    Newton-Schulz work); sharded, a reshard of both runs and a bf16 run; data parallel, Muon with the update
    compiled (``train.compile`` is refused with fsdp)."""
    module, config = MODELS["gpt"]
    batches = global_batches(config.vocab_size)
    with counting_orthogonalized(out / f"orthogonalized-{parallel.kind}-rank{parallel.rank}.json"):
        with_muon = run_lm(module, config, parallel, batches, optimizer=MUON)
    save(parallel, with_muon, out / f"gpt-{parallel.kind}-muon")
    if parallel.kind == "fsdp":
        reshard(parallel, state, out / "run", module.init(config, 0))
        reshard(parallel, with_muon, out / "run-muon", module.init(config, 0), MUON)
        save(parallel, run_lm(module, config, parallel, batches, torch.bfloat16), out / "gpt-fsdp-bf16")
    else:
        compiled = run_lm(module, config, parallel, batches, optimizer=MUON, compile_update=True)
        save(parallel, compiled, out / "gpt-dp-muon-compiled")


@contextmanager
def counting_orthogonalized(path: Path) -> Iterator[None]:
    """Within it, how many matrices each of Muon's Newton-Schulz calls on this rank takes, written to ``path``
    as a JSON list at the end."""
    calls: list[int] = []
    original = muon.orthogonalize

    def counted(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        calls.append(update.flatten(0, -3).shape[0] if update.ndim > 2 else 1)
        return original(update, steps, dtype)

    muon.orthogonalize = counted
    try:
        yield
    finally:
        muon.orthogonalize = original
    path.write_text(json.dumps(calls))


def each_matrix_errors(dp: Parallel) -> dict[str, float]:
    """For stacks of 1, 3 (tall) and 4 matrices, data parallel and fully sharded: the largest difference
    between this rank's piece of ``Parallel.each_matrix(..., orthogonalize)`` and its piece of orthogonalising
    the whole stack in one call. 1 and 3 do not split evenly between 2 ranks (one rank has no matrix, or one
    fewer)."""
    errors = {}
    for kind in ("dp", "fsdp"):
        parallel = replace(dp, kind=kind)
        for layers in (1, 3, 4):
            rows, cols = (6, 4) if layers == 3 else (4, 6)  # tall ones too: Newton-Schulz transposes them
            whole = torch.randn(layers, rows, cols, generator=torch.Generator().manual_seed(layers))
            td = parallel.shard(TensorDict({"blocks": TensorDict({"w": whole}, batch_size=[layers])}))
            key = ("blocks", "w")
            got = parallel.each_matrix(td, key, td.get(key), muon.orthogonalize)
            want = parallel.piece(td, key, muon.orthogonalize(whole))
            assert got.shape == want.shape == td.get(key).shape, (kind, layers, got.shape, want.shape)
            errors[f"{kind}-{layers}"] = float((got - want).abs().max())
    return errors


def whole_bytes_held(parallel: Parallel) -> dict[str, int]:
    """The most bytes of gathered (whole) parameters a rank held at once in the steps of the 4-layer GPT, and
    what the parameters outside the blocks and one block take whole."""
    module, config = MODELS["gpt"]
    books: list[zmaj_parallel.Gathered] = []

    class Recorded(zmaj_parallel.Gathered):
        def __init__(self) -> None:
            super().__init__()
            books.append(self)

    zmaj_parallel.Gathered = Recorded  # type: ignore[misc]
    run_lm(module, config, parallel, global_batches(config.vocab_size))
    zmaj_parallel.Gathered = Recorded.__mro__[1]  # type: ignore[misc, assignment]
    params = module.init(config, 0)
    return {
        "peak": max(book.peak for book in books),
        # (the vectors outside the blocks are held whole by every rank, never gathered)
        "outside": sum(t.numel() * t.element_size() for t in tensors(params.exclude("blocks")) if t.ndim > 1),
        "block": sum(t.numel() * t.element_size() for t in tensors(params["blocks"])) // config.n_layers,
    }


def kept_by_autograd(parallel: Parallel, module: ModuleType) -> dict[str, int]:
    """The bytes autograd holds for the backward once a sharded forward of 4 blocks of width 128 ends, beyond
    the parameters (shards, and the whole tensors ``Gathered`` gathered), with what one block takes whole. Two
    tokens keep the activations small next to a block, so a copy of a block's weights would stand out."""
    config: gpt.GPTConfig | llama.LlamaConfig = (
        gpt.GPTConfig(vocab_size=64, context=16, d_model=128, n_layers=4, n_heads=2)
        if module is gpt
        else llama.LlamaConfig(
            vocab_size=64, context=16, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352
        )
    )
    params = module.init(config, 0)
    shards = parallel.shard(params)
    for shard in tensors(shards):
        shard.requires_grad_()
    wholes: list[torch.Tensor] = []

    class Recorded(zmaj_parallel.Gathered):
        def add(self, layer: int | None, shard: torch.Tensor, whole: torch.Tensor) -> None:
            super().add(layer, shard, whole)
            wholes.append(whole)

    saved: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    zmaj_parallel.Gathered = Recorded  # type: ignore[misc]
    forward = parallel.forward(bind(module.forward, config=config))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = forward(shards, Batch(tokens=torch.tensor([[1, 2]])))
    zmaj_parallel.Gathered = Recorded.__mro__[1]  # type: ignore[misc, assignment]
    parameters = {t.untyped_storage().data_ptr() for t in [*wholes, *tensors(shards)]}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    kept = sum(n for ptr, n in storages.items() if ptr not in parameters)
    logits.sum().backward()  # every rank takes part in the backward's collectives
    block = sum(t.numel() * t.element_size() for t in tensors(params["blocks"])) // config.n_layers
    return {"kept": kept, "block": block}


def save(parallel: Parallel, state: TensorDict, stem: Path) -> None:
    """Each rank's own tensors, and (rank 0) the whole state gathered from all of them."""
    whole = parallel.unshard(state)
    save_file(checkpoint.flatten(state), f"{stem}-rank{parallel.rank}.safetensors")
    if parallel.main:
        save_file(checkpoint.flatten(whole), f"{stem}.safetensors")


def reshard(
    parallel: Parallel,
    state: TensorDict,
    run_dir: Path,
    params: TensorDict,
    optimizer: muon.MuonConfig | None = None,
) -> None:
    """Save the sharded state as the training loop does (gathered, written by rank 0), read it back into a whole
    state on every rank, shard it, and record whether each rank got back exactly the shards it held."""
    whole = parallel.unshard(state)
    if parallel.main:
        checkpoint.save(run_dir, whole, {"world_size": parallel.size})
    parallel.barrier()
    template = init_state(params, optimizer)
    loaded = parallel.shard(checkpoint.load_state(checkpoint.latest(run_dir), template))
    same = all(torch.equal(a, b) for a, b in zip(tensors(loaded), tensors(state), strict=True))
    (run_dir / f"reloaded-rank{parallel.rank}.json").write_text(json.dumps({"equal": same}))


class Spec(BaseModel):
    name: str = "records"
    train: LoopConfig = LoopConfig(steps=1)


def rank_0_write_fails(parallel: Parallel, run_dir: Path) -> dict[str, str]:
    """What each rank raises when a write of the run's records fails on rank 0 alone (a full disk), in starting
    the session and in appending a metrics line: every rank must learn it from rank 0, rather than go on to the
    next collective and die there."""
    full = OSError(errno.ENOSPC, "No space left on device")

    def fails_on_rank_0(*args: object) -> None:
        if parallel.main:
            raise full

    def raised(action: Callable[[], object]) -> str:
        try:
            action()
        except BaseException as error:
            return f"{type(error).__name__}: {error}"
        return "nothing"

    run_dir.mkdir(exist_ok=True)
    run = Run(run_dir, Spec(), parallel, resumed=False)
    said = {"record": raised(lambda: run.record({"step": 1, "loss": 1.0}))}
    with patch.object(report, "append_jsonl", fails_on_rank_0):
        said["record-failing"] = raised(lambda: run.record({"step": 2, "loss": 1.0}))
    with patch.object(report, "record_session", fails_on_rank_0):
        said["start-failing"] = raised(lambda: Run(run_dir, Spec(), parallel, resumed=False).__enter__())
    said["after"] = json.dumps(parallel.agree(parallel.main))  # the ranks are still together
    return said


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    torch.distributed.destroy_process_group()
