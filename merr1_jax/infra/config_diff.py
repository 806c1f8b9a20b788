"""Which config fields differ between a checkpoint and the run resuming it (checkpoint.IncompatibleCheckpointError)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

# Config fields that do not change what a saved state means: where and how often things are written or
# evaluated. A pattern matches a dotted key, one of its dotted prefixes, or one of its components.
DEFAULT_IGNORE_KEYS = frozenset({
    "workdir", "checkpoint", "checkpoints", "logging", "log_every", "log_every_steps", "eval_every",
    "eval_every_steps", "eval", "wandb", "tensorboard", "profile", "profiler", "num_train_steps_override",
})


_ABSENT = "<absent>"

# Fields added to the config after checkpoints of earlier versions existed, with the value that reproduces the
# earlier behaviour: a checkpoint without the field was made with that value, so it is no difference (a workdir
# from before the field resumes as it is; any other value is reported as usual).
ADDED_FIELDS: dict[str, Any] = {
    "model.attention": "reference",  # 2026-12-06: the attention kernel switch (ModelConfig.attention)
}


def _flatten_json(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested JSON dicts -> {dotted key: leaf}; lists are leaves (compared whole)."""
  if isinstance(tree, Mapping) and tree:
    out = {}
    for k, v in tree.items():
      out.update(_flatten_json(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def _ignored(key: str, patterns: Iterable[str]) -> bool:
  parts = key.split(".")
  names = parts + [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
  return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def config_differences(stored: Mapping[str, Any], now: Mapping[str, Any],
                       ignore_keys: Iterable[str] = DEFAULT_IGNORE_KEYS) -> list[tuple[str, Any, Any]]:
  """(dotted key, stored, now) for every field that differs and is not ignored, sorted by key."""
  a, b = _flatten_json(stored), _flatten_json(now)
  ignore_keys = tuple(ignore_keys)
  diffs = []
  for key in sorted(a.keys() | b.keys()):
    if _ignored(key, ignore_keys):
      continue
    va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
    if va == _ABSENT and key in ADDED_FIELDS and vb == ADDED_FIELDS[key]:
      continue
    if va != vb:
      diffs.append((key, va, vb))
  return diffs
