"""Our RL step, phase by phase: generation, reference log-probs, rewards + advantages, and the update.

One GRPO-style step as the trainer runs it, minus the MER-R1 extras (one mode, no calibration pass), so that a
regression in any phase shows up on its own line:
  generate  rollout.sample: P prompts x G samples, `new_tokens` each (no stop id: every row decodes exactly
            `new_tokens` tokens), temperature 1.0; split into the prompt prefill and the decode loop (the
            prefill is timed again on its own after the step, outside the step time, and decode = generate -
            prefill);
  ref       grouped.score_pass with the frozen reference (teacher-forced, each prompt once);
  reward    completions -> rewards on the host, group z-score advantages (rl.group_zscore), batch assembly;
  update    train_step.make_rl_step: PPO-clip + beta * k3 KL, one AdamW update on the prefix-grouped batch (each
            prompt once, its completions as suffixes: assembly.assemble, as the trainer builds it).
Variants (all in one run, interleaved per repeat so load drift on a shared machine hits them alike):
  shared    the sampler prefills each prompt once and repeats the cache G times (the default);
  repeated  prompts repeated G times and sampled with num_samples=1 (what TRL, Tunix, R1-Omni do);
  mm        shared + video/audio features merged at placeholders (--mm_frames / --mm_audio per prompt);

--breakdown times the update's parts in isolation instead (no generation), for the same work shape, each one
jitted call, median over --repeats after --warmup:
  hidden          decoder forward + backward of the hidden states only (P prompts + B suffixes, grouped);
  hidden+logp     + the log-prob path the RL loss uses (grouped.grouped_logprobs: the LM head on the T completion
                  positions, log-softmax, entropy without gradient);
  loss            the whole RL loss's value and gradient (batch_loss.make_grouped_loss: + PPO-clip and the k3 KL);
  update          the whole make_rl_step update (+ gradient clipping and AdamW, state donated);
  hidden/noattn, update/noattn  the same with attention replaced by the identity (qwen2.attention returns q), so
                  the difference is what attention costs (the numbers mean nothing else: the model is broken).

On a GPU (benchmarks/gpu.sh) it also reports, with the card's name: update-step MFU = the grouped update's model
FLOPs (infra/throughput.grouped_update_flops) / (update time x peak bf16 FLOP/s of the card); decode tokens/s
(decode-only time and tokens, the prefill excluded) against the memory-bandwidth bound (every decode step streams
all weights and the KV cache it attends to once: the prompts' slots once per prompt plus every row's suffix
slots with shared-prefix decoding, every row's L + T slots with a repeated cache; masked slots are read too);
and peak device memory (memory_stats' high-water mark, a process-wide figure: its scope says how many variants'
states were alive, and gpu.sh runs one preset and variant per process so that it is that variant's own). On the
CPU those read n/a; --bounds states the update and the decode step against this machine's own measured matmul
rate and bandwidth instead (benchmarks/bounds.py). --fast_group adds the fast mode as the MER step samples it
(both modes in one loop), --attention picks the attention kernels (ModelConfig.attention; a comma list runs
each, interleaved with the variants).

  python benchmarks/rl_step.py [--presets tiny,small_20m] [--variants shared,repeated,mm] [--prompts 4]
      [--prompt_len 128] [--group 8] [--new_tokens 64] [--warmup 1] [--repeats 3] [--dtype float32|bfloat16]
      [--fast_group 0] [--fast_new_tokens 16] [--attention reference,blocked,xla,cudnn] [--bounds] [--breakdown]
      [--json out.json]

Shape legend: P prompts, G samples per prompt, B = P*G, L prompt length, T new tokens, S = L + T, V vocab,
D d_model, F video/audio feature width.
"""

from __future__ import annotations

import argparse
import contextlib
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

