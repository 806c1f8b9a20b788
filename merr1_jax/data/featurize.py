"""One clip -> one feature record: the per-clip work of offline preprocessing (preprocess.py runs it over a
shard of clips, resumably).

`process_clip` is `decode_clip` (check the clip's name and subtitle, decode its media: media.py) then `encode_clip`
(tower features in the LM space: encoders.py; the slow-mode prompt rendered by `prompts.render_prompt` in the
clip's layout and tokenised; one placeholder id per feature row checked; the encoder's 3-D position ids). The
result is one `schema.ClipRecord` and the layout dict that preprocess.py writes beside it as `{name}.layout.json`.
Every problem of one clip is a `ClipError` naming the clip, the field and the file; whether to skip or stop is the
job's on_error policy, in preprocess.py. Details: docs/preprocessing.md, "Per clip" and "Layouts".

Shape legend: Nv/Na video/audio feature rows, D the LM width, L prompt tokens.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import ml_dtypes
import numpy as np

from merr1_jax.data import encoders, media, schema
from merr1_jax.task import prompts

FEATURE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                  "float32": np.dtype(np.float32)}  # config.feature_dtype -> the dtype of the stored rows


class ClipError(ValueError):
  """One clip cannot be preprocessed: names the clip, the field and the file (and the type of an unexpected
  exception behind it, e.g. a RuntimeError from the towers)."""

  def __init__(self, reason: str, *, clip: str, field: str, path: str = "", exception: str = ""):
    self.reason, self.clip, self.field, self.path, self.exception = reason, clip, field, path, exception
    super().__init__(f"clip {clip!r} (field {field}{', file ' + path if path else ''}): "
                     f"{exception + ': ' if exception else ''}{reason}")

  def as_dict(self) -> dict:
    d = {"id": self.clip, "field": self.field, "path": self.path, "reason": self.reason}
    if self.exception:
      d["exception"] = self.exception
    return d


@dataclasses.dataclass(frozen=True)
class Clip:
  """One labelled clip, as the label and subtitle files give it (preprocess.read_clips)."""
  id: str
  openset: tuple[str, ...]
  subtitle: str | None  # None: not in the subtitle CSV


# ------------------------------------------------------------------------------------------------ prompts


def media_layout(runs: Sequence[tuple[str, int]], layout: str) -> str | None:
  """ClipRecord.media_layout for these runs: the runs string when interleaved, None for the separate block."""
  if layout == "interleaved":
    return encoders.runs_to_string(list(runs))
  if layout == "separate":
    return None
  raise ValueError(f"layout={layout!r}; expected one of {encoders.LAYOUTS}")


def media_block(runs: Sequence[tuple[str, int]], layout: str) -> str:
  """The prompt's media markers for placeholder runs [('V', n), ('A', m), ...] in the given layout."""
  if layout == "interleaved":  # Omni (use_audio_in_video): both start markers, the chunks, both end markers
    return prompts.interleaved_media_block(media_layout(runs, layout))
  if layout == "separate":
    kinds = [k for k, n in runs if n]
    if kinds != ["V", "A"]:
      raise ValueError(f"separate layout needs one video run then one audio run, got {runs}")
    n_v, n_a = (n for _, n in runs if n)
    return (prompts.VISION_BOS + prompts.VIDEO_TOKEN * n_v + prompts.VISION_EOS + prompts.AUDIO_BOS +
            prompts.AUDIO_TOKEN * n_a + prompts.AUDIO_EOS)
  raise ValueError(f"layout={layout!r}; expected one of {encoders.LAYOUTS}")


def render_prompt(subtitle: str, runs: Sequence[tuple[str, int]], layout: str, mode: str = "slow", *,
                  question: str = prompts.DEFAULT_QUESTION) -> str:
  """prompts.render_prompt's chat turn with the media block laid out as `runs` / `layout` say.

  This is the text the pipeline renders for the record (`media_runs=media_layout(runs, layout)`), by design.
  """
  block = media_block(runs, layout)  # validates the runs for the layout
  n_v = sum(n for k, n in runs if k == "V")
  n_a = sum(n for k, n in runs if k == "A")
  text = prompts.render_prompt(subtitle, n_v, n_a, mode, question=question, media_runs=media_layout(runs, layout))
  if text.count(block) != 1:  # e.g. render_prompt's separate block and media_block drifting apart
    raise AssertionError(f"the {layout} media block is not in prompts.render_prompt's text once")
  return text


def prompt_ids(tokenizer, subtitle: str, runs, layout: str, mode: str = "slow", *,
               question: str = prompts.DEFAULT_QUESTION) -> np.ndarray:
  """The tokenised prompt [L] int32 (what the JAX policy reads, and what the position ids describe)."""
  return np.asarray(tokenizer.encode(render_prompt(subtitle, runs, layout, mode, question=question)), np.int32)


