"""The jitted RL/SFT steps: gradients, step-0 REINFORCE, micro-batch invariance, sharding, NaN skipping,
freezing, and a bandit training signal."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from merr1_jax import optim, rl, sharding
from merr1_jax import train_step as ts
from merr1_jax.models import base, mllm

V = 64


def _model(**kw):
  return mllm.build("tiny", vocab_size=V, video_dim=0, audio_dim=0, d_model=64, mlp_dim=128, num_heads=4,
                    num_kv_heads=2, head_dim=16, **kw)


def _batch(b=8, l=12, prompt=6, seed=0, ref=True, old=False):
  rng = np.random.default_rng(seed)
  tok = jnp.asarray(rng.integers(0, V - 2, (b, l)), jnp.int32)
  mask = jnp.ones((b, l), bool).at[0, :2].set(False)  # one left-padded row
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  cm = jnp.zeros((b, l), bool).at[:, prompt:].set(True).at[1, l - 2:].set(False)  # a shorter completion
  logp = lambda: jnp.asarray(np.log(rng.uniform(0.01, 0.2, (b, l))), jnp.float32)
  return ts.RLBatch(
      inputs=base.ModelInputs(tokens=tok, positions=pos, mask=mask),
      completion_mask=cm,
      advantages=jnp.asarray(rng.normal(size=b), jnp.float32),
      old_logp=logp() if old else None,
      ref_logp=logp() if ref else None,
  )


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def test_gradient_matches_finite_differences():
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch(old=True)
  loss_fn = ts.make_rl_loss(model, ts.StepConfig(beta=0.04))
  f = jax.jit(lambda p: loss_fn(p, batch, 0.04)[0])
  g = jax.grad(f)(params)
  # Directional derivative along a random direction, central differences.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  numeric = (f(shift(eps)) - f(shift(-eps))) / (2 * eps)
  analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))
  np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)


def test_step_zero_is_reinforce():
  """Policy == old == reference: ratio 1, KL 0, gradient == -sum_t A_b logp_bt / num_tokens."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch(ref=False)
  # Reference log-probs of the current policy, computed through the unchunked logits path.
  logits, _ = model.forward(params, model.embed(params, batch.inputs))
  ref = rl.logprobs_from_logits(logits[:, :-1], batch.inputs.tokens[:, 1:])
  batch = batch.replace(ref_logp=jnp.pad(ref, ((0, 0), (1, 0))))
  loss_fn = ts.make_rl_loss(model, ts.StepConfig(beta=0.04))
  (_, stats), g = jax.value_and_grad(lambda p: loss_fn(p, batch, 0.04), has_aux=True)(params)
  stats = rl.finalize_stats(stats)
  assert float(stats["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
  assert float(stats["kl"]) == pytest.approx(0.0, abs=1e-6)
  mask = batch.completion_mask[:, 1:].astype(jnp.float32)

  def reinforce(p):
    lg, _ = model.forward(p, model.embed(p, batch.inputs))
    lp = rl.logprobs_from_logits(lg[:, :-1], batch.inputs.tokens[:, 1:])
    return -(batch.advantages[:, None] * lp * mask).sum() / mask.sum()

  g_ref = jax.grad(reinforce)(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("agg", rl.AGGREGATIONS)
def test_micro_batch_invariance(agg):
  model = _model()
  params = model.init_params(jax.random.key(0))
  # A huge SGD step makes the update (lr * gradient) dwarf the float32 spacing of the parameters, so the
  # comparison sees the gradients and not the rounding of params + update.
  tx = optax.sgd(1000.0)
  batch = _batch(old=True)
  deltas = []
  for m in (1, 2, 4):
    cfg = ts.StepConfig(micro_batches=m, loss=rl.LossConfig(aggregation=agg))
    state = ts.init_state(_copy(params), tx, with_reference=False)
    new, metrics = ts.make_rl_step(model, tx, cfg)(state, batch)
    deltas.append(jax.tree.map(lambda a, b: a - b, new.params, params))
    assert int(metrics["skipped"]) == 0
  for d in deltas[1:]:
    for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(deltas[0])):
      scale = float(jnp.abs(b).max()) + 1e-12
      assert float(jnp.abs(a - b).max()) / scale <= 1e-6


def test_nonfinite_step_is_skipped_and_counted():
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3), params)
  step = ts.make_rl_step(model, tx, ts.StepConfig())
  state = ts.init_state(_copy(params), tx, with_reference=False)
  bad = _batch()
  bad = bad.replace(advantages=bad.advantages.at[0].set(jnp.nan))
  new, metrics = step(state, bad)
  assert int(metrics["skipped"]) == 1 and int(new.nonfinite) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  ts.check_nonfinite(metrics, limit=1)  # within the limit: no error
  with pytest.raises(ts.NonFiniteError, match="non-finite loss or gradient"):
    ts.check_nonfinite(metrics, limit=0)
  new2, metrics2 = step(new, _batch())
  assert int(metrics2["skipped"]) == 0 and int(new2.nonfinite) == 1


