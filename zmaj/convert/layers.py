"""Stacking a checkpoint's per-layer tensors into zmaj's ``[n_layers, ...]`` block tensors, as they are read."""

from collections.abc import Iterable

from torch import Tensor


def stack_layers(layers: Iterable[Tensor], n_layers: int) -> Tensor:
    """``torch.stack(list(layers))`` for ``n_layers`` layers read one by one (a generator), holding one layer's
    tensor beyond the result.

    A checkpoint stores each layer's weight apart and zmaj stacks them; a list of all the layers, then stacked,
    holds every layer twice at the moment of the stack (for a dequantised GGUF, a second float32 copy of the
    model's blocks). Each layer is written into its slot instead, and the one just read is freed before the next.
    """
    stacked: Tensor | None = None
    count = 0
    for layer in layers:
        if stacked is None:
            stacked = layer.new_empty((n_layers, *layer.shape))
        stacked[count] = layer
        count += 1
        del layer  # before the next is read
    assert stacked is not None, "no layers"
    assert count == n_layers, f"{count} layers, {n_layers} expected"
    return stacked
