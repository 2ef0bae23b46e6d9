from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from zmaj.data.config import DataConfig, FilesSource, HubSource, StdlibSource


def test_defaults_are_the_offline_stdlib_corpus() -> None:
    config = DataConfig()
    assert config.source == StdlibSource()
    assert (config.mode, config.seq_len) == ("pack", 256)


def test_source_is_chosen_by_its_kind(jsonl_file: Path) -> None:
    spec = f"""
    source: {{kind: files, paths: [{jsonl_file}], format: jsonl}}
    seq_len: 64
    """
    config = DataConfig.model_validate(yaml.safe_load(spec))
    assert config.source == FilesSource(paths=[str(jsonl_file)], format="jsonl")
    hub = DataConfig.model_validate({"source": {"kind": "hub", "path": "json", "data_files": "x.jsonl"}})
    assert isinstance(hub.source, HubSource)
    assert hub.source.split == "train"


def test_missing_file_is_rejected_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ValidationError, match=r"paths[\s\S]*nowhere\.jsonl"):
        DataConfig.model_validate({"source": {"kind": "files", "paths": [str(missing)], "format": "jsonl"}})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("validation_fraction", 0.0),
        ("validation_fraction", 1.0),
        ("seq_len", 0),
        ("vocab_size", 100),
        ("mode", "chunk"),
        ("tokenizer_documents", 0),
        ("shuffle", True),
    ],
)
def test_bad_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        DataConfig.model_validate({field: value})


def test_unknown_source_kind_is_rejected() -> None:
    with pytest.raises(ValidationError, match="kind"):
        DataConfig.model_validate({"source": {"kind": "ftp"}})


def test_configs_are_frozen() -> None:
    with pytest.raises(ValidationError, match="frozen"):
        DataConfig().seq_len = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("source", "typo"),
    [
        ({"kind": "hub", "path": "json", "text_colum": "body"}, "text_colum"),
        ({"kind": "files", "format": "jsonl", "text_colum": "body"}, "text_colum"),
        ({"kind": "stdlib", "path": "x"}, "path"),
    ],
)
def test_a_typo_in_any_source_is_refused_naming_it(
    jsonl_file: Path, source: dict[str, object], typo: str
) -> None:
    """The config module promises that every model forbids unknown keys; the suite tried a typo at the top
    level only, so a source that ignored them read ``text`` for a misspelt ``text_column`` without a word."""
    if source["kind"] == "files":
        source = source | {"paths": [str(jsonl_file)]}
    complaint = rf"source\.{source['kind']}\.{typo}\s+Extra inputs are not permitted"
    with pytest.raises(ValidationError, match=complaint):
        DataConfig.model_validate({"source": source})


def test_vocab_size_must_hold_every_byte_and_every_special_token() -> None:
    """The bound is 256 + 7: the suite tried 100 only, so a bound of 256 passed, and a 260-token config
    trained a 263-token tokenizer."""
    with pytest.raises(ValidationError, match="vocab_size"):
        DataConfig(vocab_size=262)
    assert DataConfig(vocab_size=263).vocab_size == 263


def test_a_folder_given_as_a_data_file_is_refused_by_name(tmp_path: Path) -> None:
    """A folder exists but is no file: accepted, the corpus reader failed only when the data was prepared, with
    an ``IsADirectoryError``, where the spec can name it before anything runs."""
    folder = tmp_path / "shards"
    folder.mkdir()
    (tmp_path / "a.txt").write_text("text")
    for paths in ([folder], [tmp_path / "a.txt", folder]):  # each path is checked, not the first alone
        with pytest.raises(ValidationError, match=r"paths[\s\S]*data file\(s\) not found: .*shards"):
            DataConfig.model_validate(
                {"source": {"kind": "files", "paths": list(map(str, paths)), "format": "text"}}
            )