def test_freezing_keeps_subtree_and_shares_reference():
  model = _model()
  params = model.init_params(jax.random.key(0))
  freeze = (r"decoder/embed/",)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2), params, freeze=freeze)
  state = ts.init_state(_copy(params), tx, with_reference=True, freeze=freeze)
  assert not any(k.startswith("decoder/embed") for k in state.ref)
  assert "decoder/final_norm/scale" in state.ref
  new, _ = ts.make_rl_step(model, tx, ts.StepConfig())(state, _batch())
  old_emb = params["decoder"]["embed"]["embedding"].get_value()
  np.testing.assert_array_equal(new.params["decoder"]["embed"]["embedding"].get_value(), old_emb)
  assert not np.array_equal(new.params["decoder"]["layers"]["q_kernel"].get_value(),
                            params["decoder"]["layers"]["q_kernel"].get_value())
  ref = ts.reference_params(new)
  # The frozen subtree of the reference *is* the policy's array; trainable leaves are the initial copy.
  assert ref["decoder"]["embed"]["embedding"].get_value() is new.params["decoder"]["embed"]["embedding"].get_value()
  np.testing.assert_array_equal(ref["decoder"]["layers"]["q_kernel"].get_value(),
                                params["decoder"]["layers"]["q_kernel"].get_value())
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(optim.OptimConfig(), params, freeze=(r"vision_tower",))


def test_sft_step_lowers_the_loss():
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3), params)
  b = _batch()
  batch = ts.SFTBatch(inputs=b.inputs, loss_mask=b.completion_mask)
  step = ts.make_sft_step(model, tx, ts.StepConfig(micro_batches=2))
  state = ts.init_state(_copy(params), tx, with_reference=False)
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_equals_unsharded(mesh_shape):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them")
  model = _model()
  params = model.init_params(jax.random.key(0))
  # Adam's update is ~lr * sign(g) where g ~ 0, so float32 reduction-order noise in such entries shows up at
  # the scale of lr: keep lr at 1e-3 to compare at 1e-5.
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3), params)
  cfg = ts.StepConfig(micro_batches=2)
  batches = [_batch(seed=s, old=True) for s in (0, 1)]

  state = ts.init_state(_copy(params), tx, with_reference=True)
  step = ts.make_rl_step(model, tx, cfg)
  for b in batches:
    state, _ = step(state, b)
  want = state.params

  mesh = sharding.make_mesh(mesh_shape)
  p_sh = sharding.param_shardings(model, params, mesh)
  sparams = jax.device_put(_copy(params), p_sh)
  sstate = ts.init_state(sparams, tx, with_reference=True)
  st_sh = sharding.state_shardings(sstate, p_sh, mesh)
  sstate = jax.device_put(sstate, st_sh)
  b_sh = sharding.batch_shardings(batches[0], mesh)
  sstep = ts.make_rl_step(model, tx, cfg, state_shardings=st_sh, batch_shardings=b_sh)
  for b in batches:
    sstate, _ = sstep(sstate, jax.device_put(b, b_sh))
  emb = sstate.params["decoder"]["layers"]["q_kernel"].get_value()
  assert emb.sharding.spec == p_sh["decoder"]["layers"]["q_kernel"].get_value().spec  # stayed sharded
  for a, b in zip(jax.tree.leaves(sstate.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mesh_and_batch_errors_are_clear():
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((4, 4, 1), devices=jax.devices()[:8] if jax.device_count() >= 8 else jax.devices() * 8)
  mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
  sharding.check_batch_divisible(8, mesh, group_size=4)
  with pytest.raises(ValueError, match="not divisible by the group size 3"):
    sharding.check_batch_divisible(8, mesh, group_size=3)
  if jax.device_count() >= 8:
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
      sharding.check_batch_divisible(12, sharding.make_mesh((8, 1, 1)))


def test_bandit_training_signal():
  """A one-token bandit: reward 1 when the sampled token is the target. DOD advantages + the RL step must
  raise the mean reward far above chance (1/V) within a few dozen steps."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3), params)
  step = ts.make_rl_step(model, tx, ts.StepConfig(beta=0.0))
  state = ts.init_state(params, tx, with_reference=False)
  prompts, group, target = 4, 8, 17
  rng = np.random.default_rng(0)
  prompt_tok = jnp.asarray(np.repeat(rng.integers(0, V - 2, (prompts, 5)), group, axis=0), jnp.int32)
  b = prompts * group
  pos = jnp.broadcast_to(jnp.arange(6), (b, 6))

  @jax.jit
  def sample(params, key):
    x = model.embed(params, base.ModelInputs(prompt_tok, pos[:, :5], jnp.ones((b, 5), bool)))
    logits, _ = model.forward(params, x)
    return jax.random.categorical(key, logits[:, -1])

  rewards = []
  key = jax.random.key(1)
  for _ in range(40):
    key, sub = jax.random.split(key)
    tok = sample(state.params, sub)
    r = (tok == target).astype(jnp.float32)
    rewards.append(float(r.mean()))
    adv = rl.dod_advantages(r[:, None], jnp.ones((b, 1), bool), jnp.ones((b, 1)), group)
    seq = jnp.concatenate([prompt_tok, tok[:, None]], axis=1)
    batch = ts.RLBatch(inputs=base.ModelInputs(seq, pos, jnp.ones((b, 6), bool)),
                       completion_mask=jnp.zeros((b, 6), bool).at[:, 5].set(True), advantages=adv)
    state, _ = step(state, batch)
  assert np.mean(rewards[:5]) < 0.1
  assert np.mean(rewards[-5:]) > 0.5, rewards


def test_loss_start_skips_prompt_positions_without_changing_the_loss():
  """Unembedding only from `loss_start` gives the same loss and gradient when no earlier position carries loss."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch(old=True, prompt=6)  # completion tokens start at column 6: position 5 predicts the first one
  loss_fn = ts.make_rl_loss(model, ts.StepConfig(loss=rl.LossConfig(max_len=6)))
  full = jax.value_and_grad(lambda p: loss_fn(p, batch, 0.04)[0])(params)
  skip = jax.value_and_grad(lambda p: loss_fn(p, batch.replace(loss_start=5), 0.04)[0])(params)
  np.testing.assert_allclose(skip[0], full[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(skip[1]), jax.tree.leaves(full[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
