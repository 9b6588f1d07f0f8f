"""Training: one loop (loop.py) for every stage; objectives, runtime, checkpoints, logging."""
