"""The import-time guard against known-broken dependency pairs (merr1_jax/_versions.py)."""

import subprocess
import sys

import pytest

from merr1_jax import _versions


@pytest.mark.parametrize("jax_v,flax_v,broken", [
    ("0.10.2", "0.12.8", False),  # the pinned set
    ("0.11.1", "0.12.8", True),  # the first jax without MutableHiType
    ("0.11.2", "0.12.3", True),  # the CUDA 13 image's jax with an old flax
    ("0.12.0.1", "0.12.8", True),
    ("0.11.2", "0.12.9", False),  # flax 0.12.9 restored compatibility
    ("0.12.0.1", "0.12.12", False),
    ("0.11.0", "0.12.8", False),
    ("0.11.1rc1", "0.12.8", True),
    (None, "0.12.8", False),  # not installed: nothing to say
])
def test_broken_pairs(jax_v, flax_v, broken):
  msg = _versions.broken_pair(jax_v, flax_v)
  assert (msg is not None) == broken
  if broken:
    assert f"flax {flax_v}" in msg and f"jax {jax_v}" in msg and "pip install 'flax>=0.12.9'" in msg


def test_importing_with_a_broken_pair_fails_at_once_with_the_message():
  """In a child whose metadata reports jax 0.11.2 and flax 0.12.8: `import merr1_jax` raises ImportError naming
  both, before anything imports flax."""
  code = ("import importlib.metadata as m, sys\n"
          "real = m.version\n"
          "m.version = lambda n: {'jax': '0.11.2', 'flax': '0.12.8'}.get(n) or real(n)\n"
          "try:\n"
          "  import merr1_jax\n"
          "except ImportError as e:\n"
          "  print('refused:', e); print('flax' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert "refused: merr1_jax: flax 0.12.8 cannot run on jax 0.11.2" in out and out.strip().endswith("False"), out
