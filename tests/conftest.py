"""Shared pytest set-up.

* Eight fake CPU devices, so that sharding tests can build real meshes in-process. The flag must be set
  before jax is imported anywhere; unsharded code still runs on device 0 only, so other tests are unaffected.
* The persistent compilation cache: repeated CI runs and xdist workers reuse
  compiled programs instead of paying XLA compile time again.
* Rank promotion raises (nanodo does the same): a broadcast the code did not write out is a bug to find.
* XLA's CPU backend at optimisation level 0 without its expensive LLVM passes (tests/helpers/xla.py says why);
  the child processes that tests start get the same flags. Set XLA_FLAGS yourself to override.
"""

import os
import pathlib

from tests.helpers.xla import COMPILE_FAST  # noqa: E402 (no jax import: the flags must come first)

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FAST}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# An implicit broadcast across ranks ([B, L, D] + [D]) is an error, here and in every child process a test starts
# (they inherit the environment): the library writes its broadcasts out (models.layers.lead).
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
# Tests never touch the network: make any accidental hub access fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tok():
  """The MER-Synth tokenizer (data.synth.build_tokenizer's defaults); modules that need another one define theirs."""
  from merr1_jax.data import synth  # noqa: PLC0415

  return synth.build_tokenizer()