from merr1_jax import rl, rollout
from merr1_jax.infra import sharding, throughput
from merr1_jax.models import base, layers, mllm, presets, qwen2
from merr1_jax.rollout import passes as grouped
from merr1_jax.rollout import sampling
from merr1_jax.training import assembly, batch_loss
from merr1_jax.training import optimizer as optim
from merr1_jax.training import step as ts

@dataclasses.dataclass(frozen=True)
class Work:
  """One step's shape. `group` slow completions of `new_tokens` per prompt and, with fast_group > 0, as the MER-R1
  trainer samples them, fast_group more of fast_new_tokens in the fast mode: a second rollout whose prompts end
  with FAST_PREFIX (fast_prefix_ids) and which may not write the think tags (fast_ban_ids). The advantage groups
  hold all of a prompt's completions, both modes together (rl.group = 'prompt')."""

  prompts: int = 4
  prompt_len: int = 128
  group: int = 8
  new_tokens: int = 64
  temperature: float = 1.0
  beta: float = 0.04
  learning_rate: float = 1e-6
  shared_prefix: bool = True
  pad_id: int = 0
  fast_group: int = 0
  fast_new_tokens: int = 16
  fast_prefix_ids: tuple[int, ...] = (7, 8, 9)  # any ids do for random prompts; ours_grpo.py gives the real ones
  fast_ban_ids: tuple[int, ...] = ()

  @property
  def modes(self) -> tuple[tuple[str, int, int], ...]:
    """(mode, completions per prompt, new tokens) in rollout order: slow first, as experience.collect samples."""
    slow = (("slow", self.group, self.new_tokens),)
    return slow + ((("fast", self.fast_group, self.fast_new_tokens),) if self.fast_group else ())

  @property
  def total_group(self) -> int:
    return self.group + self.fast_group


def token_reward(completion_BxT: np.ndarray) -> np.ndarray:
  """A cheap reward on ids when there is no tokenizer: the fraction of even ids (spreads within a group)."""
  return (completion_BxT % 2 == 0).mean(axis=1).astype(np.float32)


def place_features(toks_PxL: np.ndarray, cfg, frames: int, audio: int, rs) -> dict:
  """Turns the first `frames` then `audio` positions of every prompt into placeholders (in place) and returns
  random features for them, as ModelInputs fields (none when both are 0)."""
  p = toks_PxL.shape[0]
  feats = {}
  if frames:
    toks_PxL[:, :frames] = cfg.video_token_id
    feats.update(video=rs.randn(p, frames, cfg.video_dim).astype(np.float32), video_mask=np.ones((p, frames), bool))
  if audio:
    toks_PxL[:, frames:frames + audio] = cfg.audio_token_id
    feats.update(audio=rs.randn(p, audio, cfg.audio_dim).astype(np.float32), audio_mask=np.ones((p, audio), bool))
  return feats


def random_inputs(cfg, work: Work, seed: int, *, frames: int = 0, audio: int = 0) -> base.ModelInputs:
  """P prompts of exactly L real tokens (ids away from the placeholders), 1-D or M-RoPE text positions; with
  frames/audio > 0, that many placeholders at the start of each prompt and random features for them."""
  rs = np.random.RandomState(seed)
  p, length = work.prompts, work.prompt_len
  hi = min(cfg.vocab_size - 16, 1 << 20)
  toks = rs.randint(16, hi, (p, length)).astype(np.int32)
  feats = place_features(toks, cfg, frames, audio, rs)
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (p, length))
  if cfg.mrope_section is not None:
    pos = np.broadcast_to(pos[..., None], (p, length, 3))
  return base.ModelInputs(tokens=toks, positions=np.ascontiguousarray(pos), mask=np.ones((p, length), bool), **feats)


def repeat_prompts(inputs: base.ModelInputs, g: int) -> base.ModelInputs:
  """Each prompt G times in a row (prompt p -> rows p*G .. p*G+G-1); every array is batch-major."""
  return jax.tree.map(lambda a: np.repeat(np.asarray(a), g, axis=0), inputs)


