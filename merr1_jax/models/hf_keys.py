"""HF checkpoint key names and tensor layouts <-> our parameter paths: the one mapping that import and export share.

hf_import reads a checkpoint by it and hf_export writes one by it, so that export is the exact inverse of import:
each `_Target` carries both directions of its tensor's transform, and `_expected_keys` is both the list a
checkpoint must contain and the list an export writes. The names are underscored because they are internal to
the HF I/O modules (hf_io re-exports `_expected_keys` for the tests).

Key prefixes: Qwen2 causal LMs and Omni thinker-only checkpoints use `model.` / `lm_head.`, a full Qwen2.5-Omni
checkpoint `thinker.model.` / `thinker.lm_head.`, a bare text model none. Tower and talker weights (audio_tower,
visual, talker, token2wav) are classified as a skip group by name: the decoder has no place for them.
HF layout (per layer i): q_proj.weight [H*Dh, D], o_proj.weight [D, H*Dh], gate/up [F, D], down [D, F],
embed_tokens [V, D], lm_head [V, D]. Ours (`P` + ...): layers/q|k|v_kernel [L, D, H|K, Dh] (stacked over
layers), layers/o_kernel [L, H, Dh, D], layers/gate|up_kernel [L, D, F], layers/down_kernel [L, F, D],
embed/embedding [V, D], lm_head [D, V].
Shape legend: L layers, D d_model, H query heads, K kv heads, Dh head dim, F mlp width, V vocab.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np

from merr1_jax.models.config import ModelConfig

_SKIP = re.compile(r"^(?:thinker\.)?(audio_tower|visual)\.|^(talker|token2wav)\.")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LM_PREFIXES = ("thinker.model.", "model.", "")
_HEAD_KEYS = ("thinker.lm_head.weight", "lm_head.weight")
P = "decoder/"  # where the decoder sits in the policy's param tree


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
