"""The update's batch from one step's host rollouts: a GroupedRLBatch (each prompt once, the completions as
per-mode suffixes; merr1_jax/rollout/passes.py).

Rollouts come in rollout order (the slow block, then the fast block; prompt p's samples of a mode at p*G_m ..) with
their advantages, and become one segment per mode of [P, G_m] rows.

Shape legend: P prompts, G_m samples per prompt of mode m, B rows, L prompt bucket, T completion length.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from merr1_jax import rollout
from merr1_jax.models import base
from merr1_jax.rollout import passes as grouped
from merr1_jax.task import prompts


def prompt_major_order(prompt_ids_B: np.ndarray) -> np.ndarray:
  """The permutation that makes each prompt's rows contiguous, keeping their order (slow rows, then fast)."""
  return np.argsort(prompt_ids_B, kind="stable")


def segments(rollouts: Sequence[rollout.Rollout], prompt: base.ModelInputs, *, fast_prefix_ids: Sequence[int],
             valid_B: np.ndarray | None = None) -> list[grouped.Segment]:
  """One host Segment per rollout (rollout order) against their slow-rendered `prompt`; rows with `valid_B` False
  (over all rollouts' rows) carry no loss. Advantages are 0 until `assemble`."""
  out, start = [], 0
  valid = None if valid_B is None else np.asarray(valid_B, bool)
  for ro in rollouts:
    b = ro.completion.shape[0]
    out.append(grouped.segment(ro, prompt, fast_prefix_ids=fast_prefix_ids, mode_id=prompts.MODES.index(ro.mode),
                               valid_B=None if valid is None else valid[start:start + b]))
    start += b
  return out


def assemble(segs: Sequence[grouped.Segment], prompt: base.ModelInputs, advantages_B: np.ndarray,
             ref_logp: Sequence[np.ndarray] | None = None) -> grouped.GroupedRLBatch:
  """The GroupedRLBatch of `segments`' output with the rows' advantages (rollout order) and, for a KL penalty,
  each segment's reference log-probs [P, G, T] (aligned with its suffix tokens)."""
  if ref_logp is not None:
    segs = [s.replace(ref_logp=np.asarray(r, np.float32)) for s, r in zip(segs, ref_logp)]
  batch = grouped.GroupedRLBatch(prompt=prompt, segments=tuple(segs))
  return batch.with_advantages(np.asarray(advantages_B, np.float32))
