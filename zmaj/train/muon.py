"""Muon for the hidden matrices, AdamW for the rest: a pure update over the training state's TensorDicts.

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/) keeps a momentum of the gradient, like SGD, and replaces each
matrix's update by its nearest semi-orthogonal matrix: ``U V^T`` where ``U S V^T`` is the update's SVD. Every
direction the update spans then moves by the same amount, so the rare directions that a raw gradient's few
large singular values drown out learn as fast as the common ones. Computing ``U V^T`` exactly (an SVD) is slow
on accelerators; a few Newton-Schulz iterations, a polynomial in ``X X^T`` applied to ``X``, get close with
matmuls only (:func:`orthogonalize`).

The argument is about matrices that map one hidden representation to another. Embedding rows are looked up,
not multiplied, the unembedding's rows are one per token, and norm scales, biases and scalars are not matrices:
AdamW updates those (Muon's authors do the same). One spec, :class:`MuonConfig`, names the matrices Muon takes
and configures AdamW for everything else.

The orthogonalised update has entries of size about ``1 / sqrt(max(rows, cols))``, far from AdamW's, so its
learning rate is scaled by the matrix's shape (``adjust_lr``): ``original`` is Keller Jordan's
``sqrt(max(1, rows / cols))``, with Muon's own learning rate (0.02 is usual); ``match_rms_adamw`` is
``0.2 * sqrt(max(rows, cols))``, which gives the update the root-mean-square AdamW's typically has, so that
Muon can reuse AdamW's learning rate and weight decay (Liu et al., 2025, "Muon is Scalable for LLM Training",
Moonshot AI, section 2.2).

The algorithm follows ``torch.optim.Muon`` (torch 2.9+) step for step (momentum, Nesterov, the Newton-Schulz
coefficients, the learning-rate adjustment, decoupled decay), so the two agree to float32 rounding wherever both
apply; the Newton-Schulz polynomial is not written as torch's fused ``addmm`` calls, so in bfloat16
(``ns_dtype``) they agree to bfloat16's rounding only. torch's handles one 2-D matrix at a time, this one a stack
of them as well (``[layers, out, in]`` blocks, orthogonalised in one batched call).
"""

import fnmatch
import math
from functools import partial
from typing import Annotated, Literal

import torch
from jaxtyping import Float
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj.train import precision
from zmaj.train.optim import AdamWConfig, AdamWGroup, adamw_init, adamw_update, leaf_keys, writable
from zmaj.train.parallel import SINGLE, Parallel

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic: chosen for the steepest slope at zero, so that small singular values grow fast,
at the price of not converging to exactly 1: 5 steps take every singular value of at least 0.0016 of the
Frobenius norm into [0.68, 1.21] (tests/unit/train/test_muon.py)."""
EPS = 1e-7
"""Guards the normalisation of an all-zero update (torch.optim.Muon's ``eps``)."""

Key = tuple[str, ...]


ADAMW_DEFAULTS = {"lr": 1e-3, "weight_decay": 0.0}
"""Muon's AdamW group's settings where they differ from AdamW alone: embeddings and norms undecayed."""


class MuonConfig(BaseModel):
    """Muon for the parameters ``muon_params`` names, AdamW (``adamw``) for those ``adamw_params`` names."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["muon"]
    lr: float = Field(0.02, gt=0, description="Muon's peak learning rate; the schedule scales it")
    momentum: float = Field(0.95, ge=0, lt=1)
    nesterov: bool = True
    ns_steps: int = Field(5, gt=0, lt=100, description="Newton-Schulz iterations")
    ns_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="what Newton-Schulz computes in: auto is bfloat16 where precision auto picks it (Ampere or "
        "later CUDA GPUs, CPUs with AVX512-BF16 or AMX), as torch.optim.Muon and Keller Jordan do, and float32 "
        "where bfloat16 matmuls would be emulated (on CPUs, about 100x slower)",
    )
    adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "original", description="original: Muon's own lr (0.02); match_rms_adamw: AdamW's lr works as is"
    )
    weight_decay: float = Field(0.0, ge=0, description="decoupled, as AdamW's: p -= lr * weight_decay * p")
    grad_clip: float | None = Field(1.0, gt=0, description="global grad-norm clip over all parameters")
    muon_params: list[str] | None = Field(
        None,
        description="dotted names (fnmatch patterns, e.g. blocks.attn.*.weight) Muon updates; None: every "
        "matrix under blocks",
    )
    adamw_params: list[str] = Field(["*"], description="patterns AdamW updates, of those Muon does not take")
    adamw: AdamWGroup = Field(
        AdamWGroup(**ADAMW_DEFAULTS),
        description="AdamW for the rest (lr 1e-3, no weight decay unless given); the schedule scales its lr by "
        "the same factor as Muon's",
    )

    @field_validator("adamw", mode="before")
    @classmethod
    def _over_the_defaults(cls, value: object) -> object:
        """A partial ``adamw:`` section changes only what it names: built alone, it took AdamWGroup's own
        defaults, so ``adamw: {lr: 3e-3}`` switched on a weight decay of 0.1."""
        return ADAMW_DEFAULTS | value if isinstance(value, dict) else value

    @property
    def decay_norms_and_biases(self) -> bool:
        """The AdamW group's (``zmaj.train.optim.decay_mask`` reads it; Muon's parameters are all matrices)."""
        return self.adamw.decay_norms_and_biases

    @property
    def groups(self) -> str:
        """Which parameters each optimizer updates, in words: what shapes the optimizer state, so that a resumed
        run may not change it."""
        muon = "every matrix under blocks" if self.muon_params is None else ", ".join(self.muon_params)
        return f"muon: {muon}; adamw: {', '.join(self.adamw_params)}"


def optimizer_kind(value: object) -> str:
    """The optimizer's ``kind``; a spec that names none is AdamW, as every spec was before Muon."""
    kind = value.get("kind", "adamw") if isinstance(value, dict) else getattr(value, "kind", "adamw")
    return str(kind)


