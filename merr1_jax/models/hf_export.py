"""The policy's parameter tree -> a Hugging Face safetensors checkpoint that transformers and vLLM load.

`save_hf` writes safetensors shards + index + config.json, in one of two layouts:
  * 'qwen2': `model.` / `lm_head.` keys and a Qwen2ForCausalLM config.json (hf_config.hf_config_dict);
  * 'omni_thinker': `thinker.model.` / `thinker.lm_head.` keys, to stand in for a Qwen2.5-Omni checkpoint's
    thinker LM. With `copy_from=SRC` (a `_CopySource`) every SRC tensor that is not a thinker-LM weight
    (audio/vision towers, talker, token2wav) is streamed through byte for byte, SRC's config / tokenizer /
    preprocessor files are copied, and our LM weights go under SRC's own thinker prefix: the result is a complete
    Qwen2.5-Omni (thinker) checkpoint, although only the LM was ever in JAX.
Parameters HF has no key for (the video/audio 'mlp' projectors, which RL trains) go to hf_import.PROJECTOR_FILE
(our param paths as tensor names, in their param dtype, bit-exact), so that hf_import.load_hf restores the whole
policy. That file is outside the index's weight_map, and an index is always written when it exists, so
transformers and vLLM (which load only the shards the index names) never see it.
`export_kwargs(hf_path)` picks the layout a run that started from `hf_path` exports in.

Every tensor is a (hf name, shape, dtype, thunk) `_Tensor`: shards are planned from shapes alone and the thunks
run one at a time while safetensors_io streams a shard, so host memory holds one tensor, whatever the model size.
The key names and the ours -> HF transforms are hf_keys' (the inverse of what import applies); shapes there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import numpy as np

from merr1_jax.models import base, lora, lora_export, safetensors_io
from merr1_jax.models.config import ModelConfig
from merr1_jax.models.hf_config import check_config, hf_config_dict, read_json
from merr1_jax.models.hf_import import _PICKLE_SUFFIXES, PROJECTOR_FILE, _log, _resolve_files
from merr1_jax.models.hf_keys import P, _classify, _expected_keys, _hf_params, _layer_map, _Target

_Tensor = tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]  # (hf name, shape, dtype, thunk -> array)

_EXPORT_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}
# Non-tensor files of a HF checkpoint that an export does not copy: weights are written anew.
_WEIGHT_FILE = re.compile(r"\.safetensors$|\.safetensors\.index\.json$")


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
  _check_export_args(out_dir, dtype, layout, hf_config, copy_from)
  if cfg.lora_rank:  # a LoRA policy exports merged (W + (alpha / r) A B): a plain checkpoint any loader reads
    params, cfg = lora_export.merged(params, cfg)
  np_dtype = np.dtype(safetensors_io.DTYPES[_EXPORT_DTYPES[dtype]])
  source = _CopySource.open(copy_from, cfg) if copy_from is not None else None
  prefix = "model." if layout == "qwen2" else (source.prefix + "model." if source else "thinker.model.")
  flat = {base.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  tensors = _lm_tensors(flat, cfg, prefix, np_dtype) + (source.tensors if source is not None else [])
  hf_params = _hf_params(cfg)
  extra = [(name, tuple(arr.shape), np.dtype(arr.dtype), lambda arr=arr: np.asarray(jax.device_get(arr)))
           for name, arr in sorted(flat.items()) if name not in hf_params]
  written = _write_weights(out_dir, _shards(tensors, max_shard_bytes), extra)
  if source is not None:
    written += source.copy_files(out_dir, skip=set(written) | ({"config.json"} if hf_config is not None else set()))
  if source is None or hf_config is not None:
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_config if layout == "omni_thinker" else hf_config_dict(cfg, dtype), f, indent=2)
    written.append("config.json")
  return written


def _check_export_args(out_dir: str, dtype: str, layout: str, hf_config: dict[str, Any] | None,
                       copy_from: str | None) -> None:
  """Refuses a save_hf call whose arguments do not make an export, before anything is read or written."""
  if layout not in ("qwen2", "omni_thinker"):
    raise ValueError(f"layout must be 'qwen2' or 'omni_thinker', got {layout!r}")
  if copy_from is not None and layout != "omni_thinker":
    raise ValueError(f"copy_from needs layout='omni_thinker' (got {layout!r}): a Qwen2ForCausalLM export has "
                     "no place for the towers")
  if layout == "omni_thinker" and hf_config is None and copy_from is None:
    raise ValueError("layout='omni_thinker' needs hf_config (the Omni checkpoint's config.json dict) or copy_from")
  if dtype not in _EXPORT_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_EXPORT_DTYPES)}, got {dtype!r}")
  if copy_from is not None and os.path.realpath(copy_from) == os.path.realpath(out_dir):
    raise ValueError(f"copy_from and out_dir are the same directory ({out_dir}); export elsewhere")


def _lm_tensors(flat: dict[str, Any], cfg: ModelConfig, prefix: str, np_dtype: np.dtype) -> list[_Tensor]:
  """Our decoder's tensors under `prefix`, in HF layout and order; each thunk fetches one (layer of a) parameter,
  in float32 for the transform, and safetensors_io casts it to `np_dtype` as it writes."""
  layer_map = _layer_map(cfg)
  tensors = []
  for key in _expected_keys(cfg, prefix):
    tgt = _classify(key, cfg, layer_map)
    arr = flat[tgt.param]
    shape = tgt.inverse(np.empty(arr.shape if tgt.layer is None else arr.shape[1:], np.bool_)).shape
    tensors.append((key, shape, np_dtype, functools.partial(_to_hf, arr, tgt)))
  return tensors


def _to_hf(arr: Any, tgt: _Target) -> np.ndarray:
  """One HF tensor from our parameter `arr` (its layer tgt.layer when stacked), fetched to host only now."""
  return tgt.inverse(np.asarray(jax.device_get(arr if tgt.layer is None else arr[tgt.layer]), np.float32))


def _nbytes(t: _Tensor) -> int:
  return int(np.prod(t[1])) * np.dtype(t[2]).itemsize


def _shards(tensors: list[_Tensor], max_shard_bytes: int) -> list[list[_Tensor]]:
  """`tensors` in order, cut into shards of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
  shards, size = [[]], 0
  for t in tensors:
    nbytes = _nbytes(t)
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  return shards


