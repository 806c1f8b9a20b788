"""One RL step's experience, in one direction: rollouts -> host rewards -> one jitted call -> one GroupedRLBatch.

The part of the MER-R1 step before the gradient step (docs/method.md "Training recipe" 2): `sample` both modes;
score the texts on the host (r_rec, r_prec, r_f1, r_fmt); the grouped passes without gradient (the reference
log-probs when beta > 0, and the calibration's category log-mass of each slow answer in its own and in the fast
context); `advantages_and_calibration`, one jitted call to r_cal and the DOD advantages (E2); `assembly.assemble`.
Rows are in rollout order (the slow block, prompt p's rows at p*n_slow .., then the fast block) until the batch
holds them as [P, G] per mode.

Shape legend: P prompts, G = n_slow + n_fast, B = P*G rows (B_s slow rows first), L prompt bucket, T completion
length, O objectives (recall, precision, F1, format, calibration), K wheels, C clusters, A anchors, M modes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import rl, rollout
from merr1_jax.infra import sharding
from merr1_jax.models import base
from merr1_jax.rollout import passes as grouped
from merr1_jax.task import prompts, rewards
from merr1_jax.training import assembly

OBJECTIVES = ("recall", "precision", "f1", "format", "calibration")
TASK_OBJECTIVES = ("recall", "precision", "f1")  # what calibration in reward space is folded into


@dataclasses.dataclass(frozen=True)
class AdvantageSettings:
  """How rewards become advantages (method.md E2); `settings.experience` builds it from config.rl."""

  disentangle: bool  # DOD; False = the coupled R1-Omni baseline
  scale: bool  # divide by the group std; False = Dr.GRPO centring
  eps: float
  ddof: int
  group: str  # 'prompt': all completions of a prompt; 'mode': per prompt and mode
  weights: tuple[tuple[float, ...], ...]  # [M, O] per-mode objective weights, M in prompts.MODES order
  # The share of w_cal * r_cal added to the task rewards before their normalisation (method.md E3 "Variants"):
  # 0 = calibration in advantage space (its own objective), 1 = in reward space, between = mixed.
  cal_in_reward: float
  # The calibration objective's std floor in its group normalisation (rl.group_zscore's std_floor): 0 = none.
  cal_std_floor: float = 0.0


@dataclasses.dataclass(frozen=True)
class ExperienceSettings:
  """What one experience step needs from config.rl; `settings.experience(config)` builds it (no defaults here:
  configs/base.py is the one place that holds them)."""

  n_slow: int
  n_fast: int
  max_new_tokens: tuple[tuple[str, int], ...]  # (mode, tokens) pairs
  method: Any  # a sampling.* method
  advantage: AdvantageSettings
  calibration: str  # 'none' | a name in rl.CALIBRATIONS
  cal: rl.CalibrationConfig
  num_anchors: int
  with_reference: bool
  prompt_buckets: tuple[int, ...]  # few buckets = few compiled shapes

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
  token_sets: jax.Array  # [K, C, V] bool, the calibration's categories (cal_space's)
  cluster_mask: jax.Array  # [K, C] bool
  mesh: Any = None
  axis_rules: Any = None
  # The calibration's categories when they differ from the rewards' space (word-level confidence: each label
  # word its own category); None = `space`.
  cal_space: rewards.LabelSpace | None = None


# ---------------------------------------------------------------------------------------------- device passes


def answer_tokens(completion: np.ndarray, length: int, ids: rollout.SpecialIds) -> list[int]:
  """The tokens after the last <answer> up to and including the first </answer> after it (method.md SFC
  step 4: the answer teacher-forced in the fast context); [] when the completion has no such answer."""
  toks = completion[:length].tolist()
  opens = [i for i, t in enumerate(toks) if t == ids.answer_open]
  if not opens:
    return []
  rest = toks[opens[-1] + 1:]
  return rest[:rest.index(ids.answer_close) + 1] if ids.answer_close in rest else []


def emitted_categories(completion_BxT: np.ndarray, lengths_B: np.ndarray, anchors: rollout.AnchorSpec,
                       token_sets_KxCxV: np.ndarray) -> np.ndarray:
  """[B, A, K, C] bool: the categories of the token that follows each answer anchor of the slow completions (the
  emitted word's first token), in the anchor order of rl.answer_anchors; all False past a row's anchors. The
  'emitted' calibration reading reads each emitted word's own probability with it (method.md E3)."""
  comp = np.asarray(completion_BxT)
  b, t = comp.shape
  valid = np.arange(t)[None, :] < np.asarray(lengths_B)[:, None]
  idx, mask = (np.asarray(x) for x in rl.answer_anchors(comp, valid, anchors.answer_open,
                                                         np.asarray(anchors.separators, np.int32),
                                                         anchors.answer_close, anchors.num_anchors))
  nxt = idx + 1
  ok = mask & (nxt < np.asarray(lengths_B)[:, None])
  tok = np.take_along_axis(comp, np.minimum(nxt, t - 1), axis=1)  # [B, A]
  sets = np.asarray(token_sets_KxCxV, bool)
  return np.moveaxis(sets[:, :, tok], (2, 3), (0, 1)) & ok[:, :, None, None]


# ------------------------------------------------------------------------------------ rewards -> advantages


def group_ids(mode_ids_B: np.ndarray, prompt_ids_B: np.ndarray, num_prompts: int, group: str) -> np.ndarray:
  """Each row's advantage group: its prompt, or its (prompt, mode) pair for group='mode'."""
  return prompt_ids_B if group == "prompt" else prompt_ids_B + num_prompts * mode_ids_B


@functools.partial(jax.jit, static_argnames=("adv", "kind", "cal", "num_groups", "group_size"))
def advantages_and_calibration(rewards_BxO: jax.Array, valid_B: jax.Array, mode_ids_B: jax.Array,
                               group_ids_B: jax.Array, logmass: tuple | None, gt_BsxKxC: jax.Array | None,
                               format_ok_Bs: jax.Array | None, cluster_mask: jax.Array | None,
                               emitted_BsxAxKxC: jax.Array | None = None, *,
                               adv: AdvantageSettings, kind: str, cal: rl.CalibrationConfig, num_groups: int,
                               group_size: int):
  """(adv_B, r_cal_B, diagnostics) from the host rewards [B, 4] (recall, precision, F1, format) and the
  calibration log-masses.

  r_cal (E3 step 5) exists for the B_s slow rows (the first rows) that are well formed, 0 elsewhere; its
  objective is valid on exactly those rows (a malformed row neither enters the calibration's statistics nor gets a
  calibration advantage), so it is normalised over the well-formed slow rows of each group (E3 step 6), with the
  std floor ``adv.cal_std_floor``. With ``adv.cal_in_reward`` = lambda > 0, lambda * w_cal * r_cal is added to the
  task rewards (recall, precision, F1) first, r_cal centred over the well-formed slow rows of each group (so a
  malformed row gains nothing from it), and the calibration objective keeps (1 - lambda) * w_cal (method.md E3
  "Variants").

  diagnostics: ``adv_task_B`` (the advantage without the calibration objective), ``anchor_gain_A`` and
  ``anchor_rows_A`` (contrastive_gain's per-anchor term summed over rows, and the rows with that anchor);
  the last two are absent without calibration.
  """
  b = rewards_BxO.shape[0]
  r_cal_B = jnp.zeros((b,), jnp.float32)
  cal_valid_B = jnp.zeros((b,), bool)
  diag = {}
  if logmass is not None:
    extra = {} if emitted_BsxAxKxC is None else {"emitted": emitted_BsxAxKxC}  # the 'emitted' reading only
    r_cal = rl.CALIBRATIONS[kind](*logmass, gt_BsxKxC, cluster_mask, cal, **extra)
    bs = r_cal.shape[0]
    fmt_ok = format_ok_Bs.astype(bool)
    r_cal_B = r_cal_B.at[:bs].set(jnp.where(fmt_ok, r_cal, 0.0))
    cal_valid_B = cal_valid_B.at[:bs].set(fmt_ok)
    diag["anchor_gain_A"], diag["anchor_rows_A"] = rl.anchor_gains(*logmass, gt_BsxKxC, cluster_mask)
  weights_BxO = rl.mode_weights(mode_ids_B, jnp.asarray(adv.weights, jnp.float32))
  task = jnp.asarray([o in TASK_OBJECTIVES for o in OBJECTIVES[:-1]])
  w_cal_B = weights_BxO[:, -1]
  rewards_BxO = rewards_BxO.astype(jnp.float32)
  valid_BxO = jnp.concatenate([jnp.broadcast_to(valid_B[:, None], (b, len(OBJECTIVES) - 1)),
                               (valid_B & cal_valid_B)[:, None]], axis=1)
  floor_O = jnp.asarray([0.0] * (len(OBJECTIVES) - 1) + [adv.cal_std_floor], jnp.float32)
  dod = functools.partial(rl.dod_advantages, group_ids_B=group_ids_B, num_groups=num_groups, group_size=group_size,
                          disentangle=adv.disentangle, scale=adv.scale, eps=adv.eps, ddof=adv.ddof,
                          std_floor_O=floor_O)
  # The advantage from the task objectives alone, before any calibration is folded into them (diagnostics).
  diag["adv_task_B"] = dod(jnp.concatenate([rewards_BxO, r_cal_B[:, None]], axis=1), valid_BxO.at[:, -1].set(False),
                           weights_BxO)
  if adv.cal_in_reward:  # a static float: the default (advantage space) leaves the task rewards untouched
    # r_cal centred over the well-formed slow rows of each group, 0 elsewhere: a malformed row (r_cal 0, task
    # rewards 0) then gains nothing from the fold, where a raw one-sided r_cal (<= 0) would rank it above the
    # well-formed rows it pulls down.
    centred_B = r_cal_B - _group_mean(r_cal_B, valid_B & cal_valid_B, group_ids_B, num_groups)
    folded_B = adv.cal_in_reward * w_cal_B * jnp.where(valid_B & cal_valid_B, centred_B, 0.0)
    rewards_BxO = rewards_BxO + jnp.where(task[None], folded_B[:, None], 0.0)
    weights_BxO = weights_BxO.at[:, -1].multiply(1.0 - adv.cal_in_reward)
  rewards_BxO = jnp.concatenate([rewards_BxO, r_cal_B[:, None]], axis=1)
  a = dod(rewards_BxO, valid_BxO, weights_BxO)
  return a, r_cal_B, diag


def _group_mean(x_B: jax.Array, valid_B: jax.Array, group_ids_B: jax.Array, num_groups: int) -> jax.Array:
  """Each row's group mean of x over the group's valid rows (0 for a group without any)."""
  ids = jnp.asarray(group_ids_B, jnp.int32)
  total = jax.ops.segment_sum(jnp.where(valid_B, x_B, 0.0), ids, num_segments=num_groups)
  count = jax.ops.segment_sum(valid_B.astype(jnp.float32), ids, num_segments=num_groups)
  return (total / jnp.maximum(count, 1.0))[ids]


# ----------------------------------------------------------------------------------------------------- collect


def _sample_all(ctx: Context, settings: ExperienceSettings, params, inputs, rng) -> dict[str, rollout.Rollout]:
  max_new = dict(settings.max_new_tokens)
  # Both modes from one prefill and one decode loop (rollout/modes.py); mode i draws with fold_in(rng, i).
  ros = rollout.sample_modes(
      ctx.model, params, inputs, method=settings.method, mesh=ctx.mesh, axis_rules=ctx.axis_rules,
      buckets=settings.prompt_buckets,
      modes={mode: dict(num_samples=settings.n(mode), max_new_tokens=max_new[mode], rng=jax.random.fold_in(rng, i),
                        **ctx.ids.sample_kwargs(mode)) for i, mode in enumerate(settings.modes)})
  # The whole global batch on every process: the host work below (texts, rewards, advantages, the batch) is
  # deterministic, so every process computes the same values without further communication.
  return {mode: sharding.to_host(ro) for mode, ro in ros.items()}


def collect(ctx: Context, settings: ExperienceSettings, params, ref_params, batch: Mapping[str, Any],
            rng: jax.Array) -> tuple[grouped.GroupedRLBatch, dict[str, float], dict[str, list]]:
  """Steps 1-5 of the module docstring for one data batch (an RL pipeline batch of P prompts).

  With a mesh over several processes, every process passes the same global batch: the rollouts are split over
  the mesh and gathered back, and every process builds the same batch (place it with sharding.from_global).

  Returns the batch (host arrays), scalar metrics, and per-row texts/modes/rewards/advantages, prompt-major.
  """
  t0 = time.perf_counter()
  inputs = rollout.batch_inputs(batch, "slow")
  ros = _sample_all(ctx, settings, params, inputs, rng)
  texts = [t for ro in ros.values() for t in rollout.completion_texts(ctx.tokenizer, ro)]  # waits for decoding
  t_rollout = time.perf_counter() - t0
  rl_batch, metrics, rows = from_rollouts(ctx, settings, params, ref_params, batch, ros, texts)
  metrics["time/rollout"] = t_rollout
  # Sequential decode steps: one loop for both modes where the model decodes against a shared prefix
  # (rollout.sample_modes), else one loop per mode.
  steps = [int(ro.steps) for ro in ros.values()]
  joint = len(steps) > 1 and rollout.shared_prefix.supports_shared_decode(ctx.model, None)
  metrics["rollout/decode_steps"] = float(max(steps) if joint else sum(steps))
  return rl_batch, metrics, rows


def _emitted(ctx: Context, settings: ExperienceSettings, ros) -> np.ndarray:
  slow = ros["slow"]
  return emitted_categories(slow.completion, slow.length, ctx.ids.anchors(settings.num_anchors), ctx.token_sets)


def _calibration_gt(ctx: Context, scored: rewards.ScoredBatch, gts: Sequence[tuple[str, ...]], bs: int):
  """[B_s, K, C] GT multi-hot of the slow rows in the calibration's categories (the rewards' own, or words)."""
  if ctx.cal_space is None:
    return scored.gt_BxKxC[:bs]
  return ctx.cal_space.encode_batch(gts[:bs])[0]


def from_rollouts(ctx: Context, settings: ExperienceSettings, params, ref_params, batch: Mapping[str, Any],
                  ros: Mapping[str, rollout.Rollout], texts: Sequence[str]
                  ) -> tuple[grouped.GroupedRLBatch, dict[str, float], dict[str, list]]:
  """Steps 2-5 on host rollouts per mode (in settings.modes order) and their completion texts (rollout order)."""
  t1 = time.perf_counter()
  inputs = rollout.batch_inputs(batch, "slow")
  num_prompts = inputs.tokens.shape[0]
  use_cal = settings.calibration != "none" and settings.n_slow > 0
  modes = [ro.mode for ro in ros.values() for _ in range(ro.completion.shape[0])]
  mode_ids = np.asarray([prompts.MODES.index(m) for m in modes], np.int32)
  prompt_ids = np.concatenate([ro.prompt_index for ro in ros.values()])
  gts = [tuple(batch["openset"][p]) for p in prompt_ids]
  scored = rewards.score_completions(list(texts), modes, gts, ctx.space)
  prompt = grouped.slow_prompt(ros, inputs, vocab_size=ctx.model.config.vocab_size, pad_id=ctx.ids.pad,
                                buckets=settings.prompt_buckets)
  segs = assembly.segments(list(ros.values()), prompt, fast_prefix_ids=ctx.ids.fast_prefix, valid_B=scored.valid_B)
  ref = _reference(ctx, ref_params, prompt, segs) if settings.with_reference else None
  logmass = None
  if use_cal:
    logmass = _calibration_logmass(ctx, settings, params, prompt, ros["slow"], segs[list(ros).index("slow")])
  r = np.asarray(rewards.compute_rewards(OBJECTIVES[:-1], rewards.RewardInputs.from_scored(scored)))
  bs = settings.n_slow * num_prompts if use_cal else 0
  per_prompt = settings.advantage.group == "prompt"
  num_groups = num_prompts * (1 if per_prompt else len(prompts.MODES))
  group_size = settings.n_slow + settings.n_fast if per_prompt else max(settings.n_slow, settings.n_fast)
  adv, r_cal, diag = advantages_and_calibration(
      r, scored.valid_B, mode_ids, group_ids(mode_ids, prompt_ids, num_prompts, settings.advantage.group),
      logmass, _calibration_gt(ctx, scored, gts, bs) if use_cal else None,
      scored.format_ok_B[:bs] if use_cal else None, ctx.cluster_mask if use_cal else None,
      _emitted(ctx, settings, ros) if use_cal and settings.cal.reading == "emitted" else None,
      adv=settings.advantage, kind=settings.calibration, cal=settings.cal, num_groups=num_groups,
      group_size=group_size)
  adv, r_cal, diag = np.asarray(adv), np.asarray(r_cal), sharding.to_host(diag)
  rewards_BxO = np.concatenate([r, r_cal[:, None]], axis=1).astype(np.float32)
  rl_batch = assembly.assemble(segs, prompt, adv, ref)
  metrics = _metrics(settings, ros, rewards_BxO, scored, mode_ids, prompt_ids, adv)
  if use_cal:
    metrics |= calibration_diagnostics(r_cal[:bs], scored.num_words_B[:bs], scored.format_ok_B[:bs],
                                       prompt_ids[:bs], adv, diag["adv_task_B"], prompt_ids,
                                       diag["anchor_gain_A"], diag["anchor_rows_A"])
  if "slow" in ros and "fast" in ros:
    metrics["cal/slow_omits_fast_correct"] = slow_omits_fast_correct(
        scored.pred_BxKxC[scored.valid_B], scored.gt_BxKxC[scored.valid_B], mode_ids[scored.valid_B],
        prompt_ids[scored.valid_B])
  metrics["time/scoring"] = time.perf_counter() - t1  # reference, calibration, rewards, advantages, assembly
  order = assembly.prompt_major_order(prompt_ids)
  return rl_batch, metrics, {"text": [texts[i] for i in order], "mode": [modes[i] for i in order],
                             "reward": rewards_BxO[order].tolist(), "advantage": adv[order].tolist()}


def _reference(ctx: Context, ref_params, prompt: base.ModelInputs, segs: Sequence[grouped.Segment]
               ) -> list[np.ndarray]:
  """Per segment the reference log-probs [P, G, T] of its suffix tokens, 0 on the fast prefix (which carries no
  loss) and on padding: one grouped pass over every mode's completions, each prompt once."""
  outs = sharding.to_host(grouped.score_pass(ctx.model, ref_params, prompt, segs, mesh=ctx.mesh,
                                             axis_rules=ctx.axis_rules))
  n = len(ctx.ids.fast_prefix)
  return [np.where(np.arange(o["logp"].shape[-1]) < (n if prompts.MODES[s.mode_id] == "fast" else 0), 0.0,
                   o["logp"]).astype(np.float32) for o, s in zip(outs, segs)]


def _calibration_logmass(ctx: Context, settings: ExperienceSettings, params, prompt: base.ModelInputs,
                         slow: rollout.Rollout, own: grouped.Segment) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(S_slow, S_fast [B_s, A, K, C], anchor_mask [B_s, A]) on the host (method.md E3 steps 1-4), rows p*G + g:
  the slow answers scored in their own context and, in the same grouped pass, teacher-forced in the fast context
  (prompt + FAST_PREFIX)."""
  comp, lengths = np.asarray(slow.completion), np.asarray(slow.length)
  answers = [answer_tokens(comp[r], int(lengths[r]), ctx.ids) for r in range(len(comp))]
  counterfactual = grouped.token_segment(answers, prompt, num_samples=slow.num_samples,
                                         prefix_ids=ctx.ids.fast_prefix, mode_id=1, pad_id=ctx.ids.pad)
  s_slow, s_fast = sharding.to_host(grouped.score_pass(
      ctx.model, params, prompt, [own, counterfactual], token_sets=ctx.token_sets,
      anchors=ctx.ids.anchors(settings.num_anchors), mesh=ctx.mesh, axis_rules=ctx.axis_rules))
  flat = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731 ([P, G, ...] -> rows p*G + g)
  return (flat(s_slow["logmass"]), flat(s_fast["logmass"]),
          flat(s_slow["anchor_mask"]) & flat(s_fast["anchor_mask"]))


def _within_group_corr(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float | None:
  """Mean over groups of the Pearson correlation of x and y (groups where both vary); None when none does."""
  cs = []
  for g in np.unique(groups):
    xs, ys = x[groups == g].astype(np.float64), y[groups == g].astype(np.float64)
    if len(xs) > 1 and xs.std() > 0 and ys.std() > 0:
      cs.append(float(np.corrcoef(xs, ys)[0, 1]))
  return float(np.mean(cs)) if cs else None


def calibration_diagnostics(r_cal_Bs, num_words_Bs, format_ok_Bs, prompt_ids_Bs, adv_B, adv_task_B, prompt_ids_B,
                            anchor_gain_A, anchor_rows_A) -> dict[str, float]:
  """What the calibration pays for (docs/method.md E3 "Diagnostics"), per step:
    cal/len_corr: within-group correlation of r_cal with the number of answer words (well-formed slow rows);
    cal/only_signal_frac: the share of groups where the calibration term is the only non-zero advantage term;
    cal/anchor_gain/aI: contrastive_gain's mean per-anchor term at anchor index I (rows that have that anchor).
  """
  ok = np.asarray(format_ok_Bs, bool)
  out = {}
  corr = _within_group_corr(np.asarray(r_cal_Bs)[ok], np.asarray(num_words_Bs)[ok], np.asarray(prompt_ids_Bs)[ok])
  if corr is not None:
    out["cal/len_corr"] = corr
  cal_term = np.asarray(adv_B) - np.asarray(adv_task_B)
  groups = np.unique(prompt_ids_B)
  only = [np.any(cal_term[prompt_ids_B == g] != 0) and not np.any(np.asarray(adv_task_B)[prompt_ids_B == g] != 0)
          for g in groups]
  out["cal/only_signal_frac"] = float(np.mean(only))
  for i, (s, n) in enumerate(zip(np.asarray(anchor_gain_A), np.asarray(anchor_rows_A))):
    if n > 0:
      out[f"cal/anchor_gain/a{i}"] = float(s / n)
  return out


def slow_omits_fast_correct(pred_BxKxC, gt_BxKxC, mode_ids_B, prompt_ids_B) -> float:
  """The paper's premise on the rollouts: over the (slow row, fast row) pairs of each prompt, the share where the
  fast answer names a correct cluster (in any wheel) that the slow answer does not; 0 without such pairs."""
  pred, gt = np.asarray(pred_BxKxC, bool), np.asarray(gt_BxKxC, bool)
  slow, fast = prompts.MODES.index("slow"), prompts.MODES.index("fast")
  hits = []
  for p in np.unique(prompt_ids_B):
    rows = prompt_ids_B == p
    s_rows = np.flatnonzero(rows & (mode_ids_B == slow))
    f_rows = np.flatnonzero(rows & (mode_ids_B == fast))
    for i in s_rows:
      for j in f_rows:
        hits.append(bool(np.any(pred[j] & gt[j] & ~pred[i])))
  return float(np.mean(hits)) if hits else 0.0


def _metrics(settings, ros, rewards_BxO, scored, mode_ids, prompt_ids, adv) -> dict[str, float]:
  out = {}
  for mode, ro in ros.items():
    rows = mode_ids == prompts.MODES.index(mode)
    for j, name in enumerate(OBJECTIVES):
      if name == "calibration" and mode == "fast":
        continue
      out[f"reward/{mode}/{name}"] = float(rewards_BxO[rows, j].mean())
    lengths = np.asarray(ro.length)
    out[f"length/{mode}/mean"] = float(lengths.mean())
    out[f"length/{mode}/max"] = float(lengths.max())
    out[f"length/{mode}/truncated_frac"] = float((np.asarray(ro.stop_reason) == rollout.StopReason.LENGTH).mean())
    out[f"answer/{mode}/num_words"] = float(scored.num_words_B[rows].mean())
    out[f"adv/{mode}/mean"] = float(adv[rows].mean())
  nonzero = np.bincount(prompt_ids, weights=(adv != 0).astype(np.float64))
  out["adv/zero_std_group_frac"] = float((nonzero == 0).mean())
  out["data/invalid_sample_frac"] = float(1.0 - scored.valid_B.mean())
  out["data/dropped_words"] = float(scored.dropped_B.sum())
  return out
