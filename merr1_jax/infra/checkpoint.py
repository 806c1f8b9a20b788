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

Every step also carries ``merr1_manifest.json``: the size and SHA-256 of each of its files, written into the tmp
directory after every item is written and before the rename (a ``temporary_path_class`` hook), so a committed step
always has one. Not covered: the manifest itself and the two files orbax writes after it (the step's
``_CHECKPOINT_METADATA``, updated with the commit time, and the top-level ``commit_success.txt``). ``restore``
checks the manifest, then that the items are there, then loads; a step that fails any of these raises
``DamagedCheckpointError`` naming the step and what is wrong. ``restore_newest`` walks the steps newest to oldest,
logs one line per damaged step (``checkpoint D/7: <what>; falling back to step 5``), sets the damaged ones aside
as ``<step>.damaged`` once an older step has loaded (never deleted; the rerun saves those steps again), and
raises one error when none loads. A step saved before manifests existed (its meta has no ``manifest`` flag) is
loaded unverified with a one-line warning; one whose meta says it has a manifest but has none is damaged.

API:
  Checkpointer(directory, *, save_every, keep, async_save=True, config_json=None, force=False,
               ignore_keys=DEFAULT_IGNORE_KEYS, force_hint="force=True")
    .latest_step() -> int | None          .all_steps() -> list[int]
    .should_save(step) -> bool            (step % save_every == 0)
    .save(step, state, *, data_iter=None, rng=None, extra=None, force=False) -> bool  (False: not saved)
    .restore(step, abstract_state, *, data_iter=None) -> (state, rng | None, extra dict)
    .restore_newest(restore_fn) -> (step, restore_fn(step)) | None   (falls back past damaged steps)
    .check(step)                          (raises DamagedCheckpointError)
    .stored_config(step=None) -> dict | None
    .wait()   .close()   (also a context manager)
  IncompatibleCheckpointError(ValueError): .differences = [(dotted key, stored, now), ...]
  DamagedCheckpointError(Exception): .path, .step, .problem;  NoUsableCheckpointError(DamagedCheckpointError)
  write_manifest(step_dir)   manifest_problems(step_dir) -> list[str] | None (None: no manifest)
  config_differences(stored, now, ignore_keys) -> list of (key, stored, now)
  abstract_with_shardings(state, shardings) -> ShapeDtypeStruct pytree carrying the shardings (restore's target)

The rest of a run's way through a crash or a preemption lives beside this module: ``preemption.PreemptionGuard``
(SIGTERM -> a save at the next step boundary) and ``artifacts`` (results and configs written atomically, the
final policy exported as a Hugging Face checkpoint).

Multi-host: every process constructs the Checkpointer and calls save / restore (orbax is collective); only
process 0 writes the JSON, each process its own data position.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from merr1_jax.infra import artifacts
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


# ---------------------------------------------------------------------------------------------- manifest


MANIFEST = "merr1_manifest.json"
MANIFEST_FORMAT = 1
# Written by orbax's finalize after the manifest (the step metadata gets the commit time; then the commit marker).
_UNCOVERED = frozenset({MANIFEST, atomicity.COMMIT_SUCCESS_FILE, "_CHECKPOINT_METADATA"})
_CHUNK = 1 << 22
_PARALLEL_BYTES = 64 << 20  # below this, threads cost more than they save


def _digest(path: str) -> tuple[int, str]:
  h, n = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      n += len(chunk)
  return n, h.hexdigest()


def _digests(step_dir: str, rels: list[str]) -> dict[str, tuple[int, str]]:
  """{relative path: (size, sha256)}; a large step's files are hashed in parallel (hashlib releases the GIL)."""
  digest = lambda r: _digest(os.path.join(step_dir, r))  # noqa: E731
  if len(rels) < 2 or sum(os.path.getsize(os.path.join(step_dir, r)) for r in rels) < _PARALLEL_BYTES:
    return {r: digest(r) for r in rels}
  with concurrent.futures.ThreadPoolExecutor(min(8, len(rels))) as pool:
    return dict(zip(rels, pool.map(digest, rels)))


def _covered_files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
      if rel not in _UNCOVERED:
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str | os.PathLike) -> dict[str, Any]:
  """Writes `step_dir`/merr1_manifest.json (every covered file's size and SHA-256); returns it. Written plainly,
  not renamed into place: the step's own rename commits it, and a manifest that a power cut leaves short makes
  the step read as damaged, which is what it then is (orbax does not flush the data files either)."""
  step_dir = os.fspath(step_dir)
  files = _digests(step_dir, _covered_files(step_dir))
  manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256",
              "files": {rel: {"size": n, "sha256": h} for rel, (n, h) in files.items()}}
  with open(os.path.join(step_dir, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=0, sort_keys=True)
  return manifest


def manifest_problems(step_dir: str | os.PathLike) -> list[str] | None:
  """What is wrong with `step_dir`'s files against its manifest ([] when nothing), or None when it has no
  manifest. A problem names the file (or the whole missing folder) and what differs."""
  step_dir = os.fspath(step_dir)
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    manifest = artifacts.read_json(path)
    files = manifest["files"]
    want = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return [f"{MANIFEST}: unreadable ({e})"]
  problems, missing_dirs, present = [], set(), []
  for rel in sorted(want):
    if os.path.isfile(os.path.join(step_dir, rel)):
      present.append(rel)
      continue
    top = rel.split("/")[0]
    if "/" in rel and not os.path.isdir(os.path.join(step_dir, top)):
      if top not in missing_dirs:
        missing_dirs.add(top)
        problems.append(f"{top}/: missing ({sum(r.startswith(top + '/') for r in want)} files)")
    else:
      problems.append(f"{rel}: missing")
  sizes = {rel: os.path.getsize(os.path.join(step_dir, rel)) for rel in present}
  for rel in present:
    if sizes[rel] != want[rel][0]:
      how = "truncated" if sizes[rel] < want[rel][0] else "grown"
      problems.append(f"{rel}: {sizes[rel]} bytes, the manifest says {want[rel][0]} ({how})")
  same_size = [rel for rel in present if sizes[rel] == want[rel][0]]
  for rel, (_, sha) in _digests(step_dir, same_size).items():
    if sha != want[rel][1]:
      problems.append(f"{rel}: SHA-256 differs from the manifest (contents changed)")
  return problems


class _ManifestTemporaryPath(atomicity.AtomicRenameTemporaryPath):
  """orbax's atomic-rename step directory, with the manifest written into the tmp directory just before the
  rename: every process has written its files by then (orbax waits at a barrier), and finalize runs on the
  primary process only. orbax gives each item's directory (state/, meta/, data/) the same class: those are
  inside a step's tmp directory and get no manifest of their own (the step's covers them)."""

  async def finalize(self, *args, **kwargs):
    if atomicity.TMP_DIR_SUFFIX not in self.get_final().parent.name:
      await asyncio.to_thread(write_manifest, os.fspath(self.get()))
    return await super().finalize(*args, **kwargs)


def _brief(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line (TensorStore errors run to dozens of lines)."""
  text = " ".join(str(e).split())
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


_T = TypeVar("_T")


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
        temporary_path_class=_ManifestTemporaryPath if self.manifest else None)
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
            "config": self.config, "rng": None if rng is None else _rng_to_json(rng),
            "has_data": data_iter is not None, "manifest": self.manifest}
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
    saved position. DamagedCheckpointError when the step fails its manifest or cannot be read; ValueError
    when it does not fit `abstract_state`."""
    self.wait()
    step = self._resolve(step)
    meta = self.check(step)
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
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # TensorStore's dozens of lines, a KeyError, a JSON error: one line naming the step
      raise DamagedCheckpointError(self.directory, step, f"cannot be read ({_brief(e)})") from e
    leaves = [_get(restored.state, parts) for parts, _ in named]
    state = jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)
    rng = None if meta.get("rng") is None else _rng_from_json(meta["rng"])
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
