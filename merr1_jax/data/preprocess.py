"""Offline preprocessing: labelled clips -> feature records (`{output_dir}/{split}/{name}.rec`) -> TFDS.

    python -m merr1_jax.data.preprocess --config configs/preprocess.py --config.checkpoint_dir=... \
        --config.label_csv=... --config.video_dir=... --config.output_dir=... --num_shards=4 --shard_index=0

Per clip: decode (media.py: sampled, resized frames; 16 kHz audio from a wav or the video's track) -> encode
(encoders.py: tower features in the LM space, the placeholder layout) -> render the slow-mode prompt with that
layout and tokenise it -> the encoder's 3-D position ids for exactly those tokens -> one `schema.ClipRecord`
(feature_space 'lm_embed', position_ids [3, L], and for 'interleaved' the placeholder runs in media_layout)
written atomically, plus `{name}.layout.json` holding the placeholder runs (e.g. "V8A50V8A50") and the prompt
ids.

Prompt: `prompts.render_prompt`'s chat turn, the one implementation of both layouts. 'interleaved' (Omni's
use_audio_in_video layout, the default) passes the runs as `media_runs` and stores them in
`ClipRecord.media_layout`; 'separate' is render_prompt's default block and leaves media_layout None. Either
way the training pipeline re-renders exactly these tokens from the record, so the recorded position ids line up.

Scaling and resume: clips (sorted by name) are dealt round-robin to `num_shards` processes. A clip whose
record exists is skipped; a shard whose summary file exists is skipped whole (resume=True), unless
retry_failed=True, which reruns it so that only its clips without a record (the failed ones) are tried again.
Bad input: any per-clip problem (unreadable/corrupt media, no audio track, zero-length clip, missing
subtitle, missing video file, an exception from the decoder or the encoder) becomes a `ClipError` naming the
clip, the field and the file (and, for an unexpected exception, its type). on_error='skip' counts it, appends
it to `_failures.shard-*.jsonl` and goes on; 'raise' stops the job with it (an unexpected exception is
re-raised as it is, after the failures file is written). Label rows that fail to parse are not clips of any
shard: shard 0 alone reports them (field `openset` or `name`), so summing the shards' counts counts each once;
under 'raise' every shard stops on them. Each shard writes `_summary.shard-*.json` with the counts.
TFDS: `build_tfds` runs under an O_EXCL lock file, so two shards finishing at once cannot build it together,
and rebuilds only when the records changed since the last build; the CLI's --finalize runs it on its own.

Shape legend: Nv/Na video/audio feature rows, D the LM width, L prompt tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import time
from typing import Sequence

import ml_dtypes
import numpy as np

from merr1_jax import prompts
from merr1_jax.data import encoders, labels, media, schema

_log = logging.getLogger(__name__)
ON_ERROR = ("skip", "raise")
_FEATURE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                   "float32": np.dtype(np.float32)}


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


# ------------------------------------------------------------------------------------------------- inputs


class _LabelLog(schema.BadRecordLog):
  """Counts bad label rows like BadRecordLog and keeps each one as a ClipError for the failures file."""

  def __init__(self):
    super().__init__()
    self.errors: list[ClipError] = []

  def add(self, err: schema.BadRecordError) -> None:
    super().add(err)
    self.errors.append(ClipError(err.reason, clip=str(err.record), field=err.field, path=err.source))


def read_clips(cfg, failures: list[ClipError]) -> list[Clip]:
  """Label rows joined with subtitles, sorted by name. Bad label rows go to `failures` (or raise): every shard
  reads the whole file, so the caller reports them in one shard only (`owns_label_errors`)."""
  log = _LabelLog()
  anns = labels.read_openset_csv(cfg.label_csv, on_bad_record=cfg.on_error, log=log)
  failures += log.errors
  subs = (labels.read_subtitles_csv(cfg.subtitle_csv, column=cfg.subtitle_column) if cfg.subtitle_csv else {})
  return sorted((Clip(id=a.id, openset=a.openset, subtitle=subs.get(a.id)) for a in anns), key=lambda c: c.id)


def owns_label_errors(cfg) -> bool:
  """Bad label rows belong to no clip's shard: shard 0 reports them, the others only count its clips."""
  return cfg.shard_index == 0


def shard(clips: Sequence[Clip], num_shards: int, shard_index: int) -> list[Clip]:
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} is not in [0, num_shards={num_shards})")
  return list(clips[shard_index::num_shards])


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


