"""Training checkpoints (orbax): exact resume of the train state, the data position and the rng, and the check
that a resumed run's config still gives the saved state its meaning (docs/reliability.md "Checkpoints and exact
resume" says how: the three items of a step, asynchronous saves, the checksum manifest, falling back past a
damaged step).

`Checkpointer(directory, *, save_every, keep, ...)` saves, checks and restores steps (`restore_newest` falls back
past damaged ones); the errors are `IncompatibleCheckpointError`, `DamagedCheckpointError` and
`NoUsableCheckpointError`; `abstract_with_shardings` builds restore's target. The manifest (infra/manifest.py) and
the config comparison (infra/config_diff.py) are re-exported here. The API in full: docs/reliability.md, "The
checkpoint API".
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from merr1_jax.infra.config_diff import DEFAULT_IGNORE_KEYS, config_differences  # noqa: F401 (API)
from merr1_jax.infra.manifest import (  # noqa: F401 (MANIFEST, manifest_problems, write_manifest: the API)
  MANIFEST,
  ManifestTemporaryPath,
  manifest_problems,
  write_manifest,
)
from merr1_jax.infra.state_tree import (  # noqa: F401 (abstract_with_shardings: the API)
  abstract_leaf,
  abstract_with_shardings,
  get_nested,
  named_leaves,
  nest,
  rng_from_json,
  rng_to_json,
)
from merr1_jax.models import base

_log = logging.getLogger(__name__)
FORMAT_VERSION = 1

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


class DamagedCheckpointError(Exception):
  """A committed step that fails its manifest check or cannot be read. The message is one line:
  ``checkpoint <directory>/<step>: <what is wrong>``."""

  def __init__(self, directory: str, step: int, problem: str):
    self.path, self.step, self.problem = f"{directory}/{step}", int(step), problem
    super().__init__(f"checkpoint {self.path}: {problem}")


class NoUsableCheckpointError(DamagedCheckpointError):
  """Every step of a directory is damaged (restore_newest): each one's problem in one line."""

  def __init__(self, directory: str, damaged: list[DamagedCheckpointError]):
    self.path, self.step, self.damaged = directory, damaged[0].step, damaged
    self.problem = "; ".join(f"step {e.step}: {e.problem}" for e in damaged)
    Exception.__init__(self, f"no usable checkpoint in {directory} ({self.problem}); move the directory aside to "
                       "start the stage over")


