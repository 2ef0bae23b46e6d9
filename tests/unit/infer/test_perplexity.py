"""Sliding-window perplexity: the windows score every token once, and the scores equal plain forward passes."""

import math
from collections import Counter
from collections.abc import Callable
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict

from zmaj.infer import perplexity as perplexity_module
from zmaj.infer.perplexity import Window, perplexity, sliding_windows, window_nll
from zmaj.models import llama
from zmaj.models.common import Batch

CONFIG = llama.LlamaConfig(
    vocab_size=64, context=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, init_std=0.1
)
TOKENS = torch.randint(0, CONFIG.vocab_size, (50,), generator=torch.Generator().manual_seed(0))
Hidden = Callable[[Batch], torch.Tensor]
Unembed = Callable[[torch.Tensor], torch.Tensor]


@cache
def params(device: torch.device) -> TensorDict:
    """The scored model, built once per device."""
    return llama.init(CONFIG, seed=0, device=device)


def model(device: torch.device) -> tuple[Hidden, Unembed]:
    """The two halves ``perplexity`` takes: hidden states, then logits from them."""

    def hidden(batch: Batch) -> torch.Tensor:
        return llama.hidden_states(params(device), batch, CONFIG)

    def unembed(states: torch.Tensor) -> torch.Tensor:
        return llama.unembed(params(device), states, CONFIG)

    return hidden, unembed


def plain_nll(tokens: torch.Tensor) -> torch.Tensor:
    """Each token's NLL given all before it, from one ordinary forward pass (the first token is not scored)."""
    logits = llama.forward(params(tokens.device), Batch(tokens=tokens[None, :-1]), CONFIG)[0]
    return F.cross_entropy(logits, tokens[1:], reduction="none")


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, int, int]:
    context = draw(st.integers(2, 40))
    return draw(st.integers(0, 200)), context, draw(st.integers(1, context))


def test_a_bfloat16_models_losses_are_the_cross_entropy_of_its_logits_in_float32() -> None:
    """``--dtype auto`` scores a bf16 checkpoint in bf16: its logits are upcast before the log-softmax, as
    ``window_nll`` promises, not cross-entropy rounded to bf16 per token."""
    bf16 = params(torch.device("cpu")).to(torch.bfloat16)
    nll = window_nll(
        lambda batch: llama.hidden_states(bf16, batch, CONFIG),
        lambda states: llama.unembed(bf16, states, CONFIG),
        TOKENS[:40],
        Window(0, 40, 1),
    )
    logits = llama.forward(bf16, Batch(tokens=TOKENS[None, :39]), CONFIG)[0]
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, F.cross_entropy(logits.float(), TOKENS[1:40], reduction="none"))


@given(layouts())
def test_windows_score_each_token_at_most_once_with_context_inside_the_window(
    layout: tuple[int, int, int],
) -> None:
    n, context, stride = layout
    windows = sliding_windows(n, context, stride)
    counts = Counter(i for w in windows for i in range(w.scored_from, w.end))
    assert max(counts.values(), default=1) == 1
    for window in windows:
        assert 0 <= window.begin < window.scored_from < window.end <= n
        assert window.end - window.begin <= context
    # A token goes unscored only when it starts its window: the text's first, or a chunk's first at stride == context.
    unscored = set(range(n)) - set(counts)
    expected = set(range(0, n, context)) if stride == context else set(range(min(n, 1)))
    assert unscored == expected


