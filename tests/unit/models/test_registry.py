"""What makes two model configs the same model."""

from zmaj.models.gpt import GPTConfig
from zmaj.models.llama import LlamaConfig
from zmaj.models.registry import differences


def test_the_attention_backend_is_no_difference_and_other_fields_are_named() -> None:
    """Runs recorded ``attention: sdpa`` before the default became ``auto``; a LoRA run's base loaded today
    has ``auto``, and is the same model."""
    gpt = GPTConfig(vocab_size=64, context=16, d_model=32, n_layers=2, n_heads=2)
    assert differences(gpt, gpt.model_copy(update={"attention": "sdpa"})) == []
    assert differences(gpt, gpt.model_copy(update={"n_layers": 3, "norm_eps": 1e-6})) == [
        "n_layers",
        "norm_eps",
    ]
    llama = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64)
    assert differences(gpt, llama) == ["architecture"]
