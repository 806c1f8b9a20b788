"""A train state built from loaded parameters must not make the RL step compile twice.

hf_io.load_hf places every parameter on a sharding (committed arrays); init_state's counters (the step, the
non-finite count, optax's `count`s) used to be uncommitted. jit keys its cache on committedness, and a step's
outputs are all committed, so the second step compiled the whole update again: in benchmarks/peers/ours_grpo.py
the second update took about 1.9x as long as later ones. These tests count the step's compiled programs.
"""

from __future__ import annotations

import jax
import numpy as np

from merr1_jax import rl
from merr1_jax.models import hf_io, mllm, presets
from merr1_jax.training import assembly
from merr1_jax.training import optimizer as optim
from merr1_jax.training import step as ts


def _tiny():
  cfg = presets.get("tiny", vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                    mlp_dim=64, video_dim=0, audio_dim=0, max_seq_len=64)
  return mllm.build(cfg)


def _batch(b: int = 2, length: int = 6, t: int = 3):
  rs = np.random.RandomState(0)
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  from merr1_jax import rollout
  from merr1_jax.models import base
  prompt = base.ModelInputs(tokens=rs.randint(1, 60, (b, length)).astype(np.int32), positions=pos.copy(),
                            mask=np.ones((b, length), bool))
  zeros = np.zeros((b, t), np.float32)
  ro = rollout.Rollout(prompt=prompt, completion=rs.randint(1, 60, (b, t)).astype(np.int32),
                       completion_mask=np.ones((b, t), bool), logp=zeros, logp_sampled=zeros,
                       stop_reason=np.zeros(b, np.int32), length=np.full(b, t), prompt_length=np.full(b, length),
                       steps=np.asarray(t), num_samples=1)
  segs = assembly.segments([ro], prompt, fast_prefix_ids=())
  return assembly.assemble(segs, prompt, rs.randn(b).astype(np.float32), [-rs.rand(b, 1, t).astype(np.float32)])


def test_state_from_load_hf_is_committed_like_its_params(tmp_path):
  model = _tiny()
  hf_io.save_hf(model.init_params(jax.random.key(0)), model.config, str(tmp_path), dtype="float32")
  params, report = hf_io.load_hf(str(tmp_path), model)
  assert report.clean
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, clip_norm=1.0), params)
  state = ts.init_state(params, tx, with_reference=True)
  leaves = jax.tree.leaves(state)
  assert all(a.committed for a in leaves), [a.shape for a in leaves if not a.committed]
  assert {a.sharding for a in leaves} == {jax.tree.leaves(params)[0].sharding}
  # A fresh, uncommitted init stays uncommitted (jax's default placement, nothing forced).
  fresh = ts.init_state(model.init_params(jax.random.key(1)), tx, with_reference=False)
  assert not any(a.committed for a in jax.tree.leaves(fresh))
  # Abstract parameters (settings.abstract_state) pass through.
  abstract = jax.eval_shape(lambda p: ts.init_state(p, tx, with_reference=True), params)
  assert jax.tree.leaves(abstract)[0].shape == ()


def test_rl_step_compiles_once_on_loaded_params(tmp_path):
  model = _tiny()
  hf_io.save_hf(model.init_params(jax.random.key(0)), model.config, str(tmp_path), dtype="float32")
  params, _ = hf_io.load_hf(str(tmp_path), model)
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, clip_norm=1.0), params)
  state = ts.init_state(params, tx, with_reference=True)
  step = ts.make_rl_step(model, tx, ts.StepConfig(loss=rl.LossConfig(kl_estimator="k3"), beta=0.04))
  batch = _batch()
  for _ in range(3):
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
  assert step._cache_size() == 1  # was 2: the first call's signature (uncommitted counters) differed