OptimizerConfig = Annotated[
    Annotated[AdamWConfig, Tag("adamw")] | Annotated[MuonConfig, Tag("muon")], Discriminator(optimizer_kind)
]
"""A training spec's ``train.optimizer``: AdamW for everything (``kind: adamw``, the default) or Muon with AdamW
(``kind: muon``)."""


# ------------------------------------------------------------------------------------------------ the math


def orthogonalize(
    update: Float[Tensor, "*layers rows cols"], steps: int = 5, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "*layers rows cols"]:
    """Each matrix of ``update`` made nearly semi-orthogonal (singular values near 1, singular vectors kept)
    by ``steps`` Newton-Schulz iterations, computed in ``dtype``; leading dimensions are a batch of matrices.

    Each iteration maps ``X`` to ``a X + b (X X^T) X + c (X X^T)^2 X``, which is the odd polynomial
    ``a s + b s^3 + c s^5`` applied to each singular value ``s`` of ``X``, its singular vectors untouched. It
    pushes every ``s`` in (0, 1] towards 1; dividing by the Frobenius norm first, which bounds the largest
    singular value, puts them all there. Wide matrices keep ``X X^T`` the small Gram matrix, so tall ones are
    transposed before and after.
    """
    a, b, c = NS_COEFFICIENTS
    tall = update.shape[-2] > update.shape[-1]
    x: Tensor = update.to(dtype)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(update.dtype)


def newton_schulz_dtype(ns_dtype: str, device: torch.device) -> torch.dtype:
    """``MuonConfig.ns_dtype`` on ``device``. The default spec's 24 matrices take 39 ms per step in bfloat16 on a
    2-core CPU with AVX512-BF16, and 133 ms in float32, a fifth of that spec's 687 ms step then."""
    if ns_dtype == "auto":
        return precision.resolve("auto", device)
    return torch.bfloat16 if ns_dtype == "bfloat16" else torch.float32


def lr_scale(shape: torch.Size, adjust_lr: str) -> float:
    """What the learning rate of a ``[..., rows, cols]`` matrix is multiplied by (module docstring)."""
    rows, cols = shape[-2:]
    if adjust_lr == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


# ------------------------------------------------------------------------------------------------ groups


def matrix_dims(params: TensorDictBase, key: Key) -> int:
    """How many dimensions a parameter has besides its stacked-layer axes (2 for a matrix)."""
    layer_dims = (params.get(key[:-1]) if len(key) > 1 else params).batch_dims
    dims: int = params.get(key).ndim - layer_dims
    return dims


def param_groups(params: TensorDictBase, config: MuonConfig) -> tuple[list[Key], list[Key]]:
    """The keys Muon updates and those AdamW updates, in ``params``' order; a ValueError naming the parameter
    when Muon is given one that is not a matrix, when a parameter is in neither group, or when a ``muon_params``
    pattern names nothing or Muon gets no parameter at all (LoRA's adapters, say, which are not under
    ``blocks``): either would otherwise leave everything to AdamW without a word."""
    names = {".".join(key): key for key in leaf_keys(params)}

    def taken_by_muon(name: str) -> bool:
        if config.muon_params is None:
            return name.startswith("blocks.") and matrix_dims(params, names[name]) == 2
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in config.muon_params)

    for pattern in config.muon_params or []:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"train.optimizer.muon_params: {pattern!r} matches no parameter of this model")
    muon, adamw = [], []
    for name, key in names.items():
        if taken_by_muon(name):
            if matrix_dims(params, key) != 2:
                shape = list(params.get(key).shape)
                raise ValueError(
                    f"train.optimizer.muon_params: parameter {name} (shape {shape}) is not a matrix, and Muon "
                    "orthogonalises matrices; leave it to AdamW"
                )
            muon.append(key)
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in config.adamw_params):
            adamw.append(key)
        else:
            raise ValueError(
                f"train.optimizer: parameter {name} is in no group (neither muon_params nor adamw_params "
                "matches it)"
            )
    if not muon:
        raise ValueError(
            "train.optimizer: kind muon, but no parameter is Muon's (by default the matrices under blocks; "
            f"these are {', '.join(list(names)[:4])}{', ...' if len(names) > 4 else ''}): set muon_params, "
            "or use kind adamw"
        )
    return muon, adamw