def guide_windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The loop of the transformers perplexity guide: (begin, end, number of targets it keeps)."""
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return windows


@given(layouts())
def test_windows_are_the_guides_less_those_scoring_nothing(layout: tuple[int, int, int]) -> None:
    n, context, stride = layout
    # The guide keeps the last trg_len labels; the window's first label is never predicted (the label shift).
    expected = [
        Window(begin, end, max(end - kept, begin + 1))
        for begin, end, kept in guide_windows(n, context, stride)
        if max(end - kept, begin + 1) < end
    ]
    assert sliding_windows(n, context, stride) == expected


def test_windows_are_the_guides_for_one_layout() -> None:
    # The transformers guide's loop, by hand, for 11 tokens, context 4, stride 3.
    assert sliding_windows(11, 4, 3) == [
        Window(0, 4, 1),
        Window(3, 7, 4),
        Window(6, 10, 7),
        Window(9, 11, 10),
    ]


@pytest.mark.parametrize(("context", "stride"), [(1, 1), (4, 0), (4, 5)])
def test_bad_windows_are_refused(context: int, stride: int) -> None:
    with pytest.raises(ValueError, match=r"context|stride"):
        sliding_windows(10, context, stride)


def test_one_window_is_the_plain_mean_nll(device: torch.device) -> None:
    tokens = TOKENS.to(device)
    result = perplexity(*model(device), tokens, context=CONFIG.context)
    expected = plain_nll(tokens)
    assert result.tokens == len(tokens) - 1
    assert result.nll == pytest.approx(float(expected.mean()), abs=1e-5)
    assert result.ppl == pytest.approx(math.exp(float(expected.mean())), rel=1e-5)


def test_stride_equal_to_context_is_independent_chunks(device: torch.device) -> None:
    context, tokens = 16, TOKENS.to(device)
    chunks = [plain_nll(chunk) for chunk in tokens.split(context) if len(chunk) > 1]
    expected = torch.cat(chunks)
    result = perplexity(*model(device), tokens, context=context, stride=context)
    assert result.tokens == len(expected)
    assert result.nll == pytest.approx(float(expected.mean()), abs=1e-5)


@settings(max_examples=10)
@given(st.integers(2, 20), st.data())
def test_each_scored_token_is_conditioned_on_its_window(
    device: torch.device, context: int, data: st.DataObject
) -> None:
    stride = data.draw(st.integers(1, context))
    tokens = TOKENS.to(device)
    expected = []
    for window in sliding_windows(len(tokens), context, stride):
        nll = plain_nll(tokens[window.begin : window.end])
        expected.append(nll[window.scored_from - window.begin - 1 :])
    result = perplexity(*model(device), tokens, context=context, stride=stride)
    reference = torch.cat(expected)
    assert result.tokens == len(reference)
    assert result.nll == pytest.approx(float(reference.double().mean()), abs=1e-5)


def test_logits_in_chunks_are_the_logits_at_once(device: torch.device) -> None:
    window, tokens = Window(3, 40, 10), TOKENS.to(device)
    whole = window_nll(*model(device), tokens, window, chunk=1024)
    torch.testing.assert_close(window_nll(*model(device), tokens, window, chunk=4), whole)
    torch.testing.assert_close(whole, plain_nll(tokens[3:40])[6:])


def test_too_short_a_text_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(*model(torch.device("cpu")), TOKENS[:1], context=8)


def chunk_sizes(
    device: torch.device, monkeypatch: pytest.MonkeyPatch, logits_per_chunk: int, window: Window
) -> tuple[torch.Tensor, list[int]]:
    """``window_nll`` of ``TOKENS`` with at most ``logits_per_chunk`` logits a chunk, and the positions each
    unembedding took."""
    monkeypatch.setattr(perplexity_module, "LOGITS_PER_CHUNK", logits_per_chunk)
    hidden, unembed = model(device)
    sizes: list[int] = []

    def counted(states: torch.Tensor) -> torch.Tensor:
        sizes.append(states.shape[1])
        return unembed(states)

    return window_nll(hidden, counted, TOKENS.to(device), window), sizes


def test_by_default_a_chunk_holds_at_most_logits_per_chunk_logits(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fixed count of positions is no memory bound: 1024 of Gemma 3's 262,144-token vocabulary are 1 GiB."""
    nll, sizes = chunk_sizes(device, monkeypatch, 5 * CONFIG.vocab_size + 3, Window(3, 40, 10))
    torch.testing.assert_close(nll, plain_nll(TOKENS.to(device)[3:40])[6:])
    assert sizes == [1, 5, 5, 5, 5, 5, 5]  # the size probe, then the 30 scored positions 5 at a time


def test_a_vocabulary_larger_than_logits_per_chunk_is_scored_a_position_at_a_time(
    device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where one position's logits are more than :data:`LOGITS_PER_CHUNK`, a chunk is one position, not none."""
    nll, sizes = chunk_sizes(device, monkeypatch, CONFIG.vocab_size - 1, Window(0, 8, 1))
    torch.testing.assert_close(nll, plain_nll(TOKENS.to(device)[:8]))
    assert sizes == [1] * 8  # the size probe, then the 7 scored positions one at a time


def test_a_stride_of_0_is_refused_not_read_as_the_default() -> None:
    """``stride=None`` means the context (plain chunks); 0 is no stride, refused as ``sliding_windows`` refuses it."""
    with pytest.raises(ValueError, match="the stride must be between 1 and the context"):
        perplexity(*model(torch.device("cpu")), TOKENS, context=8, stride=0)
