"""Hugging Face safetensors checkpoints -> the policy's parameter tree (Qwen2, Qwen2.5, Qwen2.5-Omni thinker).

`load_hf` resolves the files (pickled formats are refused, never opened), plans from the headers alone (missing,
unexpected or wrong-shape keys are one error under strict=True, or go into the returned LoadReport), places the
tensors one at a time straight onto their target shardings, and fills what no file provides from
`model.init_params`. The video/audio projectors come from PROJECTOR_FILE when it is there; `projectors='require'`
makes its absence an error: use it to load an exported policy for evaluation. What each HF key becomes is hf_keys'
mapping (its docstring has every shape); config.json is read by hf_config. Details: docs/porting.md, "How
`load_hf` reads a checkpoint".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax.models import base, lora, safetensors_io
from merr1_jax.models.config import ModelConfig
from merr1_jax.models.hf_config import check_config, read_json
from merr1_jax.models.hf_keys import P, _classify, _expected_keys, _hf_params, _layer_map, _Target

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Our parameters that HF has no place for (the video/audio projectors), written by save_hf next to the HF
# weights under their param paths ('video_proj/in_kernel', ...) and read back by load_hf.
PROJECTOR_FILE = "merr1_projectors.safetensors"
# One logger for all of the HF I/O (import and export), under the name it had before the split.
_log = logging.getLogger("merr1_jax.models.hf_io")


@dataclasses.dataclass
class LoadReport:
  loaded: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # group -> tensor count
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  shape_mismatch: list[str] = dataclasses.field(default_factory=list)
  # Parameters with no HF counterpart (projectors): 'none' (the model has none), 'loaded' (from
  # PROJECTOR_FILE) or 'init' (no such file: a fresh init, as when starting from a base HF checkpoint).
  projectors: str = "none"

  @property
  def clean(self) -> bool:
    return not (self.missing or self.unexpected or self.shape_mismatch)


# ------------------------------------------------------------------------------------------------ files


def _resolve_files(path: str) -> tuple[list[str], str | None]:
  """The safetensors files of a checkpoint and its config.json (or None). Refuses pickled formats."""
  if os.path.isfile(path):
    if path.endswith(_PICKLE_SUFFIXES):
      raise ValueError(f"{path}: refusing a pickled checkpoint; convert it to safetensors")
    if path.endswith(".index.json"):
      root = os.path.dirname(path)
      weight_map = read_json(path).get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path}: no 'weight_map' object (an index maps each tensor name to its shard file)")
      odd = [f"{k}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str)][:5]
      if odd:
        raise ValueError(f"{path}: weight_map values must be shard file names, got {odd}")
      shards = sorted(set(weight_map.values()))
      bad = [s for s in shards if not s.endswith(".safetensors")]
      if bad:
        raise ValueError(f"{path}: index references non-safetensors files {bad}; refusing (pickle)")
      files = [os.path.join(root, s) for s in shards]
    elif path.endswith(".safetensors"):
      root, files = os.path.dirname(path), [path]
    else:
      raise ValueError(f"{path}: expected a .safetensors file, an index json or a directory")
  elif os.path.isdir(path):
    root = path
    index = [n for n in os.listdir(path) if n.endswith(".safetensors.index.json")]
    if index:
      return _resolve_files(os.path.join(path, index[0]))[0], _config_path(path)
    files = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.endswith(".safetensors") and n != PROJECTOR_FILE)
    if not files:
      pickles = [n for n in os.listdir(path) if n.endswith(_PICKLE_SUFFIXES)]
      raise ValueError(f"{path}: no .safetensors files" +
                       (f" (only pickled {pickles}: refusing to load them)" if pickles else ""))
  else:
    raise FileNotFoundError(path)
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"checkpoint shards not found: {missing}")
  return files, _config_path(root)


def _root(path: str) -> str:
  return path if os.path.isdir(path) else os.path.dirname(path)


def _config_path(root: str) -> str | None:
  p = os.path.join(root, "config.json")
  return p if os.path.isfile(p) else None


# -------------------------------------------------------------------------------------------- placement


def _sharding_fn(shardings: Any, abstract: Any) -> Callable[[str, tuple, Any], jax.sharding.Sharding]:
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if shardings is None:
    return lambda name, shape, dtype: default
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    return shardings
  if isinstance(shardings, jax.sharding.Sharding):
    return lambda name, shape, dtype: shardings
  flat = {base.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  return lambda name, shape, dtype: flat[name]


def _layer_sharding(s: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
  """The sharding of one layer of a stacked parameter: drop the leading 'layers' entry."""
  if isinstance(s, jax.sharding.NamedSharding):
    spec = tuple(s.spec) + (None,) * (ndim + 1 - len(s.spec))
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  if len(s.device_set) == 1:
    return s
  raise TypeError(f"unsupported sharding for a stacked parameter: {s!r} (use NamedSharding)")


@functools.lru_cache(maxsize=None)
def _set_layer_fn(sharding: jax.sharding.Sharding):
  return jax.jit(lambda full, part, i: jax.lax.dynamic_update_index_in_dim(full, part, i, 0),
                 out_shardings=sharding, donate_argnums=0)


def _place(arr: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


# ------------------------------------------------------------------------------------------------- load_hf


def load_hf(path: str, model: Any, *, shardings: Any = None, strict: bool = True,
            rng: jax.Array | None = None, check_config_json: bool = True,
            projectors: str = "auto") -> tuple[Any, LoadReport]:
  """Loads a HF checkpoint (or a `save_hf` export) into `model`'s parameter tree (a MultimodalPolicy).

  shardings: None (device 0), one Sharding, a pytree like the params, or fn(path, shape, dtype) -> Sharding.
  projectors: what to do with the parameters HF has no key for (the 'mlp' projectors), which `save_hf`
    writes to PROJECTOR_FILE in the export directory:
      'auto'    - load them from that file when it is there, else a fresh init with a logged warning (the
                  right thing when starting a run from a base HF checkpoint);
      'require' - the file must be there when the model has such parameters (loading an exported policy,
                  e.g. for evaluation: random projectors would make the evaluation meaningless).
    The file's tensors are checked like the HF ones (missing / unexpected / shape mismatch, named
    'merr1_projectors.safetensors:<param path>').
  Returns (params, report). Parameters neither file provides (projectors without the file; missing keys
  with strict=False) come from `model.init_params(rng)`.
  """
  if projectors not in ("auto", "require"):
    raise ValueError(f"projectors must be 'auto' or 'require', got {projectors!r}")
  cfg: ModelConfig = model.config
  files, config_json = _resolve_files(path)
  if check_config_json and config_json:
    check_config(cfg, read_json(config_json), config_json)

  # Plan from the headers alone, so that every problem is reported before any tensor is read.
  abstract = model.abstract_params()
  shapes = {base.path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  report = LoadReport()
  plan = _scan_headers(files, cfg, shapes, report)
  extra_file, extra_plan = _plan_projectors(path, _root(path), shapes, _hf_params(cfg), projectors, report,
                                            plan.dtype_errors)
  if plan.dtype_errors:
    raise ValueError("checkpoint tensors with a wrong dtype:\n  " + "\n  ".join(plan.dtype_errors))
  slots = _report_missing(cfg, plan, report)
  if strict and not report.clean:
    raise ValueError(_problems(path, report))

  sharding_of = _sharding_fn(shardings, abstract)
  values = _place_hf(files, plan, shapes, sharding_of, report)
  _place_projectors(extra_file, extra_plan, shapes, sharding_of, values, report)
  _fill_from_init(model, rng, shapes, {slot for slot in slots if slot not in plan.seen}, sharding_of, values)
  params = jax.tree_util.tree_map_with_path(lambda p, _: values[base.path_str(p)], abstract)
  return params, report


_Slot = tuple[str, "int | None"]  # (param path, layer index or None): what one HF tensor fills


@dataclasses.dataclass
class _Plan:
  """What the checkpoint's headers say: the tensors to load, file by file, and what the scan found on the way."""

  by_file: dict[str, list[tuple[str, _Target]]] = dataclasses.field(default_factory=dict)  # file -> (key, target)
  seen: dict[_Slot, str] = dataclasses.field(default_factory=dict)  # slot -> the key that fills it
  prefixes: set[str] = dataclasses.field(default_factory=set)  # LM prefixes the keys use, to name missing keys
  mismatched: set[_Slot] = dataclasses.field(default_factory=set)  # reported once, as a mismatch, not as missing
  dtype_errors: list[str] = dataclasses.field(default_factory=list)  # always an error, strict or not


