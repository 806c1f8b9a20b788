"""The placeholder merge, projectors and multimodal prefill/decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax.models import base, mllm

V = 64
VID, AUD = V - 2, V - 1


def _batch(rng, video_dim=32, audio_dim=16):
  # Row 0: 2 video + 3 audio placeholders; row 1: 3 video + 1 audio, with left padding and mask holes.
  tokens = np.array([[5, VID, VID, 7, AUD, AUD, AUD, 9, 3, 4],
                     [0, 0, VID, 8, VID, AUD, VID, 2, 6, 1]], np.int32)
  mask = np.array([[1] * 10, [0, 0] + [1] * 8], bool)
  video_mask = np.array([[1, 0, 1, 0], [1, 1, 0, 1]], bool)
  audio_mask = np.array([[1, 1, 1], [0, 1, 0]], bool)
  pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
  return base.ModelInputs(
      tokens=jnp.asarray(tokens), positions=jnp.asarray(pos, jnp.int32), mask=jnp.asarray(mask),
      video=jnp.asarray(rng.randn(2, 4, video_dim), jnp.float32), video_mask=jnp.asarray(video_mask),
      audio=jnp.asarray(rng.randn(2, 3, audio_dim), jnp.float32), audio_mask=jnp.asarray(audio_mask))


def _reference_merge(x, tokens, tok_id, feats, feat_mask):
  """Independent loop version of the convention: k-th placeholder <- k-th valid feature row."""
  x = np.array(x)
  for b in range(tokens.shape[0]):
    rows = [t for t in range(feats.shape[1]) if feat_mask[b, t]]
    slots = [l for l in range(tokens.shape[1]) if tokens[b, l] == tok_id]
    assert len(rows) == len(slots)
    for l, t in zip(slots, rows):
      x[b, l] = feats[b, t]
  return x


def test_merge_puts_the_right_rows_in_the_right_places():
  model = mllm.build("tiny", vocab_size=V)
  params = jax.jit(model.init_params)(jax.random.key(0))
  inputs = _batch(np.random.RandomState(0))
  x = np.asarray(model.embed(params, inputs).x)
  m = model._module(params)
  want = np.asarray(m.decoder.embed_tokens(inputs.tokens))
  want = _reference_merge(want, np.asarray(inputs.tokens), VID, np.asarray(m.project("video", inputs.video)),
                          np.asarray(inputs.video_mask))
  want = _reference_merge(want, np.asarray(inputs.tokens), AUD, np.asarray(m.project("audio", inputs.audio)),
                          np.asarray(inputs.audio_mask))
  # Projected rows to float32 rounding: eager and jitted projectors may fuse differently (about 1e-9 apart);
  # a row in the wrong place is off by O(1).
  np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-7)
  # Text positions keep their token embeddings.
  text = ~np.isin(np.asarray(inputs.tokens), [VID, AUD])
  np.testing.assert_array_equal(x[text], np.asarray(m.decoder.embed_tokens(inputs.tokens))[text])
  # The same under jit (no host check there, same numbers).
  np.testing.assert_allclose(np.asarray(jax.jit(model.embed)(params, inputs).x), x, rtol=1e-5, atol=1e-7)


def test_identity_projector_passes_tower_outputs_through():
  model = mllm.build("tiny", vocab_size=V, projector="identity", video_dim=128, audio_dim=128)
  params = jax.jit(model.init_params)(jax.random.key(0))
  assert not any("proj" in base.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  inputs = _batch(np.random.RandomState(1), video_dim=128, audio_dim=128)
  x = np.asarray(model.embed(params, inputs).x)
  np.testing.assert_array_equal(x[0, 1], np.asarray(inputs.video)[0, 0])  # 1st placeholder <- 1st valid row
  np.testing.assert_array_equal(x[0, 2], np.asarray(inputs.video)[0, 2])  # row 1 is masked out: skip it
  np.testing.assert_array_equal(x[1, 5], np.asarray(inputs.audio)[1, 1])


@pytest.mark.parametrize("modality,row,edit", [
    ("video", 1, lambda i: i.replace(video_mask=i.video_mask.at[1, 3].set(False))),
    ("audio", 0, lambda i: i.replace(tokens=i.tokens.at[0, 0].set(AUD))),
])
def test_count_mismatch_is_a_clear_error_before_jit(modality, row, edit):
  model = mllm.build("tiny", vocab_size=V)
  params = jax.jit(model.init_params)(jax.random.key(0))
  bad = edit(_batch(np.random.RandomState(0)))
  msg = rf"{modality} placeholder/feature count mismatch .*row {row}: \d+ placeholders vs \d+ valid rows"
  with pytest.raises(ValueError, match=msg):
    model.embed(params, bad)
  with pytest.raises(ValueError, match=msg):
    model.validate_inputs(bad)  # the PolicyModel member the rollout sampler calls on the host batch
  with pytest.raises(ValueError, match="count mismatch"):
    mllm.validate_placeholders(model.config, bad)


def test_features_without_projector_or_mask_are_errors():
  model = mllm.build("tiny", vocab_size=V, audio_dim=0)
  inputs = _batch(np.random.RandomState(0))
  with pytest.raises(ValueError, match="no audio projector"):
    mllm.validate_placeholders(model.config, inputs)
  model = mllm.build("tiny", vocab_size=V)
  with pytest.raises(ValueError, match="audio_mask is required"):
    mllm.validate_placeholders(model.config, inputs.replace(audio_mask=None))
  with pytest.raises(ValueError, match=r"rows \[0, 1\] hold video placeholders"):
    mllm.validate_placeholders(model.config, inputs.replace(video=None, video_mask=None))


def test_multimodal_prefill_then_decode_equals_full_forward():
  model = mllm.build("tiny", vocab_size=V, mrope_section=(4, 6, 6))
  params = jax.jit(model.init_params)(jax.random.key(0))
  inputs = _batch(np.random.RandomState(2))
  nxt = jnp.asarray([[11], [12]], jnp.int32)
  full_tokens = jnp.concatenate([inputs.tokens, nxt], 1)
  full_pos = jnp.concatenate([inputs.positions, inputs.positions[:, -1:] + 1], 1)
  full = inputs.replace(tokens=full_tokens, positions=jnp.stack([full_pos] * 3, -1),
                        mask=jnp.concatenate([inputs.mask, jnp.ones((2, 1), bool)], 1))
  ref, _ = jax.jit(model.forward)(params, model.embed(params, full))

  prompt = inputs.replace(positions=jnp.stack([inputs.positions] * 3, -1))
  cache = model.init_cache(2, 12)
  step = jax.jit(lambda p, inp, c: model.forward(p, model.embed(p, inp), c))
  pre, cache = step(params, prompt, cache)
  one = base.ModelInputs(tokens=nxt, positions=jnp.stack([full_pos[:, -1:]] * 3, -1), mask=jnp.ones((2, 1), bool))
  dec, cache = step(params, one, cache)
  m = np.asarray(inputs.mask)
  assert np.abs(np.asarray(pre)[m] - np.asarray(ref)[:, :-1][m]).max() <= 1e-5
  assert np.abs(np.asarray(dec)[:, 0] - np.asarray(ref)[:, -1]).max() <= 1e-5
  assert np.asarray(cache.index).tolist() == [11, 11]
