"""The key/value cache: a cached forward pass equals recomputing the whole sequence, whatever the chunking,
padding, window or architecture; and a step never changes the cache it was given unless it is donated."""

import itertools
import subprocess
import sys
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import strategies
from tests.strategies import MODERN_BLOCK
from zmaj.infer.cache import capacity, init_cache, prefix, repeat_rows
from zmaj.models import gemma3, gpt, llama
from zmaj.models.common import Batch, cache_mask, cache_step
from zmaj.nn import masks
from zmaj.nn.attention import Backend, attention, cached_attention
from zmaj.nn.rope import LinearScaling, Llama3Scaling

VOCAB = 64
GPT_TINY = gpt.GPTConfig(vocab_size=VOCAB, context=32, d_model=32, n_layers=2, n_heads=4, init_std=0.1)
LLAMA_TINY = llama.LlamaConfig(
    vocab_size=VOCAB, context=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1
)
# Two local layers with a 5-key window around one global layer: short sequences already cross the window.
GEMMA3_TINY = gemma3.Gemma3Config(
    vocab_size=VOCAB,
    context=32,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=48,
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    sliding_window=5,
    query_pre_attn_scalar=6,
    init_std=0.1,
)
# Random-init norms and biases sit at 1 and 0; moving them off shows a cached path that skips one.
Config = gpt.GPTConfig | llama.LlamaConfig | gemma3.Gemma3Config
MODELS: dict[str, tuple[ModuleType, Config]] = {
    "gpt": (gpt, GPT_TINY),
    "gpt-sinusoidal-rmsnorm-eager": (
        gpt,
        GPT_TINY.model_copy(update={"positions": "sinusoidal", "norm": "rmsnorm", "attention": "eager"}),
    ),
    "gpt-flex": (gpt, GPT_TINY.model_copy(update={"attention": "flex", "tie_embeddings": False})),
    "gpt-modern": (
        gpt,
        GPT_TINY.model_copy(update={**MODERN_BLOCK, "n_layers": 3, "logit_softcap": 2.0, "value_embeds": 1}),
    ),
    "llama-gqa": (llama, LLAMA_TINY),
    "llama-gqa-eager": (llama, LLAMA_TINY.model_copy(update={"attention": "eager"})),
    "llama-mqa": (llama, LLAMA_TINY.model_copy(update={"n_kv_heads": 1})),
    # Llama 3.1-style frequencies, a plane in each of its three regimes (head_dim 8), and linear interpolation: a
    # cached path that dropped the scaling matched nothing else.
    "llama3-scaled": (
        llama,
        LLAMA_TINY.model_copy(
            update={
                "rope_scaling": Llama3Scaling(
                    factor=8, low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=64
                )
            }
        ),
    ),
    "llama-linear": (llama, LLAMA_TINY.model_copy(update={"rope_scaling": LinearScaling(factor=4)})),
    # SmolLM3: a layer without positions, whose cached keys are stored unrotated.
    "smollm3-nope": (llama, LLAMA_TINY.model_copy(update={"rope_layers": (False, True)})),
    # Mistral 7B v0.1's window over every layer, 5 keys here: short sequences already slide it.
    "mistral-window": (llama, LLAMA_TINY.model_copy(update={"sliding_window": 5})),
    "qwen2-bias": (llama, LLAMA_TINY.model_copy(update={"qkv_bias": True})),
    "qwen3-qk-norm": (
        llama,
        LLAMA_TINY.model_copy(update={"head_dim": 12, "qk_norm": True, "tie_embeddings": True}),
    ),
    "gemma3-window": (gemma3, GEMMA3_TINY),
    "gemma3-softcap-eager": (
        gemma3,
        GEMMA3_TINY.model_copy(
            update={"final_logit_softcap": 3.0, "attention": "eager", "tie_embeddings": False}
        ),
    ),
    # Gemma 2: no QK-norm, the scores soft-capped (at 0.1, which these small scores reach) and so never SDPA.
    "gemma2-capped": (
        gemma3,
        GEMMA3_TINY.model_copy(
            update={"qk_norm": False, "attn_logit_softcap": 0.1, "final_logit_softcap": 3.0}
        ),
    ),
}


def model_params(name: str, device: torch.device) -> tuple[ModuleType, Config, object]:
    module, config = MODELS[name]
    params = module.init(config, seed=0, device=device)
    generator = torch.Generator().manual_seed(1)
    for key, tensor in params.items(include_nested=True, leaves_only=True):
        if "norm" in "".join(key) or key[-1] == "bias":
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator).to(device))
    return module, config, params