def synthetic_rollout(cfg, work: Work, rs: np.random.RandomState) -> rollout.Rollout:
  """A host Rollout of random completions of exactly T tokens for P random prompts x G (the update's cost does
  not depend on the token values)."""
  b, t = work.prompts * work.group, work.new_tokens
  comp = rs.randint(16, min(cfg.vocab_size - 16, 1 << 20), (b, t)).astype(np.int32)
  zeros = np.zeros((b, t), np.float32)
  return rollout.Rollout(prompt=random_inputs(cfg, work, seed=1), completion=comp,
                         completion_mask=np.ones((b, t), bool),
                         logp=zeros, logp_sampled=zeros, stop_reason=np.zeros(b, np.int32), length=np.full(b, t),
                         prompt_length=np.full(b, work.prompt_len), steps=np.asarray(t), num_samples=work.group)


class Runner:
  """Holds the train state and runs one timed RL step at a time (`step`).

  split_decode: after each step (outside its timing) run the prompt prefill alone once more, so that the
  generation time splits into prefill and decode; off for the peer comparison, whose step time is wall clock
  from step end to step end (benchmarks/peers/spec.py) and must not include the extra prefill."""

  def __init__(self, model, params, work: Work, *, reward_fn: Callable[[np.ndarray], np.ndarray] = token_reward,
               split_decode: bool = False):
    self.model, self.work, self.reward_fn, self.split_decode = model, work, reward_fn, split_decode
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=work.learning_rate, clip_norm=1.0), params)
    self.state = ts.init_state(params, tx, with_reference=work.beta > 0)
    cfg = ts.StepConfig(loss=rl.LossConfig(kl_estimator="k3"), beta=work.beta)
    self.update = ts.make_rl_step(model, tx, cfg)
    self.method = sampling.Temperature(work.temperature)

  def step(self, inputs: base.ModelInputs, rng: jax.Array) -> dict[str, float]:
    w, g = self.work, self.work.group
    if w.fast_group and not w.shared_prefix:
      raise ValueError("fast_group > 0 needs shared_prefix=True (each mode's rollout prefills its prompts once)")
    t0 = time.perf_counter()
    if w.shared_prefix:
      src, n = inputs, g
    else:
      src, n = repeat_prompts(inputs, g), 1
    length = inputs.tokens.shape[1]
    # No stop id: every row decodes exactly its mode's tokens (same work as the peers' forced length). The first
    # mode takes the step's key itself, so a slow-only step draws what it always drew. Both modes: one prefill and
    # one decode loop (rollout.sample_modes), as the trainer samples them.
    kw = {mode: dict(num_samples=n_mode if mode == "fast" else n, max_new_tokens=t_mode, stop_ids=(),
                     rng=jax.random.fold_in(rng, i) if i else rng, pad_id=w.pad_id,
                     ban_ids=w.fast_ban_ids if mode == "fast" else (), fast_prefix_ids=w.fast_prefix_ids)
          for i, (mode, n_mode, t_mode) in enumerate(w.modes)}
    ros = list(rollout.sample_modes(self.model, self.state.params, src, modes=kw, method=self.method,
                                    buckets=(length, length + len(w.fast_prefix_ids))).values())
    jax.block_until_ready([ro.completion for ro in ros])
    t1 = time.perf_counter()
    ros = [sharding.to_host(ro) for ro in ros]
    prompt = ros[0].prompt  # slow-rendered: the grouped layout's shared prefix (a fast suffix carries the prefix)
    refs = None
    segs = assembly.segments(ros, prompt, fast_prefix_ids=w.fast_prefix_ids)
    if w.beta > 0:
      outs = grouped.score_pass(self.model, ts.reference_params(self.state), prompt, segs)
      refs = [np.asarray(o["logp"]) for o in outs]
    t2 = time.perf_counter()
    r_B = np.concatenate([self.reward_fn(ro.completion) for ro in ros])
    if len(ros) == 1:
      groups = rl.contiguous_groups(len(r_B), g)
    else:  # rollout order (the slow block, then the fast block): each row's prompt is its group
      groups = np.concatenate([ro.prompt_index for ro in ros]).astype(np.int32)
    adv_B = np.asarray(rl.group_zscore(jnp.asarray(r_B), jnp.ones(r_B.shape, bool), groups, len(r_B) // w.total_group,
                                       group_size=w.total_group))
    batch = assembly.assemble(segs, prompt, adv_B, refs)  # the trainer's own assembly
    t3 = time.perf_counter()
    self.state, metrics = self.update(self.state, batch)
    jax.block_until_ready(metrics["loss"])
    t4 = time.perf_counter()
    rows = sum(ro.completion.shape[0] for ro in ros)
    s = max(ro.prompt.tokens.shape[1] + ro.completion.shape[1] for ro in ros)
    cfg, (p_rows, length) = self.model.config, prompt.tokens.shape
    shared = rollout.shared_prefix.supports_shared_decode(self.model, None)
    k = len(w.fast_prefix_ids) if w.fast_group else 0
    suffix = k + max(t for _, _, t in w.modes)  # the joint loop's per-row cache (rollout/modes.py)
    # One decode step reads the weights and the KV cache: the prompts once plus every row's suffix slots (shared
    # decoding), or every row's whole L + T slots (a repeated cache).
    key_slots = length + suffix
    read_slots = p_rows * length + rows * suffix if shared else rows * key_slots
    step_flops, step_bytes = throughput.decode_step_cost(cfg, tree_bytes(self.state.params), rows, key_slots,
                                                         read_slots, jnp.dtype(cfg.compute_dtype).itemsize)
    out = dict(step_s=t4 - t0, gen_s=t1 - t0, ref_s=t2 - t1, reward_s=t3 - t2, score_s=t3 - t1, update_s=t4 - t3,
               gen_tokens=float(sum(np.asarray(ro.length).sum() for ro in ros)), loss=float(metrics["loss"]),
               reward_mean=float(r_B.mean()), seq_len=float(s), rows=float(rows),
               loss_positions=float(max(ro.completion.shape[1] for ro in ros)),
               decode_steps=float(max(np.asarray(ro.steps) for ro in ros)),  # one loop for both modes
               update_flops_grouped=throughput.grouped_update_flops(
                   cfg, batch.prompt.tokens.shape[0], batch.prompt.tokens.shape[1],
                   [(int(np.prod(sg.tokens.shape[:2])), sg.tokens.shape[2]) for sg in batch.segments]),
               decode_step_flops=step_flops, decode_step_bytes=step_bytes)
    if self.split_decode:
      # The same compiled prefill as inside the sampler (same statics, same bucketed prompt), timed alone.
      t5 = time.perf_counter()
      if w.fast_group:
        counts = tuple(g_m for _, g_m, _ in w.modes)
        jax.block_until_ready(rollout.modes.prefill_modes(
            self.model, counts, tuple(m == "fast" for m, _, _ in w.modes), tuple(w.fast_prefix_ids), suffix,
            w.pad_id, None, self.state.params, jax.tree.map(jnp.asarray, prompt)))
      else:
        jax.block_until_ready(rollout.prefill(self.model, n, length + w.new_tokens, None, self.state.params,
                                              jax.tree.map(jnp.asarray, prompt), shared))
      prefill_s = time.perf_counter() - t5
      # The decode loop samples token 0 from the prefill logits, then runs one-token forwards.
      out.update(prefill_s=prefill_s, decode_s=max(out["gen_s"] - prefill_s, 1e-9),
                 decode_tokens=out["gen_tokens"] - rows)
    return out


