"""Imported with ``--import`` by a distributed test: bad input that rank 1 alone meets, as a file one node lacks."""

import os

if os.environ.get("RANK") == "1":
    raise FileNotFoundError("tasks.txt: no such file on this node")
