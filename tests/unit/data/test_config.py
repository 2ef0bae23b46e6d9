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
