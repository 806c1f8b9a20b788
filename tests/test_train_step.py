"""The jitted RL/SFT steps: gradients, step-0 REINFORCE, micro-batch invariance (and one trace of the model with
micro-batches), metrics (totals and per mode), sharding and the reference copy, NaN/Inf skipping, freezing and
clipping, the beta schedule, and a bandit training signal. Expected values come from independent computations in
the test (full-vocabulary float64 log-softmax, hand-written Adam, hand-computed schedules). Batches are written as
rows of whole sequences (the oracle's RLBatch) and handed to the library as its grouped batch with one suffix per
row (`ungrouped.as_grouped`)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from merr1_jax import rl
from merr1_jax.infra import sharding
from merr1_jax.models import base, mllm
from merr1_jax.training import batch_loss
from merr1_jax.training import optimizer as optim
from merr1_jax.training import step as ts
from tests.helpers.batches import V
from tests.helpers.batches import row_batch as _batch
from tests.helpers.batches import step_cfg as _step_cfg
from tests.oracles import ungrouped


def _model(**kw):
  return mllm.build("tiny", vocab_size=V, video_dim=0, audio_dim=0, d_model=64, mlp_dim=128, num_heads=4,
                    num_kv_heads=2, head_dim=16, **kw)


def _rl_loss(model, cfg):
  """The library's RL loss on a row batch (its grouped form)."""
  f = batch_loss.make_grouped_loss(model, cfg)
  return lambda params, batch, *a, **kw: f(params, ungrouped.as_grouped(batch), *a, **kw)


def _rl_step(model, tx, cfg):
  """The library's jitted RL step on a row batch (its grouped form)."""
  step = ts.make_rl_step(model, tx, cfg)
  return lambda state, batch: step(state, ungrouped.as_grouped(batch))


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _logits(model, params, inputs):
  """The uncached forward's logits, one jitted pass (eagerly, each operation would compile on its own)."""
  return jax.jit(lambda p, x: model.forward(p, model.embed(p, x)))(params, inputs)[0]


class _Wrapped:
  """A model that answers as `inner` except where a subclass says otherwise."""

  def __init__(self, inner):
    self.inner, self.config = inner, inner.config

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_gradient_matches_finite_differences():
  """Central differences along one direction per parameter leaf and one over all leaves.

  The model runs in float32 by design (norms, attention and the log-softmax cast to float32, so jax_enable_x64
  cannot reach them), and the loss carries float32 noise of ~|f| 1e-7, i.e. ~|f| 1e-7 / h on a difference
  quotient. Each direction therefore mixes the leaf's analytic gradient with a random unit vector: the derivative
  along it is ~|g_leaf| / sqrt(2), large against that noise, and a wrong gradient (scale, sign or direction)
  still shows. Tolerance: 1e-3 relative plus the float32 noise bound 4e-7 |f| / h.
  """
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch(old=True)
  loss_fn = _rl_loss(model, _step_cfg(beta=0.04, loss=rl.LossConfig(entropy_coef=0.01)))
  f = lambda p: loss_fn(p, batch, 0.04)[0]
  g = jax.jit(jax.grad(f))(params)
  leaves, treedef = jax.tree.flatten(params)
  g_leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
  f_at = jax.jit(lambda s, d: f(jax.tree.unflatten(treedef, [p + s * x for p, x in zip(leaves, d)])))
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x)
  directions = []
  for i, gi in enumerate(g_leaves):
    d = [np.zeros(x.shape) for x in g_leaves]
    d[i] = unit(unit(gi) + unit(rng.normal(size=gi.shape)))
    directions.append(d)
  n = np.sqrt(sum((x ** 2).sum() for x in g_leaves))
  r = [rng.normal(size=x.shape) for x in g_leaves]
  rn = np.sqrt(sum((x ** 2).sum() for x in r))
  directions.append([x / n + y / rn for x, y in zip(g_leaves, r)])  # all leaves at once
  h = 3e-3
  noise = 4e-7 * abs(float(f_at(0.0, [np.zeros(x.shape, np.float32) for x in g_leaves]))) / h
  for d in directions:
    analytic = sum(float((a * b).sum()) for a, b in zip(g_leaves, d))
    d32 = [x.astype(np.float32) for x in d]
    numeric = (float(f_at(h, d32)) - float(f_at(-h, d32))) / (2 * h)
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic) + noise, (analytic, numeric, noise)


