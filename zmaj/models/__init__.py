"""Architectures as pure functions: ``init(config, seed) -> params`` and ``forward(params, batch, config)``."""
