"""Group advantages: hand-computed values, masking, zero-std groups, jit parity, and the interference check."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rl


def _dod(rewards, valid, weights, group_size, **kw):
  """rl.dod_advantages over contiguous groups of ``group_size`` rows (how most hand examples are laid out)."""
  b = rewards.shape[0]
  return rl.dod_advantages(rewards, valid, weights, rl.contiguous_groups(b, group_size), b // group_size,
                           group_size=group_size, **kw)


def _zscore(x, valid, group_size, **kw):
  return rl.group_zscore(x, valid, rl.contiguous_groups(x.shape[0], group_size), x.shape[0] // group_size,
                         group_size=group_size, **kw)


def test_hand_example_pins_unbiased_std():
  # Group [1, 0]: mean 0.5, unbiased std sqrt(0.25 + 0.25) = 0.70710678, so z = +-0.5 / (0.70710678 + 1e-4).
  adv = _dod(
      jnp.array([[1.0], [0.0], [0.0], [1.0]]), jnp.ones((4, 1), bool), jnp.ones((4, 1)), 2
  )
  z = 0.5 / (math.sqrt(0.5) + 1e-4)
  np.testing.assert_allclose(adv, [z, -z, -z, z], rtol=1e-6)
  # The biased std (ddof=0) is 0.5, which gives a visibly different value: the default is pinned.
  adv0 = _dod(
      jnp.array([[1.0], [0.0]]), jnp.ones((2, 1), bool), jnp.ones((2, 1)), 2, ddof=0
  )
  np.testing.assert_allclose(adv0, [0.5 / 0.5001, -0.5 / 0.5001], rtol=1e-6)


def test_zero_std_group_gives_exact_zero():
  # 0.1 + 0.1 + 0.1 averages to 0.1 + 1 ulp in float32 arithmetic; the group must still give exactly 0.
  x = jnp.array([0.1, 0.1, 0.1, 0.3, 0.2, 0.1], jnp.float32)
  z = _zscore(x, jnp.ones(6, bool), 3)
  assert np.all(np.asarray(z[:3]) == 0.0)
  # The second group: mean 0.2, std 0.1 -> z = (+-0.1) / (0.1 + 1e-4).
  np.testing.assert_allclose(z[3:], [0.1 / 0.1001, 0.0, -0.1 / 0.1001], rtol=1e-5, atol=1e-6)


def test_masked_row_is_excluded_from_one_objective_only():
  rewards = jnp.array([[1.0, 5.0], [0.0, 1.0], [0.0, 3.0], [9.0, 0.0]])
  valid = jnp.array([[1, 1], [1, 1], [1, 1], [0, 1]], bool)
  adv = _dod(rewards, valid, jnp.ones((4, 2)), 4)
  # Objective 0 over rows 0..2 only: [1, 0, 0] -> mean 1/3, unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = 0.57735.
  s0 = math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 2) + 1e-4
  z0 = np.array([2 / 3, -1 / 3, -1 / 3, 0.0]) / s0
  # Objective 1 over all rows: [5, 1, 3, 0] -> mean 2.25, std sqrt((7.5625 + 1.5625 + 0.5625 + 5.0625) / 3).
  d1 = np.array([5, 1, 3, 0]) - 2.25
  z1 = d1 / (math.sqrt((d1**2).sum() / 3) + 1e-4)
  np.testing.assert_allclose(adv, z0 + z1, rtol=1e-5)


def test_coupled_normalises_the_weighted_sum():
  rewards = jnp.array([[1.0, 0.0], [0.0, 0.5], [1.0, 1.0], [0.0, 0.0]])
  w = jnp.array([2.0, 1.0])
  adv = _dod(rewards, jnp.ones((4, 2), bool), w, 2, disentangle=False)
  total = np.array([2.0, 0.5, 3.0, 0.0])
  expected = []
  for g in (total[:2], total[2:]):
    d = g - g.mean()
    expected += list(d / (np.sqrt((d**2).sum() / 1) + 1e-4))
  np.testing.assert_allclose(adv, expected, rtol=1e-6)


def test_scale_false_is_mean_centring_only():
  x = jnp.array([[3.0], [1.0], [2.0], [2.0]])
  for disentangle in (True, False):
    adv = _dod(x, jnp.ones((4, 1), bool), jnp.ones((4, 1)), 2, disentangle=disentangle, scale=False)
    np.testing.assert_allclose(adv, [1.0, -1.0, 0.0, 0.0])


def test_single_valid_row_has_no_spread():
  z = _zscore(jnp.array([4.0, 1.0]), jnp.array([True, False]), 2)
  np.testing.assert_array_equal(z, [0.0, 0.0])


def test_mode_weights_gather_per_row():
  w = rl.mode_weights(jnp.array([0, 1, 1]), jnp.array([[1.0, 2.0], [3.0, 4.0]]))
  np.testing.assert_array_equal(w, [[1, 2], [3, 4], [3, 4]])


def test_bad_group_size_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of group_size"):
    rl.contiguous_groups(5, 2)


@pytest.mark.parametrize("disentangle", [True, False])
def test_group_ids_not_row_order_define_the_groups(disentangle):
  """Rows of a group need not be contiguous: shuffling the rows together with their group ids permutes the
  advantages and changes nothing else; per-mode groups are just other ids (no reordering of rows)."""
  rng = np.random.default_rng(3)
  r = rng.random((12, 3)).astype(np.float32)
  v = rng.random((12, 3)) > 0.2
  w = rng.random((12, 3)).astype(np.float32)
  ids = rl.contiguous_groups(12, 4)
  want = np.asarray(rl.dod_advantages(r, v, w, ids, 3, disentangle=disentangle))
  perm = rng.permutation(12)
  got = np.asarray(rl.dod_advantages(r[perm], v[perm], w[perm], ids[perm], 3, disentangle=disentangle))
  np.testing.assert_allclose(got, want[perm], rtol=1e-6, atol=1e-7)
  # Two modes interleaved within a prompt (slow, fast, slow, fast): per-mode ids = the contiguous form on the
  # rows regrouped by hand.
  mode = np.tile([0, 1], 6)
  per_mode = np.asarray(rl.dod_advantages(r, v, w, ids * 2 + mode, 6, disentangle=disentangle))
  order = np.lexsort((mode, ids))
  regrouped = np.asarray(_dod(r[order], v[order], w[order], 2, disentangle=disentangle))
  np.testing.assert_allclose(per_mode[order], regrouped, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("disentangle", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_jit_equals_eager(disentangle, scale):
  rng = np.random.default_rng(0)
  r = jnp.asarray(rng.random((16, 3)), jnp.float32)
  v = jnp.asarray(rng.random((16, 3)) > 0.2)
  w = jnp.asarray(rng.random((16, 3)), jnp.float32)
  f = lambda r, v, w: _dod(r, v, w, 8, disentangle=disentangle, scale=scale)
  np.testing.assert_allclose(jax.jit(f)(r, v, w), f(r, v, w), rtol=1e-6, atol=1e-7)


def _np_group_zscore(x, valid, g, *, scale=True, eps=1e-4, ddof=1):
  """Reference written from method.md E2 with explicit loops over groups, in float64."""
  out = np.zeros(len(x))
  for start in range(0, len(x), g):
    rows = [i for i in range(start, start + g) if valid[i]]
    vals = np.array([x[i] for i in rows], np.float64)
    if len(vals) <= ddof or vals.max() == vals.min():
      continue  # no preference inside this group
    mean = vals.mean()
    std = math.sqrt(((vals - mean) ** 2).sum() / (len(vals) - ddof))
    for i in rows:
      out[i] = (x[i] - mean) / (std + eps) if scale else x[i] - mean
  return out


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("ddof", [0, 1])
def test_group_zscore_jit_equals_eager_and_reference(scale, ddof):
  rng = np.random.default_rng(1)
  x = rng.random(24).astype(np.float32)
  x[4:8] = 0.25  # a group without spread
  valid = rng.random(24) > 0.25
  valid[8:12] = [True, False, False, False]  # a group with a single valid row
  f = lambda x, v: _zscore(x, v, 4, scale=scale, ddof=ddof)
  eager = f(jnp.asarray(x), jnp.asarray(valid))
  np.testing.assert_allclose(jax.jit(f)(jnp.asarray(x), jnp.asarray(valid)), eager, rtol=1e-6, atol=1e-7)
  want = _np_group_zscore(x, valid, 4, scale=scale, ddof=ddof)
  np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(eager)[4:12] == 0.0) and np.all(np.asarray(eager)[~valid] == 0.0)


def test_mode_weights_jit_equals_eager_and_reference():
  rng = np.random.default_rng(2)
  modes = rng.integers(0, 2, size=10)
  w = rng.random((2, 4)).astype(np.float32)
  eager = rl.mode_weights(jnp.asarray(modes), jnp.asarray(w))
  np.testing.assert_array_equal(jax.jit(rl.mode_weights)(jnp.asarray(modes), jnp.asarray(w)), eager)
  np.testing.assert_array_equal(eager, [list(w[m]) for m in modes])
  assert eager.dtype == jnp.float32 and eager.shape == (10, 4)


def _simulate(s_r, s_p, rho, *, groups=400, g=64, seed=0):
  """In-group recall/precision rewards with stds s_r, s_p and correlation rho."""
  rng = np.random.default_rng(seed)
  cov = np.array([[s_r**2, rho * s_r * s_p], [rho * s_r * s_p, s_p**2]])
  r = rng.multivariate_normal([0.5, 0.5], cov, size=groups * g).astype(np.float32)
  return r


def _corr_with_deviation(adv, x, g):
  dev = x.reshape(-1, g) - x.reshape(-1, g).mean(axis=1, keepdims=True)
  return np.corrcoef(np.asarray(adv), dev.reshape(-1))[0, 1]


@pytest.mark.parametrize("s_r,s_p,rho", [(0.02, 0.3, 0.0), (0.02, 0.3, 0.5), (0.2, 0.2, -0.9), (0.1, 0.1, 0.3)])
def test_variance_interference_simulation(s_r, s_p, rho):
  """method.md, "Why disentangle": disentangled keeps sqrt((1+rho)/2); coupled collapses."""
  g = 64
  r = _simulate(s_r, s_p, rho, g=g)
  ones = jnp.ones(r.shape, bool)
  w = jnp.ones(r.shape)
  dod = _dod(jnp.asarray(r), ones, w, g)
  coupled = _dod(jnp.asarray(r), ones, w, g, disentangle=False)
  target_dod = math.sqrt((1 + rho) / 2)
  target_coupled = (s_r + rho * s_p) / math.sqrt(s_r**2 + s_p**2 + 2 * rho * s_r * s_p)
  for col in (0, 1):
    assert abs(_corr_with_deviation(dod, r[:, col], g) - target_dod) < 0.03
  assert abs(_corr_with_deviation(coupled, r[:, 0], g) - target_coupled) < 0.03
  if s_p > 10 * s_r:
    # The low-variance objective is drowned in the coupled form but not in the disentangled one.
    assert _corr_with_deviation(coupled, r[:, 0], g) < target_dod - 0.2
