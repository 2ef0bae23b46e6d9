"""``needs``: a missing extra's package becomes one line naming the extra; every other failed import stays itself
(the whole-install checks, which build environments without the extras, are in tests/integration/test_extras.py)."""

import sys

import pytest

from zmaj.extras import MissingExtraError, needs


def test_a_missing_package_of_the_extra_is_named_with_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf.quants", None)  # an import of it fails as if not installed
    with (
        pytest.raises(
            MissingExtraError, match=r"^loading a GGUF file needs the 'gguf' extra: .*\(gguf is not"
        ),
        needs("gguf", "loading a GGUF file"),
    ):
        import gguf.quants  # noqa: F401


def test_another_failed_import_is_raised_as_it_is() -> None:
    """A module missing that no extra installs is a bug (a typo, a broken install), not advice to pip install."""
    with pytest.raises(ModuleNotFoundError) as raised, needs("gguf", "loading a GGUF file"):
        import zmaj_no_such_module  # noqa: F401
    assert not isinstance(raised.value, MissingExtraError)


def test_an_unknown_extra_is_refused_naming_the_extras() -> None:
    refusal = "unknown extra 'nope'; the extras are gguf, hub, eval, trackers"
    with pytest.raises(ValueError, match=refusal), needs("nope", "anything"):
        pass
