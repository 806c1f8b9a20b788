"""Slow-fast confidence calibration (SFC, method.md E3): category log-mass, answer anchors and r_cal.

docs/method.md, "Slow-fast confidence calibration (E3)". All functions are pure and jit-able. The calibration
kinds ``rl.calibration`` can select live in ``CALIBRATIONS``, a plain mapping of pure functions with one signature
(name -> reward function). ``none`` is not an entry: it skips the calibration passes altogether.
``token_sets_KxCxV`` is a 0/1 mask: token v is a first token of some word of cluster c in wheel k (built host-side
by ``merr1_jax.task.rewards.category_token_sets``). Log-masses are float32 and floored at ``LOGMASS_FLOOR``
instead of -inf, so differences of log-masses stay finite.

Shape legend:
  B: completions          T: sequence positions        A: answer anchors per completion
  V: vocabulary           D: model width               K: label wheels        C: clusters per wheel (padded)
  N: vocabulary chunk size
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from merr1_jax.rl import vocab

Array = jax.Array

# log of the smallest positive normal float32 (~1.2e-38). A category less likely than that counts as this.
LOGMASS_FLOOR = -87.3
# one_sided's readings of a set-level confidence per category (CalibrationConfig.reading; docs/method.md E3).
READINGS = ("first", "max", "emitted")


def _floor(logmass: Array) -> Array:
  return jnp.maximum(logmass, LOGMASS_FLOOR)  # -inf (no mass, or no distribution at all) -> the floor too


def category_logmass(logits_BxTxV: Array, token_sets: Array, *, chunk_size: int = 8192) -> Array:
  """(E3 step 1) S_t(c) = log sum_{v in T(c)} softmax(logits_t)_v, for every position and category.

  Args:
    logits_BxTxV: next-token logits (any float dtype; upcast chunk by chunk to float32).
    token_sets: [K, C, V] 0/1 mask of each category's first tokens.
    chunk_size: vocabulary chunk N.

  Returns:
    S_BxTxKxC, float32 log-probabilities (<= 0; floored at LOGMASS_FLOOR, see the module docstring).
  """
  k, c, v = token_sets.shape
  if logits_BxTxV.shape[-1] != v:
    raise ValueError(f"logits vocab {logits_BxTxV.shape[-1]} != token_sets vocab {v}")
  chunk_logits, n, chunk = vocab.logit_chunks(logits_BxTxV, chunk_size)
  lead = logits_BxTxV.shape[:-1]
  st = vocab.vocab_stream(chunk_logits, n, chunk, lead, sets_nxNxKC=vocab.category_chunks(token_sets, chunk))
  return _floor(st.logmass).reshape(*lead, k, c)


def category_logmass_from_hidden(
    h_BxTxD: Array, w_DxV: Array, token_sets: Array, *, chunk_size: int = 8192
) -> Array:
  """(E3 step 1) ``category_logmass(h @ w, ...)`` without materialising the logits beyond one vocabulary chunk.

  This is the form training uses (the scorer reads the hidden states at the anchors).
  """
  k, c, v = token_sets.shape
  if w_DxV.shape[-1] != v:
    raise ValueError(f"unembedding vocab {w_DxV.shape[-1]} != token_sets vocab {v}")
  chunk_logits, n, chunk = vocab.hidden_chunks(h_BxTxD, w_DxV, chunk_size)
  lead = h_BxTxD.shape[:-1]
  st = vocab.vocab_stream(chunk_logits, n, chunk, lead, sets_nxNxKC=vocab.category_chunks(token_sets, chunk))
  return _floor(st.logmass).reshape(*lead, k, c)


def answer_anchors(
    tokens_BxT: Array,
    valid_BxT: Array,
    answer_open_id: int,
    separator_ids: Array,
    answer_close_id: int,
    num_anchors: int,
) -> tuple[Array, Array]:
  """(E3 step 2) Positions whose next-token distribution predicts the first token of an emotion word.

  An anchor is the position of the last ``<answer>`` token, or of a separator token after it and before the
  first ``</answer>`` that follows it. The logits *at* an anchor predict the token after it.

  Returns:
    (idx_BxA int32 positions, mask_BxA bool); the first ``num_anchors`` anchors in order, padded with mask 0.
  """
  b, t = tokens_BxT.shape
  pos_T = jnp.arange(t)
  valid = valid_BxT.astype(bool)
  is_open = (tokens_BxT == answer_open_id) & valid
  last_open_B = jnp.where(is_open, pos_T, -1).max(axis=1)
  after_open = pos_T[None, :] > last_open_B[:, None]
  is_close = (tokens_BxT == answer_close_id) & valid & after_open
  first_close_B = jnp.where(is_close, pos_T, t).min(axis=1)
  inside = after_open & (pos_T[None, :] < first_close_B[:, None]) & (last_open_B[:, None] >= 0)
  is_sep = jnp.isin(tokens_BxT, jnp.asarray(separator_ids)) & valid & inside
  is_anchor = (pos_T[None, :] == last_open_B[:, None]) | is_sep
  # Stable ordering: anchors first (in position order), then the rest.
  key_BxT = jnp.where(is_anchor, pos_T[None, :], t + pos_T[None, :])
  order_BxT = jnp.argsort(key_BxT, axis=1)[:, :num_anchors]
  mask_BxA = jnp.take_along_axis(is_anchor, order_BxT, axis=1)
  if num_anchors > t:
    pad = num_anchors - t
    order_BxT = jnp.pad(order_BxT, ((0, 0), (0, pad)))
    mask_BxA = jnp.pad(mask_BxA, ((0, 0), (0, pad)))
  return order_BxT.astype(jnp.int32), mask_BxA


def _masked_mean(x: Array, m: Array, axis) -> tuple[Array, Array]:
  """Mean of x over the True entries of m (where, not multiply: a NaN/inf in a masked-out slot stays out)."""
  m = jnp.broadcast_to(m.astype(bool), x.shape)
  n = m.sum(axis=axis)
  return jnp.where(m, x, 0.0).sum(axis=axis) / jnp.maximum(n, 1), n > 0


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
  """Settings of the calibration kinds (method.md E3 defaults). Each kind reads the fields it needs.

  tau: contrastive_gain's temperature, r_cal = tanh(gain / tau); > 0.
  alpha: fast_prior_kl's GT tilt exp(+-alpha) of the fast prior; finite and >= 0.
  precision_side: keep the term on the wrong (non-GT) categories, the side that raises precision by suppressing
    them (method.md E3 "Variants"); False keeps only the GT side.
  reading: one_sided's confidence (``READINGS``): 'first', the category's probability at the first answer
    position only; 'max', its largest probability over the answer's anchors; 'emitted', word level as the paper
    may mean it: the probability of each emitted word at the anchor before it (needs the emitted categories).
  """

  tau: float = 1.0
  alpha: float = 1.0
  precision_side: bool = True
  reading: str = "first"

  def __post_init__(self):
    if self.reading not in READINGS:
      raise ValueError(f"calibration reading must be one of {READINGS}, got {self.reading!r}")
    if not (isinstance(self.tau, (int, float)) and self.tau > 0):  # also rejects NaN
      raise ValueError(f"calibration tau must be > 0, got {self.tau}")
    if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
      raise ValueError(f"calibration alpha must be a finite number >= 0, got {self.alpha}")


def _gt_and_neg(gt_multihot, cluster_mask):
  if cluster_mask is None:
    cluster_mask = jnp.ones(gt_multihot.shape[1:], bool)
  cluster_mask = cluster_mask.astype(bool)[None]  # [1, K, C]
  gt = gt_multihot.astype(bool) & cluster_mask
  return gt, cluster_mask & ~gt, cluster_mask


def _mean_over_anchors_and_gt_wheels(x_BxAxK: Array, anchor_mask, gt_BxKxC) -> Array:
  """Mean over the valid anchors, then over the wheels with a GT cluster; 0 for a row lacking either."""
  per_wheel_BxK, has_anchor_BxK = _masked_mean(x_BxAxK, anchor_mask[:, :, None], axis=1)
  mean_B, has_wheel_B = _masked_mean(per_wheel_BxK, gt_BxKxC.any(axis=-1), axis=1)
  return jnp.where(has_wheel_B & has_anchor_BxK[:, 0], mean_B, 0.0)


def calibration_gain(S_slow, S_fast, anchor_mask, gt_multihot, cluster_mask=None,  # noqa: N803 (method symbols)
                     cfg: CalibrationConfig = CalibrationConfig(), *, return_gain: bool = False):
  """(E3 step 5, ``rl.calibration = 'contrastive_gain'``) The calibration reward r_cal = tanh(gain / tau).

  gain = mean over anchors of [(S_slow(GT) - S_fast(GT)) - (S_slow(Neg) - S_fast(Neg))], averaged over the
  wheels that hold a GT cluster. S(GT) is the mean log-mass over GT clusters, S(Neg) over the other existing
  clusters of the wheel. Without the precision side (``cfg.precision_side`` False) the Neg term is dropped:
  gain = mean over anchors of (S_slow(GT) - S_fast(GT)).

  Args:
    S_slow, S_fast: [B, A, K, C] category log-mass at the anchors, in the slow and the fast context.
    anchor_mask: [B, A] bool.
    gt_multihot: [B, K, C] 0/1 ground-truth clusters (a wheel without one is skipped).
    cluster_mask: [K, C] bool, which padded cluster slots exist (None: all).
    cfg: ``cfg.tau``.
    return_gain: also return the raw gain.

  Returns:
    r_cal_B in (-1, 1), 0 where a row has no anchor or no GT wheel; and gain_B if ``return_gain``.
  """
  d_BxAxKxC = S_slow.astype(jnp.float32) - S_fast.astype(jnp.float32)
  gt, neg, _ = _gt_and_neg(gt_multihot, cluster_mask)
  d_gt_BxAxK, _ = _masked_mean(d_BxAxKxC, gt[:, None], axis=-1)
  d_neg_BxAxK, _ = _masked_mean(d_BxAxKxC, neg[:, None], axis=-1)
  gain_B = _mean_over_anchors_and_gt_wheels(d_gt_BxAxK - d_neg_BxAxK if cfg.precision_side else d_gt_BxAxK,
                                            anchor_mask, gt)
  r_cal_B = jnp.tanh(gain_B / cfg.tau)
  return (r_cal_B, gain_B) if return_gain else r_cal_B


def fast_prior_kl(S_slow, S_fast, anchor_mask, gt_multihot, cluster_mask=None,  # noqa: N803 (method symbols)
                  cfg: CalibrationConfig = CalibrationConfig(), *, return_kl: bool = False):
  """(E3 step 7, ``rl.calibration = 'fast_prior_kl'``) r_cal = -KL(q || p_slow), a penalty pulling the slow
  category distribution toward the fast one, tilted toward the ground truth.

  Per anchor and wheel, over the wheel's existing clusters c:
    p_slow(c) = softmax_c S_slow(c),   p_fast(c) = softmax_c S_fast(c)   (the category masses renormalised)
    q(c) ∝ p_fast(c) · exp(+alpha) on GT clusters, exp(-alpha) on the others (1 without the precision side)
    KL = sum_c q(c) (log q(c) - log p_slow(c))
  averaged over the valid anchors, then over the wheels that hold a GT cluster.

  Sign: KL >= 0 is a distance, so the reward is its negative (<= 0, 0 when p_slow already equals q). The
  calibration passes run without gradient, so the penalty reaches the policy as a reward, not as a loss term.
  Its advantage term is z-normalised over the slow completions of the group (like contrastive_gain's), so only
  its ordering within a group matters, not its scale.

  Args: as ``calibration_gain``; ``cfg.alpha`` is the GT tilt (0 pulls toward p_fast). ``return_kl`` also
  returns the mean KL (= -r_cal).

  Returns:
    r_cal_B <= 0, float32, 0 where a row has no anchor or no GT wheel; and kl_B if ``return_kl``.
  """
  gt, _, exists = _gt_and_neg(gt_multihot, cluster_mask)
  exists_1x1xKxC, gt_Bx1xKxC = exists[:, None], gt[:, None]
  log_softmax = lambda x: jax.nn.log_softmax(jnp.where(exists_1x1xKxC, x, -jnp.inf), axis=-1)
  logp_slow = log_softmax(S_slow.astype(jnp.float32))
  neg_tilt = -cfg.alpha if cfg.precision_side else 0.0
  logq = log_softmax(S_fast.astype(jnp.float32) + jnp.where(gt_Bx1xKxC, cfg.alpha, neg_tilt))
  # 0 log 0 = 0: padded slots and clusters with q = 0 contribute nothing.
  kl_BxAxK = jnp.where(exists_1x1xKxC & (logq > -jnp.inf), jnp.exp(logq) * (logq - logp_slow), 0.0).sum(axis=-1)
  kl_B = _mean_over_anchors_and_gt_wheels(kl_BxAxK, anchor_mask, gt)
  return (-kl_B, kl_B) if return_kl else -kl_B


def set_confidence(S_BxAxKxC: Array, anchor_mask_BxA: Array, reading: str) -> tuple[Array, Array]:
  """One confidence per category and completion, a probability in [0, 1] ([B, K, C]), and whether it exists ([B]).

  'first': exp(S) at the first anchor (the position of ``<answer>``, which predicts the first answer word): the
  slow and the fast context then see the same answer prefix (none), so the number of words said cannot move it.
  'max': the largest exp(S) over the valid anchors (the best chance the category had to be named).
  """
  p = jnp.exp(S_BxAxKxC.astype(jnp.float32))  # LOGMASS_FLOOR -> ~1e-38: no mass
  m = anchor_mask_BxA.astype(bool)
  if reading == "first":
    return jnp.where(m[:, 0, None, None], p[:, 0], 0.0), m[:, 0]
  if reading == "max":
    return jnp.where(m[:, :, None, None], p, 0.0).max(axis=1), m.any(axis=1)
  raise ValueError(f"unknown calibration reading {reading!r}; known: {READINGS}")


def _one_sided_emitted(S_slow, S_fast, anchor_mask, gt, neg, emitted, precision_side):  # noqa: N803
  """'emitted': per emitted word (anchor a, its category), shortfall if correct, excess if wrong; per wheel the
  mean over the emitted words, then over the wheels with a GT cluster. Returns (pen, short, excess, has) [B, K]."""
  e = emitted.astype(bool) & anchor_mask.astype(bool)[:, :, None, None]  # [B, A, K, C]
  ps, pf = jnp.exp(S_slow.astype(jnp.float32)), jnp.exp(S_fast.astype(jnp.float32))
  short = jnp.where(e & gt[:, None], jax.nn.relu(pf - ps), 0.0).sum(axis=(1, 3))
  excess = jnp.where(e & neg[:, None], jax.nn.relu(ps - pf), 0.0).sum(axis=(1, 3))
  n_BxK = (e & (gt | neg)[:, None]).sum(axis=(1, 3))
  d = jnp.maximum(n_BxK, 1)
  pen = (short + excess if precision_side else short) / d
  return pen, short / d, excess / d, n_BxK > 0


def one_sided_calibration(S_slow, S_fast, anchor_mask, gt_multihot, cluster_mask=None,  # noqa: N803 (method symbols)
                          cfg: CalibrationConfig = CalibrationConfig(), *, return_parts: bool = False,
                          emitted=None):
  """(E3, ``rl.calibration = 'one_sided'``) r_cal = -(shortfall on correct categories + excess on wrong ones).

  With c_slow(c), c_fast(c) the set-level confidences of ``set_confidence`` (``cfg.reading``), per wheel:
    shortfall = sum over GT clusters c of max(0, c_fast(c) - c_slow(c))      (slow wrongly deleting a correct one)
    excess    = sum over the other clusters of max(0, c_slow(c) - c_fast(c))  (slow losing its suppression)
  r_cal = -(shortfall + excess), averaged over the wheels that hold a GT cluster; without the precision side
  (``cfg.precision_side`` False) the excess is dropped. Nothing is paid for exceeding fast on a correct category
  or for suppressing a wrong one further: a floor, not a contrast. Probabilities, not log-masses, so one
  category that the slow mode rules out (log-mass near the floor) costs at most its fast probability.

  'emitted' (word level as the paper may mean it) reads instead each emitted word's own probability at the anchor
  before it, in both contexts, and averages the same hinges over the emitted words: a correct word said with less
  confidence than fast costs, a wrong word said with more confidence than fast costs. It reads only the words said,
  so it cannot see a correct category left out, and a mean over the words said can favour short answers (the hand
  example in tests/test_calibration_forms.py).

  Args: as ``calibration_gain``. ``return_parts`` also returns (shortfall_B, excess_B). ``emitted`` [B, A, K, C]
  bool: the categories of the word that follows each anchor (experience.emitted_categories); 'emitted' only.

  Returns:
    r_cal_B in [-2, 0] for 'first' (each sum is at most a probability mass), float32; 0 where a row has no
    anchor or no GT wheel.
  """
  gt, neg, _ = _gt_and_neg(gt_multihot, cluster_mask)
  has_wheel_BxK = gt.any(axis=-1)
  if cfg.reading == "emitted":
    if emitted is None:
      raise ValueError("calibration reading 'emitted' needs the emitted categories (emitted=[B, A, K, C])")
    pen_BxK, short_BxK, excess_BxK, has_BxK = _one_sided_emitted(S_slow, S_fast, anchor_mask, gt, neg, emitted,
                                                                 cfg.precision_side)
    has_B, has_wheel_BxK = has_BxK.any(axis=1), has_wheel_BxK & has_BxK
  else:
    c_slow, has_B = set_confidence(S_slow, anchor_mask, cfg.reading)
    c_fast, _ = set_confidence(S_fast, anchor_mask, cfg.reading)
    short_BxK = jnp.where(gt, jax.nn.relu(c_fast - c_slow), 0.0).sum(axis=-1)
    excess_BxK = jnp.where(neg, jax.nn.relu(c_slow - c_fast), 0.0).sum(axis=-1)
    pen_BxK = short_BxK + excess_BxK if cfg.precision_side else short_BxK
  per_row = lambda x: _masked_mean(x, has_wheel_BxK, axis=1)  # noqa: E731
  (pen_B, has_gt_B), (short_B, _), (excess_B, _) = per_row(pen_BxK), per_row(short_BxK), per_row(excess_BxK)
  ok_B = has_B & has_gt_B
  r_cal_B = jnp.where(ok_B, -pen_B, 0.0)
  if return_parts:
    return r_cal_B, jnp.where(ok_B, short_B, 0.0), jnp.where(ok_B, excess_B, 0.0)
  return r_cal_B


def anchor_gains(S_slow, S_fast, anchor_mask, gt_multihot, cluster_mask=None) -> tuple[Array, Array]:  # noqa: N803
  """Diagnostic: contrastive_gain's per-anchor term [(S_slow - S_fast)(GT) - (S_slow - S_fast)(Neg)], averaged
  over the wheels that hold a GT cluster, per anchor index: (sum over rows [A], rows with that anchor [A])."""
  d = S_slow.astype(jnp.float32) - S_fast.astype(jnp.float32)
  gt, neg, _ = _gt_and_neg(gt_multihot, cluster_mask)
  term_BxAxK = _masked_mean(d, gt[:, None], axis=-1)[0] - _masked_mean(d, neg[:, None], axis=-1)[0]
  per_BxA, has_BxA = _masked_mean(term_BxAxK, gt.any(axis=-1)[:, None, :], axis=2)
  m = anchor_mask.astype(bool) & has_BxA
  return jnp.where(m, per_BxA, 0.0).sum(axis=0), m.sum(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# The calibration kinds ``rl.calibration`` selects: a plain mapping of pure functions with one signature,
#   fn(S_slow_BxAxKxC, S_fast_BxAxKxC, anchor_mask_BxA, gt_multihot_BxKxC, cluster_mask_KxC, cfg) -> r_cal_B,
# jit-able, with r_cal normalised as an advantage over the slow completions of each group. Add a kind with
# ``rl.CALIBRATIONS["mine"] = fn``; ``none`` is reserved: it skips the calibration passes altogether.

CalibrationFn = Callable[..., Array]
CALIBRATIONS: dict[str, CalibrationFn] = {
    "contrastive_gain": calibration_gain,
    "fast_prior_kl": fast_prior_kl,
    "one_sided": one_sided_calibration,
}
