"""Model families as flax.nnx modules."""