def test_step_zero_is_reinforce():
  """Policy == old == reference: ratio 1, KL 0, gradient == -sum_t A_b logp_bt / num_tokens."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch(ref=False)
  # Reference log-probs of the current policy, computed through the unchunked logits path.
  logits = _logits(model, params, batch.inputs)
  ref = rl.logprobs_from_logits(logits[:, :-1], batch.inputs.tokens[:, 1:])
  batch = batch.replace(ref_logp=jnp.pad(ref, ((0, 0), (1, 0))))
  loss_fn = _rl_loss(model, _step_cfg(beta=0.04))
  # Jitted: one compile each, where eager autodiff of the model dispatches (and compiles) op by op.
  (_, stats), g = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, 0.04), has_aux=True))(params)
  stats = rl.finalize_stats(stats)
  assert float(stats["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
  assert float(stats["kl"]) == pytest.approx(0.0, abs=1e-6)
  mask = batch.completion_mask[:, 1:].astype(jnp.float32)

  def reinforce(p):
    lg, _ = model.forward(p, model.embed(p, batch.inputs))
    lp = rl.logprobs_from_logits(lg[:, :-1], batch.inputs.tokens[:, 1:])
    return -(batch.advantages[:, None] * lp * mask).sum() / mask.sum()

  g_ref = jax.jit(jax.grad(reinforce))(params)
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
  for m in (1, 4):  # 4 micro-batches accumulate across several, as 2 would (each m is a step compiled)
    cfg = _step_cfg(micro_batches=m, loss=rl.LossConfig(aggregation=agg))
    state = ts.init_state(_copy(params), tx, with_reference=False)
    new, metrics = _rl_step(model, tx, cfg)(state, batch)
    deltas.append(jax.tree.map(lambda a, b: a - b, new.params, params))
    assert int(metrics["skipped"]) == 0
  # Each delta is (params + update) - params in float32, so it carries up to one spacing of the updated
  # parameter's magnitude (one ulp of a norm scale of ~1 is 1.2e-7: over 1e-6 of a 0.1 delta): allow two of
  # them besides 1e-6 of the delta. A wrong aggregation moves the deltas by a sizeable fraction of themselves.
  for d in deltas[1:]:
    for a, b, p in zip(jax.tree.leaves(d), jax.tree.leaves(deltas[0]), jax.tree.leaves(params)):
      scale = float(jnp.abs(b).max()) + 1e-12
      ulp = float(np.spacing(np.float32(jnp.abs(p + b).max())))
      assert float(jnp.abs(a - b).max()) <= 1e-6 * scale + 2 * ulp


class _CountingModel(_Wrapped):
  """The tiny model, counting how often its grouped forward pass is traced."""

  traces = 0

  def hidden_grouped(self, params, prefix, suffixes):
    self.traces += 1
    return self.inner.hidden_grouped(params, prefix, suffixes)


@pytest.mark.parametrize("micro", [1, 2])
def test_the_step_traces_the_model_once_whatever_the_micro_batches(micro):
  """The accumulation scan needs the statistics' structure before its body exists: taking it with eval_shape
  traced the whole forward and backward pass a second time. Lowered only, not compiled."""
  model = _CountingModel(_model())
  params = model.init_params(jax.random.key(0))
  tx = optax.sgd(0.1)
  state = ts.init_state(_copy(params), tx, with_reference=False)
  ts.make_rl_step(model, tx, _step_cfg(micro_batches=micro)).lower(state, ungrouped.as_grouped(_batch()))
  assert model.traces == 1


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


class _NaNGradient(_Wrapped):
  """The tiny model plus sqrt(0 * sum|final_norm scale|) on the hidden states: the forward pass adds exactly 0,
  but d sqrt(u)/du = inf at u = 0 times du/dscale = 0 makes that parameter's gradient NaN."""

  @staticmethod
  def _zero(params):
    return jnp.sqrt(0.0 * jnp.abs(params["decoder"]["final_norm"]["scale"][...]).sum())

  def hidden(self, params, x, cache=None):
    h, cache = self.inner.hidden(params, x, cache)
    return h + self._zero(params), cache

  def hidden_grouped(self, params, prefix, suffixes):
    h_p, h_s = self.inner.hidden_grouped(params, prefix, suffixes)
    return h_p + self._zero(params), [h + self._zero(params) for h in h_s]


