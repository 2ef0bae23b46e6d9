"""The attention backends compute one function (``auto`` picks one), which has the properties it must."""

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from einops import einsum
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch.nn.attention.flex_attention import BlockMask

from tests import strategies
from zmaj.nn import masks
from zmaj.nn.attention import (
    FORMULA_MAX_KEYS,
    Backend,
    attention,
    cached_attention,
    choose_backend,
    eager_attention,
    flex,
    prepare_mask,
    self_attention,
    single_query_attention,
)

BACKENDS: list[Backend] = ["eager", "sdpa", "flex"]


def run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mod: masks.MaskMod | None, backend: Backend
) -> torch.Tensor:
    """Attention through ``backend``; flex runs uncompiled here (same semantics, no 30 s compile per shape)."""
    batch, _, seq, _ = q.shape
    mask = prepare_mask(mod, batch, seq, k.shape[2], backend, q.device)
    if backend == "flex":
        assert isinstance(mask, BlockMask)
        return flex(q, k, v, mask, q.shape[-1] ** -0.5, compiled=False)
    return attention(q, k, v, mask, backend)


Problem = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.device], masks.MaskMod | None]]
"""q, k and v on the CPU, and the mask as a function of the device (its mods hold tensors)."""


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    batch, heads, kv_heads, seq, head_dim = draw(strategies.attention_shapes())
    generator = torch.Generator().manual_seed(draw(strategies.seeds))
    q = torch.randn(batch, heads, seq, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq, head_dim, generator=generator)
    kind = draw(st.sampled_from(["causal", "window", "document", "padding"]))
    window = draw(st.integers(1, 8)) if kind == "window" else None
    ids = draw(strategies.document_ids(batch, seq)) if kind == "document" else None
    lengths = draw(strategies.lengths(batch, seq)) if kind == "padding" else None

    def mod(device: torch.device) -> masks.MaskMod | None:
        if window is not None:
            return masks.sliding_window(window)
        if ids is not None:
            return masks.combine(masks.causal, masks.document(ids.to(device)))
        if lengths is not None:
            return masks.combine(
                masks.causal, masks.padding(masks.lengths_to_is_token(lengths.to(device), seq))
            )
        return None

    return q, k, v, mod


def on(
    problem: Problem, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, masks.MaskMod | None]:
    """The problem's tensors and mask on ``device``."""
    q, k, v, mod = problem
    return q.to(device), k.to(device), v.to(device), mod(device)


