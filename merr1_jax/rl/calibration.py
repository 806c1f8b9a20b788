"""Slow-fast confidence calibration (SFC, method.md E3): category log-mass, answer anchors and r_cal.

docs/method.md, "Slow-fast confidence calibration (E3)". All functions are pure and jit-able. The calibration
kinds ``rl.calibration`` can select live in ``CALIBRATIONS`` (name -> reward function); ``register_calibration``
adds one. ``none`` is not an entry: it skips the calibration passes altogether.

Shape legend:
  B: completions          T: sequence positions        A: answer anchors per completion
  V: vocabulary           D: model width               K: label wheels        C: clusters per wheel (padded)
  N: vocabulary chunk size

Conventions:
  * ``token_sets_KxCxV`` is a 0/1 mask: token v is a first token of some word of cluster c in wheel k
    (built host-side by ``merr1_jax.rewards.category_token_sets``).
  * Log-mass is computed in float32 with an online (streaming) logsumexp over vocabulary chunks, so at most one
    [B, T, N] float32 chunk exists at a time, never a float32 [B, T, V] tensor.
  * A category whose probability mass underflows float32 (or whose token set is empty) gets ``LOGMASS_FLOOR``
    instead of -inf, so differences of log-masses stay finite. So does every category of a position whose
    logits are all -inf (no distribution at all).
  * Static settings (``tau``, ``alpha``, chunk sizes) are Python numbers, checked at trace time.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

# log of the smallest positive normal float32 (~1.2e-38). A category less likely than that counts as this.
LOGMASS_FLOOR = -87.3


def _pad_vocab(x: Array, chunk: int, axis: int, value: float) -> tuple[Array, int]:
  v = x.shape[axis]
  n = -(-v // chunk)
  pad = n * chunk - v
  if pad:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    x = jnp.pad(x, widths, constant_values=value)
  return x, n


def _streaming_logmass(chunks_fn, n_chunks: int, sets_NxKC_chunks: Array, lead_shape) -> Array:
  """Online logsumexp: log(sum_{v in T(c)} exp l_v) - log(sum_v exp l_v), float32, floored at LOGMASS_FLOOR.

  ``chunks_fn(i)`` returns the float32 logits of vocabulary chunk i, shape [..., N]. The running max is only
  used as a shift where it is finite: a chunk whose logits are all -inf (e.g. a masked or padded stretch of
  the vocabulary) must not produce exp(-inf - -inf) = NaN, so the result does not depend on the chunk size.
  """
  kc = sets_NxKC_chunks.shape[-1]

  def body(carry, i):
    m, total, mass = carry  # running max, sum exp(l - m) over all tokens, and per category
    l_xN = chunks_fn(i)
    m_new = jnp.maximum(m, l_xN.max(axis=-1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all -inf so far: total and mass are 0, any shift works
    decay = jnp.exp(m - shift)  # m = -inf -> 0, which rescales the zero sums harmlessly
    p_xN = jnp.exp(l_xN - shift[..., None])
    total = total * decay + p_xN.sum(axis=-1)
    mass = mass * decay[..., None] + p_xN @ sets_NxKC_chunks[i]
    return (m_new, total, mass), None

  init = (
      jnp.full(lead_shape, -jnp.inf, jnp.float32),
      jnp.zeros(lead_shape, jnp.float32),
      jnp.zeros((*lead_shape, kc), jnp.float32),
  )
  (_, total, mass), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
  # Both sums carry the same factor exp(-m), so their log-ratio is the log-probability of the category.
  has_mass = total > 0  # False only when every logit is -inf
  safe_total = jnp.where(has_mass, total, 1.0)[..., None]
  logmass = jnp.log(mass) - jnp.log(safe_total)
  return jnp.where(has_mass[..., None], jnp.maximum(logmass, LOGMASS_FLOOR), LOGMASS_FLOOR)


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
  chunk = min(chunk_size, v)
  logits, n = _pad_vocab(logits_BxTxV, chunk, -1, -jnp.inf)
  sets_NxKC = _pad_vocab(token_sets.reshape(k * c, v).astype(jnp.float32), chunk, -1, 0.0)[0]
  sets_chunks = sets_NxKC.reshape(k * c, n, chunk).transpose(1, 2, 0)  # [n, N, KC]

  def chunk_logits(i):
    return jax.lax.dynamic_slice_in_dim(logits, i * chunk, chunk, axis=-1).astype(jnp.float32)

  logmass = _streaming_logmass(chunk_logits, n, sets_chunks, logits.shape[:-1])
  return logmass.reshape(*logits.shape[:-1], k, c)


def category_logmass_from_hidden(
    h_BxTxD: Array, w_DxV: Array, token_sets: Array, *, chunk_size: int = 8192
) -> Array:
  """(E3 step 1) ``category_logmass(h @ w, ...)`` without materialising the logits beyond one vocabulary chunk.

  This is the form training uses (rollout.score reads the hidden states at the anchors).
  """
  k, c, v = token_sets.shape
  if w_DxV.shape[-1] != v:
    raise ValueError(f"unembedding vocab {w_DxV.shape[-1]} != token_sets vocab {v}")
  chunk = min(chunk_size, v)
  w_pad, n = _pad_vocab(w_DxV, chunk, -1, 0.0)
  sets_NxKC = _pad_vocab(token_sets.reshape(k * c, v).astype(jnp.float32), chunk, -1, 0.0)[0]
  sets_chunks = sets_NxKC.reshape(k * c, n, chunk).transpose(1, 2, 0)
  h32 = h_BxTxD.astype(jnp.float32)
  col_NxV = jnp.arange(n * chunk)

  def chunk_logits(i):
    w_DxN = jax.lax.dynamic_slice_in_dim(w_pad, i * chunk, chunk, axis=-1).astype(jnp.float32)
    logits = h32 @ w_DxN
    # Padded vocabulary columns must not count towards the normaliser.
    real = jax.lax.dynamic_slice_in_dim(col_NxV, i * chunk, chunk) < v
    return jnp.where(real, logits, -jnp.inf)

  logmass = _streaming_logmass(chunk_logits, n, sets_chunks, h_BxTxD.shape[:-1])
  return logmass.reshape(*h_BxTxD.shape[:-1], k, c)


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


def _static_scalar(value, name: str) -> float:
  """A static (Python or concrete) float setting; a traced value is a clear error, not a silent no-check."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise TypeError(f"{name} must be a static Python float (close over it or mark it static under jit), "
                    f"got {type(value).__name__}") from None