def _scan_headers(files: list[str], cfg: ModelConfig, shapes: dict[str, Any], report: LoadReport) -> _Plan:
  """Classifies every key of every shard's header against the model; fills report.skipped / unexpected /
  shape_mismatch and returns the plan. Reads no tensor data."""
  layer_map = _layer_map(cfg)
  plan = _Plan()
  for file in files:
    header, _ = safetensors_io.read_header(file)
    for key, info in header.items():
      tgt = _classify(key, cfg, layer_map)
      if isinstance(tgt, str):
        report.skipped[tgt] = report.skipped.get(tgt, 0) + 1
        continue
      if tgt is None:
        report.unexpected.append(key)
        continue
      if tgt.prefix is not None:
        plan.prefixes.add(tgt.prefix)
      if info["dtype"] not in safetensors_io.FLOAT_CODES:
        plan.dtype_errors.append(f"{key} ({os.path.basename(file)}): dtype {info['dtype']}, expected a float type")
        continue
      want = shapes[tgt.param].shape[1:] if tgt.layer is not None else shapes[tgt.param].shape
      hf_want = tgt.inverse(np.empty(want, np.bool_)).shape
      if tuple(info["shape"]) != hf_want:
        report.shape_mismatch.append(f"{key}: checkpoint {tuple(info['shape'])}, model expects {hf_want}")
        plan.mismatched.add((tgt.param, tgt.layer))
        continue
      if (tgt.param, tgt.layer) in plan.seen:
        report.unexpected.append(f"{key} (duplicate of {plan.seen[(tgt.param, tgt.layer)]})")
        continue
      plan.seen[(tgt.param, tgt.layer)] = key
      plan.by_file.setdefault(file, []).append((key, tgt))
  return plan


