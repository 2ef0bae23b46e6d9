"""Run by ``test_distributed_programs.py`` as ``torchrun --nproc-per-node 2 tests/integration/sft_in_time_zones.py
ARGS``: ``programs/sft.py ARGS`` with each rank in its own time zone, 26 hours apart (nodes configured
differently), so that their clocks tell different days; each rank prints the day its tokenizer renders."""

import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

os.environ["TZ"] = {"0": "Etc/GMT+12", "1": "Etc/GMT-14"}[os.environ["LOCAL_RANK"]]
time.tzset()

from zmaj.train import finetune  # noqa: E402 (after the time zone is set)

ROOT = Path(__file__).resolve().parents[2]
real_start = finetune.start


def start(spec: Any, device: Any, resume: Any = None) -> finetune.Start:
    begin = real_start(spec, device, resume)
    sys.stdout.write(f"rank {os.environ['RANK']} renders {begin.model.tokenizer.today}\n")
    sys.stdout.flush()
    return begin


finetune.start = start
sys.argv = [str(ROOT / "programs" / "sft.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
