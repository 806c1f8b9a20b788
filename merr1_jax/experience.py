"""One RL step's experience: rollouts in both modes -> rewards -> calibration passes -> DOD advantages -> batch.

This is the part of the MER-R1 step that runs before the gradient step (docs/method.md "Training recipe" 2):
  1. sample n_slow slow and n_fast fast completions per prompt (shared-prefix prefill, rollout.sample);
  2. parse and score them on the host (rewards.score_completions) -> r_rec, r_prec, r_fmt;
  3. calibration (E3): category log-mass at the answer anchors of each slow completion in its own context, and of
     the same answer teacher-forced in the fast context -> r_cal for slow rows;
  4. reference log-probs (when beta > 0);
  5. DOD advantages (E2) and the ``train_step.RLBatch`` of full sequences.

Rows of the returned batch are grouped by prompt: prompt p owns rows p*G .. p*G+G-1 (G = n_slow + n_fast), slow
samples first, so ``dod_advantages``' contiguous groups are the method's groups.

Shape legend: P prompts, G = n_slow + n_fast, B = P*G, L prompt bucket, T completion length, S = L + T (padded to
the longer mode), K wheels, C clusters, A anchors.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import rewards, rl, rollout, sampling, sharding
from merr1_jax import train_step as ts
from merr1_jax.models import base

OBJECTIVES = ("recall", "precision", "format", "calibration")


@dataclasses.dataclass(frozen=True)
class RLSettings:
  """What one experience step needs from config.rl (built by the trainer)."""

  n_slow: int = 4
  n_fast: int = 4
  max_new_tokens: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"slow": 40, "fast": 12})
  method: Any = sampling.Temperature(1.0)
  disentangle: bool = True
  scale: bool = True
  adv_eps: float = 1e-4
  adv_ddof: int = 1
  group: str = "prompt"  # 'prompt' | 'mode'
  weights: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=lambda: {
      "slow": {"recall": 1.0, "precision": 1.0, "format": 0.1, "calibration": 0.5},
      "fast": {"recall": 1.0, "precision": 1.0, "format": 0.1, "calibration": 0.0}})
  calibration: str = "contrastive_gain"  # 'none' | a name in rl.CALIBRATIONS ('contrastive_gain', 'fast_prior_kl')
  cal_tau: float = 1.0  # contrastive_gain: r_cal = tanh(gain / tau)
  cal_alpha: float = 1.0  # fast_prior_kl: the GT tilt exp(+-alpha) of the fast prior
  num_anchors: int = 6
  with_reference: bool = True
  prompt_buckets: tuple[int, ...] = rollout.PROMPT_BUCKETS  # few buckets = few compiled shapes

  @property
  def modes(self) -> tuple[str, ...]:
    return tuple(m for m, n in (("slow", self.n_slow), ("fast", self.n_fast)) if n > 0)

  def n(self, mode: str) -> int:
    return self.n_slow if mode == "slow" else self.n_fast


@dataclasses.dataclass
class Context:
  """Fixed per run: the model, the tokenizer's special ids, the label space and its token sets."""

  model: Any
  tokenizer: Any
  ids: rollout.SpecialIds
  space: rewards.LabelSpace
  token_sets: jax.Array  # [K, C, V] bool
  cluster_mask: jax.Array  # [K, C] bool
  mesh: Any = None
  axis_rules: Any = None


def _answer_tokens(completion: np.ndarray, length: int, ids: rollout.SpecialIds) -> list[int]:
  """The tokens after the last <answer> up to and including the first </answer> after it (method.md SFC
  step 4: the answer teacher-forced in the fast context); [] when the completion has no such answer."""
  toks = completion[:length].tolist()
  opens = [i for i, t in enumerate(toks) if t == ids.answer_open]
  if not opens:
    return []
  rest = toks[opens[-1] + 1:]
  return rest[:rest.index(ids.answer_close) + 1] if ids.answer_close in rest else []


