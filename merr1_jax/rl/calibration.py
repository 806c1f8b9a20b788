"""Slow-fast confidence calibration (SFC): category log-mass, answer anchors and the calibration reward.

docs/method.md, "Slow-fast confidence calibration (r_cal)". All functions are pure and jit-able.

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
    instead of -inf, so differences of log-masses stay finite.
"""

from __future__ import annotations

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


def _streaming_logmass(chunks_fn, n_chunks: int, sets_NxKC_chunks: Array, lead_shape) -> tuple[Array, Array]:
  """Online logsumexp: returns (log sum_v exp l_v over all v, log sum_{v in T(c)} exp l_v), both float32.

  ``chunks_fn(i)`` returns the float32 logits of vocabulary chunk i, shape [..., N].
  """
  kc = sets_NxKC_chunks.shape[-1]

  def body(carry, i):
    m, total, mass = carry  # running max, sum exp(l - m) over all tokens, and per category
    l_xN = chunks_fn(i)
    m_new = jnp.maximum(m, l_xN.max(axis=-1))
    decay = jnp.exp(m - m_new)
    p_xN = jnp.exp(l_xN - m_new[..., None])
    total = total * decay + p_xN.sum(axis=-1)
    mass = mass * decay[..., None] + p_xN @ sets_NxKC_chunks[i]
    return (m_new, total, mass), None

  init = (
      jnp.full(lead_shape, -jnp.inf, jnp.float32),
      jnp.zeros(lead_shape, jnp.float32),
      jnp.zeros((*lead_shape, kc), jnp.float32),
  )
  (m, total, mass), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
  lse = m + jnp.log(total)
  logmass = m[..., None] + jnp.log(mass)
  return lse, jnp.maximum(logmass, LOGMASS_FLOOR + lse[..., None])


def category_logmass(logits_BxTxV: Array, token_sets: Array, *, chunk_size: int = 8192) -> Array:
  """S_t(c) = log sum_{v in T(c)} softmax(logits_t)_v, for every position and category (method.md, SFC step 1).

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

  lse, logmass = _streaming_logmass(chunk_logits, n, sets_chunks, logits.shape[:-1])
  return (logmass - lse[..., None]).reshape(*logits.shape[:-1], k, c)


def category_logmass_from_hidden(
    h_BxTxD: Array, w_DxV: Array, token_sets: Array, *, chunk_size: int = 8192
) -> Array:
  """Same as ``category_logmass(h @ w, ...)`` but never materialises the logits beyond one vocabulary chunk."""
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

  lse, logmass = _streaming_logmass(chunk_logits, n, sets_chunks, h_BxTxD.shape[:-1])
  return (logmass - lse[..., None]).reshape(*h_BxTxD.shape[:-1], k, c)


def answer_anchors(
    tokens_BxT: Array,
    valid_BxT: Array,
    answer_open_id: int,
    separator_ids: Array,
    answer_close_id: int,
    num_anchors: int,
) -> tuple[Array, Array]:
  """Positions whose next-token distribution predicts the first token of an emotion word (method.md, step 2).

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
  m = m.astype(jnp.float32)
  n = m.sum(axis=axis)
  return (x * m).sum(axis=axis) / jnp.maximum(n, 1.0), n > 0


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
  """The calibration reward r_cal = tanh(gain / tau) (method.md, SFC step 5).

  gain = mean over anchors of [(S_slow(GT) - S_fast(GT)) - (S_slow(Neg) - S_fast(Neg))], averaged over the
  wheels that hold a GT cluster. S(GT) is the mean log-mass over GT clusters, S(Neg) over the other existing
  clusters of the wheel.

  Args:
    S_slow, S_fast: [B, A, K, C] category log-mass at the anchors, in the slow and the fast context.
    anchor_mask: [B, A] bool.
    gt_multihot: [B, K, C] 0/1 ground-truth clusters.
    wheel_mask: [B, K] bool, wheels with at least one GT cluster.
    tau: temperature of the tanh squashing.
    cluster_mask: [K, C] bool, which padded cluster slots exist (default: all).
    return_gain: also return the raw gain.

  Returns:
    r_cal_B in (-1, 1), 0 where a row has no anchor or no GT wheel; and gain_B if ``return_gain``.
  """
  d_BxAxKxC = S_slow.astype(jnp.float32) - S_fast.astype(jnp.float32)
  if cluster_mask is None:
    cluster_mask = jnp.ones(gt_multihot.shape[1:], bool)
  cluster_mask = cluster_mask.astype(bool)[None]
  gt = gt_multihot.astype(bool) & cluster_mask
  neg = cluster_mask & ~gt
  d_gt_BxAxK, _ = _masked_mean(d_BxAxKxC, gt[:, None], axis=-1)
  d_neg_BxAxK, _ = _masked_mean(d_BxAxKxC, neg[:, None], axis=-1)
  per_anchor_BxAxK = d_gt_BxAxK - d_neg_BxAxK
  per_wheel_BxK, has_anchor_B1 = _masked_mean(per_anchor_BxAxK, anchor_mask[:, :, None], axis=1)
  wheels = wheel_mask.astype(bool) & gt.any(axis=-1)
  gain_B, has_wheel_B = _masked_mean(per_wheel_BxK, wheels, axis=1)
  ok_B = has_wheel_B & has_anchor_B1[:, 0]
  gain_B = jnp.where(ok_B, gain_B, 0.0)
  r_cal_B = jnp.tanh(gain_B / tau)
  return (r_cal_B, gain_B) if return_gain else r_cal_B
