"""The ungrouped RL layout, kept as the oracle the library's one (prefix-grouped) layout is tested against.

Every row carries its whole sequence (prompt repeated per completion, then the completion): the most direct way
to write the RL loss, the old-policy pass, the scorer and the calibration's passes, and the layout the trainer ran
before prefix grouping. `merr1_jax.rollout.passes` must give the same log-probs, losses, gradients and updates
(tests/test_grouped.py); `as_grouped` turns a hand-built row batch into the library's batch (one suffix per row).

Shape legend: B rows, L = prompt + completion positions, P prompts, G completions per prompt, T completion length,
A anchors, K wheels, C clusters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import rl, rollout
from merr1_jax.infra import sharding
from merr1_jax.models import base
from merr1_jax.rl import loss as rl_loss
from merr1_jax.rollout import passes as grouped
from merr1_jax.rollout import prompt_batch, shared_prefix
from merr1_jax.rollout.prompt_batch import COMPLETION_BUCKETS, PROMPT_BUCKETS, AnchorSpec
from merr1_jax.task import prompts
from merr1_jax.training import assembly, experience
from merr1_jax.training import step as ts

Array = jax.Array


# ------------------------------------------------------------------------------------ the batch and its loss


@flax.struct.dataclass
class RLBatch:
  """One RL step's rollouts. Arrays aligned with ``inputs.tokens`` are [B, L]."""

  inputs: base.ModelInputs
  completion_mask: Array  # bool: generated tokens, which carry loss (the fast prefix is prompt: no loss)
  advantages: Array  # [B] float32
  # Old-policy log-probs of the PPO ratio. None: the step takes its own (stop_gradient of the current log-probs
  # with one update per step; a scoring pass before the first update otherwise, see make_rl_step).
  old_logp: Array | None = None
  behaviour_logp: Array | None = None  # the sampler's log-probs, for the logged sampler-vs-trainer gap only
  ref_logp: Array | None = None  # reference log-probs; required when StepConfig.beta > 0, ignored when it is 0
  mode_ids: Array | None = None  # [B] int32 index into StepConfig.mode_names (0 slow, 1 fast): per-mode metrics
  # Static: the first column whose next token can carry loss (the shortest prompt bucket - 1). Positions before
  # it are never unembedded: with long multimodal prompts most of the sequence is prompt.
  loss_start: int = flax.struct.field(pytree_node=False, default=0)


def make_rl_loss(model: base.PolicyModel, cfg: ts.StepConfig) -> Callable:
  """``loss(params, batch, beta, num_tokens=None, num_seqs=None) -> (loss, summed stats)``.

  Normalisers default to the batch's own counts; the step passes the update's counts to each micro-batch.
  Raises ValueError (at trace time) when ``cfg.beta > 0`` but the batch has no ``ref_logp``: the KL term would
  otherwise vanish without a word.
  """
  lc = cfg.loss

  def loss_fn(params, batch: RLBatch, beta, num_tokens=None, num_seqs=None, dropout_key=None):
    if cfg.beta > 0 and batch.ref_logp is None:
      raise ValueError(f"StepConfig.beta = {cfg.beta} > 0 but RLBatch.ref_logp is None: the KL penalty needs the "
                       "reference log-probs (score the rollouts with train_step.reference_params), or set beta = 0")
    k = batch.loss_start
    logp, ent = ts.shifted_logprobs(model, params, batch.inputs, cfg.vocab_chunk, with_entropy=True, start=k,
                              dropout_key=dropout_key)
    if not lc.entropy_coef:
      ent = jax.lax.stop_gradient(ent)  # logged only: build no gradient for it
    mask = batch.completion_mask[:, k + 1:]
    # No old log-probs: one update per step, the ratio is exactly 1 (method.md E4, mu = 1) and these log-probs
    # are the trainer's at the rollout weights, so the sampler-vs-trainer gap is measured here.
    old = jax.lax.stop_gradient(logp) if batch.old_logp is None else batch.old_logp[:, k + 1:]
    behaviour = None if batch.old_logp is not None or batch.behaviour_logp is None else batch.behaviour_logp[:, k + 1:]
    ref = None if cfg.beta == 0 else batch.ref_logp[:, k + 1:]
    lcfg = lc if lc.max_len is not None else dataclasses.replace(lc, max_len=mask.shape[1])
    return rl.policy_loss(logp, old, ref, batch.advantages, mask, lcfg, beta=beta, entropy_BxT=ent,
                          num_tokens=num_tokens, num_seqs=num_seqs, group_B=batch.mode_ids,
                          group_names=cfg.mode_names, behaviour_BxT=behaviour)

  return loss_fn


