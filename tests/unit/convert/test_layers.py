"""Stacking per-layer tensors as they are read: the result of ``torch.stack``, one layer held at a time, and a
layer unlike the first (shape or dtype) or a wrong count refused."""

import weakref
from collections.abc import Iterator

import pytest
import torch

from zmaj.convert.layers import stack_layers


def test_each_layer_is_let_go_before_the_next_is_read() -> None:
    """A list of the layers, then stacked, held them all; the generator checks, before it reads each layer,
    that the layers before it are gone."""
    read: list[weakref.ref[torch.Tensor]] = []

    def layers() -> Iterator[torch.Tensor]:
        for i in range(4):
            assert all(ref() is None for ref in read), f"layer {i} is read while an earlier one is held"
            layer = torch.full((3, 2), float(i))
            read.append(weakref.ref(layer))
            yield layer
            del layer

    stacked = stack_layers(layers(), 4, "w")
    assert torch.equal(stacked, torch.stack([torch.full((3, 2), float(i)) for i in range(4)]))


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([torch.ones(3), torch.ones(1)], r"w: layer 1 is \(1,\) torch.float32, layer 0 \(3,\) torch.float32"),
        ([torch.ones(3), torch.ones(3, dtype=torch.float64)], "w: layer 1 is .* torch.float64"),
        ([torch.ones(3)] * 3, "w: more than the 2 layers expected"),
        ([torch.ones(3)], "w: 1 layers, 2 expected"),
        ([], "w: 0 layers, 2 expected"),
    ],
)
def test_a_layer_unlike_the_first_or_a_wrong_count_is_refused(
    layers: list[torch.Tensor], message: str
) -> None:
    """A misshapen layer would broadcast into its slot and another dtype be cast, without a word."""
    with pytest.raises(ValueError, match=message):
        stack_layers(iter(layers), 2, "w")
