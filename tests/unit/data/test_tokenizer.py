import errno
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import tokenizers
from hypothesis import example, given
from hypothesis import strategies as st

from tests.strategies import seeds
from zmaj.data.config import DataConfig, FilesSource
from zmaj.data.corpus import source_key
from zmaj.data.tokenizer import (
    EOS,
    SPECIAL_TOKENS,
    TOKENIZER_VERSION,
    USER,
    Tokenizer,
    _sample,
    check_unchanged,
    load_or_train,
    tokenizer_path,
)

SPECIAL_TEXT = "".join(SPECIAL_TOKENS)


@given(st.text())
@example(SPECIAL_TEXT)
@example("  leading spaces,\ttabs\r\nand CRLF ")
@example("emoji 🐍, combining e\u0301, CJK 蛇, NUL \x00")
def test_decode_inverts_encode(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@given(st.text())
@example(SPECIAL_TEXT)
def test_token_bytes_count_the_utf8_bytes_exactly(tokenizer: Tokenizer, text: str) -> None:
    counts = tokenizer.token_bytes()
    assert int(counts[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))


@given(st.lists(st.text(), max_size=5))
@example([SPECIAL_TEXT, "x" + EOS])
def test_text_never_encodes_to_a_special_token(tokenizer: Tokenizer, texts: list[str]) -> None:
    specials = {tokenizer.token_id(t) for t in SPECIAL_TOKENS}
    batch = tokenizer.encode_batch(texts)
    assert batch == [tokenizer.encode(t) for t in texts]
    assert not specials.intersection(i for ids in batch for i in ids)


def test_special_tokens_come_first_and_stand_for_no_bytes(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.token_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    counts = tokenizer.token_bytes()
    assert counts.shape == (tokenizer.vocab_size,)
    assert counts[ids].eq(0).all()
    assert counts[len(ids) :].ge(1).all()
    assert (
        tokenizer.decode([tokenizer.token_id(USER), *tokenizer.encode("hi"), tokenizer.eos_id])
        == f"{USER}hi{EOS}"
    )
    with pytest.raises(KeyError, match="special"):
        tokenizer.token_id("<|tool|>")


def test_training_fills_the_vocabulary_deterministically(
    tokenizer: Tokenizer, sample_texts: list[str]
) -> None:
    assert tokenizer.vocab_size == 400  # the fixture's request: the sample is large enough to fill it
    assert Tokenizer.train(sample_texts, tokenizer.vocab_size).fingerprint() == tokenizer.fingerprint()
    # Merges learn the corpus: real text costs far fewer tokens than bytes.
    text = sample_texts[0]
    assert len(tokenizer.encode(text)) < 0.6 * len(text.encode())


@given(st.integers(0, 30), st.integers(1, 30), seeds)
def test_sample_is_a_seeded_subsequence(n: int, k: int, seed: int) -> None:
    texts = [f"t{i}" for i in range(n)]
    sample = _sample(texts, k, seed)
    assert sample == _sample(texts, k, seed)
    assert len(sample) == min(n, k)
    assert sample == [t for t in texts if t in set(sample)]


def test_save_load_round_trip_is_atomic(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "tokenizer.json"
    tokenizer.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    text = "def f(x):\n    return x  # ünïcödé " + EOS
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.token_bytes().equal(tokenizer.token_bytes())


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_one(
    tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk shows at the write or at the flush to disk, which a save must do before its rename (else a
    power cut may leave an empty file under the final name)."""
    path = tmp_path / "tokenizer.json"
    path.write_text("old")

    def full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        tokenizer.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    assert path.read_text() == "old"


def test_a_resume_with_another_corpus_tokenizer_is_refused(
    tokenizer: Tokenizer, sample_texts: list[str], tmp_path: Path
) -> None:
    """Resuming after the corpus changed (the cache then trains another tokenizer) would feed the checkpoint
    ids that mean other text; the same corpus trains the same tokenizer, which passes."""
    saved = tmp_path / "tokenizer.json"
    tokenizer.save(saved)
    check_unchanged(saved, Tokenizer.train(sample_texts, tokenizer.vocab_size))
    with pytest.raises(ValueError, match=r"tokenizer\.json differs from the tokenizer .* corpus changed"):
        check_unchanged(saved, Tokenizer.train(sample_texts[1:], tokenizer.vocab_size))


def test_load_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        Tokenizer.load(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match=r"garbage\.bin: not UTF-8 text \(byte 0x89 at offset 0\)"):
        Tokenizer.load(garbage)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ValueError, match="not a tokenizer file"):
        Tokenizer.load(config)
    # JSON the tokenizers library rejects (it raises a bare Exception naming no file)
    wrong_model = tmp_path / "wrong_model.json"
    wrong_model.write_text(json.dumps({"model": "BPE"}))
    with pytest.raises(ValueError, match=r"wrong_model\.json is not a tokenizer file: data did not match"):
        Tokenizer.load(wrong_model)
    foreign = tmp_path / "foreign.json"
    tokenizers.Tokenizer(tokenizers.models.BPE()).save(str(foreign))
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.load(foreign)


def test_load_or_train_trains_once(jsonl_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = DataConfig(source=FilesSource(paths=[str(jsonl_file)], format="jsonl"), vocab_size=300)
    first = load_or_train(config, tmp_path, seed=0)

    def fail(*args: object, **kwargs: object) -> Tokenizer:
        raise AssertionError("trained again instead of loading the cached tokenizer")

    monkeypatch.setattr(Tokenizer, "train", fail)
    assert load_or_train(config, tmp_path, seed=0).fingerprint() == first.fingerprint()
    with pytest.raises(AssertionError, match="trained again"):
        load_or_train(config.model_copy(update={"vocab_size": 301}), tmp_path, seed=0)


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EROFS])
def test_a_cache_that_cannot_be_written_is_one_line_naming_it(
    jsonl_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int
) -> None:
    """Met once the tokenizer is trained, which may have taken minutes: the traceback of a full disk or a
    read-only cache became a ``ValueError`` naming the folder and what to do, which programs say in one line."""
    config = DataConfig(source=FilesSource(paths=[str(jsonl_file)], format="jsonl"), vocab_size=300)

    def refused(descriptor: int) -> None:
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(os, "fsync", refused)
    with pytest.raises(
        ValueError, match=rf"cannot write the trained tokenizer in {tmp_path} \({os.strerror(failure)}\); "
    ):
        load_or_train(config, tmp_path, seed=0)
    assert not list(tmp_path.rglob("*.json"))  # nothing cached that a later run would trust


def test_the_tokenizer_sample_is_uniform_and_picked_by_the_seed() -> None:
    """``max_texts`` promises a seeded *uniform* sample: the suite checked only that it is a seeded
    subsequence, so a sampler that kept the last k texts (``randrange(k)``), favoured late texts
    (``randrange(index)``, the classic off-by-one of algorithm R) or ignored the seed passed. Each of 5 texts
    must be in a sample of 2 about 2/5 of the time over many seeds (5 sigma is 0.055)."""
    texts = [f"t{i}" for i in range(5)]
    seeds = range(2000)
    counts = Counter(text for seed in seeds for text in _sample(texts, 2, seed))
    for text in texts:
        assert abs(counts[text] / len(seeds) - 2 / 5) < 0.055, counts


def test_the_cached_tokenizer_is_keyed_by_its_sample_size_and_the_seed_that_draws_it(
    jsonl_file: Path, tmp_path: Path
) -> None:
    """Another ``tokenizer_documents``, or another seed drawing the sample, trains another tokenizer: keyed
    without either, the cache handed the tokenizer of the earlier setting to the run (the suite changed only
    vocab_size)."""
    config = DataConfig(source=FilesSource(paths=[str(jsonl_file)], format="jsonl"), vocab_size=300)
    sampled = config.model_copy(update={"tokenizer_documents": 10})
    path = tokenizer_path(sampled, tmp_path, seed=0)
    assert tokenizer_path(sampled, tmp_path, seed=0) == path
    assert tokenizer_path(sampled, tmp_path, seed=1) != path
    assert tokenizer_path(config, tmp_path, seed=0) != path


def test_without_a_sample_every_seed_shares_one_cached_tokenizer(jsonl_file: Path, tmp_path: Path) -> None:
    """BPE on every text has no randomness, so a sweep over ``train.seed`` trained the same tokenizer again for
    each seed; now the second seed loads the first one's, which is the tokenizer it would have trained."""
    config = DataConfig(source=FilesSource(paths=[str(jsonl_file)], format="jsonl"), vocab_size=300)
    first = load_or_train(config, tmp_path / "cache", seed=0)
    assert tokenizer_path(config, tmp_path / "cache", seed=1) == tokenizer_path(config, tmp_path / "cache", 0)
    trained = load_or_train(config, tmp_path / "elsewhere", seed=1)
    assert trained.fingerprint() == first.fingerprint()
    # Seed 0's entry as it was keyed before: the tokenizers cached then are found, not trained again.
    source = source_key(config.source, "train", config.validation_fraction)
    identity = [source, config.vocab_size, None, 0, TOKENIZER_VERSION, tokenizers.__version__]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    assert tokenizer_path(config, tmp_path, seed=7) == tmp_path / "tokenizers" / f"{key}.json"