def old_logprobs(model, cfg: ts.StepConfig, params, batch: RLBatch) -> tuple[Array, dict[str, Array]]:
  """The trainer's log-probs at the rollout weights, [B, L] aligned with the tokens (0 on the first loss_start + 1
  columns), computed once before the first of several updates (no gradient, micro-batched like the update); and
  the summed sampler-vs-trainer gap statistics (``behaviour_gap_sum`` in total and per mode)."""
  k = batch.loss_start

  def one(mb: RLBatch):
    logp = jax.lax.stop_gradient(ts.shifted_logprobs(model, params, mb.inputs, cfg.vocab_chunk, False, start=k))
    mask = mb.completion_mask[:, k + 1:].astype(jnp.float32)
    beh = jnp.zeros_like(logp) if mb.behaviour_logp is None else mb.behaviour_logp[:, k + 1:]
    gap = jnp.abs(logp - beh) * mask
    groups = [("", mask)] + ([(f"/{name}", mask * (mb.mode_ids == gi)[:, None])
                              for gi, name in enumerate(cfg.mode_names)] if mb.mode_ids is not None else [])
    sums = {}
    for suffix, w in groups:
      sums[f"gap{suffix}"], sums[f"n{suffix}"] = (gap * w).sum(), w.sum()
    return jnp.pad(logp, ((0, 0), (k + 1, 0))), sums

  m = cfg.micro_batches
  if m == 1:
    logp, sums = one(batch)
  else:
    logp_MxbxL, sums = jax.lax.map(one, ts._micro_split(batch, m))
    logp = logp_MxbxL.swapaxes(0, 1).reshape(batch.advantages.shape[0], -1)  # row i went to part i % M
    sums = jax.tree.map(lambda x: x.sum(0), sums)
  gaps = {"behaviour_logp_gap" + key[3:]: sums[key] / jnp.maximum(sums["n" + key[3:]], 1.0)
          for key in sums if key.startswith("gap")}
  return logp, gaps


def full_sequences(ro: rollout.Rollout, ref_logp: np.ndarray | None) -> dict[str, np.ndarray]:
  """Prompt (repeated per sample) + completion as [B, L + T] host arrays, positions continuing the prompt."""
  rep = lambda a: np.repeat(np.asarray(a), ro.num_samples, axis=0)
  p = ro.prompt
  comp_mask = np.asarray(ro.completion_mask)
  start = rollout.next_positions(np.asarray(p.positions), np.asarray(p.mask))
  cpos = rollout.text_positions(rep(start), comp_mask.shape[1], np.asarray(p.positions))
  cpos = np.where(comp_mask.reshape(*comp_mask.shape, *([1] * (cpos.ndim - 2))), cpos, 0)
  zeros = np.zeros((comp_mask.shape[0], p.tokens.shape[1]), np.float32)
  out = {
      "tokens": np.concatenate([rep(p.tokens), np.asarray(ro.completion)], axis=1),
      "mask": np.concatenate([rep(p.mask), comp_mask], axis=1),
      "positions": np.concatenate([rep(p.positions), cpos], axis=1).astype(np.int32),
      "completion_mask": np.concatenate([zeros.astype(bool), comp_mask], axis=1),
      "behaviour_logp": np.concatenate([zeros, np.where(comp_mask, np.asarray(ro.logp), 0.0)], axis=1),
  }
  if ref_logp is not None:
    out["ref_logp"] = np.concatenate([zeros, np.asarray(ref_logp)], axis=1)
  for name in ("video", "video_mask", "audio", "audio_mask"):
    if getattr(p, name) is not None:
      out[name] = rep(getattr(p, name))
  return out


