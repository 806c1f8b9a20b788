"""Hugging Face safetensors checkpoints <-> the policy's parameter tree (Qwen2, Qwen2.5, Qwen2.5-Omni thinker).

Import (`load_hf`):
  * A file, a directory with model.safetensors, or a sharded directory with model.safetensors.index.json.
    Pickled formats (.bin/.pt/.pth/.ckpt) are refused, never opened.
  * Key prefixes: Qwen2 causal LMs use `model.` / `lm_head.`; an Omni thinker checkpoint the same; a full
    Qwen2.5-Omni checkpoint `thinker.model.` / `thinker.lm_head.`; a bare text model none. Tower and talker
    weights (audio_tower, visual, talker, token2wav) are skipped by name and counted; their bytes are
    never read.
  * config.json is read by `config_from_hf`, which refuses what the decoder does not implement (RoPE scaling
    other than plain RoPE / M-RoPE, sliding-window attention, an activation other than SiLU) and names the
    file and the missing or unsupported field. The Omni thinker's lm_head is tied or not by the THINKER-level
    `tie_word_embeddings` (default False), as in transformers, not by its text_config's flag.
  * Headers are checked first: missing / unexpected / shape-mismatched keys raise one ValueError listing
    them under the checkpoint's own prefix (strict) or go into the returned LoadReport (strict=False;
    missing ones keep a fresh init). Non-float tensors, a truncated shard and a config.json that disagrees
    with the model config are always errors.
  * Then shard by shard, tensor by tensor: memmap view -> transpose/reshape -> cast to param dtype ->
    straight onto its target sharding (per-device slices via make_array_from_callback). Per-layer tensors
    go into their stacked parameter with a donated in-place update, so host memory holds one tensor.
  * Parameters with no HF counterpart (the video/audio 'mlp' projectors, which RL trains) come from
    PROJECTOR_FILE next to the weights when it is there (an export written by `save_hf`), else from a fresh
    init (a base HF checkpoint; logged as a warning). `projectors='require'` makes its absence an error:
    use it to load an exported policy for evaluation.
Export (`save_hf`): safetensors shards + index + config.json that transformers / vLLM load, plus
  PROJECTOR_FILE (our param paths as tensor names, in their param dtype, bit-exact) when the policy has
  projector parameters. That file is outside the index's weight_map, and an index is always written when it
  exists, so transformers and vLLM (which load only the shards the index names) never see it. With
  `copy_from=SRC` (layout 'omni_thinker') every SRC tensor that is not a thinker-LM weight (audio/vision towers,
  talker, token2wav) is streamed through byte for byte, SRC's config / tokenizer / preprocessor files are
  copied, and our LM weights go under SRC's own thinker prefix: the result is a complete Qwen2.5-Omni
  (thinker) checkpoint. `export_kwargs(hf_path)` picks the layout a run that started from `hf_path` exports in.

HF layout (per layer i): q_proj.weight [H*Dh, D], o_proj.weight [D, H*Dh], gate/up [F, D], down [D, F].
Shape legend: D d_model, H query heads, K kv heads, Dh head dim, F mlp width, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax.models import base, safetensors_io
from merr1_jax.models.config import ModelConfig

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_SKIP = re.compile(r"^(?:thinker\.)?(audio_tower|visual)\.|^(talker|token2wav)\.")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LM_PREFIXES = ("thinker.model.", "model.", "")
_HEAD_KEYS = ("thinker.lm_head.weight", "lm_head.weight")
P = "decoder/"
# Our parameters that HF has no place for (the video/audio projectors), written by save_hf next to the HF
# weights under their param paths ('video_proj/in_kernel', ...) and read back by load_hf.
PROJECTOR_FILE = "merr1_projectors.safetensors"
_log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------- key mapping


def _layer_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable, Callable]]:
  """HF per-layer key suffix -> (our stacked param name, HF -> ours, ours -> HF)."""
  d, h, kh, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def proj(heads):  # HF Linear weight [heads*Dh, D] <-> our [D, heads, Dh]
    return (lambda w: w.T.reshape(d, heads, dh), lambda w: w.reshape(d, heads * dh).T)

  def bias(heads):
    return (lambda b: b.reshape(heads, dh), lambda b: b.reshape(heads * dh))

  m = {
      "input_layernorm.weight": ("input_norm/scale", _identity, _identity),
      "post_attention_layernorm.weight": ("post_norm/scale", _identity, _identity),
      "self_attn.q_proj.weight": ("q_kernel", *proj(h)),
      "self_attn.k_proj.weight": ("k_kernel", *proj(kh)),
      "self_attn.v_proj.weight": ("v_kernel", *proj(kh)),
      # o_proj weight [D, H*Dh] <-> our [H, Dh, D]
      "self_attn.o_proj.weight": ("o_kernel", lambda w: w.T.reshape(h, dh, d), lambda w: w.reshape(h * dh, d).T),
      "mlp.gate_proj.weight": ("gate_kernel", _transpose, _transpose),
      "mlp.up_proj.weight": ("up_kernel", _transpose, _transpose),
      "mlp.down_proj.weight": ("down_kernel", _transpose, _transpose),
  }
  if cfg.qkv_bias:
    m["self_attn.q_proj.bias"] = ("q_bias", *bias(h))
    m["self_attn.k_proj.bias"] = ("k_bias", *bias(kh))
    m["self_attn.v_proj.bias"] = ("v_bias", *bias(kh))
  return m


def _identity(w):
  return w


def _transpose(w):
  return w.T


@dataclasses.dataclass(frozen=True)
class _Target:
  param: str  # path in the param tree
  layer: int | None  # index into the stacked 'layers' axis
  transform: Callable[[np.ndarray], np.ndarray]  # HF tensor -> our (per-layer) array
  inverse: Callable[[np.ndarray], np.ndarray]  # our (per-layer) array -> HF tensor
  prefix: str | None = None  # the LM prefix the key was found under ('thinker.model.', 'model.', ''), if known


def _classify(key: str, cfg: ModelConfig, layer_map) -> _Target | str | None:
  """A _Target, a skip-group name (str), or None (unexpected)."""
  if (m := _SKIP.match(key)):
    return m.group(1) or m.group(2)
  if key in _HEAD_KEYS:
    return None if cfg.tie_embeddings else _Target(
        P + "lm_head", None, _transpose, _transpose, "thinker.model." if key.startswith("thinker.") else None)
  for pfx in _LM_PREFIXES:
    if not key.startswith(pfx):
      continue
    rest = key[len(pfx):]
    if rest == "embed_tokens.weight":
      return _Target(P + "embed/embedding", None, _identity, _identity, pfx)
    if rest == "norm.weight":
      return _Target(P + "final_norm/scale", None, _identity, _identity, pfx)
    if (m := _LAYER.match(rest)) and m.group(2) in layer_map and int(m.group(1)) < cfg.num_layers:
      name, fn, inv = layer_map[m.group(2)]
      return _Target(P + "layers/" + name, int(m.group(1)), fn, inv, pfx)
  return None


def _expected_keys(cfg: ModelConfig, prefix: str = "model.") -> list[str]:
  """Every HF key of the decoder under an LM prefix ('model.', 'thinker.model.' or '' for a bare text model)."""
  keys = [prefix + "embed_tokens.weight", prefix + "norm.weight"]
  keys += [f"{prefix}layers.{i}.{s}" for i in range(cfg.num_layers) for s in _layer_map(cfg)]
  if not cfg.tie_embeddings:  # 'thinker.model.' -> 'thinker.lm_head.weight'; 'model.' and '' -> 'lm_head.weight'
    keys.append((prefix[:-len("model.")] if prefix.endswith("model.") else "") + "lm_head.weight")
  return keys


def _hf_params(cfg: ModelConfig) -> set[str]:
  """Our parameter paths that have an HF key (everything of the decoder)."""
  layer_map = _layer_map(cfg)
  return {_classify(k, cfg, layer_map).param for k in _expected_keys(cfg)}


# -------------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json", **overrides: Any) -> ModelConfig:
  """A ModelConfig from a Qwen2 / Qwen2.5 / Qwen2.5-Omni (full, thinker or text) config.json dict.

  source names the file in errors. Raises ValueError naming it and the field for a missing required key
  and for settings the decoder does not implement (they would otherwise load and silently compute something
  else): rope_scaling / rope_parameters of a type other than default RoPE or M-RoPE, sliding-window
  attention, hidden_act other than silu.
  """
  if not isinstance(hf, dict):
    raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
  outer, where = [hf], [""]  # the nested dicts, outermost first, and their dotted paths
  for sub in ("thinker_config", "text_config"):
    if isinstance(outer[-1].get(sub), dict):
      outer.append(outer[-1][sub])
      where.append(where[-1] + sub + ".")
  c, at = outer[-1], where[-1]

  def find(key, default=None):  # innermost first, as transformers reads nested configs
    return next((d[key] for d in reversed(outer) if d.get(key) is not None), default)

  def field(key):  # the dotted path `find(key)` read from
    return next((w + key for d, w in zip(reversed(outer), reversed(where)) if d.get(key) is not None), at + key)

  def need(key):
    if c.get(key) is None:
      raise ValueError(f"{source}: missing required key {at + key!r}")
    return c[key]

  def refuse(name, value, why):
    raise ValueError(f"{source}: {name} = {value!r} is not supported ({why})")

  # transformers reads rope_scaling (the legacy name) before rope_parameters; both are checked.
  for key in ("rope_parameters", "rope_scaling"):
    r, r_field = find(key, {}), field(key)
    if not isinstance(r, dict):
      refuse(r_field, r, "expected an object")
    for k in ("rope_type", "type"):  # 'mrope' is the Qwen2-VL era spelling of M-RoPE (transformers: default)
      if r.get(k) not in (None, "default", "mrope"):
        refuse(f"{r_field}.{k}", r[k], "only default RoPE and M-RoPE are implemented")
    extra = sorted(set(r) - {"rope_type", "type", "rope_theta", "mrope_section"})
    if extra:
      refuse(f"{r_field}.{extra[0]}", r[extra[0]], "only default RoPE and M-RoPE are implemented")
  rope = find("rope_scaling") or find("rope_parameters") or {}
  if find("partial_rotary_factor", 1.0) != 1.0:
    refuse(field("partial_rotary_factor"), find("partial_rotary_factor"), "RoPE rotates the whole head")
  if find("hidden_act", "silu") != "silu":
    refuse(field("hidden_act"), find("hidden_act"), "the MLP is SwiGLU")
  if c.get("use_sliding_window"):
    refuse(at + "use_sliding_window", c["use_sliding_window"], "attention is full causal")
  if any(t != "full_attention" for t in c.get("layer_types") or ()):
    refuse(at + "layer_types", c["layer_types"], "attention is full causal")

  heads = need("num_attention_heads")
  if len(outer) > 1:
    # The Omni thinker owns the lm_head: transformers ties it by the thinker-level flag (default False),
    # whatever its text_config says (that one defaults to True).
    tie = outer[-2].get("tie_word_embeddings")
    tie = False if tie is None else tie
  else:  # Qwen2Config defaults to untied, the Omni text config to tied
    tie = c.get("tie_word_embeddings")
    tie = c.get("model_type", "") != "qwen2" if tie is None else tie
  kw = dict(
      vocab_size=need("vocab_size"), d_model=need("hidden_size"), num_layers=need("num_hidden_layers"),
      num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
      head_dim=c.get("head_dim") or need("hidden_size") // heads, mlp_dim=need("intermediate_size"),
      rope_theta=float(rope.get("rope_theta") or find("rope_theta", 10000.0)),
      rms_eps=float(c.get("rms_norm_eps") or 1e-6), tie_embeddings=bool(tie),
      mrope_section=tuple(rope["mrope_section"]) if rope.get("mrope_section") else None,
      video_dim=0, audio_dim=0)
  if len(outer) > 1 and find("video_token_index") is not None:
    # A Qwen2.5-Omni (thinker) config: its towers end in a merger into the LM width, so preprocessing writes
    # features already in the embedding space (projector 'identity').
    kw.update(projector="identity", video_dim=kw["d_model"], audio_dim=kw["d_model"])
  for ours, theirs in (("video_token_id", "video_token_index"), ("audio_token_id", "audio_token_index")):
    if find(theirs) is not None:
      kw[ours] = find(theirs)
  kw.update(overrides)
  return ModelConfig(**kw)


_CHECKED = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "rope_theta", "rms_eps", "tie_embeddings", "qkv_bias", "mrope_section")


def check_config(cfg: ModelConfig, hf: dict[str, Any], source: str = "config.json") -> None:
  """Raises ValueError naming `source` and every field where `cfg` differs from the checkpoint's config
  (and, through config_from_hf, any checkpoint setting the decoder does not implement)."""
  theirs = config_from_hf(hf, source=source)
  bad = [f"{f}: model {getattr(cfg, f)!r} vs checkpoint {getattr(theirs, f)!r}"
         for f in _CHECKED if getattr(cfg, f) != getattr(theirs, f)]
  if bad:
    raise ValueError(f"{source} does not match the model config:\n  " + "\n  ".join(bad))


def read_json(path: str) -> dict[str, Any]:
  """A JSON object from `path` (config.json, an index); ValueError naming the file when it is malformed."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: malformed JSON ({e})") from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


