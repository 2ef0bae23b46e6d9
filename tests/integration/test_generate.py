"""Cached greedy generation from a Hugging Face checkpoint picks the tokens that ``transformers``' own ``generate``
picks.

Each reference is a small random model saved with ``save_pretrained`` and read back by ``zmaj.convert.hf``, so
the test covers loading, the cached forward pass and the generation loop together. The prompts run as one
left-padded batch on zmaj's side and one at a time on the ``transformers`` side.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.integration import parity
from tests.integration.test_llama_parity import NO_SPECIAL_TOKENS
from zmaj.convert import hf
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import generate
from zmaj.models import llama

VOCAB = 128
NEW_TOKENS = 20
SMALL: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    # Larger than the usual 0.02, so the next-token distributions are sharp and argmax ties unlikely.
    "initializer_range": 0.1,
}
REFERENCES: dict[str, transformers.PretrainedConfig] = {
    "llama": transformers.LlamaConfig(**SMALL, tie_word_embeddings=False),
    "qwen3": transformers.Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=True),
    "mistral": transformers.MistralConfig(**SMALL, head_dim=24, sliding_window=None),
    "smollm3": transformers.SmolLM3Config(**SMALL, no_rope_layers=[1, 0], **NO_SPECIAL_TOKENS),
    # A window of 8: the prompts' and the answers' later tokens see only their last 8 keys in the cache.
    "mistral-window": transformers.MistralConfig(**SMALL, sliding_window=8),
}
PROMPTS = [[3, 77, 12, 5, 101, 64, 9, 33, 2, 90, 45, 7], [14, 8, 120, 61, 5]]


@pytest.fixture(scope="module", params=list(REFERENCES))
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[transformers.PreTrainedModel, Path]:
    model = parity.random_reference(REFERENCES[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


def test_greedy_tokens_equal_transformers_generate(saved: tuple[transformers.PreTrainedModel, Path]) -> None:
    model, folder = saved
    config, params = hf.load_hf(folder)
    assert isinstance(config, llama.LlamaConfig)
    cache = init_cache(config, len(PROMPTS), max(map(len, PROMPTS)) + NEW_TOKENS)
    ours = generate(llama.cached(config), params, cache, PROMPTS, NEW_TOKENS)
    # Random models emit the config's end-of-sequence id like any other; transformers must not stop at it.
    model.generation_config.eos_token_id = None
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            reference = model.generate(  # type: ignore[operator]
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        assert len(tokens) == NEW_TOKENS
        assert tokens == reference[0, len(prompt) :].tolist()
