"""TinyLLM: train a small language model from scratch, end to end, as a reproducible DVC pipeline."""