@given(problems())
def test_backends_agree(device: torch.device, problem: Problem) -> None:
    q, k, v, mod = on(problem, device)
    reference = run(q, k, v, mod, "eager")
    for backend in ("sdpa", "flex"):
        torch.testing.assert_close(run(q, k, v, mod, backend), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len", [1, 3, 5])
def test_without_a_mask_every_backend_puts_the_queries_last(device: torch.device, q_len: int) -> None:
    """Plain causal attention of fewer queries than keys: the queries are the last positions in every backend
    (SDPA's own causal kernel would align them with the first keys)."""
    generator = torch.Generator().manual_seed(q_len)
    q = torch.randn(2, 4, q_len, 8, generator=generator).to(device)
    k, v = (torch.randn(2, 2, 5, 8, generator=generator).to(device) for _ in range(2))
    offset = masks.offset_queries(masks.causal, 5 - q_len)
    reference = eager_attention(q, k, v, masks.dense(offset, 2, q_len, 5, device), 8**-0.5)
    for backend in ("eager", "sdpa", "flex"):
        torch.testing.assert_close(run(q, k, v, None, backend), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("device", "dtype", "k_len", "compiling", "grad", "expected"),
    [
        ("cpu", torch.bfloat16, FORMULA_MAX_KEYS, True, True, "eager"),
        ("cpu", torch.float16, 64, True, True, "eager"),
        ("cpu", torch.bfloat16, FORMULA_MAX_KEYS + 1, True, True, "sdpa"),
        ("cpu", torch.float32, 64, True, True, "sdpa"),
        ("cpu", torch.bfloat16, 64, False, True, "sdpa"),
        ("cpu", torch.bfloat16, 64, True, False, "sdpa"),
        ("cuda", torch.bfloat16, 64, True, True, "sdpa"),
    ],
)
def test_auto_runs_the_formula_only_where_it_measured_faster(
    device: str, dtype: torch.dtype, k_len: int, compiling: bool, grad: bool, expected: str
) -> None:
    """Compiled training, 16-bit, on a CPU, over few keys: the formula; elsewhere SDPA. Named ones pass."""
    assert choose_backend("auto", torch.device(device), dtype, k_len, compiling, grad) == expected
    for backend in BACKENDS:
        assert choose_backend(backend, torch.device(device), dtype, k_len, compiling, grad) == backend


@settings(max_examples=20)
@given(problems())
def test_flex_gradients_equal_eager_gradients(device: torch.device, problem: Problem) -> None:
    """What training with ``attention: flex`` differentiates; PyTorch has no flex backward on the CPU."""
    if device.type == "cpu":
        pytest.skip("flex-attention has no backward pass on the CPU")
    q, k, v, mod = on(problem, device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(device)

    def grads(backend: Backend) -> tuple[torch.Tensor, ...]:
        leaf_q, leaf_k, leaf_v = (t.detach().requires_grad_() for t in (q, k, v))
        out = run(leaf_q, leaf_k, leaf_v, mod, backend)
        return torch.autograd.grad(out, (leaf_q, leaf_k, leaf_v), grad_out)

    for flex_grad, eager_grad in zip(grads("flex"), grads("eager"), strict=True):
        torch.testing.assert_close(flex_grad, eager_grad, atol=1e-5, rtol=1e-5)


def test_eager_attention_is_the_textbook_formula(device: torch.device) -> None:
    """One head, no grouping: softmax(q k^T / sqrt(d) + causal bias) v, written out by hand."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 5, 4, generator=generator).to(device) for _ in range(3))
    scores = q[0, 0] @ k[0, 0].T / 2.0
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool, device=device).triu(1), float("-inf"))
    expected = torch.softmax(scores, -1) @ v[0, 0]
    torch.testing.assert_close(attention(q, k, v, None, "eager")[0, 0], expected)


@given(problems(), st.sampled_from(BACKENDS), st.data())
def test_masked_out_keys_never_change_the_output(
    device: torch.device, problem: Problem, backend: Backend, data: st.DataObject
) -> None:
    q, k, v, mod = on(problem, device)
    batch, _, seq, _ = q.shape
    changed = torch.tensor(data.draw(st.lists(st.booleans(), min_size=seq, max_size=seq)), device=device)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, changed] = 1e3 * torch.randn_like(k2[:, :, changed])
    v2[:, :, changed] = 1e3 * torch.randn_like(v2[:, :, changed])
    allowed = masks.dense(mod or masks.causal, batch, seq, seq, device)
    untouched = ~(allowed & changed).any(-1)  # queries that may not see any changed key
    before, after = run(q, k, v, mod, backend), run(q, k2, v2, mod, backend)
    torch.testing.assert_close(after.transpose(1, 2)[untouched], before.transpose(1, 2)[untouched])


@given(problems(), st.sampled_from(BACKENDS), strategies.seeds)
def test_permuting_heads_permutes_outputs(
    device: torch.device, problem: Problem, backend: Backend, seed: int
) -> None:
    q, k, v, mod = on(problem, device)
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    generator = torch.Generator().manual_seed(seed)
    kv_perm = torch.randperm(kv_heads, generator=generator)
    # A query head may move anywhere inside the group that shares its key/value head, and groups move together.
    q_perm = torch.cat([kv * group + torch.randperm(group, generator=generator) for kv in kv_perm.tolist()])
    q_perm, kv_perm = q_perm.to(device), kv_perm.to(device)
    out = run(q, k, v, mod, backend)
    permuted = run(q[:, q_perm], k[:, kv_perm], v[:, kv_perm], mod, backend)
    torch.testing.assert_close(permuted, out[:, q_perm], atol=1e-6, rtol=1e-5)


@given(st.integers(1, 24), st.integers(1, 24), st.sampled_from(BACKENDS), strategies.seeds)
def test_packed_documents_equal_separate_documents(
    device: torch.device, first: int, second: int, backend: Backend, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, first + second, 8, generator=generator).to(device) for _ in range(3))
    ids = torch.cat([torch.zeros(first, dtype=torch.long), torch.ones(second, dtype=torch.long)])[None]
    ids = ids.to(device)
    packed = run(q, k, v, masks.combine(masks.causal, masks.document(ids)), backend)
    alone_first = run(q[:, :, :first], k[:, :, :first], v[:, :, :first], None, backend)
    alone_second = run(q[:, :, first:], k[:, :, first:], v[:, :, first:], None, backend)
    torch.testing.assert_close(packed, torch.cat([alone_first, alone_second], dim=2), atol=1e-5, rtol=1e-5)


def test_self_attention_grouped_query_matches_repeated_heads(device: torch.device) -> None:
    """GQA with 2 kv heads equals plain multi-head attention whose k/v projections repeat each kv head."""
    generator = torch.Generator().manual_seed(0)
    d, heads, kv_heads, head_dim = 16, 4, 2, 4

    def lin(d_out: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.randn(d_out, d, generator=generator) / 4}

    params = TensorDict(
        {"q": lin(d), "k": lin(kv_heads * head_dim), "v": lin(kv_heads * head_dim), "o": lin(d)}
    ).to(device)
    repeated = params.clone()
    for name in ("k", "v"):
        per_head = params[name, "weight"].unflatten(0, (kv_heads, head_dim))
        repeated[name, "weight"] = per_head.repeat_interleave(heads // kv_heads, 0).flatten(0, 1)
    x = torch.randn(2, 7, d, generator=generator).to(device)
    grouped = self_attention(params, x, None, heads, kv_heads, "eager")
    torch.testing.assert_close(grouped, self_attention(repeated, x, None, heads, heads, "eager"))


@pytest.mark.slow
def test_compiled_flex_matches_eager_on_packed_documents(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 256, 32, generator=generator).to(device)
    k, v = (torch.randn(2, 2, 256, 32, generator=generator).to(device) for _ in range(2))
    ids = (torch.arange(256, device=device) // 100).expand(2, 256)
    mod = masks.combine(masks.causal, masks.document(ids))
    compiled = attention(q, k, v, prepare_mask(mod, 2, 256, 256, "flex", device), "flex")
    torch.testing.assert_close(compiled, run(q, k, v, mod, "eager"), atol=1e-5, rtol=1e-5)
    # Soft-capped (Gemma 2): the cap, a tensor the compiled kernel takes as a buffer, against the formula.
    capped = attention(q, k, v, prepare_mask(mod, 2, 256, 256, "flex", device), "flex", softcap=0.5)
    formula = attention(q, k, v, prepare_mask(mod, 2, 256, 256, "eager", device), "eager", softcap=0.5)
    torch.testing.assert_close(capped, formula, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [1 / 8, 1 / 4, 128**-0.5, 0.3])
def test_in_bfloat16_the_output_is_the_bits_of_scaling_the_scores(device: torch.device, scale: float) -> None:
    """``eager_attention`` multiplies q by a power-of-two scale (exact), any other the scores, as
    ``transformers`` does: in bf16 both give the bits of scaling the scores (Qwen 3's head_dim 128 and Gemma's
    query_pre_attn_scalar are not powers of two; q scaled by them rounds otherwise)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 64, generator=generator).to(device, torch.bfloat16) for _ in range(3))
    mask = torch.ones(16, 16, dtype=torch.bool, device=device).tril()[None]
    scores = einsum(q[:, :, None], k, "b kv g q d, b kv k d -> b kv g q k") * scale
    weights = torch.softmax((scores + masks.additive_bias(mask, scores.dtype)[:, None, None]).float(), dim=-1)
    expected = einsum(weights.to(v.dtype), v, "b kv g q k, b kv k d -> b kv g q d")[:, :, 0]
    assert torch.equal(eager_attention(q, k, v, mask, scale), expected)


