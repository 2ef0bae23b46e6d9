"""Training: functional AdamW, stateless steps, checkpoints, specs."""
