"""Omni parity: preprocess real (synthetic) clips with a tiny random Qwen2.5-Omni thinker's towers, import its
LM into JAX, and match the HF thinker's full multimodal forward on the same clips (float32, <= 1e-4).

Everything is built offline here: the thinker (transformers, random weights, saved as safetensors), a
byte-level tokenizer with the Omni marker ids, and mp4 clips written with PyAV. Matching logits means the
placeholder layout, the recorded TMRoPE ids and the embedding merge equal transformers' own. The records then go
through the training pipeline (an eval batch, which re-renders each prompt from the record and its
media_layout): the batch holds the recorded prompt ids and, fed to the JAX policy, gives the same logits again.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

from merr1_jax.data import featurize, media, pipeline, preprocess, schema  # noqa: E402
from merr1_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from merr1_jax.models import base, hf_io, mllm  # noqa: E402
from tests.helpers.omni import write_omni_tokenizer, write_random_clip  # noqa: E402
from tests.helpers.torch_init import randomise  # noqa: E402

D, VOCAB = 64, 151_680  # the vocabulary must reach past the Omni marker ids
# name -> (frames, video fps, audio seconds, audio sample rate). "long" spans three 2 s chunks.
CLIPS = {"short": (6, 4, 1.3, 22050), "long": (40, 8, 5.0, 44100)}


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
  from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as co
  from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as mo

  root = tmp_path_factory.mktemp("omni")
  ckpt = root / "ckpt"
  cfg = co.Qwen2_5OmniThinkerConfig(
      audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                        d_model=32, output_dim=D, n_window=100, max_source_positions=1500),
      vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=D,
                         fullatt_block_indexes=[0], window_size=112),
      text_config=dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}))
  cfg.vision_start_token_id = 151652  # transformers needs it set before a multimodal forward
  thinker = randomise(mo.Qwen2_5OmniThinkerForConditionalGeneration(cfg))
  thinker.save_pretrained(ckpt)
  write_omni_tokenizer(ckpt)

  videos = root / "video"
  videos.mkdir()
  for i, (name, spec) in enumerate(CLIPS.items()):
    write_random_clip(videos / f"{name}.mp4", *spec, seed=i, rising=True)
  (root / "label.csv").write_text('name,openset\nshort,"happy, surprised"\nlong,sad\n')
  (root / "subtitle.csv").write_text("name,english\nshort,Hello there\nlong,Oh no. Not again!\n")

  jcfg = hf_io.config_from_hf(json.loads((ckpt / "config.json").read_text()))
  jcfg = jcfg.replace(projector="identity", video_dim=D, audio_dim=D)
  model = mllm.MultimodalPolicy(jcfg)
  params, report = hf_io.load_hf(str(ckpt), model)
  assert report.clean and set(report.skipped) == {"audio_tower", "visual"}
  return dict(root=root, ckpt=ckpt, thinker=thinker, model=model, params=params)


def _config(omni, layout):
  import importlib.util
  spec = importlib.util.spec_from_file_location("_pp_cfg", os.path.join(os.path.dirname(__file__), "..",
                                                                        "configs", "preprocess.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  root = omni["root"]
  c.label_csv, c.subtitle_csv, c.video_dir = str(root / "label.csv"), str(root / "subtitle.csv"), str(root / "video")
  c.checkpoint_dir, c.output_dir, c.layout = str(omni["ckpt"]), str(root / f"out_{layout}"), layout
  c.torch_dtype = c.feature_dtype = "float32"
  c.video.min_pixels, c.video.max_pixels = 2 * 28 * 28, 56 * 56  # 2x2 merged tokens per frame pair
  return c


def _expected_runs(grid_thw, second_per_grid, n_audio, layout):
  """Independent reference for the layout: 2 s chunks of 25 ids per second; in each, video then audio."""
  t, h, w = grid_thw
  per_t = h * w // 4
  if layout == "separate":
    return f"V{t * per_t}A{n_audio}"
  n_chunks = max(int(ti * second_per_grid * 25) // 50 for ti in range(t)) + 1
  n_chunks = max(n_chunks, (n_audio - 1) // 50 + 1)
  runs = []
  for j in range(n_chunks):
    nv = per_t * sum(1 for ti in range(t) if int(ti * second_per_grid * 25) // 50 == j)
    na = len(range(j * 50, min((j + 1) * 50, n_audio)))
    runs += [("V", nv), ("A", na)]
  merged = []
  for k, n in runs:
    if n and merged and merged[-1][0] == k:
      merged[-1] = (k, merged[-1][1] + n)
    elif n:
      merged.append((k, n))
  return "".join(f"{k}{n}" for k, n in merged)


def _hf_logits(omni, cfg, name, ids, layout):
  from merr1_jax.data import encoders
  enc = encoders.OmniTowerEncoder(cfg.checkpoint_dir)
  video = media.read_video(os.path.join(cfg.video_dir, f"{name}.mp4"), featurize._video_spec(cfg))
  audio = media.read_audio(os.path.join(cfg.video_dir, f"{name}.mp4"))
  pixels, grid = enc.pixel_inputs(video.frames)
  mel, mel_mask = enc.audio_inputs(audio)
  with torch.no_grad():
    out = omni["thinker"](
        input_ids=torch.tensor(ids, dtype=torch.long)[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.tensor([grid]),
        input_features=torch.from_numpy(mel), feature_attention_mask=torch.from_numpy(mel_mask),
        use_audio_in_video=layout == "interleaved", video_second_per_grid=torch.tensor([2 / video.sample_fps]))
  return out.logits[0].numpy()


@pytest.mark.parametrize("layout", ["separate", "interleaved"])
def test_jax_policy_on_records_matches_hf_thinker(omni, layout):
  cfg = _config(omni, layout)
  summary = preprocess.run(cfg)
  assert (summary["written"], summary["failed"]) == (2, 0)
  model, params = omni["model"], omni["params"]
  forward = jax.jit(lambda p, inp: model.forward(p, model.embed(p, inp))[0])
  refs, layouts = {}, {}
  for name in CLIPS:
    folder = os.path.join(cfg.output_dir, cfg.split)
    with open(os.path.join(folder, f"{name}.rec"), "rb") as f:
      rec = schema.from_bytes(f.read())
    with open(os.path.join(folder, f"{name}.layout.json")) as f:
      layout_info = json.load(f)
    ids = np.asarray(layout_info["prompt_ids"], np.int32)
    assert rec.feature_space == "lm_embed" and rec.position_ids.shape == (3, len(ids))
    assert layout_info["runs"] == _expected_runs(layout_info["video_grid_thw"], layout_info["second_per_grid"],
                                                 rec.n_audio, layout)
    if layout == "interleaved" and name == "long":  # the long clip really is interleaved: V A V A V A
      assert layout_info["runs"].count("V") == 3 and layout_info["runs"].count("A") == 3
    # The record carries the runs only when they are not render_prompt's separate block.
    assert rec.media_layout == (layout_info["runs"] if layout == "interleaved" else None)

    ref = refs[name] = _hf_logits(omni, cfg, name, ids, layout)
    layouts[name] = layout_info
    mm = dict(video=jnp.asarray(rec.video[None]), video_mask=jnp.ones((1, rec.n_video), bool),
              audio=jnp.asarray(rec.audio[None]), audio_mask=jnp.ones((1, rec.n_audio), bool))
    inputs = base.ModelInputs(tokens=jnp.asarray(ids[None]), positions=jnp.asarray(rec.position_ids.T[None]),
                              mask=jnp.ones((1, len(ids)), bool), **mm)
    mllm.validate_placeholders(model.config, inputs)
    got = np.asarray(forward(params, inputs))[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4, (name, layout, np.abs(got - ref).max())

    # The comparison is sensitive to the position ids: plain 1-D positions (what a text LM would use) miss.
    flat = jnp.broadcast_to(jnp.arange(len(ids), dtype=jnp.int32)[:, None], (1, len(ids), 3))
    wrong = np.asarray(forward(params, inputs.replace(positions=flat)))[0]
    assert np.abs(wrong - ref).max() > 1e-2

  # End to end through the training pipeline: records -> eval batch (left-padded, both clips in one batch).
  folder = os.path.join(cfg.output_dir, cfg.split)
  source = pipeline.BytesSource([open(os.path.join(folder, f"{n}.rec"), "rb").read() for n in CLIPS], name=folder)
  pcfg = pipeline.PipelineConfig(kind="eval", batch_size=len(CLIPS), shuffle=False, num_epochs=1,
                                 drop_remainder=False, video_dim=D, audio_dim=D, feature_dtype="float32")
  batch = next(iter(pipeline.build(source, tokenizer_lib.load_hf(str(omni["ckpt"])), pcfg)))
  assert list(batch["ids"]) == list(CLIPS)
  inputs = base.ModelInputs(
      tokens=jnp.asarray(batch["prompt_tokens"]), positions=jnp.asarray(batch["mrope_positions"]),
      mask=jnp.asarray(batch["prompt_mask"]), video=jnp.asarray(batch["video"]),
      video_mask=jnp.asarray(batch["video_mask"]), audio=jnp.asarray(batch["audio"]),
      audio_mask=jnp.asarray(batch["audio_mask"]))
  mllm.validate_placeholders(model.config, inputs)
  logits = np.asarray(forward(params, inputs))
  for row, name in enumerate(CLIPS):
    m = batch["prompt_mask"][row]
    np.testing.assert_array_equal(batch["prompt_tokens"][row][m], layouts[name]["prompt_ids"])
    got = logits[row][m]
    assert got.shape == refs[name].shape
    assert np.abs(got - refs[name]).max() <= 1e-4, (name, layout, "pipeline", np.abs(got - refs[name]).max())
