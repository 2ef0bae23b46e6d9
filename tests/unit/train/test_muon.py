"""Functional Muon against torch.optim.Muon, Newton-Schulz against its scalar polynomial, groups and specs."""

import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict, TensorDictBase

from zmaj import checkpoint
from zmaj.models import gpt
from zmaj.models.lora import LoraConfig, init_adapters
from zmaj.specfile import SpecError
from zmaj.train import muon, optim, precision, step
from zmaj.train.parallel import Parallel
from zmaj.train.spec import PretrainSpec, parse

CONFIG = gpt.GPTConfig(vocab_size=40, context=16, d_model=16, n_layers=2, n_heads=2)


class Float32Torch(types.ModuleType):
    """``torch`` as torch.optim.Muon's module sees it, except that ``torch.bfloat16`` is float32: its
    Newton-Schulz casts to bfloat16, and this runs torch's own code in float32, the precision compared here."""

    bfloat16 = torch.float32

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)


def parts() -> TensorDict:
    """A tall and a wide matrix, a stack of 3 matrices under ``blocks`` (batch size 3), and a bias for AdamW."""
    generator = torch.Generator().manual_seed(0)
    blocks = TensorDict({"w": torch.randn(3, 12, 20, generator=generator)}, batch_size=[3])
    return TensorDict(
        {
            "tall": torch.randn(24, 8, generator=generator),
            "wide": torch.randn(8, 24, generator=generator),
            "blocks": blocks,
            "bias": torch.randn(8, generator=generator),
        }
    )


