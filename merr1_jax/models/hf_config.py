"""Hugging Face config.json <-> ModelConfig, for the HF checkpoint import (hf_import) and export (hf_export).

What is here:
  * `config_from_hf`: a ModelConfig from a Qwen2 / Qwen2.5 / Qwen2.5-Omni (full, thinker-only or text) config.json
    dict. A full Omni config nests the LM under `thinker_config.text_config`; fields are read innermost first,
    as transformers reads them. Settings the decoder does not implement (RoPE scaling other than plain RoPE /
    M-RoPE, sliding-window attention, an activation other than SiLU) are refused, naming the file and the field:
    loading them anyway would compute something else without a sign.
    The Omni thinker's lm_head is tied or not by the THINKER-level `tie_word_embeddings` (default False), as in
    transformers, not by its text_config's flag.
  * `check_config`: the fields of `_CHECKED` compared between a model config and a checkpoint's config.json (the
    import and the `copy_from` of an export both refuse weights of another shape or RoPE).
  * `hf_config_dict`: the Qwen2ForCausalLM config.json an export writes for layout 'qwen2'.
  * `read_json`: config.json / index files, with errors that name the file.
Nothing here touches tensors: the key names and tensor layouts are in hf_keys, reading and writing them in
hf_import and hf_export.
"""

from __future__ import annotations

import json
from typing import Any

from merr1_jax.models.config import ModelConfig


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


# The ModelConfig fields a checkpoint's config.json must agree on: those that change the weights' shapes or what
# they compute (dtypes, remat, projectors and the like are ours to choose).
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