# ------------------------------------------------------------------------------------------------ one clip


def _video_path(cfg, clip: Clip) -> str:
  for ext in cfg.video_exts:
    p = os.path.join(cfg.video_dir, f"{clip.id}.{ext}")
    if os.path.isfile(p):
      return p
  raise ClipError(f"no video file {clip.id}.{{{','.join(cfg.video_exts)}}} in {cfg.video_dir}", clip=clip.id,
                  field="video", path=os.path.join(cfg.video_dir, clip.id))


def _video_spec(cfg) -> media.VideoSpec:
  v = cfg.video
  return media.VideoSpec(fps=v.fps, min_frames=v.min_frames, max_frames=v.max_frames, min_pixels=v.min_pixels,
                         max_pixels=v.max_pixels, total_pixels=v.total_pixels)


@dataclasses.dataclass(frozen=True)
class Decoded:
  subtitle: str
  video: media.Video
  audio: np.ndarray  # [N] float32 at 16 kHz
  video_path: str


def decode_clip(cfg, clip: Clip) -> Decoded:
  """Checks the clip's name and subtitle and decodes its media. Raises ClipError."""
  if not clip.id or clip.id.startswith(".") or "/" in clip.id or os.sep in clip.id:
    raise ClipError("clip name cannot be a file name", clip=clip.id, field="name", path=cfg.label_csv)
  if clip.subtitle is None and cfg.require_subtitle:
    raise ClipError("no subtitle for this clip", clip=clip.id, field="subtitle", path=cfg.subtitle_csv)
  video_path = _video_path(cfg, clip)
  audio_path = os.path.join(cfg.audio_dir, f"{clip.id}.wav") if cfg.audio_dir else video_path
  try:
    video = media.read_video(video_path, _video_spec(cfg))
    audio = media.read_audio(audio_path)
  except media.MediaError as e:
    raise ClipError(e.reason, clip=clip.id, field=e.stream, path=e.path) from e
  return Decoded(subtitle=clip.subtitle or "", video=video, audio=audio, video_path=video_path)


def process_clip(cfg, clip: Clip, encoder: encoders.Encoder, tokenizer) -> tuple[schema.ClipRecord, dict]:
  """One clip -> (record, layout dict). Raises ClipError."""
  return encode_clip(cfg, clip, decode_clip(cfg, clip), encoder, tokenizer)


def encode_clip(cfg, clip: Clip, decoded: Decoded, encoder: encoders.Encoder,
                tokenizer) -> tuple[schema.ClipRecord, dict]:
  """Features, layout, prompt ids and position ids of a decoded clip -> (record, layout dict)."""
  subtitle, video_path = decoded.subtitle, decoded.video_path
  enc = encoder.encode(decoded.video, decoded.audio)
  runs = encoder.placeholder_runs(enc, cfg.layout)
  question = cfg.question or prompts.DEFAULT_QUESTION
  try:
    ids = prompt_ids(tokenizer, subtitle, runs, cfg.layout, question=question)
  except ValueError as e:  # e.g. a template marker inside the subtitle
    raise ClipError(str(e), clip=clip.id, field="subtitle", path=cfg.subtitle_csv) from e
  # One id per feature row is the merge contract: check it on the ids actually written.
  for name, marker, rows in (("video", prompts.VIDEO_TOKEN, enc.video), ("audio", prompts.AUDIO_TOKEN, enc.audio)):
    if int((ids == tokenizer.id_of(marker)).sum()) != len(rows):
      raise ClipError(f"{int((ids == tokenizer.id_of(marker)).sum())} {marker} ids in the prompt for {len(rows)} "
                      "feature rows", clip=clip.id, field=name, path=video_path)
  pos = encoder.position_ids(ids, enc, cfg.layout)
  dtype = FEATURE_DTYPES[cfg.feature_dtype]
  rec = schema.ClipRecord(id=clip.id, dataset=cfg.dataset, video=enc.video.astype(dtype),
                          audio=enc.audio.astype(dtype), subtitle=subtitle, openset=clip.openset,
                          feature_space=encoder.feature_space, position_ids=pos,
                          media_layout=media_layout(runs, cfg.layout))
  try:
    schema.check(rec, video_dim=encoder.feature_dim, audio_dim=encoder.feature_dim, source=video_path)
  except schema.BadRecordError as e:
    raise ClipError(e.reason, clip=clip.id, field=e.field, path=video_path) from e
  layout = {"id": clip.id, "layout": cfg.layout, "runs": encoders.runs_to_string(runs),
            "video_grid_thw": list(enc.video_grid_thw), "second_per_grid": enc.second_per_grid,
            "audio_feature_len": enc.audio_feature_len, "prompt_ids": ids.tolist()}
  return rec, layout
