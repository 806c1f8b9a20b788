"""Named model configurations.

`get(name, **overrides)` returns a validated `ModelConfig`. The full-size presets carry the published
Qwen2 / Qwen2.5-Omni thinker text-model dimensions (checked by parameter count with `jax.eval_shape` in
tests/test_models_presets.py); the small ones are for CPU tests and benchmarks.

Qwen2.5-Omni thinkers take tower outputs that are already d_model wide (the towers end in a merger that
projects into the LM's embedding space), hence projector='identity' with video_dim == audio_dim == d_model.
Placeholder ids are the Omni tokenizer's: <|AUDIO|> = 151646, <|VIDEO|> = 151656.
"""

from __future__ import annotations

from typing import Any, Callable

from merr1_jax.models.config import ModelConfig


def _tiny(vocab_size: int = 8192, **kw: Any) -> ModelConfig:
  # A few M parameters at the default vocabulary; the placeholders sit at the top of whatever vocabulary
  # the embedded default's own tokenizer has, unless overridden.
  base = dict(
      vocab_size=vocab_size, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
      mlp_dim=384, rope_theta=10_000.0, tie_embeddings=True, video_dim=32, audio_dim=16,
      projector="mlp", video_token_id=vocab_size - 2, audio_token_id=vocab_size - 1, max_seq_len=2048)
  return ModelConfig(**{**base, **kw})


def _small_20m(vocab_size: int = 8192, **kw: Any) -> ModelConfig:
  # ~20M parameters (embedding 3.1M + 10 blocks of 1.57M): the size the project's CPU benchmarks use.
  base = dict(
      vocab_size=vocab_size, d_model=384, num_layers=10, num_heads=6, num_kv_heads=2, head_dim=64,
      mlp_dim=1024, rope_theta=10_000.0, tie_embeddings=True, video_dim=64, audio_dim=64,
      projector="mlp", video_token_id=vocab_size - 2, audio_token_id=vocab_size - 1, max_seq_len=4096)
  return ModelConfig(**{**base, **kw})


def _qwen2_0p5b(**kw: Any) -> ModelConfig:
  base = dict(
      vocab_size=151936, d_model=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
      mlp_dim=4864, rope_theta=1_000_000.0, rms_eps=1e-6, tie_embeddings=True, projector="mlp",
      video_dim=0, audio_dim=0, param_dtype="bfloat16", compute_dtype="bfloat16", scan_layers=True,
      remat="full")
  return ModelConfig(**{**base, **kw})


def _omni_3b_thinker(**kw: Any) -> ModelConfig:
  # Qwen2.5-3B text dims. Tied as the Qwen2.5-3B LM it starts from; NOT confirmed against the published
  # Omni-3B config.json, and transformers ties the thinker by thinker_config.tie_word_embeddings (default
  # False). If a checkpoint ships thinker.lm_head.weight, load_hf refuses it with this preset: build the
  # config with hf_io.config_from_hf(its config.json) (or tie_embeddings=False).
  base = dict(
      vocab_size=151936, d_model=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128,
      mlp_dim=11008, rope_theta=1_000_000.0, rms_eps=1e-6, tie_embeddings=True,
      mrope_section=(16, 24, 24), projector="identity", video_dim=2048, audio_dim=2048,
      video_token_id=151656, audio_token_id=151646, param_dtype="bfloat16", compute_dtype="bfloat16",
      scan_layers=True, remat="full")
  return ModelConfig(**{**base, **kw})


def _omni_7b_thinker(**kw: Any) -> ModelConfig:
  base = dict(
      vocab_size=152064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
      mlp_dim=18944, rope_theta=1_000_000.0, rms_eps=1e-6, tie_embeddings=False,
      mrope_section=(16, 24, 24), projector="identity", video_dim=3584, audio_dim=3584,
      video_token_id=151656, audio_token_id=151646, param_dtype="bfloat16", compute_dtype="bfloat16",
      scan_layers=True, remat="full")
  return ModelConfig(**{**base, **kw})


_PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "tiny": _tiny,
    "small_20m": _small_20m,
    "qwen2_0p5b": _qwen2_0p5b,
    "qwen2_5_omni_3b_thinker": _omni_3b_thinker,
    "qwen2_5_omni_7b_thinker": _omni_7b_thinker,
}


def names() -> tuple[str, ...]:
  return tuple(_PRESETS)


def get(name: str, **overrides: Any) -> ModelConfig:
  """Returns the named config with `overrides` applied (any ModelConfig field; `vocab_size` for tiny/small)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(_PRESETS)}")
  try:
    return _PRESETS[name](**overrides)
  except TypeError as e:  # an override that is not a ModelConfig field
    raise ValueError(f"preset {name!r}: bad override ({e})") from e
