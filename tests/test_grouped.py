"""The library's RL layout (merr1_jax/rollout/passes.py) against the ungrouped oracle (tests/oracles/ungrouped.py).

Every comparison builds both batches from the same host rollouts (the library's and the oracle's assembly): per-token
log-probs, the RL loss, every gradient leaf, whole update steps (micro- and mini-batches, PPO epochs), and the
scoring passes (reference log-probs, calibration log-masses), for text-only, multimodal (merged video/audio rows)
and M-RoPE models, slow and fast segments of different lengths, short and loss-free rows, G = 1, and sharded over
(8,1,1) and (2,2,2) CPU meshes. Tolerances are float32 rounding of sums taken in another order: rtol 1e-5 (atol
1e-6) on log-probs and losses, and on gradients relative to each leaf's largest entry.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from merr1_jax import rl, rollout
from merr1_jax.infra import sharding
from merr1_jax.rollout import passes as grouped
from merr1_jax.training import assembly, batch_loss, experience
from merr1_jax.training import step as ts
from tests.helpers.grouped_batches import PREFIX, V
from tests.helpers.grouped_batches import batches as _batches
from tests.oracles import ungrouped


def _cfg(**kw):
  return ts.StepConfig(**{"loss": rl.LossConfig(), "beta": 0.04, **kw})


def _assert_trees_close(a, b, rtol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = max(np.abs(y).max(), 1e-12)
    assert np.abs(x - y).max() <= rtol * scale + 1e-9, (jax.tree_util.keystr(path), np.abs(x - y).max(), scale)


CASES = [("text", {}), ("mm", {}), ("mrope", {}), ("text", dict(n_slow=1, n_fast=1)),  # G = 1 per segment
         ("mm", dict(n_fast=0)), ("text", dict(n_slow=0, n_fast=3, invalid=()))]


@pytest.mark.parametrize("kind,kw", CASES)
def test_loss_gradients_and_logprobs_equal_the_oracle(kind, kw):
  model, params, flat, group, ros, _ = _batches(kind, **kw)
  cfg = _cfg()
  f_loss, g_loss = ungrouped.make_rl_loss(model, cfg), batch_loss.make_grouped_loss(model, cfg)
  (lf, sf), gf = jax.jit(jax.value_and_grad(lambda p: f_loss(p, flat, 0.04), has_aux=True))(params)
  (lg, sg), gg = jax.jit(jax.value_and_grad(lambda p: g_loss(p, group, 0.04), has_aux=True))(params)
  np.testing.assert_allclose(lg, lf, rtol=1e-5, atol=1e-6)
  for k in ("tokens", "kl_sum", "entropy_sum", "tokens/slow", "tokens/fast"):
    np.testing.assert_allclose(sg[k], sf[k], rtol=1e-5, atol=1e-6)
  _assert_trees_close(gg, gf)
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(gg))
  # Per-token log-probs: ungrouped column L_m + t of a row is suffix token n_prefix + t of its segment.
  # Each pass jitted whole: one program instead of an eager dispatch (and a compile) per operation.
  logp_f = np.asarray(jax.jit(lambda p, x: ts.shifted_logprobs(model, p, x, 8192, False))(params, flat.inputs))
  outs = jax.jit(lambda p, prompt, segments: grouped.grouped_logprobs(
      model, p, prompt, segments, chunk_size=8192, with_entropy=False))(params, group.prompt, group.segments)
  order = assembly.prompt_major_order(np.concatenate([r.prompt_index for r in ros.values()]))
  start = 0
  for (mode, ro), seg, (logp_g, _) in zip(ros.items(), group.segments, outs):
    n = len(PREFIX) if mode == "fast" else 0
    for k in range(ro.completion.shape[0]):
      row = int(np.nonzero(order == start + k)[0][0])
      m = np.asarray(ro.completion_mask[k])
      lm = ro.prompt.tokens.shape[1]
      got = np.asarray(logp_g).reshape(-1, logp_g.shape[-1])[k, n:n + m.size][m]
      want = logp_f[row, lm - 1:lm - 1 + m.size][m]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    start += ro.completion.shape[0]


@pytest.mark.parametrize("micro,minis,epochs", [(1, 1, 1), (3, 1, 1), (1, 3, 2)])
def test_update_steps_equal_the_oracle(micro, minis, epochs):
  """Whole jitted steps (SGD, so the comparison sees the gradients): micro-batches split prompts (whole groups),
  mini-batches and epochs as in make_rl_step; the ungrouped step splits its rows in the same groups."""
  model, params, flat, group, _, _ = _batches("mm", p=3, invalid=())
  tx = optax.sgd(0.5)
  cfg = _cfg(micro_batches=micro, mini_batches=minis, ppo_epochs=epochs)
  got, m_g = ts.make_rl_step(model, tx, cfg)(ts.init_state(jax.tree.map(jnp.copy, params), tx,
                                                             with_reference=True), group)
  # The ungrouped step with the same split: it gives part j the rows j, j + 3, ..., so put prompt j's i-th row
  # (prompt-major row j*G + i) at row j + 3*i; then part j holds exactly prompt j's group, as in the grouped step.
  g = flat.advantages.shape[0] // 3
  idx = np.empty(3 * g, int)
  for j in range(3):
    idx[j + 3 * np.arange(g)] = j * g + np.arange(g)
  ref_state = ts.init_state(jax.tree.map(jnp.copy, params), tx, with_reference=True)
  want, m_f = ungrouped.rl_step(model, tx, cfg)(ref_state, jax.tree.map(lambda x: x[idx], flat))
  # One update: the gradient tolerance. Several: float32 differences of ~1e-6 compound over the updates (6 at
  # lr 0.5 grow to ~1e-4 of a leaf's largest value), which is rounding, not a different update.
  # The loss and KL metrics average over the updates, so after the first they see the same compounded rounding.
  rtol = 1e-5 if minis * epochs == 1 else 2e-4
  _assert_trees_close(got.params, want.params, rtol=rtol)
  np.testing.assert_allclose(m_g["loss"], m_f["loss"], rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(m_g["kl"], m_f["kl"], rtol=max(rtol, 1e-4), atol=1e-7)


@pytest.mark.parametrize("kind", ["mm", "mrope"])
def test_reference_old_policy_and_calibration_passes_equal_the_oracle(kind):
  model, params, flat, group, ros, inputs = _batches(kind, ref=False)
  cfg = _cfg(ppo_epochs=2)
  # Jitted as the step runs them (one program each, not an eager compile per operation).
  old_g, gap_g = jax.jit(lambda p, b: batch_loss.old_logprobs(model, cfg, p, b))(params, group)
  old_f, gap_f = jax.jit(lambda p, b: ungrouped.old_logprobs(model, cfg, p, b))(params, flat)
  np.testing.assert_allclose(gap_g["behaviour_logp_gap"], gap_f["behaviour_logp_gap"], rtol=1e-5)
  outs = grouped.score_pass(model, params, group.prompt, group.segments)
  for seg, g_seg, out in zip(group.segments, old_g.segments, outs):  # the scoring pass's log-probs, token by token
    m = np.asarray(seg.loss_mask)
    np.testing.assert_allclose(np.asarray(g_seg.old_logp)[m], np.asarray(out["logp"])[m], rtol=1e-5, atol=1e-6)
  assert np.asarray(old_f)[np.asarray(flat.completion_mask)].size == sum(int(s.loss_mask.sum()) for s in group.segments)
  for (mode, ro), out in zip(ros.items(), outs):
    n = len(PREFIX) if mode == "fast" else 0
    want = np.asarray(ungrouped.score(model, params, ro).logp)
    got = np.asarray(out["logp"])[..., n:].reshape(want.shape)
    m = np.asarray(ro.completion_mask)
    np.testing.assert_allclose(got[m], want[m], rtol=1e-5, atol=1e-6)
  # Calibration: answers inside <answer> ... </answer>; the slow context and the fast counterfactual.
  ids = rollout.SpecialIds(eos=2, pad=0, fast_prefix=PREFIX, think=(5, 6), answer_open=7, answer_close=8,
                           separators=(9,))
  slow = ros["slow"]
  comp = np.array(slow.completion)
  comp[:, :5] = [20, 7, 30, 9, 8]  # reasoning token, <answer>, word, separator, </answer>
  comp[1, :5] = [7, 31, 9, 32, 8]
  slow = slow.replace(completion=comp, completion_mask=np.ones(comp.shape, bool), length=np.full(len(comp), 6))
  ros = {"slow": slow}
  sets = jnp.asarray(np.random.default_rng(1).random((2, 3, V)) < 0.2)
  ctx = experience.Context(model=model, tokenizer=None, ids=ids, space=None, token_sets=sets,
                           cluster_mask=jnp.ones((2, 3), bool))
  settings = _exp_settings(prompt_buckets=(12, 16))
  prompt = grouped.slow_prompt(ros, inputs, vocab_size=V, pad_id=0, buckets=(12, 16))
  own = assembly.segments([slow], prompt, fast_prefix_ids=PREFIX)[0]
  lm_g = experience._calibration_logmass(ctx, settings, params, prompt, slow, own)
  _, lm_f = ungrouped.passes(ctx, settings, params, None, inputs, ros, True)[:2]
  np.testing.assert_array_equal(lm_g[2], lm_f[2])
  assert lm_g[2].sum() >= len(comp)  # every row has its anchors
  for a, b in zip(lm_g[:2], lm_f[:2]):
    np.testing.assert_allclose(np.where(lm_f[2][..., None, None], a, 0), np.where(lm_f[2][..., None, None], b, 0),
                               rtol=1e-5, atol=1e-5)


def _exp_settings(**kw):
  base_kw = dict(n_slow=3, n_fast=2, max_new_tokens=(("slow", 6), ("fast", 3)), method=None,
                 advantage=None, calibration="contrastive_gain", cal=rl.CalibrationConfig(), num_anchors=3,
                 with_reference=False, prompt_buckets=(12, 16))
  return experience.ExperienceSettings(**(base_kw | kw))


def test_sharded_grouped_step_equals_unsharded():
  """Prompts (with their whole groups: 2 slow and 1 fast suffix each) over the batch axes, parameters by the
  partition rules, on the mesh that uses all three axes. (test_train_step.py runs every mesh preset shape with
  one suffix per prompt.)"""
  mesh_shape = (2, 2, 2)
  model, params, _, group, _, _ = _batches("text", p=8, n_slow=2, n_fast=1, t_slow=4, t_fast=2, invalid=())
  tx = optax.sgd(0.5)
  cfg = _cfg()
  step = ts.make_rl_step(model, tx, cfg)
  want, _ = step(ts.init_state(jax.tree.map(jnp.copy, params), tx, with_reference=True), group)
  mesh = sharding.make_mesh(mesh_shape)
  state = ts.init_state(jax.tree.map(jnp.copy, params), tx, with_reference=True)
  st_sh = sharding.state_shardings(state, sharding.param_shardings(model, params, mesh), mesh)
  b_sh = sharding.batch_shardings(group, mesh)
  sharded_step = ts.make_rl_step(model, tx, cfg, state_shardings=st_sh, batch_shardings=b_sh)
  got, _ = sharded_step(jax.device_put(state, st_sh), jax.device_put(group, b_sh))
  _assert_trees_close(got.params, want.params)


def test_a_model_without_hidden_grouped_runs_the_same_passes():
  """A port that implements only `hidden` (no hidden_grouped member) gets base.hidden_grouped's fallback: the
  prompt repeated per suffix. Its loss, gradients and scoring passes equal the native grouped ones."""
  model, params, _, group, _, _ = _batches("mm", invalid=())

  class HiddenOnly:  # the same model seen through PolicyModel's required members only
    config = model.config
    embed, unembed_weight = model.embed, model.unembed_weight

    def hidden(self, params, x, cache=None):
      return model.hidden(params, x, cache)

  assert not hasattr(HiddenOnly(), "hidden_grouped")
  cfg = _cfg()
  grads = {}
  for name, m in (("native", model), ("fallback", HiddenOnly())):
    loss = batch_loss.make_grouped_loss(m, cfg)
    grads[name] = jax.jit(jax.value_and_grad(lambda p, loss=loss: loss(p, group, 0.04)[0]))(params)
  np.testing.assert_allclose(grads["fallback"][0], grads["native"][0], rtol=1e-5, atol=1e-6)
  _assert_trees_close(grads["fallback"][1], grads["native"][1])
  for a, b in zip(grouped.score_pass(HiddenOnly(), params, group.prompt, group.segments),
                  grouped.score_pass(model, params, group.prompt, group.segments)):
    np.testing.assert_allclose(a["logp"], b["logp"], rtol=1e-5, atol=1e-6)
