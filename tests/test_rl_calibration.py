"""Calibration math: category log-mass, anchors and the r_cal gain, against numpy references written here."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rl
from merr1_jax.training import settings

REPO = pathlib.Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 10])
def test_category_logmass_with_minus_inf_chunks_is_chunk_independent(chunk):
  """A vocabulary chunk whose logits are all -inf (here the first ones) must not give exp(-inf - -inf) = NaN."""
  rng = np.random.default_rng(4)
  v = 10
  logits = rng.normal(size=(2, 3, v)).astype(np.float32)
  logits[:, :, :4] = -np.inf  # the first 1, 2, 3 or 4 whole chunks for chunk sizes 1..4
  logits[0, 1, 5:8] = -np.inf  # a -inf stretch in the middle as well
  logits[1, 2] = -np.inf  # a position with no distribution at all: every category gets the floor
  sets = np.zeros((1, 4, v), bool)
  sets[0, 0, [0, 1]] = True  # only -inf tokens: zero mass
  sets[0, 1, [2, 5]] = True
  sets[0, 2, [6, 9]] = True
  sets[0, 3, 4:] = True
  got = np.asarray(rl.category_logmass(jnp.asarray(logits), jnp.asarray(sets), chunk_size=chunk))
  assert np.isfinite(got).all()
  with np.errstate(invalid="ignore"):
    want = _np_logmass(logits, sets)  # NaN on the all -inf position, -inf for zero-mass categories
  defined = np.isfinite(want)
  np.testing.assert_allclose(got[defined], want[defined], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[~defined], np.float32(rl.LOGMASS_FLOOR))
  assert (~defined[1, 2]).all() and (~defined[..., 0]).all()
  whole = np.asarray(rl.category_logmass(jnp.asarray(logits), jnp.asarray(sets), chunk_size=v))
  np.testing.assert_allclose(got, whole, rtol=1e-6, atol=1e-6)


def test_category_logmass_from_hidden_jit_equals_eager_and_reference():
  """The function training uses (grouped.score_pass): jit == eager == the numpy reference of softmax(h @ w)."""
  rng = np.random.default_rng(5)
  h = rng.normal(size=(2, 3, 8)).astype(np.float32)
  w = rng.normal(size=(8, 23)).astype(np.float32)  # 23 = 2 chunks of 10 + a padded one
  sets = rng.random((2, 3, 23)) < 0.25
  sets[1, 2] = False
  f = lambda h, w: rl.category_logmass_from_hidden(h, w, jnp.asarray(sets), chunk_size=10)
  eager = np.asarray(f(jnp.asarray(h), jnp.asarray(w)))
  jitted = np.asarray(jax.jit(f)(jnp.asarray(h), jnp.asarray(w)))
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
  want = _np_logmass(h.astype(np.float64) @ w.astype(np.float64), sets)
  finite = np.isfinite(want)
  np.testing.assert_allclose(eager[finite], want[finite], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(eager[~finite], np.float32(rl.LOGMASS_FLOOR))
  assert (~finite).any() and eager.shape == (2, 3, 2, 3)


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


def _np_gain(s_slow, s_fast, anchor_mask, gt, wheel_mask, cluster_mask, precision_side=True):
  """Reference written from method.md step 5 (and its no-precision-side variant), with explicit loops."""
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
        neg = (d[n].mean() if n.any() else 0.0) if precision_side else 0.0
        per_anchor.append(d[g].mean() - neg)
      if per_anchor:
        wheel_vals.append(np.mean(per_anchor))
    out[i] = np.mean(wheel_vals) if wheel_vals else 0.0
  return out


@pytest.mark.parametrize("kind", ["contrastive_gain", "fast_prior_kl"])
def test_without_the_precision_side_matches_its_reference(kind):
  """rl.cal_precision_side=False (method.md E3 "Variants"): contrastive_gain drops the term on the wrong
  categories; fast_prior_kl drops the exp(-alpha) tilt on them. Float64 references written in this file."""
  rng = np.random.default_rng(12)
  b, a, k, c = 5, 3, 2, 4
  s_slow = -rng.random((b, a, k, c)) * 4
  s_fast = -rng.random((b, a, k, c)) * 4
  anchor_mask = rng.random((b, a)) < 0.8
  gt = rng.random((b, k, c)) < 0.35
  gt[0, :, 0] = True
  cluster_mask = np.ones((k, c), bool)
  args = tuple(jnp.asarray(x, jnp.float32) if x.dtype != bool else jnp.asarray(x)
               for x in (s_slow, s_fast, anchor_mask, gt, cluster_mask))
  full, side = rl.CalibrationConfig(tau=0.8, alpha=0.9), rl.CalibrationConfig(tau=0.8, alpha=0.9, precision_side=False)
  if kind == "contrastive_gain":
    _, got = rl.calibration_gain(*args, side, return_gain=True)
    _, with_side = rl.calibration_gain(*args, full, return_gain=True)
    want = _np_gain(s_slow, s_fast, anchor_mask, gt, gt.any(-1), cluster_mask, precision_side=False)
    want[~anchor_mask.any(1)] = 0.0
  else:
    _, got = rl.fast_prior_kl(*args, side, return_kl=True)
    _, with_side = rl.fast_prior_kl(*args, full, return_kl=True)
    want = _np_fast_prior_kl(s_slow, s_fast, anchor_mask, gt, gt.any(-1), cluster_mask, 0.9, precision_side=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(with_side) - np.asarray(got)).max() > 1e-3  # the switch changes the values


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
  args = tuple(map(jnp.asarray, (s_slow, s_fast, anchor_mask, gt, cluster_mask)))
  cfg = rl.CalibrationConfig(tau=tau)
  r, gain = rl.calibration_gain(*args, cfg, return_gain=True)
  want_gain = _np_gain(s_slow, s_fast, anchor_mask, gt, wheel_mask, cluster_mask)
  want_gain[~anchor_mask.any(1)] = 0.0
  np.testing.assert_allclose(gain, want_gain, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r, np.tanh(want_gain / tau), rtol=1e-5, atol=1e-6)
  assert r[0] == 0.0 and r[1] == 0.0
  jitted = jax.jit(lambda *x: rl.calibration_gain(*x, cfg))
  np.testing.assert_allclose(jitted(*args), r, rtol=1e-6, atol=1e-7)


def test_calibration_sign_rewards_slow_confidence_on_gt():
  # One wheel, clusters [gt, neg]. Slow raises GT log-mass by 1 and lowers Neg by 1 vs fast: gain = 2.
  s_fast = jnp.zeros((1, 1, 1, 2))
  s_slow = jnp.array([[[[1.0, -1.0]]]])
  gt = jnp.array([[[True, False]]])
  r, gain = rl.calibration_gain(s_slow, s_fast, jnp.ones((1, 1), bool), gt, return_gain=True)
  assert float(gain[0]) == pytest.approx(2.0)
  assert float(r[0]) == pytest.approx(math.tanh(2.0))
  r_rev = rl.calibration_gain(s_fast, s_slow, jnp.ones((1, 1), bool), gt)
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


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_calibration_gain_rejects_non_positive_tau(tau):
  # The settings are a frozen dataclass, checked when built: a bad tau fails before anything is traced.
  with pytest.raises(ValueError, match="tau must be > 0"):
    rl.CalibrationConfig(tau=tau)


# --- fast_prior_kl (method.md E3 step 7) -----------------------------------------------------------------------


def _np_fast_prior_kl(s_slow, s_fast, anchor_mask, gt, wheel_mask, cluster_mask, alpha, precision_side=True):
  """Reference written from method.md step 7 with explicit loops, in float64."""
  b, a, k, c = s_slow.shape
  out = np.zeros(b)
  for i in range(b):
    wheel_vals = []
    for kk in range(k):
      exists = cluster_mask[kk]
      g = gt[i, kk] & exists
      if not (wheel_mask[i, kk] and g.any()):
        continue
      per_anchor = []
      for j in range(a):
        if not anchor_mask[i, j]:
          continue
        slow = np.exp(s_slow[i, j, kk][exists].astype(np.float64))
        p_slow = slow / slow.sum()
        fast = np.exp(s_fast[i, j, kk][exists].astype(np.float64))
        tilt = np.where(g[exists], math.exp(alpha), math.exp(-alpha) if precision_side else 1.0)
        q = fast * tilt / (fast * tilt).sum()
        per_anchor.append(sum(qc * math.log(qc / pc) for qc, pc in zip(q, p_slow) if qc > 0))
      if per_anchor:
        wheel_vals.append(np.mean(per_anchor))
    out[i] = np.mean(wheel_vals) if wheel_vals else 0.0
  return out


@pytest.mark.parametrize("alpha", [0.0, 0.7, 3.0])
def test_fast_prior_kl_matches_reference_and_jit(alpha):
  rng = np.random.default_rng(6)
  b, a, k, c = 6, 3, 2, 4
  s_slow = -rng.random((b, a, k, c)).astype(np.float32) * 4
  s_fast = -rng.random((b, a, k, c)).astype(np.float32) * 4
  s_slow[2, :, 0, 1] = rl.LOGMASS_FLOOR  # a floored category
  anchor_mask = rng.random((b, a)) < 0.7
  anchor_mask[0] = False  # no anchor: reward 0
  anchor_mask[3] = True
  gt = rng.random((b, k, c)) < 0.3
  gt[1] = False  # no GT wheel: reward 0
  gt[3, 0] = [True, False, False, False]
  gt[4, 1] = True  # every cluster of the wheel is GT: q = p_fast
  cluster_mask = np.ones((k, c), bool)
  cluster_mask[1, 3] = False  # a padded slot: outside both distributions
  s_slow[:, :, 1, 3] = np.nan  # ... so even garbage there changes nothing
  wheel_mask = gt.any(-1)
  args = tuple(map(jnp.asarray, (s_slow, s_fast, anchor_mask, gt, cluster_mask)))
  cfg = rl.CalibrationConfig(alpha=alpha)
  r, kl = rl.fast_prior_kl(*args, cfg, return_kl=True)
  want = _np_fast_prior_kl(s_slow, s_fast, anchor_mask, gt, wheel_mask, cluster_mask, alpha)
  np.testing.assert_allclose(kl, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(r, -want, rtol=1e-5, atol=1e-6)
  assert r[0] == 0.0 and r[1] == 0.0 and np.all(np.asarray(r) <= 0) and want[3] > 0
  jitted = jax.jit(lambda *x: rl.fast_prior_kl(*x, cfg))
  np.testing.assert_allclose(jitted(*args), r, rtol=1e-6, atol=1e-7)


def test_fast_prior_kl_by_hand():
  one = jnp.ones((1, 1), bool)
  gt = jnp.array([[[True, False]]])
  # alpha = 0 and p_slow == p_fast: the target is p_fast itself, so KL = 0 and r_cal = 0. A constant shift of
  # all log-masses of a wheel leaves its category distribution unchanged, so that is still 0.
  s = jnp.log(jnp.array([[[[0.2, 0.05]]]]))
  for shift in (0.0, -3.0):
    r = rl.fast_prior_kl(s + shift, s, one, gt, None, rl.CalibrationConfig(alpha=0.0))
    assert float(r[0]) == pytest.approx(0.0, abs=1e-7)
  # p_fast = p_slow = (1/2, 1/2), alpha = log 3: q ∝ (1/2 * 3, 1/2 / 3) = (9/10, 1/10).
  half = jnp.log(jnp.full((1, 1, 1, 2), 0.5))
  tilt = rl.CalibrationConfig(alpha=math.log(3.0))
  r, kl = rl.fast_prior_kl(half, half, one, gt, None, tilt, return_kl=True)
  want = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
  assert float(kl[0]) == pytest.approx(want, rel=1e-5) and float(r[0]) == pytest.approx(-want, rel=1e-5)
  # Sign: a slow distribution that already leans to the GT like q scores higher than the fast one.
  lean = jnp.log(jnp.array([[[[0.9, 0.1]]]]))
  r_lean = rl.fast_prior_kl(lean, half, one, gt, None, tilt)
  assert float(r_lean[0]) == pytest.approx(0.0, abs=1e-6) and float(r_lean[0]) > float(r[0])


@pytest.mark.parametrize("alpha", [-0.5, float("nan"), float("inf")])
def test_fast_prior_kl_rejects_bad_alpha(alpha):
  with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
    rl.CalibrationConfig(alpha=alpha)


def test_calibration_registry_is_a_plain_mapping_with_one_signature():
  rng = np.random.default_rng(7)
  s_slow, s_fast = (jnp.asarray(-rng.random((3, 2, 2, 3)), jnp.float32) for _ in range(2))
  mask, gt = jnp.ones((3, 2), bool), jnp.asarray(rng.random((3, 2, 3)) < 0.4)
  cfg = rl.CalibrationConfig(tau=0.5, alpha=2.0)
  assert rl.CALIBRATIONS == {"contrastive_gain": rl.calibration_gain, "fast_prior_kl": rl.fast_prior_kl,
                             "one_sided": rl.one_sided_calibration}
  for fn in rl.CALIBRATIONS.values():  # every kind takes the same arguments
    assert fn(s_slow, s_fast, mask, gt, None, cfg).shape == (3,)
  # A user-added kind is an entry of the mapping, selectable by name in the config check.
  from merr1_jax import config as cfglib  # noqa: PLC0415
  config = cfglib.load(str(REPO / "configs" / "base.py"))
  try:
    rl.CALIBRATIONS["slow_gt_mass"] = lambda s, f, m, g, cm, c: (s * g[:, None]).sum((1, 2, 3))
    for kind in ("none", "contrastive_gain", "fast_prior_kl", "one_sided", "slow_gt_mass"):
      config.rl.calibration = kind
      settings.validate(config)
  finally:
    del rl.CALIBRATIONS["slow_gt_mass"]
  config.rl.calibration = "slow_gt_mass"
  with pytest.raises(cfglib.ConfigError, match="rl.calibration"):
    settings.validate(config)
  config.rl.calibration, config.rl.cal_alpha = "fast_prior_kl", -1.0
  with pytest.raises(cfglib.ConfigError, match="rl.cal_alpha"):
    settings.validate(config)
