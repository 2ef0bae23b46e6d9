"""Stacking a checkpoint's per-layer tensors into zmaj's ``[n_layers, ...]`` block tensors, as they are read."""

from collections.abc import Iterable

from torch import Tensor


def stack_layers(layers: Iterable[Tensor], n_layers: int, name: str) -> Tensor:
    """``torch.stack(list(layers))`` for ``n_layers`` layers read one by one (a generator), holding one layer's
    tensor beyond the result; ``name`` names the tensor in errors.

    A checkpoint stores each layer's weight apart and zmaj stacks them; a list of all the layers, then stacked,
    holds every layer twice at the moment of the stack (for a dequantised GGUF, a second float32 copy of the
    model's blocks). Each layer is written into its slot instead, and the one just read is freed before the next.
    A layer of another shape than the first is refused, as ``torch.stack`` refuses it, and one of another dtype
    too, where ``torch.stack`` would promote (a slot's assignment would broadcast the one and cast the other
    without a word).
    """
    stacked: Tensor | None = None
    count = 0
    for layer in layers:
        if stacked is None:
            stacked = layer.new_empty((n_layers, *layer.shape))
        if count == n_layers:
            raise ValueError(f"{name}: more than the {n_layers} layers expected")
        if layer.shape != stacked.shape[1:] or layer.dtype != stacked.dtype:
            raise ValueError(
                f"{name}: layer {count} is {tuple(layer.shape)} {layer.dtype}, layer 0 "
                f"{tuple(stacked.shape[1:])} {stacked.dtype}"
            )
        stacked[count] = layer
        count += 1
        del layer  # before the next is read
    if stacked is None or count != n_layers:
        raise ValueError(f"{name}: {count} layers, {n_layers} expected")
    return stacked