def check_groups(params: TensorDictBase, optimizer: OptimizerConfig) -> None:
    """Fail, naming the parameter, when ``optimizer``'s groups do not fit ``params``: what a program checks
    before it trains, once the model's parameters are known (AdamW takes any)."""
    if isinstance(optimizer, MuonConfig):
        param_groups(params, optimizer)


# ------------------------------------------------------------------------------------------------ the update


def muon_init(params: TensorDictBase, config: MuonConfig) -> TensorDict:
    """AdamW's moments for its group, a zero momentum for Muon's, and one step counter: plain tensors, saved as
    ``optimizer.safetensors`` like AdamW's state (``m.embed.weight``, ``momentum.blocks.attn.q.weight``...)."""
    muon, _ = param_groups(params, config)
    adamw = adamw_init(params.exclude(*muon))
    momentum = params.detach().select(*muon).apply(torch.zeros_like)
    return TensorDict({"m": adamw["m"], "v": adamw["v"], "momentum": momentum, "step": adamw["step"]})


def muon_update(
    params: TensorDictBase,
    grads: TensorDictBase,
    state: TensorDictBase,
    config: MuonConfig,
    lr: float | Tensor,
    decay: TensorDictBase,
    donate: bool = False,
    parallel: Parallel = SINGLE,
) -> tuple[TensorDictBase, TensorDict]:
    """One step: Muon on the parameters ``state["momentum"]`` holds, AdamW on the rest (at ``lr`` scaled by
    ``adamw.lr / lr`` of the config, so that the schedule moves both together). Returns new parameters and
    state, the inputs untouched unless donated (``zmaj.train.optim.adamw_update``); ``decay`` is AdamW's mask.

    Per Muon matrix, as ``torch.optim.Muon``: the momentum ``B`` moves towards the gradient ``g`` by
    ``1 - momentum``; the update is ``B``, or with Nesterov ``g`` moved towards the new ``B`` by ``momentum``
    (a look-ahead); it is orthogonalised, and the parameter decays by ``lr * weight_decay`` (unscaled lr) and
    then moves by ``-lr * lr_scale * update``.

    On several ranks (``parallel``) the orthogonalising is split between them by layer
    (``Parallel.each_matrix``): each rank orthogonalises its share of a stacked tensor's matrices, and one
    all-gather per Muon tensor brings every rank the rest. Fully sharded, each rank holds some rows of every
    matrix, its parameter, gradient and momentum alike, while orthogonalising needs whole matrices: the update
    is all-gathered first, and each rank keeps its own rows of the result. The collectives move ``ns_dtype``
    (by default bf16 where bf16 matmuls are fast: half the bytes of float32).
    """
    muon = leaf_keys(state["momentum"])
    adamw_params, adamw_state = adamw_update(
        params.exclude(*muon),
        grads.exclude(*muon),
        state.select("m", "v", "step"),
        config.adamw,
        lr * (config.adamw.lr / config.lr),
        decay.exclude(*muon),
        donate,
    )
    mu = config.momentum
    muon_grads = grads.select(*muon)
    # Each operation written into its operand, on copies unless donated (as zmaj.train.optim.adamw_update).
    momentum, muon_params = writable(state["momentum"], donate), writable(params.select(*muon), donate)
    for key in muon:
        p, b, g = muon_params.get(key), momentum.get(key), muon_grads.get(key)
        b.lerp_(g, 1 - mu)
        # Cast before the collectives: Newton-Schulz casts first anyway, so bf16 moves half the bytes for the
        # same values.
        ns_dtype = newton_schulz_dtype(config.ns_dtype, p.device)
        update = (g.lerp(b, mu) if config.nesterov else b).to(ns_dtype)
        ns = partial(orthogonalize, steps=config.ns_steps, dtype=ns_dtype)
        direction = parallel.each_matrix(muon_params, key, update, ns)
        change = (
            lr * lr_scale(parallel.whole_shape(muon_params, key), config.adjust_lr) * direction.to(p.dtype)
        )
        p.mul_(1 - lr * config.weight_decay).sub_(change)
    new_params = params.copy().update(adamw_params).update(muon_params)  # in params' key order
    opt = {"m": adamw_state["m"], "v": adamw_state["v"], "momentum": momentum, "step": adamw_state["step"]}
    return new_params, TensorDict(opt)