# --------------------------------------------------------------------------------------- GPU accounting


def card(device) -> tuple[str, float | None, float | None]:
  """(device kind, peak bf16 FLOP/s, HBM bytes/s); None where unknown (the CPU): infra/throughput.py's table."""
  return throughput.device_peaks(device)


update_flops = throughput.update_flops  # the ungrouped count (tests/test_benchmarks.py checks it against XLA)


def decode_bound_tok_s(rows: int, step_bytes: float, bw: float) -> float:
  """Decode tokens/s if every decode step (one token for each of the rows) only streamed the `step_bytes` it
  reads (all weights and the KV cache it attends to: Runner.step's decode_step_bytes) from HBM once."""
  return rows * bw / step_bytes


def peak_device_bytes(device) -> float | None:
  """memory_stats' process-wide high-water mark (never reset), or None where the backend has none."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # noqa: BLE001 - the CPU client has no memory stats on some versions
    return None
  return stats.get("peak_bytes_in_use")


def tree_bytes(tree) -> int:
  return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype")))


# ------------------------------------------------------------------------------------------------- main


def build(name: str, dtype: str, mm: bool, attention: str = "reference"):
  """The preset as the benchmark runs it: text-only presets get no projectors unless mm is asked for."""
  over: dict[str, Any] = dict(param_dtype=dtype, compute_dtype=dtype, attention=attention)
  cfg = presets.get(name, **over)
  if not mm and (cfg.video_dim or cfg.audio_dim) and cfg.projector == "mlp":
    cfg = cfg.replace(video_dim=0, audio_dim=0)
  if mm and not (cfg.video_dim and cfg.audio_dim):
    raise ValueError(f"preset {name!r} has no video/audio projector: it cannot run the 'mm' variant")
  return mllm.build(cfg)


VARIANTS = ("shared", "repeated", "mm")
_VARIANTS_ALIVE = [0]  # train states built in this process so far (the scope of the peak memory figure)


def attention_kinds(spec: str) -> list[str]:
  """--attention's comma list, checked, each kind once."""
  kinds = list(dict.fromkeys(k for k in spec.split(",") if k))
  bad = [k for k in kinds if k not in layers.ATTENTION_KINDS]
  if bad or not kinds:
    raise ValueError(f"--attention: unknown {bad or spec!r}; expected some of {','.join(layers.ATTENTION_KINDS)}")
  return kinds