def random_tokens(rows: int, seq: int, seed: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def full_forward(module: ModuleType, params: object, batch: Batch, config: Config) -> torch.Tensor:
    """The reference: the plain forward pass; flex as eager, since compiled flex would recompile per length."""
    if config.attention == "flex":
        config = config.model_copy(update={"attention": "eager"})
    logits: torch.Tensor = module.forward(params, batch, config)
    return logits


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_every_decode_step_equals_the_full_forward(device: torch.device, name: str) -> None:
    module, config, params = model_params(name, device)
    tokens = random_tokens(2, 20, seed=2, device=device)
    cache = init_cache(config, batch=2, max_len=24, device=device)
    logits, cache = module.forward_cached(params, Batch(tokens=tokens[:, :7]), cache, config)
    assert max_error(logits, full_forward(module, params, Batch(tokens=tokens[:, :7]), config)) <= 1e-5
    for i in range(7, 20):
        logits, cache = module.forward_cached(params, Batch(tokens=tokens[:, i : i + 1]), cache, config)
        full = full_forward(module, params, Batch(tokens=tokens[:, : i + 1]), config)
        assert max_error(logits[:, 0], full[:, -1]) <= 1e-5, f"step {i}"
    assert int(cache["length"]) == 20
    assert capacity(cache) == 4


def test_packed_documents_are_refused_not_attended_across() -> None:
    """The cached mask knows one sequence a row; packed documents would silently see each other."""
    module, config, params = model_params("llama-gqa", torch.device("cpu"))
    ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    batch = Batch(tokens=random_tokens(1, 6, seed=3, device=torch.device("cpu")), document_ids=ids)
    with pytest.raises(ValueError, match=r"packed documents .* would attend to each other"):
        module.forward_cached(params, batch, init_cache(config, batch=1, max_len=6), config)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_cpu_step_reads_no_slot_past_the_written_ones(name: str) -> None:
    """On the CPU, attention reads the written slots alone (``cached_attention``): NaN in the others, which
    attention over every slot would carry into the outputs through their zero weights, changes no logit, over
    a prefill, a chunk of several tokens, single tokens, and a cache cut back to a prefix (as
    ``zmaj.infer.chat`` resumes a conversation)."""
    cpu = torch.device("cpu")
    module, config, params = model_params(name, cpu)
    tokens = random_tokens(2, 12, seed=4, device=cpu)
    cache = init_cache(config, batch=2, max_len=16)
    chunks = [(0, 5), (5, 8), (8, 9), (9, 10), (6, 12)]  # the last after the cache is cut back to 6 slots
    for start, end in chunks:
        if start < int(cache["length"]):
            cache = prefix(cache, start, 16)
        for key in ("k", "v"):
            cache[key][:, :, :, start:] = float("nan")
        logits, cache = module.forward_cached(params, Batch(tokens=tokens[:, start:end]), cache, config)
        full = full_forward(module, params, Batch(tokens=tokens[:, :end]), config)
        assert max_error(logits, full[:, start:]) <= 1e-5, (start, end)


@st.composite
def chunkings(draw: st.DrawFn, seq: int) -> list[tuple[int, int]]:
    """``[0, seq)`` cut into consecutive chunks of random lengths: a prefill then decode chunks of any size."""
    cuts = sorted(draw(st.sets(st.integers(1, seq - 1), max_size=6)))
    bounds = [0, *cuts, seq]
    return list(itertools.pairwise(bounds))


@settings(max_examples=10)
@given(
    chunks=chunkings(18),
    name=st.sampled_from(["gpt", "llama-gqa", "qwen3-qk-norm", "gemma3-window", "gemma2-capped"]),
    seed=strategies.seeds,
)
def test_any_chunking_gives_the_full_forward(
    device: torch.device, chunks: list[tuple[int, int]], name: str, seed: int
) -> None:
    module, config, params = model_params(name, device)
    tokens = random_tokens(2, 18, seed, device)
    cache = init_cache(config, batch=2, max_len=18, device=device)
    pieces = []
    for start, end in chunks:
        logits, cache = module.forward_cached(params, Batch(tokens=tokens[:, start:end]), cache, config)
        pieces.append(logits)
    assert max_error(torch.cat(pieces, dim=1), module.forward(params, Batch(tokens=tokens), config)) <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "name", ["gpt", "gpt-modern", "llama-gqa", "qwen3-qk-norm", "gemma3-window", "gemma2-capped"]
)
def test_padded_prompts_then_decoding_give_each_row_alone(device: torch.device, side: str, name: str) -> None:
    """Padding tokens are random, not zeros, so only the mask can be keeping them out."""
    module, config, params = model_params(name, device)
    lengths, width, new = [9, 4, 6], 9, 5
    padded = random_tokens(3, width, seed=3, device=device)
    rows = [random_tokens(1, n, seed=10 + n, device=device) for n in lengths]
    is_token = torch.zeros(3, width, dtype=torch.bool, device=device)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        padded[b, span], is_token[b, span] = row[0], True
    continuation = random_tokens(3, new, seed=4, device=device)
    cache = init_cache(config, batch=3, max_len=width + new, device=device)
    logits, cache = module.forward_cached(params, Batch(tokens=padded, is_token=is_token), cache, config)
    for b, row in enumerate(rows):
        assert max_error(logits[b, is_token[b]], module.forward(params, Batch(tokens=row), config)[0]) <= 1e-5
    for i in range(new):
        logits, cache = module.forward_cached(params, Batch(tokens=continuation[:, i : i + 1]), cache, config)
        for b, row in enumerate(rows):
            alone = module.forward(
                params, Batch(tokens=torch.cat([row, continuation[b : b + 1, : i + 1]], 1)), config
            )
            assert max_error(logits[b, 0], alone[0, -1]) <= 1e-5, (b, i)


