"""Offline preprocessing: sampling/resizing rules, PyAV decoding, patch layout, and the job (bad media per clip,
skip/raise, shards, resume, TFDS, the pipeline reading the records, the CLI).

The job tests use a small numpy encoder defined here (a test double: no torch, no checkpoint); the real Omni
tower encoder is covered end to end by tests/test_omni_parity.py.
"""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

av = pytest.importorskip("av")

from merr1_jax.data import encoders, featurize, media, pipeline, preprocess, schema, tfds_builders  # noqa: E402
from merr1_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from merr1_jax.task import prompts  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(tmp_path, **kw):
  import importlib.util
  spec = importlib.util.spec_from_file_location("_pp_cfg", os.path.join(REPO, "configs", "preprocess.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.label_csv, c.subtitle_csv = str(tmp_path / "label.csv"), str(tmp_path / "subtitle.csv")
  c.video_dir, c.output_dir, c.checkpoint_dir = str(tmp_path / "video"), str(tmp_path / "out"), str(tmp_path / "nockpt")
  c.video.min_pixels, c.video.max_pixels = 2 * 28 * 28, 56 * 56
  for k, v in kw.items():
    c[k] = v
  return c


def write_clip(path, *, n_frames=8, fps=4, audio_s=1.0, sr=22050, w=60, h=44, audio=True, colors=None):
  """Solid-colour frames (frame i has red = colors[i]) and a 440 Hz tone."""
  c = av.open(str(path), "w")
  vs = c.add_stream("mpeg4", rate=fps)
  vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
  a = None
  if audio:
    a = c.add_stream("aac", rate=sr)
    a.layout = "mono"
  colors = colors if colors is not None else [(20 * i) % 250 for i in range(n_frames)]
  for i in range(n_frames):
    img = np.full((h, w, 3), 60, np.uint8)
    img[..., 0] = colors[i]
    for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
      c.mux(p)
  for p in vs.encode():
    c.mux(p)
  if a is not None:
    frame = av.AudioFrame.from_ndarray((0.3 * np.sin(2 * np.pi * 440 * np.arange(int(audio_s * sr)) / sr))
                                       .astype(np.float32)[None], format="flt", layout="mono")
    frame.sample_rate = sr
    for p in a.encode(frame):
      c.mux(p)
    for p in a.encode():
      c.mux(p)
  c.close()


# ------------------------------------------------------------------------------------------------ rules


def test_frame_count_rules_by_hand():
  spec = media.VideoSpec()
  assert media.num_frames(30, 30.0, spec) == 4  # 1 s at 2 fps is 2 frames, raised to min_frames 4
  assert media.num_frames(300, 30.0, spec) == 20  # 10 s x 2 fps
  assert media.num_frames(301, 30.0, spec) == 20  # 20.07 rounds down to the temporal patch (2)
  assert media.num_frames(3, 30.0, spec) == 2  # never more than the clip has, and even
  assert media.num_frames(10_000, 1.0, spec) == 768  # the frame cap
  with pytest.raises(ValueError, match="cannot sample"):
    media.num_frames(1, 30.0, spec)
  np.testing.assert_array_equal(media.sample_indices(30, 4), [0, 10, 19, 29])  # 0, 9.67, 19.33, 29


def test_resize_rules_by_hand():
  kw = dict(factor=28, min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
  assert media.smart_resize(480, 640, **kw) == (476, 644)  # 17 and 23 patches of 28: already in range
  # 1080p is over the cap: beta = sqrt(1080*1920 / 602112) = 1.8558; 1080/beta = 582 -> 560, 1920/beta -> 1008
  assert media.smart_resize(1080, 1920, **kw) == (560, 1008)
  # under the floor: beta = sqrt(100352 / (56*84)) = 4.619; 56*beta = 258.7 -> 280, 84*beta = 388 -> 392
  assert media.smart_resize(56, 84, **kw) == (280, 392)
  # many frames share the total budget: cap = max(min(602112, 24576*784/768*2), 1.05*100352) = 105369
  assert media.frame_size(1080, 1920, 768, media.VideoSpec()) == media.smart_resize(1080, 1920, factor=28,
                                                                                    min_pixels=100352,
                                                                                    max_pixels=105369)


def test_read_video_samples_uniformly_and_resizes(tmp_path):
  colors = [10 + 30 * i for i in range(8)]
  write_clip(tmp_path / "c.mp4", n_frames=8, fps=2, colors=colors)  # 4 s of video -> 8 frames at 2 fps
  spec = media.VideoSpec(min_pixels=2 * 28 * 28, max_pixels=56 * 56, max_frames=4)  # the cap takes 4 of 8
  v = media.read_video(str(tmp_path / "c.mp4"), spec)
  assert v.frames.shape == (4, 56, 56, 3) and v.frames.dtype == np.uint8
  assert (v.total_frames, v.source_fps, v.sample_fps) == (8, 2.0, 1.0)
  want = [colors[i] for i in media.sample_indices(8, 4)]  # frames 0, 2, 5, 7
  np.testing.assert_allclose(v.frames[:, 20:36, 20:36, 0].mean(axis=(1, 2)), want, atol=6)


def test_read_audio_resamples_to_16k(tmp_path):
  write_clip(tmp_path / "c.mp4", audio_s=1.0, sr=22050)
  x = media.read_audio(str(tmp_path / "c.mp4"))
  assert x.dtype == np.float32 and abs(len(x) - 16000) < 1200  # AAC priming/padding adds a few frames
  spectrum = np.abs(np.fft.rfft(x[2000:14000]))
  assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 3


def test_patch_layout_matches_the_image_processor_and_keeps_frame_order():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  rng = np.random.RandomState(0)
  img = (rng.rand(56, 84, 3) * 255).astype(np.uint8)
  ref = Qwen2VLImageProcessorPil(do_resize=False)(images=[img], return_tensors="np")
  # A still image is a 2-frame video of one frame: same rows, same grid.
  pixels, grid = encoders.patchify_video(np.stack([img, img]))
  assert grid == tuple(ref["image_grid_thw"][0]) == (1, 4, 6)
  np.testing.assert_allclose(pixels, ref["pixel_values"], atol=1e-5)
  # Two different frames: row 0 is the top-left patch, (channel, frame, y, x); rows 1 and 2 are the patches to
  # its right and below it (the 2x2 block the merger joins is consecutive).
  other = (rng.rand(56, 84, 3) * 255).astype(np.uint8)
  pixels, _ = encoders.patchify_video(np.stack([img, other]))
  norm = lambda f: ((f / 255.0 - np.array(encoders.CLIP_MEAN)) / np.array(encoders.CLIP_STD)).transpose(2, 0, 1)
  for row, (y, x) in enumerate([(0, 0), (0, 14), (14, 0)]):
    got = pixels[row].reshape(3, 2, 14, 14)
    for k, frame in enumerate((img, other)):
      np.testing.assert_allclose(got[:, k], norm(frame)[:, y:y + 14, x:x + 14], atol=1e-5)


# ------------------------------------------------------------------------------------------ the job


class MeanColourEncoder:
  """Test double: row features from frame-pair colours and audio energy, 1-D positions; counts its calls."""
  feature_space, feature_dim = "lm_embed", 8

  def __init__(self):
    self.calls = 0

  def encode(self, video, audio_N):
    self.calls += 1
    pairs = video.frames.reshape(-1, 2, *video.frames.shape[1:]).mean(axis=(1, 2, 3))  # [T/2, 3]
    v = np.tile(pairs / 255.0, (1, 3))[:, :8].astype(np.float32)
    windows = audio_N[:len(audio_N) // 640 * 640].reshape(-1, 640)  # 25 rows per second, like Omni
    a = np.repeat(np.sqrt((windows ** 2).mean(axis=1, keepdims=True)), 8, axis=1).astype(np.float32)
    return encoders.Encoded(video=v, audio=a, video_grid_thw=(len(v), 2, 2), second_per_grid=1.0,
                            audio_feature_len=len(a) * 4)

  def placeholder_runs(self, enc, layout):
    nv, na = len(enc.video), len(enc.audio)
    if layout == "separate":
      return [("V", nv), ("A", na)]
    # Omni-like 2 s chunks, each chunk's video rows then its audio rows: one video row per second
    # (second_per_grid=1) and 25 audio rows per second.
    runs = []
    for j in range(max(-(-nv // 2), -(-na // 50))):
      runs += [("V", len(range(nv)[2 * j:2 * j + 2])), ("A", len(range(na)[50 * j:50 * j + 50]))]
    return [r for r in runs if r[1]]

  def position_ids(self, prompt_ids, enc, layout):
    p = np.arange(len(prompt_ids), dtype=np.int32)
    return np.stack([p, p + 1, p + 2])  # distinct rows, so a mix-up in the consumer would show


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.build_synth_tokenizer(["Hello there. Oh no! happy sad surprised"], vocab_size=400)


def _inputs(tmp_path, clips, labels=None, subtitles=None):
  (tmp_path / "video").mkdir(exist_ok=True)
  for name, kw in clips.items():
    if kw == "corrupt":
      (tmp_path / "video" / f"{name}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    elif kw == "empty":
      c = av.open(str(tmp_path / "video" / f"{name}.mp4"), "w")
      vs = c.add_stream("mpeg4", rate=5)
      vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
      c.start_encoding()
      c.close()
    else:
      write_clip(tmp_path / "video" / f"{name}.mp4", **kw)
  labels = labels if labels is not None else list(clips)
  (tmp_path / "label.csv").write_text("name,openset\n" + "".join(f"{n},happy\n" for n in labels))
  subtitles = subtitles if subtitles is not None else labels
  (tmp_path / "subtitle.csv").write_text("name,english\n" + "".join(f"{n},Hello there {n}\n" for n in subtitles))


BAD = {"a_good": {}, "b_corrupt": "corrupt", "c_noaudio": {"audio": False}, "d_empty": "empty", "e_nosub": {},
       "g_good": {}}


def test_bad_media_are_counted_per_clip_and_the_job_goes_on(tmp_path, tok):
  _inputs(tmp_path, BAD, labels=list(BAD) + ["f_ghost"], subtitles=[n for n in BAD if n != "e_nosub"] + ["f_ghost"])
  cfg = _cfg(tmp_path, on_error="skip")
  enc = MeanColourEncoder()
  summary = preprocess.run(cfg, encoder=enc, tokenizer=tok)
  assert (summary["clips"], summary["written"], summary["failed"]) == (7, 2, 5)
  assert summary["failed_by_field"] == {"video": 3, "audio": 1, "subtitle": 1}
  with open(preprocess.failures_path(cfg)) as f:
    failures = {d["id"]: d for d in map(json.loads, f)}
  want = {"b_corrupt": ("video", "cannot open"), "c_noaudio": ("audio", "no audio stream"),
          "d_empty": ("video", "zero-length"), "e_nosub": ("subtitle", "no subtitle"),
          "f_ghost": ("video", "no video file")}
  assert set(failures) == set(want)
  for name, (field, reason) in want.items():
    assert failures[name]["field"] == field and reason in failures[name]["reason"], failures[name]
  assert failures["b_corrupt"]["path"].endswith("b_corrupt.mp4")
  out = tmp_path / "out" / "train"
  assert sorted(p.name for p in out.glob("*.rec")) == ["a_good.rec", "g_good.rec"]
  with open(preprocess.summary_path(cfg)) as f:
    assert json.load(f)["failed"] == 5


def test_on_error_raise_stops_at_the_first_bad_clip(tmp_path, tok):
  _inputs(tmp_path, BAD, subtitles=list(BAD))
  cfg = _cfg(tmp_path, on_error="raise")
  with pytest.raises(featurize.ClipError, match=r"b_corrupt.*field video.*cannot open"):
    preprocess.run(cfg, encoder=MeanColourEncoder(), tokenizer=tok)
  out = tmp_path / "out" / "train"
  assert [p.name for p in out.glob("*.rec")] == ["a_good.rec"]  # g_good, after the bad clip, never ran
  assert not os.path.exists(preprocess.summary_path(cfg))  # an unfinished shard is not marked finished
  with open(preprocess.failures_path(cfg)) as f:
    assert [json.loads(line)["id"] for line in f] == ["b_corrupt"]


def test_shards_are_disjoint_and_the_job_resumes(tmp_path, tok):
  names = [f"clip{i}" for i in range(5)]
  _inputs(tmp_path, {n: {"n_frames": 4} for n in names})
  written = []
  for i in range(2):
    s = preprocess.run(_cfg(tmp_path, num_shards=2, shard_index=i), encoder=MeanColourEncoder(), tokenizer=tok)
    written.append(s["written"])
  assert written == [3, 2]  # clip0, clip2, clip4 | clip1, clip3
  out = tmp_path / "out" / "train"
  assert sorted(p.stem for p in out.glob("*.rec")) == names
  cfg = _cfg(tmp_path, num_shards=2, shard_index=0)
  assert preprocess.all_shards_finished(cfg)
  enc = MeanColourEncoder()
  again = preprocess.run(cfg, encoder=enc, tokenizer=tok)
  assert again["resumed_finished_shard"] and enc.calls == 0
  os.remove(preprocess.summary_path(cfg))  # an interrupted shard: summary missing, one record missing
  os.remove(out / "clip2.rec")
  before = (out / "clip0.rec").read_bytes()
  s = preprocess.run(cfg, encoder=enc, tokenizer=tok)
  assert (enc.calls, s["written"], s["existing"]) == (1, 1, 2)
  assert (out / "clip2.rec").exists() and (out / "clip0.rec").read_bytes() == before


def test_unparsable_label_rows_are_counted_once_over_the_shards(tmp_path, tok):
  names = [f"clip{i}" for i in range(4)]
  _inputs(tmp_path, {n: {"n_frames": 4} for n in names})
  # Two bad rows: an empty open set ("[]" parses to no label) and a row with no clip name.
  with open(tmp_path / "label.csv", "a") as f:
    f.write("h_badlabel,[]\n,happy\n")
  summaries = [preprocess.run(_cfg(tmp_path, num_shards=3, shard_index=i), encoder=MeanColourEncoder(),
                              tokenizer=tok) for i in range(3)]
  assert [s["clips"] for s in summaries] == [2, 1, 1] and sum(s["written"] for s in summaries) == 4
  # Every shard read the whole label file; only shard 0 reports its bad rows, so the sums count each once.
  assert [s["bad_label_rows"] for s in summaries] == [2, 0, 0]
  assert sum(s["failed"] for s in summaries) == 2
  assert summaries[0]["failed_by_field"] == {"openset": 1, "name": 1}
  with open(preprocess.failures_path(_cfg(tmp_path, num_shards=3, shard_index=0))) as f:
    rows = [json.loads(line) for line in f]
  assert [(r["id"], r["field"]) for r in rows] == [("h_badlabel", "openset"), ("5", "name")]  # row 5 of the file
  assert "empty label list" in rows[0]["reason"] and rows[0]["path"].endswith("label.csv")
  for i in (1, 2):
    with open(preprocess.failures_path(_cfg(tmp_path, num_shards=3, shard_index=i))) as f:
      assert f.read() == ""
  with pytest.raises(schema.BadRecordError, match="h_badlabel.*openset"):  # raise: any shard stops on them
    preprocess.run(_cfg(tmp_path, num_shards=3, shard_index=2, on_error="raise", resume=False),
                   encoder=MeanColourEncoder(), tokenizer=tok)


class FlakyEncoder(MeanColourEncoder):
  """Raises like a torch tower would (a RuntimeError, not a ClipError) on the clips it is told to."""

  def __init__(self, fail_on_frames=()):
    super().__init__()
    self.fail_on_frames = set(fail_on_frames)

  def encode(self, video, audio_N):
    if video.total_frames in self.fail_on_frames:
      raise RuntimeError(f"shape mismatch in the towers ({video.total_frames} frames)")
    return super().encode(video, audio_N)


def test_encoder_and_decoder_exceptions_are_per_clip_under_skip(tmp_path, tok, monkeypatch):
  _inputs(tmp_path, {"a": {"n_frames": 4}, "b": {"n_frames": 6}, "c": {"n_frames": 4}, "d": {"n_frames": 4}})
  real = media.read_audio

  def read_audio(path, **kw):
    if os.path.basename(path).startswith("c."):
      raise MemoryError("no memory to resample")  # not a MediaError: an unexpected decoder failure
    return real(path, **kw)

  monkeypatch.setattr(featurize.media, "read_audio", read_audio)
  cfg = _cfg(tmp_path, on_error="skip")
  summary = preprocess.run(cfg, encoder=FlakyEncoder(fail_on_frames={6}), tokenizer=tok)
  assert (summary["written"], summary["failed"]) == (2, 2)
  assert summary["failed_by_field"] == {"encoder": 1, "decode": 1}
  with open(preprocess.failures_path(cfg)) as f:
    rows = {d["id"]: d for d in map(json.loads, f)}
  assert rows["b"]["exception"] == "RuntimeError" and "shape mismatch" in rows["b"]["reason"]
  assert rows["b"]["path"].endswith("b.mp4")
  assert rows["c"]["exception"] == "MemoryError" and rows["c"]["field"] == "decode"
  assert sorted(p.stem for p in (tmp_path / "out" / "train").glob("*.rec")) == ["a", "d"]

  # raise: the original exception, traceback and all, after the failures file names it; no summary.
  cfg = _cfg(tmp_path, on_error="raise", resume=False, output_dir=str(tmp_path / "out2"))
  with pytest.raises(RuntimeError, match="shape mismatch"):
    preprocess.run(cfg, encoder=FlakyEncoder(fail_on_frames={6}), tokenizer=tok)
  with open(preprocess.failures_path(cfg)) as f:
    assert [(d["id"], d["exception"]) for d in map(json.loads, f)] == [("b", "RuntimeError")]
  assert not os.path.exists(preprocess.summary_path(cfg))


def test_retry_failed_reruns_only_the_failed_clips_of_a_finished_shard(tmp_path, tok):
  _inputs(tmp_path, {"a": {"n_frames": 4}, "b": {"n_frames": 6}, "c": {"n_frames": 4}},
          subtitles=["a", "c"])  # b has no subtitle yet
  cfg = _cfg(tmp_path, tfds_data_dir=str(tmp_path / "tfds"))
  first = preprocess.run(cfg, encoder=MeanColourEncoder(), tokenizer=tok)
  assert (first["written"], first["failed"]) == (2, 1)
  builder = preprocess.build_tfds(cfg)
  assert len(tfds_builders.TfdsSource(builder, "train")) == 2
  (tmp_path / "subtitle.csv").write_text("name,english\n" + "".join(f"{n},Hello there {n}\n" for n in "abc"))
  enc = MeanColourEncoder()
  assert preprocess.run(cfg, encoder=enc, tokenizer=tok)["resumed_finished_shard"] and enc.calls == 0
  cfg.retry_failed = True
  again = preprocess.run(cfg, encoder=enc, tokenizer=tok)
  assert (enc.calls, again["written"], again["existing"], again["failed"]) == (1, 1, 2, 0)
  with open(preprocess.failures_path(cfg)) as f:
    assert f.read() == ""  # the shard's failures file now lists what is still failing: nothing
  # The TFDS dataset built before the retry is stale: the next build sees the records changed and rebuilds.
  builder = preprocess.build_tfds(cfg)
  source = tfds_builders.TfdsSource(builder, "train")
  assert sorted(schema.from_bytes(source.read(i)).id for i in range(len(source))) == ["a", "b", "c"]
  # The copy itself records the records it was built from (no state file beside them): each one's SHA-256.
  out = tmp_path / "out" / "train"
  want = {f"train/{n}.rec": hashlib.sha256((out / f"{n}.rec").read_bytes()).hexdigest() for n in "abc"}
  files = builder.info.metadata["fingerprint"]["files"]
  assert {rel: e["sha256"] for rel, e in files.items()} == want
  assert sorted(os.listdir(tmp_path / "out")) == ["train"]  # no _tfds_build.json, and the lock was released


def _copy_files(builder):
  """{path under the prepared copy: bytes}: what a failed rebuild must leave as it was."""
  root = str(builder.data_path)
  return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
          for d, _, names in os.walk(root) for n in names}


def test_a_failed_tfds_rebuild_keeps_the_old_copy(tmp_path, tok):
  _inputs(tmp_path, {"a": {"n_frames": 4}, "c": {"n_frames": 4}})
  cfg = _cfg(tmp_path, tfds_data_dir=str(tmp_path / "tfds"))
  preprocess.run(cfg, encoder=MeanColourEncoder(), tokenizer=tok)
  builder = preprocess.build_tfds(cfg)
  before = _copy_files(builder)
  out = tmp_path / "out" / "train"
  good = (out / "c.rec").read_bytes()
  (out / "c.rec").write_bytes(good[:-7])  # a record rewritten badly: the rebuild fails on it
  with pytest.raises(schema.BadRecordError, match="c.rec"):
    preprocess.build_tfds(cfg)
  assert not os.path.exists(preprocess.tfds_lock_path(cfg))  # released after the failure too
  assert not [p for p in (tmp_path / "tfds").iterdir() if p.name.startswith(".")]  # no staging folder left
  builder = tfds_builders.MerFeatures(records_dir=cfg.output_dir, data_dir=cfg.tfds_data_dir)
  assert _copy_files(builder) == before  # the old copy, byte for byte, and it still reads
  source = tfds_builders.TfdsSource(builder, "train")
  recs = {r.id: r for r in (schema.from_bytes(source.read(i)) for i in range(len(source)))}
  assert sorted(recs) == ["a", "c"] and schema.records_equal(recs["c"], schema.from_bytes(good))
  (out / "c.rec").write_bytes(good)  # fixed: the same bytes as the copy was built from, so it is reused as it is
  assert _copy_files(preprocess.build_tfds(cfg)) == before


def test_tfds_build_is_refused_while_another_process_holds_the_lock(tmp_path, tok):
  _inputs(tmp_path, {"a": {"n_frames": 4}})
  cfg = _cfg(tmp_path, tfds_data_dir=str(tmp_path / "tfds"))
  preprocess.run(cfg, encoder=MeanColourEncoder(), tokenizer=tok)
  with open(preprocess.tfds_lock_path(cfg), "w") as f:
    f.write("pid 123 on otherhost since 2026-01-01 00:00:00\n")
  with pytest.raises(preprocess.TfdsBuildBusy, match=r"_tfds_build.lock exists \(pid 123 on otherhost"):
    preprocess.build_tfds(cfg)
  assert not os.path.exists(tmp_path / "tfds" / "mer_features")  # nothing was built beside the holder
  os.remove(preprocess.tfds_lock_path(cfg))
  builder = preprocess.build_tfds(cfg)
  assert len(tfds_builders.TfdsSource(builder, "train")) == 1
  assert not os.path.exists(preprocess.tfds_lock_path(cfg))  # released after the build


@pytest.mark.parametrize("layout", encoders.LAYOUTS)
def test_records_feed_tfds_and_the_pipeline_with_their_position_ids(tmp_path, tok, layout):
  # x1: 6 s of video (6 frame pairs at 2 fps) and 5 s of audio (125 rows), three 2 s chunks when interleaved.
  _inputs(tmp_path, {"x1": {"n_frames": 24, "fps": 4, "audio_s": 5.0}, "x2": {"n_frames": 4, "audio_s": 1.6}})
  cfg = _cfg(tmp_path, tfds_data_dir=str(tmp_path / "tfds"), layout=layout)
  preprocess.run(cfg, encoder=MeanColourEncoder(), tokenizer=tok)
  builder = preprocess.build_tfds(cfg)
  source = tfds_builders.TfdsSource(builder, "train")
  recs = [schema.from_bytes(source.read(i)) for i in range(len(source))]  # the pipeline reads in this order
  assert sorted(r.id for r in recs) == ["x1", "x2"]
  out = tmp_path / "out" / "train"
  for rec in recs:
    assert schema.records_equal(rec, schema.from_bytes((out / f"{rec.id}.rec").read_bytes()))
  pcfg = pipeline.PipelineConfig(kind="eval", batch_size=2, shuffle=False, num_epochs=1, drop_remainder=False,
                                 video_dim=8, audio_dim=8, feature_dtype="float32")
  batch = next(iter(pipeline.build(source, tok, pcfg)))
  for row, rec in enumerate(recs):
    assert batch["ids"][row] == rec.id
    info = json.loads((out / f"{rec.id}.layout.json").read_text())
    assert info["layout"] == layout
    if layout == "interleaved":  # the record carries its runs; the long clip really alternates V A V A V A
      assert rec.media_layout == info["runs"]
      if rec.id == "x1":
        assert rec.media_layout == "V2A50V2A50V2A" + str(rec.n_audio - 100) and rec.n_video == 6
    else:
      assert rec.media_layout is None and info["runs"] == f"V{rec.n_video}A{rec.n_audio}"
    mask = batch["prompt_mask"][row]
    # The pipeline re-renders the prompt: same tokens as recorded, and the recorded position ids on them.
    np.testing.assert_array_equal(batch["prompt_tokens"][row][mask], info["prompt_ids"])
    np.testing.assert_array_equal(batch["mrope_positions"][row][mask].T, rec.position_ids)
    assert rec.n_video == len(np.asarray(batch["video_mask"][row]).nonzero()[0])
    assert rec.subtitle == f"Hello there {rec.id}" and rec.openset == ("happy",)


def test_prompt_layouts():
  runs = [("V", 2), ("A", 3)]
  assert featurize.render_prompt("hi", runs, "separate") == prompts.render_prompt("hi", 2, 3, "slow")
  inter = featurize.render_prompt("hi", [("V", 2), ("A", 1), ("V", 1), ("A", 2)], "interleaved", "fast")
  v, a = prompts.VIDEO_TOKEN, prompts.AUDIO_TOKEN
  block = prompts.VISION_BOS + prompts.AUDIO_BOS + v + v + a + v + a + a + prompts.AUDIO_EOS + prompts.VISION_EOS
  assert inter == prompts.render_prompt("hi", 1, 1, "fast").replace(
      prompts.VISION_BOS + v + prompts.VISION_EOS + prompts.AUDIO_BOS + a + prompts.AUDIO_EOS, block)
  with pytest.raises(ValueError, match="one video run then one audio run"):
    featurize.render_prompt("hi", [("V", 2), ("A", 1), ("V", 1)], "separate")
  # What a record stores, and the prompt the pipeline renders from it, are the same text.
  assert featurize.media_layout([("V", 2), ("A", 1), ("V", 1), ("A", 2)], "interleaved") == "V2A1V1A2"
  assert featurize.media_layout(runs, "separate") is None
  assert inter == prompts.render_prompt("hi", 3, 3, "fast", media_runs="V2A1V1A2")
  assert inter.count(featurize.media_block([("V", 2), ("A", 1), ("V", 1), ("A", 2)], "interleaved")) == 1
  assert encoders.string_to_runs("V8A50V4A12") == [("V", 8), ("A", 50), ("V", 4), ("A", 12)]
  with pytest.raises(ValueError, match="bad placeholder layout"):
    encoders.string_to_runs("V8X3")


def _cli(tmp_path, *extra):
  cmd = [sys.executable, "-m", "merr1_jax.data.preprocess", "--config", os.path.join(REPO, "configs/preprocess.py"),
         f"--config.label_csv={tmp_path / 'label.csv'}", f"--config.subtitle_csv={tmp_path / 'subtitle.csv'}",
         f"--config.video_dir={tmp_path / 'video'}", f"--config.output_dir={tmp_path / 'out'}",
         f"--config.checkpoint_dir={tmp_path / 'nockpt'}", *extra]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_cli_flags_summary_and_exit_codes(tmp_path):
  _inputs(tmp_path, {}, labels=["ghost1", "ghost2"])  # clips that do not exist: no checkpoint is ever loaded
  r = _cli(tmp_path, "--on_error=skip", "--num_shards=1", "--shard_index=0")
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert (summary["clips"], summary["failed"], summary["failed_by_field"]) == (2, 2, {"video": 2})
  r = _cli(tmp_path, "--on_error=raise", "--config.resume=False")
  assert r.returncode == 2 and "ghost1" in r.stderr and "no video file" in r.stderr
  r = _cli(tmp_path, "--config.label_csv=", "--shard_index=3")
  assert r.returncode == 2 and "label_csv is required" in r.stderr and "shard_index=3" in r.stderr
  # --finalize builds TFDS only, and only once every shard has finished (no shard of a 2-shard job ran here).
  r = _cli(tmp_path, "--finalize", "--num_shards=2", f"--config.tfds_data_dir={tmp_path / 'tfds'}")
  assert r.returncode == 2 and "2 of 2 shards have not finished" in r.stderr, r.stderr
  assert not (tmp_path / "tfds").exists()


def test_a_torn_shard_summary_and_a_corrupt_encoder_config_are_named(tmp_path, tok):
  """A finished shard's summary cut short (a crash mid-write on a filesystem without atomic rename) and a corrupt
  Omni config.json fail with the file's name, not json's bare 'Expecting value'."""
  _inputs(tmp_path, {"clip0": {"n_frames": 4}})
  cfg = _cfg(tmp_path)
  preprocess.run(cfg, encoder=MeanColourEncoder(), tokenizer=tok)
  with open(preprocess.summary_path(cfg), "w") as f:
    f.write('{"written": 1, "fail')
  with pytest.raises(ValueError, match=re.escape(preprocess.summary_path(cfg)) + ": not a valid shard summary"):
    preprocess.run(cfg, encoder=MeanColourEncoder(), tokenizer=tok)
  ckpt = tmp_path / "omni"
  ckpt.mkdir()
  (ckpt / "config.json").write_text("{not json")
  from merr1_jax.data import encoders  # noqa: PLC0415
  with pytest.raises(ValueError, match=re.escape(str(ckpt / "config.json")) + ": not valid JSON"):
    encoders._thinker_config_dict(str(ckpt))
