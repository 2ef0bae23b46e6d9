"""The torch.func story: params are a TensorDict, the model a pure function, the shell a view of both."""

import pytest
import torch
from jaxtyping import TypeCheckError
from tensordict import TensorDict

from zmaj.models import gpt
from zmaj.models.common import Batch
from zmaj.nn import masks

CONFIG = gpt.GPTConfig(vocab_size=48, context=16, d_model=16, n_layers=2, n_heads=2)
BATCH = Batch(tokens=torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0)))


def loss(params: TensorDict, batch: Batch) -> torch.Tensor:
    logits = gpt.forward(params, batch, CONFIG)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.tokens[:, 1:].flatten())


def test_shell_parameters_are_exactly_the_tensordict() -> None:
    params = gpt.init(CONFIG, seed=0)
    shell = gpt.GPT(CONFIG, params)
    round_trip = shell.params()
    assert set(round_trip.keys(True, True)) == set(params.keys(True, True))
    assert (round_trip == params).all()
    assert round_trip["blocks"].batch_size == params["blocks"].batch_size
    assert {name for name, _ in shell.named_parameters()} == {
        ".".join(key) for key in params.keys(include_nested=True, leaves_only=True)
    }


def test_to_module_swaps_the_shell_parameters() -> None:
    shell = gpt.GPT(CONFIG, seed=0)
    other = gpt.init(CONFIG, seed=1)
    with other.to_module(shell):
        swapped = shell(BATCH)
    torch.testing.assert_close(swapped, gpt.forward(other, BATCH, CONFIG))
    torch.testing.assert_close(shell(BATCH), gpt.forward(gpt.init(CONFIG, 0), BATCH, CONFIG))


def test_grad_over_the_tensordict_equals_autograd_through_the_shell() -> None:
    params = gpt.init(CONFIG, seed=0)
    grads = torch.func.grad(loss)(params, BATCH)
    shell = gpt.GPT(CONFIG, params.clone())
    logits = shell(BATCH)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), BATCH.tokens[:, 1:].flatten()).backward()
    for name, parameter in shell.named_parameters():
        assert parameter.grad is not None
        torch.testing.assert_close(grads.get(tuple(name.split("."))), parameter.grad)


def test_functional_call_on_the_shell_equals_the_pure_function() -> None:
    shell = gpt.GPT(CONFIG, seed=0)
    other = gpt.init(CONFIG, seed=3)
    flat: dict[str, torch.Tensor] = {".".join(key): other.get(key) for key in other.keys(True, True)}
    torch.testing.assert_close(
        torch.func.functional_call(shell, flat, (BATCH,)), gpt.forward(other, BATCH, CONFIG)
    )


def test_vmap_over_an_ensemble_equals_a_loop() -> None:
    members = [gpt.init(CONFIG, seed) for seed in range(4)]
    ensemble = TensorDict.stack(members)
    logits = torch.func.vmap(gpt.pure(CONFIG), in_dims=(0, None))(ensemble, BATCH)
    torch.testing.assert_close(logits, torch.stack([gpt.forward(p, BATCH, CONFIG) for p in members]))
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(ensemble, BATCH)
    for i, member in enumerate(members):
        expected = torch.func.grad(loss)(member, BATCH)
        torch.testing.assert_close(grads[i]["embed", "weight"], expected["embed", "weight"])


def test_a_wrong_shape_is_rejected_at_runtime() -> None:
    """The test suite runs with jaxtyping + beartype checking every annotated zmaj function."""
    flat_ids = torch.zeros(8, dtype=torch.long)  # should be [batch, seq]
    with pytest.raises(TypeCheckError):
        masks.lengths_to_is_token(torch.zeros(2, 3, dtype=torch.long), 4)  # lengths must be [batch]
    with pytest.raises(TypeCheckError):
        Batch(tokens=flat_ids)
