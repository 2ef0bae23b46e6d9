"""``export_model`` refuses what it cannot write faithfully, before anything is written."""

from pathlib import Path

import pytest
import torch

from zmaj.convert.load import Pretrained, save_zmaj
from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer
from zmaj.models import gpt
from zmaj.publish.export import export_model


def test_weights_past_the_range_of_the_export_type_are_refused(tmp_path: Path) -> None:
    """float16 holds at most 65504: a weight of 1e5 became inf in the exported file, without a word."""
    config = gpt.GPTConfig(vocab_size=300, context=16, d_model=16, n_layers=2, n_heads=2)
    params = gpt.init(config, 0)
    params["embed", "weight"][3, 1] = 1e5
    tokenizer = Tokenizer.train(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    save_zmaj(Pretrained(config, params, ModelTokenizer.from_zmaj(tokenizer)), tmp_path / "model")
    with pytest.raises(
        ValueError,
        match=r"the weights of embed\.weight overflow float16, whose largest value is 65504: use a wider type",
    ):
        export_model(tmp_path / "model", tmp_path / "out", license="mit", dtype=torch.float16)
    assert not (tmp_path / "out").exists()
    export_model(tmp_path / "model", tmp_path / "out", license="mit", dtype=torch.bfloat16)  # in range there
    assert (tmp_path / "out" / "model.safetensors").is_file()
