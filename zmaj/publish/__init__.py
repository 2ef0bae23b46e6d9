"""Sharing what zmaj trained: model cards written from a run, Hub folders for models and datasets, and uploads."""