# ------------------------------------------------------------------------------------------------ one clip


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
  dtype = _FEATURE_DTYPES[cfg.feature_dtype]
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


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- the job


def _shard_tag(cfg) -> str:
  return f"shard-{cfg.shard_index:05d}-of-{cfg.num_shards:05d}"


def summary_path(cfg) -> str:
  return os.path.join(cfg.output_dir, cfg.split, f"_summary.{_shard_tag(cfg)}.json")


def failures_path(cfg) -> str:
  return os.path.join(cfg.output_dir, cfg.split, f"_failures.{_shard_tag(cfg)}.jsonl")


def validate(cfg) -> None:
  problems = []
  if cfg.on_error not in ON_ERROR:
    problems.append(f"on_error={cfg.on_error!r}; expected one of {ON_ERROR}")
  if cfg.layout not in encoders.LAYOUTS:
    problems.append(f"layout={cfg.layout!r}; expected one of {encoders.LAYOUTS}")
  if cfg.feature_dtype not in _FEATURE_DTYPES:
    problems.append(f"feature_dtype={cfg.feature_dtype!r}; expected float16 | bfloat16 | float32")
  for name in ("label_csv", "video_dir", "output_dir"):
    if not cfg[name]:
      problems.append(f"{name} is required")
  if cfg.encoder == "omni_towers" and not cfg.checkpoint_dir:
    problems.append("checkpoint_dir is required for encoder 'omni_towers'")
  if not 0 <= cfg.shard_index < cfg.num_shards:
    problems.append(f"shard_index={cfg.shard_index} is not in [0, num_shards={cfg.num_shards})")
  if not cfg.split or "/" in cfg.split or cfg.split.startswith("."):
    problems.append(f"split={cfg.split!r} must be a plain folder name")
  if problems:
    raise ValueError("bad preprocess config:\n  " + "\n  ".join(problems))


def make_encoder(cfg) -> encoders.Encoder:
  if cfg.encoder == "omni_towers":
    return encoders.OmniTowerEncoder(cfg.checkpoint_dir, dtype=cfg.torch_dtype, device=cfg.device)
  raise ValueError(f"encoder={cfg.encoder!r}; the bundled encoder is 'omni_towers'")


def load_tokenizer(cfg, encoder):
  from merr1_jax.data import tokenizer as tokenizer_lib
  tok = tokenizer_lib.load_hf(cfg.tokenizer_dir or cfg.checkpoint_dir)
  marker_ids = getattr(encoder, "marker_ids", dict)()
  wrong = {m: (tok.id_of(m), want) for m, want in marker_ids.items() if tok.id_of(m) != want}
  if wrong:
    raise ValueError(f"tokenizer and checkpoint disagree on marker ids (tokenizer, model): {wrong}")
  return tok


def _guarded(cfg, clip: Clip, field: str, path: str, failures: list[ClipError], fn, *args):
  """fn(*args) for one clip. A ClipError passes through. Any other exception (the decoder's, the towers') is
  this clip's problem, not the job's: under on_error='skip' it becomes a ClipError in `field` that names the
  exception type; under 'raise' it is recorded in the failures file and re-raised unchanged."""
  try:
    return fn(*args)
  except ClipError:
    raise
  except Exception as e:  # noqa: BLE001 - see the docstring
    err = ClipError(str(e) or repr(e), clip=clip.id, field=field, path=path, exception=type(e).__name__)
    if cfg.on_error == "raise":
      failures.append(err)
      _write_failures(cfg, failures)
      raise
    raise err from e


