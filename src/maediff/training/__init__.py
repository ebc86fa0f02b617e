"""Training: one loop for every model of the registry (trainer.py), the training data
and its epochs (data.py), the run log (logging.py), what torchrun needs
(distributed.py) and self-describing checkpoints (checkpoint.py)."""