def _write_weights(out_dir: str, shards: list[list[_Tensor]], extra: list[_Tensor]) -> list[str]:
  """Writes the HF shards, PROJECTOR_FILE (when there are `extra` tensors) and the index; returns the file names.
  The index names only the HF shards, and is written whenever PROJECTOR_FILE is, so that HF loaders skip it."""
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
    index = {"metadata": {"total_size": sum(_nbytes(t) for shard in shards for t in shard)},
             "weight_map": {t[0]: n for n, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
    written.append("model.safetensors.index.json")
  return written


@dataclasses.dataclass
class _CopySource:
  """The pass-through part of a `copy_from` checkpoint: its non-LM tensors (as streaming thunks over memmap
  views, so that host memory holds one tensor at a time), its LM prefix and its other files."""

  root: str
  prefix: str  # '' (thinker-only checkpoint) or 'thinker.' (full Omni checkpoint)
  tensors: list[_Tensor]

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


# --------------------------------------------------------------------------------------------------- PEFT

# Our adapted kernel -> the HF module it adapts (under `model.layers.<i>.`).
_PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def save_peft(params: Any, cfg: ModelConfig, out_dir: str, *, base_model_name_or_path: str = "") -> list[str]:
  """Writes the LoRA adapters as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
  `peft.PeftModel.from_pretrained` loads onto the transformers Qwen2ForCausalLM of the base (`save_hf` of
  `lora_export.base_only(params, cfg)`, or the checkpoint the run started from).

  PEFT's layout per adapted Linear of `in` -> `out` features: lora_A.weight [r, in] and lora_B.weight [out, r],
  keys `base_model.model.model.layers.<i>.<module>.lora_(A|B).weight`, scale lora_alpha / r (use_rslora off);
  ours: A [in axes..., r], B [r, out axes...] per layer, flattened in the same (head, head_dim) order as the
  kernels' HF export. Adapters only: leaves that trained in full are not in a PEFT adapter (export merged with
  save_hf for those). float32, as trained."""
  if not cfg.lora_rank:
    raise ValueError("save_peft: the model has no LoRA adapters (model.lora_rank = 0)")
  flat = {base.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  targets = lora.lora_targets(cfg)
  tensors: list[_Tensor] = []
  for name in targets:
    a = np.asarray(jax.device_get(flat[f"{P}layers/{name}_lora_a"]), np.float32)  # [N, in..., r]
    b = np.asarray(jax.device_get(flat[f"{P}layers/{name}_lora_b"]), np.float32)  # [N, r, out...]
    for i in range(cfg.num_layers):
      key = f"base_model.model.model.layers.{i}.{_PEFT_MODULES[name]}"
      a_hf = np.ascontiguousarray(a[i].reshape(-1, cfg.lora_rank).T)  # [r, in]
      b_hf = np.ascontiguousarray(b[i].reshape(cfg.lora_rank, -1).T)  # [out, r]
      tensors += [(key + ".lora_A.weight", a_hf.shape, np.dtype(np.float32), lambda x=a_hf: x),
                  (key + ".lora_B.weight", b_hf.shape, np.dtype(np.float32), lambda x=b_hf: x)]
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write(os.path.join(out_dir, "adapter_model.safetensors"), tensors)
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
            "lora_dropout": float(cfg.lora_dropout),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "target_modules": sorted(_PEFT_MODULES[n].split(".")[1] for n in targets),
            "base_model_name_or_path": base_model_name_or_path, "revision": None}
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return ["adapter_model.safetensors", "adapter_config.json"]

