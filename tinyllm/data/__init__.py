"""Data: the fictional world, JSON Lines I/O, the tokenizer and token shards."""