def calibration_rewards(ctx: Context, params, inputs: base.ModelInputs, slow: rollout.Rollout,
                        gt_BxKxC: np.ndarray, format_ok_B: np.ndarray, tau: float, num_anchors: int,
                        buckets=rollout.PROMPT_BUCKETS, *, kind: str = "contrastive_gain",
                        alpha: float = 1.0) -> np.ndarray:
  """r_cal of each slow completion (method.md E3 steps 1-5, 7); 0 for malformed ones or answers without anchors.

  ``kind`` names the reward in ``rl.CALIBRATIONS`` that turns the slow and fast log-masses into r_cal.
  """
  anchors = ctx.ids.anchors(num_anchors)
  kw = dict(token_sets=ctx.token_sets, anchors=anchors, mesh=ctx.mesh, axis_rules=ctx.axis_rules)
  s_slow = rollout.score(ctx.model, params, slow, **kw)
  comp, lengths = np.asarray(slow.completion), np.asarray(slow.length)
  answers = [_answer_tokens(comp[r], int(lengths[r]), ctx.ids) for r in range(len(comp))]
  seqs = rollout.make_sequences(inputs, answers, mode="fast", num_samples=slow.num_samples,
                                vocab_size=ctx.model.config.vocab_size, fast_prefix_ids=ctx.ids.fast_prefix,
                                pad_id=ctx.ids.pad, buckets=buckets)
  s_fast = rollout.score(ctx.model, params, seqs, **kw)
  # On the host values (every row, on every process): the reward is host work like the others.
  logmass_slow, logmass_fast, mask = sharding.to_host(
      (s_slow.logmass, s_fast.logmass, s_slow.anchor_mask & s_fast.anchor_mask))
  gt = jnp.asarray(gt_BxKxC)
  r_cal = rl.calibration_reward(kind, jnp.asarray(logmass_slow), jnp.asarray(logmass_fast), jnp.asarray(mask), gt,
                                gt.any(-1), cluster_mask=ctx.cluster_mask, tau=tau, alpha=alpha)
  return np.where(format_ok_B, np.asarray(r_cal), 0.0)


def _full_sequences(ro: rollout.Rollout, ref_logp: np.ndarray | None) -> dict[str, np.ndarray]:
  """Prompt (repeated per sample) + completion as [B, L + T] host arrays."""
  g = ro.num_samples
  rep = lambda a, axis=0: np.repeat(np.asarray(a), g, axis=axis)
  p = ro.prompt
  comp_mask = np.asarray(ro.completion_mask)
  t = comp_mask.shape[1]
  nxt = np.asarray(rollout.next_positions(np.asarray(p.positions), np.asarray(p.mask)))
  if np.ndim(p.positions) == 3:
    cpos = np.where(comp_mask, rep(nxt)[:, None] + np.arange(t)[None], 0)  # all 3 M-RoPE axes continue as text
    positions = np.concatenate([rep(p.positions, 1), np.broadcast_to(cpos[None], (3, *cpos.shape))], axis=2)
  else:
    cpos = rep(nxt)[:, None] + np.arange(t)[None]
    positions = np.concatenate([rep(p.positions), np.where(comp_mask, cpos, 0)], axis=1)
  prompt_len = p.tokens.shape[1]
  zeros = np.zeros((comp_mask.shape[0], prompt_len), np.float32)
  out = {
      "tokens": np.concatenate([rep(p.tokens), np.asarray(ro.completion)], axis=1),
      "mask": np.concatenate([rep(p.mask), comp_mask], axis=1),
      "positions": positions.astype(np.int32),
      "completion_mask": np.concatenate([zeros.astype(bool), comp_mask], axis=1),
  }
  if ref_logp is not None:
    out["ref_logp"] = np.concatenate([zeros, np.asarray(ref_logp)], axis=1)
  for name in ("video", "video_mask", "audio", "audio_mask"):
    value = getattr(p, name)
    if value is not None:
      out[name] = rep(value)
  return out


def _pad_to(x: np.ndarray, length: int, axis: int, value=0) -> np.ndarray:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, length - x.shape[axis])
  return np.pad(x, pad, constant_values=value)


