"""Weights in and out: tables that map checkpoint tensor names to zmaj's parameter TensorDicts."""