@given(
    problems(),
    st.sampled_from([None, 0.3]),
    st.sampled_from([torch.float64, torch.bfloat16]),
    st.sampled_from([None, 0.7]),
)
def test_single_query_attention_is_the_formula_for_the_last_query(
    device: torch.device, problem: Problem, scale: float | None, dtype: torch.dtype, softcap: float | None
) -> None:
    """The decode-step form (multiplies and sums) equals the einsum formula for one query row: to rounding in
    float64, bit for bit in bf16 (where the scale's place and each rounding show), with the default scale
    (a power of two or not) and one that is not, soft-capped or not."""
    q, k, v, mod = on(problem, device)
    batch, _, seq, head_dim = q.shape
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = masks.dense(mod or masks.causal, batch, seq, seq, device)[:, -1:]
    scale = head_dim**-0.5 if scale is None else scale
    expected = eager_attention(q[:, :, -1:], k, v, mask, scale, softcap)
    got = single_query_attention(q[:, :, -1:], k, v, mask, scale, softcap)
    if dtype == torch.bfloat16:
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected)


def soft_capped_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Gemma 2's attention written out: every key/value head repeated for its query heads, the scaled scores
    capped at ``cap * tanh(scores / cap)``, masked to -inf, then softmax and the weighted values."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    capped = cap * torch.tanh(scores / cap)
    return torch.softmax(capped.masked_fill(~mask[:, None], float("-inf")), -1) @ v


@given(problems(), st.sampled_from([0.5, 2.0]))
def test_soft_capped_attention_is_the_formula_in_every_backend_that_caps(
    device: torch.device, problem: Problem, cap: float
) -> None:
    """``auto`` (which cannot be SDPA here), the formula, flex with its ``score_mod``, and a cached prefill
    through either: the scores are capped after the scaling and before the mask. Caps of 0.5 and 2 move
    these scores (standard normal q and k) far from the uncapped output."""
    q, k, v, mod = on(problem, device)
    batch, _, seq, _ = q.shape
    mask = masks.dense(mod or masks.causal, batch, seq, seq, device)
    expected = soft_capped_reference(q, k, v, mask, cap)
    scale = q.shape[-1] ** -0.5
    block_mask = prepare_mask(mod, batch, seq, seq, "flex", device)
    assert isinstance(block_mask, BlockMask)
    got = {
        "auto": attention(q, k, v, prepare_mask(mod, batch, seq, seq, "auto", device), "auto", softcap=cap),
        "eager": attention(q, k, v, mask, "eager", softcap=cap),
        "flex": flex(q, k, v, block_mask, scale, compiled=False, softcap=cap),
        "cached auto": cached_attention(q, k, v, mask, "auto", softcap=cap),
        "cached flex": cached_attention(q, k, v, mask, "flex", softcap=cap),
    }
    for name, out in got.items():
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=name)