def run(cfg, *, encoder: encoders.Encoder | None = None, tokenizer=None) -> dict:
  """Processes this process's shard; returns the summary dict (also written to summary_path(cfg))."""
  validate(cfg)
  out_dir = os.path.join(cfg.output_dir, cfg.split)
  os.makedirs(out_dir, exist_ok=True)
  if cfg.resume and not cfg.retry_failed and os.path.isfile(summary_path(cfg)):
    with open(summary_path(cfg)) as f:
      done = json.load(f)
    _log.info("shard %s already finished (%s); skipping (retry_failed=True retries its failed clips)",
              _shard_tag(cfg), summary_path(cfg))
    return {**done, "resumed_finished_shard": True}
  t0 = time.time()
  label_failures: list[ClipError] = []
  clips = shard(read_clips(cfg, label_failures), cfg.num_shards, cfg.shard_index)
  if label_failures and cfg.on_error == "raise":
    raise label_failures[0]
  failures = list(label_failures) if owns_label_errors(cfg) else []
  todo = [c for c in clips if not (cfg.resume and os.path.isfile(os.path.join(out_dir, f"{c.id}.rec")))]
  counts = collections.Counter(clips=len(clips), existing=len(clips) - len(todo))
  for clip in todo:
    try:
      decoded = _guarded(cfg, clip, "decode", os.path.join(cfg.video_dir, clip.id), failures, decode_clip, cfg,
                         clip)
      # Loaded on the first clip that decodes (a job whose clips all fail early needs none), outside the
      # per-clip handling: a checkpoint or tokenizer that cannot load stops the job under either policy.
      if encoder is None:
        encoder = make_encoder(cfg)
      if tokenizer is None:
        tokenizer = load_tokenizer(cfg, encoder)
      rec, layout = _guarded(cfg, clip, "encoder", decoded.video_path, failures, encode_clip, cfg, clip, decoded,
                             encoder, tokenizer)
    except ClipError as e:
      _log.warning("%s", e)
      failures.append(e)
      if cfg.on_error == "raise":
        _write_failures(cfg, failures)
        raise
      continue
    # The layout first, the record last: a record on disk always has its layout beside it.
    _write_atomic(os.path.join(out_dir, f"{clip.id}.layout.json"), json.dumps(layout).encode())
    _write_atomic(os.path.join(out_dir, f"{clip.id}.rec"), schema.to_bytes(rec))
    counts["written"] += 1
  _write_failures(cfg, failures)
  summary = {"shard": _shard_tag(cfg), "split": cfg.split, "layout": cfg.layout, "clips": counts["clips"],
             "written": counts["written"], "existing": counts["existing"], "failed": len(failures),
             "failed_by_field": dict(collections.Counter(e.field for e in failures)),
             "bad_label_rows": len(label_failures) if owns_label_errors(cfg) else 0,
             "failures_file": failures_path(cfg), "seconds": round(time.time() - t0, 2)}
  _write_atomic(summary_path(cfg), json.dumps(summary, indent=2).encode())
  _log.info("preprocess %s: %s", _shard_tag(cfg), summary)
  return summary


def _write_failures(cfg, failures: list[ClipError]) -> None:
  data = "".join(json.dumps(e.as_dict()) + "\n" for e in failures)
  _write_atomic(failures_path(cfg), data.encode())


def all_shards_finished(cfg) -> bool:
  return all(os.path.isfile(summary_path(_with_shard(cfg, i))) for i in range(cfg.num_shards))


def _with_shard(cfg, index: int):
  c = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else dataclasses.replace(cfg)
  c.shard_index = index
  return c


def tfds_lock_path(cfg) -> str:
  return os.path.join(cfg.output_dir, "_tfds_build.lock")


def tfds_state_path(cfg) -> str:
  return os.path.join(cfg.output_dir, "_tfds_build.json")


