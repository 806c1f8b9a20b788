"""Sampling methods: empirical frequencies match the intended distributions (chi-square, fixed seed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax.rollout import sampling

LOGITS = np.array([2.0, 1.5, 0.5, 0.0, -1.0, -3.0], np.float32)
N = 40_000
# Upper 0.1% points of the chi-square distribution, by degrees of freedom (standard tables).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _expected(temperature=1.0, k=None, p=None, min_p=0.0):
  """Independent numpy construction of the target distribution."""
  s = LOGITS.astype(np.float64) / temperature
  probs = _softmax(s)
  keep = np.ones_like(probs, bool)
  if k is not None:
    keep &= s >= np.sort(s)[::-1][k - 1]
  if p is not None:
    order = np.argsort(-probs)
    acc = 0.0
    nucleus = np.zeros_like(keep)
    for i in order:
      nucleus[i] = True
      acc += probs[i]
      if acc >= p:
        break
    keep &= nucleus
  if min_p:
    keep &= probs >= min_p * probs.max()
  out = np.where(keep, probs, 0.0)
  return out / out.sum()


def _draw(method, seed=0):
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N, LOGITS.size))
  out = jax.jit(method)(logits, jax.random.key(seed))
  return out, np.bincount(np.asarray(out.token_B), minlength=LOGITS.size)


@pytest.mark.parametrize(
    "method,target",
    [
        (sampling.Temperature(1.0), dict()),
        (sampling.Temperature(0.5), dict(temperature=0.5)),
        (sampling.Temperature(2.0), dict(temperature=2.0)),
        (sampling.TopK(1.0, k=3), dict(k=3)),
        (sampling.TopK(0.7, k=2), dict(temperature=0.7, k=2)),
        (sampling.TopP(1.0, p=0.8), dict(p=0.8)),
        (sampling.TopP(1.5, p=0.6), dict(temperature=1.5, p=0.6)),
        (sampling.Temperature(1.0, min_p=0.2), dict(min_p=0.2)),
    ],
)
def test_empirical_frequencies_match(method, target):
  out, counts = _draw(method)
  want = _expected(**target)
  support = want > 0
  assert counts[~support].sum() == 0, "a token outside the candidate set was sampled"
  exp_counts = want[support] * N
  chi2 = ((counts[support] - exp_counts) ** 2 / exp_counts).sum()
  dof = int(support.sum()) - 1
  if dof:
    assert chi2 < CHI2_999[dof], f"chi2={chi2:.1f} for dof={dof}"
  # logp is under the untempered policy; logp_sampled under the distribution sampled from.
  tok = np.asarray(out.token_B)
  np.testing.assert_allclose(out.logp_B, np.log(_softmax(LOGITS.astype(np.float64)))[tok], rtol=1e-5)
  np.testing.assert_allclose(out.logp_sampled_B, np.log(want[tok]), rtol=1e-4, atol=1e-5)


def test_greedy_is_argmax_with_policy_logp():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(7, 11)), jnp.float32)
  out = sampling.Greedy()(logits)
  np.testing.assert_array_equal(out.token_B, np.argmax(np.asarray(logits), -1))
  np.testing.assert_allclose(out.logp_B, jnp.max(jax.nn.log_softmax(logits), -1), rtol=1e-6)
  assert np.all(np.asarray(out.logp_sampled_B) == 0)


def test_top_p_keeps_at_least_the_top_token():
  out, counts = _draw(sampling.TopP(1.0, p=1e-6))
  assert counts[0] == N


def test_methods_are_hashable_static_config():
  assert hash(sampling.TopK(1.0, k=5)) == hash(sampling.TopK(1.0, k=5))
  assert sampling.from_config("top_p", temperature=0.9, top_p=0.95) == sampling.TopP(0.9, p=0.95)


@pytest.mark.parametrize(
    "make,msg",
    [
        (lambda: sampling.Temperature(0.0), "temperature must be > 0"),
        (lambda: sampling.TopK(1.0, k=0), "k >= 1"),
        (lambda: sampling.TopP(1.0, p=0.0), "0 < p <= 1"),
        (lambda: sampling.Temperature(1.0, min_p=1.0), "min_p"),
        (lambda: sampling.from_config("beam"), "unknown sampling kind"),
    ],
)
def test_bad_settings_fail_loudly(make, msg):
  with pytest.raises(ValueError, match=msg):
    make()
