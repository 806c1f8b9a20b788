"""The RL update's loss and old-policy pass on the grouped batch (rollout.passes.GroupedRLBatch).

`make_grouped_loss` is method.md E4 (PPO-clip + beta KL - entropy, rl.policy_loss) summed over the batch's
segments with the whole update's token counts as the normalisers, so micro-batches do not change it;
`old_logprobs` is the trainer's own log-probs at the rollout weights before the first of several updates.

Shape legend: P prompts, G suffixes of a segment per prompt, T its suffix length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from merr1_jax import rl
from merr1_jax.rl import loss as rl_loss
from merr1_jax.rollout.passes import GroupedRLBatch, grouped_logprobs

Array = jax.Array


def token_counts(batch: GroupedRLBatch) -> tuple[Array, Array]:
  """(loss tokens, sequences with a loss token) over every segment: the token_mean / seq-mean normalisers."""
  masks = [s.loss_mask.astype(jnp.float32) for s in batch.segments]
  return sum(m.sum() for m in masks), sum((m.sum(-1) > 0).sum() for m in masks)


def make_grouped_loss(model, cfg) -> Callable:
  """``loss(params, batch, beta, num_tokens, num_seqs, dropout_key) -> (loss, summed stats)`` on a
  GroupedRLBatch; `cfg` is a train_step.StepConfig. Each segment adds its share of the aggregated loss (the
  normalisers are global, so the sum is the loss of all segments together) and its summed statistics."""
  lc = cfg.loss

  def loss_fn(params, batch: GroupedRLBatch, beta, num_tokens=None, num_seqs=None, dropout_key=None):
    if num_tokens is None:
      num_tokens, num_seqs = token_counts(batch)
    if cfg.beta > 0 and any(s.ref_logp is None for s in batch.segments):
      raise ValueError(f"StepConfig.beta = {cfg.beta} > 0 but a segment has no ref_logp: the KL penalty needs the "
                       "reference log-probs, or set beta = 0")
    outs = grouped_logprobs(model, params, batch.prompt, batch.segments, chunk_size=cfg.vocab_chunk,
                            with_entropy=True, dropout_key=dropout_key)
    total, stats = jnp.zeros((), jnp.float32), None
    for seg, (logp, ent) in zip(batch.segments, outs):
      flat = lambda a: None if a is None else a.reshape(-1, a.shape[-1])  # noqa: E731
      if not lc.entropy_coef:
        ent = jax.lax.stop_gradient(ent)
      old = jax.lax.stop_gradient(logp) if seg.old_logp is None else seg.old_logp
      behaviour = None if seg.old_logp is not None else seg.behaviour_logp
      lcfg = lc if lc.max_len is not None else dataclasses.replace(lc, max_len=seg.tokens.shape[-1])
      mode_B = jnp.full((seg.advantages.size,), seg.mode_id, jnp.int32)
      loss, st = rl.policy_loss(flat(logp), flat(old), None if cfg.beta == 0 else flat(seg.ref_logp),
                                seg.advantages.reshape(-1), flat(seg.loss_mask), lcfg, beta=beta,
                                entropy_BxT=flat(ent), num_tokens=num_tokens, num_seqs=num_seqs, group_B=mode_B,
                                group_names=cfg.mode_names, behaviour_BxT=flat(behaviour))
      total = total + loss
      stats = st if stats is None else rl_loss.combine_stats(stats, st)
    return total, stats

  return loss_fn


def old_logprobs(model, cfg, params, batch: GroupedRLBatch) -> tuple[GroupedRLBatch, dict[str, Array]]:
  """The batch with every segment's old_logp set to the trainer's log-probs at `params` (no gradient), and the
  mean |behaviour - trainer| gap over the loss tokens, in total and per mode."""
  outs = grouped_logprobs(model, params, batch.prompt, batch.segments, chunk_size=cfg.vocab_chunk,
                          with_entropy=False)
  segments, sums = [], {}
  for seg, (logp, _) in zip(batch.segments, outs):
    logp = jax.lax.stop_gradient(logp)
    m = seg.loss_mask.astype(jnp.float32)
    beh = jnp.zeros_like(logp) if seg.behaviour_logp is None else seg.behaviour_logp
    gap = (jnp.abs(logp - beh) * m).sum()
    for suffix in ("", f"/{cfg.mode_names[seg.mode_id]}"):
      sums[f"gap{suffix}"] = sums.get(f"gap{suffix}", 0.0) + gap
      sums[f"n{suffix}"] = sums.get(f"n{suffix}", 0.0) + m.sum()
    segments.append(seg.replace(old_logp=logp))
  gaps = {"behaviour_logp_gap" + k[3:]: sums[k] / jnp.maximum(sums["n" + k[3:]], 1.0) for k in sums if k[:3] == "gap"}
  return batch.replace(segments=tuple(segments)), gaps
