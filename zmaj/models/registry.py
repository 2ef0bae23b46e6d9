"""The architectures zmaj implements, each as the handful of pure functions the rest of zmaj calls.

Code that works with any model (generation, fine-tuning, export, the programs) holds a config and params and
looks up the functions here by the config's type, rather than testing ``isinstance`` itself. A config is saved
as ``{"architecture": name, "config": {...}}`` (``config_to_json``), so a saved model says what it is.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from zmaj import specfile
from zmaj.models import gemma3, gpt, llama
from zmaj.models.common import Batch, CachedForward, LazyLogits
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig

ModelConfig = GPTConfig | LlamaConfig | Gemma3Config


@dataclass(frozen=True)
class Architecture:
    """One family's pure functions; each takes the family's config as ``config``."""

    name: str
    config_type: type[ModelConfig]
    init: Callable[..., TensorDict]
    forward: Callable[..., Tensor]
    lazy_forward: Callable[..., LazyLogits]
    hidden_states: Callable[..., Tensor]
    unembed: Callable[..., Tensor]
    forward_cached: Callable[..., tuple[Tensor, TensorDict]]

    def logits(self, params: TensorDictBase, batch: Batch, config: ModelConfig) -> Tensor:
        """Next-token logits at every position."""
        return self.forward(params, batch, config=config)

    def cached(self, config: ModelConfig) -> CachedForward:
        """The ``step(params, batch, cache, donate=False, last_only=False)`` of ``zmaj.infer.generate``."""

        def step(
            params: TensorDictBase,
            batch: Batch,
            cache: TensorDictBase,
            *,
            donate: bool = False,
            last_only: bool = False,
        ) -> tuple[Tensor, TensorDict]:
            return self.forward_cached(
                params, batch, cache, config=config, donate=donate, last_only=last_only
            )

        return step


ARCHITECTURES: dict[str, Architecture] = {
    "gpt": Architecture(
        "gpt",
        GPTConfig,
        gpt.init,
        gpt.forward,
        gpt.lazy_forward,
        gpt.hidden_states,
        gpt.unembed,
        gpt.forward_cached,
    ),
    "llama": Architecture(
        "llama",
        LlamaConfig,
        llama.init,
        llama.forward,
        llama.lazy_forward,
        llama.hidden_states,
        llama.unembed,
        llama.forward_cached,
    ),
    "gemma3": Architecture(
        "gemma3",
        Gemma3Config,
        gemma3.init,
        gemma3.forward,
        gemma3.lazy_forward,
        gemma3.hidden_states,
        gemma3.unembed,
        gemma3.forward_cached,
    ),
}


def architecture(config: ModelConfig) -> Architecture:
    """The architecture a config belongs to."""
    for arch in ARCHITECTURES.values():
        if type(config) is arch.config_type:
            return arch
    raise TypeError(f"{type(config).__name__} is not a zmaj model config")


def init_meta(config: ModelConfig) -> TensorDict:
    """The parameters' structure and shapes without memory: the template loaders check files against."""
    return architecture(config).init(config, 0, device=torch.device("meta"))


def config_to_json(config: ModelConfig) -> dict[str, Any]:
    return {"architecture": architecture(config).name, "config": config.model_dump(mode="json")}


def config_from_json(data: object, where: str) -> ModelConfig:
    """The config ``config_to_json`` wrote; ``where`` names the file in errors, which are one line each (a
    ``ValueError``): a hand-edited or damaged file is a user's input."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: not a model record (a JSON object with 'architecture' and 'config')")
    name = data.get("architecture")
    if name not in ARCHITECTURES:
        raise ValueError(f"{where}: unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return specfile.parse(ARCHITECTURES[name].config_type, data.get("config", {}), f"{where}: config")


HOW_NOT_WHAT = frozenset({"attention", "init_std", "unembed_init", "dropout"})
"""Config fields that leave the function a model's weights compute alone: how attention is computed (whose
default became ``auto`` after runs had recorded ``sdpa``), and what only training reads (the initialisation,
which a GGUF file does not record and a Hugging Face config does, and dropout)."""


def differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The fields in which ``a`` and ``b`` describe different models (``["architecture"]`` across families):
    empty where weights loaded under one compute what they compute under the other (:data:`HOW_NOT_WHAT`)."""
    if type(a) is not type(b):
        return ["architecture"]
    return [
        name
        for name in type(a).model_fields
        if name not in HOW_NOT_WHAT and getattr(a, name) != getattr(b, name)
    ]
