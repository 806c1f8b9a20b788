"""Calibration math: category log-mass, anchors and the r_cal gain, against numpy references written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rl


def _np_logmass(logits, sets):
  """Reference: log of the summed softmax probability of each category's tokens, in float64."""
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  p = np.exp(logp)
  k, c, v = sets.shape
  mass = p @ sets.reshape(k * c, v).T.astype(np.float64)
  with np.errstate(divide="ignore"):
    return np.log(mass).reshape(*logits.shape[:-1], k, c)


@pytest.mark.parametrize("chunk", [7, 16, 64, 1000])
def test_category_logmass_matches_reference(chunk):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 50)).astype(np.float32) * 3
  sets = rng.random((2, 4, 50)) < 0.15
  sets[1, 3] = False  # an empty category
  got = rl.category_logmass(jnp.asarray(logits), jnp.asarray(sets), chunk_size=chunk)
  want = _np_logmass(logits, sets)
  finite = np.isfinite(want)
  np.testing.assert_allclose(np.asarray(got)[finite], want[finite], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got)[~finite], rl.LOGMASS_FLOOR, atol=1e-4)
  assert got.dtype == jnp.float32 and got.shape == (3, 5, 2, 4)


def test_category_logmass_from_hidden_equals_logits_version():
  rng = np.random.default_rng(1)
  h = rng.normal(size=(2, 4, 8)).astype(np.float32)
  w = rng.normal(size=(8, 37)).astype(np.float32)
  sets = jnp.asarray(rng.random((3, 5, 37)) < 0.2)
  a = rl.category_logmass(jnp.asarray(h @ w), sets, chunk_size=10)
  b = rl.category_logmass_from_hidden(jnp.asarray(h), jnp.asarray(w), sets, chunk_size=10)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_category_logmass_upcasts_bf16_and_floors_underflow():
  logits = jnp.asarray([[[0.0, -200.0, 5.0]]], jnp.bfloat16)
  sets = jnp.asarray([[[True, False, False], [False, True, False]]])
  s = rl.category_logmass(logits, sets)
  want0 = 0.0 - math.log(1 + math.exp(5.0) + math.exp(-200.0))
  np.testing.assert_allclose(s[0, 0, 0, 0], want0, rtol=1e-5)
  # exp(-205) underflows float32: the floor keeps the value finite.
  assert float(s[0, 0, 0, 1]) == pytest.approx(rl.LOGMASS_FLOOR, abs=1e-3)


def test_answer_anchors_by_hand():
  OPEN, CLOSE, SEP = 7, 8, 3
  tokens = jnp.array([
      # <answer> happy , sad , calm </answer>: anchors at <answer> and at both commas
      [1, OPEN, 20, SEP, 21, SEP, 22, CLOSE, 0, 0],
      # a comma before <answer> is not an anchor; a comma after </answer> neither
      [SEP, 5, OPEN, 20, CLOSE, SEP, 0, 0, 0, 0],
      # two <answer> tags: only the last one counts
      [OPEN, 20, SEP, OPEN, 21, SEP, 22, CLOSE, 0, 0],
      # no answer at all
      [1, 2, SEP, 4, 5, 6, 0, 0, 0, 0],
  ])
  valid = tokens != 0
  idx, mask = rl.answer_anchors(tokens, valid, OPEN, jnp.array([SEP]), CLOSE, num_anchors=4)
  got = [list(np.asarray(i)[np.asarray(m)]) for i, m in zip(idx, mask)]
  assert got == [[1, 3, 5], [2], [3, 5], []]


def _np_gain(s_slow, s_fast, anchor_mask, gt, wheel_mask, cluster_mask):
  """Reference written from method.md step 5, with explicit loops."""
  b, a, k, c = s_slow.shape
  out = np.zeros(b)
  for i in range(b):
    wheel_vals = []
    for kk in range(k):
      g = gt[i, kk] & cluster_mask[kk]
      n = cluster_mask[kk] & ~gt[i, kk]
      if not (wheel_mask[i, kk] and g.any()):
        continue
      per_anchor = []
      for j in range(a):
        if not anchor_mask[i, j]:
          continue
        d = s_slow[i, j, kk] - s_fast[i, j, kk]
        per_anchor.append(d[g].mean() - (d[n].mean() if n.any() else 0.0))
      if per_anchor:
        wheel_vals.append(np.mean(per_anchor))
    out[i] = np.mean(wheel_vals) if wheel_vals else 0.0
  return out


def test_calibration_gain_matches_reference_and_jit():
  rng = np.random.default_rng(2)
  b, a, k, c = 6, 3, 2, 4
  s_slow = -rng.random((b, a, k, c)).astype(np.float32) * 4
  s_fast = -rng.random((b, a, k, c)).astype(np.float32) * 4
  anchor_mask = rng.random((b, a)) < 0.7
  anchor_mask[0] = False  # no anchor: reward 0
  gt = rng.random((b, k, c)) < 0.3
  gt[1] = False  # no GT wheel: reward 0
  cluster_mask = np.ones((k, c), bool)
  cluster_mask[1, 3] = False  # a padded slot, never a negative
  wheel_mask = gt.any(-1)
  tau = 0.7
  args = tuple(map(jnp.asarray, (s_slow, s_fast, anchor_mask, gt, wheel_mask)))
  r, gain = rl.calibration_gain(*args, tau, cluster_mask=jnp.asarray(cluster_mask), return_gain=True)
  want_gain = _np_gain(s_slow, s_fast, anchor_mask, gt, wheel_mask, cluster_mask)
  want_gain[~anchor_mask.any(1)] = 0.0
  np.testing.assert_allclose(gain, want_gain, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r, np.tanh(want_gain / tau), rtol=1e-5, atol=1e-6)
  assert r[0] == 0.0 and r[1] == 0.0
  jitted = jax.jit(lambda *x: rl.calibration_gain(*x, tau, cluster_mask=jnp.asarray(cluster_mask)))
  np.testing.assert_allclose(jitted(*args), r, rtol=1e-6, atol=1e-7)


def test_calibration_sign_rewards_slow_confidence_on_gt():
  # One wheel, clusters [gt, neg]. Slow raises GT log-mass by 1 and lowers Neg by 1 vs fast: gain = 2.
  s_fast = jnp.zeros((1, 1, 1, 2))
  s_slow = jnp.array([[[[1.0, -1.0]]]])
  gt = jnp.array([[[True, False]]])
  r, gain = rl.calibration_gain(s_slow, s_fast, jnp.ones((1, 1), bool), gt, jnp.ones((1, 1), bool), 1.0,
                                return_gain=True)
  assert float(gain[0]) == pytest.approx(2.0)
  assert float(r[0]) == pytest.approx(math.tanh(2.0))
  r_rev = rl.calibration_gain(s_fast, s_slow, jnp.ones((1, 1), bool), gt, jnp.ones((1, 1), bool), 1.0)
  assert float(r_rev[0]) == pytest.approx(-math.tanh(2.0))


def test_logmass_and_anchor_jit_equal_eager():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(2, 3, 20)), jnp.float32)
  sets = jnp.asarray(rng.random((1, 3, 20)) < 0.3)
  f = lambda x: rl.category_logmass(x, sets, chunk_size=6)
  np.testing.assert_allclose(jax.jit(f)(logits), f(logits), rtol=1e-6)
  toks = jnp.asarray(rng.integers(0, 6, size=(4, 12)))
  g = lambda t: rl.answer_anchors(t, t >= 0, 1, jnp.array([2]), 3, 5)
  for x, y in zip(jax.jit(g)(toks), g(toks)):
    np.testing.assert_array_equal(x, y)
