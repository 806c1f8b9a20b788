"""MER-R1 in JAX/Flax."""