def _brief(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line (TensorStore errors run to dozens of lines)."""
  text = " ".join(str(e).split())
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


_T = TypeVar("_T")


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


# -------------------------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Saves and restores (state, data position, rng, extra, config) under one directory; see the module
  docstring. Opening a directory with checkpoints compares configs and raises IncompatibleCheckpointError
  (unless force=True); `force_hint` is how the error tells the user to force (the trainer: its flag).
  `manifest=False` saves without the checksum manifest (for benchmarks/checkpoint_manifest.py only: such steps
  read as saved before manifests existed)."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True,
               config_json: str | None = None, force: bool = False,
               ignore_keys: Iterable[str] = DEFAULT_IGNORE_KEYS, force_hint: str = "force=True",
               manifest: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every ({save_every}) and keep ({keep}) must be >= 1")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every, self.keep = int(save_every), int(keep)
    self.config = _parse_config(config_json)
    self.ignore_keys = frozenset(ignore_keys)
    self.async_save = bool(async_save)
    self.force_hint = force_hint
    self.manifest = bool(manifest)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.keep, save_interval_steps=1,  # when to save is decided here (should_save / force)
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
        temporary_path_class=ManifestTemporaryPath if self.manifest else None)
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

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def _meta(self, step: int) -> dict[str, Any]:
    """The step's meta item; DamagedCheckpointError naming meta/metadata when it cannot be read."""
    if not os.path.isfile(os.path.join(self.step_dir(step), "meta", "metadata")):
      what = "meta/: missing" if not os.path.isdir(os.path.join(self.step_dir(step), "meta")) else \
          "meta/metadata: missing"
      raise DamagedCheckpointError(self.directory, step, what)
    try:
      meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # orbax's JSON handler names no file
      raise DamagedCheckpointError(self.directory, step, f"meta/metadata: cannot be read ({_brief(e)})") from e
    if not isinstance(meta, dict):
      raise DamagedCheckpointError(self.directory, step, f"meta/metadata: a JSON {type(meta).__name__}, "
                                   "not an object")
    return meta

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
    """Compares the config with the newest step whose meta reads (a damaged one is passed over with a warning:
    restore names it again and falls back)."""
    if self.config is None:
      return
    for step in sorted(self.all_steps(), reverse=True):
      try:
        stored = self._meta(step).get("config")
        diffs = [] if stored is None else config_differences(stored, self.config, self.ignore_keys)
        if diffs:
          self.check(step)  # flipped bytes in meta must not read as another config
      except DamagedCheckpointError as e:
        _log.warning("%s; comparing the config with an older step", e)
        continue
      break
    else:
      return
    if stored is None:
      _log.warning("checkpoint %s/%d stores no config; cannot check compatibility", self.directory, step)
      return
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
            "config": self.config, "rng": None if rng is None else rng_to_json(rng),
            "has_data": data_iter is not None, "manifest": self.manifest}
    items = {"state": ocp.args.StandardSave(nest(named_leaves(state))), "meta": ocp.args.JsonSave(meta)}
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
    saved position. DamagedCheckpointError when the step fails its manifest or cannot be read; ValueError
    when it does not fit `abstract_state`."""
    self.wait()
    step = self._resolve(step)
    meta = self.check(step)
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"checkpoint {self.directory}/{step}: format {meta.get('format')!r}, "
                       f"this code reads {FORMAT_VERSION}")
    named = [(parts, abstract_leaf("/".join(parts), x)) for parts, x in named_leaves(abstract_state)]
    self._check_tree(step, named)
    items = {"state": ocp.args.StandardRestore(nest(named))}
    if data_iter is not None:
      if not meta.get("has_data"):
        raise ValueError(f"checkpoint {self.directory}/{step} has no data-iterator position to restore")
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # TensorStore's dozens of lines, a KeyError, a JSON error: one line naming the step
      raise DamagedCheckpointError(self.directory, step, f"cannot be read ({_brief(e)})") from e
    leaves = [get_nested(restored.state, parts) for parts, _ in named]
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
    rng = None if meta.get("rng") is None else rng_from_json(meta["rng"])
    return state, rng, meta.get("extra", {})

  def _check_tree(self, step: int, named: list[tuple[tuple[str, ...], jax.ShapeDtypeStruct]]) -> None:
    """One clear error for every leaf that the target and the checkpoint disagree on (name, shape, dtype)."""
    try:
      stored_tree = self._mngr.item_metadata(step)["state"].tree
    except Exception as e:
      raise DamagedCheckpointError(self.directory, step, f"state/_METADATA: cannot be read ({_brief(e)})") from e
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

  # -- damage

  def check(self, step: int) -> dict[str, Any]:
    """The step's meta, once its files match its manifest and its items are there; DamagedCheckpointError
    naming the step and the first problems otherwise. Every process reads the meta (orbax's restore is
    collective); process 0 alone checks the sums; a step damaged for any process is damaged for all (they must
    fall back together)."""
    step = int(step)
    d = self.step_dir(step)
    problem, meta = None, {}
    try:
      if not os.path.isdir(d):
        raise DamagedCheckpointError(self.directory, step, "the step directory is missing")
      problems = manifest_problems(d) if jax.process_index() == 0 else []
      if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DamagedCheckpointError(self.directory, step, "; ".join(problems[:3]) + more)
      meta = self._meta(step)
      if problems is None:
        if meta.get("manifest"):
          raise DamagedCheckpointError(self.directory, step, f"{MANIFEST}: missing (the step was saved with one)")
        _log.warning("checkpoint %s: saved before checksum manifests; loading it unverified", d)
      for item in ("state", "data") if meta.get("has_data") else ("state",):
        if not os.path.isdir(os.path.join(d, item)):
          raise DamagedCheckpointError(self.directory, step, f"{item}/: missing")
    except DamagedCheckpointError as e:
      problem = e.problem
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      if np.any(multihost_utils.process_allgather(np.int32(problem is not None))):
        problem = problem or "damaged on another process (process 0's log says what)"
    if problem is not None:
      raise DamagedCheckpointError(self.directory, step, problem)
    return meta

  def restore_newest(self, restore_fn: Callable[[int], _T]) -> tuple[int, _T] | None:
    """(step, restore_fn(step)) for the newest step that restores, None when the directory has no step.

    `restore_fn` restores one step (e.g. ``lambda s: ckpt.restore(s, target, data_iter=it)``), so the state,
    the data position and the rng all come from the step returned. A step for which it raises
    DamagedCheckpointError is logged in one line (``checkpoint D/7: <what>; falling back to step 5``) and the
    next older one tried; once one restores, the damaged newer steps are renamed ``<step>.damaged`` (kept, and
    out of the way of the saves that redo them). NoUsableCheckpointError when none restores (nothing renamed).
    Other errors (a state that does not fit, another config) propagate: they are no damage."""
    self.wait()
    steps = sorted(self.all_steps(), reverse=True)
    damaged: list[DamagedCheckpointError] = []
    for i, step in enumerate(steps):
      try:
        result = restore_fn(step)
      except DamagedCheckpointError as e:
        nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step to fall back to"
        _log.warning("%s; %s", e, nxt)
        damaged.append(e)
        continue
      if damaged:
        kept = self._set_aside([e.step for e in damaged])
        _log.warning("%s: restored step %d; the damaged step%s kept as %s", self.directory, step,
                     "s are" if len(damaged) > 1 else " is", ", ".join(kept))
      return step, result
    if damaged:
      raise NoUsableCheckpointError(self.directory, damaged)
    return None

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Renames each step directory to <step>.damaged (.damaged.1, ... if taken); returns the new names."""
    kept = []
    for step in steps:
      dst, n = self.step_dir(step) + ".damaged", 1
      while os.path.exists(dst):
        dst, n = f"{self.step_dir(step)}.damaged.{n}", n + 1
      if jax.process_index() == 0:
        os.replace(self.step_dir(step), dst)
      kept.append(os.path.basename(dst))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices(f"set aside damaged checkpoints in {self.directory}")
    self._mngr.reload()
    return kept

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