def test_explicit_positions_are_used(device: torch.device) -> None:
    module, config, params = model_params("llama-gqa", device)
    tokens = random_tokens(2, 10, seed=5, device=device)
    positions = torch.arange(10, device=device).expand(2, 10) + 7
    cache = init_cache(config, batch=2, max_len=10, device=device)
    first, cache = module.forward_cached(
        params, Batch(tokens=tokens[:, :6], positions=positions[:, :6]), cache, config
    )
    second, _ = module.forward_cached(
        params, Batch(tokens=tokens[:, 6:], positions=positions[:, 6:]), cache, config
    )
    full = module.forward(params, Batch(tokens=tokens, positions=positions), config)
    assert max_error(torch.cat([first, second], 1), full) <= 1e-5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_donated_step_equals_the_out_of_place_one_and_writes_in_place(
    device: torch.device, name: str
) -> None:
    module, config, params = model_params(name, device)
    cache = init_cache(config, batch=2, max_len=12, device=device)
    prompt = Batch(tokens=random_tokens(2, 5, seed=6, device=device))
    _, cache = module.forward_cached(params, prompt, cache, config)
    before, token = cache.clone(), Batch(tokens=random_tokens(2, 1, seed=7, device=device))
    logits, fresh = module.forward_cached(params, token, cache, config)
    donated_logits, donated = module.forward_cached(params, token, cache, config, donate=True)
    torch.testing.assert_close(donated_logits, logits, rtol=0, atol=0)
    assert (donated == fresh).all()
    for name in ("k", "v"):
        assert donated[name].data_ptr() == cache[name].data_ptr()
        assert not (cache[name] == before[name]).all()


@dataclass(frozen=True)
class SmallCache:
    """A small cache shape, for driving ``CacheStep`` and ``cached_attention`` directly."""

    n_layers: int = 1
    n_kv_heads: int = 2
    head_dim: int = 8


@settings(max_examples=30)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    new=st.integers(1, 4),
    written=st.integers(0, 3),
    layer=st.integers(0, 2),
    seed=strategies.seeds,
)
def test_a_donated_write_is_index_copy_into_its_layer_alone(
    device: torch.device, batch: int, kv_heads: int, new: int, written: int, layer: int, seed: int
) -> None:
    """The indexed write of ``CacheStep.write(donate=True)`` against ``index_copy_`` on the layer's view, for
    several tokens at once (a prefill or a chat turn), every row and head; the other layers and slots
    untouched."""
    generator = torch.Generator().manual_seed(seed)
    cache = init_cache(SmallCache(3, kv_heads, 4), batch, max_len=8, device=device)
    for name in ("k", "v"):
        cache[name].copy_(torch.randn(cache[name].shape, generator=generator))
    cache["length"] = torch.tensor(written, device=device)
    step = cache_step(Batch(tokens=torch.zeros(batch, new, dtype=torch.long, device=device)), cache)
    k, v = (torch.randn(batch, kv_heads, new, 4, generator=generator).to(device) for _ in range(2))
    expected = cache.clone()
    expected["k"][layer].index_copy_(2, step.slots, k)
    expected["v"][layer].index_copy_(2, step.slots, v)
    out_of_place = step.write(cache, layer, k, v)
    donated = step.write(cache, layer, k, v, donate=True)
    for i, name in enumerate(("k", "v")):
        assert torch.equal(cache[name], expected[name])
        assert torch.equal(donated[i], expected[name][layer])
        assert torch.equal(out_of_place[i], expected[name][layer])


