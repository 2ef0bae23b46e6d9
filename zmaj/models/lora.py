"""LoRA: fine-tune a frozen model through low-rank updates of chosen weight matrices.

Hu et al. (2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685, eq. 3) replace a
pretrained ``W`` (``[d_out, d_in]``) by ``W + (alpha / r) B A`` with ``A: [r, d_in]``, ``B: [d_out, r]`` and
``r`` far below either dimension, and train only ``A`` and ``B``. ``A`` starts random and ``B`` at zero, so
training starts from the pretrained model exactly; ``alpha / r`` keeps the update's size steady when ``r``
changes.

Here the adapters are a TensorDict of their own, stacked over layers like the blocks they adapt
(``adapters["attn", "q", "a"]`` is ``[n_layers, r, d_in]``), so training them is
``zmaj.train.step.train_step`` over that TensorDict with the base closed over (:func:`lora_forward`). Two ways
to run the adapted model: :func:`merge` adds ``scale * B A`` into the weights (what one ships after training),
:func:`attach` puts the factors next to the weights so that ``zmaj.nn.layers.linear`` computes
``x W^T + scale (x A^T) B^T`` without forming the full-size update. They agree to float rounding.
"""

import math
from fnmatch import fnmatchcase
from typing import TypeVar, cast

import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Field
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.models.common import Batch, Forward, LazyForward, LazyLogits
from zmaj.specfile import Seed

F = TypeVar("F", Forward, LazyForward)


class LoraConfig(BaseModel):
    """Which block matrices get adapters (``fnmatch`` patterns over names like ``attn.q``, ``mlp.*``), and how."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    targets: tuple[str, ...] = Field(("attn.q", "attn.v"), min_length=1)
    seed: Seed = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def matrix_names(params: TensorDictBase) -> list[str]:
    """The dotted names of the blocks' weight matrices (``attn.q``, ``mlp.down``, ...): what targets can match."""
    blocks = params["blocks"]
    names = [
        ".".join(key[:-1])
        for key in blocks.keys(include_nested=True, leaves_only=True)
        if key[-1] == "weight" and blocks.get(key).ndim == blocks.batch_dims + 2
    ]
    return sorted(names)


def targeted(params: TensorDictBase, config: LoraConfig) -> list[str]:
    """The matrix names ``config.targets`` select; a pattern that selects nothing is an error, not a no-op."""
    available = matrix_names(params)
    for pattern in config.targets:
        if not any(fnmatchcase(name, pattern) for name in available):
            raise ValueError(
                f"LoRA target {pattern!r} matches no matrix; the blocks' matrices are {available}"
            )
    return [name for name in available if any(fnmatchcase(name, pattern) for pattern in config.targets)]


def init_adapters(params: TensorDictBase, config: LoraConfig) -> TensorDict:
    """``A`` uniform in +-1/sqrt(d_in), ``B`` zero, for every targeted matrix of every layer.

    The paper says "random Gaussian" for ``A``; its reference code (loralib) and PEFT use ``nn.Linear``'s
    Kaiming-uniform init, whose bound is 1/sqrt(d_in). Either way ``B = 0`` makes the update zero at first.
    """
    blocks = params["blocks"]
    generator = torch.Generator().manual_seed(config.seed)
    adapters = TensorDict({}, batch_size=blocks.batch_size, device=params.device)
    for name in targeted(params, config):
        path = tuple(name.split("."))
        weight: Tensor = blocks.get((*path, "weight"))
        layers, d_out, d_in = weight.shape
        bound = 1 / math.sqrt(d_in)
        a = (torch.rand(layers, config.rank, d_in, generator=generator) * 2 - 1) * bound
        adapters.set((*path, "a"), a.to(weight.device, weight.dtype))
        adapters.set(
            (*path, "b"), torch.zeros(layers, d_out, config.rank, dtype=weight.dtype, device=weight.device)
        )
    return adapters


def _adapted_paths(adapters: TensorDictBase) -> list[tuple[str, ...]]:
    return sorted({key[:-1] for key in adapters.keys(include_nested=True, leaves_only=True)})


def delta(
    adapters: TensorDictBase, path: tuple[str, ...], config: LoraConfig
) -> Float[Tensor, "layers d_out d_in"]:
    """The full-size update ``scale * B A`` of one adapted matrix, for every layer."""
    b: Tensor = adapters.get((*path, "b"))
    a: Tensor = adapters.get((*path, "a"))
    return config.scale * (b @ a)


def merge(
    params: TensorDictBase, adapters: TensorDictBase, config: LoraConfig, dtype: torch.dtype | None = None
) -> TensorDictBase:
    """The params with ``W + scale * B A`` in place of each adapted ``W``; differentiable in the adapters.

    The inputs are untouched: the result is a new TensorDict that shares every tensor it does not replace (or,
    with ``dtype``, holds it cast). ``dtype`` casts each merged weight as it is made: merging every weight in
    float32 and casting the whole afterwards (GRPO's bf16 sampler) held all the adapted weights in float32 at
    once, 28 GB for an 8B model's.
    """
    merged = params.clone(recurse=False)
    for path in _adapted_paths(adapters):
        key = ("blocks", *path, "weight")
        weight = params.get(key)
        # In the weight's dtype: float32 adapters over a bf16 base would otherwise promote only these weights.
        merged.set(key, (weight + delta(adapters, path, config)).to(dtype or weight.dtype))
    return merged if dtype is None else merged.to(dtype)


def attach(params: TensorDictBase, adapters: TensorDictBase, config: LoraConfig) -> TensorDictBase:
    """The params with ``lora_a = A`` and ``lora_b = scale * B`` next to each adapted weight (the unmerged path).

    ``zmaj.nn.layers.linear`` then adds ``(x A^T)(scale B)^T`` to ``x W^T``: two thin matmuls through the rank-r
    bottleneck, and no ``[d_out, d_in]`` update in memory.
    """
    attached = params.clone(recurse=False)
    for path in _adapted_paths(adapters):
        attached.set(("blocks", *path, "lora_a"), adapters.get((*path, "a")))
        attached.set(("blocks", *path, "lora_b"), config.scale * adapters.get((*path, "b")))
    return attached


def lora_forward(forward: F, base: TensorDictBase, config: LoraConfig, merged: bool = False) -> F:
    """A forward (:class:`Forward`, or a :class:`LazyForward` for a chunked loss) whose params are the adapters,
    the frozen ``base`` closed over.

    ``train_step(init_state(adapters), ..., forward=lora_forward(forward, base, config))`` then trains the
    adapters alone: the gradient is taken only with respect to what the forward is given. ``merged`` picks
    :func:`merge` over :func:`attach`; the two compute the same function.
    """

    def adapted(params: TensorDictBase, batch: Batch, *, dropout_seed: int | None) -> Tensor | LazyLogits:
        full = merge(base, params, config) if merged else attach(base, params, config)
        return forward(full, batch, dropout_seed=dropout_seed)

    return cast(F, adapted)