def run_preset(name: str, variants: list[str], work: Work, args, bounds: dict | None = None) -> list[dict]:
  runners, inputs = {}, {}
  keys = [(v, a) for v in variants for a in attention_kinds(args.attention)]
  for v, a in keys:
    if v not in VARIANTS:
      raise ValueError(f"unknown variant {v!r}: expected one of {', '.join(VARIANTS)}")
    mm = v.startswith("mm")
    model = build(name, args.dtype, mm, a)
    params = model.init_params(jax.random.key(0))
    runners[v, a] = Runner(model, params, dataclasses.replace(work, shared_prefix=v != "repeated"),
                           split_decode=True)
    inputs[v, a] = random_inputs(model.config, work, seed=1, frames=args.mm_frames if mm else 0,
                                 audio=args.mm_audio if mm else 0)
    _VARIANTS_ALIVE[0] += 1
  times = {k: [] for k in keys}
  for i in range(args.warmup + args.repeats):
    for k in keys:  # interleaved: a load change on a shared machine hits every variant and kernel alike
      times[k].append(runners[k].step(inputs[k], jax.random.key(100 + i)))
  dev = jax.devices()[0]
  kind, peak, bw = card(dev)
  pk = peak_device_bytes(dev)
  scope = ("this variant alone" if _VARIANTS_ALIVE[0] == 1 else
           f"process-wide: {_VARIANTS_ALIVE[0]} train states built in this process (run one preset and variant "
           "per process for a per-variant figure, as gpu.sh does)")
  rows = []
  for v, a in keys:
    timed = times[v, a][args.warmup:]
    med = {k: statistics.median(t[k] for t in timed) for k in timed[0]}
    cfg = runners[v, a].model.config
    b, s = int(med["rows"]), int(med["seq_len"])
    row = dict(preset=name, variant=v, device=kind, dtype=args.dtype, attention=a,
               params=int(sum(x.size for x in jax.tree.leaves(runners[v, a].state.params))),
               median=med, min_step_s=min(t["step_s"] for t in timed), max_step_s=max(t["step_s"] for t in timed),
               gen_tok_s=med["gen_tokens"] / med["gen_s"], decode_tok_s=med["decode_tokens"] / med["decode_s"],
               update_flops=med["update_flops_grouped"],  # the grouped update's own work (prompt once)
               update_flops_ungrouped=update_flops(cfg, b, s, int(med["loss_positions"])),
               state_gib=tree_bytes(runners[v, a].state) / 2**30)
    if bounds is not None:  # this machine's own bounds, measured in this run (benchmarks/bounds.py)
      rate, bw_m = bounds["matmul_flops_s"], bounds["bandwidth_bytes_s"]
      step_bound = max(med["decode_step_flops"] / rate, med["decode_step_bytes"] / bw_m)
      row.update(update_flops_s=med["update_flops_grouped"] / med["update_s"],
                 update_vs_matmul_rate=med["update_flops_grouped"] / med["update_s"] / rate,
                 decode_step_s=med["decode_s"] / max(med["decode_steps"] - 1, 1), decode_step_bound_s=step_bound,
                 decode_binding="memory" if med["decode_step_bytes"] / bw_m >= med["decode_step_flops"] / rate
                 else "compute")
      row["decode_vs_machine_bound"] = row["decode_step_s"] / step_bound
    if peak:
      row["update_mfu"] = row["update_flops"] / med["update_s"] / peak
    if bw:
      bound = decode_bound_tok_s(b, med["decode_step_bytes"], bw)
      row.update(decode_bound_tok_s=bound, decode_vs_bound=row["decode_tok_s"] / bound)
    row["peak_device_gib"] = None if pk is None else pk / 2**30
    row["peak_device_scope"] = scope
    rows.append(row)
  return rows


