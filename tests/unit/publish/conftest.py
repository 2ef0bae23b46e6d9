"""A tiny model to describe, export and check, shared by the publishing tests."""

import pytest

from zmaj.convert.load import Pretrained
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.models import gpt


@pytest.fixture(scope="module")
def model() -> Pretrained:
    config = gpt.GPTConfig(vocab_size=300, context=16, d_model=64, n_layers=1, n_heads=2)
    tokenizer = ModelTokenizer.from_zmaj(
        Tokenizer.train(["some text here, and more text"] * 20, vocab_size=300)
    )
    return Pretrained(config, gpt.init(config, 0), tokenizer)
