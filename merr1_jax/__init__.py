"""MER-R1 in JAX/Flax."""

from merr1_jax import _versions

_versions.check()  # a known-broken jax/flax pair fails here, naming both versions and the fix
