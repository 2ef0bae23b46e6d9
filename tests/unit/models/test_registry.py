"""What makes two model configs the same model."""

import pytest

from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import HOW_NOT_WHAT, ModelConfig, differences


def test_how_a_model_is_computed_or_trained_is_no_difference_and_other_fields_are_named() -> None:
    """Runs recorded ``attention: sdpa`` before the default became ``auto``; a LoRA run's base loaded today
    has ``auto``, and is the same model. A GGUF file records no ``init_std``, a Hugging Face config does: a GRPO
    reference in the other format of the same model is the same model."""
    gpt = GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2)
    training = {"attention": "sdpa", "init_std": 0.04, "dropout": 0.1, "unembed_init": "zero"}
    assert differences(gpt, gpt.model_copy(update=training)) == []
    assert differences(gpt, gpt.model_copy(update={"n_layers": 3, "norm_eps": 1e-6})) == [
        "n_layers",
        "norm_eps",
    ]
    llama = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    assert differences(gpt, llama) == ["architecture"]
    assert differences(llama, llama.model_copy(update={"init_std": 0.0417, "rope_base": 1e5})) == [
        "rope_base"
    ]


@pytest.mark.parametrize(
    "config",
    [
        GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2),
        LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64),
        Gemma3Config(vocab_size=64, d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=64),
    ],
    ids=lambda config: type(config).__name__,
)
def test_every_other_field_makes_another_model(config: ModelConfig) -> None:
    """A field added to a config counts unless it is put in HOW_NOT_WHAT on purpose, which is pinned here."""
    assert {"attention", "init_std", "unembed_init", "dropout"} == HOW_NOT_WHAT
    for name in type(config).model_fields:
        other = config.model_copy(update={name: object()})  # unvalidated: any other value
        assert differences(config, other) == ([] if name in HOW_NOT_WHAT else [name]), name