def _fmt(row: dict) -> str:
  m = row["median"]
  extra = ""
  if "update_mfu" in row:
    extra += f"  MFU {100 * row['update_mfu']:.1f}%"
  if "update_vs_matmul_rate" in row:
    extra += (f"  update {row['update_flops_s'] / 1e9:.0f} GFLOP/s = {100 * row['update_vs_matmul_rate']:.0f}% of "
              f"the matmul rate; decode step {row['decode_step_s'] * 1e3:.1f} ms = "
              f"{row['decode_vs_machine_bound']:.1f}x its {row['decode_binding']} bound")
  if "decode_vs_bound" in row:
    extra += f"  decode {row['decode_tok_s']:.0f} tok/s = {100 * row['decode_vs_bound']:.1f}% of bound"
  if row.get("peak_device_gib") is not None:
    extra += f"  peak {row['peak_device_gib']:.1f} GiB ({row['peak_device_scope']})"
  variant = row["variant"] + ("" if row.get("attention", "reference") == "reference" else f" ({row['attention']})")
  return (f"| {row['preset']} | {variant} | {row['params'] / 1e6:.1f}M | {m['step_s'] * 1e3:.0f} "
          f"| {m['gen_s'] * 1e3:.0f} | {m['prefill_s'] * 1e3:.0f} | {m['decode_s'] * 1e3:.0f} "
          f"| {m['ref_s'] * 1e3:.0f} | {m['reward_s'] * 1e3:.0f} | {m['update_s'] * 1e3:.0f} "
          f"| {row['gen_tok_s']:.0f} | {row['decode_tok_s']:.0f} | {row['device']}{extra} |")