def _report_missing(cfg: ModelConfig, plan: _Plan, report: LoadReport) -> dict[_Slot, str]:
  """Every slot the decoder has -> its HF key (under the checkpoint's own prefix when it uses one); the keys
  of the slots nothing fills go first into report.missing, ahead of the missing projectors."""
  prefix = plan.prefixes.pop() if len(plan.prefixes) == 1 else "model."
  layer_map = _layer_map(cfg)
  slots = {(t.param, t.layer): k for k, t in ((k, _classify(k, cfg, layer_map)) for k in _expected_keys(cfg, prefix))}
  report.missing = [k for slot, k in slots.items() if slot not in plan.seen and slot not in plan.mismatched] + \
      report.missing
  return slots


def _plan_projectors(path: str, root: str, shapes: dict[str, Any], hf_params: set[str], mode: str,
                     report: LoadReport, dtype_errors: list[str]) -> tuple[str, list[str]]:
  """(PROJECTOR_FILE path, the param names to load from it); fills report.projectors and its problems."""
  # LoRA adapters are neither HF weights nor projectors: they always start fresh (lora.init_adapters, B = 0).
  extra = sorted(n for n in shapes if n not in hf_params and not lora.is_adapter(n))
  file = os.path.join(root, PROJECTOR_FILE)
  if not os.path.isfile(file):
    if not extra:
      return file, []
    if mode == "require":
      raise ValueError(f"{path}: no {PROJECTOR_FILE}, but the model has parameters HF has no key for "
                       f"({', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}); an export written by "
                       "save_hf carries them there. A base HF checkpoint does not: load it with projectors='auto' "
                       "to start them from a fresh init")
    _log.warning("%s: no %s; %s start from a fresh init (expected when starting from a base HF checkpoint, "
                 "wrong for an exported policy)", path, PROJECTOR_FILE, ", ".join(extra))
    report.projectors = "init"
    return file, []
  header, _ = safetensors_io.read_header(file)
  plan = []
  for name, info in header.items():
    tag = f"{PROJECTOR_FILE}:{name}"
    if name not in extra:
      report.unexpected.append(tag)
    elif info["dtype"] not in safetensors_io.FLOAT_CODES:
      dtype_errors.append(f"{tag}: dtype {info['dtype']}, expected a float type")
    elif tuple(info["shape"]) != tuple(shapes[name].shape):
      report.shape_mismatch.append(f"{tag}: file {tuple(info['shape'])}, model expects {tuple(shapes[name].shape)}")
    else:
      plan.append(name)
  report.missing += [f"{PROJECTOR_FILE}:{n}" for n in extra if n not in header]
  report.projectors = "loaded" if plan else ("init" if extra else "none")
  return file, plan


