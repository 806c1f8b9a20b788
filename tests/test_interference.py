"""The variance-interference probe (merr1_jax/training/interference.py): the split of the advantage into its recall and
precision parts, the measured correlations against method.md's formulas, and the gradient cosine."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rl
from merr1_jax.models import base, mllm
from merr1_jax.training import experience, interference
from tests.oracles import ungrouped

ADV = experience.AdvantageSettings(disentangle=True, scale=True, eps=1e-4, ddof=1, group="prompt",
                                   weights=((1.0, 1.0, 0.0, 0.0, 0.0),), cal_in_reward=0.0)


def _rewards(s_r, s_p, rho, groups, g, seed=0):
  """[B, O] rewards whose recall/precision columns have in-group stds s_r, s_p and correlation rho."""
  rng = np.random.default_rng(seed)
  cov = np.array([[s_r**2, rho * s_r * s_p], [rho * s_r * s_p, s_p**2]])
  r = np.zeros((groups * g, len(experience.OBJECTIVES)))
  r[:, :2] = rng.multivariate_normal([0.5, 0.5], cov, size=groups * g)
  return r


@pytest.mark.parametrize("disentangle", [True, False])
def test_the_parts_add_up_to_the_advantage(disentangle):
  """With only recall and precision weighted, c_rec + c_prec is exactly the method's advantage (E2)."""
  adv = dataclasses.replace(ADV, disentangle=disentangle)
  r = _rewards(0.1, 0.3, 0.2, groups=6, g=5)
  groups = np.repeat(np.arange(6), 5)
  valid = np.ones(30, bool)
  valid[7] = False
  w = np.tile([1.0, 0.7, 0.0, 0.0, 0.0], (30, 1))
  c_rec, c_prec = interference.contributions(r, valid, w, groups, adv)
  v = np.broadcast_to(valid[:, None], r.shape)
  want = rl.dod_advantages(jnp.asarray(r, jnp.float32), v, jnp.asarray(w, jnp.float32), groups, 6,
                           disentangle=disentangle)
  np.testing.assert_allclose(c_rec + c_prec, want, rtol=1e-4, atol=1e-5)
  assert c_rec[7] == c_prec[7] == 0.0 and np.abs(c_rec).max() > 0 and np.abs(c_prec).max() > 0


@pytest.mark.parametrize("s_r,s_p,rho", [(0.02, 0.3, 0.0), (0.2, 0.2, -0.9), (0.1, 0.1, 0.5)])
def test_measured_correlations_follow_the_formulas(s_r, s_p, rho):
  """On simulated groups the probe's measured corr(A, r_rec) is the coupled formula for the coupled advantage and
  sqrt((1 + rho) / 2) for the disentangled one (method.md "Why disentangle"); its estimates of s_R,
  s_P and rho recover the simulation's."""
  g, groups = 32, 200
  r = _rewards(s_r, s_p, rho, groups, g, seed=1)
  ids = np.repeat(np.arange(groups), g)
  valid = np.ones(len(r), bool)
  w = np.tile(ADV.weights[0], (len(r), 1))
  for disentangle in (True, False):
    adv = dataclasses.replace(ADV, disentangle=disentangle)
    a = sum(interference.contributions(r, valid, w, ids, adv))
    st = interference.reward_statistics(r, valid, ids, a)
    assert st["s_rec"] == pytest.approx(s_r, rel=0.05) and st["s_prec"] == pytest.approx(s_p, rel=0.05)
    assert st["rho"] == pytest.approx(rho, abs=0.05)
    want = st["pred_corr_disentangled"] if disentangle else st["pred_corr_coupled_rec"]
    assert st["corr_adv_rec"] == pytest.approx(want, abs=0.03)
    exact = math.sqrt((1 + rho) / 2) if disentangle else (s_r + rho * s_p) / math.sqrt(
        s_r**2 + s_p**2 + 2 * rho * s_r * s_p)
    assert want == pytest.approx(exact, abs=0.03)


