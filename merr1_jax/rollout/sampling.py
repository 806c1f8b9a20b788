"""Token selection methods: small frozen (hashable) dataclasses, each a pure function of logits and a key.

Every method returns the chosen token and two log-probabilities of it:
  * ``logp``: under the *untempered, untruncated* policy, log softmax(logits). This is the behaviour log-prob the
    RL loss compares against (the policy being optimised is the plain softmax; temperature and truncation are
    exploration devices of the sampler).
  * ``logp_sampled``: under the distribution actually sampled from (tempered and truncated), for diagnostics and
    importance weights.

Being frozen dataclasses, methods are hashable and can be static arguments of jit: changing the temperature
recompiles, switching batches does not.

Shape legend: B rows, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG = -jnp.inf


class Sample(NamedTuple):
  token_B: Array  # int32
  logp_B: Array  # float32, untempered policy
  logp_sampled_B: Array  # float32, the distribution sampled from


def _finish(logits_BxV: Array, filtered_BxV: Array, token_B: Array) -> Sample:
  take = lambda l: jnp.take_along_axis(jax.nn.log_softmax(l, axis=-1), token_B[:, None], axis=-1)[:, 0]
  return Sample(token_B.astype(jnp.int32), take(logits_BxV), take(filtered_BxV))


@dataclasses.dataclass(frozen=True)
class Greedy:
  """argmax; ``logp_sampled`` is 0 (the choice is deterministic)."""

  def __call__(self, logits_BxV: Array, rng: Array | None = None) -> Sample:
    del rng
    logits = logits_BxV.astype(jnp.float32)
    token = jnp.argmax(logits, axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), token[:, None], -1)[:, 0]
    return Sample(token.astype(jnp.int32), logp, jnp.zeros_like(logp))


@dataclasses.dataclass(frozen=True)
class Temperature:
  """Sample from softmax(logits / temperature), optionally dropping tokens below ``min_p`` x the top prob."""

  temperature: float = 1.0
  min_p: float = 0.0

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 (use Greedy for argmax), got {self.temperature}")
    if not 0.0 <= self.min_p < 1.0:
      raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

  def truncate(self, scaled_BxV: Array) -> Array:
    """Hook for subclasses: mask tokens outside the candidate set with -inf."""
    return scaled_BxV

  def filtered(self, logits_BxV: Array) -> Array:
    scaled = logits_BxV.astype(jnp.float32) / self.temperature
    scaled = self.truncate(scaled)
    if self.min_p > 0:
      top = scaled.max(-1, keepdims=True)
      scaled = jnp.where(scaled >= top + jnp.log(self.min_p), scaled, _NEG)
    return scaled

  def __call__(self, logits_BxV: Array, rng: Array) -> Sample:
    logits = logits_BxV.astype(jnp.float32)
    filtered = self.filtered(logits)
    return _finish(logits, filtered, inverse_cdf_sample(rng, filtered))


def inverse_cdf_sample(rng: Array, logits_BxV: Array) -> Array:
  """One categorical draw per row from softmax(logits) by inverting the CDF with a single uniform per row.

  jax.random.categorical (Gumbel-max) draws V random numbers per row; on CPU, generating them dominates a small
  model's decode step. Here: cumulative probabilities, one uniform u per row, and the first token whose
  cumulative mass exceeds u * total (scaling by the float32 total absorbs the cumsum's rounding). Tokens with
  zero probability (masked to -inf) add no mass, so they are never chosen.
  """
  probs = jax.nn.softmax(logits_BxV, axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(rng, (logits_BxV.shape[0], 1), jnp.float32) * cdf[:, -1:]
  token = jnp.sum(cdf <= u, axis=-1)
  # u can equal the total only by rounding: clamp to the last token with mass.
  last = logits_BxV.shape[-1] - 1 - jnp.argmax((probs > 0)[:, ::-1], axis=-1)
  return jnp.minimum(token, last).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class TopK(Temperature):
  """Sample among the ``k`` most likely tokens (ties at the k-th logit are all kept)."""

  k: int = 50

  def __post_init__(self):
    super().__post_init__()
    if self.k < 1:
      raise ValueError(f"top-k needs k >= 1, got {self.k}")

  def truncate(self, scaled_BxV: Array) -> Array:
    k = min(self.k, scaled_BxV.shape[-1])
    kth = jax.lax.top_k(scaled_BxV, k)[0][:, -1:]
    return jnp.where(scaled_BxV >= kth, scaled_BxV, _NEG)


@dataclasses.dataclass(frozen=True)
class TopP(Temperature):
  """Nucleus sampling: the smallest set of most likely tokens whose (tempered) mass reaches ``p``."""

  p: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 < self.p <= 1.0:
      raise ValueError(f"top-p needs 0 < p <= 1, got {self.p}")

  def truncate(self, scaled_BxV: Array) -> Array:
    if self.p >= 1.0:
      return scaled_BxV
    sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # A token stays if the mass of the tokens strictly more likely than it is below p (the top one always does).
    keep = mass_before < self.p
    cutoff = jnp.where(keep, sorted_BxV, jnp.inf).min(-1, keepdims=True)
    return jnp.where(scaled_BxV >= cutoff, scaled_BxV, _NEG)


Method = Greedy | Temperature | TopK | TopP


def from_config(kind: str, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                min_p: float = 0.0) -> Method:
  """Builds a method from config fields: kind in {'greedy', 'temperature', 'top_k', 'top_p'}."""
  if kind == "greedy":
    return Greedy()
  if kind == "temperature":
    return Temperature(temperature, min_p)
  if kind == "top_k":
    return TopK(temperature, min_p, k=top_k)
  if kind == "top_p":
    return TopP(temperature, min_p, p=top_p)
  raise ValueError(f"unknown sampling kind {kind!r}; expected greedy, temperature, top_k or top_p")
