"""What makes two model configs the same model."""

import pytest
import torch

from zmaj.infer.cache import init_cache
from zmaj.models.common import Batch
from zmaj.models.gemma3 import Gemma3Config
from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import HOW_NOT_WHAT, ModelConfig, architecture, config_from_json, differences


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


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"architecture": "mamba", "config": {}},
            r"model\.json: unknown architecture 'mamba'; known: gpt, llama",
        ),
        ({"config": {"vocab_size": 64}}, r"model\.json: unknown architecture None; known: gpt"),
        ([{"architecture": "gpt"}], r"model\.json: not a model record"),
    ],
    ids=["unknown", "unnamed", "not a mapping"],
)
def test_a_model_record_of_no_known_architecture_is_refused_naming_the_file(
    data: object, message: str
) -> None:
    """A hand-edited or damaged ``model.json`` is a user's input: a one-line error naming the file and the known
    architectures, which the programs print, rather than a ``KeyError`` traceback."""
    with pytest.raises(ValueError, match=message):
        config_from_json(data, "model.json")


TINY: dict[str, ModelConfig] = {
    "gpt": GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2, init_std=0.1),
    "llama": LlamaConfig(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2, d_ff=48, init_std=0.1),
    # A cap below the logits' spread: a path that skips it gives other logits.
    "gemma3-softcap": Gemma3Config(
        vocab_size=64,
        context=16,
        d_model=32,
        n_layers=2,
        n_heads=2,
        head_dim=16,
        d_ff=48,
        final_logit_softcap=0.5,
        init_std=0.5,
    ),
}
# Gemma 2: soft-capped attention scores too, and no QK-norm.
TINY["gemma2"] = Gemma3Config.model_validate(
    TINY["gemma3-softcap"].model_dump()
    | {
        "layer_types": ("sliding_attention", "full_attention"),
        "sliding_window": 4,
        "qk_norm": False,
        "attn_logit_softcap": 0.5,
    }
)


@pytest.mark.parametrize("name", list(TINY))
def test_the_registrys_functions_compose_to_its_forward(name: str) -> None:
    """The perplexity program and the eval harness call ``hidden_states`` then ``unembed`` (a chunk of positions
    at a time, never the whole ``[batch, seq, vocab]``), and generation's prefill asks the cached step for the
    last position's logits alone. Each must give ``forward``'s logits: a Gemma unembedding without its logit
    soft-cap scores another model than the one that generates, and a prefill that got every position's logits
    held the whole prompt's (its memory peak)."""
    config = TINY[name]
    arch = architecture(config)
    params = arch.init(config, 0)
    batch = Batch(tokens=torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0)))
    logits = arch.forward(params, batch, config=config)
    composed = arch.unembed(params, arch.hidden_states(params, batch, config=config), config=config)
    torch.testing.assert_close(composed, logits, rtol=0, atol=1e-6)
    last, _ = arch.cached(config)(params, batch, init_cache(config, 2, 12), last_only=True)
    assert last.shape == (2, 1, 64)
    torch.testing.assert_close(last, logits[:, -1:], rtol=0, atol=1e-5)