def test_gradient_cosine_of_parts():
  model = mllm.build("tiny", vocab_size=48, video_dim=0, audio_dim=0, d_model=32, num_heads=2, num_kv_heads=1,
                     head_dim=16, mlp_dim=64)
  params = model.init_params(jax.random.key(0))
  rng = np.random.default_rng(0)
  b, l = 6, 10
  tok = rng.integers(0, 46, (b, l)).astype(np.int32)
  batch = ungrouped.as_grouped(jax.tree.map(jnp.asarray, ungrouped.RLBatch(
      inputs=base.ModelInputs(tokens=tok, positions=np.tile(np.arange(l, dtype=np.int32), (b, 1)),
                              mask=np.ones((b, l), bool)),
      completion_mask=np.arange(l)[None].repeat(b, 0) >= 5, advantages=np.zeros(b, np.float32))))
  c = rng.normal(size=b)
  same = interference.gradient_cosine(model, params, batch, c, 2 * c)
  opposite = interference.gradient_cosine(model, params, batch, c, -c)
  other = interference.gradient_cosine(model, params, batch, c, rng.normal(size=b))
  assert same["grad_cos"] == pytest.approx(1.0, abs=1e-5) and opposite["grad_cos"] == pytest.approx(-1.0, abs=1e-5)
  assert same["grad_norm_prec"] == pytest.approx(2 * same["grad_norm_rec"], rel=1e-4)
  assert -1.0 < other["grad_cos"] < 1.0


def test_gradient_cosine_equals_one_over_every_leaf_computed_here():
  """The probe's cosine and norms against a policy gradient written here: at ratio 1 without KL the PPO-clip
  loss's gradient is that of -sum_t A_b log p_t / num_tokens (token mean over the completion targets), over every
  parameter leaf, flattened together in float64; on advantages with no forced answer (c vs an independent d)."""
  model = mllm.build("tiny", vocab_size=48, video_dim=0, audio_dim=0, d_model=32, num_heads=2, num_kv_heads=1,
                     head_dim=16, mlp_dim=64)
  params = model.init_params(jax.random.key(0))
  rng = np.random.default_rng(4)
  b, l = 6, 10
  tok = rng.integers(0, 46, (b, l)).astype(np.int32)
  inputs = base.ModelInputs(tokens=tok, positions=np.tile(np.arange(l, dtype=np.int32), (b, 1)),
                            mask=np.ones((b, l), bool))
  cmask = np.arange(l)[None].repeat(b, 0) >= 5
  cmask[2, 8:] = False  # a shorter completion
  batch = ungrouped.as_grouped(jax.tree.map(jnp.asarray, ungrouped.RLBatch(inputs=inputs, completion_mask=cmask,
                                                                           advantages=np.zeros(b, np.float32))))
  target_mask = jnp.asarray(cmask[:, 1:], jnp.float32)  # logits at t predict token t + 1

  def surrogate(p, adv):
    logits = model.forward(p, model.embed(p, jax.tree.map(jnp.asarray, inputs)))[0][:, :-1].astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(tok[:, 1:, None]), -1)[..., 0]
    return -(adv[:, None] * logp * target_mask).sum() / target_mask.sum()

  grad = jax.jit(jax.grad(surrogate))  # one program for both advantages, not an eager compile per operation

  def flat_grad(adv):
    g = grad(params, jnp.asarray(adv, jnp.float32))
    leaves = jax.tree.leaves(g)
    assert len(leaves) == len(jax.tree.leaves(params)) > 1
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])

  c, d = rng.normal(size=b), rng.normal(size=b)
  g_c, g_d = flat_grad(c), flat_grad(d)
  want = g_c @ g_d / (np.linalg.norm(g_c) * np.linalg.norm(g_d))
  got = interference.gradient_cosine(model, params, batch, c, d)
  assert abs(want) < 0.9  # a genuinely free cosine, not one forced to +-1
  assert got["grad_cos"] == pytest.approx(want, abs=1e-4)
  assert got["grad_norm_rec"] == pytest.approx(np.linalg.norm(g_c), rel=1e-3)
  assert got["grad_norm_prec"] == pytest.approx(np.linalg.norm(g_d), rel=1e-3)