def test_a_step_leaves_its_cache_unchanged(device: torch.device) -> None:
    module, config, params = model_params("llama-gqa", device)
    cache = init_cache(config, batch=2, max_len=12, device=device)
    prompt = Batch(tokens=random_tokens(2, 5, seed=6, device=device))
    _, cache = module.forward_cached(params, prompt, cache, config)
    before = cache.clone()
    token = Batch(tokens=random_tokens(2, 1, seed=7, device=device))
    _, after = module.forward_cached(params, token, cache, config)
    assert (cache == before).all()
    assert int(after["length"]) == 6
    assert not torch.equal(after["k"], cache["k"])
    assert torch.equal(after["is_token"][:, :6], torch.ones(2, 6, dtype=torch.bool, device=device))
    assert not after["is_token"][:, 6:].any()
    assert torch.equal(after["positions"][:, :6], torch.arange(6, device=device).expand(2, 6))


@pytest.mark.parametrize("name", ["gpt", "qwen3-qk-norm"])
def test_init_cache_is_sized_by_the_config(device: torch.device, name: str) -> None:
    _, config = MODELS[name]
    cache = init_cache(config, batch=3, max_len=16, dtype=torch.float64, device=device)
    kv_heads = config.n_heads if isinstance(config, gpt.GPTConfig) else config.n_kv_heads
    assert cache["k"].shape == cache["v"].shape == (2, 3, kv_heads, 16, config.head_dim)
    assert cache["k"].dtype == torch.float64
    assert cache["positions"].shape == cache["is_token"].shape == (3, 16)
    assert int(cache["length"]) == 0
    assert capacity(cache) == 16
    with pytest.raises(ValueError, match="max_len"):
        init_cache(config, batch=3, max_len=0)


def test_init_cache_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="batch=0"):
        init_cache(SmallCache(), batch=0, max_len=4)


def test_repeat_rows_puts_each_rows_copies_next_to_it(device: torch.device) -> None:
    """Row ``i`` becomes rows ``i * copies`` to ``i * copies + copies - 1`` in every field (as ``stream``'s
    ``copies`` promises), against the rows stacked one by one; the length is shared; no copies is refused."""
    generator = torch.Generator().manual_seed(0)
    cache = init_cache(SmallCache(2, 2, 4), batch=3, max_len=5, device=device)
    for name in ("k", "v"):
        cache[name].copy_(torch.randn(cache[name].shape, generator=generator))
    cache["positions"].copy_(torch.randint(0, 9, (3, 5), generator=generator))
    cache["is_token"].copy_(torch.rand(3, 5, generator=generator) < 0.5)
    cache["length"] = torch.tensor(4, device=device)
    repeated = repeat_rows(cache, 2)
    for name, axis in (("k", 1), ("v", 1), ("positions", 0), ("is_token", 0)):
        rows = cache[name].unbind(axis)
        expected = torch.stack([rows[0], rows[0], rows[1], rows[1], rows[2], rows[2]], axis)
        assert torch.equal(repeated[name], expected), name
    assert int(repeated["length"]) == 4
    with pytest.raises(ValueError, match="copies must be at least 1"):
        repeat_rows(cache, 0)


def test_prefix_refuses_more_slots_than_the_new_cache_has() -> None:
    """Five written slots cannot be kept in a cache of three: refused with the sizes, not an indexing error."""
    cache = init_cache(SmallCache(), batch=1, max_len=8)
    cache["length"] = torch.tensor(5)
    with pytest.raises(ValueError, match="cannot keep 5 slots of a cache of 5 tokens in 3 slots"):
        prefix(cache, 5, 3)
    assert int(prefix(cache, 3, 3)["length"]) == 3


