"""Optimizers from config: AdamW with warmup and cosine/constant schedules, clipping, and frozen subtrees.

Freezing is data: a tuple of regexes over '/'-joined parameter paths (``models.base.path_str``). A frozen leaf is
not an input of the gradient at all: ``split_trainable`` cuts the parameters into a trainable and a frozen part
(each with ``optax.MaskedNode()`` where the other part has a leaf), the train step differentiates with respect to
the trainable part only and merges the two inside the loss (``merge``). So frozen leaves have no gradient, no
accumulator, no optimizer state (the optimizer is initialised on the trainable part), and count neither in
``grad_norm`` nor in the clipping norm.

Shape legend: none (pytree plumbing only). Convention: "params" is the model's pytree (an nnx.State for the
bundled adapters); "trainable" and "frozen" have its structure, with MaskedNode in place of the other's leaves.
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
  clip_norm: float | None = 1.0  # global-norm gradient clipping (trainable leaves only); None disables it

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


def _frozen(name: str, pats: Sequence[re.Pattern]) -> bool:
  return any(p.search(name) for p in pats)


def trainable_mask(params: Any, freeze: Sequence[str] = ()) -> Any:
  """Bool pytree like ``params``: False where a freeze regex matches the parameter's path."""
  pats = [re.compile(p) for p in freeze]
  return jax.tree_util.tree_map_with_path(lambda path, _: not _frozen(base.path_str(path), pats), params)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def split_trainable(params: Any, freeze: Sequence[str] = ()) -> tuple[Any, Any]:
  """(trainable, frozen): ``params`` twice, each with ``optax.MaskedNode()`` where the other holds the leaf.

  Without freeze patterns, ``trainable`` is ``params`` itself and ``frozen`` holds no leaf.
  """
  if not freeze:
    return params, jax.tree.map(lambda _: optax.MaskedNode(), params)
  pats = [re.compile(p) for p in freeze]
  pick = lambda want_frozen: jax.tree_util.tree_map_with_path(
      lambda path, x: x if _frozen(base.path_str(path), pats) == want_frozen else optax.MaskedNode(), params)
  return pick(False), pick(True)


def merge(trainable: Any, frozen: Any) -> Any:
  """Inverse of ``split_trainable``: the full parameter pytree."""
  return jax.tree.map(lambda t, f: f if _is_masked(t) else t, trainable, frozen, is_leaf=_is_masked)


def check_freeze_patterns(params: Any, freeze: Sequence[str]) -> None:
  """A freeze regex that matches nothing is almost always a typo: fail loudly."""
  names = [base.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  for pat in freeze:
    if not any(re.search(pat, n) for n in names):
      raise ValueError(f"freeze pattern {pat!r} matches no parameter; parameters look like {names[:4]}")


def make_optimizer(cfg: OptimConfig, params: Any, freeze: Sequence[str] = ()) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (weight decay on matrices only), for the *trainable* leaves.

  ``freeze`` is checked against ``params`` (a pattern that matches nothing fails), and the returned optimizer
  refuses, at ``init``, a tree that still holds a frozen leaf: initialise it on
  ``split_trainable(params, freeze)[0]``, as ``train_step.init_state`` does, so frozen leaves get no state.
  """
  check_freeze_patterns(params, freeze)
  decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # any structure: full or trainable part
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if not freeze:
    return tx
  pats = [re.compile(p) for p in freeze]

  def init(tree):
    names = [base.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    bad = [n for n in names if _frozen(n, pats)]
    if bad:
      raise ValueError(f"optimizer built with freeze={tuple(freeze)} was given frozen leaves {bad[:4]}; "
                       "initialise it on optim.split_trainable(params, freeze)[0] (train_step.init_state does)")
    return tx.init(tree)

  return optax.GradientTransformation(init, tx.update)
