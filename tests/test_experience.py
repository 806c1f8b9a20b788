"""One RL step's experience (merr1_jax/training/experience.py) on a tiny model, without mocks.

* `collect` with the real sampler: the batch's segments (one per mode), suffix tokens, positions, masks and
  reference log-probs against an independent construction from the same rollouts and an uncached forward pass;
  the advantages against a float64 re-derivation of method.md E2; its passes against the ungrouped oracle's.
* `from_rollouts` on hand-written, well-formed completions: the calibration reward r_cal of every slow row against
  an independent reference built from uncached forward passes of the slow context and of the fast counterfactual
  (prompt + FAST_PREFIX + the same answer), in float64 (method.md E3 steps 1-5).
"""

import math
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import config as cfglib
from merr1_jax import rl, rollout
from merr1_jax.data import pipeline, synth
from merr1_jax.models import base, mllm
from merr1_jax.task import prompts, rewards
from merr1_jax.training import assembly, experience, settings
from merr1_jax.training import setup as run_setup
from tests.helpers.rollouts import hand_rollout
from tests.oracles import ungrouped

ROOT = pathlib.Path(__file__).resolve().parent.parent
P, N_SLOW, N_FAST = 2, 2, 2



@pytest.fixture(scope="module")
def config():
  c = cfglib.load(str(ROOT / "configs" / "base.py"))
  c.rl.n_slow, c.rl.n_fast, c.rl.prompts_per_step = N_SLOW, N_FAST, P
  c.rl.max_new_tokens_slow, c.rl.max_new_tokens_fast = 10, 6
  return c


@pytest.fixture(scope="module")
def batch(tok):
  records = list(synth.generate_split(synth.SynthConfig(n_train=1, n_validation=1, n_test=P), "test"))
  pcfg = pipeline.PipelineConfig(kind="rl", batch_size=P, shuffle=False, num_epochs=1, video_dim=32, audio_dim=32,
                                 feature_dtype="float32", label_vocab=synth.EMOTIONS)
  return next(iter(pipeline.build(pipeline.BytesSource(records), tok, pcfg)))


@pytest.fixture(scope="module")
def policy(tok):
  model = mllm.build("tiny", vocab_size=tok.vocab_size, video_dim=32, audio_dim=32, d_model=64, num_heads=2,
                     num_kv_heads=1, head_dim=32, mlp_dim=128, init_std=0.3, max_seq_len=256,
                     video_token_id=tok.id_of(prompts.VIDEO_TOKEN), audio_token_id=tok.id_of(prompts.AUDIO_TOKEN))
  return model, model.init_params(jax.random.key(0)), model.init_params(jax.random.key(1))


@pytest.fixture(scope="module")
def ctx(config, tok, policy):
  return run_setup.experience_context(config, tok, policy[0], None)


def _forward(model, params, batch, p, tokens):
  """Uncached float32 logits [n, V] of prompt row p's real tokens followed by `tokens`, positions 0 .. n-1."""
  m = batch["prompt_mask"][p]
  toks = np.concatenate([batch["prompt_tokens"][p][m], np.asarray(tokens, np.int32)]).astype(np.int32)
  n = len(toks)
  inputs = base.ModelInputs(tokens=toks[None], positions=np.arange(n, dtype=np.int32)[None], mask=np.ones((1, n), bool),
                            video=batch["video"][p:p + 1], video_mask=batch["video_mask"][p:p + 1],
                            audio=batch["audio"][p:p + 1], audio_mask=batch["audio_mask"][p:p + 1])
  return np.asarray(_uncached(model)(params, jax.tree.map(jnp.asarray, inputs)))[0].astype(np.float64), int(m.sum())


_UNCACHED = {}


def _uncached(model):
  if model not in _UNCACHED:
    _UNCACHED[model] = jax.jit(lambda params, x: model.forward(params, model.embed(params, x), None)[0])
  return _UNCACHED[model]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------------------------ collect