def _interleave(parts: dict[str, dict[str, np.ndarray]], settings: RLSettings, num_prompts: int, pad_id: int):
  """Merges per-mode row blocks into prompt-major groups (slow rows first), padding sequences to one length."""
  seq_len = max(v["tokens"].shape[1] for v in parts.values())
  merged = {}
  for key in parts[settings.modes[0]]:
    blocks = []
    for mode in settings.modes:
      x = parts[mode][key]
      time_axis = 2 if key == "positions" and x.ndim == 3 else 1
      if key in ("tokens", "mask", "positions", "completion_mask", "ref_logp"):
        x = _pad_to(x, seq_len, time_axis, pad_id if key == "tokens" else 0)
      row_axis = 1 if key == "positions" and x.ndim == 3 else 0
      x = np.moveaxis(x, row_axis, 0)
      blocks.append(x.reshape(num_prompts, settings.n(mode), *x.shape[1:]))
    y = np.concatenate(blocks, axis=1)
    y = y.reshape(-1, *y.shape[2:])
    merged[key] = np.moveaxis(y, 0, 1) if key == "positions" and y.ndim == 3 else y
  return merged


def _group_order(settings: RLSettings, num_prompts: int) -> dict[str, np.ndarray]:
  """For each mode, the final row index of its rollout rows (rollout row p*G_m + g)."""
  g = settings.n_slow + settings.n_fast
  out, offset = {}, 0
  for mode in settings.modes:
    n = settings.n(mode)
    out[mode] = (np.arange(num_prompts)[:, None] * g + offset + np.arange(n)[None]).reshape(-1)
    offset += n
  return out


def advantages(settings: RLSettings, rewards_BxO: np.ndarray, valid_BxO: np.ndarray, weights_BxO: np.ndarray,
               order: dict[str, np.ndarray]) -> np.ndarray:
  """DOD (or coupled) advantages over prompt groups, or over per-mode groups when settings.group == 'mode'."""
  kw = dict(disentangle=settings.disentangle, scale=settings.scale, eps=settings.adv_eps, ddof=settings.adv_ddof)
  if settings.group == "prompt":
    g = settings.n_slow + settings.n_fast
    return np.asarray(rl.dod_advantages(jnp.asarray(rewards_BxO), jnp.asarray(valid_BxO),
                                        jnp.asarray(weights_BxO), g, **kw))
  adv = np.zeros(rewards_BxO.shape[0], np.float32)
  for mode, rows in order.items():
    adv[rows] = np.asarray(rl.dod_advantages(jnp.asarray(rewards_BxO[rows]), jnp.asarray(valid_BxO[rows]),
                                             jnp.asarray(weights_BxO[rows]), settings.n(mode), **kw))
  return adv


