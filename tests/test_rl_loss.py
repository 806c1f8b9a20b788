"""Policy-loss math against an independent numpy reference written from the equations in docs/method.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax.rl import loss as L


def _np_reference_loss(logp, logp_old, logp_ref, adv, mask, eps_low, eps_high, beta, agg, *, dual_clip=None,
                       entropy=None, entropy_coef=0.0):
  """GRPO / PPO-clip (+ dual clip) + k3 KL - entropy bonus, float64, explicit loops over rows and tokens
  (docs/method.md, Policy loss (E4)). Returns the loss and how many masked tokens the dual clip capped."""
  b, t = logp.shape
  per_tok = np.zeros((b, t))
  dual_hits = 0
  for i in range(b):
    for j in range(t):
      r = np.exp(logp[i, j] - logp_old[i, j])
      pg = -min(r * adv[i], np.clip(r, 1 - eps_low, 1 + eps_high) * adv[i])
      if dual_clip is not None and adv[i] < 0 and pg > -dual_clip * adv[i]:
        pg = -dual_clip * adv[i]  # loss_t <= -c A for A < 0
        dual_hits += int(mask[i, j])
      d = logp_ref[i, j] - logp[i, j]
      k3 = np.exp(d) - d - 1
      per_tok[i, j] = pg + beta * k3 - (entropy_coef * entropy[i, j] if entropy is not None else 0.0)
  m = mask.astype(np.float64)
  if agg == "token_mean":
    return (per_tok * m).sum() / m.sum(), dual_hits
  if agg == "seq_mean_token_mean":
    return np.mean([(per_tok[i] * m[i]).sum() / m[i].sum() for i in range(b)]), dual_hits
  return (per_tok * m).sum() / (t * b), dual_hits


def _random_inputs(seed=0, b=6, t=9):
  rng = np.random.default_rng(seed)
  logp = np.log(rng.uniform(0.05, 0.9, (b, t))).astype(np.float32)
  logp_old = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  logp_ref = (logp + rng.normal(0, 0.3, (b, t))).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  mask = rng.random((b, t)) < 0.8
  mask[:, 0] = True
  return logp, logp_old, logp_ref, adv, mask


@pytest.mark.parametrize("agg", L.AGGREGATIONS)
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_policy_loss_matches_numpy_reference(agg, eps):
  logp, logp_old, logp_ref, adv, mask = _random_inputs()
  cfg = L.LossConfig(eps_low=eps[0], eps_high=eps[1], aggregation=agg)
  got, _ = L.policy_loss(*map(jnp.asarray, (logp, logp_old, logp_ref, adv, mask)), cfg, beta=0.04)
  want, _ = _np_reference_loss(*(x.astype(np.float64) for x in (logp, logp_old, logp_ref, adv)), mask,
                               eps[0], eps[1], 0.04, agg)
  # float32 against float64: per-token terms are O(1), so their float32 rounding (~6e-8) bounds the atol.
  np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("agg", L.AGGREGATIONS)
def test_policy_loss_with_dual_clip_and_entropy_matches_numpy_reference(agg):
  logp, logp_old, logp_ref, adv, mask = _random_inputs(seed=7)
  # Wider old-policy noise so some negative-advantage tokens have ratios above the dual-clip constant.
  logp_old = (logp + np.random.default_rng(8).normal(0, 0.6, logp.shape)).astype(np.float32)
  entropy = np.random.default_rng(9).uniform(0.5, 3.0, logp.shape).astype(np.float32)
  cfg = L.LossConfig(eps_low=0.2, eps_high=0.28, aggregation=agg, dual_clip=1.5, entropy_coef=0.05)
  got, st = L.policy_loss(*map(jnp.asarray, (logp, logp_old, logp_ref, adv, mask)), cfg, beta=0.04,
                          entropy_BxT=jnp.asarray(entropy))
  want, dual_hits = _np_reference_loss(*(x.astype(np.float64) for x in (logp, logp_old, logp_ref, adv)), mask,
                                       0.2, 0.28, 0.04, agg, dual_clip=1.5, entropy=entropy.astype(np.float64),
                                       entropy_coef=0.05)
  assert dual_hits > 0, "no token hit the dual clip: the case is not exercised"
  assert float(st["dual_clip_sum"]) == dual_hits
  np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-7)
  # Both extras matter: dropping either changes the loss far beyond the tolerance.
  for off in (dict(dual_clip=None), dict(entropy_coef=0.0)):
    other, _ = L.policy_loss(*map(jnp.asarray, (logp, logp_old, logp_ref, adv, mask)),
                             L.LossConfig(**{**dict(eps_low=0.2, eps_high=0.28, aggregation=agg, dual_clip=1.5,
                                                    entropy_coef=0.05), **off}),
                             beta=0.04, entropy_BxT=jnp.asarray(entropy))
    assert abs(float(other) - want) > 1e-4


def _np_stats(logp, logp_old, logp_ref, adv, mask, entropy, eps_low, eps_high):
  """Token-level statistics of the rows of ``mask`` from the definitions, float64."""
  r = np.exp(logp.astype(np.float64) - logp_old)
  d = logp_ref.astype(np.float64) - logp
  kl = np.exp(d) - d - 1
  a = np.broadcast_to(adv[:, None], r.shape)
  m = mask.astype(bool)
  n = m.sum()
  return {"tokens": n, "ratio_mean": r[m].mean(), "ratio_max": r[m].max(), "ratio_min": r[m].min(),
          "clip_frac_low": ((r < 1 - eps_low) & (a < 0))[m].mean(),
          "clip_frac_high": ((r > 1 + eps_high) & (a > 0))[m].mean(),
          "kl": kl[m].mean(), "entropy": entropy[m].mean()}


def test_stats_per_mode_and_combined_over_row_splits_match_numpy():
  """finalize_stats totals and per-group (``<stat>/<mode>``) values equal the definitions; statistics of
  disjoint row blocks combined with combine_stats equal those of the whole batch."""
  logp, logp_old, logp_ref, adv, mask = _random_inputs(seed=11, b=8)
  entropy = np.random.default_rng(12).uniform(0.5, 3.0, logp.shape).astype(np.float32)
  mode_B = np.array([0, 1, 1, 0, 0, 1, 0, 1], np.int32)
  cfg = L.LossConfig(eps_low=0.1, eps_high=0.1)
  args = lambda rows: [jnp.asarray(x[rows]) for x in (logp, logp_old, logp_ref, adv, mask)]
  run = lambda rows: L.policy_loss(*args(rows), cfg, beta=0.04, entropy_BxT=jnp.asarray(entropy[rows]),
                                   group_B=jnp.asarray(mode_B[rows]), group_names=("slow", "fast"))[1]
  whole = L.finalize_stats(run(np.arange(8)))
  parts = L.stats_identity(run(np.arange(8)))
  for rows in (np.array([0, 5]), np.array([1, 2, 3]), np.array([4, 6, 7])):
    parts = L.combine_stats(parts, run(rows))
  combined = L.finalize_stats(parts)
  for name, sel in (("", np.ones(8, bool)), ("/slow", mode_B == 0), ("/fast", mode_B == 1)):
    m = mask & sel[:, None]
    want = _np_stats(logp, logp_old, logp_ref, adv, m, entropy, 0.1, 0.1)
    assert 0 < want["clip_frac_low"] and 0 < want["clip_frac_high"], "no clipping: the fractions are untested"
    for key, value in want.items():
      np.testing.assert_allclose(float(whole[key + name]), value, rtol=1e-6, err_msg=key + name)
      np.testing.assert_allclose(float(combined[key + name]), value, rtol=1e-6, err_msg="combined " + key + name)


def test_kl_estimators_by_hand():
  logp, ref = jnp.array([[np.log(0.5)]]), jnp.array([[np.log(0.25)]])
  d = np.log(0.25) - np.log(0.5)  # log(ref / p) = -log 2
  np.testing.assert_allclose(L.kl_estimate(logp, ref, "k1"), [[-d]], rtol=1e-6)
  np.testing.assert_allclose(L.kl_estimate(logp, ref, "k2"), [[0.5 * d * d]], rtol=1e-6)
  np.testing.assert_allclose(L.kl_estimate(logp, ref, "k3"), [[np.exp(d) - d - 1]], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown KL estimator"):
    L.kl_estimate(logp, ref, "k4")


def test_dual_clip_caps_negative_advantage_loss():
  # rho = e^2 ~ 7.39, A = -1: plain PPO loss is max(rho, 1.2) = 7.39; dual clip c = 3 caps it at 3.
  logp, old = jnp.array([[2.0]]), jnp.array([[0.0]])
  loss, st = L.clipped_objective(logp, old, jnp.array([-1.0]), dual_clip=3.0)
  np.testing.assert_allclose(loss, [[3.0]], rtol=1e-6)
  assert bool(st["dual"][0, 0])
  loss, _ = L.clipped_objective(logp, old, jnp.array([-1.0]))
  np.testing.assert_allclose(loss, [[np.exp(2.0)]], rtol=1e-6)
  with pytest.raises(ValueError, match="dual_clip must be > 1"):
    L.clipped_objective(logp, old, jnp.array([-1.0]), dual_clip=0.5)


def test_clip_fractions_count_active_clips_only():
  logp = jnp.log(jnp.array([[1.5, 0.5, 1.5, 0.5]]))
  old = jnp.zeros((1, 4))
  # A > 0: only ratio 1.5 > 1.2 clips (high). Row with A < 0: only 0.5 < 0.8 clips (low).
  _, st = L.clipped_objective(jnp.concatenate([logp, logp]), jnp.concatenate([old, old]), jnp.array([1.0, -1.0]))
  np.testing.assert_array_equal(st["clipped_high"], [[1, 0, 1, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(st["clipped_low"], [[0, 0, 0, 0], [0, 1, 0, 1]])


def test_step_zero_gradient_is_reinforce():
  """With pi = pi_old = pi_ref: ratio 1, KL 0, and d loss / d logp = -A / num_tokens (REINFORCE, token mean)."""
  logp, _, _, adv, mask = _random_inputs(seed=1)
  logp, adv, mask = map(jnp.asarray, (logp, adv, mask))
  cfg = L.LossConfig()

  def f(lp):
    return L.policy_loss(lp, jax.lax.stop_gradient(lp), jax.lax.stop_gradient(lp), adv, mask, cfg, beta=0.04)

  (loss, st), g = jax.value_and_grad(f, has_aux=True)(logp)
  stats = L.finalize_stats(st)
  np.testing.assert_allclose(stats["ratio_mean"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["kl"], 0.0, atol=1e-7)
  expected = -np.asarray(adv)[:, None] * np.asarray(mask) / np.asarray(mask).sum()
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", L.AGGREGATIONS)
def test_aggregation_is_micro_batch_invariant_with_global_normalisers(agg):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 5)))
  m = jnp.asarray(rng.random((8, 5)) < 0.7).at[:, 0].set(True)
  whole = L.aggregate(x, m, agg)
  n_tok, n_seq = m.sum(), (m.sum(-1) > 0).sum()
  parts = sum(L.aggregate(x[i:i + 2], m[i:i + 2], agg, num_tokens=n_tok, num_seqs=n_seq) for i in range(0, 8, 2))
  np.testing.assert_allclose(parts, whole, rtol=1e-6)


@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_token_logprobs_and_entropy(chunk):
  rng = np.random.default_rng(4)
  h = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 37)), jnp.float32)
  tok = jnp.asarray(rng.integers(0, 37, size=(3, 4)))
  lp, ent = L.token_logprobs(h, w, tok, chunk_size=chunk, with_entropy=True)
  ref = L.logprobs_from_logits(h @ w, tok)
  np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)
  p = jax.nn.softmax(h @ w)
  np.testing.assert_allclose(ent, -(p * jnp.log(p)).sum(-1), rtol=1e-5, atol=1e-5)
  # Gradients of the streaming form equal the direct form.
  g1 = jax.grad(lambda h, w: L.token_logprobs(h, w, tok, chunk_size=chunk).sum(), argnums=(0, 1))(h, w)
  g2 = jax.grad(lambda h, w: L.logprobs_from_logits(h @ w, tok).sum(), argnums=(0, 1))(h, w)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_beta_schedule():
  assert float(L.beta_at(5, 0.04)) == pytest.approx(0.04)
  assert float(L.beta_at(0, 0.04, decay_steps=10)) == pytest.approx(0.04)
  assert float(L.beta_at(5, 0.04, decay_steps=10)) == pytest.approx(0.02)
  assert float(L.beta_at(50, 0.04, decay_steps=10, final_beta=0.01)) == pytest.approx(0.01)


def test_loss_config_rejects_typos():
  with pytest.raises(ValueError, match="unknown aggregation"):
    L.LossConfig(aggregation="token-mean")
  with pytest.raises(ValueError, match="unknown KL"):
    L.LossConfig(kl_estimator="kl3")


def test_advantage_stats():
  s = L.advantage_stats(jnp.array([1.0, -1.0, 0.0, 0.0, 5.0]), jnp.array([1, 1, 1, 1, 0], bool))
  np.testing.assert_allclose([s["adv_mean"], s["adv_std"], s["adv_min"], s["adv_max"], s["adv_zero_frac"]],
                             [0.0, np.sqrt(0.5), -1.0, 1.0, 0.5], rtol=1e-6)


def test_loss_functions_jit_equal_eager():
  logp, logp_old, logp_ref, adv, mask = map(jnp.asarray, _random_inputs(seed=5))
  cfg = L.LossConfig(dual_clip=3.0, entropy_coef=0.01)
  ent = jnp.abs(logp)
  f = lambda *a: L.policy_loss(*a, cfg, beta=0.04, entropy_BxT=ent)
  (l1, s1), (l2, s2) = jax.jit(f)(logp, logp_old, logp_ref, adv, mask), f(logp, logp_old, logp_ref, adv, mask)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for k in s1:
    np.testing.assert_allclose(s1[k], s2[k], rtol=1e-6)
