"""Pure building blocks: masks, attention, norms, MLPs, positions. Functions of (params, inputs), no state."""
