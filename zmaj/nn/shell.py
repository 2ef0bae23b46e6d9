"""The thin ``nn.Module`` shell around a pure model.

A shell registers the leaves of a parameter TensorDict as its own ``nn.Parameter``s (one submodule per nested
key) and its ``forward`` calls the model's pure function on them. So ``params.to_module(shell)`` and
``torch.func.functional_call(shell, ...)`` see exactly the TensorDict that ``init`` built, and optimisers, hooks
and ``state_dict`` work as with any module. ``TensorDict.from_module(shell)`` rebuilds its tree but not the
stacked blocks' ``[n_layers]`` batch size, which ``Shell.params()`` puts back.
"""

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn


class Shell(nn.Module):
    """Owns a parameter TensorDict as module parameters; subclasses only forward to a pure function."""

    def __init__(self, params: TensorDictBase) -> None:
        super().__init__()
        _register(self, params)
        # from_module rebuilds the tree but not the batch sizes (e.g. the [n_layers] of stacked blocks).
        self._batch_sizes = {
            key: value.batch_size
            for key, value in params.items(include_nested=True)
            if isinstance(value, TensorDictBase) and value.batch_size
        }

    def params(self) -> TensorDictBase:
        """The parameters as a TensorDict; under ``functional_call`` or ``to_module`` these are the swapped ones."""
        params: TensorDictBase = TensorDict.from_module(self)
        for key, size in self._batch_sizes.items():
            params.get(key).batch_size = size
        return params


def _register(module: nn.Module, params: TensorDictBase) -> None:
    for key, value in params.items():
        if isinstance(value, TensorDictBase):
            child = nn.Module()
            module.add_module(key, child)
            _register(child, value)
        else:
            assert isinstance(value, torch.Tensor)
            module.register_parameter(key, nn.Parameter(value, requires_grad=value.is_floating_point()))
