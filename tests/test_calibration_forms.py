"""The one-sided calibration (rl.calibration='one_sided'), its readings, the validity and std-floor fixes and the
calibration diagnostics (docs/method.md E3), against float64 references and the hand example of issue 24."""

import jax
import numpy as np
import pytest

from merr1_jax import rl
from merr1_jax.training import settings

# One wheel, categories [sad, angry, worried, happy]; ground truth {sad, angry}. Probabilities of each category's
from merr1_jax.training import experience

# first tokens at the answer slots (the rest of the mass is on other tokens such as </answer>): slot 0 follows
# <answer>, slot 1 follows "sad,", slot 2 follows "sad, angry,". The fast context is the same answer teacher-forced
# after an empty think; the slow one follows the reasoning.
SLOW = np.asarray([[.60, .20, .05, .05], [.01, .50, .20, .05], [.01, .01, .30, .10]])
FAST = np.asarray([[.40, .35, .15, .05], [.01, .55, .25, .05], [.01, .02, .40, .10]])
GT = np.asarray([[[True, True, False, False]]])
ANSWERS = {"sad": 1, "sad, angry": 2, "sad, angry, worried": 3}  # answer -> anchors


def _hand(kind, **cfg):
  out = {}
  for answer, n in ANSWERS.items():
    mask = np.zeros((1, 3), bool)
    mask[0, :n] = True
    s_slow, s_fast = (np.log(p)[None, :, None, :].astype(np.float32) for p in (SLOW, FAST))
    out[answer] = float(rl.CALIBRATIONS[kind](s_slow, s_fast, mask, GT, None, rl.CalibrationConfig(**cfg))[0])
  return out


def test_hand_example_contrastive_gain_pays_for_short_answers():
  """The defect the one-sided form fixes, by hand: per-anchor terms [(ln ps - ln pf)(GT mean) - (Neg mean)] are
  0.4722, 0.0639, -0.2027 at slots 0, 1, 2, and their running mean falls as correct words are added."""
  t0 = (np.log(.6 / .4) + np.log(.2 / .35)) / 2 - (np.log(.05 / .15) + 0) / 2
  t1 = (0 + np.log(.5 / .55)) / 2 - (np.log(.2 / .25) + 0) / 2
  t2 = (0 + np.log(.01 / .02)) / 2 - (np.log(.3 / .4) + 0) / 2
  np.testing.assert_allclose([t0, t1, t2], [0.4722, 0.0639, -0.2027], atol=1e-4)
  got = _hand("contrastive_gain")
  np.testing.assert_allclose([got[a] for a in ANSWERS], np.tanh([t0, (t0 + t1) / 2, (t0 + t1 + t2) / 3]), rtol=1e-5)
  assert got["sad"] > got["sad, angry"] > got["sad, angry, worried"]


def test_hand_example_one_sided_first_and_max():
  """'first': only slot 0 counts: angry falls short of fast by .35 - .20 = .15, no wrong category rises above fast
  (worried .05 < .15, happy .05 = .05), so r_cal = -0.15 whatever the answer's length. 'max': the best slot per
  category; angry's shortfall is .15 with one slot, .55 - .50 = .05 with two or three, and no excess."""
  first = _hand("one_sided", reading="first")
  np.testing.assert_allclose(list(first.values()), [-0.15] * 3, atol=1e-6)
  mx = _hand("one_sided", reading="max")
  np.testing.assert_allclose([mx[a] for a in ANSWERS], [-0.15, -0.05, -0.05], atol=1e-6)
  for r in (first, mx):  # the orderings every form must hold (docs/method.md E3)
    assert r["sad"] <= r["sad, angry"] and r["sad, angry, worried"] <= r["sad, angry"]


def _np_one_sided(s_slow, s_fast, mask, gt, cmask, reading, precision_side):
  """float64 loops: per row, per wheel with a GT cluster, the hinge sums; the mean over those wheels."""
  b, _, k, _ = s_slow.shape
  out = np.zeros(b)
  for i in range(b):
    valid = np.flatnonzero(mask[i])
    if reading == "first":
      if not mask[i, 0]:
        continue
      cs, cf = np.exp(s_slow[i, 0].astype(np.float64)), np.exp(s_fast[i, 0].astype(np.float64))
    else:
      if not len(valid):
        continue
      cs = np.exp(s_slow[i, valid].astype(np.float64)).max(0)
      cf = np.exp(s_fast[i, valid].astype(np.float64)).max(0)
    pens = []
    for w in range(k):
      g = gt[i, w] & cmask[w]
      if not g.any():
        continue
      neg = cmask[w] & ~g
      pen = sum(max(0.0, cf[w, c] - cs[w, c]) for c in np.flatnonzero(g))
      if precision_side:
        pen += sum(max(0.0, cs[w, c] - cf[w, c]) for c in np.flatnonzero(neg))
      pens.append(pen)
    out[i] = -np.mean(pens) if pens else 0.0
  return out


