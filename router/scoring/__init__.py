"""One model's scoring: how it is called, batched, bounded and cut off, and what its output says."""