def test_inf_loss_and_nan_gradient_with_finite_loss_are_each_skipped_and_counted():
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3), params)
  state = ts.init_state(_copy(params), tx, with_reference=False)
  good = _batch()
  # Inf loss, finite gradient: a reference log-prob of -inf on one loss token makes its k3 term +inf
  # (delta = logp - ref = +inf: exp(-delta) - 1 + delta), while d k3 / d logp = 1 - exp(-delta) = 1.
  assert bool(good.completion_mask[2, 8])
  state, m = _rl_step(model, tx, _step_cfg())(state, good.replace(ref_logp=good.ref_logp.at[2, 8].set(
      -jnp.inf)))
  assert np.isposinf(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
  assert int(m["skipped"]) == 1 and int(state.nonfinite) == 1 and int(state.step) == 1
  _assert_same_params(state.params, params)
  # NaN gradient, finite loss.
  state, m = _rl_step(_NaNGradient(model), tx, _step_cfg())(state, good)
  assert np.isfinite(float(m["loss"])) and np.isnan(float(m["grad_norm"]))
  assert int(m["skipped"]) == 1 and int(state.nonfinite) == 2 and int(m["nonfinite_total"]) == 2
  _assert_same_params(state.params, params)
  with pytest.raises(ts.NonFiniteError, match=r"2 steps .* raise rl\.max_nonfinite_steps"):
    ts.check_nonfinite(m, limit=1)


def test_nonfinite_step_is_skipped_and_counted():
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3), params)
  step = _rl_step(model, tx, _step_cfg())
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
  new, _ = _rl_step(model, tx, _step_cfg())(state, _batch())
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
  step = ts.make_sft_step(model, tx, _step_cfg(micro_batches=2))
  state = ts.init_state(_copy(params), tx, with_reference=False)
  losses = []
  for _ in range(15):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("mesh_shape,opt", [((8, 1, 1), "sgd"), ((2, 2, 2), "sgd"), ((1, 4, 2), "sgd"),
                                            ((2, 2, 2), "adamw")])
def test_sharded_equals_unsharded(mesh_shape, opt):
  """SGD with momentum on every mesh: Adam's update is invariant to a constant scale of the gradient (and
  clipping removes one), so only an optimizer linear in the gradient sees a sharded step whose gradient is off
  by a constant factor. The training optimizer (clipping + AdamW) on the mesh that shards its moments over
  both the fsdp and the tensor axes, like the parameters."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them")
  model = _model()
  params = model.init_params(jax.random.key(0))
  # Adam's update is ~lr * sign(g) where g ~ 0, so float32 reduction-order noise in such entries shows up at
  # the scale of lr: keep lr at 1e-3 to compare at 1e-5. SGD's update is lr * g: no such amplification.
  tx = (optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3), params) if opt == "adamw"
        else optax.sgd(0.5, momentum=0.9))
  cfg = _step_cfg(micro_batches=2)
  batches = [ungrouped.as_grouped(_batch(seed=s, old=True)) for s in (0, 1)]

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
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(want),
                                                                                 jax.tree.leaves(params)))
  assert moved > 1e-3  # the steps moved the parameters far beyond the tolerance below
  for a, b in zip(jax.tree.leaves(sstate.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_mesh_errors_are_clear():
  # (The batch against the mesh and the group size is config.validate's job, before anything is built:
  # tests/test_train.py::test_bad_configs_fail_before_anything_is_built.)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((4, 4, 1), devices=jax.devices()[:8] if jax.device_count() >= 8 else jax.devices() * 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh((-1, -1, 1))


def test_bandit_training_signal():
  """A one-token bandit: reward 1 when the sampled token is the target. DOD advantages + the RL step must
  raise the mean reward far above chance (1/V) within a few dozen steps."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=3e-3), params)
  step = _rl_step(model, tx, _step_cfg(beta=0.0))
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
    adv = rl.dod_advantages(r[:, None], jnp.ones((b, 1), bool), jnp.ones((b, 1)), rl.contiguous_groups(b, group),
                            prompts)
    seq = jnp.concatenate([prompt_tok, tok[:, None]], axis=1)
    batch = ungrouped.RLBatch(inputs=base.ModelInputs(seq, pos, jnp.ones((b, 6), bool)),
                       completion_mask=jnp.zeros((b, 6), bool).at[:, 5].set(True), advantages=adv)
    state, _ = step(state, batch)
  assert np.mean(rewards[:5]) < 0.1
  assert np.mean(rewards[-5:]) > 0.5, rewards