def _problems(path: str, r: LoadReport) -> str:
  lines = [f"{path}: checkpoint does not match the model"]
  for title, items in (("missing", r.missing), ("unexpected", r.unexpected), ("shape mismatch", r.shape_mismatch)):
    if items:
      lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
  lines.append("  (pass strict=False to load anyway and get these in the report)")
  return "\n".join(lines)



def _place_hf(files: list[str], plan: _Plan, shapes: dict[str, Any], sharding_of: Callable,
              report: LoadReport) -> dict[str, jax.Array]:
  """The planned HF tensors on their shardings, by param path. Stacked parameters start as zeros on their
  sharding and get their layers written in place, so each tensor passes through host memory once, alone."""
  values: dict[str, jax.Array] = {}
  for name, a in shapes.items():
    if name.startswith(P + "layers/"):
      values[name] = jax.jit(lambda a=a: jnp.zeros(a.shape, a.dtype),
                             out_shardings=sharding_of(name, a.shape, a.dtype))()
  for file in files:
    _, get = safetensors_io.open_tensors(file)
    for key, tgt in plan.by_file.get(file, []):
      a = shapes[tgt.param]
      arr = np.asarray(tgt.transform(get(key)), dtype=a.dtype)  # one host copy of one tensor
      s = sharding_of(tgt.param, a.shape, a.dtype)
      if tgt.layer is None:
        values[tgt.param] = _place(arr, s)
      else:
        part = _place(arr, _layer_sharding(s, arr.ndim))
        values[tgt.param] = _set_layer_fn(s)(values[tgt.param], part, tgt.layer)
      report.loaded += 1
  return values


def _place_projectors(file: str, names: list[str], shapes: dict[str, Any], sharding_of: Callable,
                      values: dict[str, jax.Array], report: LoadReport) -> None:
  """Adds the planned PROJECTOR_FILE tensors to `values`: our own layout, so no transform, only the cast."""
  if not names:
    return
  _, get = safetensors_io.open_tensors(file)
  for name in names:
    a = shapes[name]
    values[name] = _place(np.asarray(get(name), dtype=a.dtype), sharding_of(name, a.shape, a.dtype))
    report.loaded += 1


def _fill_from_init(model: Any, rng: jax.Array | None, shapes: dict[str, Any], missing_slots: set[_Slot],
                    sharding_of: Callable, values: dict[str, jax.Array]) -> None:
  """Fills what no file provided (projectors without PROJECTOR_FILE, missing keys with strict=False) from
  `model.init_params(rng)`: whole parameters, or single layers of a stacked one that is otherwise loaded."""
  needed = sorted({n for n in shapes if n not in values} | {n for n, _ in missing_slots})
  if not needed:
    return

  def fresh_fn(r):  # jit prunes the initialisers of everything not returned
    flat = {base.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(model.init_params(r))[0]}
    return {n: flat[n] for n in needed}

  fresh = jax.jit(fresh_fn, out_shardings={n: sharding_of(n, shapes[n].shape, shapes[n].dtype)
                                           for n in needed})(rng if rng is not None else jax.random.key(0))
  for name in needed:
    if name not in values:
      values[name] = fresh[name]
    else:
      for layer in sorted(i for n, i in missing_slots if n == name):
        values[name] = values[name].at[layer].set(fresh[name][layer])
