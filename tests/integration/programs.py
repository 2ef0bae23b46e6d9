"""Run a program of ``programs/`` inside the test process, as ``python programs/X.py ARGS`` would run it.

A fresh Python process spends 10-20 s of CPU importing torch, tensordict and datasets before a program does
anything; running the script with ``runpy`` in the already-warm test process costs none of that. The script's
folder goes first on ``sys.path`` (programs share helpers by importing each other), stdin is the given text (not a
terminal), stdout is captured exactly, and stderr (argparse's errors) with loguru's messages is captured too. What the program changed in
the process (argv, the SIGINT handler, sys.path) is put back.
"""

import errno
import io
import os
import runpy
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from loguru import logger
from tensordict import TensorDictBase

from zmaj import fileio
from zmaj.train import optim

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_program(program: str, *args: object, stdin: str = "") -> Result:
    """``programs/<program>`` run with ``args``: its exit status, stdout and logged messages."""
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr, list(sys.path), signal.getsignal(signal.SIGINT)
    out, err = io.StringIO(), io.StringIO()
    sink = logger.add(err, format="{level} | {message}")
    sys.argv = [program, *map(str, args)]
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err  # stderr: argparse's usage errors
    sys.path.insert(0, str(ROOT / "programs"))
    code: int | str | None = 0
    try:
        runpy.run_path(str(ROOT / "programs" / program), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv, sys.stdin, sys.stdout, sys.stderr, sys.path[:] = saved[:5]
        signal.signal(signal.SIGINT, saved[5])
        logger.remove(sink)
    if isinstance(code, str):  # sys.exit("message") prints the message and exits 1
        return Result(1, out.getvalue(), err.getvalue() + code)
    return Result(int(code or 0), out.getvalue(), err.getvalue())


def ctrl_c(*args: object, **kwargs: object) -> None:
    """Stands in for any function a test has the user interrupt (Ctrl-C) inside."""
    raise KeyboardInterrupt


def interrupted(program: str, *args: object) -> Result:
    """``program`` run where a Ctrl-C will come; one that escapes fails the test (rather than stop pytest)."""
    try:
        return run_program(program, *args)
    except KeyboardInterrupt:
        pytest.fail(f"the Ctrl-C escaped {program}")


def busy_volume(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``folder``, made with an earlier model's ``config.json``, as a mount point: renaming it away fails with
    EBUSY (what a program replacing a destination folder meets there); other renames work."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    real = os.replace

    def replace(src: Path, dst: Path) -> None:
        if Path(src) == folder:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        real(src, dst)

    def exchange(first: Path, second: Path) -> bool:
        if folder in (Path(first), Path(second)):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(second))
        return real_exchange(first, second)

    real_exchange = fileio.exchange
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(fileio, "exchange", exchange)
    return folder


def decays_as_asked(
    decay: TensorDictBase, params: TensorDictBase, norms_and_biases: bool
) -> tuple[bool, bool]:
    """Whether the ``decay`` mask a program handed its step is ``optim.decay_mask(params, norms_and_biases)``, and
    whether that mask leaves a parameter undecayed (the norms, unless ``norms_and_biases``): the second shows
    that a test's two settings make two masks, so that the first tells them apart."""
    expected = optim.decay_mask(params, norms_and_biases)
    keys = list(expected.keys(True, True))
    same = set(decay.keys(True, True)) == set(keys) and all(torch.equal(decay[k], expected[k]) for k in keys)
    return same, any(float(expected[k].min()) == 0.0 for k in keys)
