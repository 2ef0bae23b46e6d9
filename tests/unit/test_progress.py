"""The progress helper: rank 0 logs what it does and draws a bar with the count out of the total to stderr; other
ranks draw nothing."""

from collections.abc import Callable

import pytest
import torch.distributed as dist
from loguru import logger

from zmaj.progress import is_main_process, progress


def logged(run: Callable[[], object]) -> list[str]:
    """The messages loguru received while ``run()`` ran."""
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="INFO")
    try:
        run()
    finally:
        logger.remove(sink)
    return messages


def test_rank_0_says_what_and_shows_count_out_of_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert is_main_process()
    messages = logged(lambda: list(progress(range(7), 7, "counting 7 things", unit="thing")))
    err = capsys.readouterr().err
    assert messages == ["counting 7 things"]
    assert "7/7" in err
    assert "thing" in err


def test_a_bar_advanced_by_hand_counts_the_units(capsys: pytest.CaptureFixture[str]) -> None:
    with progress(None, 10, "sampling 10 answers", unit="answer") as bar:
        bar.update(4)
        bar.update(6)
    assert "10/10" in capsys.readouterr().err


def test_other_ranks_draw_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert not is_main_process()
    assert list(progress(range(7), 7, "counting 7 things")) == list(range(7))
    assert capsys.readouterr().err == ""
