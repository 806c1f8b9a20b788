"""The update's batch from one step's host rollouts: an RLBatch (every row its whole sequence) or a
GroupedRLBatch (each prompt once, the completions as per-mode suffixes).

`assemble` is the ungrouped layout that the trainer used before prefix grouping and that stays the reference
implementation (`rl.prefix_grouped=False`, benchmarks/rl_step.py); `assemble_grouped` builds the grouped one
(merr1_jax/grouped.py) from the same rollouts. Both take rows in rollout order (the slow block, then the fast
block; prompt p's samples of a mode at p*G_m ..) with their advantages; the RLBatch lays them out prompt-major
(one permutation), the GroupedRLBatch holds them as [P, G_m] per segment.

Shape legend: P prompts, G_m samples per prompt of mode m, B rows, L prompt bucket, T completion length.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from merr1_jax import grouped, prompts, rollout
from merr1_jax import train_step as ts
from merr1_jax.models import base


def _full_sequences(ro: rollout.Rollout, ref_logp: np.ndarray | None) -> dict[str, np.ndarray]:
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


def prompt_major_order(prompt_ids_B: np.ndarray) -> np.ndarray:
  """The permutation that makes each prompt's rows contiguous, keeping their order (slow rows, then fast)."""
  return np.argsort(prompt_ids_B, kind="stable")


def assemble(rollouts: Sequence[rollout.Rollout], advantages_B: np.ndarray, *, pad_id: int,
             ref_logp: Sequence[np.ndarray | None] | None = None, valid_B: np.ndarray | None = None,
             mode_ids_B: np.ndarray | None = None) -> ts.RLBatch:
  """The RLBatch of one step from host rollouts (in rollout order, e.g. slow then fast) and their rows' values.

  Sequences are padded to one length, then laid out prompt-major (`prompt_major_order`); `valid_B` False rows
  carry no loss; `mode_ids_B` (0 slow, 1 fast) defaults to each rollout's mode.
  """
  parts = [_full_sequences(ro, None if ref_logp is None else ref_logp[i]) for i, ro in enumerate(rollouts)]
  seq_len = max(p["tokens"].shape[1] for p in parts)
  pad = lambda x, v: np.pad(x, [(0, 0), (0, seq_len - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=v)
  seq = {k: np.concatenate([pad(p[k], pad_id if k == "tokens" else 0) if k in _TIME_KEYS else p[k]
                            for p in parts]) for k in parts[0]}
  prompt_ids = np.concatenate([ro.prompt_index for ro in rollouts])
  if mode_ids_B is None:
    mode_ids_B = np.concatenate([np.full(len(ro.prompt_index), prompts.MODES.index(ro.mode), np.int32)
                                 for ro in rollouts])
  order = prompt_major_order(prompt_ids)
  seq = {k: v[order] for k, v in seq.items()}
  valid = np.ones(len(order), bool) if valid_B is None else np.asarray(valid_B, bool)[order]
  feats = {k: seq.get(k) for k in ("video", "video_mask", "audio", "audio_mask")}
  return ts.RLBatch(
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


def slow_prompt(ros, inputs: base.ModelInputs, *, vocab_size: int, pad_id: int, buckets) -> base.ModelInputs:
  """The prompts in slow mode as the sampler prepares them (the grouped layout's shared prefix: a fast suffix
  carries FAST_PREFIX itself), from the slow rollout when there is one."""
  if "slow" in ros:
    return ros["slow"].prompt
  return rollout.prepare_prompts(inputs, mode="slow", vocab_size=vocab_size, pad_id=pad_id, buckets=buckets)


def assemble_grouped(rollouts: Sequence[rollout.Rollout], advantages_B: np.ndarray, prompt: base.ModelInputs, *,
                     fast_prefix_ids: Sequence[int], ref_logp: Sequence[np.ndarray | None] | None = None,
                     valid_B: np.ndarray | None = None) -> grouped.GroupedRLBatch:
  """The GroupedRLBatch of host rollouts (rollout order) against their slow-rendered `prompt`: one segment per
  rollout, its rows' advantages as [P, G]."""
  segments, start = [], 0
  valid = None if valid_B is None else np.asarray(valid_B, bool)
  for i, ro in enumerate(rollouts):
    b = ro.completion.shape[0]
    seg = grouped.segment(ro, prompt, fast_prefix_ids=fast_prefix_ids, mode_id=prompts.MODES.index(ro.mode),
                          ref_logp=None if ref_logp is None else ref_logp[i],
                          valid_B=None if valid is None else valid[start:start + b])
    adv = np.asarray(advantages_B, np.float32)[start:start + b].reshape(seg.advantages.shape)
    segments.append(seg.replace(advantages=adv))
    start += b
  return grouped.GroupedRLBatch(prompt=prompt, segments=tuple(segments))
