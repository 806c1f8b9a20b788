"""Throughput in the field's units: tokens/s per device, update MFU, and the rollout against its roofline.

Every RL step logs `throughput/*` (the trainer; docs/reliability.md lists the keys). Tokens/s per device follows
NeMo-RL: training tokens / time / devices, training tokens being each row's prompt + completion tokens (a row
counted whole, as an ungrouped stack processes it, so the figure compares across stacks even though our grouped
update computes each prompt once). MFU is the grouped update's model FLOPs (`grouped_update_flops`) / update
time / (devices x peak FLOP/s). The rollout roofline is the time generation would take at the device's bounds
(the prefill at peak FLOP/s, every decode step streaming the weights and the KV cache it reads at peak bandwidth)
over the measured time. The peaks come from the config (`log.peak_flops`, `log.peak_bandwidth`, per device) or
the datasheet table CARDS; a CPU has neither unless given (benchmarks/bounds.py measures both), and the two
ratios are then left out rather than guessed.

FLOP counts are model FLOPs (2 per multiply-add) of the matmuls: projections, MLP, the attention's QK^T and AV
(the causal half where the mask halves the work), the LM head where it runs; not norms, softmax, rematerialisation
or the optimizer (tests/test_benchmarks.py checks `update_flops` against XLA's cost analysis).

Shape legend: P prompts, L prompt tokens (the bucket), B rows, T completion tokens, S = L + T, N layers,
D d_model, H query heads, K kv heads, Dh head dim, F mlp width, V vocab.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) by device_kind substring: vendor datasheet figures (SXM
# parts where a card has several forms; the PCIe H100 is listed first because "H100" would match it too). TPU
# figures per chip.
CARDS = (
    ("H100 PCIe", 756e12, 2.0e12), ("H100", 989.4e12, 3.35e12), ("H200", 989.4e12, 4.8e12),
    ("H20", 148e12, 4.0e12), ("A100", 312e12, 2.04e12), ("L40S", 362e12, 0.864e12), ("L4", 121e12, 0.3e12),
    ("A10", 125e12, 0.6e12), ("B200", 2250e12, 8.0e12),
    ("TPU v5 lite", 197e12, 0.819e12), ("TPU v5p", 459e12, 2.765e12), ("TPU v6 lite", 918e12, 1.64e12),
    ("TPU v4", 275e12, 1.2e12),
)


def device_peaks(device, peak_flops: float = 0.0, peak_bandwidth: float = 0.0
                 ) -> tuple[str, float | None, float | None]:
  """(device kind, peak FLOP/s, bandwidth bytes/s) of one device: the given values where > 0, else the CARDS
  entry for an accelerator, else None (a CPU, an unknown card)."""
  kind = getattr(device, "device_kind", str(device))
  flops = bw = None
  if getattr(device, "platform", "cpu") != "cpu":
    for name, f, b in CARDS:
      if name.lower() in kind.lower():
        flops, bw = f, b
        break
  return kind, (peak_flops or flops) or None, (peak_bandwidth or bw) or None


def layer_matmul_params(cfg) -> int:
  """Weights one token multiplies in one decoder layer: q, k, v, o projections and the three MLP matrices."""
  d, h, kh, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  return d * h * dh * 2 + d * kh * dh * 2 + 3 * d * f


def update_flops(cfg, b: int, s: int, loss_positions: int | None = None) -> float:
  """Model FLOPs of one forward + backward over B whole sequences of S tokens (the ungrouped layout): 6 x matmul
  weights x layers per token; attention 6 x N x H x Dh x S per token (the causal half); the LM head 6 x D x V per
  loss position (S - 1 when every position is unembedded, T when only the completion is)."""
  n = s - 1 if loss_positions is None else loss_positions
  if not 0 <= n <= s - 1:
    raise ValueError(f"loss_positions={n} must be in [0, S - 1 = {s - 1}]")
  decoder = 6 * cfg.num_layers * layer_matmul_params(cfg) * s
  attn = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * s * s
  return float(b * (decoder + attn + 6 * cfg.d_model * cfg.vocab_size * n))


def grouped_update_flops(cfg, prompts: int, prompt_len: int, segments: Sequence[tuple[int, int]]) -> float:
  """Model FLOPs of one forward + backward of the grouped update (rollout/passes.py): the P prompts once, then
  each segment's (rows, T) suffixes, every suffix token attending to its prompt's L keys and causally to its own.

  Attention: a suffix token reads its prompt's L keys and on average T / 2 of its own, 12 N H Dh (L + T / 2)
  FLOPs forward and backward; a prompt token reads L / 2. With one row per prompt the total is `update_flops`'
  6 N H Dh S^2 (S = L + T). The LM head runs on the T completion positions of each row."""
  n, hd = cfg.num_layers, cfg.num_heads * cfg.head_dim
  tokens = prompts * prompt_len + sum(rows * t for rows, t in segments)
  decoder = 6 * n * layer_matmul_params(cfg) * tokens
  attn = 6 * n * hd * (prompts * prompt_len ** 2 + sum(rows * (2 * prompt_len * t + t * t) for rows, t in segments))
  head = 6 * cfg.d_model * cfg.vocab_size * sum(rows * t for rows, t in segments)
  return float(decoder + attn + head)


def prefill_flops(cfg, prompts: int, prompt_len: int) -> float:
  """Forward FLOPs of prefilling P prompts of L tokens (causal attention), unembedding the last position only."""
  n, hd = cfg.num_layers, cfg.num_heads * cfg.head_dim
  return float(prompts * (2 * n * layer_matmul_params(cfg) * prompt_len + 2 * n * hd * prompt_len ** 2
                          + 2 * cfg.d_model * cfg.vocab_size))


def kv_bytes(cfg, slots: int, itemsize: int) -> int:
  """Bytes of K and V for `slots` cache slots (all layers)."""
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize * slots


def decode_step_cost(cfg, param_bytes: int, rows: int, key_slots: int, read_slots: int,
                     itemsize: int) -> tuple[float, float]:
  """(FLOPs, bytes read) of one decode step: B rows each multiply every weight once and attend to `key_slots`
  slots (masked slots included: the step computes them); the weights and `read_slots` KV slots in all are read
  once (shared-prefix decoding: P L + B x suffix slots; a repeated cache: B x (L + T))."""
  n, hd = cfg.num_layers, cfg.num_heads * cfg.head_dim
  flops = 2 * rows * (n * layer_matmul_params(cfg) + cfg.d_model * cfg.vocab_size) + 4 * n * hd * rows * key_slots
  return float(flops), float(param_bytes + kv_bytes(cfg, read_slots, itemsize))


def rl_step_metrics(cfg, *, prompt_mask: np.ndarray, segments: Sequence[tuple[np.ndarray, np.ndarray]],
                    t_rollout: float, t_update: float, t_step: float, devices: int, param_bytes: int,
                    decode_steps: int | None = None, peak_flops: float | None = None,
                    peak_bandwidth: float | None = None, kv_itemsize: int = 4,
                    shared_decode: bool = True) -> dict[str, float]:
  """The `throughput/*` scalars of one RL step.

  prompt_mask: [P, L] the prompts as the update sees them; segments: per segment (mask [P, G, T] of real suffix
  tokens, loss_mask [P, G, T] of generated ones). Times in seconds; `devices` the number the step ran on.
  FLOPs are those of the padded shapes the step computes (bucketed prompts and completions).

  The roofline is the ideal split: every FLOP and every byte (weights and KV cache) divided evenly over the
  devices, as FSDP shards the weights; under pure data parallelism each device streams all the weights, so the
  true bound is higher and the fraction understates how close the rollout is to it. `shared_decode`: the decode
  cache holds the prompts once (else every row holds its prompt)."""
  mask = np.asarray(prompt_mask, bool)
  p, length = mask.shape
  prompt_real = mask.sum(1)
  generated = float(sum(np.asarray(lm).sum() for _, lm in segments))
  train_tokens = float(sum((prompt_real[:, None] + np.asarray(m).sum(-1)).sum() for m, _ in segments))
  per_dev = lambda x, t: x / max(t, 1e-9) / devices  # noqa: E731
  out = {"throughput/rollout_tokens_per_s_per_device": per_dev(generated, t_rollout),
         "throughput/train_tokens_per_s_per_device": per_dev(train_tokens, t_update),
         "throughput/tokens_per_s_per_device": per_dev(train_tokens, t_step)}
  shapes = [(int(np.prod(np.shape(m)[:2])), int(np.shape(m)[2])) for m, _ in segments]
  flops = grouped_update_flops(cfg, p, length, shapes)
  out["throughput/update_tflops_per_device"] = per_dev(flops, t_update) / 1e12
  if peak_flops:
    out["throughput/update_mfu"] = per_dev(flops, t_update) / peak_flops
  if peak_flops and peak_bandwidth and decode_steps:
    rows = sum(r for r, _ in shapes)
    suffix = max(t for _, t in shapes)
    read = p * length + rows * suffix if shared_decode else rows * (length + suffix)
    step_flops, step_bytes = decode_step_cost(cfg, param_bytes, rows, length + suffix, read, kv_itemsize)
    step_bound = max(step_flops / peak_flops, step_bytes / peak_bandwidth) / devices
    bound_s = prefill_flops(cfg, p, length) / peak_flops / devices + decode_steps * step_bound
    out["throughput/rollout_roofline_frac"] = bound_s / max(t_rollout, 1e-9)
  return out


def peaks_from_config(log_cfg: Mapping[str, Any] | Any, device) -> tuple[str, float | None, float | None]:
  """device_peaks with the config's log.peak_flops / log.peak_bandwidth (0: look the device up)."""
  return device_peaks(device, float(getattr(log_cfg, "peak_flops", 0.0) or 0.0),
                      float(getattr(log_cfg, "peak_bandwidth", 0.0) or 0.0))
