"""Data-parallel and fully sharded training on 2 CPU processes (gloo) against one process.

One ``torchrun`` launch (``distributed_steps.py``) runs every step case on 2 ranks; this process runs the same
cases alone (``distributed_cases.py``) and compares. "Equal" is within 1e-6 of the state's norm, leaf by leaf
kind (parameters, first and second moments): the ranks sum the same numbers in another order. A leaf-wise
relative bound would not do, because some parameters are exactly stationary in exact arithmetic (attention's
key bias: softmax ignores a constant added to every score), so their float values are rounding noise.
"""

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.distributed_cases import (
    MODELS,
    MUON,
    POLICY,
    STEPS,
    dpo_batches,
    global_batches,
    grpo_rollout,
    run_dpo,
    run_grpo,
    run_lm,
)
from zmaj import checkpoint
from zmaj.train import muon
from zmaj.train.parallel import Parallel
from zmaj.train.step import init_state

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def torchrun(*args: str | Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc-per-node nproc ARGS`` from the repository root; its exit status and output."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *map(str, args)]
    # This checkout's zmaj and tests, not the installed one's (a worktree or copy would test /work/main's).
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    done = torchrun("tests/integration/distributed_steps.py", out)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def assert_close_state(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    tolerance: float = 1e-6,
    kinds: tuple[str, ...] = ("params.", "opt.m.", "opt.v."),
) -> None:
    assert got.keys() == want.keys()
    for kind in kinds:
        names = [name for name in want if name.startswith(kind)]
        error = torch.stack([(got[n] - want[n]).double().norm() for n in names]).norm()
        scale = torch.stack([want[n].double().norm() for n in names]).norm()
        assert error <= tolerance * scale, f"{kind}: {float(error / scale):.2e} of the norm"
    assert torch.equal(got["opt.step"], want["opt.step"])


TOLERANCE = {"gpt": 1e-6, "gpt-modern": 1e-6, "llama": 1e-6, "gemma3": 3e-6}
"""Gemma 3's first moments end smaller (a norm of 0.16 after 3 steps) next to the sums that make them, so the same
float32 rounding of differently ordered sums is a larger share of them: measured 1.2-1.4e-6 of their norm, against
at most 4.5e-7 for every other tensor kind and model."""


@cache
def alone_run(name: str) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """The one-process run of model ``name``: its final state, and each step's metrics."""
    module, config = MODELS[name]
    metrics: list[dict[str, float]] = []
    state = run_lm(module, config, Parallel(), global_batches(config.vocab_size), metrics=metrics)
    return checkpoint.flatten(state), metrics


def alone(name: str) -> dict[str, torch.Tensor]:
    return alone_run(name)[0]


def assert_same_metrics(out: Path, stem: str, want: list[dict[str, float]]) -> None:
    """Every rank's metrics (``{stem}-metrics-rank{r}.json``: a list of steps', or one step's) are the
    one-process run's: global, not the rank's own share's (a loss normalised by the rank's own token count, a
    gradient norm of summed gradients)."""
    ranks = [json.loads((out / f"{stem}-metrics-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    got = ranks[0] if isinstance(ranks[0], list) else [ranks[0]]
    assert len(got) == len(want)
    for step, expected in zip(got, want, strict=True):
        assert step.keys() == expected.keys()
        for key, value in expected.items():
            # abs: a small mean (DPO's rejected reward, 0.013) moves by a few 1e-7 with the order of its sums
            assert step[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("kind", ["dp", "fsdp"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_rank_reports_the_one_process_steps_metrics(out: Path, name: str, kind: str) -> None:
    """The loss over the global batch's target tokens, their count and the global gradient norm."""
    metrics = alone_run(name)[1]
    assert len(metrics) == STEPS
    assert {"loss", "tokens", "grad_norm"} <= metrics[0].keys()
    assert_same_metrics(out, f"{name}-{kind}", metrics)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_data_parallel_step_is_one_step_on_the_concatenated_batch(out: Path, name: str) -> None:
    assert_close_state(load_file(out / f"{name}-dp.safetensors"), alone(name), TOLERANCE[name])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_data_parallel_rank_holds_the_same_state(out: Path, name: str) -> None:
    ranks = [load_file(out / f"{name}-dp-rank{r}.safetensors") for r in range(2)]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_fully_sharded_step_is_one_step_and_the_data_parallel_one(out: Path, name: str) -> None:
    sharded = load_file(out / f"{name}-fsdp.safetensors")
    assert_close_state(sharded, alone(name), TOLERANCE[name])
    assert_close_state(sharded, load_file(out / f"{name}-dp.safetensors"), TOLERANCE[name])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_sharded_rank_holds_half_the_state(out: Path, name: str) -> None:
    counts = json.loads((out / "counts.json").read_text())
    dp, fsdp = counts[f"{name}-dp"], counts[f"{name}-fsdp"]
    assert dp["local"] == dp["total"]
    shards = [load_file(out / f"{name}-fsdp-rank{r}.safetensors") for r in range(2)]
    kept = assert_halved(load_file(out / f"{name}-fsdp.safetensors"), shards)
    assert fsdp["local"] == (fsdp["total"] - kept) // 2 + kept


def assert_halved(whole: dict[str, torch.Tensor], shards: list[dict[str, torch.Tensor]]) -> int:
    """Every tensor split between the ranks along one dimension (a value embedding table's vocabulary, the
    others' first after the layers), but the step counter and the vectors outside the blocks (final norms,
    skip weights), which each rank keeps whole; how many numbers those are."""
    kept = 0
    for key, tensor in whole.items():
        if tensor.ndim == 0 or (".blocks." not in key and tensor.ndim == 1):
            assert all(torch.equal(shard[key], tensor) for shard in shards), key
            kept += tensor.numel()
        else:  # cut along one dimension, the pieces in rank order
            [dim] = [d for d in range(tensor.ndim) if shards[0][key].shape[d] != tensor.shape[d]]
            assert torch.equal(torch.cat([shard[key] for shard in shards], dim), tensor), key
    return kept


def test_a_sharded_step_under_bf16_autocast_is_the_one_process_step_up_to_bf16_rounding(out: Path) -> None:
    """The blocks' matrices are gathered in bf16 (what autocast would cast them to), everything else in
    float32. bf16 sums in another order move a few near-zero gradients across zero, which AdamW turns into whole
    steps of the learning rate; so the sharded run must be as close to one process under autocast as that run is
    to one in float32: a wrong gather would be orders of magnitude further."""
    module, config = MODELS["gpt"]
    batches = global_batches(config.vocab_size)
    alone = checkpoint.flatten(run_lm(module, config, Parallel(), batches, torch.bfloat16))
    fp32 = checkpoint.flatten(run_lm(module, config, Parallel(), batches))
    sharded = load_file(out / "gpt-fsdp-bf16.safetensors")

    def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return float(
            torch.stack([(a[k] - b[k]).double().norm() for k in a if k.startswith("params.")]).norm()
        )

    assert distance(sharded, alone) <= distance(alone, fp32), (
        distance(sharded, alone),
        distance(alone, fp32),
    )


@cache
def muon_alone() -> dict[str, torch.Tensor]:
    module, config = MODELS["gpt"]
    return checkpoint.flatten(
        run_lm(module, config, Parallel(), global_batches(config.vocab_size), optimizer=MUON)
    )


def test_muon_data_parallel_is_the_one_process_step(out: Path) -> None:
    """Each rank orthogonalises half of every stacked matrix's layers and the ranks share the results: the
    step must still be one process's, with every rank holding the same state, bit for bit."""
    alone = muon_alone()
    assert_close_state(
        load_file(out / "gpt-dp-muon.safetensors"),
        alone,
        kinds=("params.", "opt.m.", "opt.v.", "opt.momentum."),
    )
    ranks = [load_file(out / f"gpt-dp-muon-rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])


def test_a_compiled_data_parallel_muon_update_is_the_one_process_step(out: Path) -> None:
    """``train.compile`` compiles the update in one graph, which now holds Muon's all-gathers: dynamo must
    trace them, and the steps must stay one process's, every rank holding the same bits."""
    kinds = ("params.", "opt.m.", "opt.v.", "opt.momentum.")
    assert_close_state(load_file(out / "gpt-dp-muon-compiled.safetensors"), muon_alone(), kinds=kinds)
    ranks = [load_file(out / f"gpt-dp-muon-compiled-rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])


@pytest.mark.parametrize("kind", ["dp", "fsdp"])
def test_muon_splits_newton_schulz_between_the_ranks(out: Path, kind: str) -> None:
    """Every Newton-Schulz call on either rank takes half of a stacked tensor's 4 layers, once per Muon tensor
    per step: the ranks share the work instead of each doing all of it."""
    module, config = MODELS["gpt"]
    tensors_per_step = len(muon.param_groups(module.init(config, 0), MUON)[0])
    for rank in range(2):
        calls = json.loads((out / f"orthogonalized-{kind}-rank{rank}.json").read_text())
        assert calls == [config.n_layers // 2] * (tensors_per_step * STEPS), (rank, calls)


def test_each_matrix_is_the_whole_stack_done_at_once_for_any_number_of_layers(out: Path) -> None:
    """``Parallel.each_matrix`` on stacks of 1, 3 and 4 matrices over 2 ranks, data parallel and sharded: each
    rank's piece equals its piece of orthogonalising the whole stack in one call (float32 rounding apart)."""
    for rank in range(2):
        errors = json.loads((out / f"each-matrix-rank{rank}.json").read_text())
        assert sorted(errors) == [f"{kind}-{n}" for kind in ("dp", "fsdp") for n in (1, 3, 4)]
        assert max(errors.values()) <= 1e-6, (rank, errors)


def test_muon_fully_sharded_is_the_one_process_step(out: Path) -> None:
    """Each rank holds half the rows of every matrix and its momentum; Muon orthogonalises whole matrices, so the
    sharded update must gather them: orthogonalising each rank's half alone gives another update entirely."""
    alone = muon_alone()
    assert any(key.startswith("opt.momentum.") for key in alone)
    sharded = load_file(out / "gpt-fsdp-muon.safetensors")
    assert_close_state(sharded, alone, kinds=("params.", "opt.m.", "opt.v.", "opt.momentum."))
    assert_halved(sharded, [load_file(out / f"gpt-fsdp-muon-rank{r}.safetensors") for r in range(2)])


def test_a_sharded_rank_holds_one_block_whole_at_a_time(out: Path) -> None:
    """Each block is freed when the next starts and gathered again for its backward, so a 4-layer model is
    never whole on a rank: at most the parameters outside the blocks and two blocks (the one computing and the
    one gathered for the backward next), where keeping the gathered blocks would hold all four."""
    for rank in range(2):
        held = json.loads((out / f"held-rank{rank}.json").read_text())
        assert held["outside"] + held["block"] <= held["peak"] <= held["outside"] + 2 * held["block"], held


def test_a_sharded_forward_keeps_no_copy_of_a_blocks_weights_for_the_backward(out: Path) -> None:
    """Freeing a block's gathered tensors frees its weights only if autograd saved those tensors themselves: a
    product of joined q/k/v (or gate/up) weights saves their copy, which kept every layer's until the
    backward (a GPT's q/k/v, a quarter of each block; two thirds of a Llama's). Over two tokens the activations
    are a small part of a block."""
    for rank in range(2):
        for name, kept in json.loads((out / f"kept-rank{rank}.json").read_text()).items():
            assert kept["kept"] < kept["block"] / 4, (name, kept)


def test_the_other_ranks_wait_for_rank_0_longer_than_a_collective(tmp_path: Path) -> None:
    """Rank 0 alone prepares a corpus (``rank_0_first``) or makes DPO's pairs (``from_rank_0``), which can take
    hours, while the others wait; in the collectives' group they would fail at its timeout (30 minutes) with
    the backend's error. Here that timeout is a second and rank 0 works for two; the waiting group's is 24 hours
    (read back: the default, were it not given, would be the collectives' 30 minutes)."""
    done = torchrun("tests/integration/waits_for_rank_0.py", tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        got = json.loads((tmp_path / f"waited-rank{rank}.json").read_text())
        assert got == [f"made by rank {rank}", "made by rank 0", 2.0, True]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_checkpoint_saved_by_two_sharded_ranks_loads_on_two_and_on_one(out: Path, optimizer: str) -> None:
    run = out / ("run" if optimizer == "adamw" else "run-muon")
    assert all(json.loads((run / f"reloaded-rank{r}.json").read_text())["equal"] for r in range(2))
    module, config = MODELS["gpt"]
    template = init_state(module.init(config, 0), MUON if optimizer == "muon" else None)
    loaded = checkpoint.load_state(checkpoint.latest(run), template)
    written = load_file(
        out / ("gpt-fsdp.safetensors" if optimizer == "adamw" else "gpt-fsdp-muon.safetensors")
    )
    assert checkpoint.flatten(loaded).keys() == written.keys()
    for key, tensor in checkpoint.flatten(loaded).items():
        assert torch.equal(tensor, written[key]), key


def test_data_parallel_dpo_is_one_step_on_all_pairs(out: Path) -> None:
    metrics: list[dict[str, float]] = []
    alone = checkpoint.flatten(run_dpo(Parallel(), dpo_batches(), metrics))
    assert_close_state(load_file(out / "dpo-dp.safetensors"), alone)
    assert_same_metrics(out, "dpo", metrics)


@pytest.mark.parametrize("every_rank_trains", [False, True])
def test_data_parallel_grpo_is_one_step_on_every_ranks_rollout_with_the_same_metrics(
    out: Path, every_rank_trains: bool
) -> None:
    """Rank 0 keeps no group (its answers tie) and steps on zero gradients while rank 1 trains; or both train,
    on answers of different token counts; with a KL penalty. Every rank reports the one-process step's metrics,
    whichever path built its own."""
    state, metrics = run_grpo(Parallel(), grpo_rollout(every_rank_trains))
    name = "grpo-every-rank" if every_rank_trains else "grpo"
    assert_close_state(load_file(out / f"{name}-dp.safetensors"), checkpoint.flatten(state))
    assert_same_metrics(out, name, [metrics])


def test_data_parallel_grpo_with_muon_splits_newton_schulz_on_every_rank(out: Path) -> None:
    """Rank 0 keeps no group and steps on zero gradients, but it must still take its share of Newton-Schulz and
    its all-gather, as rank 1 does (the step passed no layout to Muon, so each rank did all of it)."""
    state, _ = run_grpo(Parallel(), grpo_rollout(False), MUON)
    kinds = ("params.", "opt.m.", "opt.v.", "opt.momentum.")
    assert_close_state(load_file(out / "grpo-muon-dp.safetensors"), checkpoint.flatten(state), kinds=kinds)
    module, config = POLICY
    tensors_per_step = len(muon.param_groups(module.init(config, 0), MUON)[0])
    for rank in range(2):
        calls = json.loads((out / f"orthogonalized-grpo-rank{rank}.json").read_text())
        assert calls == [config.n_layers // 2] * (tensors_per_step * STEPS), (rank, calls)


def test_a_stop_any_rank_sees_is_a_stop_for_every_rank(out: Path) -> None:
    """``Parallel.agree`` is the loop's stop decision: a SIGTERM only rank 1 received (a scheduler, ``kill PID``)
    must stop rank 0 after the same step, or rank 0 waits in the next all-reduce until gloo times out."""
    for rank in range(2):
        assert json.loads((out / f"agree-rank{rank}.json").read_text()) == [True, False, True]


def test_a_write_that_fails_on_rank_0_alone_stops_every_rank_there(out: Path) -> None:
    """Only rank 0 writes the run's records; when that fails (a full disk), rank 0 raises its error and the
    others a ``RunFailedError`` at once (starting the session: exit 1 without a word, rank 0 says why), where
    they used to go on to the next collective and die there with gloo's "Connection closed by peer"."""
    said = [json.loads((out / f"rank-0-write-fails-rank{rank}.json").read_text()) for rank in range(2)]
    assert said[0] == {
        "record": "nothing",
        "record-failing": "OSError: [Errno 28] No space left on device",
        "start-failing": "SystemExit: 1",
        "after": "true",
    }
    assert said[1] == {
        "record": "nothing",
        "record-failing": "RunFailedError: rank 0 could not write the run's metrics",
        "start-failing": "SystemExit: 1",
        "after": "true",
    }