@settings(max_examples=25)
@given(
    seq=st.integers(2, 24),
    window=st.none() | st.integers(1, 8),
    padding=st.sampled_from(["none", "left", "right"]),
    backend=st.sampled_from(["eager", "sdpa"]),
    data=st.data(),
)
def test_cached_attention_with_a_window_equals_full_attention(
    device: torch.device, seq: int, window: int | None, padding: str, backend: Backend, data: st.DataObject
) -> None:
    """Chunk by chunk through the cache, with ``cache_mask``, against one pass under the sliding-window mask.

    The reference masks by slot index; the cache by absolute position. For real tokens of a left-padded row the
    two differ by a constant; for a right-padded row the real tokens come first, so only real rows are compared.
    """
    batch, shape = 2, SmallCache()
    generator = torch.Generator().manual_seed(data.draw(strategies.seeds))
    q = torch.randn(batch, 4, seq, shape.head_dim, generator=generator).to(device)
    k, v = (
        torch.randn(batch, shape.n_kv_heads, seq, shape.head_dim, generator=generator).to(device)
        for _ in range(2)
    )
    is_token = torch.ones(batch, seq, dtype=torch.bool, device=device)
    if padding != "none":
        lengths = data.draw(strategies.lengths(batch, seq)).to(device)
        is_token = masks.lengths_to_is_token(lengths, seq)
        if padding == "left":
            is_token = is_token.flip(1)
    mods = [masks.causal if window is None else masks.sliding_window(window), masks.padding(is_token)]
    reference = attention(q, k, v, masks.dense(masks.combine(*mods), batch, seq, seq, device), backend)

    cache = init_cache(shape, batch, max_len=seq + data.draw(st.integers(0, 4)), device=device)
    outputs = []
    for start, end in data.draw(chunkings(seq)):
        tokens = torch.zeros(batch, end - start, dtype=torch.long, device=device)
        step = cache_step(Batch(tokens=tokens, is_token=is_token[:, start:end]), cache)
        cache_k, cache_v = step.write(cache, 0, k[:, :, start:end], v[:, :, start:end])
        out = cached_attention(q[:, :, start:end], cache_k, cache_v, cache_mask(step, window), backend)
        cache = step.advance([cache_k], [cache_v])
        outputs.append(out)
    cached = torch.cat(outputs, dim=2)
    assert torch.isfinite(cached).all()
    real = is_token[:, None, :, None].expand_as(cached)
    torch.testing.assert_close(cached[real], reference[real], atol=1e-5, rtol=1e-5)


COMPILED_DECODING = """
import torch
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import compile_step
from zmaj.models import llama
from zmaj.models.common import Batch

config = llama.LlamaConfig(
    vocab_size=64, context=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, head_dim=12,
    qk_norm=True, tie_embeddings=True,  # as SmolLM2: the unembedding reads the embedding
)
params = llama.init(config, seed=0)
tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(8))
same = dict(rtol=0, atol=1e-5, equal_nan=True)
# As the programs compile (compile_step: attention over the written slots alone; at batch 1 the matrix-vector
# path of linear and unembed, zmaj.nn.layers.matvec), and as a plain torch.compile, over every slot.
for batch, windowed in ((1, True), (2, True), (2, False)):
    torch._dynamo.reset()
    cached = llama.cached(config)
    compiled = compile_step(cached) if windowed else torch.compile(cached, fullgraph=True)
    rows = tokens[:batch]
    with torch.no_grad():
        cache = init_cache(config, batch=batch, max_len=17)  # a slot left for the last, undonated step
        _, cache = llama.forward_cached(params, Batch(tokens=rows[:, :8]), cache, config)
        reference = cache  # the eager out-of-place steps, over a cache whose unwritten slots are zeros
        unwritten = 0.0
        if windowed:  # never read by a windowed step; a full one's zero weights would carry them (0 * NaN)
            cache, unwritten = cache.clone(), float("nan")
            for name in ("k", "v"):
                cache[name][:, :, :, 8:] = unwritten
        for i in range(8, 16):
            token = Batch(tokens=rows[:, i : i + 1])
            # The first decode step compiles the graph that every later one must reuse (as generate's steps).
            with torch._dynamo.config.patch(error_on_recompile=i > 8):
                logits, donated = compiled(params, token, cache, donate=True)
            _, reference = llama.forward_cached(params, token, reference, config)
            for name in ("k", "v"):  # into the given buffers, what the eager step writes, and nothing else
                assert donated[name].data_ptr() == cache[name].data_ptr(), (batch, i, name)
                expected = reference[name].clone()
                expected[:, :, :, i + 1 :] = unwritten
                torch.testing.assert_close(donated[name], expected, **same)
            full = llama.forward(params, Batch(tokens=rows[:, : i + 1]), config)
            assert (logits[:, 0] - full[:, -1]).abs().max() <= 1e-5, (batch, i)
            cache = donated
        before = cache.clone()
        compiled(params, Batch(tokens=rows[:, :1]), cache)  # not donated: a second graph, writing nothing
        for name in cache.keys():
            torch.testing.assert_close(cache[name], before[name], rtol=0, atol=0, equal_nan=True)
"""


