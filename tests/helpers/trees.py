"""Parameter trees as flat dicts, for comparisons leaf by leaf."""

import jax
import numpy as np

from merr1_jax.models import base


def flat_params(params) -> dict[str, np.ndarray]:
  """{'decoder/layers/q_kernel': array, ...}: every leaf by its '/'-joined path (base.path_str)."""
  return {base.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
