"""ModelTokenizer's save/load round trip keeps every convention, the stop tokens included."""

import json
from pathlib import Path

from zmaj.data.model_tokenizer import ModelTokenizer
from zmaj.data.tokenizer import Tokenizer


def test_save_then_load_keeps_the_conventions_and_the_models_generation_config(tmp_path: Path) -> None:
    tokenizer = ModelTokenizer.from_zmaj(Tokenizer.train(["hello world, hello chat"] * 10, vocab_size=280))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "max_length": 77}))
    tokenizer.save(tmp_path)
    loaded = ModelTokenizer.load(tmp_path)
    assert loaded.stop_ids == tokenizer.stop_ids
    assert len(tokenizer.stop_ids) == 2
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
    assert (loaded.add_bos, loaded.chat_template) == (tokenizer.add_bos, tokenizer.chat_template)
    assert loaded.encode("hello chat") == tokenizer.encode("hello chat")
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_length"] == 77
