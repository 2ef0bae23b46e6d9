"""The layout of a state across ranks, without a process group: how rows and tensors are split, what is refused,
and that a model gathers its blocks one layer at a time (the collectives themselves run in
``tests/integration/test_distributed.py``)."""

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict, TensorDictBase

from zmaj.models import gpt, llama
from zmaj.models.common import Batch, layers, materializing
from zmaj.train.parallel import Parallel, ParallelConfig, shard_dim, tensors
from zmaj.train.spec import PretrainSpec, load
from zmaj.train.step import init_state

ROOT = Path(__file__).resolve().parents[3]
GPT = gpt.GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=3, n_heads=2)


@given(st.integers(1, 4), st.integers(1, 5))
def test_the_ranks_shares_of_a_batch_are_its_rows_in_order(size: int, per_rank: int) -> None:
    rows = list(range(size * per_rank))
    shares = [Parallel("dp", rank, size).rows(rows) for rank in range(size)]
    assert [row for share in shares for row in share] == rows
    assert {len(share) for share in shares} == {per_rank}


def test_a_batch_the_ranks_cannot_split_evenly_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"train\.batch_size is 6, which 4 ranks cannot split evenly"):
        Parallel("dp", 0, 4).check_divides(6, "train.batch_size")
    Parallel("dp", 0, 3).check_divides(6, "train.batch_size")


@pytest.mark.parametrize("size", [2, 4])
def test_sharded_pieces_are_cut_after_the_layer_axis_and_join_back_to_the_whole(size: int) -> None:
    state = init_state(gpt.init(GPT, seed=0))
    pieces = [Parallel("fsdp", rank, size).shard(state) for rank in range(size)]
    kept = []
    for key in state.keys(True, True):
        assert isinstance(key, tuple)
        whole, dim = state.get(key), shard_dim(state, key)
        if whole.ndim == 0 or ("blocks" not in key and whole.ndim == 1):  # the step counter, a final norm
            assert dim is None, key
            assert all(torch.equal(p.get(key), whole) for p in pieces)
            kept.append(whole.numel())
            continue
        assert dim == (1 if "blocks" in key else 0), key
        assert torch.equal(torch.cat([p.get(key) for p in pieces], dim), whole), key
    assert len(kept) == 1 + 3 * 2  # the step counter; the final norm's weight and bias, and their moments
    local = sum(t.numel() for t in tensors(pieces[0]))
    assert local == (sum(t.numel() for t in tensors(state)) - sum(kept)) // size + sum(kept)


def test_a_leaf_at_the_top_of_the_tree_is_laid_out_as_any_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """``keys(True, True)`` names a top-level leaf by a string, which ``shard_dim`` took apart letter by letter:
    sharding failed, and a data-parallel all-reduce of the gradients left such a leaf out."""
    td = TensorDict(
        {
            "weight": torch.randn(4, 2),
            "bias": torch.randn(3),
            "blocks": TensorDict({"x": torch.randn(3, 4)}, [3]),
        }
    )
    pieces = [Parallel("fsdp", rank, 2).shard(td) for rank in range(2)]
    assert torch.equal(torch.cat([piece["weight"] for piece in pieces]), td["weight"])
    assert all(
        torch.equal(piece["bias"], td["bias"]) for piece in pieces
    )  # a vector outside the blocks: whole
    Parallel("fsdp", 0, 2).check_shardable(td)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: tensor.mul_(2))
    summed = Parallel("dp", 0, 2).reduce_grads(td)  # the other rank's gradients, here as these again
    for key in ("weight", "bias", ("blocks", "x")):
        assert torch.equal(summed.get(key), 2 * td.get(key)), key


@pytest.mark.parametrize("value_embeds", [0, 1, 2])
@pytest.mark.parametrize("size", [2, 4, 8])
def test_the_default_model_shards_over_2_4_and_8_ranks(size: int, value_embeds: int) -> None:
    """Its 2 U-net skip weights stay whole on every rank (``shard_dim``), and value embedding tables are cut
    along their vocabulary: split, 4 ranks refused the skips, and 2 ranks one table."""
    spec = load(PretrainSpec, ROOT / "specs" / "pretrain" / "stdlib-tiny.yaml", [])  # programs/pretrain.py's
    config = spec.model.model_copy(update={"value_embeds": value_embeds})
    params = gpt.init(config, 0, device="meta")
    assert params["unet_skips", "weight"].shape == (2,)
    assert shard_dim(params, ("unet_skips", "weight")) is None
    if value_embeds:
        assert shard_dim(params, ("value_embeds", "weight")) == 1
    Parallel("fsdp", 0, size).check_shardable(params)


def test_data_parallel_and_one_process_keep_the_state_whole() -> None:
    state = init_state(gpt.init(GPT, seed=0))
    assert Parallel("dp", 1, 2).shard(state) is state
    assert Parallel("fsdp", 0, 1).shard(state) is state


def test_a_model_whose_rows_the_ranks_cannot_split_is_refused_naming_the_parameter() -> None:
    odd = gpt.GPTConfig(vocab_size=64, context=16, d_model=33, n_layers=2, n_heads=3)
    with pytest.raises(
        ValueError, match=r"parameter blocks\.attn_norm\.weight has 33 rows along dimension 1, which 2 ranks"
    ):
        Parallel("fsdp", 0, 2).check_shardable(gpt.init(odd, 0, device="meta"))
    Parallel("dp", 0, 2).check_shardable(gpt.init(odd, 0, device="meta"))  # data parallel keeps them whole


def test_one_process_reduces_nothing() -> None:
    parallel = Parallel()
    value = torch.tensor([1.0, 2.0])
    assert parallel.all_sum(value) is value
    grads = gpt.init(GPT, seed=1)
    assert parallel.reduce_grads(grads) is grads
    assert parallel.agree(True)
    assert not parallel.agree(False)


@pytest.mark.parametrize(
    ("module", "config"),
    [
        (gpt, GPT),
        (llama, llama.LlamaConfig(vocab_size=64, context=16, d_model=32, n_layers=3, n_heads=4, d_ff=48)),
    ],
)
def test_a_model_gathers_each_layer_just_before_it_runs(module: object, config: object) -> None:
    """Within ``materializing``, the forward passes every layer's parameters through the gather once, and the
    walk over the layers is lazy: layer i is gathered when the walk reaches it, not all layers up front."""
    params = module.init(config, seed=0)  # type: ignore[attr-defined]
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    calls: list[int] = []

    def materialize(block: TensorDictBase) -> TensorDictBase:
        calls.append(len(calls))
        return block

    with materializing(materialize):
        logits = module.forward(params, Batch(tokens=tokens), config)  # type: ignore[attr-defined]
    assert calls == [0, 1, 2]
    torch.testing.assert_close(logits, module.forward(params, Batch(tokens=tokens), config), rtol=0, atol=0)  # type: ignore[attr-defined]

    blocks = layers(params["blocks"])
    with materializing(materialize):
        calls.clear()
        next(blocks)
        assert calls == [0]  # lazily: one layer per step of the walk
        next(blocks)
        assert calls == [0, 1]


def test_a_rank_without_a_gpu_of_its_own_is_refused_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torchrun --nproc-per-node 4`` on a 2-GPU machine: rank 3's ``set_device`` was an invalid-ordinal
    traceback on every rank."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="it has 2; start at most 2 processes per machine"):
        Parallel.from_environment(ParallelConfig(), torch.device("cuda"))