# -------------------------------------------------------------------------------------------------- import


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

  abstract = model.abstract_params()
  shapes = {base.path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  layer_map = _layer_map(cfg)
  report = LoadReport()
  plan: dict[str, list[tuple[str, _Target]]] = {}
  seen: dict[tuple[str, int | None], str] = {}
  prefixes: set[str] = set()  # LM prefixes the checkpoint's keys use, to name missing keys its way
  mismatched: set[tuple[str, int | None]] = set()  # reported once, as a mismatch, not also as missing
  dtype_errors = []
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
        prefixes.add(tgt.prefix)
      if info["dtype"] not in safetensors_io.FLOAT_CODES:
        dtype_errors.append(f"{key} ({os.path.basename(file)}): dtype {info['dtype']}, expected a float type")
        continue
      want = shapes[tgt.param].shape[1:] if tgt.layer is not None else shapes[tgt.param].shape
      hf_want = tgt.inverse(np.empty(want, np.bool_)).shape
      if tuple(info["shape"]) != hf_want:
        report.shape_mismatch.append(f"{key}: checkpoint {tuple(info['shape'])}, model expects {hf_want}")
        mismatched.add((tgt.param, tgt.layer))
        continue
      if (tgt.param, tgt.layer) in seen:
        report.unexpected.append(f"{key} (duplicate of {seen[(tgt.param, tgt.layer)]})")
        continue
      seen[(tgt.param, tgt.layer)] = key
      plan.setdefault(file, []).append((key, tgt))

  extra_file, extra_plan = _plan_projectors(path, _root(path), shapes, _hf_params(cfg), projectors, report,
                                            dtype_errors)
  if dtype_errors:
    raise ValueError("checkpoint tensors with a wrong dtype:\n  " + "\n  ".join(dtype_errors))

  prefix = prefixes.pop() if len(prefixes) == 1 else "model."
  all_targets = {(t.param, t.layer): k for k, t in
                 ((k, _classify(k, cfg, layer_map)) for k in _expected_keys(cfg, prefix))}
  report.missing = [k for tgt, k in all_targets.items() if tgt not in seen and tgt not in mismatched] + \
      report.missing
  if strict and not report.clean:
    raise ValueError(_problems(path, report))

  sharding_of = _sharding_fn(shardings, abstract)
  values: dict[str, jax.Array] = {}
  for name, a in shapes.items():  # stacked parameters start as zeros on their sharding
    if name.startswith(P + "layers/"):
      values[name] = jax.jit(lambda a=a: jnp.zeros(a.shape, a.dtype),
                             out_shardings=sharding_of(name, a.shape, a.dtype))()
  for file in files:
    _, get = safetensors_io.open_tensors(file)
    for key, tgt in plan.get(file, []):
      a = shapes[tgt.param]
      arr = np.asarray(tgt.transform(get(key)), dtype=a.dtype)  # one host copy of one tensor
      s = sharding_of(tgt.param, a.shape, a.dtype)
      if tgt.layer is None:
        values[tgt.param] = _place(arr, s)
      else:
        part = _place(arr, _layer_sharding(s, arr.ndim))
        values[tgt.param] = _set_layer_fn(s)(values[tgt.param], part, tgt.layer)
      report.loaded += 1
  if extra_plan:
    _, get = safetensors_io.open_tensors(extra_file)
    for name in extra_plan:  # our own layout: no transform, only the cast to the param dtype
      a = shapes[name]
      values[name] = _place(np.asarray(get(name), dtype=a.dtype), sharding_of(name, a.shape, a.dtype))
      report.loaded += 1

  # Parameters no file provides: projectors without PROJECTOR_FILE, missing keys with strict=False.
  missing_slots = {slot for slot in all_targets if slot not in seen}
  needed = sorted({n for n in shapes if n not in values} | {n for n, _ in missing_slots})
  if needed:
    def fresh_fn(r):  # jit prunes the initialisers of everything not returned
      flat = {base.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(model.init_params(r))[0]}
      return {n: flat[n] for n in needed}

    fresh = jax.jit(fresh_fn, out_shardings={n: sharding_of(n, shapes[n].shape, shapes[n].dtype)
                                             for n in needed})(rng if rng is not None else jax.random.key(0))
    for name in needed:
      if name not in values:
        values[name] = fresh[name]
      else:
        for layer in sorted(l for n, l in missing_slots if n == name):
          values[name] = values[name].at[layer].set(fresh[name][layer])
  params = jax.tree_util.tree_map_with_path(lambda p, _: values[base.path_str(p)], abstract)
  return params, report


def _plan_projectors(path: str, root: str, shapes: dict[str, Any], hf_params: set[str], mode: str,
                     report: LoadReport, dtype_errors: list[str]) -> tuple[str, list[str]]:
  """(PROJECTOR_FILE path, the param names to load from it); fills report.projectors and its problems."""
  extra = sorted(n for n in shapes if n not in hf_params)
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


# -------------------------------------------------------------------------------------------------- export


def hf_config_dict(cfg: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
  """A Qwen2ForCausalLM config.json. M-RoPE models export as 1-D RoPE, which is exact for text
  (the three position ids coincide) - the form transformers / vLLM serve a text policy in."""
  return {
      "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "use_sliding_window": False, "sliding_window": None,
      "max_window_layers": cfg.num_layers, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
      "torch_dtype": dtype, "dtype": dtype, "use_cache": True,
  }


def save_hf(params: Any, cfg: ModelConfig, out_dir: str, *, dtype: str = "bfloat16",
            layout: str = "qwen2", hf_config: dict[str, Any] | None = None,
            max_shard_bytes: int = 4 * 1024 ** 3, copy_from: str | None = None) -> list[str]:
  """Writes the decoder as HF safetensors (+ index when sharded) and config.json; returns the file names.

  layout 'qwen2': `model.` / `lm_head.` keys and a Qwen2ForCausalLM config (transformers, vLLM).
  layout 'omni_thinker': `thinker.model.` / `thinker.lm_head.` keys, to drop into a Qwen2.5-Omni checkpoint
  in place of its thinker LM; `hf_config` (that checkpoint's config.json) is written as config.json.
  copy_from (layout 'omni_thinker' only): a local Qwen2.5-Omni or Omni-thinker checkpoint directory (usually
  the run's model.hf_path). Its non-LM tensors are copied unchanged (dtype and bytes), its LM tensors are
  replaced by ours under the same prefix (`thinker.model.` in a full Omni checkpoint, `model.` in a
  thinker-only one), and its other top-level files (config.json unless `hf_config` is given, tokenizer,
  preprocessor and generation configs) are copied. Pickled files there are not copied (logged).
  Parameters HF has no key for (the video/audio 'mlp' projectors, which RL trains) go to PROJECTOR_FILE
  under their param paths, in their param dtype (bit-exact whatever `dtype` is), so that the directory holds
  the whole policy and `load_hf(out_dir, model, projectors='require')` restores it. An index is then always
  written (also for one shard), and it names only the HF shards: transformers and vLLM load what the index
  names, so the extra file never reaches them. An 'identity'-projector model (Qwen2.5-Omni) has no such
  parameters and writes no such file. Arrays must be addressable from this process (call from process 0
  after gathering in multi-host runs).
  """
  if layout not in ("qwen2", "omni_thinker"):
    raise ValueError(f"layout must be 'qwen2' or 'omni_thinker', got {layout!r}")
  if copy_from is not None and layout != "omni_thinker":
    raise ValueError(f"copy_from needs layout='omni_thinker' (got {layout!r}): a Qwen2ForCausalLM export has "
                     "no place for the towers")
  if layout == "omni_thinker" and hf_config is None and copy_from is None:
    raise ValueError("layout='omni_thinker' needs hf_config (the Omni checkpoint's config.json dict) or copy_from")
  if dtype not in _EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_EXPORT_DTYPES)}, got {dtype!r}")
  np_dtype = np.dtype(safetensors_io.DTYPES[_EXPORT_DTYPES[dtype]])
  if copy_from is not None and os.path.realpath(copy_from) == os.path.realpath(out_dir):
    raise ValueError(f"copy_from and out_dir are the same directory ({out_dir}); export elsewhere")
  source = _CopySource.open(copy_from, cfg) if copy_from is not None else None
  prefix = "model." if layout == "qwen2" else (source.prefix + "model." if source else "thinker.model.")
  flat = {base.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  layer_map = _layer_map(cfg)

  tensors = []  # (hf name, shape, dtype, thunk)
  for key in _expected_keys(cfg, prefix):
    tgt = _classify(key, cfg, layer_map)
    arr = flat[tgt.param]
    if tgt.layer is None:
      thunk = lambda arr=arr, tgt=tgt: tgt.inverse(np.asarray(jax.device_get(arr), np.float32))
      shape = tgt.inverse(np.empty(arr.shape, np.bool_)).shape
    else:
      thunk = lambda arr=arr, tgt=tgt: tgt.inverse(np.asarray(jax.device_get(arr[tgt.layer]), np.float32))
      shape = tgt.inverse(np.empty(arr.shape[1:], np.bool_)).shape
    tensors.append((key, shape, np_dtype, thunk))
  if source is not None:
    tensors += source.tensors
  hf_params = _hf_params(cfg)
  extra = [(name, tuple(arr.shape), np.dtype(arr.dtype), lambda arr=arr: np.asarray(jax.device_get(arr)))
           for name, arr in sorted(flat.items()) if name not in hf_params]

  shards, size = [[]], 0
  for t in tensors:
    nbytes = int(np.prod(t[1])) * np.dtype(t[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  os.makedirs(out_dir, exist_ok=True)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, shard in zip(names, shards):
    safetensors_io.write(os.path.join(out_dir, name), shard, metadata={"format": "pt"})
  written = list(names)
  if extra:
    safetensors_io.write(os.path.join(out_dir, PROJECTOR_FILE), extra,
                         metadata={"format": "merr1", "content": "policy parameters with no HF key, by param path"})
    written.append(PROJECTOR_FILE)
  if len(shards) > 1 or extra:
    index = {"metadata": {"total_size": sum(int(np.prod(t[1])) * np.dtype(t[2]).itemsize for t in tensors)},
             "weight_map": {t[0]: n for n, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
    written.append("model.safetensors.index.json")
  if source is not None:
    written += source.copy_files(out_dir, skip=set(written) | ({"config.json"} if hf_config is not None else set()))
  if source is None or hf_config is not None:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_config if layout == "omni_thinker" else hf_config_dict(cfg, dtype), f, indent=2)
    written.append("config.json")
  return written


_EXPORT_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}
# Non-tensor files of a HF checkpoint that an export does not copy: weights are written anew.
_WEIGHT_FILE = re.compile(r"\.safetensors$|\.safetensors\.index\.json$")


@dataclasses.dataclass
class _CopySource:
  """The pass-through part of a `copy_from` checkpoint: its non-LM tensors (as streaming thunks over memmap
  views, so that host memory holds one tensor at a time), its LM prefix and its other files."""

  root: str
  prefix: str  # '' (thinker-only checkpoint) or 'thinker.' (full Omni checkpoint)
  tensors: list[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]]

  @classmethod
  def open(cls, path: str, cfg: ModelConfig) -> "_CopySource":
    if not os.path.isdir(path):
      raise ValueError(f"copy_from={path!r}: expected a local HF checkpoint directory")
    files, config_json = _resolve_files(path)
    if config_json is None:
      raise ValueError(f"copy_from={path!r}: no config.json (needed to check the model and to copy it)")
    check_config(cfg, read_json(config_json), config_json)
    layer_map = _layer_map(cfg)
    lm_keys, lm_unknown, tensors = [], [], []
    for file in files:
      header, get = safetensors_io.open_tensors(file)
      for key, info in header.items():
        tgt = _classify(key, cfg, layer_map)
        if isinstance(tgt, _Target):
          lm_keys.append(key)  # replaced by ours
        elif tgt is None and _looks_like_lm(key):
          if not key.endswith("rotary_emb.inv_freq"):  # a recomputed buffer some old checkpoints carry
            lm_unknown.append(f"{key} ({os.path.basename(file)})")
        else:
          dtype = np.dtype(safetensors_io.DTYPES[info["dtype"]])
          tensors.append((key, tuple(info["shape"]), dtype, functools.partial(get, key)))
    if lm_unknown:
      # Copying them would mix the source's LM with ours (e.g. biases our model does not have).
      raise ValueError(f"copy_from={path!r}: LM tensors the model does not map: {', '.join(lm_unknown[:20])}")
    prefixes = {"thinker." if k.startswith("thinker.") else "" for k in lm_keys}
    if len(prefixes) > 1:
      raise ValueError(f"copy_from={path!r}: LM weights under both 'thinker.' and bare prefixes")
    if prefixes:
      prefix = prefixes.pop()
    else:  # a towers-only directory: follow the config's kind
      prefix = "thinker." if "thinker_config" in read_json(config_json) else ""
    return cls(root=path, prefix=prefix, tensors=tensors)

  def copy_files(self, out_dir: str, skip: set[str]) -> list[str]:
    copied, refused = [], []
    for name in sorted(os.listdir(self.root)):
      src = os.path.join(self.root, name)
      if not os.path.isfile(src) or name in skip or _WEIGHT_FILE.search(name):
        continue
      if name.endswith(_PICKLE_SUFFIXES):
        refused.append(name)
        continue
      shutil.copyfile(src, os.path.join(out_dir, name))
      copied.append(name)
    if refused:
      _log.warning("copy_from %s: pickled files not copied: %s (copy them yourself if you need them)",
                   self.root, ", ".join(refused))
    return copied


def _looks_like_lm(key: str) -> bool:
  bare = key[len("thinker."):] if key.startswith("thinker.") else key
  return bare.startswith(("model.", "lm_head."))


def export_kwargs(hf_path: str) -> dict[str, Any]:
  """save_hf / checkpoint.export_hf keyword arguments for a run that started from `hf_path`.

  A Qwen2.5-Omni (or Omni-thinker) checkpoint exports back to its own layout with its towers copied through
  (layout='omni_thinker', copy_from=hf_path); anything else (no hf_path, a Qwen2 causal LM) as Qwen2ForCausalLM.
  """
  if not hf_path:
    return {}
  _, config_json = _resolve_files(hf_path)
  if config_json is None:
    return {}
  hf = read_json(config_json)
  omni = str(hf.get("model_type", "")).startswith("qwen2_5_omni") or "thinker_config" in hf
  return {"layout": "omni_thinker", "copy_from": os.path.dirname(config_json)} if omni else {}
