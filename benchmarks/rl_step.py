"""Our RL step, phase by phase: generation, reference log-probs, rewards + advantages, and the update.

One GRPO-style step as the trainer runs it, minus the MER-R1 extras (one mode, no calibration pass), so that a
regression in any phase shows up on its own line:
  generate  rollout.sample: P prompts x G samples, `new_tokens` each (no stop id: every row decodes exactly
            `new_tokens` tokens), temperature 1.0;
  ref       rollout.score with the frozen reference (teacher-forced, same shared-prefix structure);
  reward    completions -> rewards on the host, group z-score advantages (rl.group_zscore), batch assembly;
  update    train_step.make_rl_step: PPO-clip + beta * k3 KL, one AdamW update on the B full sequences.
Variants (all in one run, interleaved per repeat so load drift on a shared machine hits them alike):
  shared    the sampler prefills each prompt once and repeats the cache G times (the default);
  repeated  prompts repeated G times and sampled with num_samples=1 (what TRL, Tunix, R1-Omni do);
  mm        shared + video/audio features merged at placeholders (--mm_frames / --mm_audio per prompt).

On a GPU (the same flags; benchmarks/gpu.sh) it also reports, with the card's name: update-step MFU = model
FLOPs / (time x peak bf16 FLOP/s of the card), generation tokens/s against the memory-bandwidth bound (every
decode step reads all weights and the KV cache once), and peak device memory. On the CPU those read n/a.

  python benchmarks/rl_step.py [--presets tiny,small_20m] [--variants shared,repeated,mm] [--prompts 4]
      [--prompt_len 128] [--group 8] [--new_tokens 64] [--warmup 1] [--repeats 3] [--dtype float32|bfloat16]
      [--json out.json]

Shape legend: P prompts, G samples per prompt, B = P*G, L prompt length, T new tokens, S = L + T, V vocab,
D d_model, F video/audio feature width.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import optim, rl, rollout, sampling
from merr1_jax import train_step as ts
from merr1_jax.models import base, mllm, presets

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) by device_kind substring: vendor datasheet figures (SXM
# parts where a card has several forms; the PCIe H100 is listed separately because it is much lower).
CARDS = (
    ("H100 PCIe", 756e12, 2.0e12), ("H100", 989.4e12, 3.35e12), ("H200", 989.4e12, 4.8e12),
    ("H20", 148e12, 4.0e12), ("A100", 312e12, 2.04e12), ("L40S", 362e12, 0.864e12), ("L4", 121e12, 0.3e12),
    ("A10", 125e12, 0.6e12), ("B200", 2250e12, 8.0e12),
)


@dataclasses.dataclass(frozen=True)
class Work:
  prompts: int = 4
  prompt_len: int = 128
  group: int = 8
  new_tokens: int = 64
  temperature: float = 1.0
  beta: float = 0.04
  learning_rate: float = 1e-6
  shared_prefix: bool = True
  pad_id: int = 0


def token_reward(completion_BxT: np.ndarray) -> np.ndarray:
  """A cheap reward on ids when there is no tokenizer: the fraction of even ids (spreads within a group)."""
  return (completion_BxT % 2 == 0).mean(axis=1).astype(np.float32)


def random_inputs(cfg, work: Work, seed: int, *, frames: int = 0, audio: int = 0) -> base.ModelInputs:
  """P prompts of exactly L real tokens (ids away from the placeholders), 1-D or M-RoPE text positions; with
  frames/audio > 0, that many placeholders at the start of each prompt and random features for them."""
  rs = np.random.RandomState(seed)
  p, length = work.prompts, work.prompt_len
  hi = min(cfg.vocab_size - 16, 1 << 20)
  toks = rs.randint(16, hi, (p, length)).astype(np.int32)
  feats = {}
  if frames:
    toks[:, :frames] = cfg.video_token_id
    feats.update(video=rs.randn(p, frames, cfg.video_dim).astype(np.float32), video_mask=np.ones((p, frames), bool))
  if audio:
    toks[:, frames:frames + audio] = cfg.audio_token_id
    feats.update(audio=rs.randn(p, audio, cfg.audio_dim).astype(np.float32), audio_mask=np.ones((p, audio), bool))
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (p, length))
  if cfg.mrope_section is not None:
    pos = np.broadcast_to(pos[None], (3, p, length))
  return base.ModelInputs(tokens=toks, positions=np.ascontiguousarray(pos), mask=np.ones((p, length), bool), **feats)


def repeat_prompts(inputs: base.ModelInputs, g: int) -> base.ModelInputs:
  """Each prompt G times in a row (prompt p -> rows p*G .. p*G+G-1); 3-D positions repeat on axis 1."""
  def rep(name, a):
    if a is None:
      return None
    return np.repeat(np.asarray(a), g, axis=1 if name == "positions" and np.ndim(a) == 3 else 0)
  return base.ModelInputs(**{f.name: rep(f.name, getattr(inputs, f.name)) for f in dataclasses.fields(inputs)})


@jax.jit
def _assemble(prompt: base.ModelInputs, completion_BxT, comp_mask_BxT, ref_BxT, adv_B):
  """Rollout + reference log-probs -> the RLBatch of full sequences [B, L + T] (prompt rows repeated)."""
  b, t = completion_BxT.shape
  g = b // prompt.tokens.shape[0]
  rep = lambda a, axis=0: jnp.repeat(a, g, axis=axis)  # noqa: E731
  nxt_B = rep(rollout.next_positions(prompt.positions, prompt.mask))
  cpos_BxT = jnp.where(comp_mask_BxT, nxt_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None], 0)
  if prompt.positions.ndim == 3:
    positions = jnp.concatenate([rep(prompt.positions, 1), jnp.broadcast_to(cpos_BxT[None], (3, b, t))], 2)
  else:
    positions = jnp.concatenate([rep(prompt.positions), cpos_BxT], 1)
  zeros_BxL = jnp.zeros((b, prompt.tokens.shape[1]), jnp.float32)
  feats = {k: None if getattr(prompt, k) is None else rep(getattr(prompt, k))
           for k in ("video", "video_mask", "audio", "audio_mask")}
  inputs = base.ModelInputs(tokens=jnp.concatenate([rep(prompt.tokens), completion_BxT], 1),
                            positions=positions.astype(jnp.int32),
                            mask=jnp.concatenate([rep(prompt.mask), comp_mask_BxT], 1), **feats)
  return ts.RLBatch(inputs=inputs, completion_mask=jnp.concatenate([zeros_BxL > 0, comp_mask_BxT], 1),
                    advantages=adv_B, old_logp=None, ref_logp=jnp.concatenate([zeros_BxL, ref_BxT], 1),
                    loss_start=prompt.tokens.shape[1] - 1)  # as experience.collect: skip the prompt columns


class Runner:
  """Holds the train state and runs one timed RL step at a time (`step`)."""

  def __init__(self, model, params, work: Work, *, reward_fn: Callable[[np.ndarray], np.ndarray] = token_reward):
    self.model, self.work, self.reward_fn = model, work, reward_fn
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=work.learning_rate, clip_norm=1.0), params)
    self.state = ts.init_state(params, tx, with_reference=work.beta > 0)
    cfg = ts.StepConfig(loss=rl.LossConfig(kl_estimator="k3"), beta=work.beta)
    self.update = ts.make_rl_step(model, tx, cfg)
    self.method = sampling.Temperature(work.temperature)

  def step(self, inputs: base.ModelInputs, rng: jax.Array) -> dict[str, float]:
    w, g = self.work, self.work.group
    t0 = time.perf_counter()
    if w.shared_prefix:
      src, n = inputs, g
    else:
      src, n = repeat_prompts(inputs, g), 1
    # No stop id: every row decodes exactly new_tokens tokens (same work as the peers' forced length).
    ro = rollout.sample(self.model, self.state.params, src, mode="slow", num_samples=n,
                        max_new_tokens=w.new_tokens, method=self.method, stop_ids=(), rng=rng, pad_id=w.pad_id,
                        buckets=(inputs.tokens.shape[1],))
    jax.block_until_ready(ro.completion)
    t1 = time.perf_counter()
    ref = None
    if w.beta > 0:
      ref = rollout.score(self.model, ts.reference_params(self.state), ro).logp
      jax.block_until_ready(ref)
    t2 = time.perf_counter()
    r_B = self.reward_fn(np.asarray(ro.completion))
    adv_B = rl.group_zscore(jnp.asarray(r_B), jnp.ones(r_B.shape, bool), g)
    if ref is None:
      ref = jnp.zeros(ro.completion.shape, jnp.float32)
    batch = _assemble(ro.prompt, ro.completion, ro.completion_mask, ref, adv_B)
    jax.block_until_ready(batch)
    t3 = time.perf_counter()
    self.state, metrics = self.update(self.state, batch)
    jax.block_until_ready(metrics["loss"])
    t4 = time.perf_counter()
    return dict(step_s=t4 - t0, gen_s=t1 - t0, ref_s=t2 - t1, reward_s=t3 - t2, score_s=t3 - t1, update_s=t4 - t3,
                gen_tokens=float(np.asarray(ro.length).sum()), loss=float(metrics["loss"]),
                reward_mean=float(r_B.mean()), seq_len=float(batch.inputs.tokens.shape[1]))


# --------------------------------------------------------------------------------------- GPU accounting


def card(device) -> tuple[str, float | None, float | None]:
  """(device kind, peak bf16 FLOP/s, HBM bytes/s); None where unknown (the CPU)."""
  kind = getattr(device, "device_kind", str(device))
  if device.platform != "gpu" and device.platform != "cuda":
    return kind, None, None
  for name, flops, bw in CARDS:
    if name.lower() in kind.lower():
      return kind, flops, bw
  return kind, None, None


def update_flops(cfg, b: int, s: int) -> float:
  """Model FLOPs of one forward+backward on B sequences of S tokens: 6 x matmul params per token (the tied or
  separate LM head included, the embedding lookup not) + causal attention 6 x layers x H x Dh x S per token
  (QK^T and AV, forward 2 x 2 x S/2 x H x Dh, backward twice that). Rematerialisation is not counted (MFU)."""
  d, h, kh, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = d * h * dh * 2 + d * kh * dh * 2 + 3 * d * f
  matmul = cfg.num_layers * per_layer + d * cfg.vocab_size
  attn = 6 * cfg.num_layers * h * dh * s
  return float(b * s * (6 * matmul + attn))


def decode_bound_tok_s(cfg, params, b: int, s: int, bw: float) -> float:
  """Tokens/s if every decode step only streamed the weights and a full KV cache from HBM once."""
  w_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
  kv_bytes = 2 * cfg.num_layers * b * s * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize
  return b * bw / (w_bytes + kv_bytes)


def peak_device_bytes(device) -> float | None:
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - the CPU client has no memory stats on some versions
    return None
  return stats.get("peak_bytes_in_use")


# ------------------------------------------------------------------------------------------------- main


def build(name: str, dtype: str, mm: bool):
  """The preset as the benchmark runs it: text-only presets get no projectors unless mm is asked for."""
  over: dict[str, Any] = dict(param_dtype=dtype, compute_dtype=dtype)
  cfg = presets.get(name, **over)
  if not mm and (cfg.video_dim or cfg.audio_dim) and cfg.projector == "mlp":
    cfg = cfg.replace(video_dim=0, audio_dim=0)
  if mm and not (cfg.video_dim and cfg.audio_dim):
    raise ValueError(f"preset {name!r} has no video/audio projector: it cannot run the 'mm' variant")
  return mllm.build(cfg)


def run_preset(name: str, variants: list[str], work: Work, args) -> list[dict]:
  runners, inputs = {}, {}
  for v in variants:
    if v not in ("shared", "repeated", "mm"):
      raise ValueError(f"unknown variant {v!r}: expected shared, repeated or mm")
    model = build(name, args.dtype, v == "mm")
    params = model.init_params(jax.random.key(0))
    runners[v] = Runner(model, params, dataclasses.replace(work, shared_prefix=v != "repeated"))
    inputs[v] = random_inputs(model.config, work, seed=1, frames=args.mm_frames if v == "mm" else 0,
                              audio=args.mm_audio if v == "mm" else 0)
  times = {v: [] for v in variants}
  for i in range(args.warmup + args.repeats):
    for v in variants:  # interleaved: a load change on a shared machine hits every variant alike
      times[v].append(runners[v].step(inputs[v], jax.random.key(100 + i)))
  dev = jax.devices()[0]
  kind, peak, bw = card(dev)
  rows = []
  for v in variants:
    timed = times[v][args.warmup:]
    med = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
    cfg = runners[v].model.config
    b, s = work.prompts * work.group, int(med["seq_len"])
    row = dict(preset=name, variant=v, device=kind, dtype=args.dtype,
               params=int(sum(a.size for a in jax.tree.leaves(runners[v].state.params))),
               median=med, min_step_s=min(t["step_s"] for t in timed), max_step_s=max(t["step_s"] for t in timed),
               gen_tok_s=med["gen_tokens"] / med["gen_s"])
    if peak:
      row["update_mfu"] = update_flops(cfg, b, s) / med["update_s"] / peak
    if bw:
      bound = decode_bound_tok_s(cfg, runners[v].state.params, b, s, bw)
      row.update(decode_bound_tok_s=bound, gen_vs_bound=row["gen_tok_s"] / bound)
    pk = peak_device_bytes(dev)
    row["peak_device_gib"] = None if pk is None else pk / 2**30
    rows.append(row)
  return rows


def _fmt(row: dict) -> str:
  m = row["median"]
  extra = ""
  if "update_mfu" in row:
    extra += f"  MFU {100 * row['update_mfu']:.1f}%"
  if "gen_vs_bound" in row:
    extra += f"  gen {row['gen_tok_s']:.0f} tok/s = {100 * row['gen_vs_bound']:.1f}% of bound"
  if row.get("peak_device_gib") is not None:
    extra += f"  peak {row['peak_device_gib']:.1f} GiB"
  return (f"| {row['preset']} | {row['variant']} | {row['params'] / 1e6:.1f}M | {m['step_s'] * 1e3:.0f} "
          f"| {m['gen_s'] * 1e3:.0f} | {m['ref_s'] * 1e3:.0f} | {m['reward_s'] * 1e3:.0f} | {m['update_s'] * 1e3:.0f} "
          f"| {row['gen_tok_s']:.0f} | {row['device']}{extra} |")


HEADER = ("| preset | variant | params | step ms | generate ms | ref ms | reward+adv ms | update ms | gen tok/s "
          "| device |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--presets", default="tiny,small_20m")
  ap.add_argument("--variants", default="shared,repeated,mm")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--mm_frames", type=int, default=16, help="video placeholders per prompt in the mm variant")
  ap.add_argument("--mm_audio", type=int, default=16, help="audio placeholders per prompt in the mm variant")
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--json", default=None, help="also write the rows here")
  args = ap.parse_args(argv)
  if args.mm_frames + args.mm_audio >= args.prompt_len:
    raise ValueError(f"--mm_frames + --mm_audio ({args.mm_frames + args.mm_audio}) must leave text in a "
                     f"--prompt_len {args.prompt_len} prompt")
  work = Work(prompts=args.prompts, prompt_len=args.prompt_len, group=args.group, new_tokens=args.new_tokens)
  dev = jax.devices()[0]
  print(f"# {card(dev)[0]} ({dev.platform}), {os.cpu_count()} host cores, load {os.getloadavg()[0]:.1f}, "
        f"jax {jax.__version__}, {platform.python_version()}, {time.strftime('%Y-%m-%d')}; P={args.prompts} "
        f"L={args.prompt_len} G={args.group} T={args.new_tokens} {args.dtype}; median of {args.repeats} after "
        f"{args.warmup} warm-up", flush=True)
  print(HEADER, flush=True)
  rows = []
  for name in args.presets.split(","):
    for row in run_preset(name, args.variants.split(","), work, args):
      print(_fmt(row), flush=True)
      rows.append(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
