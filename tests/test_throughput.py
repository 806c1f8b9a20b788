"""infra/throughput.py: FLOP and byte counts by hand, the grouped update's FLOPs against XLA's own count, the
per-step metrics, and the device peaks (from the config or the datasheet table, never guessed on a CPU)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rl
from merr1_jax.infra import throughput
from merr1_jax.models import base, mllm, presets
from merr1_jax.rollout import sampler
from merr1_jax.training import assembly, batch_loss
from merr1_jax.training import step as ts

# tiny at vocab 100: d 128, H 4, K 2, Dh 32, F 384, 2 layers. Matmul weights per layer: q, o 2 x 128 x 4 x 32 =
# 32768; k, v 2 x 128 x 2 x 32 = 16384; MLP 3 x 128 x 384 = 147456 -> 196608.
CFG = presets.get("tiny", vocab_size=100)
PER_LAYER = 196_608


def test_layer_weights_by_hand():
  assert throughput.layer_matmul_params(CFG) == PER_LAYER


def test_grouped_update_flops_by_hand_and_equal_to_ungrouped_with_one_row_per_prompt():
  p, length, rows, t = 2, 10, 6, 4  # 2 prompts of 10, 3 suffixes of 4 each
  decoder = 6 * 2 * PER_LAYER * (p * length + rows * t)
  attention = 6 * 2 * 128 * (p * length * length + rows * (2 * length * t + t * t))
  head = 6 * 128 * 100 * rows * t
  assert throughput.grouped_update_flops(CFG, p, length, [(rows, t)]) == decoder + attention + head
  # Two segments add up.
  two = throughput.grouped_update_flops(CFG, p, length, [(rows, t), (4, 2)])
  one = throughput.grouped_update_flops(CFG, p, length, [(rows, t)])
  assert two - one == 6 * 2 * PER_LAYER * 8 + 6 * 2 * 128 * 4 * (2 * length * 2 + 4) + 6 * 128 * 100 * 8
  # One suffix per prompt is the ungrouped layout: P sequences of S = L + T, the head on the T positions.
  assert throughput.grouped_update_flops(CFG, 3, 10, [(3, 5)]) == throughput.update_flops(CFG, 3, 15, 5)


def test_grouped_update_flops_match_xla_cost_analysis():
  """An independent count: XLA's cost analysis of the compiled grouped RL loss gradient (G = 4 suffixes per
  prompt). XLA also counts elementwise work and computes attention over full rectangles, so it sits a little
  above the model count; the ungrouped formula on the same rows (each prompt G times) would be far above it."""
  cfg = presets.get("tiny", vocab_size=2048, video_dim=0, audio_dim=0)
  model = mllm.build(cfg)
  params = model.init_params(jax.random.key(0))
  p, length, g, t = 2, 24, 4, 8
  rs = np.random.RandomState(0)
  prompt_tokens = rs.randint(10, 2000, (p, length)).astype(np.int32)
  prompt = base.ModelInputs(tokens=prompt_tokens, positions=np.broadcast_to(np.arange(length), (p, length)).copy(),
                            mask=np.ones((p, length), bool))
  comp = rs.randint(10, 2000, (p * g, t)).astype(np.int32)
  ro = sampler.Rollout(prompt=prompt, completion=comp, completion_mask=np.ones((p * g, t), bool),
                       logp=np.zeros((p * g, t), np.float32), logp_sampled=np.zeros((p * g, t), np.float32),
                       stop_reason=np.zeros(p * g, np.int32), length=np.full(p * g, t, np.int32),
                       prompt_length=np.full(p * g, length, np.int32), steps=np.int32(t), num_samples=g)
  segs = assembly.segments([ro], prompt, fast_prefix_ids=())
  batch = assembly.assemble(segs, prompt, rs.randn(p * g).astype(np.float32), [np.zeros((p * g, t), np.float32)])
  batch = jax.tree.map(jnp.asarray, batch)
  loss_fn = batch_loss.make_grouped_loss(model, ts.StepConfig(loss=rl.LossConfig(kl_estimator="k3"), beta=0.04))
  cost = jax.jit(jax.value_and_grad(lambda q: loss_fn(q, batch, 0.04)[0])).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  seg_t = batch.segments[0].tokens.shape[2]
  want = throughput.grouped_update_flops(cfg, p, length, [(p * g, seg_t)])
  assert 1.0 <= cost["flops"] / want < 1.1, (cost["flops"], want)
  assert cost["flops"] < 0.6 * throughput.update_flops(cfg, p * g, length + seg_t, seg_t)


def _xla_grouped_flops(cfg, p, length, g, t) -> tuple[float, int]:
  """(XLA's FLOP count of the compiled grouped RL loss gradient, the suffix length the batch got)."""
  model = mllm.build(cfg)
  params = model.init_params(jax.random.key(0))
  rs = np.random.RandomState(1)
  prompt = base.ModelInputs(tokens=rs.randint(1, 60, (p, length)).astype(np.int32),
                            positions=np.broadcast_to(np.arange(length, dtype=np.int32), (p, length)).copy(),
                            mask=np.ones((p, length), bool))
  ro = sampler.Rollout(prompt=prompt, completion=rs.randint(1, 60, (p * g, t)).astype(np.int32),
                       completion_mask=np.ones((p * g, t), bool), logp=np.zeros((p * g, t), np.float32),
                       logp_sampled=np.zeros((p * g, t), np.float32), stop_reason=np.zeros(p * g, np.int32),
                       length=np.full(p * g, t, np.int32), prompt_length=np.full(p * g, length, np.int32),
                       steps=np.int32(t), num_samples=g)
  segs = assembly.segments([ro], prompt, fast_prefix_ids=())
  batch = jax.tree.map(jnp.asarray, assembly.assemble(segs, prompt, rs.randn(p * g).astype(np.float32)))
  loss_fn = batch_loss.make_grouped_loss(model, ts.StepConfig(loss=rl.LossConfig(), beta=0.0))
  cost = jax.jit(jax.value_and_grad(lambda q: loss_fn(q, batch, 0.0)[0])).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"], batch.segments[0].tokens.shape[2]


def test_grouped_suffix_attention_term_against_xla():
  """The suffix attention term (2 L T + T^2 per row, causal) pinned where it matters: on a narrow model with a
  prompt as long as the completions, grow T from 64 to 128 and compare the growth of XLA's count with ours. XLA
  computes the full T x T block (our count takes its causal half, so XLA adds 6 N H Dh B x the growth of T^2)
  and a few FLOPs of softmax per score; the prompt's own work does not change with T (and XLA prunes part of
  it, which is why the whole count is not compared here). Counting L T instead of 2 L T would give 1.28, the
  full T x T in our count 0.86."""
  cfg = presets.get("tiny", vocab_size=64, d_model=32, mlp_dim=32, num_layers=1, video_dim=0, audio_dim=0)
  p, length, g = 1, 128, 4
  (x1, t1), (x2, t2) = (_xla_grouped_flops(cfg, p, length, g, t) for t in (64, 128))
  ours = (throughput.grouped_update_flops(cfg, p, length, [(p * g, t2)])
          - throughput.grouped_update_flops(cfg, p, length, [(p * g, t1)]))
  upper_triangle = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * p * g * (t2 ** 2 - t1 ** 2)
  assert 1.0 <= (x2 - x1) / (ours + upper_triangle) < 1.12, ((x2 - x1), ours, upper_triangle)  # measured 1.07


def test_prefill_and_decode_costs_by_hand():
  # Prefill: 2 prompts of 10: matmuls 2 x 2 layers x 196608 x 10, attention 2 x 2 x 128 x 100, one LM head row.
  assert throughput.prefill_flops(CFG, 2, 10) == 2 * (2 * 2 * PER_LAYER * 10 + 2 * 2 * 128 * 100 + 2 * 128 * 100)
  # Decode: 6 rows, 14 key slots each, 40 slots read in all (e.g. 2 prompts x 10 + 6 rows x ... ), float32 KV.
  flops, nbytes = throughput.decode_step_cost(CFG, 1000, 6, 14, 40, 4)
  assert flops == 2 * 6 * (2 * PER_LAYER + 128 * 100) + 4 * 2 * 128 * 6 * 14
  assert nbytes == 1000 + 2 * 2 * 2 * 32 * 4 * 40  # k and v, 2 layers, 2 KV heads of 32, 4 bytes, 40 slots


def test_rl_step_metrics_by_hand():
  prompt_mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)  # 3 and 4 real prompt tokens
  mask = np.ones((2, 2, 3), bool)
  mask[0, 1, 2] = False  # one suffix of 2 tokens
  loss = mask.copy()
  loss[:, :, 0] = False  # e.g. a fast prefix token: no loss
  m = throughput.rl_step_metrics(CFG, prompt_mask=prompt_mask, segments=[(mask, loss)], t_rollout=2.0, t_update=4.0,
                                 t_step=8.0, devices=2, param_bytes=1000)
  generated, train = loss.sum(), 2 * 3 + 2 * 4 + mask.sum()  # 7 generated; 14 prompt + 11 suffix tokens
  assert m["throughput/rollout_tokens_per_s_per_device"] == generated / 2.0 / 2
  assert m["throughput/train_tokens_per_s_per_device"] == train / 4.0 / 2
  assert m["throughput/tokens_per_s_per_device"] == train / 8.0 / 2
  flops = throughput.grouped_update_flops(CFG, 2, 4, [(4, 3)])
  assert m["throughput/update_tflops_per_device"] == pytest.approx(flops / 4.0 / 2 / 1e12)
  assert "throughput/update_mfu" not in m and "throughput/rollout_roofline_frac" not in m
  m = throughput.rl_step_metrics(CFG, prompt_mask=prompt_mask, segments=[(mask, loss)], t_rollout=2.0, t_update=4.0,
                                 t_step=8.0, devices=2, param_bytes=1000, decode_steps=3, peak_flops=1e9,
                                 peak_bandwidth=1e6)
  assert m["throughput/update_mfu"] == pytest.approx(flops / 4.0 / 2 / 1e9)
  step_flops, step_bytes = throughput.decode_step_cost(CFG, 1000, 4, 4 + 3, 2 * 4 + 4 * 3, 4)
  bound = throughput.prefill_flops(CFG, 2, 4) / 1e9 / 2 + 3 * max(step_flops / 1e9, step_bytes / 1e6) / 2
  assert m["throughput/rollout_roofline_frac"] == pytest.approx(bound / 2.0)


def test_device_peaks_from_the_table_or_the_config_never_for_a_cpu():
  gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
  assert throughput.device_peaks(gpu) == ("NVIDIA H100 80GB HBM3", 989.4e12, 3.35e12)
  pcie = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 PCIe")
  assert throughput.device_peaks(pcie)[1] == 756e12  # not the SXM part's figure
  cpu = jax.devices("cpu")[0]
  assert throughput.device_peaks(cpu)[1:] == (None, None)
  assert throughput.device_peaks(cpu, 1.5e11, 2e10)[1:] == (1.5e11, 2e10)
  log = types.SimpleNamespace(peak_flops=0.0, peak_bandwidth=3e10)
  assert throughput.peaks_from_config(log, gpu)[1:] == (989.4e12, 3e10)
  unknown = types.SimpleNamespace(platform="gpu", device_kind="Some Future Card")
  assert throughput.device_peaks(unknown)[1:] == (None, None)