def _gt_and_neg(gt_multihot, cluster_mask):
  if cluster_mask is None:
    cluster_mask = jnp.ones(gt_multihot.shape[1:], bool)
  cluster_mask = cluster_mask.astype(bool)[None]  # [1, K, C]
  gt = gt_multihot.astype(bool) & cluster_mask
  return gt, cluster_mask & ~gt, cluster_mask


def _mean_over_anchors_and_gt_wheels(x_BxAxK: Array, anchor_mask, gt_BxKxC, wheel_mask) -> Array:
  """Mean over the valid anchors, then over the wheels with a GT cluster; 0 for a row lacking either."""
  per_wheel_BxK, has_anchor_BxK = _masked_mean(x_BxAxK, anchor_mask[:, :, None], axis=1)
  wheels = wheel_mask.astype(bool) & gt_BxKxC.any(axis=-1)
  mean_B, has_wheel_B = _masked_mean(per_wheel_BxK, wheels, axis=1)
  return jnp.where(has_wheel_B & has_anchor_BxK[:, 0], mean_B, 0.0)


def calibration_gain(
    S_slow,  # noqa: N803 - the method's symbol
    S_fast,  # noqa: N803
    anchor_mask,
    gt_multihot,
    wheel_mask,
    tau: float = 1.0,
    *,
    cluster_mask=None,
    return_gain: bool = False,
):
  """(E3 step 5, ``rl.calibration = 'contrastive_gain'``) The calibration reward r_cal = tanh(gain / tau).

  gain = mean over anchors of [(S_slow(GT) - S_fast(GT)) - (S_slow(Neg) - S_fast(Neg))], averaged over the
  wheels that hold a GT cluster. S(GT) is the mean log-mass over GT clusters, S(Neg) over the other existing
  clusters of the wheel.

  Args:
    S_slow, S_fast: [B, A, K, C] category log-mass at the anchors, in the slow and the fast context.
    anchor_mask: [B, A] bool.
    gt_multihot: [B, K, C] 0/1 ground-truth clusters.
    wheel_mask: [B, K] bool, wheels with at least one GT cluster.
    tau: temperature of the tanh squashing; a static float > 0 (ValueError otherwise, at trace time).
    cluster_mask: [K, C] bool, which padded cluster slots exist (default: all).
    return_gain: also return the raw gain.

  Returns:
    r_cal_B in (-1, 1), 0 where a row has no anchor or no GT wheel; and gain_B if ``return_gain``.
  """
  tau = _static_scalar(tau, "tau")
  if not tau > 0:  # also rejects NaN
    raise ValueError(f"calibration_gain: tau must be > 0, got {tau}")
  d_BxAxKxC = S_slow.astype(jnp.float32) - S_fast.astype(jnp.float32)
  gt, neg, _ = _gt_and_neg(gt_multihot, cluster_mask)
  d_gt_BxAxK, _ = _masked_mean(d_BxAxKxC, gt[:, None], axis=-1)
  d_neg_BxAxK, _ = _masked_mean(d_BxAxKxC, neg[:, None], axis=-1)
  gain_B = _mean_over_anchors_and_gt_wheels(d_gt_BxAxK - d_neg_BxAxK, anchor_mask, gt, wheel_mask)
  r_cal_B = jnp.tanh(gain_B / tau)
  return (r_cal_B, gain_B) if return_gain else r_cal_B


