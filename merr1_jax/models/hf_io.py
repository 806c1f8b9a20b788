"""Hugging Face safetensors checkpoints <-> the decoder's parameter tree (Qwen2, Qwen2.5, Qwen2.5-Omni thinker).

Import (`load_hf`):
  * A file, a directory with model.safetensors, or a sharded directory with model.safetensors.index.json.
    Pickled formats (.bin/.pt/.pth/.ckpt) are refused, never opened.
  * Key prefixes: Qwen2 causal LMs use `model.` / `lm_head.`; an Omni thinker checkpoint the same; a full
    Qwen2.5-Omni checkpoint `thinker.model.` / `thinker.lm_head.`; a bare text model none. Tower and talker
    weights (audio_tower, visual, talker, token2wav) are skipped by name and counted; their bytes are
    never read.
  * Headers are checked first: missing / unexpected / shape-mismatched keys raise one ValueError listing
    them (strict) or go into the returned LoadReport (strict=False; missing ones keep a fresh init).
    Non-float tensors and a config.json that disagrees with the model config are always errors.
  * Then shard by shard, tensor by tensor: memmap view -> transpose/reshape -> cast to param dtype ->
    straight onto its target sharding (per-device slices via make_array_from_callback). Per-layer tensors
    go into their stacked parameter with a donated in-place update, so host memory holds one tensor.
Export (`save_hf`): safetensors shards + index + config.json that transformers / vLLM load. With
  `copy_from=SRC` (layout 'omni_thinker') every SRC tensor that is not a thinker-LM weight (audio/vision towers,
  talker, token2wav) is streamed through byte for byte, SRC's config / tokenizer / preprocessor files are
  copied, and our LM weights go under SRC's own thinker prefix: the result is a complete Qwen2.5-Omni
  (thinker) checkpoint. `export_kwargs(hf_path)` picks the layout a run that started from `hf_path` exports in.

HF layout (per layer i): q_proj.weight [H*Dh, D], o_proj.weight [D, H*Dh], gate/up [F, D], down [D, F].
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
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadReport:
  loaded: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # group -> tensor count
  missing: list[str] = dataclasses.field(default_factory=list)
  unexpected: list[str] = dataclasses.field(default_factory=list)
  shape_mismatch: list[str] = dataclasses.field(default_factory=list)

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


def _classify(key: str, cfg: ModelConfig, layer_map) -> _Target | str | None:
  """A _Target, a skip-group name (str), or None (unexpected)."""
  if (m := _SKIP.match(key)):
    return m.group(1) or m.group(2)
  if key in _HEAD_KEYS:
    return None if cfg.tie_embeddings else _Target(P + "lm_head", None, _transpose, _transpose)
  for pfx in _LM_PREFIXES:
    if not key.startswith(pfx):
      continue
    rest = key[len(pfx):]
    if rest == "embed_tokens.weight":
      return _Target(P + "embed/embedding", None, _identity, _identity)
    if rest == "norm.weight":
      return _Target(P + "final_norm/scale", None, _identity, _identity)
    if (m := _LAYER.match(rest)) and m.group(2) in layer_map and int(m.group(1)) < cfg.num_layers:
      name, fn, inv = layer_map[m.group(2)]
      return _Target(P + "layers/" + name, int(m.group(1)), fn, inv)
  return None


def _expected_keys(cfg: ModelConfig, prefix: str = "model.") -> list[str]:
  keys = [prefix + "embed_tokens.weight", prefix + "norm.weight"]
  keys += [f"{prefix}layers.{i}.{s}" for i in range(cfg.num_layers) for s in _layer_map(cfg)]
  if not cfg.tie_embeddings:
    keys.append("lm_head.weight" if prefix == "model." else prefix.replace("model.", "lm_head.") + "weight")
  return keys


# -------------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
  """A ModelConfig from a Qwen2 / Qwen2.5 / Qwen2.5-Omni (full, thinker or text) config.json dict."""
  outer = [hf]
  for sub in ("thinker_config", "text_config"):
    if isinstance(outer[-1].get(sub), dict):
      outer.append(outer[-1][sub])
  c = outer[-1]

  def find(key, default=None):
    for d in reversed(outer):
      if key in d and d[key] is not None:
        return d[key]
    return default

  rope = find("rope_parameters") or find("rope_scaling") or {}
  heads = c["num_attention_heads"]
  default_tie = c.get("model_type", "") != "qwen2"  # Qwen2Config defaults to untied, the Omni text config to tied
  kw = dict(
      vocab_size=c["vocab_size"], d_model=c["hidden_size"], num_layers=c["num_hidden_layers"],
      num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
      head_dim=c.get("head_dim") or c["hidden_size"] // heads, mlp_dim=c["intermediate_size"],
      rope_theta=float(rope.get("rope_theta") or find("rope_theta", 10000.0)),
      rms_eps=float(c.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(c.get("tie_word_embeddings", find("tie_word_embeddings", default_tie))),
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
            "rope_theta", "rms_eps", "tie_embeddings", "mrope_section")


def check_config(cfg: ModelConfig, hf: dict[str, Any], source: str = "config.json") -> None:
  theirs = config_from_hf(hf)
  bad = [f"{f}: model {getattr(cfg, f)!r} vs checkpoint {getattr(theirs, f)!r}"
         for f in _CHECKED if getattr(cfg, f) != getattr(theirs, f)]
  if bad:
    raise ValueError(f"{source} does not match the model config:\n  " + "\n  ".join(bad))


# -------------------------------------------------------------------------------------------------- import


def _resolve_files(path: str) -> tuple[list[str], str | None]:
  """The safetensors files of a checkpoint and its config.json (or None). Refuses pickled formats."""
  if os.path.isfile(path):
    if path.endswith(_PICKLE_SUFFIXES):
      raise ValueError(f"{path}: refusing a pickled checkpoint; convert it to safetensors")
    if path.endswith(".index.json"):
      root = os.path.dirname(path)
      with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
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
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors"))
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
            rng: jax.Array | None = None, check_config_json: bool = True) -> tuple[Any, LoadReport]:
  """Loads a HF checkpoint into `model`'s parameter tree (a MultimodalPolicy; projectors keep their init).

  shardings: None (device 0), one Sharding, a pytree like the params, or fn(path, shape, dtype) -> Sharding.
  Returns (params, report). Parameters the checkpoint lacks (the projectors always, the rest only with
  strict=False) come from `model.init_params(rng)`.
  """
  cfg: ModelConfig = model.config
  files, config_json = _resolve_files(path)
  if check_config_json and config_json:
    with open(config_json) as f:
      check_config(cfg, json.load(f), config_json)

  abstract = model.abstract_params()
  shapes = {base.path_str(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  layer_map = _layer_map(cfg)
  report = LoadReport()
  plan: dict[str, list[tuple[str, _Target]]] = {}
  seen: dict[tuple[str, int | None], str] = {}
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
  if dtype_errors:
    raise ValueError("checkpoint tensors with a wrong dtype:\n  " + "\n  ".join(dtype_errors))

  all_targets = {(t.param, t.layer): k for k, t in
                 ((k, _classify(k, cfg, layer_map)) for k in _expected_keys(cfg))}
  report.missing = [k for tgt, k in all_targets.items() if tgt not in seen and tgt not in mismatched]
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

  # Parameters the checkpoint does not provide: projectors always, missing keys with strict=False.
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
  Projector weights are not exported (HF models have their own towers and mergers). Arrays must be
  addressable from this process (call from process 0 after gathering in multi-host runs).
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
  if len(shards) > 1:
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
    with open(config_json) as f:
      check_config(cfg, json.load(f), config_json)
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
      with open(config_json) as f:
        prefix = "thinker." if "thinker_config" in json.load(f) else ""
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
  with open(config_json) as f:
    hf = json.load(f)
  omni = str(hf.get("model_type", "")).startswith("qwen2_5_omni") or "thinker_config" in hf
  return {"layout": "omni_thinker", "copy_from": os.path.dirname(config_json)} if omni else {}
