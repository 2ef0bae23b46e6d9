"""Run by ``test_distributed.py`` as ``torchrun --nproc-per-node 2 tests/integration/waits_for_rank_0.py OUT``:
rank 0 works alone (``rank_0_first``, ``from_rank_0``) for longer than the collectives' timeout, cut here
to a second, as preparing a large corpus outlasts the real one; the other rank waits for it, and the
collectives work afterwards. Each rank writes what it got."""

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from zmaj.train import parallel as zmaj_parallel

WORK_S = 2.0


def main(out: Path) -> None:
    parallel = zmaj_parallel.Parallel.from_environment(zmaj_parallel.ParallelConfig(), torch.device("cpu"))
    # Cut once the group is set up (its rendezvous, under the same limit, would fail a rank that starts late).
    dist.set_timeout(timedelta(seconds=1))
    assert parallel.patient is not None
    # The waiting group's own limit, which no test can wait out (a private attribute: gloo's options).
    waits = parallel.patient._get_backend(torch.device("cpu")).options._timeout

    def rank_0_works_long() -> str:
        if parallel.main:
            time.sleep(WORK_S)
        return f"made by rank {parallel.rank}"

    first = parallel.rank_0_first(rank_0_works_long)
    made = parallel.from_rank_0(rank_0_works_long)
    total = float(parallel.all_sum(torch.ones(())))
    record = [first, made, total, waits == zmaj_parallel.RANK_0_ALONE_TIMEOUT]
    (out / f"waited-rank{parallel.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
