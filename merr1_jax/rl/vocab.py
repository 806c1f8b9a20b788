"""One streaming pass over the vocabulary: the log-normaliser, target logits, entropy and category masses.

Both the RL log-probs (method.md E4, "Token log-probs") and the calibration log-mass (E3 step 1) need statistics
of softmax(h @ w) over a vocabulary that can be 152k wide. ``vocab_stream`` computes them all in one online
log-sum-exp over vocabulary chunks, so at most one float32 [..., N] chunk of logits exists at a time, never a
float32 [..., V] tensor; ``rl.token_logprobs`` and ``rl.category_logmass*`` are thin views of it. Everything is
float32, and the result does not depend on the chunk size. Details: docs/method.md, "The streaming vocabulary pass".

Shape legend:
  ...: leading positions (e.g. B x T)    D: model width    V: vocabulary    N: vocabulary chunk    n: chunks
  KC: categories (K wheels x C clusters, flattened)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class VocabStats(NamedTuple):
  """What one pass returns; fields not asked for are None. ``lse`` is always there."""

  lse: Array  # [...] log sum_v exp(l_v)
  target: Array | None  # [...] l_{target}, the logit of the given token
  entropy: Array | None  # [...] -sum_v p_v log p_v
  logmass: Array | None  # [..., KC] log sum_{v in T(c)} p_v (log-probabilities of the categories; -inf if empty)


def pad_vocab(x: Array, chunk: int, axis: int, value: float) -> tuple[Array, int]:
  """Pads ``axis`` (the vocabulary) of ``x`` with ``value`` up to a multiple of ``chunk``; returns it and n."""
  v = x.shape[axis]
  n = -(-v // chunk)
  if n * chunk != v:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n * chunk - v)
    x = jnp.pad(x, widths, constant_values=value)
  return x, n


def hidden_chunks(h_xD: Array, w_DxV: Array, chunk_size: int) -> tuple[Callable[[Array], Array], int, int]:
  """(chunk_logits(i), n, N) for logits h @ w computed chunk by chunk in float32 (padded columns -inf)."""
  v = w_DxV.shape[-1]
  chunk = min(chunk_size, v)
  w_pad, n = pad_vocab(w_DxV, chunk, -1, 0.0)
  h32 = h_xD.astype(jnp.float32)

  def chunk_logits(i):
    w_DxN = jax.lax.dynamic_slice_in_dim(w_pad, i * chunk, chunk, axis=-1).astype(jnp.float32)
    logits = h32 @ w_DxN
    col_N = (i * chunk + jnp.arange(chunk)).reshape((1,) * (logits.ndim - 1) + (chunk,))
    return jnp.where(col_N < v, logits, -jnp.inf)

  return chunk_logits, n, chunk


def logit_chunks(logits_xV: Array, chunk_size: int) -> tuple[Callable[[Array], Array], int, int]:
  """(chunk_logits(i), n, N) for given logits, upcast chunk by chunk (padded columns -inf)."""
  chunk = min(chunk_size, logits_xV.shape[-1])
  padded, n = pad_vocab(logits_xV, chunk, -1, -jnp.inf)
  return (lambda i: jax.lax.dynamic_slice_in_dim(padded, i * chunk, chunk, axis=-1).astype(jnp.float32)), n, chunk


def category_chunks(token_sets_KxCxV: Array, chunk: int) -> Array:
  """[n, N, KC] float32: the 0/1 category masks of each vocabulary chunk (the right operand of p @ sets)."""
  k, c, v = token_sets_KxCxV.shape
  sets, n = pad_vocab(token_sets_KxCxV.reshape(k * c, v).astype(jnp.float32), chunk, -1, 0.0)
  return sets.reshape(k * c, n, chunk).transpose(1, 2, 0)


def vocab_stream(chunk_logits: Callable[[Array], Array], n: int, chunk: int, lead_shape: tuple[int, ...], *,
                 targets: Array | None = None, with_entropy: bool = False,
                 sets_nxNxKC: Array | None = None) -> VocabStats:
  """The online log-sum-exp over ``n`` chunks of ``chunk`` columns (``chunk_logits(i)`` -> float32 [..., N]).

  Carries, per leading position: the running max m, S = sum exp(l - m), and as asked E = sum exp(l - m) l
  (entropy), the target logit, and M_c = sum_{v in T(c)} exp(l - m) (category masses). At the end
  lse = m + log S, entropy = lse - E / S and log p(c) = log M_c - log S (the shift cancels).
  """
  kc = 0 if sets_nxNxKC is None else sets_nxNxKC.shape[-1]

  @jax.checkpoint
  def body(carry, i):
    m, s, e, tgt, mass = carry
    l_xN = chunk_logits(i)
    m_new = jnp.maximum(m, l_xN.max(-1))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all -inf so far: the sums are 0, any shift works
    decay = jnp.exp(m - shift)  # m = -inf -> 0, which rescales the zero sums harmlessly
    p_xN = jnp.exp(l_xN - shift[..., None])
    s = s * decay + p_xN.sum(-1)
    if with_entropy:  # -inf columns hold p = 0: count them as 0, not 0 * -inf = NaN (nor a NaN gradient)
      e = e * decay + (p_xN * jnp.where(jnp.isfinite(l_xN), l_xN, 0.0)).sum(-1)
    if targets is not None:
      hit = (i * chunk + jnp.arange(chunk)).reshape((1,) * targets.ndim + (chunk,)) == targets[..., None]
      tgt = tgt + jnp.where(hit, l_xN, 0.0).sum(-1)
    if kc:
      mass = mass * decay[..., None] + p_xN @ sets_nxNxKC[i]
    return (m_new, s, e, tgt, mass), None

  zeros = jnp.zeros(lead_shape, jnp.float32)
  init = (jnp.full(lead_shape, -jnp.inf, jnp.float32), zeros, zeros, zeros, jnp.zeros((*lead_shape, kc), jnp.float32))
  (m, s, e, tgt, mass), _ = jax.lax.scan(body, init, jnp.arange(n))
  lse = m + jnp.log(s)
  has_mass = s > 0  # False only when every logit is -inf
  safe_s = jnp.where(has_mass, s, 1.0)
  logmass = None
  if kc:
    logmass = jnp.where(has_mass[..., None], jnp.log(mass) - jnp.log(safe_s)[..., None], -jnp.inf)
  return VocabStats(lse=lse, target=tgt if targets is not None else None,
                    entropy=lse - e / safe_s if with_entropy else None, logmass=logmass)
