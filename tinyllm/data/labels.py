"""The label value that carries no loss. A leaf module: the data layer writes it into batches, the
model and the objectives skip it, and none of them has to import another for one number."""

IGNORE_INDEX = -100
"""Label of a position that is not trained on (prompt tokens, padding); PyTorch's cross-entropy default."""
