"""Presets: the full-size dimensions against the published HF configs (written out here, independently of the
presets), parameter counts by jax.eval_shape (no memory) against a formula over those published values and
the published totals; config validation."""

import jax
import numpy as np
import pytest

from merr1_jax.models import hf_io, mllm, presets

# The published HF config values, copied by hand (not derived from the presets):
#  * Qwen/Qwen2.5-Omni-7B config.json, thinker_config.text_config (rope_scaling {"mrope_section": [16, 24, 24],
#    "rope_type": "default", "type": "default"}); its lm_head is separate (thinker.lm_head.weight).
#  * Qwen/Qwen2.5-Omni-3B config.json, thinker_config.text_config: the Qwen2.5-3B dims with M-RoPE. Tie: NOT
#    confirmed from the published config (only the dims were); the preset keeps tied, as Qwen2.5-3B (which
#    this LM starts from) ships tied. A checkpoint that carries thinker.lm_head.weight needs
#    hf_io.config_from_hf(its config.json) or tie_embeddings=False, and load_hf says so (unexpected key).
#  * Qwen/Qwen2.5-0.5B config.json (Qwen/Qwen2-0.5B has the same values for every field below; it differs only
#    in max_position_embeddings 131072 vs 32768, which the preset does not carry).
PUBLISHED_DIMS = {
    "qwen2_5_omni_7b_thinker": dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate=18944,
                                    vocab=152064, rope_theta=1e6, rms_eps=1e-6, mrope_section=(16, 24, 24),
                                    tie=False),
    "qwen2_5_omni_3b_thinker": dict(hidden=2048, layers=36, heads=16, kv_heads=2, head_dim=128, intermediate=11008,
                                    vocab=151936, rope_theta=1e6, rms_eps=1e-6, mrope_section=(16, 24, 24),
                                    tie=True),  # tie unconfirmed, see above
    "qwen2_0p5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, head_dim=64, intermediate=4864, vocab=151936,
                       rope_theta=1e6, rms_eps=1e-6, mrope_section=None, tie=True),
}

# Published totals (Qwen2 blog / Qwen2.5 model cards): Qwen2-0.5B 0.49B; Qwen2.5-3B 3.09B (tied);
# Qwen2.5-7B 7.61B, whose dims the Omni-7B thinker's LM shares.
PUBLISHED_TOTAL = {"qwen2_0p5b": 0.49e9, "qwen2_5_omni_3b_thinker": 3.09e9, "qwen2_5_omni_7b_thinker": 7.61e9}


def _qwen2_param_count(p):
  """Parameters of a Qwen2 decoder, as transformers builds it: q/k/v with biases, o, SwiGLU gate/up/down, two
  RMSNorms per layer, a final norm, the token embedding and (untied) an lm_head."""
  d, f, v, n = p["hidden"], p["intermediate"], p["vocab"], p["layers"]
  q, kv = p["heads"] * p["head_dim"], p["kv_heads"] * p["head_dim"]
  per_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
  return v * d * (1 if p["tie"] else 2) + n * per_layer + d


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIMS))
def test_full_size_preset_matches_the_published_config(name):
  p, cfg = PUBLISHED_DIMS[name], presets.get(name)
  ours = dict(hidden=cfg.d_model, layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, intermediate=cfg.mlp_dim, vocab=cfg.vocab_size, rope_theta=cfg.rope_theta,
              rms_eps=cfg.rms_eps, mrope_section=cfg.mrope_section, tie=cfg.tie_embeddings)
  assert ours == p
  assert cfg.qkv_bias


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIMS))
def test_full_size_preset_parameter_counts(name):
  model = mllm.build(name)
  abstract = model.abstract_params()  # eval_shape: shapes only
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  # These presets have no projector parameters ('identity' for Omni, no features for 0.5B): all LM.
  assert count == _qwen2_param_count(PUBLISHED_DIMS[name])
  assert abs(count - PUBLISHED_TOTAL[name]) / PUBLISHED_TOTAL[name] < 0.01, count
  assert {a.dtype for a in jax.tree.leaves(abstract)} == {np.dtype("bfloat16")}


def test_omni_7b_published_style_config_json_gives_the_preset():
  """config_from_hf on a config.json laid out like the published Qwen2.5-Omni-7B one (legacy rope_scaling with
  both type keys, nested thinker/text configs) gives the preset's LM fields."""
  p = PUBLISHED_DIMS["qwen2_5_omni_7b_thinker"]
  text = {"model_type": "qwen2_5_omni_text", "hidden_act": "silu", "hidden_size": p["hidden"],
          "intermediate_size": p["intermediate"], "num_hidden_layers": p["layers"],
          "num_attention_heads": p["heads"], "num_key_value_heads": p["kv_heads"], "vocab_size": p["vocab"],
          "rms_norm_eps": p["rms_eps"], "rope_theta": p["rope_theta"], "use_sliding_window": False,
          "sliding_window": 32768, "max_window_layers": 28, "tie_word_embeddings": False,
          "rope_scaling": {"mrope_section": list(p["mrope_section"]), "rope_type": "default", "type": "default"}}
  hf = {"model_type": "qwen2_5_omni", "thinker_config": {"model_type": "qwen2_5_omni_thinker",
                                                         "video_token_index": 151656, "audio_token_index": 151646,
                                                         "text_config": text}}
  cfg = hf_io.config_from_hf(hf)
  want = presets.get("qwen2_5_omni_7b_thinker")
  for f in hf_io._CHECKED + ("projector", "video_dim", "audio_dim", "video_token_id", "audio_token_id"):
    assert getattr(cfg, f) == getattr(want, f), f


def test_small_presets_sizes():
  tiny = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(mllm.build("tiny").abstract_params()))
  small = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(mllm.build("small_20m").abstract_params()))
  assert 1e6 <= tiny <= 5e6, tiny
  assert 18e6 <= small <= 22e6, small


def test_get_overrides_and_unknown_name():
  cfg = presets.get("tiny", vocab_size=300)
  assert (cfg.vocab_size, cfg.video_token_id, cfg.audio_token_id) == (300, 298, 299)
  assert presets.get("qwen2_5_omni_7b_thinker", scan_layers=False).scan_layers is False
  with pytest.raises(ValueError, match="unknown model preset 'qwen3'; known presets: tiny, small_20m"):
    presets.get("qwen3")
  with pytest.raises(ValueError, match="bad override"):
    presets.get("tiny", not_a_field=1)


@pytest.mark.parametrize("override,field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(mrope_section=(4, 4, 4)), "mrope_section"),
    (dict(projector="identity"), "video_dim"),
    (dict(video_token_id=10_000), "video_token_id"),
    (dict(compute_dtype="fp8"), "compute_dtype"),
])
def test_validation_names_the_field(override, field):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    presets.get("tiny", **override)
