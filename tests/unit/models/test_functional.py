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


def test_shell_parameters_are_exactly_the_tensordict(device: torch.device) -> None:
    params = gpt.init(CONFIG, seed=0, device=device)
    shell = gpt.GPT(CONFIG, params)
    round_trip = shell.params()
    assert set(round_trip.keys(True, True)) == set(params.keys(True, True))
    assert (round_trip == params).all()
    assert round_trip["blocks"].batch_size == params["blocks"].batch_size
    assert {name for name, _ in shell.named_parameters()} == {
        ".".join(key) for key in params.keys(include_nested=True, leaves_only=True)
    }


def test_to_module_swaps_the_shell_parameters(device: torch.device) -> None:
    shell = gpt.GPT(CONFIG, gpt.init(CONFIG, seed=0, device=device))
    other = gpt.init(CONFIG, seed=1, device=device)
    batch = BATCH.to(device)
    with other.to_module(shell):
        swapped = shell(batch)
    torch.testing.assert_close(swapped, gpt.forward(other, batch, CONFIG))
    torch.testing.assert_close(shell(batch), gpt.forward(gpt.init(CONFIG, 0, device), batch, CONFIG))


def test_grad_over_the_tensordict_equals_autograd_through_the_shell(device: torch.device) -> None:
    params = gpt.init(CONFIG, seed=0, device=device)
    batch = BATCH.to(device)
    grads = torch.func.grad(loss)(params, batch)
    shell = gpt.GPT(CONFIG, params.clone())
    logits = shell(batch)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.tokens[:, 1:].flatten()).backward()
    for name, parameter in shell.named_parameters():
        assert parameter.grad is not None
        torch.testing.assert_close(grads.get(tuple(name.split("."))), parameter.grad)


def test_functional_call_on_the_shell_equals_the_pure_function(device: torch.device) -> None:
    shell = gpt.GPT(CONFIG, gpt.init(CONFIG, seed=0, device=device))
    other = gpt.init(CONFIG, seed=3, device=device)
    batch = BATCH.to(device)
    flat: dict[str, torch.Tensor] = {".".join(key): other.get(key) for key in other.keys(True, True)}
    torch.testing.assert_close(
        torch.func.functional_call(shell, flat, (batch,)), gpt.forward(other, batch, CONFIG)
    )


def test_vmap_over_an_ensemble_equals_a_loop(device: torch.device) -> None:
    members = [gpt.init(CONFIG, seed, device) for seed in range(4)]
    ensemble = TensorDict.stack(members)
    batch = BATCH.to(device)
    logits = torch.func.vmap(gpt.pure(CONFIG), in_dims=(0, None))(ensemble, batch)
    torch.testing.assert_close(logits, torch.stack([gpt.forward(p, batch, CONFIG) for p in members]))
    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(0, None))(ensemble, batch)
    for i, member in enumerate(members):
        expected = torch.func.grad(loss)(member, batch)
        torch.testing.assert_close(grads[i]["embed", "weight"], expected["embed", "weight"])


def test_a_wrong_shape_is_rejected_at_runtime() -> None:
    """The test suite runs with jaxtyping + beartype checking every annotated zmaj function."""
    flat_ids = torch.zeros(8, dtype=torch.long)  # should be [batch, seq]
    with pytest.raises(TypeCheckError):
        masks.lengths_to_is_token(torch.zeros(2, 3, dtype=torch.long), 4)  # lengths must be [batch]
    with pytest.raises(TypeCheckError):
        Batch(tokens=flat_ids)