def records_fingerprint(output_dir: str) -> str:
  """A hash of every split's record files (name, size, mtime): changes when a record is added or rewritten."""
  h = hashlib.sha256()
  for split in sorted(d for d in os.listdir(output_dir) if os.path.isdir(os.path.join(output_dir, d))):
    for name in sorted(n for n in os.listdir(os.path.join(output_dir, split)) if n.endswith(".rec")):
      st = os.stat(os.path.join(output_dir, split, name))
      h.update(f"{split}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


class TfdsBuildBusy(RuntimeError):
  """Another process holds the TFDS build lock."""


def build_tfds(cfg):
  """The mer_features TFDS dataset over {output_dir} (every split folder) in cfg.tfds_data_dir.

  Safe to call from every shard: the build runs under `{output_dir}/_tfds_build.lock`, created with O_EXCL
  (TfdsBuildBusy when another process holds it; a lock left by a killed process names its pid and host, and
  is removed by hand). A dataset already built from the same records is reused; one built from other records
  (e.g. before a retry_failed rerun) is removed and rebuilt."""
  import shutil

  from merr1_jax.data import tfds_builders
  lock = tfds_lock_path(cfg)
  try:
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    with open(lock, errors="replace") as f:
      holder = f.read().strip()
    raise TfdsBuildBusy(f"{lock} exists ({holder or 'no holder recorded'}): another process is building the "
                        "TFDS dataset. If none is (it was killed), delete the lock and rerun with --finalize.")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fingerprint = records_fingerprint(cfg.output_dir)
    builder = tfds_builders.MerFeatures(records_dir=cfg.output_dir, data_dir=cfg.tfds_data_dir,
                                        on_bad_record="raise")
    state = {}
    if os.path.isfile(tfds_state_path(cfg)):
      with open(tfds_state_path(cfg)) as f:
        state = json.load(f)
    if builder.is_prepared():
      if state.get("fingerprint") == fingerprint and state.get("data_dir") == builder.data_dir:
        _log.info("TFDS dataset %s is up to date with the records", builder.data_dir)
        return builder
      _log.info("records changed since %s was built: rebuilding it", builder.data_dir)
      shutil.rmtree(builder.data_dir)
      builder = tfds_builders.MerFeatures(records_dir=cfg.output_dir, data_dir=cfg.tfds_data_dir,
                                          on_bad_record="raise")
    tfds_builders.prepare(builder)
    _write_atomic(tfds_state_path(cfg), json.dumps({"data_dir": builder.data_dir,
                                                    "fingerprint": fingerprint}).encode())
    return builder
  finally:
    os.remove(lock)


# ---------------------------------------------------------------------------------------------------- CLI


def _finalize(cfg) -> int:
  """--finalize: the TFDS build step alone; exit code 2 when it cannot run yet (or another process runs it)."""
  problems = [p for p in ("output_dir", "tfds_data_dir") if not cfg[p]]
  if problems:
    print(f"preprocess --finalize: {', '.join(problems)} required", file=sys.stderr)
    return 2
  missing = [summary_path(_with_shard(cfg, i)) for i in range(cfg.num_shards)
             if not os.path.isfile(summary_path(_with_shard(cfg, i)))]
  if missing:
    print(f"preprocess --finalize: {len(missing)} of {cfg.num_shards} shards have not finished "
          f"(no {missing[0]})", file=sys.stderr)
    return 2
  try:
    builder = build_tfds(cfg)
  except TfdsBuildBusy as e:
    print(f"preprocess --finalize: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"tfds_data_dir": builder.data_dir, "splits": sorted(builder.info.splits)}))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  from absl import app, flags
  from ml_collections import config_flags

  if "shard_index" not in flags.FLAGS:  # defined once per process, even if main() runs twice
    config_flags.DEFINE_config_file("config", None, "configs/preprocess.py (with --config.x=y overrides)")
    flags.DEFINE_integer("num_shards", None, "overrides config.num_shards")
    flags.DEFINE_integer("shard_index", None, "overrides config.shard_index")
    flags.DEFINE_enum("on_error", None, list(ON_ERROR), "overrides config.on_error")
    flags.DEFINE_boolean("retry_failed", None, "overrides config.retry_failed: rerun a finished shard's failed clips")
    flags.DEFINE_boolean("finalize", False, "process no clip: build the TFDS dataset (config.tfds_data_dir) from "
                         "the records once every shard has finished")
  FLAGS = flags.FLAGS
  result = {}

  def _main(_):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = FLAGS.config
    if cfg is None:
      raise app.UsageError("--config is required (e.g. --config configs/preprocess.py)")
    for name in ("num_shards", "shard_index", "on_error", "retry_failed"):
      if FLAGS[name].value is not None:
        cfg[name] = FLAGS[name].value
    if FLAGS.finalize:
      result["rc"] = _finalize(cfg)
      return
    try:
      summary = run(cfg)
    except (ClipError, ValueError, FileNotFoundError) as e:
      print(f"preprocess: {e}", file=sys.stderr)
      result["rc"] = 2
      return
    print(json.dumps(summary))
    if cfg.tfds_data_dir:
      if all_shards_finished(cfg):
        try:
          build_tfds(cfg)
        except TfdsBuildBusy as e:  # a shard that finished at the same moment builds it
          print(f"preprocess: TFDS build left to the other process: {e}", file=sys.stderr)
      else:
        print("preprocess: not every shard has finished; TFDS build left to the last one (or --finalize)",
              file=sys.stderr)
    result["rc"] = 0

  try:
    app.run(_main, argv=list(argv) if argv is not None else None)
  except SystemExit as e:  # app.run exits; keep our own return code
    if e.code not in (None, 0):
      return int(e.code) if isinstance(e.code, int) else 1
  return result.get("rc", 1)


if __name__ == "__main__":
  sys.exit(main())
