"""Training: functional AdamW, stateless steps, the training loop and its run folders, training specs."""
