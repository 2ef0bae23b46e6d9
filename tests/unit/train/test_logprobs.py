"""Sequence log-probs against a naive loop, and the completion batch against the layout it promises."""

import math
from functools import cache

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensordict import TensorDict

from zmaj.models import llama
from zmaj.models.common import Batch, LazyLogits
from zmaj.train import precision, step
from zmaj.train.logprobs import completion_batch, sequence_logprobs, token_logprobs

CONFIG = llama.LlamaConfig(
    vocab_size=16, context=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, init_std=0.2
)

token_lists = st.lists(st.integers(0, 15), min_size=1, max_size=6)


@cache
def params(device: torch.device) -> TensorDict:
    """The model every test scores with, built once per device."""
    return llama.init(CONFIG, seed=0, device=device)


@given(
    prompts_and_completions=st.lists(
        st.tuples(token_lists, st.lists(st.integers(0, 15), max_size=6)), min_size=1, max_size=4
    )
)
def test_sequence_logprobs_equal_a_loop_over_each_pair_alone(
    device: torch.device, prompts_and_completions: list[tuple[list[int], list[int]]]
) -> None:
    prompts = [p for p, _ in prompts_and_completions]
    completions = [c for _, c in prompts_and_completions]
    batch = completion_batch(prompts, completions, device)
    got = sequence_logprobs(llama.forward(params(device), batch, CONFIG), batch)
    for row, (prompt, completion) in enumerate(prompts_and_completions):
        # Each pair alone, unpadded: log p(c_i | prompt, c_<i) summed one token at a time.
        expected = 0.0
        for i, token in enumerate(completion):
            context = torch.tensor([prompt + completion[:i]], device=device)
            logits = llama.forward(params(device), Batch(tokens=context), CONFIG)[0, -1].double()
            expected += float(torch.log_softmax(logits, -1)[token])
        assert float(got[row]) == pytest.approx(expected, abs=1e-4)


def test_token_logprobs_read_the_log_softmax_at_each_target(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=generator).to(device)
    targets = torch.randint(0, 5, (2, 3), generator=generator).to(device)
    got = token_logprobs(logits, targets)
    for b in range(2):
        for s in range(3):
            row = logits[b, s].tolist()
            log_z = math.log(sum(math.exp(x) for x in row))
            assert float(got[b, s]) == pytest.approx(row[int(targets[b, s])] - log_z, abs=1e-5)


def test_completion_batch_masks_exactly_the_completion_targets() -> None:
    batch = completion_batch([[1, 2, 3], [4]], [[5, 6], [7, 8]])
    assert batch.tokens.tolist() == [[1, 2, 3, 5], [4, 7, 8, 0]]
    assert batch.targets is not None
    assert batch.loss_mask is not None
    assert batch.is_token is not None
    assert batch.targets.tolist() == [[2, 3, 5, 6], [7, 8, 0, 0]]
    assert batch.loss_mask.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert batch.is_token.tolist() == [[True] * 4, [True, True, True, False]]


def test_log_probabilities_of_bfloat16_logits_are_computed_in_float32() -> None:
    """DPO's and GRPO's ratios subtract log-probabilities: in bf16 (8 bits of mantissa) they would be noise."""
    logits = (torch.randn(2, 3, 1000, generator=torch.Generator().manual_seed(0)) * 4).bfloat16()
    targets = torch.randint(0, 1000, (2, 3), generator=torch.Generator().manual_seed(1))
    got = token_logprobs(logits, targets)
    assert got.dtype == torch.float32
    assert torch.equal(got, token_logprobs(logits.float(), targets))


@pytest.mark.parametrize(("temperature", "cap"), [(1.0, None), (0.7, None), (1.0, 3.0), (1.3, 3.0)])
def test_lazy_logits_give_the_log_probs_of_their_logits(temperature: float, cap: float | None) -> None:
    """A lazy forward's hidden states and unembedding (chunked) give what their logits give, at any sampling
    temperature and soft-cap."""
    generator = torch.Generator().manual_seed(0)
    lazy = LazyLogits(torch.randn(2, 5, 8, generator=generator), torch.randn(16, 8, generator=generator), cap)
    targets = torch.randint(0, 16, (2, 5), generator=generator)
    expected = token_logprobs(lazy.logits(), targets, temperature)
    torch.testing.assert_close(token_logprobs(lazy, targets, temperature), expected, rtol=1e-6, atol=1e-6)


def test_a_lazy_forward_under_autocast_hands_its_unembedding_over_in_the_autocast_dtype() -> None:
    """``autocast_forward`` casts a lazy forward's hidden states and unembedding as autocast would cast them for
    the unembedding's matmul, which the log-probs run later, outside autocast; so the log-probs are the plain
    bf16 forward's (within bf16's rounding), not a float32 unembedding's."""
    batch = Batch(tokens=torch.tensor([[1, 2, 3, 4]]), targets=torch.tensor([[2, 3, 4, 5]]))
    lazy = precision.autocast_forward(
        step.bind_lazy(llama.lazy_forward, config=CONFIG), torch.bfloat16, torch.device("cpu")
    )(params(torch.device("cpu")), batch, dropout_seed=None)
    assert lazy.hidden.dtype == lazy.weight.dtype == torch.bfloat16
    plain = precision.autocast_forward(
        step.bind(llama.forward, config=CONFIG), torch.bfloat16, torch.device("cpu")
    )(params(torch.device("cpu")), batch, dropout_seed=None)
    assert batch.targets is not None
    torch.testing.assert_close(
        token_logprobs(lazy, batch.targets), token_logprobs(plain, batch.targets), rtol=0, atol=1e-6
    )