def fast_prior_kl(
    S_slow,  # noqa: N803 - the method's symbol
    S_fast,  # noqa: N803
    anchor_mask,
    gt_multihot,
    wheel_mask,
    alpha: float = 1.0,
    *,
    cluster_mask=None,
    return_kl: bool = False,
):
  """(E3 step 7, ``rl.calibration = 'fast_prior_kl'``) r_cal = -KL(q || p_slow), a penalty pulling the slow
  category distribution toward the fast one, tilted toward the ground truth.

  Per anchor and wheel, over the wheel's existing clusters c:
    p_slow(c) = softmax_c S_slow(c),   p_fast(c) = softmax_c S_fast(c)   (the category masses renormalised)
    q(c) ∝ p_fast(c) · exp(+alpha) on GT clusters, exp(-alpha) on the others
    KL = sum_c q(c) (log q(c) - log p_slow(c))
  averaged over the valid anchors, then over the wheels that hold a GT cluster.

  Sign: KL >= 0 is a distance, so the reward is its negative (<= 0, 0 when p_slow already equals q). The
  calibration passes run without gradient, so the penalty reaches the policy as a reward, not as a loss term.
  Its advantage term is z-normalised over the slow completions of the group (like contrastive_gain's), so only
  its ordering within a group matters, not its scale.

  Args:
    S_slow, S_fast, anchor_mask, gt_multihot, wheel_mask, cluster_mask: as in ``calibration_gain``.
    alpha: the GT tilt; a static finite float >= 0 (ValueError otherwise, at trace time). 0 pulls toward p_fast.
    return_kl: also return the mean KL (= -r_cal).

  Returns:
    r_cal_B <= 0, float32, 0 where a row has no anchor or no GT wheel; and kl_B if ``return_kl``.
  """
  alpha = _static_scalar(alpha, "alpha")
  if not (math.isfinite(alpha) and alpha >= 0):
    raise ValueError(f"fast_prior_kl: alpha must be a finite number >= 0, got {alpha}")
  gt, _, exists = _gt_and_neg(gt_multihot, cluster_mask)
  exists_1x1xKxC, gt_Bx1xKxC = exists[:, None], gt[:, None]
  log_softmax = lambda x: jax.nn.log_softmax(jnp.where(exists_1x1xKxC, x, -jnp.inf), axis=-1)
  logp_slow = log_softmax(S_slow.astype(jnp.float32))
  logq = log_softmax(S_fast.astype(jnp.float32) + jnp.where(gt_Bx1xKxC, alpha, -alpha))
  # 0 log 0 = 0: padded slots and clusters with q = 0 contribute nothing.
  kl_BxAxK = jnp.where(exists_1x1xKxC & (logq > -jnp.inf), jnp.exp(logq) * (logq - logp_slow), 0.0).sum(axis=-1)
  kl_B = _mean_over_anchors_and_gt_wheels(kl_BxAxK, anchor_mask, gt, wheel_mask)
  return (-kl_B, kl_B) if return_kl else -kl_B


# ---------------------------------------------------------------------------------------------------------------
# Registry of calibration kinds (``rl.calibration``)

CalibrationFn = Callable[..., Array]
"""``fn(S_slow, S_fast, anchor_mask, gt_multihot, wheel_mask, *, cluster_mask, tau, alpha) -> r_cal_B``.

Every kind gets every calibration setting as a keyword and uses the ones it needs. It must be pure and
jit-able; r_cal is normalised as an advantage over the slow completions of each group.
"""

CALIBRATIONS: dict[str, CalibrationFn] = {
    "contrastive_gain": lambda *a, cluster_mask=None, tau=1.0, alpha=1.0: calibration_gain(
        *a, tau, cluster_mask=cluster_mask),
    "fast_prior_kl": lambda *a, cluster_mask=None, tau=1.0, alpha=1.0: fast_prior_kl(
        *a, alpha, cluster_mask=cluster_mask),
}


def register_calibration(name: str) -> Callable[[CalibrationFn], CalibrationFn]:
  """Adds a calibration kind under ``name`` (then ``rl.calibration = name`` selects it)."""

  def wrap(fn: CalibrationFn) -> CalibrationFn:
    if name in CALIBRATIONS or name == "none":
      raise ValueError(f"calibration kind {name!r} is already registered (or reserved)")
    CALIBRATIONS[name] = fn
    return fn

  return wrap


def calibration_reward(kind: str, S_slow, S_fast, anchor_mask, gt_multihot, wheel_mask, *,  # noqa: N803
                       cluster_mask=None, tau: float = 1.0, alpha: float = 1.0) -> Array:
  """r_cal_B of the registered kind ``kind`` (see ``CALIBRATIONS``); a clear error for an unknown one."""
  if kind not in CALIBRATIONS:
    raise ValueError(f"unknown calibration kind {kind!r}; registered: {sorted(CALIBRATIONS)} (or 'none')")
  return CALIBRATIONS[kind](S_slow, S_fast, anchor_mask, gt_multihot, wheel_mask, cluster_mask=cluster_mask,
                            tau=tau, alpha=alpha)
