"""Offline preprocessing, the job: labelled clips -> feature records (`{output_dir}/{split}/{name}.rec`) -> TFDS.

    python -m merr1_jax.data.preprocess --config configs/preprocess.py --config.checkpoint_dir=... \
        --config.label_csv=... --config.video_dir=... --config.output_dir=... --num_shards=4 --shard_index=0

This module reads the label and subtitle files, deals the clips round-robin to shards, runs featurize.py on each
clip of its shard, writes the results atomically (the `{name}.layout.json` first, the record last), counts the
failures (`on_error`: skip or raise), and builds the TFDS dataset once every shard is done. A rerun resumes: written
records and finished shards are skipped. A newcomer reading for what is IN a record starts at featurize.py.
Details: docs/preprocessing.md, "Scaling, resume, errors" and "Building the TFDS dataset".
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from typing import Sequence

from merr1_jax.data import encoders, featurize, labels, schema
from merr1_jax.data.featurize import Clip, ClipError

_log = logging.getLogger(__name__)
ON_ERROR = ("skip", "raise")


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



# ----------------------------------------------------------------------------------------------- the job


def _write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


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
  if cfg.feature_dtype not in featurize.FEATURE_DTYPES:
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
    try:
      with open(summary_path(cfg), encoding="utf-8") as f:
        done = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{summary_path(cfg)}: not a valid shard summary ({e}); delete it to redo the shard") from None
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
      decoded = _guarded(cfg, clip, "decode", os.path.join(cfg.video_dir, clip.id), failures, featurize.decode_clip,
                         cfg, clip)
      # Loaded on the first clip that decodes (a job whose clips all fail early needs none), outside the
      # per-clip handling: a checkpoint or tokenizer that cannot load stops the job under either policy.
      if encoder is None:
        encoder = make_encoder(cfg)
      if tokenizer is None:
        tokenizer = load_tokenizer(cfg, encoder)
      rec, layout = _guarded(cfg, clip, "encoder", decoded.video_path, failures, featurize.encode_clip, cfg, clip,
                             decoded, encoder, tokenizer)
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


class TfdsBuildBusy(RuntimeError):
  """Another process holds the TFDS build lock."""


def build_tfds(cfg):
  """The mer_features TFDS dataset over {output_dir} (every split folder) in cfg.tfds_data_dir.

  Safe to call from every shard: the build runs under `{output_dir}/_tfds_build.lock`, created with O_EXCL
  (TfdsBuildBusy when another process holds it; a lock left by a killed process names its pid and host, and
  is removed by hand). `tfds_builders.prepare` keeps the dataset in step with the records: one built from the
  same records is reused; one built from other records (e.g. before a retry_failed rerun) is rebuilt beside
  the old copy and swapped in once built, so a failed rebuild leaves the old copy as it was."""
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
    builder = tfds_builders.MerFeatures(records_dir=cfg.output_dir, data_dir=cfg.tfds_data_dir,
                                        on_bad_record="raise")
    tfds_builders.prepare(builder)
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
