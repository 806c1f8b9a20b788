"""Optimizers from config: AdamW with warmup and cosine/constant schedules, clipping, and frozen subtrees.

Freezing is data: a tuple of regexes over '/'-joined parameter paths (``models.base.path_str``). Frozen leaves
get ``optax.set_to_zero`` (no optimizer state, no update), and XLA drops their gradient computation because
nothing reads it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from merr1_jax.models import base


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW hyper-parameters (defaults: method.md training recipe, scaled for the tiny embedded model)."""

  learning_rate: float = 1e-5
  schedule: str = "constant"  # 'constant' | 'cosine' (both after a linear warmup)
  warmup_steps: int = 0
  total_steps: int = 1  # cosine horizon, warmup included
  final_lr_fraction: float = 0.1  # cosine floor, as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0  # global-norm gradient clipping; None disables it

  def __post_init__(self):
    if self.schedule not in ("constant", "cosine"):
      raise ValueError(f"optimizer schedule {self.schedule!r}: expected 'constant' or 'cosine'")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
    if self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
      raise ValueError(f"cosine needs total_steps ({self.total_steps}) > warmup_steps ({self.warmup_steps})")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  if cfg.schedule == "constant":
    if cfg.warmup_steps:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), optax.constant_schedule(
              cfg.learning_rate)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.learning_rate)
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.total_steps, cfg.learning_rate * cfg.final_lr_fraction)


def trainable_mask(params: Any, freeze: Sequence[str] = ()) -> Any:
  """Bool pytree like ``params``: False where a freeze regex matches the parameter's path."""
  pats = [re.compile(p) for p in freeze]
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(p.search(base.path_str(path)) for p in pats), params)


def check_freeze_patterns(params: Any, freeze: Sequence[str]) -> None:
  """A freeze regex that matches nothing is almost always a typo: fail loudly."""
  names = [base.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pat in freeze:
    if not any(re.search(pat, n) for n in names):
      raise ValueError(f"freeze pattern {pat!r} matches no parameter; parameters look like {names[:4]}")


def make_optimizer(cfg: OptimConfig, params: Any, freeze: Sequence[str] = ()) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) behind global-norm clipping; frozen subtrees get no update and no state."""
  check_freeze_patterns(params, freeze)
  decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if not freeze:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(params, freeze))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
