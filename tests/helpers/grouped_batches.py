"""The same host rollouts in both RL layouts, for the tests that compare the library's grouped passes with the
ungrouped oracle: text-only, multimodal (video/audio rows at placeholders) and M-RoPE tiny models, left-padded
prompts of different lengths, slow and fast rollouts of different lengths, some rows without loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import rollout
from merr1_jax.models import base, mllm
from merr1_jax.rollout import passes as grouped
from merr1_jax.training import assembly
from tests.oracles import ungrouped

V, PREFIX = 96, (5, 6, 7)  # vocabulary; the FAST_PREFIX ids of these tests
VIDEO, AUDIO = 90, 91


@functools.lru_cache(maxsize=None)
def model(kind: str):
  kw = dict(vocab_size=V, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, init_std=0.08)
  if kind == "text":
    kw.update(video_dim=0, audio_dim=0)
  elif kind == "mm":
    kw.update(video_dim=12, audio_dim=10, video_token_id=VIDEO, audio_token_id=AUDIO)
  elif kind == "mrope":
    kw.update(video_dim=12, audio_dim=0, video_token_id=VIDEO, mrope_section=(1, 1, 2))
  m = mllm.build("tiny", **kw)
  return m, m.init_params(jax.random.key(0))


def prompts(kind: str, p: int, rng) -> base.ModelInputs:
  """P left-padded prompts of different lengths; placeholders + features (mm, mrope); distinct t/h/w ids (mrope)."""
  lens = rng.integers(5, 11, p)
  lens[0] = 10
  l = 12
  tok = np.zeros((p, l), np.int32)
  mask = np.zeros((p, l), bool)
  n_vid = np.zeros(p, int)
  for i, n in enumerate(lens):
    row = rng.integers(10, 80, n)
    if kind in ("mm", "mrope"):
      n_vid[i] = int(rng.integers(1, 3))
      row[1:1 + n_vid[i]] = VIDEO
    if kind == "mm":
      row[-2] = AUDIO
    tok[i, l - n:], mask[i, l - n:] = row, True
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  feats = {}
  if kind in ("mm", "mrope"):
    vm = np.arange(2)[None] < n_vid[:, None]
    feats.update(video=rng.normal(size=(p, 2, 12)).astype(np.float32), video_mask=vm)
  if kind == "mm":
    feats.update(audio=rng.normal(size=(p, 1, 10)).astype(np.float32), audio_mask=np.ones((p, 1), bool))
  if kind == "mrope":  # video rows share a temporal id, text continues after the largest id
    pos = np.stack([pos, np.where(tok == VIDEO, 1, pos), np.where(tok == VIDEO, 2, pos)], -1).astype(np.int32)
  return base.ModelInputs(tokens=tok, positions=pos, mask=mask, **feats)


def rollout_of(prompts_in, mode, g, t, rng) -> rollout.Rollout:
  prompt = rollout.prepare_prompts(prompts_in, mode=mode, vocab_size=V, fast_prefix_ids=PREFIX, buckets=(12, 16))
  b = prompt.tokens.shape[0] * g
  length = rng.integers(1, t + 1, b)
  length[0] = t
  mask = np.arange(t)[None] < length[:, None]
  comp = np.where(mask, rng.integers(10, 80, (b, t)), 0).astype(np.int32)
  logp = np.where(mask, -rng.random((b, t)), 0.0).astype(np.float32)
  return rollout.Rollout(prompt=prompt, completion=comp, completion_mask=mask, logp=logp, logp_sampled=logp,
                         stop_reason=np.zeros(b, np.int32), length=length, prompt_length=np.full(b, 0),
                         steps=np.asarray(t), num_samples=g, mode=mode)


def batches(kind, p=3, n_slow=3, n_fast=2, t_slow=6, t_fast=3, seed=0, ref=True, invalid=(1,)):
  """(model, params, ungrouped RLBatch, GroupedRLBatch) of the same rollouts and advantages."""
  model_, params = model(kind)
  rng = np.random.default_rng(seed)
  inputs = prompts(kind, p, rng)
  ros = {}
  if n_slow:
    ros["slow"] = rollout_of(inputs, "slow", n_slow, t_slow, rng)
  if n_fast:
    ros["fast"] = rollout_of(inputs, "fast", n_fast, t_fast, rng)
  b = sum(r.completion.shape[0] for r in ros.values())
  adv = rng.normal(size=b).astype(np.float32)
  valid = np.ones(b, bool)
  valid[list(invalid)] = False  # rows of a group whose ground truth maps nowhere: no loss
  # Reference log-probs near the model's own (log 1/96 = -4.6), so the k3 KL stays in a realistic range.
  refs = [np.where(r.completion_mask, -rng.uniform(3.5, 5.5, r.completion.shape), 0.0).astype(np.float32)
          for r in ros.values()] if ref else None
  flat = ungrouped.assemble(list(ros.values()), adv, pad_id=0, ref_logp=refs, valid_B=valid)
  prompt = grouped.slow_prompt(ros, inputs, vocab_size=V, pad_id=0, buckets=(12, 16))
  segs = assembly.segments(list(ros.values()), prompt, fast_prefix_ids=PREFIX, valid_B=valid)
  if refs is not None:  # suffix-aligned, 0 on the fast prefix, as experience's reference pass gives them
    refs = [np.pad(r, ((0, 0), (len(PREFIX) if m == "fast" else 0, 0))).reshape(s.tokens.shape)
            for r, m, s in zip(refs, ros, segs)]
  group = assembly.assemble(segs, prompt, adv, refs)
  return model_, params, jax.tree.map(jnp.asarray, flat), jax.tree.map(jnp.asarray, group), ros, inputs
