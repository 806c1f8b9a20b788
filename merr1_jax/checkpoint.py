"""Training checkpoints (orbax): exact resume of the train state, the data position and the rng, and the check
that a resumed run's config still gives the saved state its meaning.

One ``Checkpointer`` per training stage directory (e.g. ``WORKDIR/checkpoints/sft``, ``.../rl``). A step
directory holds three orbax items:
  * ``state``: the TrainState as a plain nested dict keyed by the leaves' path names (``models.base.path_str``
    split at '/'), so the format does not depend on flax / optax Python classes; restore rebuilds the caller's
    pytree type from ``abstract_state`` and names any missing, unexpected or reshaped leaf;
  * ``data``: the Grain iterator position (``grain.checkpoint.CheckpointSave``: one small JSON file per
    process, written in the blocking part of the save, so the trainer may advance the iterator right after);
  * ``meta``: JSON with the rng key (impl + key data as integers, exact), ``extra`` (small, e.g. stage and
    metrics) and the resolved config, which a later run compares with its own (``IncompatibleCheckpointError``).
Saves are asynchronous by default: ``save`` returns once the arrays are copied off the devices (the state may be
donated to the next step at once); the write and the atomic rename of ``<step>.orbax-checkpoint-tmp`` to
``<step>`` happen in the background. A crash before the rename leaves only a tmp directory, which
``latest_step`` never reports and which is deleted when the next Checkpointer opens the directory.

API:
  Checkpointer(directory, *, save_every, keep, async_save=True, config_json=None, force=False,
               ignore_keys=DEFAULT_IGNORE_KEYS, force_hint="force=True")
    .latest_step() -> int | None          .all_steps() -> list[int]
    .should_save(step) -> bool            (step % save_every == 0)
    .save(step, state, *, data_iter=None, rng=None, extra=None, force=False) -> bool  (False: not saved)
    .restore(step, abstract_state, *, data_iter=None) -> (state, rng | None, extra dict)
    .stored_config(step=None) -> dict | None
    .wait()   .close()   (also a context manager)
  IncompatibleCheckpointError(ValueError): .differences = [(dotted key, stored, now), ...]
  config_differences(stored, now, ignore_keys) -> list of (key, stored, now)
  abstract_with_shardings(state, shardings) -> ShapeDtypeStruct pytree carrying the shardings (restore's target)

The rest of a run's way through a crash or a preemption lives beside this module: ``preemption.PreemptionGuard``
(SIGTERM -> a save at the next step boundary) and ``artifacts`` (results and configs written atomically, the
final policy exported as a Hugging Face checkpoint).

Multi-host: every process constructs the Checkpointer and calls save / restore (orbax is collective); only
process 0 writes the JSON, each process its own data position.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from merr1_jax.models import base

_log = logging.getLogger(__name__)
FORMAT_VERSION = 1

# Config fields that do not change what a saved state means: where and how often things are written or
# evaluated. A pattern matches a dotted key, one of its dotted prefixes, or one of its components.
DEFAULT_IGNORE_KEYS = frozenset({
    "workdir", "checkpoint", "checkpoints", "logging", "log_every", "log_every_steps", "eval_every",
    "eval_every_steps", "eval", "wandb", "tensorboard", "profile", "profiler", "num_train_steps_override",
})


class IncompatibleCheckpointError(ValueError):
  """The directory's checkpoints were written under a config that differs on fields that give the state its
  meaning. ``differences`` lists (dotted key, stored value, current value); a missing key shows as '<absent>'."""

  def __init__(self, directory: str, step: int, differences: list[tuple[str, Any, Any]],
               force_hint: str = "force=True"):
    self.directory, self.step, self.differences = directory, step, differences
    lines = "; ".join(f"{k}: stored {s!r}, now {n!r}" for k, s, n in differences)
    super().__init__(
        f"checkpoints in {directory} (latest step {step}) were saved with a different config: {lines}. "
        f"Use a fresh directory, or pass {force_hint} to resume with the new values.")


# ------------------------------------------------------------------------------------------------ config


_ABSENT = "<absent>"


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
    if va != vb:
      diffs.append((key, va, vb))
  return diffs


def _parse_config(config_json: str | None) -> dict[str, Any] | None:
  if config_json is None:
    return None
  try:
    cfg = json.loads(config_json)
  except json.JSONDecodeError as e:
    raise ValueError(f"config_json is not valid JSON: {e}") from e
  if not isinstance(cfg, dict):
    raise ValueError(f"config_json must encode a JSON object, got {type(cfg).__name__}")
  return cfg


def _jsonable(x: Any) -> Any:
  """`extra` values -> JSON types (numpy / jax scalars and small arrays become numbers and lists)."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(x).tolist()
  if x is None or isinstance(x, (str, bool, int, float)):
    return x
  raise TypeError(f"checkpoint extra: {type(x).__name__} is not JSON-serialisable ({x!r:.80})")


