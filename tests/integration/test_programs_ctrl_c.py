"""Ctrl-C, in every program: one line and a shell's status for SIGINT (130), never a traceback from inside
whatever was running, and nothing half-written (``runs.ctrl_c_exits_130``)."""

import argparse
from pathlib import Path

import pytest

import zmaj.convert.load
from tests.integration import finetune_fixtures
from tests.integration.programs import ROOT, ctrl_c, interrupted, run_program

PROGRAMS = sorted(path.name for path in (ROOT / "programs").glob("*.py"))


def said(stderr: str) -> list[str]:
    """What the program logged, less its progress (INFO lines, and the bars of the weights' writing)."""
    levels = ("DEBUG", "WARNING", "ERROR", "CRITICAL")
    return [line for line in stderr.splitlines() if line.startswith(levels)]


@pytest.mark.parametrize("program", PROGRAMS)
def test_a_ctrl_c_is_one_line_and_status_130(program: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every program, interrupted while it reads its arguments: the Ctrl-C could come anywhere, and each
    program's ``main`` runs whole inside the wrapper."""
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", ctrl_c)
    done = interrupted(program)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    lines = said(done.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("WARNING | interrupted (Ctrl-C)")


@pytest.mark.parametrize("program", ["export.py", "convert.py"])
def test_a_ctrl_c_while_a_model_folder_replaces_another_keeps_the_old_one(
    program: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted as the written folder was about to replace the earlier one: the earlier one is whole and
    as it was, no staged copy is left beside it, and the line says so."""
    model = finetune_fixtures.tiny_model(tmp_path / "models" / "tiny")
    out = tmp_path / "out"
    extra = ["--license", "mit"] if program == "export.py" else []  # a folder without a card names none
    assert run_program(program, model, out, *extra).returncode == 0
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    monkeypatch.setattr(zmaj.convert.load, "replace_folder", ctrl_c)
    done = interrupted(program, model, out, *extra)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    assert said(done.stderr) == [
        f"WARNING | interrupted (Ctrl-C); {'OUT_DIR' if program == 'export.py' else 'DST'} is as it was: "
        + ("an export replaces it whole" if program == "export.py" else "a model folder is written whole")
        + " or not at all"
    ]
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models", "out"]