@pytest.mark.parametrize("reading", ["first", "max"])
@pytest.mark.parametrize("precision_side", [True, False])
def test_one_sided_matches_a_float64_reference(reading, precision_side):
  rng = np.random.default_rng(7)
  b, a, k, c = 9, 4, 3, 5
  s_slow = np.log(rng.dirichlet(np.ones(c + 1), (b, a, k))[..., :c]).astype(np.float32)
  s_fast = np.log(rng.dirichlet(np.ones(c + 1), (b, a, k))[..., :c]).astype(np.float32)
  s_slow[0, 0, 0, 0] = rl.LOGMASS_FLOOR  # a category with no mass
  mask = rng.random((b, a)) < 0.7
  mask[1] = False  # no anchor at all
  mask[2, 0] = False  # no first anchor (nothing for 'first'), later ones present
  mask[2, 1:] = True
  gt = rng.random((b, k, c)) < 0.3
  gt[3] = False  # no GT wheel
  gt[4, 1] = False  # one wheel without GT: skipped in the mean
  gt[4, 0, 0] = True
  cmask = np.ones((k, c), bool)
  cmask[2, 3:] = False  # padded cluster slots of a smaller wheel
  want = _np_one_sided(s_slow, s_fast, mask, gt, cmask, reading, precision_side)
  got = np.asarray(jax.jit(rl.one_sided_calibration, static_argnames="cfg")(
      s_slow, s_fast, mask, gt, cmask, cfg=rl.CalibrationConfig(reading=reading, precision_side=precision_side)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got[1] == 0 and got[3] == 0 and (reading != "first" or got[2] == 0)
  assert (got <= 0).all() and np.any(got < 0)


def test_one_sided_pays_only_for_the_wrong_direction():
  """Raising slow's confidence in a correct category above fast, or pushing a wrong one further below fast, changes
  nothing; the opposite moves lower r_cal by exactly the change (probability space)."""
  base_s, base_f = np.log(SLOW[:1])[None, :, None, :], np.log(FAST[:1])[None, :, None, :]
  mask = np.ones((1, 1), bool)
  r = lambda s: float(rl.one_sided_calibration(s.astype(np.float32), base_f.astype(np.float32), mask, GT)[0])  # noqa
  r0 = r(base_s)
  up_correct = np.log(SLOW[:1] + [[.10, 0, 0, 0]])[None, :, None, :]  # sad .6 -> .7: already above fast (.4)
  down_wrong = np.log(SLOW[:1] - [[0, 0, .04, 0]])[None, :, None, :]  # worried .05 -> .01: already below (.15)
  assert r(up_correct) == pytest.approx(r0) and r(down_wrong) == pytest.approx(r0)
  down_correct = np.log(SLOW[:1] - [[0, .10, 0, 0]])[None, :, None, :]  # angry .2 -> .1: .10 further below fast
  up_wrong = np.log(SLOW[:1] + [[0, 0, 0, .07]])[None, :, None, :]  # happy .05 -> .12: .07 above fast
  assert r(down_correct) == pytest.approx(r0 - .10, abs=1e-6)
  assert r(up_wrong) == pytest.approx(r0 - .07, abs=1e-6)


def test_first_reading_ignores_every_anchor_after_the_first():
  rng = np.random.default_rng(3)
  s = np.log(rng.dirichlet(np.ones(6), (4, 5, 2))[..., :5]).astype(np.float32)
  f = np.log(rng.dirichlet(np.ones(6), (4, 5, 2))[..., :5]).astype(np.float32)
  gt = rng.random((4, 2, 5)) < 0.4
  gt[:, :, 0] = True
  mask = np.ones((4, 5), bool)
  short = mask.copy()
  short[:, 1:] = False
  s2, f2 = s.copy(), f.copy()
  s2[:, 1:], f2[:, 1:] = s2[:, 1:][::-1], rl.LOGMASS_FLOOR
  one = rl.one_sided_calibration(s, f, short, gt)
  for args in ((s, f, mask), (s2, f2, mask)):
    np.testing.assert_array_equal(rl.one_sided_calibration(*args, gt), one)


def test_calibration_reading_is_checked():
  with pytest.raises(ValueError, match="reading"):
    rl.CalibrationConfig(reading="last")


# ------------------------------------------------------------------------------ validity and the std floor


def _adv(r_cal_logmass, fmt, floor=0.0):
  """Four slow rows of one prompt with tied task rewards: only the calibration can move the advantage."""
  s_slow, s_fast, amask, gt = r_cal_logmass
  adv = experience.AdvantageSettings(disentangle=True, scale=True, eps=1e-4, ddof=1, group="prompt",
                                     weights=((1, 1, 0, 0.1, 0.5), (1, 1, 0, 0.1, 0.0)), cal_in_reward=0.0,
                                     cal_std_floor=floor)
  r = np.tile(np.asarray([[0.5, 0.5, 0.5, 1.0]], np.float32), (4, 1))
  r[:, 3] = fmt
  return experience.advantages_and_calibration(
      r, np.ones(4, bool), np.zeros(4, np.int32), np.zeros(4, np.int32), (s_slow, s_fast, amask), gt, fmt, None,
      adv=adv, kind="one_sided", cal=rl.CalibrationConfig(), num_groups=1, group_size=4)


def _four_rows(shortfalls):
  """Slow rows whose only difference is angry's first-slot probability: r_cal = -shortfall exactly."""
  s_fast = np.log(np.tile(FAST[:1], (4, 1)))[:, None, None, :].astype(np.float32)
  slow = np.tile(FAST[:1], (4, 1))
  slow[:, 1] -= shortfalls
  return np.log(slow)[:, None, None, :].astype(np.float32), s_fast, np.ones((4, 1), bool), np.tile(GT, (4, 1, 1))


def test_a_malformed_slow_row_is_outside_the_calibration_objective():
  """Row 3 is malformed (format 0): its r_cal is 0, it gets no calibration advantage, and the other rows'
  calibration z-score is over rows 0-2 only (so changing row 3's log-mass changes nothing). Before the fix, row
  3 entered the statistics with r_cal 0 and got a positive calibration advantage."""
  fmt = np.asarray([True, True, True, False])
  short = np.asarray([0.10, 0.20, 0.30, 0.25])
  a, r_cal, _ = _adv(_four_rows(short), fmt)
  np.testing.assert_allclose(r_cal, [-0.1, -0.2, -0.3, 0.0], atol=1e-6)
  x = np.asarray([-0.1, -0.2, -0.3])
  z = (x - x.mean()) / (x.std(ddof=1) + 1e-4)
  # The format objective's own term: rows 0-2 share format 1 and row 3 has 0 (one z over all four rows).
  f = np.asarray([1.0, 1, 1, 0])
  zf = (f - f.mean()) / (f.std(ddof=1) + 1e-4)
  np.testing.assert_allclose(a, 0.1 * zf + 0.5 * np.append(z, 0.0), rtol=1e-5, atol=1e-5)
  short2 = short.copy()
  short2[3] = 0.0
  np.testing.assert_allclose(_adv(_four_rows(short2), fmt)[0], a, rtol=0, atol=1e-6)


def test_std_floor_keeps_tiny_calibration_differences_small():
  """Tied task rewards, r_cal differences of 1e-3: without a floor they become unit-size advantages; with the floor
  0.05 they are divided by 0.05 instead of their own std (hand numbers)."""
  fmt = np.ones(4, bool)
  short = np.asarray([0.100, 0.101, 0.102, 0.103])
  x = -short
  dev = x - x.mean()
  a0, _, _ = _adv(_four_rows(short), fmt)
  np.testing.assert_allclose(a0, 0.5 * dev / (x.std(ddof=1) + 1e-4), rtol=2e-3)
  assert np.abs(a0).max() > 0.5
  a1, _, _ = _adv(_four_rows(short), fmt, floor=0.05)
  np.testing.assert_allclose(a1, 0.5 * dev / (0.05 + 1e-4), rtol=2e-3, atol=1e-6)
  assert np.abs(a1).max() < 0.03
  big = np.asarray([0.0, 0.1, 0.2, 0.3])  # a spread above the floor is normalised as before
  np.testing.assert_allclose(_adv(_four_rows(big), fmt, floor=0.05)[0], _adv(_four_rows(big), fmt)[0], rtol=1e-6)


def test_group_zscore_floor_by_hand():
  x = np.asarray([1.0, 1.002, 1.004, 5.0, 5.5, 6.0], np.float32)
  ids = np.asarray([0, 0, 0, 1, 1, 1])
  got = np.asarray(rl.group_zscore(x, np.ones(6, bool), ids, 2, group_size=3, std_floor=0.1, eps=0.0))
  np.testing.assert_allclose(got, [-0.02, 0.0, 0.02, -1.0, 0.0, 1.0], atol=1e-5)


# ------------------------------------------------------------------------------------------- diagnostics


def test_calibration_diagnostics_by_hand():
  """Two prompts of three slow rows plus one fast row each. Prompt 0: r_cal rises with the words (corr 1);
  prompt 1: falls (corr -1), with row 5 malformed (left out, so corr over rows 3, 4). Prompt 0's task terms are
  all zero and its calibration term is not: one of two groups."""
  r_cal = np.asarray([0.1, 0.2, 0.3, 0.3, 0.2, 0.9])
  words = np.asarray([1, 2, 3, 1, 2, 3])
  fmt = np.asarray([True, True, True, True, True, False])
  pid_s = np.asarray([0, 0, 0, 1, 1, 1])
  pid = np.concatenate([pid_s, [0, 1]])
  adv_task = np.asarray([0, 0, 0, 0.5, -0.5, 0, 0, 0.2])
  adv = adv_task + np.asarray([-1, 0, 1, 1, -1, 0, 0, 0])
  gains, rows = np.asarray([0.6, 0.2, 0.0]), np.asarray([3, 2, 0])
  d = experience.calibration_diagnostics(r_cal, words, fmt, pid_s, adv, adv_task, pid, gains, rows)
  assert d["cal/len_corr"] == pytest.approx(0.0)  # mean of +1 (prompt 0) and -1 (prompt 1)
  assert d["cal/only_signal_frac"] == 0.5
  assert d["cal/anchor_gain/a0"] == pytest.approx(0.2) and d["cal/anchor_gain/a1"] == pytest.approx(0.1)
  assert "cal/anchor_gain/a2" not in d


def test_anchor_gains_match_the_contrastive_terms():
  """Per anchor index, the sum of contrastive_gain's per-anchor terms: with one anchor per row it is the gain."""
  s_slow, s_fast = (np.log(p)[None, :, None, :].astype(np.float32) for p in (SLOW, FAST))
  mask = np.asarray([[True, True, False]])
  total, n = rl.anchor_gains(s_slow, s_fast, mask, GT)
  np.testing.assert_allclose(total, [0.4722, 0.0639, 0.0], atol=1e-4)
  np.testing.assert_array_equal(n, [1, 1, 0])
  one = np.asarray([[True, False, False]])
  np.testing.assert_allclose(rl.anchor_gains(s_slow, s_fast, one, GT)[0][0],
                             rl.calibration_gain(s_slow, s_fast, one, GT, return_gain=True)[1][0], rtol=1e-6)


def test_slow_omits_fast_correct_by_hand():
  """One wheel of 3 clusters, GT {0, 1}. Prompt 0: slow rows name {0} and {0, 1}, the fast row {1}: the first slow
  row omits 1, the second does not (1 of 2 pairs). Prompt 1: the fast row names only a wrong cluster (0 of 1)."""
  pred = np.zeros((5, 1, 3), bool)
  pred[0, 0, 0] = True
  pred[1, 0, :2] = True
  pred[2, 0, 1] = True
  pred[3, 0, 0] = True
  pred[4, 0, 2] = True
  gt = np.zeros((5, 1, 3), bool)
  gt[:, 0, :2] = True
  mode = np.asarray([0, 0, 1, 0, 1])
  pid = np.asarray([0, 0, 0, 1, 1])
  assert experience.slow_omits_fast_correct(pred, gt, mode, pid) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------- word level: the emitted words


def _emitted_hand():
  """The hand example's three answers as [1, 3, 1, 4] emitted masks: slot i emits word i of 'sad, angry, worried'."""
  out = {}
  for answer, n in ANSWERS.items():
    e = np.zeros((1, 3, 1, 4), bool)
    for i in range(n):
      e[0, i, 0, i] = True  # sad at slot 0, angry at slot 1, worried at slot 2
    out[answer] = e
  return out


def test_emitted_reading_by_hand_favours_short_answers():
  """'emitted': each said word's own probability at its slot. sad (correct): slow .60 >= fast .40, no cost; angry
  (correct): .50 < .55, costs .05; worried (wrong): .30 < .40, no cost. Means over the words said: 0, -.05 / 2,
  -.05 / 3. Word level cannot see what was left out, and its mean favours the one-word answer: the reason the
  default reads category-level confidence at the first position (docs/method.md E3)."""
  s_slow, s_fast = (np.log(p)[None, :, None, :].astype(np.float32) for p in (SLOW, FAST))
  cfg = rl.CalibrationConfig(reading="emitted")
  got = {}
  for answer, e in _emitted_hand().items():
    mask = e.any(axis=(2, 3))
    got[answer] = float(rl.one_sided_calibration(s_slow, s_fast, mask, GT, None, cfg, emitted=e)[0])
  np.testing.assert_allclose([got[a] for a in ANSWERS], [0.0, -0.025, -0.05 / 3], atol=1e-6)
  assert got["sad"] > got["sad, angry"]  # the ordering the category-level readings keep, broken here
  with pytest.raises(ValueError, match="emitted"):
    rl.one_sided_calibration(s_slow, s_fast, np.ones((1, 3), bool), GT, None, cfg)


def test_emitted_categories_by_hand():
  """Token ids: 1 <answer>, 2 separator, 3 </answer>, 5..8 first tokens of four categories (7 also of category 0,
  a shared first token). Row 0: '<answer> 5 2 7 3' -> slot 0 emits 5 (cat 0), slot 1 emits 7 (cats 0 and 2).
  Row 1 is cut right after the separator: its second slot has no next token within the length."""
  sets = np.zeros((1, 4, 10), bool)
  for c, tok in enumerate((5, 6, 7, 8)):
    sets[0, c, tok] = True
  sets[0, 0, 7] = True
  comp = np.asarray([[9, 1, 5, 2, 7, 3, 0], [1, 6, 2, 0, 0, 0, 0]])
  lengths = np.asarray([6, 3])
  spec = experience.rollout.AnchorSpec(answer_open=1, separators=(2,), answer_close=3, num_anchors=3)
  e = experience.emitted_categories(comp, lengths, spec, sets)
  assert e.shape == (2, 3, 1, 4)
  want = np.zeros_like(e)
  want[0, 0, 0, 0] = True
  want[0, 1, 0, [0, 2]] = True
  want[1, 0, 0, 1] = True
  np.testing.assert_array_equal(e, want)


@pytest.mark.parametrize("space", ["reward", "mixed"])
def test_a_malformed_row_gains_nothing_when_the_calibration_is_folded_into_the_rewards(space):
  """Calibration in reward space: rows 0-2 well formed with task rewards .2/.3/.2 and r_cal -0.8 (fast puts .45 on
  each of the two GT categories at the first slot, slow .05), row 3 malformed (its task rewards and r_cal are 0).
  Folding the raw r_cal (<= 0) would give the well-formed rows -.2/-.1/-.2 against row 3's 0 and rank row 3 first;
  the fold uses r_cal centred over the well-formed rows (here all equal, so it folds 0), and row 3 ranks last, as
  in advantage space. The diagnostics' task-only advantage is the one before any fold."""
  fmt = np.asarray([True, True, True, False])
  r = np.asarray([[.2, .2, .2, 1], [.3, .3, .3, 1], [.2, .2, .2, 1], [0, 0, 0, 0]], np.float32)
  lam = 1.0 if space == "reward" else 0.5
  adv = experience.AdvantageSettings(disentangle=True, scale=True, eps=1e-4, ddof=1, group="prompt",
                                     weights=((1, 1, 0, 0.1, 0.5), (1, 1, 0, 0.1, 0.0)), cal_in_reward=lam,
                                     cal_std_floor=0.05)
  fast = np.log(np.tile([[.45, .45, .05, .05]], (4, 1)))[:, None, None, :].astype(np.float32)
  slow = np.log(np.tile([[.05, .05, .45, .45]], (4, 1)))[:, None, None, :].astype(np.float32)
  logmass = (slow, fast, np.ones((4, 1), bool))
  a, r_cal, diag = experience.advantages_and_calibration(
      r, np.ones(4, bool), np.zeros(4, np.int32), np.zeros(4, np.int32), logmass, np.tile(GT, (4, 1, 1)), fmt,
      None, adv=adv, kind="one_sided", cal=rl.CalibrationConfig(precision_side=False), num_groups=1, group_size=4)
  np.testing.assert_allclose(r_cal, [-0.8, -0.8, -0.8, 0.0], atol=1e-6)
  assert np.argmin(a) == 3 and np.argmax(a) == 1
  np.testing.assert_allclose(a, diag["adv_task_B"], atol=1e-5)  # equal r_cal: centred to 0, the fold adds nothing


def test_a_reading_for_another_kind_is_refused_by_the_config_check():
  import pathlib  # noqa: PLC0415

  from merr1_jax import config as cfglib  # noqa: PLC0415
  config = cfglib.load(str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "base.py"))
  config.rl.calibration, config.rl.cal_reading = "contrastive_gain", "max"
  with pytest.raises(cfglib.ConfigError, match=r"rl\.cal_reading: 'max' is read by rl\.calibration='one_sided' only"):
    settings.validate(config)
  config.rl.calibration = "one_sided"
  settings.validate(config)