HEADER = ("| preset | variant | params | step ms | generate ms | (prefill ms) | (decode ms) | ref ms | reward+adv ms "
          "| update ms | gen tok/s | decode tok/s | device |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


# -------------------------------------------------------------------------------------------- breakdown

BREAKDOWN_PARTS = ("hidden", "hidden+logp", "loss", "update", "hidden/noattn", "update/noattn")


@contextlib.contextmanager
def attention_as_identity():
  """The decoder's attention functions (qwen2.attention for the prompt, qwen2.attention_grouped for the suffixes)
  -> q while active (trace inside it): the decoder without attention, for timing only."""
  real = qwen2.attention, qwen2.attention_grouped
  qwen2.attention = lambda kind, q, *_, **__: q
  qwen2.attention_grouped = lambda kind, q, *_: q
  try:
    yield
  finally:
    qwen2.attention, qwen2.attention_grouped = real


def _median_s(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float, float]:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), min(times), max(times)


def breakdown(name: str, work: Work, args, attention: str = "reference") -> dict:
  """The update's parts timed in isolation on the work shape (BREAKDOWN_PARTS; random completions: the cost of
  an update does not depend on the token values)."""
  model = build(name, args.dtype, False, attention)
  cfg = model.config
  params = model.init_params(jax.random.key(0))
  b, t = work.prompts * work.group, work.new_tokens
  rs = np.random.RandomState(2)
  ro = synthetic_rollout(cfg, work, rs)
  segs = assembly.segments([ro], ro.prompt, fast_prefix_ids=())
  batch = assembly.assemble(segs, ro.prompt, rs.randn(b).astype(np.float32),
                            [-rs.rand(work.prompts, work.group, t).astype(np.float32)])
  batch = jax.tree.map(jnp.asarray, batch)
  step_cfg = ts.StepConfig(loss=rl.LossConfig(kl_estimator="k3"), beta=work.beta)
  s = work.prompt_len + t
  ct = [jnp.asarray(rs.randn(work.prompts, work.prompt_len, cfg.d_model), cfg.jnp_compute_dtype),
        jnp.asarray(rs.randn(work.prompts, work.group, t, cfg.d_model), cfg.jnp_compute_dtype)]
  mask = batch.segments[0].loss_mask.astype(jnp.float32)

  def hidden_loss(p):
    h_p, (h_s,), _ = grouped.grouped_hidden(model, p, batch.prompt, batch.segments)
    return (h_p.astype(jnp.float32) * ct[0]).sum() + (h_s.astype(jnp.float32) * ct[1]).sum()

  def logp_loss(p):
    ((logp, ent),) = grouped.grouped_logprobs(model, p, batch.prompt, batch.segments,
                                              chunk_size=step_cfg.vocab_chunk, with_entropy=True)
    return (logp * mask).sum() + jax.lax.stop_gradient(ent).mean()  # the entropy is logged, not differentiated

  rl_loss = batch_loss.make_grouped_loss(model, step_cfg)
  grads = {"hidden": hidden_loss, "hidden+logp": logp_loss, "loss": lambda p: rl_loss(p, batch, work.beta)[0]}
  parts = [p for p in args.breakdown_parts.split(",") if p]
  bad = sorted(set(parts) - set(BREAKDOWN_PARTS))
  if bad:
    raise ValueError(f"--breakdown_parts: unknown {bad}; expected some of {','.join(BREAKDOWN_PARTS)}")
  out = {}
  for part in parts:
    base_part, _, noattn = part.partition("/")
    ctx = attention_as_identity() if noattn else contextlib.nullcontext()
    with ctx:  # traced and run inside: the jitted function keeps what it traced
      if base_part == "update":
        runner = Runner(model, jax.tree.map(jnp.copy, params), work)

        def run_update(runner=runner):
          runner.state, metrics = runner.update(runner.state, batch)
          return metrics["loss"]
        out[part] = _median_s(run_update, args.warmup, args.repeats)
        del runner
      else:
        fn = jax.jit(jax.value_and_grad(grads[base_part]))
        out[part] = _median_s(lambda fn=fn: fn(params), args.warmup, args.repeats)
  return dict(preset=name, dtype=args.dtype, attention=attention, rows=b, seq_len=s, loss_positions=t,
              vocab=cfg.vocab_size, params=int(sum(a.size for a in jax.tree.leaves(params))),
              device=card(jax.devices()[0])[0], parts={k: v[0] for k, v in out.items()},
              parts_min_max={k: [v[1], v[2]] for k, v in out.items()})


