"""Data: the clip record schema, MER-Synth, tokenizers, TFDS builders, label readers and Grain pipelines.

Submodules are imported explicitly (`from merr1_jax.data import schema`), so that importing the package pulls
in neither TFDS nor Grain.
"""
