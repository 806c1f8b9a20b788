"""Presets: full-size parameter counts by jax.eval_shape (no memory), against an independent count from the
HF config formula and the published totals; config validation."""

import jax
import numpy as np
import pytest

from merr1_jax.models import hf_io, mllm, presets


def _hf_formula_count(hf):
  """Parameter count of a Qwen2 causal LM from its config.json fields (what transformers would build)."""
  d, f, v, n = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_hidden_layers"]
  q = hf["num_attention_heads"] * hf["head_dim"]
  kv = hf["num_key_value_heads"] * hf["head_dim"]
  per_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
  return v * d * (1 if hf["tie_word_embeddings"] else 2) + n * per_layer + d


# Published totals (Qwen2 blog / Qwen2.5 model cards): Qwen2-0.5B 0.49B; Qwen2.5-3B 3.09B (tied);
# Qwen2.5-7B 7.61B, whose dims the Omni-7B thinker's LM shares.
PUBLISHED = {"qwen2_0p5b": 0.49e9, "qwen2_5_omni_3b_thinker": 3.09e9, "qwen2_5_omni_7b_thinker": 7.61e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_preset_parameter_counts(name):
  model = mllm.build(name)
  abstract = model.abstract_params()  # eval_shape: shapes only
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  assert count == _hf_formula_count(hf_io.hf_config_dict(model.config))
  assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.01, count
  assert {a.dtype for a in jax.tree.leaves(abstract)} == {np.dtype("bfloat16")}


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
