"""The format gate on the calibration reward (method.md E3 step 5): a slow completion that is not well formed gets
r_cal = 0, even when its answer span is complete and has anchors (text after </answer>), so the gate, not a missing
answer, is what zeroes it. Hand-written completions through `experience.from_rollouts` on a tiny model."""

import pathlib

import jax
import numpy as np
import pytest

from merr1_jax import config as cfglib
from merr1_jax import rollout
from merr1_jax.data import pipeline, synth
from merr1_jax.models import mllm
from merr1_jax.task import prompts, rewards
from merr1_jax.training import experience, settings
from merr1_jax.training import setup as run_setup
from tests.helpers.rollouts import hand_rollout
from tests.oracles import ungrouped

ROOT = pathlib.Path(__file__).resolve().parent.parent
P, N_SLOW, N_FAST = 2, 2, 1
GOOD = ["<think>a calm voice</think><answer>angry, sad</answer>", "<think>x</think><answer>happy, worried</answer>"]
# The same completions with text after </answer>: the anchors (the <answer> and its separators) and the context
# they see are unchanged, only the format is broken.
BAD = [t + " and more" for t in GOOD]
SLOW_TEXTS = [GOOD[0], BAD[0], GOOD[1], BAD[1]]  # prompt p owns rows 2p (well formed) and 2p + 1 (not)
FAST_TEXTS = ["happy</answer>", "sad, angry</answer>"]



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
  return model, model.init_params(jax.random.key(0))


def test_a_complete_answer_in_a_malformed_completion_gets_no_calibration_reward(tok, batch, policy):
  assert all(rewards.format_ok(t, "slow") for t in GOOD) and not any(rewards.format_ok(t, "slow") for t in BAD)
  model, params = policy
  config = cfglib.load(str(ROOT / "configs" / "base.py"))
  config.rl.n_slow, config.rl.n_fast, config.rl.prompts_per_step = N_SLOW, N_FAST, P
  config.rl.calibration, config.rl.cal_tau, config.rl.beta = "contrastive_gain", 0.5, 0.0
  ctx = run_setup.experience_context(config, tok, model, None)
  exp = settings.experience_settings(config)
  inputs = rollout.batch_inputs(batch, "slow")
  ros = {"slow": hand_rollout(tok, ctx.ids, inputs, SLOW_TEXTS, "slow", N_SLOW),
         "fast": hand_rollout(tok, ctx.ids, inputs, FAST_TEXTS, "fast", N_FAST)}
  texts = [t for ro in ros.values() for t in rollout.completion_texts(tok, ro)]
  _, _, rows = experience.from_rollouts(ctx, exp, params, None, batch, ros, texts)
  reward = np.asarray(rows["reward"])
  r_cal, r_fmt = reward[:, experience.OBJECTIVES.index("calibration")], reward[:, experience.OBJECTIVES.index("format")]
  g = N_SLOW + N_FAST  # rows: prompt-major, each prompt's slow rows (good, bad) then its fast row
  good, bad = [p * g for p in range(P)], [p * g + 1 for p in range(P)]
  assert [rows["text"][i] for i in good] == GOOD and [rows["text"][i] for i in bad] == BAD
  assert np.all(r_fmt[good] == 1.0) and np.all(r_fmt[bad] == 0.0)
  # The well-formed twins score a real r_cal; without the gate each malformed row would score its twin's value.
  assert np.all(np.abs(r_cal[good]) > 1e-3), r_cal
  assert np.all(r_cal[bad] == 0.0), r_cal


def test_emitted_categories_follow_the_answer_words(tok, batch, policy):
  """The 'emitted' reading's categories, on real tokens: after '<answer>' comes 'angry', after ',' comes 'sad'
  (word-level categories: each label word its own), and nothing past the answer's anchors."""
  model, _ = policy
  config = cfglib.load(str(ROOT / "configs" / "base.py:ablation=sfcc_emitted"))
  ctx = run_setup.experience_context(config, tok, model, None)
  ro = hand_rollout(tok, ctx.ids, rollout.batch_inputs(batch, "slow"), SLOW_TEXTS, "slow", N_SLOW)
  e = experience.emitted_categories(ro.completion, ro.length, ctx.ids.anchors(4), ctx.token_sets)
  names = ctx.cal_space.cluster_names[0]
  said = [[[names[c] for c in np.flatnonzero(e[r, a, 0])] for a in range(4)] for r in range(len(SLOW_TEXTS))]
  assert said[0] == said[1] == [["angry"], ["sad"], [], []]
  assert said[2] == said[3] == [["happy"], ["worried"], [], []]


def test_emitted_reading_runs_through_the_experience_step(tok, batch, policy, monkeypatch):
  """rl.cal_reading='emitted' end to end: the well-formed rows get a one-sided r_cal (<= 0, finite), the malformed
  ones 0, with the same values as through the ungrouped oracle's calibration passes."""
  model, params = policy
  config = cfglib.load(str(ROOT / "configs" / "base.py:ablation=sfcc_emitted"))
  config.rl.n_slow, config.rl.n_fast, config.rl.prompts_per_step, config.rl.beta = N_SLOW, N_FAST, P, 0.0
  ctx = run_setup.experience_context(config, tok, model, None)
  inputs = rollout.batch_inputs(batch, "slow")
  ros = {"slow": hand_rollout(tok, ctx.ids, inputs, SLOW_TEXTS, "slow", N_SLOW),
         "fast": hand_rollout(tok, ctx.ids, inputs, FAST_TEXTS, "fast", N_FAST)}
  texts = [t for ro in ros.values() for t in rollout.completion_texts(tok, ro)]
  exp = settings.experience_settings(config)
  got = {}
  for name in ("library", "oracle"):
    if name == "oracle":
      monkeypatch.setattr(experience, "_calibration_logmass", lambda ctx, settings, params, prompt, slow, own:
                          ungrouped.calibration_logmass(ctx, params, inputs, slow, settings.num_anchors,
                                                        settings.prompt_buckets))
    _, _, rows = experience.from_rollouts(ctx, exp, params, None, batch, ros, texts)
    got[name] = np.asarray(rows["reward"])[:, experience.OBJECTIVES.index("calibration")]
  r_cal = got["library"]
  step = N_SLOW + N_FAST
  good, bad = [p * step for p in range(P)], [p * step + 1 for p in range(P)]
  assert np.all(r_cal[good] <= 0) and np.all(np.isfinite(r_cal)) and np.all(r_cal[bad] == 0.0), r_cal
  assert np.any(r_cal[good] < -1e-4), r_cal  # a real value, not the zero of an empty reading
  np.testing.assert_allclose(got["library"], got["oracle"], atol=1e-5)