def test_where_the_prompt_ends_does_not_change_the_loss():
  """The same rows cut into prompt + suffix at column 1 or at column 6 (loss_start 0 or 5) give the same loss and
  gradient when no earlier position carries loss: the grouped attention joins the two parts exactly."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch(old=True, prompt=6)  # completion tokens start at column 6: position 5 predicts the first one
  loss_fn = _rl_loss(model, _step_cfg(loss=rl.LossConfig(max_len=6)))
  full = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, 0.04)[0]))(params)
  skip = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch.replace(loss_start=5), 0.04)[0]))(params)
  np.testing.assert_allclose(skip[0], full[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(skip[1]), jax.tree.leaves(full[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_freeze_and_clip_cover_trainable_leaves_only():
  """Frozen leaves: no optimizer state, not in grad_norm or the clipping norm, bit-identical after steps. The
  update equals Adam's first step on the gradient clipped by the trainable leaves' norm, written out here."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  freeze = (r"decoder/embed/", r"final_norm")
  frozen = lambda name: any(re.search(p, name) for p in freeze)
  lr, clip, eps = 1e-2, 1e-2, 1e-3  # eps of the order of the clipped gradient: Adam's step then sees the clip
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=lr, clip_norm=clip, eps=eps), params, freeze=freeze)
  state = ts.init_state(_copy(params), tx, with_reference=False, freeze=freeze)
  opt_names = [base.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert not any(frozen(n) for n in opt_names)
  assert any(n.endswith("decoder/layers/q_kernel") for n in opt_names)
  with pytest.raises(ValueError, match="frozen leaves"):
    tx.init(params)  # the full tree: its frozen leaves would get state

  batch = _batch()
  loss_fn = _rl_loss(model, _step_cfg())
  g = jax.jit(jax.grad(lambda p: loss_fn(p, batch, 0.04)[0]))(params)
  g = {base.path_str(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(g)[0]}
  p0 = {base.path_str(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  norm_trainable = np.sqrt(sum((x ** 2).sum() for k, x in g.items() if not frozen(k)))
  norm_all = np.sqrt(sum((x ** 2).sum() for x in g.values()))
  assert norm_all > 1.05 * norm_trainable  # the frozen leaves' gradient would show in the norm
  scale = min(1.0, clip / norm_trainable)
  assert scale < 0.1  # clipping is active

  step = _rl_step(model, tx, _step_cfg())
  new, metrics = step(state, batch)
  np.testing.assert_allclose(float(metrics["grad_norm"]), norm_trainable, rtol=1e-5)
  got = {base.path_str(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_flatten_with_path(new.params)[0]}
  for k in g:
    if frozen(k):
      continue
    c = g[k] * scale  # Adam, step 1, bias-corrected: m = c, v = c^2, update = -lr c / (|c| + eps)
    np.testing.assert_allclose(got[k] - p0[k], -lr * c / (np.abs(c) + eps), rtol=1e-4, atol=2e-7, err_msg=k)
  new, _ = step(new, batch)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(new.params)[0], jax.tree.leaves(params)):
    if frozen(base.path_str(path)):
      np.testing.assert_array_equal(a, b)  # bit-identical
    else:
      assert not np.array_equal(a, b)


def test_metrics_over_micro_batches_and_per_mode_match_independent_values():
  """The step's statistics (totals and per mode) for 1 and 4 micro-batches equal each other, and the
  1-micro-batch values equal a float64 numpy computation from the full-vocabulary logits."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch()
  logits = _logits(model, params, batch.inputs)
  lg = np.asarray(logits, np.float64)[:, :-1]
  lsm = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
  tok = np.asarray(batch.inputs.tokens)[:, 1:]
  logp = np.take_along_axis(lsm, tok[..., None], -1)[..., 0]
  entropy = -(np.exp(lsm) * lsm).sum(-1)
  rng = np.random.default_rng(5)
  # Old and reference policies near the current one, so ratios straddle both clip edges.
  old = (logp + rng.normal(0, 0.2, logp.shape)).astype(np.float32)
  ref = (logp + rng.normal(0, 0.2, logp.shape)).astype(np.float32)
  mode_B = np.array([0, 1, 0, 0, 1, 1, 0, 1], np.int32)
  pad = lambda x: jnp.asarray(np.pad(x, ((0, 0), (1, 0))), jnp.float32)
  batch = batch.replace(old_logp=pad(old), ref_logp=pad(ref), mode_ids=jnp.asarray(mode_B))
  eps = 0.1
  tx = optax.sgd(1e-3)
  runs = []
  for m in (1, 4):
    cfg = _step_cfg(micro_batches=m, loss=rl.LossConfig(eps_low=eps, eps_high=eps))
    _, metrics = _rl_step(model, tx, cfg)(ts.init_state(_copy(params), tx, with_reference=False), batch)
    runs.append({k: float(v) for k, v in metrics.items()})
  for other in runs[1:]:
    assert other.keys() == runs[0].keys()
    for k, v in runs[0].items():
      np.testing.assert_allclose(other[k], v, rtol=1e-5, atol=1e-8, err_msg=k)  # summation order

  mask = np.asarray(batch.completion_mask)[:, 1:]
  adv = np.asarray(batch.advantages, np.float64)[:, None]
  ratio = np.exp(logp - old)
  delta = ref - logp
  per_tok = {"ratio_mean": ratio, "kl": np.exp(delta) - delta - 1, "entropy": entropy,
             "clip_frac_low": (ratio < 1 - eps) & (adv < 0), "clip_frac_high": (ratio > 1 + eps) & (adv > 0)}
  got = runs[0]
  for suffix, rows in (("", np.ones(8, bool)), ("/slow", mode_B == 0), ("/fast", mode_B == 1)):
    sel = mask & rows[:, None]
    assert got["tokens" + suffix] == sel.sum()
    for k, x in per_tok.items():
      np.testing.assert_allclose(got[k + suffix], np.asarray(x, np.float64)[sel].mean(), rtol=1e-5, atol=1e-7,
                                 err_msg=k + suffix)
    np.testing.assert_allclose(got["ratio_max" + suffix], ratio[sel].max(), rtol=1e-5)
    np.testing.assert_allclose(got["ratio_min" + suffix], ratio[sel].min(), rtol=1e-5)
    assert got["clip_frac_low" + suffix] > 0 and got["clip_frac_high" + suffix] > 0  # both edges exercised
  assert got["kl/slow"] != pytest.approx(got["kl/fast"])


def test_beta_schedule_as_the_step_applies_it():
  model = _model()
  params = model.init_params(jax.random.key(0))
  cfg = _step_cfg(beta=0.04, beta_decay_steps=4, beta_final=0.01)
  tx = optax.sgd(0.0)  # the parameters stay put, so step s's loss is L(params, beta_s)
  step = _rl_step(model, tx, cfg)
  state = ts.init_state(_copy(params), tx, with_reference=False)
  batch = _batch(old=True)
  loss_at = jax.jit(lambda beta: _rl_loss(model, cfg)(params, batch, beta)[0])
  # By hand: beta_s = 0.04 + (0.01 - 0.04) * min(s / 4, 1).
  want = [0.04, 0.0325, 0.025, 0.0175, 0.01, 0.01]
  losses = []
  for beta in want:
    state, m = step(state, batch)
    assert float(m["beta"]) == pytest.approx(beta, rel=1e-6)
    np.testing.assert_allclose(float(m["loss"]), float(loss_at(beta)), rtol=1e-6)
    losses.append(float(m["loss"]))
  assert len(set(losses[:5])) == 5  # the KL term is non-zero: the loss follows beta


def test_kl_without_reference_logprobs_is_an_error():
  model = _model()
  params = model.init_params(jax.random.key(0))
  batch = _batch(ref=False)
  loss_fn = _rl_loss(model, _step_cfg(beta=0.04))
  with pytest.raises(ValueError, match=r"beta = 0.04 > 0 but a segment has no ref_logp"):
    jax.eval_shape(lambda p: loss_fn(p, batch, 0.04), params)  # trace time: nothing compiled
  tx = optax.sgd(1e-3)
  with pytest.raises(ValueError, match="has no ref_logp"):
    _rl_step(model, tx, _step_cfg(beta=0.04))(ts.init_state(_copy(params), tx, with_reference=False),
                                                         batch)
  jax.eval_shape(lambda p: _rl_loss(model, _step_cfg(beta=0.0))(p, batch, 0.0), params)  # beta 0: fine


def test_reference_copy_dtype_and_sharding_on_a_mesh():
  """bf16 compute: the reference holds the trainable leaves in bf16, sharded like their parameters, both as
  init_state builds it from sharded parameters and after placement on state_shardings."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them")
  model = _model(compute_dtype="bfloat16")
  params = model.init_params(jax.random.key(0))
  mesh = sharding.make_mesh((1, 4, 2))
  p_sh = sharding.param_shardings(model, params, mesh)
  want = {base.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(p_sh)[0]}
  p32 = {base.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  freeze = (r"decoder/embed/",)
  tx = optim.make_optimizer(optim.OptimConfig(), params, freeze=freeze)
  state = ts.init_state(jax.device_put(params, p_sh), tx, with_reference=True, freeze=freeze,
                        ref_dtype=model.config.jnp_compute_dtype)
  placed = jax.device_put(state, sharding.state_shardings(state, p_sh, mesh))
  assert set(state.ref) == {k for k in p32 if not k.startswith("decoder/embed/")}
  assert tuple(want["decoder/layers/q_kernel"].spec) != ()  # a genuinely sharded leaf is among them
  for st in (state, placed):
    for name, leaf in st.ref.items():
      assert leaf.dtype == jnp.bfloat16, name
      assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
      assert leaf.sharding.is_equivalent_to(want[name], leaf.ndim), (name, leaf.sharding, want[name])
      np.testing.assert_array_equal(np.asarray(leaf.astype(jnp.float32)),
                                    np.asarray(p32[name].astype(jnp.bfloat16).astype(jnp.float32)))


# --- PPO iterations: ppo_epochs x mini_batches updates per step (method.md E4, mu) -------------------------------


def _full_logp(model, params, batch):
  """Independent of the loss code: log-softmax of the uncached forward, float64, aligned with the tokens [B, L]
  (column t holds log p(token_t | tokens_<t); column 0 is 0)."""
  logits = _logits(model, params, batch.inputs)
  lp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1), np.float64)
  tok = np.asarray(batch.inputs.tokens)
  out = np.zeros(tok.shape)
  out[:, 1:] = np.take_along_axis(lp[:, :-1], tok[:, 1:, None], -1)[..., 0]
  return out


@pytest.mark.parametrize("epochs,minis,micro", [(2, 2, 1), (3, 1, 2), (1, 4, 1)])
def test_ppo_iterations_equal_sequential_updates_against_the_rollout_policy(epochs, minis, micro):
  """One step with E epochs x K mini-batches equals E*K single updates applied in turn, each on mini-batch
  j = i mod K (rows j, j + K, ...) with the old log-probs of the weights the step started from; state.step
  advances by one (an RL step), the optimizer's count by E*K (its updates)."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  # SGD (Adam's ~lr * sign(g) turns float32 reduction-order noise of tiny gradients into visible differences),
  # behind a schedule whose state counts the updates.
  tx = optax.chain(optax.scale_by_schedule(lambda n: 1.0), optax.sgd(0.5))
  batch = _batch(b=8, seed=4)
  cfg = _step_cfg(ppo_epochs=epochs, mini_batches=minis, micro_batches=micro)
  state = ts.init_state(_copy(params), tx, with_reference=True)
  got, metrics = _rl_step(model, tx, cfg)(state, batch)
  assert int(got.step) == 1 and int(metrics["updates"]) == epochs * minis
  assert int(got.opt_state[0].count) == epochs * minis

  old = jnp.asarray(_full_logp(model, params, batch), jnp.float32)
  single = _rl_step(model, tx, _step_cfg(micro_batches=micro))
  ref = ts.init_state(_copy(params), tx, with_reference=True)
  for i in range(epochs * minis):
    j = i % minis
    mb = jax.tree.map(lambda x: x[j::minis], batch.replace(old_logp=old))
    ref, _ = single(ref, mb)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_clipping_acts_only_with_several_updates_and_is_logged():
  """With one update per step the ratio is exactly 1 (clip fractions 0); with several updates at a large learning
  rate the later updates move the policy away from the rollout weights and the clip fractions are positive."""
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optax.sgd(30.0)
  batch = _batch(b=8, seed=5)
  stats = {}
  for epochs in (1, 4):
    state = ts.init_state(_copy(params), tx, with_reference=True)
    _, m = _rl_step(model, tx, _step_cfg(ppo_epochs=epochs, mini_batches=2 if epochs > 1 else 1,
                                                loss=rl.LossConfig(eps_low=0.05, eps_high=0.05)))(state, batch)
    stats[epochs] = {k: float(v) for k, v in m.items()}
  assert stats[1]["clip_frac_low"] == 0.0 and stats[1]["clip_frac_high"] == 0.0
  assert stats[1]["ratio_max"] == 1.0 and stats[1]["ratio_min"] == 1.0
  assert stats[4]["clip_frac_low"] + stats[4]["clip_frac_high"] > 0.0
  assert stats[4]["ratio_max"] > 1.05 or stats[4]["ratio_min"] < 0.95


@pytest.mark.parametrize("epochs", [1, 2])
def test_behaviour_logprob_gap_is_the_mean_absolute_difference_at_the_rollout_weights(epochs):
  model = _model()
  params = model.init_params(jax.random.key(0))
  tx = optax.sgd(1.0)
  batch = _batch(b=8, seed=6)
  trainer = _full_logp(model, params, batch)
  beh = trainer + np.random.default_rng(0).normal(scale=0.01, size=trainer.shape)  # a sampler a bit off
  mode = np.asarray([0, 1] * 4, np.int32)
  batch = batch.replace(behaviour_logp=jnp.asarray(beh, jnp.float32), mode_ids=jnp.asarray(mode))
  state = ts.init_state(_copy(params), tx, with_reference=True)
  _, m = _rl_step(model, tx, _step_cfg(ppo_epochs=epochs))(state, batch)
  cm = np.array(batch.completion_mask)
  cm[:, 0] = False  # the first column predicts nothing
  gap = np.abs(beh - trainer)
  np.testing.assert_allclose(float(m["behaviour_logp_gap"]), gap[cm].mean(), rtol=1e-3)
  for gi, name in enumerate(("slow", "fast")):
    rows = cm & (mode == gi)[:, None]
    np.testing.assert_allclose(float(m[f"behaviour_logp_gap/{name}"]), gap[rows].mean(), rtol=1e-3)