def _fmt_breakdown(row: dict) -> list[str]:
  lines = [f"{row['preset']} ({row['params'] / 1e6:.1f}M params, {row['rows']} rows x {row['seq_len']} tokens, "
           f"{row['loss_positions']} loss positions, vocab {row['vocab']}, {row['dtype']}, "
           f"attention {row.get('attention', 'reference')}, {row['device']}):", "",
           "| part | median s | min-max s |", "|---|---|---|"]
  for k, v in row["parts"].items():
    lo, hi = row["parts_min_max"][k]
    lines.append(f"| {k} | {v:.3f} | {lo:.3f}-{hi:.3f} |")
  return lines


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
  ap.add_argument("--breakdown", action="store_true",
                  help="time the update's parts in isolation (no generation) instead of whole steps")
  ap.add_argument("--breakdown_parts", default=",".join(BREAKDOWN_PARTS),
                  help=f"with --breakdown: some of {','.join(BREAKDOWN_PARTS)}")
  ap.add_argument("--attention", default="reference",
                  help="ModelConfig.attention, a comma list: each kernel runs every variant, interleaved "
                       f"(some of {','.join(layers.ATTENTION_KINDS)}; cudnn: GPU only)")
  ap.add_argument("--fast_group", type=int, default=0, help="fast completions per prompt as well (the MER step)")
  ap.add_argument("--fast_new_tokens", type=int, default=16)
  ap.add_argument("--bounds", action="store_true",
                  help="measure this machine's matmul rate and bandwidth first (benchmarks/bounds.py) and state the "
                       "update and the decode step against them")
  ap.add_argument("--json", default=None, help="also write the rows here")
  args = ap.parse_args(argv)
  mm = not args.breakdown and "mm" in args.variants.split(",")
  if mm and args.mm_frames + args.mm_audio >= args.prompt_len:
    raise ValueError(f"--mm_frames + --mm_audio ({args.mm_frames + args.mm_audio}) must leave text in a "
                     f"--prompt_len {args.prompt_len} prompt")
  work = Work(prompts=args.prompts, prompt_len=args.prompt_len, group=args.group, new_tokens=args.new_tokens,
              fast_group=args.fast_group, fast_new_tokens=args.fast_new_tokens)
  dev = jax.devices()[0]
  print(f"# {card(dev)[0]} ({dev.platform}), {os.cpu_count()} host cores, load {os.getloadavg()[0]:.1f}, "
        f"jax {jax.__version__}, {platform.python_version()}, {time.strftime('%Y-%m-%d')}; P={args.prompts} "
        f"L={args.prompt_len} G={args.group} T={args.new_tokens} {args.dtype}; median of {args.repeats} after "
        f"{args.warmup} warm-up", flush=True)
  rows = []
  bounds = None
  if args.bounds and not args.breakdown:
    import bounds as bounds_mod  # noqa: PLC0415 - benchmarks/ is on sys.path when run as a script
    bounds = bounds_mod.measure()
    print(f"# bounds: {bounds_mod.describe(bounds)}", flush=True)
  kinds = attention_kinds(args.attention)
  if args.breakdown:
    for name in args.presets.split(","):
      for kind in kinds:
        row = breakdown(name, work, args, kind)
        print("\n".join(_fmt_breakdown(row)) + "\n", flush=True)
        rows.append(row)
  else:
    print(HEADER, flush=True)
  for name in [] if args.breakdown else args.presets.split(","):
    for row in run_preset(name, args.variants.split(","), work, args, bounds):
      print(_fmt(row), flush=True)
      rows.append(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