@pytest.mark.slow
def test_a_compiled_decode_step_never_recompiles() -> None:
    """Static shapes and a tensor length: every decode step after the first reuses one graph, with no breaks,
    through ``compile_step`` at batch 1 and 2 (whose steps never read an unwritten slot: NaN there changes
    nothing) and a plain ``torch.compile``.

    Run in a fresh interpreter: under pytest every zmaj function is wrapped by the runtime shape checker, whose
    bookkeeping dynamo cannot trace.
    """
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_DECODING], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


WINDOWED_DECODING = """
import torch
from zmaj.infer.cache import init_cache
from zmaj.models import gemma3, gpt, llama
from zmaj.models.common import Batch

shared = dict(vocab_size=64, context=32, d_model=32, n_heads=4)
gemma = gemma3.Gemma3Config(
    **shared, n_layers=2, n_kv_heads=2, head_dim=8, d_ff=48, sliding_window=5, query_pre_attn_scalar=6,
    layer_types=("sliding_attention", "full_attention"),
)
configs = [
    (gpt, gpt.GPTConfig(
        **shared, n_layers=3, positions="rope", norm="rmsnorm", qk_norm=True, value_embeds=1, unet_skips=True
    )),
    (llama, llama.LlamaConfig(**shared, n_layers=2, n_kv_heads=2, d_ff=48, head_dim=12, qk_norm=True)),
    (gemma3, gemma),
    # Gemma 2: the decode step's multiplies-and-sums form soft-caps its scores (at 0.1, which these reach).
    (gemma3, gemma.model_copy(update={"qk_norm": False, "attn_logit_softcap": 0.1})),
]
tokens = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(3))
for module, config in configs:
    params = module.init(config, seed=0)
    torch._dynamo.reset()
    step = torch.compile(module.cached(config), backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True, error_on_recompile=True):
        cache = init_cache(config, batch=2, max_len=16)
        _, cache = module.forward_cached(params, Batch(tokens=tokens[:, :6]), cache, config)
        for name in ("k", "v"):  # attending over them would carry NaN into the output through zero weights
            cache[name][:, :, :, 6:] = float("nan")
        for i in range(6, 14):
            logits, cache = step(params, Batch(tokens=tokens[:, i : i + 1]), cache, donate=True)
            full = module.forward(params, Batch(tokens=tokens[:, : i + 1]), config)
            assert (logits[:, 0] - full[:, -1]).abs().max() <= 1e-5, (config, i)
"""


@pytest.mark.slow
def test_a_traced_decode_step_attends_over_the_written_slots_alone() -> None:
    """Every architecture hands its cache's written length to attention: traced with scalar outputs captured
    (as ``zmaj.infer.generate.compile_step`` compiles), a decode step reads no slot past it, so NaN there
    changes no logit, through a sliding window too. ``aot_eager`` traces as ``torch.compile`` does, without
    building kernels (``test_a_compiled_decode_step_never_recompiles`` builds them); in a fresh interpreter,
    as that test says."""
    done = subprocess.run(
        [sys.executable, "-c", WINDOWED_DECODING], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("name", list(MODELS))
def test_last_only_is_the_last_positions_logits_and_the_same_cache(device: torch.device, name: str) -> None:
    """What a prefill asks for (``zmaj.infer.generate.stream``): the full step's last logits (to rounding: a
    one-row unembedding takes another matmul kernel) and the same cache, so decoding goes on as before."""
    module, config, params = model_params(name, device)
    tokens = random_tokens(2, 9, seed=5, device=device)
    full, full_cache = module.forward_cached(
        params, Batch(tokens=tokens), init_cache(config, 2, 12, device=device), config
    )
    last, last_cache = module.forward_cached(
        params, Batch(tokens=tokens), init_cache(config, 2, 12, device=device), config, last_only=True
    )
    assert last.shape == (2, 1, VOCAB)
    assert max_error(last, full[:, -1:]) <= 1e-5
    for key in full_cache.keys(True, True):
        assert torch.equal(last_cache.get(key), full_cache.get(key)), key
