"""zmaj: an LLM lab in pure-functional, JAX-style PyTorch."""