def test_sdpa_named_with_a_soft_cap_is_refused() -> None:
    """SDPA has no place for the cap; named by the caller, it is an error, never an uncapped result."""
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    mask = torch.ones(1, 4, 4, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="sdpa backend cannot soft-cap"):
        attention(q, k, v, mask, "sdpa", softcap=1.0)
    with pytest.raises(ValueError, match="sdpa backend cannot soft-cap"):
        cached_attention(q, k, v, mask, "sdpa", softcap=1.0)


COMPILED_SINGLE_QUERY = """
import torch
from zmaj.nn.attention import eager_attention, single_query_attention

generator = torch.Generator().manual_seed(0)
for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
    q = torch.randn(2, 6, 1, 16, generator=generator).to(dtype)
    k, v = (torch.randn(2, 3, 40, 16, generator=generator).to(dtype) for _ in range(2))
    mask = torch.rand(2, 1, 40, generator=generator) < 0.7
    mask[..., 0] = True
    for scale in (0.25, 0.3):
        compiled = torch.compile(single_query_attention, fullgraph=True, dynamic=False)
        reference = eager_attention(q.double(), k.double(), v.double(), mask, scale)
        error = (compiled(q, k, v, mask, scale).double() - reference).abs().max().item()
        formula = (eager_attention(q, k, v, mask, scale).double() - reference).abs().max().item()
        assert error <= tolerance and error <= 2 * formula + 1e-6, (dtype, scale, error, formula)
"""


@pytest.mark.slow
def test_compiled_single_query_attention_is_as_accurate_as_the_formula() -> None:
    """Compiled, Inductor keeps bf16 intermediates in float32, so the bits differ from the formula's: the error
    against float64 must stay within the formula's own (and tiny in float32). In a fresh interpreter: the
    runtime shape checker that wraps zmaj under pytest cannot be traced."""
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_SINGLE_QUERY], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


AUTO_UNDER_COMPILE = """
import torch
from zmaj.nn.attention import FORMULA_MAX_KEYS, attention

torch.manual_seed(0)


def output_and_grads(backend, seq, dtype, grad=True):
    torch._dynamo.reset()  # one lambda compiled for every case: a fresh start each time, not a recompile
    q, k, v = (torch.randn(2, 4, seq, 16, dtype=dtype, requires_grad=grad) for _ in range(3))
    fn = torch.compile(lambda q, k, v: attention(q, k, v, None, backend), backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", torch.bfloat16), torch.set_grad_enabled(grad):
        out = fn(q, k, v)
    if not grad:
        return (out,)
    out.float().square().sum().backward()
    return out, q.grad, k.grad, v.grad


cases = [
    (64, torch.bfloat16, True, "eager"),
    (64, torch.float32, True, "eager"),  # autocast's dtype counts: QK-norm hands attention float32 q and k
    (FORMULA_MAX_KEYS + 1, torch.bfloat16, True, "sdpa"),
    (64, torch.bfloat16, False, "sdpa"),  # no backward pass: evaluation, prefill
]
for seq, dtype, grad, expected in cases:
    state = torch.random.get_rng_state()
    chosen = output_and_grads("auto", seq, dtype, grad)
    torch.random.set_rng_state(state)
    named = output_and_grads(expected, seq, dtype, grad)
    torch.random.set_rng_state(state)
    other = output_and_grads("sdpa" if expected == "eager" else "eager", seq, dtype, grad)
    assert all(torch.equal(a, b) for a, b in zip(chosen, named, strict=True)), (seq, dtype, grad, expected)
    assert not torch.equal(chosen[0], other[0]), (seq, dtype, grad, "the backends agree bit for bit here")
"""


def test_auto_under_compile_runs_what_choose_backend_says() -> None:
    """Traced by ``torch.compile`` (``aot_eager``: dynamo and autograd's tracing, no kernels to build) under
    bf16 autocast on the CPU, ``auto`` gives the bits, forward and backward, of the formula over few keys
    (bf16 or float32 inputs), of SDPA over more, and of SDPA without gradients; the other backend's bits
    differ in every case, so the comparison can tell them apart. In a fresh interpreter, as above."""
    done = subprocess.run(
        [sys.executable, "-c", AUTO_UNDER_COMPILE], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