def matrices_of(td: TensorDict) -> dict[str, torch.Tensor]:
    """The matrices of ``parts()``, each layer of the stack on its own, as torch.optim.Muon sees them."""
    return {"tall": td["tall"], "wide": td["wide"]} | {
        f"blocks.w.{i}": td["blocks", "w"][i] for i in range(3)
    }


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_matches_torch_over_20_steps(
    monkeypatch: pytest.MonkeyPatch, nesterov: bool, adjust_lr: str
) -> None:
    """Each matrix, and each layer of the stack as its own parameter, against torch.optim.Muon; an embedding
    (decayed) and the bias (not) against torch.optim.AdamW at the AdamW group's learning rate and weight decay,
    which the schedule scales as it scales Muon's."""
    monkeypatch.setattr(torch.optim._muon, "torch", Float32Torch("torch"))
    config = muon.MuonConfig(
        kind="muon",
        lr=0.02,
        momentum=0.9,
        nesterov=nesterov,
        adjust_lr=adjust_lr,
        ns_dtype="float32",
        weight_decay=0.1,
        grad_clip=None,
        muon_params=["tall", "wide", "blocks.w"],
        adamw=optim.AdamWGroup(lr=3e-3, weight_decay=0.05),
    )
    params = parts()
    params["embed"] = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    reference = {name: torch.nn.Parameter(t.clone()) for name, t in matrices_of(params).items()}
    bias = torch.nn.Parameter(params["bias"].clone())
    embed = torch.nn.Parameter(params["embed"].clone())
    torch_muon = torch.optim.Muon(
        list(reference.values()),
        lr=0.02,
        weight_decay=0.1,
        momentum=0.9,
        nesterov=nesterov,
        adjust_lr_fn=adjust_lr,
    )
    torch_adamw = torch.optim.AdamW(
        [{"params": [embed], "weight_decay": 0.05}, {"params": [bias], "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
    )
    state = muon.muon_init(params, config)
    decay = optim.decay_mask(params)
    generator = torch.Generator().manual_seed(1)
    for index in range(20):
        factor = 1 - index / 40  # a decaying schedule
        grads = params.apply(lambda t: torch.randn(t.shape, generator=generator))
        assert grads is not None
        params, state = muon.muon_update(params, grads, state, config, 0.02 * factor, decay)
        torch_muon.param_groups[0]["lr"] = 0.02 * factor
        for group in torch_adamw.param_groups:
            group["lr"] = 3e-3 * factor
        for name, g in matrices_of(grads).items():
            reference[name].grad = g
        bias.grad, embed.grad = grads["bias"], grads["embed"]
        torch_muon.step()
        torch_adamw.step()
    ours = matrices_of(params)
    for name, p in reference.items():
        relative = (ours[name] - p.detach()).abs().max() / p.detach().abs().max()
        assert relative <= 1e-5, (name, float(relative))
    torch.testing.assert_close(params["bias"], bias.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(params["embed"], embed.detach(), atol=1e-6, rtol=1e-6)
    assert int(state["step"]) == 20


def scalar_iteration(s: np.ndarray, steps: int) -> np.ndarray:
    """What Newton-Schulz does to each singular value: the quintic, ``steps`` times."""
    a, b, c = muon.NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


BAND = (0.68, 1.21)
"""Where 5 steps of the quintic put every singular value that starts at least ``SMALLEST`` of the Frobenius
norm (``scalar_iteration`` on a fine grid of [0.0016, 1]: min 0.682, max 1.202; from 0.01 up the max is 1.134)."""
SMALLEST = 0.0016


@st.composite
def matrices(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch (0-2 leading dims) of full-rank matrices, tall, wide or square, built as ``U diag(s) V^T`` with
    singular values within a factor 50 of each other: returns the matrices and ``U``, ``s``, ``V``."""
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(*batch, rows, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(*batch, cols, k, generator=generator, dtype=torch.float64))
    s = 1 + 49 * torch.rand(*batch, k, generator=generator, dtype=torch.float64)
    return (u * s.unsqueeze(-2)) @ v.mT, u, s, v


@given(matrices())
def test_newton_schulz_applies_the_quintic_to_each_singular_value(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """In float64, the output is ``U diag(p(s / |s|)) V^T``: singular vectors kept, each singular value
    mapped by the scalar iteration; in float32 every singular value lies in ``BAND``."""
    x, u, s, v = case
    normalised = s / s.norm(dim=-1, keepdim=True)  # the Frobenius norm is that of the singular values
    assert normalised.min() >= 1 / (50 * 40**0.5) > SMALLEST
    expected = (u * torch.from_numpy(scalar_iteration(normalised.numpy(), 5)).unsqueeze(-2)) @ v.mT
    torch.testing.assert_close(muon.orthogonalize(x, 5, torch.float64), expected, atol=1e-9, rtol=1e-9)
    singular = torch.linalg.svdvals(muon.orthogonalize(x.float(), 5))
    assert singular.min() >= BAND[0], singular.min()
    assert singular.max() <= BAND[1], singular.max()


def test_the_band_is_what_the_quintic_promises() -> None:
    """``BAND`` is the scalar iteration's range over [SMALLEST, 1], so the property above tests a true claim."""
    grid = np.geomspace(SMALLEST, 1, 100_001)
    out = scalar_iteration(grid, 5)
    assert BAND[0] <= out.min() < BAND[0] + 0.01
    assert BAND[1] - 0.01 < out.max() <= BAND[1]


def test_stacked_matrices_are_orthogonalised_each_on_its_own() -> None:
    x = torch.randn(4, 12, 20, generator=torch.Generator().manual_seed(0))
    batched = muon.orthogonalize(x)
    for i in range(4):
        torch.testing.assert_close(batched[i], muon.orthogonalize(x[i]), atol=1e-6, rtol=1e-5)


def muon_config(**fields: object) -> muon.MuonConfig:
    return muon.MuonConfig.model_validate({"kind": "muon", **fields})


def test_default_groups_give_muon_the_block_matrices_and_adamw_the_rest() -> None:
    params = gpt.init(CONFIG, seed=0, device="meta")
    taken, rest = muon.param_groups(params, muon_config())
    names = {".".join(k) for k in taken}
    assert names == {f"blocks.attn.{p}.weight" for p in "qkvo"} | {
        "blocks.mlp.up.weight",
        "blocks.mlp.down.weight",
    }
    assert {".".join(k) for k in rest} >= {
        "embed.weight",
        "positions.weight",
        "blocks.attn.q.bias",
        "final_norm.weight",
    }
    assert len(taken) + len(rest) == len(list(params.keys(True, True)))


def pretrain_spec(optimizer: dict[str, object], **train: object) -> dict[str, object]:
    """A tiny pre-training spec, as YAML would give it, with ``optimizer`` as its ``train.optimizer``."""
    return {
        "name": "tiny",
        "model": CONFIG.model_dump() | {"vocab_size": 300},
        "data": {"vocab_size": 300, "seq_len": 16},
        "train": {"steps": 1, "batch_size": 2, "optimizer": optimizer, **train},
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"muon_params": ["blocks.attn_norm.*"]}, "blocks.attn_norm.weight (shape [2, 16]) is not a matrix"),
        ({"adamw_params": ["embed.*", "positions.*"]}, "parameter blocks.attn_norm.weight is in no group"),
        ({"muon_params": ["blocks.atn.*.weight"]}, "'blocks.atn.*.weight' matches no parameter"),
        ({"muon_params": [], "adamw_params": ["*"]}, "kind muon, but no parameter is Muon's"),
        # The path of the spec's field: pydantic puts the union's tag (muon) in it, which no spec spells.
        ({"adamw": {"betas": [1.0, 0.95]}}, "spec.yaml: train.optimizer.adamw.betas.0:"),
        ({"lr": float("inf")}, "spec.yaml: train.optimizer.lr: Input should be a finite number"),
    ],
)
def test_bad_groups_are_refused_at_spec_validation_naming_the_parameter(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(SpecError) as error:
        parse(PretrainSpec, pretrain_spec({"kind": "muon", **fields}), "spec.yaml")
    assert message in str(error.value)
    assert len(str(error.value).splitlines()) == 1


def test_lora_adapters_under_muon_are_refused_not_left_to_adamw() -> None:
    """LoRA's adapters are no ``blocks`` matrices: by default Muon would take none and AdamW all, silently."""
    adapters = init_adapters(gpt.init(CONFIG, 0), LoraConfig(rank=2, targets=("attn.q", "attn.v")))
    with pytest.raises(ValueError, match=r"no parameter is Muon's .* these are attn\.q\.a, attn\.q\.b"):
        muon.check_groups(adapters, muon_config())


def test_an_adamw_section_left_in_an_adamw_optimizer_is_named_where_it_is() -> None:
    """The union's tag (adamw) is then also a key of the section: only the tag is left out of the path."""
    with pytest.raises(SpecError) as error:
        parse(PretrainSpec, pretrain_spec({"lr": -1.0, "adamw": {"lr": 0.001}}), "spec.yaml")
    assert "train.optimizer.lr: Input should be greater than 0" in str(error.value)
    assert "train.optimizer.adamw: Extra inputs are not permitted" in str(error.value)


@pytest.mark.parametrize("betas", [(1.0, 0.95), (0.9, 1.0), (-0.5, 0.95)])
def test_adamw_betas_outside_0_1_are_refused(betas: tuple[float, float]) -> None:
    """torch.optim.AdamW refuses them; at 1 the bias correction divides by zero and the first step is NaN."""
    with pytest.raises(SpecError, match=r"spec\.yaml: train\.optimizer\.betas\.[01]:"):
        parse(PretrainSpec, pretrain_spec({"lr": 0.01, "betas": list(betas)}), "spec.yaml")


def test_a_partial_adamw_group_keeps_muons_defaults_for_what_it_leaves_out() -> None:
    """Built from its own defaults, ``adamw: {lr: ...}`` switched on AdamWGroup's weight decay of 0.1."""
    spec = parse(PretrainSpec, pretrain_spec({"kind": "muon", "adamw": {"lr": 3e-3}}), "spec.yaml")
    assert isinstance(spec.train.optimizer, muon.MuonConfig)
    assert spec.train.optimizer.adamw == optim.AdamWGroup(lr=3e-3, weight_decay=0.0)
    assert muon.MuonConfig(kind="muon").adamw == optim.AdamWGroup(lr=1e-3, weight_decay=0.0)


def test_an_adamw_spec_without_kind_parses_as_before_and_muon_may_be_sharded() -> None:
    spec = parse(PretrainSpec, pretrain_spec({"lr": 0.01, "weight_decay": 0.0}), "spec.yaml")
    assert spec.train.optimizer == optim.AdamWConfig(lr=0.01, weight_decay=0.0)
    assert isinstance(
        parse(PretrainSpec, pretrain_spec({"kind": "muon"}), "spec.yaml").train.optimizer, muon.MuonConfig
    )
    # Refused before Muon gathered its updates whole.
    sharded = pretrain_spec({"kind": "muon"}, parallel={"kind": "fsdp"})
    assert parse(PretrainSpec, sharded, "spec.yaml").train.parallel.kind == "fsdp"
    with pytest.raises(SpecError, match="sgd"):
        parse(PretrainSpec, pretrain_spec({"kind": "sgd"}), "spec.yaml")


def gpt_state_and_grads() -> tuple[TensorDict, TensorDict, muon.MuonConfig, TensorDict]:
    """A tiny GPT's Muon state after one step (non-zero momentum and moments) and fresh gradients."""
    config = muon_config(lr=0.02, weight_decay=0.1, grad_clip=0.5)
    params = gpt.init(CONFIG, seed=0)
    state = step.init_state(params, config)
    decay = optim.decay_mask(params)
    generator = torch.Generator().manual_seed(0)

    def noise() -> TensorDict:
        grads = params.apply(lambda t: torch.randn(t.shape, generator=generator))
        assert isinstance(grads, TensorDict)
        return grads

    state, _ = step.apply_grads(state, noise(), config, 0.02, decay)
    return state, noise(), config, decay


def test_a_donated_muon_update_equals_the_pure_one_and_reuses_the_buffers() -> None:
    state, grads, config, decay = gpt_state_and_grads()
    pure, pure_norm = step.apply_grads(state, grads.clone(), config, 0.02, decay)
    given = state.clone()
    donated, norm = step.apply_grads(given, grads, config, 0.02, decay, donate=True)
    assert torch.equal(norm, pure_norm)
    assert (donated == pure).all()
    assert list(donated["params"].keys(True, True)) == list(state["params"].keys(True, True))
    for key in state.keys(True, True):
        if key[-1] != "step":
            assert donated.get(key).data_ptr() == given.get(key).data_ptr(), key


@dataclass(frozen=True)
class Recording(Parallel):
    """One process that records the dtype of each tensor it is asked to gather."""

    gathered: list[torch.dtype] = field(default_factory=list)

    def whole(self, td: TensorDictBase, key: tuple[str, ...], tensor: torch.Tensor) -> torch.Tensor:
        self.gathered.append(tensor.dtype)
        return tensor


def test_muon_gathers_updates_in_the_newton_schulz_precision_and_steps_in_the_parameters() -> None:
    """A bf16 gather moves half the bytes of a float32 one; since Newton-Schulz casts first, the parameters
    move exactly as the textbook step with the orthogonalisation in bf16 says (torch.optim.Muon's order, by
    hand)."""
    state, grads, config, decay = gpt_state_and_grads()
    config = config.model_copy(update={"ns_dtype": "bfloat16"})
    recording = Recording()
    new, _ = muon.muon_update(state["params"], grads, state["opt"], config, 0.02, decay, parallel=recording)
    keys = optim.leaf_keys(state["opt", "momentum"])
    assert recording.gathered == [torch.bfloat16] * len(keys)
    for key in keys:
        p, b, g = state["params"].get(key), state["opt", "momentum"].get(key), grads.get(key)
        b = b.lerp(g, 1 - config.momentum)
        direction = muon.orthogonalize(g.lerp(b, config.momentum), config.ns_steps, torch.bfloat16)
        scale = muon.lr_scale(p.shape, config.adjust_lr)
        expected = p * (1 - 0.02 * config.weight_decay) - 0.02 * scale * direction
        assert new.get(key).dtype == torch.float32
        assert torch.equal(new.get(key), expected), key


def test_the_muon_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    state, _, config, _ = gpt_state_and_grads()
    folder = checkpoint.save(tmp_path, state, {})
    loaded = checkpoint.load_state(folder, step.init_state(gpt.init(CONFIG, seed=1), config))
    assert (loaded == state).all()
    assert "momentum.blocks.attn.q.weight" in checkpoint.load_tensors(folder, checkpoint.OPTIMIZER)
    with pytest.raises(ValueError, match="missing tensors"):  # an AdamW state cannot take it
        checkpoint.load_state(folder, step.init_state(gpt.init(CONFIG, seed=1)))


COMPILED_UPDATE = """
import torch
from zmaj.models import gpt
from zmaj.train import muon, optim, step

config = gpt.GPTConfig(vocab_size=40, context=16, d_model=16, n_layers=2, n_heads=2)
params = gpt.init(config, seed=0)
muon_config = muon.MuonConfig(kind="muon", weight_decay=0.1, grad_clip=0.5, ns_dtype="float32")
decay = optim.decay_mask(params)
_, update = step.step_functions(compile=True)  # the update is one graph (fullgraph), or an error
eager, compiled = step.init_state(params, muon_config), step.init_state(params.clone(), muon_config)
generator = torch.Generator().manual_seed(0)
for i, lr in enumerate((0.02, 0.015, 0.01)):
    grads = params.apply(lambda t: torch.randn(t.shape, generator=generator))
    eager, eager_norm = step.apply_grads(eager, grads.clone(), muon_config, lr, decay)
    with torch._dynamo.config.patch(error_on_recompile=i >= 1):
        compiled, norm = update(compiled, grads, muon_config, lr, decay)
    torch.testing.assert_close(norm, eager_norm)
    for key in eager.keys(True, True):
        torch.testing.assert_close(compiled.get(key), eager.get(key), atol=1e-5, rtol=1e-5)
"""


@pytest.mark.slow
def test_a_compiled_muon_update_equals_the_eager_one() -> None:
    """The compiled update of ``step_functions(compile=True)`` with Muon: one graph, the eager values, and a
    new learning rate each step compiles nothing after the first. In a fresh interpreter, as
    ``test_step.test_a_compiled_step_equals_the_eager_step`` is, for the same reason."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_UPDATE], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_auto_newton_schulz_runs_in_bfloat16_only_where_its_matmuls_are_fast(
    monkeypatch: pytest.MonkeyPatch, fast_bf16: bool
) -> None:
    """``ns_dtype: auto`` follows precision ``auto``: a CPU without bf16 instructions would emulate them, ~100x
    slower; an explicit choice holds on any CPU."""
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: fast_bf16)
    monkeypatch.setattr(precision, "cuda_has_fast_bf16", lambda index: True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert muon.newton_schulz_dtype("auto", cpu) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert muon.newton_schulz_dtype("auto", cuda) == torch.bfloat16
    assert muon.newton_schulz_dtype("float32", cuda) == torch.float32
    assert muon.newton_schulz_dtype("bfloat16", cpu) == torch.bfloat16


def test_muon_steps_on_gradients_clipped_over_every_parameter() -> None:
    """One clip over all parameters, Muon's matrices too (``apply_grads``): the same as ``muon_update`` on
    gradients clipped by hand. Two steps of different gradient norms, so that the momentum sees the clip (a
    first step alone is orthogonalised whatever its scale)."""
    config = muon.MuonConfig(
        kind="muon", grad_clip=0.5, ns_dtype="float32", muon_params=["tall", "wide", "blocks.w"]
    )
    params = parts()
    decay = optim.decay_mask(params)
    state = step.init_state(params, config)
    expected, moments = params, muon.muon_init(params, config)
    generator = torch.Generator().manual_seed(0)
    for scale in (10.0, 0.1):
        grads = params.clone()
        for key in params.keys(True, True):
            grads.set(key, torch.randn(params.get(key).shape, generator=generator) * scale)
        state, _ = step.apply_grads(state, grads, config, 0.02, decay)
        clipped = optim.clip_by_global_norm(grads, 0.5, optim.global_norm(grads))
        expected, moments = muon.muon_update(expected, clipped, moments, config, 0.02, decay)
    for key in expected.keys(True, True):
        torch.testing.assert_close(state["params"].get(key), expected.get(key), atol=1e-6, rtol=1e-6)


def test_muons_adamw_group_passes_decay_norms_and_biases_on() -> None:
    config = muon.MuonConfig.model_validate({"kind": "muon", "adamw": {"decay_norms_and_biases": True}})
    assert config.decay_norms_and_biases is True


def test_an_all_zero_update_stays_zero_not_nan() -> None:
    """A matrix whose gradient and momentum are zero (an unused block, a layer cut off from the loss) is 0 / 0
    without the norm's floor: NaN, which would poison its weights."""
    zeros = torch.zeros(2, 4, 3)
    assert torch.equal(muon.orthogonalize(zeros), zeros)
