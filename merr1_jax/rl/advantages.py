"""Group-relative advantages (method.md E2): dual-objective disentanglement (DOD) and the coupled baseline.

docs/method.md, "Dual-objective disentanglement (E2)". One advantage per completion, later broadcast to its tokens.
A row's group is an integer id (``group_ids_B``), not a position, so rows need no reordering. Statistics are taken
over the group's valid rows: z_g(x)_i = (x_i - mean_g x) / (std_g x + eps), std with ``ddof`` (default 1); a group
whose valid values are all equal, or that has too few valid rows, contributes exactly 0, and invalid rows get 0.

Shape legend:
  B: completions in the step, in any order
  P: groups (e.g. prompts, or prompt x mode), ids 0 .. P-1
  O: reward objectives (columns; e.g. recall, precision, format, calibration)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def contiguous_groups(num_rows: int, group_size: int) -> np.ndarray:
  """Group ids of contiguous blocks of ``group_size`` rows: [0]*G + [1]*G + ... (int32 [B])."""
  if num_rows % group_size:
    raise ValueError(f"batch of {num_rows} rows is not a multiple of group_size={group_size}")
  return np.arange(num_rows, dtype=np.int32) // group_size


def _dense_groups(group_ids_B: Array, num_groups: int, group_size: int) -> tuple[Array, Array]:
  """(ids_B, slot_B): where each row goes in a dense [P, G] table, slots in order of appearance in the group."""
  ids = jnp.asarray(group_ids_B, jnp.int32)
  onehot_BxP = ids[:, None] == jnp.arange(num_groups)[None]
  slot_B = jnp.take_along_axis(jnp.cumsum(onehot_BxP, axis=0, dtype=jnp.int32) - 1, ids[:, None], axis=1)[:, 0]
  return ids, slot_B


def group_zscore(
    x_B: Array,
    valid_B: Array,
    group_ids_B: Array,
    num_groups: int,
    *,
    group_size: int | None = None,
    scale: bool = True,
    eps: float = 1e-4,
    ddof: int = 1,
    std_floor: float | Array = 0.0,
) -> Array:
  """(E2) Normalises ``x`` within the groups given by ``group_ids_B``: method.md's z_g.

  The rows are scattered into a dense [P, G] table by their group id (in order of appearance within a group),
  the statistics are taken along G, and the values gathered back: the rows themselves are never reordered.

  Args:
    x_B: values, float.
    valid_B: bool mask; invalid rows neither enter the statistics nor receive a value (they get 0).
    group_ids_B: int group of each row, in [0, num_groups).
    num_groups: P, static.
    group_size: G, static: at least the largest group's row count (None: B, always enough). Unused slots of a
      smaller group are padding, outside the statistics.
    scale: divide by (std + eps). ``False`` is the Dr.GRPO form: ``x - mean`` only.
    eps: added to the std, not to the variance.
    ddof: delta degrees of freedom of the std.
    std_floor: divide by max(std, std_floor) + eps: a spread smaller than the floor gives advantages smaller than
      one instead of unit-size ones (for a continuous reward whose tiny differences would otherwise be noise).

  Returns:
    z_B, float32, 0 on invalid rows and on groups without spread.
  """
  g = x_B.shape[0] if group_size is None else group_size
  ids, slot = _dense_groups(group_ids_B, num_groups, g)
  x_PxG = jnp.zeros((num_groups, g), jnp.float32).at[ids, slot].set(x_B.astype(jnp.float32))
  m_PxG = jnp.zeros((num_groups, g), bool).at[ids, slot].set(valid_B.astype(bool))
  n_P1 = m_PxG.sum(axis=1, keepdims=True)
  mean_P1 = jnp.where(m_PxG, x_PxG, 0.0).sum(axis=1, keepdims=True) / jnp.maximum(n_P1, 1)
  dev_PxG = jnp.where(m_PxG, x_PxG - mean_P1, 0.0)
  hi_P1 = jnp.where(m_PxG, x_PxG, -jnp.inf).max(axis=1, keepdims=True)
  lo_P1 = jnp.where(m_PxG, x_PxG, jnp.inf).min(axis=1, keepdims=True)
  has_spread_P1 = (hi_P1 > lo_P1) & (n_P1 > ddof)
  if scale:
    var_P1 = (dev_PxG**2).sum(axis=1, keepdims=True) / jnp.maximum(n_P1 - ddof, 1)
    dev_PxG = dev_PxG / (jnp.maximum(jnp.sqrt(var_P1), std_floor) + eps)
  z_PxG = jnp.where(has_spread_P1 & m_PxG, dev_PxG, 0.0)
  return z_PxG[ids, slot]


def dod_advantages(
    rewards_BxO: Array,
    valid_BxO: Array,
    weights_BxO: Array,
    group_ids_B: Array,
    num_groups: int,
    *,
    group_size: int | None = None,
    disentangle: bool = True,
    scale: bool = True,
    eps: float = 1e-4,
    ddof: int = 1,
    std_floor_O: Array | None = None,
) -> Array:
  """(E2) Per-completion advantages from several reward objectives.

  Disentangled (default, method.md DOD):  A_i = sum_o w_io * z_g(r_o)_i, each objective normalised over its own
  valid rows, so an objective with a small in-group spread is not drowned by one with a large spread.

  Coupled (``disentangle=False``, the R1-Omni / precursor baseline):  R_i = sum_o w_io * r_io over the valid
  objectives of row i, then A_i = z_g(R)_i over the rows valid in at least one objective.

  Args:
    rewards_BxO: per-completion rewards.
    valid_BxO: bool; e.g. the calibration reward is valid only on slow rows, and a group whose ground truth maps
      to nothing is invalid everywhere.
    weights_BxO: per-row weights (per-mode weights already gathered by the caller, see ``mode_weights``).
    group_ids_B, num_groups, group_size: the group of each row and the groups' capacity (``group_zscore``).
    disentangle, scale, eps, ddof: see the module docstring and ``group_zscore``.
    std_floor_O: per-objective ``group_zscore`` std floors [O] (None: 0, no floor); disentangled form only.

  Returns:
    adv_B, float32.
  """
  rewards_BxO = rewards_BxO.astype(jnp.float32)
  valid_BxO = valid_BxO.astype(bool)
  weights_BxO = jnp.broadcast_to(weights_BxO, rewards_BxO.shape).astype(jnp.float32)
  norm = lambda x, v, f=0.0: group_zscore(x, v, group_ids_B, num_groups, group_size=group_size, scale=scale,
                                          eps=eps, ddof=ddof, std_floor=f)
  if disentangle:
    floor_O = jnp.zeros(rewards_BxO.shape[1], jnp.float32) if std_floor_O is None else jnp.asarray(std_floor_O)
    z_OxB = jax.vmap(norm, in_axes=(1, 1, 0))(rewards_BxO, valid_BxO, floor_O)
    return (weights_BxO * z_OxB.T).sum(axis=1)
  total_B = jnp.where(valid_BxO, weights_BxO * rewards_BxO, 0.0).sum(axis=1)
  return norm(total_B, valid_BxO.any(axis=1))


def mode_weights(mode_ids_B: Array, weights_MxO: Array) -> Array:
  """(E2) Gathers per-mode objective weights w[m_i]: row i gets ``weights_MxO[mode_ids_B[i]]`` ([B, O])."""
  return jnp.asarray(weights_MxO, jnp.float32)[mode_ids_B]