def test_collect_lays_out_groups_sequences_and_reference_like_an_independent_build(config, ctx, policy, batch):
  model, params, ref_params = policy
  exp = settings.experience_settings(config)
  rng = jax.random.key(3)
  rl_batch, metrics, rows = experience.collect(ctx, exp, params, ref_params, batch, rng)
  ros = experience._sample_all(ctx, exp, params, rollout.batch_inputs(batch, "slow"), rng)  # same key, same draws
  g = N_SLOW + N_FAST
  b = P * g
  assert [s.mode_id for s in rl_batch.segments] == [0, 1]
  assert [s.tokens.shape[:2] for s in rl_batch.segments] == [(P, N_SLOW), (P, N_FAST)]
  assert rows["mode"] == ["slow"] * N_SLOW + ["fast"] * N_FAST + ["slow"] * N_SLOW + ["fast"] * N_FAST
  # The shared prompt is the slow-rendered one; a fast suffix starts with FAST_PREFIX (no loss on it).
  np.testing.assert_array_equal(rl_batch.prompt.tokens, ros["slow"].prompt.tokens)
  pre = np.asarray(ctx.ids.fast_prefix)
  for seg, mode in zip(rl_batch.segments, ("slow", "fast")):
    ro, n = ros[mode], (len(pre) if mode == "fast" else 0)
    for p in range(P):
      for j in range(exp.n(mode)):
        k = p * exp.n(mode) + j
        length = int(ro.length[k])
        comp = np.asarray(ro.completion[k][:length])
        np.testing.assert_array_equal(seg.tokens[p, j, :n], pre[:n])
        np.testing.assert_array_equal(seg.tokens[p, j, n:n + length], comp)
        lm, m = np.asarray(seg.loss_mask[p, j]), np.asarray(seg.mask[p, j])
        assert lm[:n].sum() == 0 and lm.sum() == length and lm[n:n + length].all()  # generated tokens only
        assert m[:n + length].all() and not m[n + length:].any()
        # Positions continue the prompt's last real position.
        n_prompt = int(np.asarray(rl_batch.prompt.mask[p]).sum())
        np.testing.assert_array_equal(np.asarray(seg.positions[p, j])[:n + length], n_prompt + np.arange(n + length))
        # Reference log-probs of the generated tokens = an uncached forward of the reference policy on the same
        # context (fast rows: the slow prompt + FAST_PREFIX).
        logits, n_slow_prompt = _forward(model, ref_params, batch, p, np.concatenate([pre[:n], comp]))
        assert n_slow_prompt == n_prompt
        lp = _log_softmax(logits)
        first = n_slow_prompt + n - 1  # the state that predicts the first generated token
        want_ref = lp[np.arange(first, first + length), comp]
        np.testing.assert_allclose(np.asarray(seg.ref_logp[p, j, n:n + length]), want_ref, atol=2e-4)
        assert not np.asarray(seg.ref_logp[p, j, :n]).any() and not np.asarray(seg.ref_logp[p, j, n + length:]).any()
  # Advantages: method.md E2 in float64 from the same rewards, groups = prompts.
  r_BxO = np.asarray(rows["reward"], np.float64)
  assert experience.OBJECTIVES == ("recall", "precision", "f1", "format", "calibration")
  w = np.asarray([[1, 1, 0, 0.1, 0.5] if m == "slow" else [1, 1, 0, 0.1, 0.0] for m in rows["mode"]])
  valid = np.ones_like(r_BxO, bool)
  valid[:, 4] = np.asarray(rows["mode"]) == "slow"
  want_adv = np.zeros(b)
  for p in range(P):
    sl = slice(p * g, (p + 1) * g)
    for o in range(5):
      x, v = r_BxO[sl, o], valid[sl, o]
      if v.sum() > 1 and x[v].max() > x[v].min():
        z = np.where(v, (x - x[v].mean()) / (x[v].std(ddof=1) + 1e-4), 0.0)
        want_adv[sl] += w[sl, o] * z
  order = assembly.prompt_major_order(np.concatenate([np.repeat(np.arange(P), n) for n in (N_SLOW, N_FAST)]))
  np.testing.assert_allclose(np.asarray(rl_batch.advantages)[order], want_adv, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(rows["advantage"], want_adv, rtol=1e-4, atol=1e-5)
  assert metrics["time/rollout"] > 0 and "reward/slow/calibration" in metrics


# ------------------------------------------------------------------------------------------- calibration

def test_answer_tokens_by_hand():
  """The fast counterfactual's tokens: after the last <answer> up to and including the first </answer> after it,
  within the completion's length; [] without such a span."""
  ids = types.SimpleNamespace(answer_open=3, answer_close=4)
  cases = [
      ([9, 3, 20, 21, 4, 7, 0, 0], 6, [20, 21, 4]),  # every answer word kept, the close included, padding cut
      ([3, 20, 4, 3, 22, 5, 23, 4, 8], 9, [22, 5, 23, 4]),  # the last <answer>
      ([3, 20, 4, 21, 4], 5, [20, 4]),  # up to the first </answer> after it
      ([3, 4], 2, [4]),  # an empty answer: the close alone
      ([3, 20, 4, 3, 22], 5, []),  # the last <answer> is never closed
      ([20, 21, 4], 3, []),  # no <answer>
      ([3, 20, 21, 4], 3, []),  # the close lies past the length
      ([20, 21, 3, 22, 4], 2, []),  # so does the <answer>
  ]
  for comp, length, want in cases:
    assert experience.answer_tokens(np.asarray(comp, np.int32), length, ids) == want, (comp, length)


SLOW_TEXTS = ["<think>a calm voice</think><answer>happy, sad</answer>", "<think>x</think><answer>angry</answer>",
              "<think>y</think>no answer here", "<think>z</think><answer>sad; worried, happy</answer>"]
FAST_TEXTS = ["happy</answer>", "sad, angry</answer>", "calm</answer>", "happy</answer>"]


def _anchor_rows(tokens, ids, num_anchors):
  """Positions (in `tokens`) whose next-token distribution predicts an emotion word: the last <answer>, then the
  separators before the first </answer> after it (method.md E3 step 2), at most `num_anchors`."""
  opens = [i for i, t in enumerate(tokens) if t == ids.answer_open]
  if not opens:
    return []
  start = opens[-1]
  out = [start]
  for i in range(start + 1, len(tokens)):
    if tokens[i] == ids.answer_close:
      break
    if tokens[i] in ids.separators:
      out.append(i)
  return out[:num_anchors]


def _answer_span(text):
  """The text after the last <answer> up to and including the first </answer> after it (written here from the
  completion's text, not with experience.answer_tokens, which the production passes use)."""
  rest = text[text.rindex(prompts.ANSWER_OPEN) + len(prompts.ANSWER_OPEN):]
  return rest[:rest.index(prompts.ANSWER_CLOSE) + len(prompts.ANSWER_CLOSE)]


def _ref_calibration(model, params, batch, ctx, slow, p, k, num_anchors, tau, source):
  """r_cal of slow row k (prompt p, completion text `source`) from two uncached forward passes, float64
  (method.md E3 steps 1-5)."""
  comp = [int(t) for t in np.asarray(slow.completion[k][:slow.length[k]])]
  n_prompt = int(batch["prompt_mask"][p].sum())
  text = ctx.tokenizer.decode(comp[:-1])
  if not rewards.format_ok(text, "slow"):
    return 0.0
  answer = ctx.tokenizer.encode(_answer_span(source))  # the fast counterfactual: the same answer, from its text
  fast_tokens = list(ctx.ids.fast_prefix) + answer
  sets = np.asarray(ctx.token_sets, np.float64)  # [K, C, V]
  exists = np.asarray(ctx.cluster_mask)

  def logmass(tokens):
    logits, _ = _forward(model, params, batch, p, tokens)
    rows = [n_prompt + a for a in _anchor_rows(tokens, ctx.ids, num_anchors)]
    probs = np.exp(_log_softmax(logits[rows]))  # [A, V]
    with np.errstate(divide="ignore"):  # an empty token set has mass 0: log 0 = -inf, then the floor
      return np.maximum(np.log(np.einsum("av,kcv->akc", probs, sets)), rl.LOGMASS_FLOOR)

  s_slow, s_fast = logmass(comp), logmass(fast_tokens)
  a = min(len(s_slow), len(s_fast))
  gt, _ = (ctx.cal_space or ctx.space).encode(batch["openset"][p])
  per_wheel = []
  for w in range(gt.shape[0]):
    if not gt[w].any():
      continue
    neg = exists[w] & ~gt[w]
    d = s_slow[:a, w] - s_fast[:a, w]  # [A, C]
    per_wheel.append(np.mean(d[:, gt[w]].mean(1) - d[:, neg].mean(1)))
  return math.tanh(np.mean(per_wheel) / tau) if per_wheel and a else 0.0


@pytest.mark.parametrize("kind,level", [("contrastive_gain", "category"), ("contrastive_gain", "word"),
                                        ("none", "category")])
def test_calibration_reward_equals_uncached_slow_and_fast_passes(config, tok, policy, batch, kind, level):
  """r_cal of every slow row from two uncached forward passes, for category-level confidence (the label space's
  wheel clusters) and word-level confidence (each MER-Synth label its own category)."""
  model, params, _ = policy
  config = config.copy_and_resolve_references()
  config.rl.calibration, config.rl.cal_tau, config.rl.beta, config.rl.cal_level = kind, 0.5, 0.0, level
  ctx = run_setup.experience_context(config, tok, model, None)
  assert (ctx.cal_space is None) == (level == "category")
  exp = settings.experience_settings(config)
  inputs = rollout.batch_inputs(batch, "slow")
  ros = {"slow": hand_rollout(tok, ctx.ids, inputs, SLOW_TEXTS, "slow", N_SLOW),
         "fast": hand_rollout(tok, ctx.ids, inputs, FAST_TEXTS, "fast", N_FAST)}
  texts = [t for ro in ros.values() for t in rollout.completion_texts(tok, ro)]
  rl_batch, metrics, rows = experience.from_rollouts(ctx, exp, params, None, batch, ros, texts)
  r_cal = np.asarray(rows["reward"])[:, experience.OBJECTIVES.index("calibration")]
  modes = np.asarray(rows["mode"])  # row order of `rows`, whichever layout rl_batch has
  g = N_SLOW + N_FAST
  want = np.zeros(P * g)
  for p in range(P):
    for j in range(N_SLOW):
      k = p * N_SLOW + j
      if kind != "none":
        want[p * g + j] = _ref_calibration(model, params, batch, ctx, ros["slow"], p, k, exp.num_anchors, 0.5,
                                           SLOW_TEXTS[k])
  np.testing.assert_allclose(r_cal, want, atol=2e-5)
  if kind != "none":
    assert (want[[0, 1, 4, 5]] != 0).sum() >= 3 and want[4] == 0.0  # real values; the malformed row scores 0
    assert metrics["reward/slow/calibration"] == pytest.approx(r_cal[modes == "slow"].mean(), abs=1e-6)
  assert np.all(r_cal[modes == "fast"] == 0.0)  # no calibration reward for fast rows


# ------------------------------------------------------------------------------------------- label space


def test_the_label_space_switch_reaches_rewards_token_sets_and_evaluation(config, tok, policy, tmp_path):
  """data.label_space / data.wheel_level decide the rewards' space, the calibration token sets and the own
  dataset's evaluation metric together; 'identity' is refused for open-vocabulary data."""
  model = policy[0]
  cases = {("wheels", 1): ("emotion_wheel_2025_level1", 5, "ov"),
           ("wheels", 2): ("emotion_wheel_2025_level2", 5, "set"), ("identity", 1): ("closed", 1, "set")}
  for (kind, level), (name, wheels, metric) in cases.items():
    c = config.copy_and_resolve_references()
    c.data.label_space, c.data.wheel_level = kind, level
    settings.validate(c)
    ctx = run_setup.experience_context(c, tok, model, None)
    assert ctx.space.name == name and ctx.space.num_wheels == wheels
    assert ctx.token_sets.shape == (wheels, ctx.space.num_clusters, tok.vocab_size)
    assert np.asarray(ctx.token_sets).any(-1).sum() > 0  # real first tokens, not an empty mask
    assert settings.own_metric(c) == metric and settings.evaluation_settings(c).space.name == name
  c = config.copy_and_resolve_references()
  c.data.label_space = "identity"
  assert settings.label_space(c).cluster_names == (tuple(sorted(synth.EMOTIONS)),)
  c.data.name, c.data.records_dir, c.data.tokenizer_dir = "mer_features", str(tmp_path), str(tmp_path)
  with pytest.raises(cfglib.ConfigError, match="config.data.label_space: 'identity' needs a dataset"):
    settings.validate(c)


# ------------------------------------------------------------------------------ calibration's advantage space


def _np_dod(r_BxO, valid_BxO, w_BxO, groups, eps=1e-4):
  """method.md E2 (disentangled, unbiased std) in float64, by explicit loops over groups and objectives."""
  out = np.zeros(len(r_BxO))
  for g in np.unique(groups):
    rows = groups == g
    for o in range(r_BxO.shape[1]):
      v = rows & valid_BxO[:, o]
      x = r_BxO[v, o]
      if len(x) > 1 and x.max() > x.min():
        out[v] += w_BxO[v, o] * (x - x.mean()) / (x.std(ddof=1) + eps)
  return out


@pytest.mark.parametrize("space,lam", [("advantage", 0.0), ("reward", 1.0), ("mixed", 0.5)])
def test_calibration_in_advantage_reward_and_mixed_space(config, space, lam):
  """rl.cal_space (method.md E3 "Variants"): r_cal as its own normalised objective (advantage), folded into the
  task rewards before their normalisation (reward: r_o + w_cal r_cal for recall, precision, F1), or split
  (mixed: cal_mix of it folded in, the rest as its own objective). Against the float64 reference above."""
  c = config.copy_and_resolve_references()
  c.rl.cal_space, c.rl.cal_mix, c.rl.n_slow, c.rl.n_fast, c.rl.w_f1 = space, lam if space == "mixed" else 0.5, 3, 2, 0.3
  adv = settings.advantage_settings(c)
  assert adv.cal_in_reward == lam
  rng = np.random.default_rng(21)
  p, ns, nf = 2, 3, 2
  b, bs = p * (ns + nf), p * ns
  r = rng.random((b, 4)).astype(np.float32)
  r[:, 3] = rng.random(b) < 0.7  # the format reward is 0/1
  mode = np.asarray([0] * bs + [1] * (p * nf), np.int32)
  prompt = np.concatenate([np.repeat(np.arange(p), ns), np.repeat(np.arange(p), nf)])
  s_slow, s_fast = (-rng.random((bs, 2, 1, 3)).astype(np.float32) * 3 for _ in range(2))
  amask, gt = np.ones((bs, 2), bool), np.zeros((bs, 1, 3), bool)
  gt[:, 0, 0] = True
  fmt = rng.random(bs) < 0.8
  valid = np.ones(b, bool)
  got, r_cal, _ = experience.advantages_and_calibration(
      r, valid, mode, prompt, (s_slow, s_fast, amask), gt, fmt, None, adv=adv, kind="contrastive_gain",
      cal=rl.CalibrationConfig(), num_groups=p, group_size=ns + nf)
  want_cal = np.zeros(b)
  want_cal[:bs] = np.where(fmt, np.asarray(rl.calibration_gain(s_slow, s_fast, amask, gt)), 0.0)
  np.testing.assert_allclose(r_cal, want_cal, rtol=1e-6, atol=1e-7)
  w = np.asarray([[1, 1, 0.3, 0.1, 0.5] if m == 0 else [1, 1, 0.3, 0.1, 0.0] for m in mode], np.float64)
  r64 = np.concatenate([r.astype(np.float64), want_cal[:, None]], 1)
  # Folded into the task rewards: r_cal centred over each prompt's well-formed slow rows, 0 on every other row.
  ok = np.zeros(b, bool)
  ok[:bs] = fmt
  centred = np.zeros(b)
  for g in range(p):
    rows = ok & (prompt == g)
    centred[rows] = want_cal[rows] - want_cal[rows].mean()
  r64[:, :3] += lam * w[:, 4:5] * centred[:, None]
  w[:, 4] *= 1 - lam
  v = np.ones_like(r64, bool)
  v[:, 4] = False
  v[:bs, 4] = fmt  # the calibration objective: the well-formed slow rows only
  np.testing.assert_allclose(got, _np_dod(r64, v, w, prompt), rtol=2e-5, atol=2e-5)


def test_collect_with_the_oracles_passes_gives_the_same_experience(config, ctx, policy, batch, monkeypatch):
  """The grouped passes (reference log-probs, the calibration's two log-masses) against the ungrouped oracle's
  (tests/oracles/ungrouped.py) inside the same experience step: the same rewards, advantages and reference
  log-probs. (This random policy writes no well-formed answer, so r_cal is 0 here; test_calibration_gate compares
  a non-zero r_cal through both passes on hand-written answers.)"""
  model, params, ref_params = policy
  rng = jax.random.key(5)
  exp = settings.experience_settings(config)
  inputs = rollout.batch_inputs(batch, "slow")
  group, _, rows_g = experience.collect(ctx, exp, params, ref_params, batch, rng)
  ros = experience._sample_all(ctx, exp, params, inputs, rng)
  n = len(ctx.ids.fast_prefix)

  def oracle_reference(ctx, ref_params, prompt, segs):  # per rollout [B_m, T] -> per segment [P, G, n + T]
    return [np.pad(np.asarray(ungrouped.score(model, ref_params, ro).logp), ((0, 0), (n if m == "fast" else 0, 0)))
            .reshape(s.tokens.shape) for (m, ro), s in zip(ros.items(), segs)]

  def oracle_calibration(ctx, settings, params, prompt, slow, own):
    return ungrouped.calibration_logmass(ctx, params, inputs, slow, settings.num_anchors, settings.prompt_buckets)

  monkeypatch.setattr(experience, "_reference", oracle_reference)
  monkeypatch.setattr(experience, "_calibration_logmass", oracle_calibration)
  flat, _, rows_f = experience.collect(ctx, exp, params, ref_params, batch, rng)
  assert rows_g["text"] == rows_f["text"]
  r_g, r_f = np.asarray(rows_g["reward"]), np.asarray(rows_f["reward"])
  np.testing.assert_allclose(r_g, r_f, atol=1e-5)
  np.testing.assert_allclose(rows_g["advantage"], rows_f["advantage"], atol=1e-5)
  for a, b in zip(group.segments, flat.segments):
    m = np.asarray(a.loss_mask)
    np.testing.assert_allclose(np.asarray(a.ref_logp)[m], np.asarray(b.ref_logp)[m], rtol=1e-5, atol=1e-5)
