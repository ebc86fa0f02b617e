"""One training loop for every model of the registry, and self-describing checkpoints."""