def assemble(rollouts: Sequence[rollout.Rollout], advantages_B: np.ndarray, *, pad_id: int,
             ref_logp: Sequence[np.ndarray | None] | None = None, valid_B: np.ndarray | None = None,
             mode_ids_B: np.ndarray | None = None) -> RLBatch:
  """The RLBatch of one step from host rollouts (in rollout order, e.g. slow then fast) and their rows' values.

  Sequences are padded to one length, then laid out prompt-major (`prompt_major_order`); `valid_B` False rows
  carry no loss; `mode_ids_B` (0 slow, 1 fast) defaults to each rollout's mode.
  """
  parts = [full_sequences(ro, None if ref_logp is None else ref_logp[i]) for i, ro in enumerate(rollouts)]
  seq_len = max(p["tokens"].shape[1] for p in parts)
  pad = lambda x, v: np.pad(x, [(0, 0), (0, seq_len - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=v)
  seq = {k: np.concatenate([pad(p[k], pad_id if k == "tokens" else 0) if k in _TIME_KEYS else p[k]
                            for p in parts]) for k in parts[0]}
  prompt_ids = np.concatenate([ro.prompt_index for ro in rollouts])
  if mode_ids_B is None:
    mode_ids_B = np.concatenate([np.full(len(ro.prompt_index), prompts.MODES.index(ro.mode), np.int32)
                                 for ro in rollouts])
  order = assembly.prompt_major_order(prompt_ids)
  seq = {k: v[order] for k, v in seq.items()}
  valid = np.ones(len(order), bool) if valid_B is None else np.asarray(valid_B, bool)[order]
  feats = {k: seq.get(k) for k in ("video", "video_mask", "audio", "audio_mask")}
  return RLBatch(
      inputs=base.ModelInputs(tokens=seq["tokens"], positions=seq["positions"], mask=seq["mask"], **feats),
      completion_mask=seq["completion_mask"] & valid[:, None],  # invalid groups carry no loss
      advantages=np.asarray(advantages_B, np.float32)[order],
      old_logp=None,  # the step takes the trainer's own log-probs before its first update (train_step)
      behaviour_logp=seq["behaviour_logp"],
      ref_logp=seq.get("ref_logp"),
      mode_ids=np.asarray(mode_ids_B, np.int32)[order],  # StepConfig.mode_names: 0 slow, 1 fast
      loss_start=min(ro.prompt.tokens.shape[1] for ro in rollouts) - 1,  # completions start at a bucket
  )


_TIME_KEYS = ("tokens", "mask", "positions", "completion_mask", "behaviour_logp", "ref_logp")


# --------------------------------------------------------------------------------------------- the scorer


@flax.struct.dataclass
class Sequences:
  """Completions to score in a prompt's context (a sampler.Rollout has the same fields)."""

  prompt: base.ModelInputs  # P prompts, left-padded (prompt_batch.prepare_prompts)
  completion: jax.Array  # [B, T] int32
  completion_mask: jax.Array  # [B, T] bool
  num_samples: int = flax.struct.field(pytree_node=False, default=1)


def make_sequences(inputs: base.ModelInputs, completions: Sequence[Sequence[int]], *, mode: str, num_samples: int,
                   vocab_size: int, fast_prefix_ids: Sequence[int] | None = None, pad_id: int = 0,
                   buckets: Sequence[int] = PROMPT_BUCKETS,
                   completion_buckets: Sequence[int] = COMPLETION_BUCKETS) -> Sequences:
  """Host-side: P prompts plus B = P * num_samples token lists (e.g. a slow answer teacher-forced in the fast
  context, method.md SFC step 4), right-padded to a completion bucket."""
  prompt = prompt_batch.prepare_prompts(inputs, mode=mode, vocab_size=vocab_size, fast_prefix_ids=fast_prefix_ids,
                                        pad_id=pad_id, buckets=buckets)
  if len(completions) != prompt.tokens.shape[0] * num_samples:
    raise ValueError(f"{len(completions)} completions for {prompt.tokens.shape[0]} prompts x {num_samples} samples")
  t = prompt_batch.bucket(max([len(c) for c in completions] + [1]), completion_buckets, "completion")
  toks, mask = np.full((len(completions), t), pad_id, np.int32), np.zeros((len(completions), t), bool)
  for i, c in enumerate(completions):
    toks[i, :len(c)] = prompt_batch.check_ids(c, vocab_size, f"completion {i} token")
    mask[i, :len(c)] = True
  return Sequences(prompt=prompt, completion=toks, completion_mask=mask, num_samples=num_samples)


@flax.struct.dataclass
class Scores:
  logp: jax.Array  # [B, T] float32 log p(completion[t] | context), 0 off the mask
  entropy: jax.Array | None = None  # [B, T] float32 when asked for
  logmass: jax.Array | None = None  # [B, A, K, C] float32 category log-mass at the anchors (rl.category_logmass)
  anchor_mask: jax.Array | None = None  # [B, A] bool
  anchor_index: jax.Array | None = None  # [B, A] int32: anchor a predicts completion token anchor_index[b, a]


@dataclasses.dataclass(frozen=True)
class _ScoreSpec:
  num_samples: int
  chunk_size: int
  with_entropy: bool
  anchors: AnchorSpec | None
  layout: sharding.BatchLayout | None


def _anchor_logmass(spec: _ScoreSpec, prompt, completion_BxT, mask_BxT, h_pred_BxTxD, w_DxV, token_sets):
  """(logmass_BxAxKxC, anchor_mask_BxA, anchor_index_BxA) at the anchors of each completion (E3 steps 1-2)."""
  a, g = spec.anchors, spec.num_samples
  # The token sitting at each h_pred position (fast mode: <answer> is the prompt's last token).
  ctx_BxT = jnp.concatenate([jnp.repeat(prompt.tokens[:, -1:], g, 0), completion_BxT[:, :-1]], axis=1)
  ctx_mask = jnp.concatenate([jnp.repeat(prompt.mask[:, -1:], g, 0), mask_BxT[:, :-1]], axis=1)
  idx_BxA, amask_BxA = rl.answer_anchors(ctx_BxT, ctx_mask, a.answer_open, jnp.asarray(a.separators, jnp.int32),
                                         a.answer_close, a.num_anchors)
  h_BxAxD = jnp.take_along_axis(h_pred_BxTxD, idx_BxA[..., None], axis=1)
  logmass = rl.category_logmass_from_hidden(h_BxAxD, w_DxV, token_sets, chunk_size=spec.chunk_size)
  return logmass, amask_BxA, idx_BxA


def _score(model, spec: _ScoreSpec, params, prompt: base.ModelInputs, completion_BxT, mask_BxT, token_sets):
  t, length = completion_BxT.shape[1], prompt.tokens.shape[1]
  w_DxV = model.unembed_weight(params)
  cache, h_last_Px1xD, next_P = shared_prefix.prefill_prompts(model, params, prompt, length + t, spec.layout)
  cache, last_Bx1xD, next_B = shared_prefix.repeat_rows((cache, h_last_Px1xD, next_P), spec.num_samples, spec.layout)
  pos = prompt_batch.text_positions(next_B, t, prompt.positions)
  x = model.embed(params, base.ModelInputs(tokens=completion_BxT, positions=pos, mask=mask_BxT))
  h_BxTxD, _ = model.hidden(params, x, cache)
  # h_pred[t] is the state that predicts completion[t]: the prompt's last column for t = 0.
  h_pred_BxTxD = jnp.concatenate([last_Bx1xD, h_BxTxD[:, :-1]], axis=1)
  out = rl.token_logprobs(h_pred_BxTxD, w_DxV, completion_BxT, chunk_size=spec.chunk_size,
                          with_entropy=spec.with_entropy)
  logp, ent = out if spec.with_entropy else (out, None)
  scores = Scores(logp=jnp.where(mask_BxT, logp, 0.0), entropy=None if ent is None else jnp.where(mask_BxT, ent, 0.0))
  if spec.anchors is None:
    return scores
  logmass, amask, idx = _anchor_logmass(spec, prompt, completion_BxT, mask_BxT, h_pred_BxTxD, w_DxV, token_sets)
  return scores.replace(logmass=logmass, anchor_mask=amask, anchor_index=idx)


_score_jit = jax.jit(_score, static_argnames=("model", "spec"))


def _check_sequences(model, seqs: Sequences, max_cache_len: int | None) -> None:
  p, b = seqs.prompt.tokens.shape[0], seqs.completion.shape[0]
  if b != p * seqs.num_samples:
    raise ValueError(f"{b} completion rows for {p} prompts x {seqs.num_samples} samples")
  vocab = model.config.vocab_size
  if np.shape(seqs.completion_mask) != np.shape(seqs.completion) or np.ndim(seqs.completion) != 2:
    raise ValueError(f"seqs.completion {np.shape(seqs.completion)} and seqs.completion_mask "
                     f"{np.shape(seqs.completion_mask)} must both be [B, T]")
  # A global array spread over processes comes from `sample`, which produced in-vocabulary ids itself.
  local = not isinstance(seqs.completion, jax.Array) or seqs.completion.is_fully_addressable
  comp_np = np.asarray(seqs.completion) if local else np.zeros((1, 1), np.int32)
  bad = (comp_np < 0) | (comp_np >= vocab)
  if bad.any():
    raise ValueError(f"seqs.completion holds ids outside the vocabulary [0, {vocab}): "
                     f"{np.unique(comp_np[bad])[:8].tolist()} in rows {np.nonzero(bad.any(1))[0][:8].tolist()}")
  prompt_batch.check_prompt_rows(np.asarray(seqs.prompt.tokens), np.asarray(seqs.prompt.mask).astype(bool), vocab,
                                 "seqs.prompt")
  prompt_batch.check_cache_length(model, seqs.prompt.tokens.shape[1], np.shape(seqs.completion)[1], max_cache_len,
                                  "completion length")


def score(model, params, seqs: Sequences, *, chunk_size: int = 8192, with_entropy: bool = False,
          token_sets: jax.Array | None = None, anchors: AnchorSpec | None = None,
          max_cache_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
          axis_rules: Mapping[str, Any] | None = None) -> Scores:
  """Teacher-forced log-probs of `seqs.completion` given its prompt, in one compiled forward pass (no gradient).

  `seqs` is a `Sequences` or a sampler.Rollout (same fields). With `token_sets` ([K, C, V],
  rewards.category_token_sets) and `anchors`, also the category log-mass at the answer anchors (method.md SFC
  steps 1-3 on a slow rollout, step 4 on a fast teacher-forced answer).

  Hand-built `Sequences` are checked on the host before anything compiles, like `sample`'s input: completion and
  mask shapes, every completion id (padding included: it is embedded too) and every real prompt id inside the
  vocabulary, left-padded prompts, and prompt bucket + completion length within the cache (`max_cache_len`,
  default model.config.max_seq_len).
  """
  if (token_sets is None) != (anchors is None):
    raise ValueError("category log-mass needs both token_sets and anchors")
  if token_sets is not None and token_sets.shape[-1] != model.config.vocab_size:
    raise ValueError(f"token_sets vocab {token_sets.shape[-1]} != model vocab {model.config.vocab_size}")
  _check_sequences(model, seqs, max_cache_len)
  layout = sharding.BatchLayout.make(mesh, axis_rules) if mesh is not None else None
  prompt, completion, mask = seqs.prompt, seqs.completion, seqs.completion_mask
  if layout is not None:
    layout.check_rows(prompt.tokens.shape[0])
    prompt, completion, mask = layout.place((prompt, completion, mask))
  spec = _ScoreSpec(seqs.num_samples, chunk_size, with_entropy, anchors, layout)
  return _score_jit(model, spec, params, prompt, jnp.asarray(completion, jnp.int32), jnp.asarray(mask, bool),
                    token_sets)


# ------------------------------------------------------------------------------------ the experience passes


def calibration_logmass(ctx: experience.Context, params, inputs: base.ModelInputs, slow: rollout.Rollout,
                        num_anchors: int, buckets: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(S_slow, S_fast [B_s, A, K, C], anchor_mask [B_s, A]) on the host (method.md E3 steps 1-4): the slow
  answers scored in their own context, then teacher-forced in the fast context (prompt + FAST_PREFIX)."""
  kw = dict(token_sets=ctx.token_sets, anchors=ctx.ids.anchors(num_anchors), mesh=ctx.mesh,
            axis_rules=ctx.axis_rules)
  s_slow = score(ctx.model, params, slow, **kw)
  comp, lengths = np.asarray(slow.completion), np.asarray(slow.length)
  answers = [experience.answer_tokens(comp[r], int(lengths[r]), ctx.ids) for r in range(len(comp))]
  seqs = make_sequences(inputs, answers, mode="fast", num_samples=slow.num_samples,
                                vocab_size=ctx.model.config.vocab_size, fast_prefix_ids=ctx.ids.fast_prefix,
                                pad_id=ctx.ids.pad, buckets=buckets)
  s_fast = score(ctx.model, params, seqs, **kw)
  # The host values on every process: the reward is host work like the others.
  return sharding.to_host((s_slow.logmass, s_fast.logmass, s_slow.anchor_mask & s_fast.anchor_mask))


def passes(ctx: experience.Context, settings: experience.ExperienceSettings, params, ref_params, inputs, ros, use_cal):
  """(reference log-probs per rollout [B_m, T] or None, calibration log-masses or None, None): rollout.score over
  each rollout's own (repeated) prompt."""
  ref = None if ref_params is None else [sharding.to_host(score(
      ctx.model, ref_params, ro, mesh=ctx.mesh, axis_rules=ctx.axis_rules).logp) for ro in ros.values()]
  logmass = calibration_logmass(ctx, params, inputs, ros["slow"], settings.num_anchors,
                                settings.prompt_buckets) if use_cal else None
  return ref, logmass, None




# ------------------------------------------------------------------------------------------------- the step


def rl_step(model, optimizer, cfg: ts.StepConfig) -> Callable:
  """train_step.make_rl_step's update on an RLBatch (unsharded): the same machinery (micro-batch accumulation,
  ppo_epochs x mini_batches updates, the skip on non-finite values) around this module's loss."""
  loss = make_rl_loss(model, cfg)
  updates = cfg.ppo_epochs * cfg.mini_batches

  def one_update(state, batch: RLBatch, beta, key):
    mask = batch.completion_mask[:, 1:].astype(jnp.float32)
    num_tokens, num_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
    trainable, frozen = ts.optim.split_trainable(state.params, state.freeze)
    value, grads, stats = ts._accumulate(lambda p, mb, k: loss(p, mb, beta, num_tokens, num_seqs, k), trainable,
                                         frozen, batch, cfg.micro_batches, key)
    return ts._apply(optimizer, state, trainable, frozen, value, grads, stats)

  def step(state, batch: RLBatch):
    beta = rl.beta_at(state.step, cfg.beta, decay_steps=cfg.beta_decay_steps, final_beta=cfg.beta_final)
    key = ts._dropout_key(cfg, state.step)
    if updates == 1:
      state, m = one_update(state, batch, beta, base.fold_key(key, 0))
      return state, {**m, **rl.finalize_stats(ts._loss_stats(m))}
    old, _ = old_logprobs(model, cfg, state.params, batch)
    parts = ts._micro_split(batch.replace(old_logp=old), cfg.mini_batches)
    start, ms = state.step, []
    for i in range(updates):
      mb = jax.tree.map(lambda x, i=i: x[i % cfg.mini_batches], parts)
      state, m = one_update(state, mb, beta, base.fold_key(key, i))
      ms.append(m)
    stats = functools.reduce(rl_loss.combine_stats, [ts._loss_stats(m) for m in ms])
    return state.replace(step=start + 1), {**rl.finalize_stats(stats),
                                           "loss": jnp.mean(jnp.stack([m["loss"] for m in ms]))}

  return jax.jit(step)


def as_grouped(batch: RLBatch) -> grouped.GroupedRLBatch:
  """The library's batch holding the same rows: each row its own prompt (the columns up to loss_start) with one
  suffix (the rest), so the grouped loss sees exactly the sequences, masks and per-token values of `batch`. With
  `mode_ids`, one segment per mode present, a row carrying loss (and its advantage) in its own mode's only."""
  k = batch.loss_start + 1
  cut = lambda a: None if a is None else jnp.asarray(a)[:, None, k:]  # noqa: E731 ([B, L] -> [B, 1, L - k])
  inputs = batch.inputs
  prompt = inputs.replace(tokens=inputs.tokens[:, :k], positions=inputs.positions[:, :k], mask=inputs.mask[:, :k])
  adv = jnp.asarray(batch.advantages)[:, None]
  modes = [0] if batch.mode_ids is None else sorted(set(np.asarray(batch.mode_ids).tolist()))
  segs = []
  for m in modes:
    mine = jnp.ones(adv.shape, bool) if batch.mode_ids is None else (jnp.asarray(batch.mode_ids) == m)[:, None]
    segs.append(grouped.Segment(
        tokens=cut(inputs.tokens), positions=cut(inputs.positions), mask=cut(inputs.mask),
        loss_mask=cut(batch.completion_mask) & mine[..., None], advantages=jnp.where(mine, adv, 0.0),
        ref_logp=cut(batch.ref_logp), old_logp=cut(batch.old_logp), behaviour_logp=cut(batch.behaviour_logp),
        mode_id=int(m)))
  return grouped.GroupedRLBatch(prompt=prompt, segments=tuple(segs))