# ------------------------------------------------------------------------------------------ state <-> dict


def _named_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """(path components, leaf) in tree-flatten order; raises if two leaves share a name."""
  out, seen = [], set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = base.path_str(path)
    if name in seen or not name:
      raise ValueError(f"train state leaf name {name!r} is empty or not unique; cannot checkpoint by name")
    seen.add(name)
    out.append((tuple(name.split("/")), leaf))
  return out


def _nest(named: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for parts, leaf in named:
    node = root
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"train state leaf {'/'.join(parts)!r} sits under another leaf's name")
    node[parts[-1]] = leaf
  return root


def _get(nested: Mapping[str, Any], parts: tuple[str, ...]) -> Any:
  for p in parts:
    nested = nested[p]
  return nested


def _abstract_leaf(name: str, x: Any) -> jax.ShapeDtypeStruct:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
    return x
  raise ValueError(f"abstract_state leaf {name!r} carries no sharding; build the target with "
                   "abstract_with_shardings(jax.eval_shape(...), shardings)")


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStruct pytree like `state` (arrays or ShapeDtypeStructs), each leaf carrying its sharding from
  `shardings` (a pytree of the same structure, or one Sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# ---------------------------------------------------------------------------------------------------- rng


def _rng_to_json(rng: jax.Array) -> dict[str, Any]:
  """Exact: the key's uint32 words as JSON integers, plus the impl name to re-wrap them."""
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    impl, data = str(jax.random.key_impl(rng)), jax.random.key_data(rng)
  else:  # a raw uint32 key (the legacy jax.random.PRNGKey form)
    impl, data = None, rng
  if not data.is_fully_addressable:  # a key replicated over hosts: every process holds the whole value
    if not data.is_fully_replicated:
      raise ValueError("the rng key to checkpoint is sharded over processes; pass a replicated key")
    data = data.addressable_data(0)
  data = np.asarray(jax.device_get(data))
  return {"impl": impl, "dtype": data.dtype.name, "data": data.tolist()}


def _rng_from_json(d: Mapping[str, Any]) -> jax.Array:
  data = jnp.asarray(np.asarray(d["data"], dtype=d["dtype"]))
  return data if d["impl"] is None else jax.random.wrap_key_data(data, impl=d["impl"])


# -------------------------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Saves and restores (state, data position, rng, extra, config) under one directory; see the module
  docstring. Opening a directory with checkpoints compares configs and raises IncompatibleCheckpointError
  (unless force=True); `force_hint` is how the error tells the user to force (the trainer: its flag)."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True,
               config_json: str | None = None, force: bool = False,
               ignore_keys: Iterable[str] = DEFAULT_IGNORE_KEYS, force_hint: str = "force=True"):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every, self.keep = int(save_every), int(keep)
    self.config = _parse_config(config_json)
    self.ignore_keys = frozenset(ignore_keys)
    self.async_save = bool(async_save)
    self.force_hint = force_hint
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, save_interval_steps=1,  # when to save is decided here (should_save / force)
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    # Handlers named up front, so that a freshly opened manager can read every item's metadata.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._check_config(force)

  # -- queries

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return int(step) % self.save_every == 0

  def _meta(self, step: int) -> dict[str, Any]:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def stored_config(self, step: int | None = None) -> dict[str, Any] | None:
    step = self._resolve(step)
    return self._meta(step).get("config")

  def _resolve(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
    elif step not in self._mngr.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
    return int(step)

  def _check_config(self, force: bool) -> None:
    step = self.latest_step()
    if step is None or self.config is None:
      return
    stored = self._meta(step).get("config")
    if stored is None:
      _log.warning("checkpoint %s/%d stores no config; cannot check compatibility", self.directory, step)
      return
    diffs = config_differences(stored, self.config, self.ignore_keys)
    if not diffs:
      return
    err = IncompatibleCheckpointError(self.directory, step, diffs, self.force_hint)
    if not force:
      raise err
    _log.warning("resuming anyway (forced): %s", err)

  # -- save / restore

  def save(self, step: int, state: Any, *, data_iter: Any = None, rng: jax.Array | None = None,
           extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves when should_save(step) or force; a step already on disk is not rewritten. Returns whether a save
    started. Asynchronous unless the Checkpointer was built with async_save=False."""
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    if step in self._mngr.all_steps():
      _log.info("checkpoint for step %d already exists in %s; not saving again", step, self.directory)
      return False
    meta = {"format": FORMAT_VERSION, "step": step, "extra": _jsonable(dict(extra or {})),
            "config": self.config, "rng": None if rng is None else _rng_to_json(rng),
            "has_data": data_iter is not None}
    items = {"state": ocp.args.StandardSave(_nest(_named_leaves(state))), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      _log.info("checkpoint step %d -> %s%s", step, self.directory, " (async)" if self.async_save else "")
    return bool(saved)

  def restore(self, step: int | None, abstract_state: Any, *,
              data_iter: Any = None) -> tuple[Any, jax.Array | None, dict[str, Any]]:
    """(state, rng or None, extra) of `step` (None: the latest), the state placed directly onto the shardings
    of `abstract_state` (ShapeDtypeStructs with .sharding, or arrays); `data_iter` is moved, in place, to the
    saved position."""
    self.wait()
    step = self._resolve(step)
    meta = self._meta(step)
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"checkpoint {self.directory}/{step}: format {meta.get('format')!r}, "
                       f"this code reads {FORMAT_VERSION}")
    named = [(parts, _abstract_leaf("/".join(parts), x)) for parts, x in _named_leaves(abstract_state)]
    self._check_tree(step, named)
    items = {"state": ocp.args.StandardRestore(_nest(named))}
    if data_iter is not None:
      if not meta.get("has_data"):
        raise ValueError(f"checkpoint {self.directory}/{step} has no data-iterator position to restore")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    leaves = [_get(restored.state, parts) for parts, _ in named]
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
    rng = None if meta.get("rng") is None else _rng_from_json(meta["rng"])
    return state, rng, meta.get("extra", {})

  def _check_tree(self, step: int, named: list[tuple[tuple[str, ...], jax.ShapeDtypeStruct]]) -> None:
    """One clear error for every leaf that the target and the checkpoint disagree on (name, shape, dtype)."""
    stored_tree = self._mngr.item_metadata(step)["state"].tree
    stored = {base.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
        stored_tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))[0]}
    want = {"/".join(parts): x for parts, x in named}
    problems = [f"missing in checkpoint: {k}" for k in sorted(want.keys() - stored.keys())]
    problems += [f"not in target: {k}" for k in sorted(stored.keys() - want.keys())]
    for k in sorted(want.keys() & stored.keys()):
      s, w = stored[k], want[k]
      if tuple(s.shape) != tuple(w.shape) or np.dtype(s.dtype) != np.dtype(w.dtype):
        problems.append(f"{k}: checkpoint {tuple(s.shape)} {np.dtype(s.dtype)}, "
                        f"target {tuple(w.shape)} {np.dtype(w.dtype)}")
    if problems:
      shown = "; ".join(problems[:20]) + (f"; ... {len(problems) - 20} more" if len(problems) > 20 else "")
      raise ValueError(f"checkpoint {self.directory}/{step} does not match the target state: {shown}")

  # -- lifecycle

  def wait(self) -> None:
    """Blocks until every started save is written and finalised."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()  # waits for in-flight saves first

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