def collect(ctx: Context, settings: RLSettings, params, ref_params, batch: Mapping[str, Any], rng: jax.Array
            ) -> tuple[ts.RLBatch, dict[str, float], dict[str, list]]:
  """Runs steps 1-5 of the module docstring for one data batch (an RL pipeline batch of P prompts).

  With a mesh over several processes, every process passes the same global batch: the rollouts are split over
  the mesh and gathered back, and every process builds the same RLBatch (place it with sharding.from_global).

  Returns the RLBatch (host arrays), scalar metrics, and per-row texts/rewards for logging.
  """
  inputs = rollout.batch_inputs(batch, "slow")
  num_prompts = inputs.tokens.shape[0]
  gt_words = [tuple(w) for w in batch["openset"]]
  order = _group_order(settings, num_prompts)
  b = num_prompts * (settings.n_slow + settings.n_fast)
  mode_of_row = np.empty(b, object)
  texts = np.empty(b, object)
  parts, ros = {}, {}
  t_roll = t_score = 0.0
  for i, mode in enumerate(settings.modes):
    t0 = time.perf_counter()
    ro = rollout.sample(ctx.model, params, inputs, mode=mode, num_samples=settings.n(mode),
                        max_new_tokens=settings.max_new_tokens[mode], method=settings.method,
                        rng=jax.random.fold_in(rng, i), mesh=ctx.mesh, axis_rules=ctx.axis_rules,
                        buckets=settings.prompt_buckets,
                        **ctx.ids.sample_kwargs(mode))
    # The whole global batch on every process: the host work below (texts, rewards, advantages, the RLBatch)
    # is deterministic, so every process computes the same values without further communication.
    ro = sharding.to_host(ro)
    ros[mode] = ro
    texts[order[mode]] = rollout.completion_texts(ctx.tokenizer, ro)  # waits for the decode loop
    t1 = time.perf_counter()
    t_roll += t1 - t0
    ref = None
    if settings.with_reference:
      ref = sharding.to_host(rollout.score(ctx.model, ref_params, ro, mesh=ctx.mesh, axis_rules=ctx.axis_rules).logp)
    parts[mode] = _full_sequences(ro, ref)
    mode_of_row[order[mode]] = mode
    t_score += time.perf_counter() - t1
  t1 = time.perf_counter()
  prompt_of_row = np.arange(b) // (settings.n_slow + settings.n_fast)
  gts = [gt_words[p] for p in prompt_of_row]
  scored = rewards.score_completions(list(texts), list(mode_of_row), gts, ctx.space)
  r = np.asarray(rewards.compute_rewards(["recall", "precision", "format"], rewards.RewardInputs.from_scored(scored)))
  r_cal = np.zeros(b, np.float32)
  is_slow = mode_of_row == "slow"
  if settings.calibration != "none" and settings.n_slow:
    rows = order["slow"]
    r_cal[rows] = calibration_rewards(ctx, params, inputs, ros["slow"], scored.gt_BxKxC[rows],
                                      scored.format_ok_B[rows], settings.cal_tau, settings.num_anchors,
                                      settings.prompt_buckets, kind=settings.calibration, alpha=settings.cal_alpha)
  rewards_BxO = np.concatenate([r, r_cal[:, None]], axis=1).astype(np.float32)
  valid = scored.valid_B
  valid_BxO = np.stack([valid, valid, valid, valid & is_slow & (settings.calibration != "none")], axis=1)
  weights_BxO = np.asarray([[settings.weights[m][o] for o in OBJECTIVES] for m in mode_of_row], np.float32)
  adv = advantages(settings, rewards_BxO, valid_BxO, weights_BxO, order)

  seq = _interleave(parts, settings, num_prompts, ctx.ids.pad)
  feats = {k: seq.get(k) for k in ("video", "video_mask", "audio", "audio_mask")}
  rl_batch = ts.RLBatch(
      inputs=base.ModelInputs(tokens=seq["tokens"], positions=seq["positions"], mask=seq["mask"], **feats),
      completion_mask=seq["completion_mask"] & valid[:, None],  # invalid groups carry no loss
      advantages=adv.astype(np.float32),
      old_logp=None,  # mu = 1: the ratio is taken against stop_gradient(current log-probs), method.md E4
      ref_logp=seq.get("ref_logp"),
      mode_ids=(mode_of_row == "fast").astype(np.int32),  # StepConfig.mode_names: 0 slow, 1 fast
      loss_start=min(ro.prompt.tokens.shape[1] for ro in ros.values()) - 1,  # completions start at a bucket
  )
  metrics = _metrics(settings, ros, rewards_BxO, scored, mode_of_row, adv, order)
  metrics["time/rollout"] = t_roll
  metrics["time/scoring"] = t_score + time.perf_counter() - t1  # reference, rewards, calibration, advantages
  return rl_batch, metrics, {"text": list(texts), "mode": list(mode_of_row), "reward": rewards_BxO.tolist()}


def _metrics(settings, ros, rewards_BxO, scored, mode_of_row, adv, order) -> dict[str, float]:
  out = {}
  f1 = np.asarray(rewards.set_rewards(jnp.asarray(scored.pred_BxKxC), jnp.asarray(scored.gt_BxKxC))[2])
  f1 = np.where(scored.format_ok_B, f1, 0.0)
  for mode in settings.modes:
    rows = order[mode]
    for j, name in enumerate(OBJECTIVES):
      if name == "calibration" and mode == "fast":
        continue
      out[f"reward/{mode}/{name}"] = float(rewards_BxO[rows, j].mean())
    out[f"reward/{mode}/f1"] = float(f1[rows].mean())
    lengths = np.asarray(ros[mode].length)
    out[f"length/{mode}/mean"] = float(lengths.mean())
    out[f"length/{mode}/max"] = float(lengths.max())
    out[f"length/{mode}/truncated_frac"] = float((np.asarray(ros[mode].stop_reason) == 0).mean())
    out[f"answer/{mode}/num_words"] = float(scored.num_words_B[rows].mean())
    out[f"adv/{mode}/mean"] = float(adv[rows].mean())
  g = settings.n_slow + settings.n_fast
  groups = adv.reshape(-1, g)
  out["adv/zero_std_group_frac"] = float(np.all(groups == 0, axis=1).mean())
  out["data/invalid_sample_frac"] = float(1.0 - scored.valid_B.mean())
  out["data/dropped_words"] = float(scored.dropped_B.sum())
  return out
