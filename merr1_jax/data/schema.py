"""One record per clip: the compact feature record that training reads.

Video decoding and the frame/audio encoders run once, offline; what they leave behind is a `ClipRecord`,
serialised with msgpack so that reading a record never runs code (no pickle) and works on any platform.
`media_layout` (optional) is the placeholder runs string of an interleaved media block, e.g. "V8A50V8A50"; None
means the separate block (all video rows, then all audio rows). Bad input never vanishes silently: `from_bytes`
and `check` raise `BadRecordError` naming the source file, the record and the field, and `read_record` applies the
`on_bad_record` policy ("raise", or "skip": counted in a `BadRecordLog`). Details: docs/data.md, "1. The clip
record".

Shape legend:
  Tv: video feature rows (frames or frame groups; may be 0)   Dv: video feature width
  Ta: audio feature rows                                       Da: audio feature width
  L:  prompt length in tokens (only for precomputed M-RoPE position ids, `[3, L]`)
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from typing import Callable

import ml_dtypes
import msgpack
import numpy as np

SCHEMA_VERSION = 1
FEATURE_SPACES = ("raw", "lm_embed")
ON_BAD_RECORD = ("raise", "skip")
DEFAULT_MAX_SUBTITLE_CHARS = 4096

# The only dtypes a serialised array may carry. Features are half precision (float32 is accepted for
# records written by tools that cannot produce halves); position ids are int32.
_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "int32": np.dtype(np.int32),
}
FEATURE_DTYPES = ("float16", "bfloat16", "float32")
FEATURE_NUMPY_DTYPES = {name: _DTYPES[name] for name in FEATURE_DTYPES}

_log = logging.getLogger(__name__)


class BadRecordError(ValueError):
  """A record that cannot be used. The message names the source file, the record and the field."""

  def __init__(self, reason: str, *, source: str = "?", record: str | int = "?", field: str = "?"):
    self.reason, self.source, self.record, self.field = reason, source, record, field
    super().__init__(f"bad record {record!r} in {source} (field {field}): {reason}")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == ambiguous; use records_equal.
class ClipRecord:
  id: str
  dataset: str
  video: np.ndarray  # [Tv, Dv] float16
  audio: np.ndarray  # [Ta, Da] float16
  subtitle: str
  openset: tuple[str, ...]  # open-vocabulary ground-truth words
  feature_space: str  # "raw" (needs the trainable projector) | "lm_embed" (already the LM width)
  position_ids: np.ndarray | None = None  # [3, L] int32 M-RoPE ids of the whole prompt, when precomputed
  onehot: str | None = None
  valence: float | None = None
  demo_slow: str | None = None  # SFT assistant texts (MER-Synth has them)
  demo_fast: str | None = None
  media_layout: str | None = None  # interleaved placeholder runs, e.g. "V8A50V8A50"; None: separate block

  def __post_init__(self):
    # Accept a list for convenience but store a tuple, so the record stays immutable.
    if not isinstance(self.openset, tuple):
      object.__setattr__(self, "openset", tuple(self.openset))

  @property
  def n_video(self) -> int:
    return int(self.video.shape[0])

  @property
  def n_audio(self) -> int:
    return int(self.audio.shape[0])


_ARRAY_FIELDS = ("video", "audio", "position_ids")
_STR_FIELDS = ("id", "dataset", "subtitle", "feature_space")
_OPT_STR_FIELDS = ("onehot", "demo_slow", "demo_fast", "media_layout")
_OMIT_IF_NONE = ("media_layout",)  # added after version 1: absent when unset, so older bytes stay the same
_FIELDS = tuple(f.name for f in dataclasses.fields(ClipRecord))
_RUNS_RE = re.compile(r"([VA]\d+)+")


def _pack_array(x: np.ndarray) -> dict:
  name = x.dtype.name
  if name not in _DTYPES:
    raise TypeError(f"dtype {x.dtype} cannot be serialised; allowed: {sorted(_DTYPES)}")
  # '<' byte order on disk whatever the host is, so records are portable.
  raw = np.ascontiguousarray(x).astype(_DTYPES[name].newbyteorder("<"), copy=False).tobytes()
  return {"dtype": name, "shape": list(x.shape), "data": raw}


def _unpack_array(obj, *, field: str, source: str, record) -> np.ndarray:
  bad = lambda why: BadRecordError(why, source=source, record=record, field=field)  # noqa: E731
  if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
    raise bad("expected an array entry {dtype, shape, data}")
  dtype = _DTYPES.get(obj["dtype"]) if isinstance(obj["dtype"], str) else None
  if dtype is None:
    raise bad(f"dtype {obj['dtype']!r} not allowed; allowed: {sorted(_DTYPES)}")
  shape = obj["shape"]
  if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
    raise bad(f"shape {shape!r} is not a list of non-negative ints")
  if not isinstance(obj["data"], bytes):
    raise bad("array data is not bytes")
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(obj["data"]) != expected:
    raise bad(f"{len(obj['data'])} data bytes for shape {shape} {dtype.name} (expected {expected})")
  arr = np.frombuffer(obj["data"], dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
  return arr.reshape(shape)


def to_bytes(rec: ClipRecord) -> bytes:
  """msgpack map: every field, arrays as (dtype, shape, raw bytes), plus the schema version under "v"."""
  out = {"v": SCHEMA_VERSION}
  for name in _FIELDS:
    value = getattr(rec, name)
    if name in _OMIT_IF_NONE and value is None:
      continue
    if name in _ARRAY_FIELDS and value is not None:
      value = _pack_array(np.asarray(value))
    elif name == "openset":
      value = list(value)
    elif name == "valence" and value is not None:
      value = float(value)
    out[name] = value
  return msgpack.packb(out, use_bin_type=True)


def from_bytes(data: bytes, *, source: str = "?", index: int | None = None) -> ClipRecord:
  """Parses one record. Raises BadRecordError naming `source` and the record id (or index) on any defect."""
  record = "?" if index is None else index
  try:
    obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except Exception as e:  # msgpack raises several unrelated types for truncated/corrupt input.
    raise BadRecordError(f"not a msgpack record ({type(e).__name__}: {e})", source=source, record=record,
                         field="<bytes>") from e
  if not isinstance(obj, dict):
    raise BadRecordError("top level is not a map", source=source, record=record, field="<bytes>")
  if isinstance(obj.get("id"), str):
    record = obj["id"]
  bad = lambda field, why: BadRecordError(why, source=source, record=record, field=field)  # noqa: E731
  if obj.get("v") != SCHEMA_VERSION:
    raise bad("v", f"schema version {obj.get('v')!r}, this reader understands {SCHEMA_VERSION}")
  unknown = set(obj) - set(_FIELDS) - {"v"}
  if unknown:
    raise bad(sorted(unknown)[0], f"unknown fields {sorted(unknown)}")
  kw = {}
  for name in _FIELDS:
    value = obj.get(name)
    if name in _STR_FIELDS:
      if not isinstance(value, str):
        raise bad(name, f"expected a string, got {type(value).__name__}")
    elif name in _OPT_STR_FIELDS:
      if value is not None and not isinstance(value, str):
        raise bad(name, f"expected a string or nil, got {type(value).__name__}")
    elif name == "openset":
      if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
        raise bad(name, "expected a list of strings")
      value = tuple(value)
    elif name == "valence":
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise bad(name, f"expected a number or nil, got {type(value).__name__}")
      value = None if value is None else float(value)
    elif name in _ARRAY_FIELDS:
      if value is None:
        if name != "position_ids":
          raise bad(name, "missing")
      else:
        value = _unpack_array(value, field=name, source=source, record=record)
    kw[name] = value
  return ClipRecord(**kw)


def check(rec: ClipRecord, *, video_dim: int | None, audio_dim: int | None,
          max_subtitle_chars: int = DEFAULT_MAX_SUBTITLE_CHARS,
          maps_word: Callable[[str], bool] | None = None, source: str = "?") -> None:
  """Content checks that a well-formed record can still fail. Raises BadRecordError.

  Args:
    video_dim, audio_dim: the feature widths the config expects (None: do not check).
    max_subtitle_chars: longer subtitles are an error, not a silent truncation.
    maps_word: returns True when a label word maps to at least one cluster (emotion wheels, or the closed
      label list); None checks only that the label list is non-empty.
  """
  bad = lambda field, why: BadRecordError(why, source=source, record=rec.id, field=field)  # noqa: E731
  if rec.feature_space not in FEATURE_SPACES:
    raise bad("feature_space", f"{rec.feature_space!r} is not one of {FEATURE_SPACES}")
  for name, want_dim in (("video", video_dim), ("audio", audio_dim)):
    x = getattr(rec, name)
    if x.ndim != 2:
      raise bad(name, f"expected a 2-D [T, D] array, got shape {x.shape}")
    if x.dtype.name not in FEATURE_DTYPES:
      raise bad(name, f"dtype {x.dtype} is not one of {FEATURE_DTYPES}")
    if want_dim is not None and x.shape[1] != want_dim:
      raise bad(name, f"feature dim {x.shape[1]} differs from the configured {want_dim}")
    finite = np.isfinite(x.astype(np.float32))
    if not finite.all():
      row = int(np.argwhere(~finite)[0][0])
      raise bad(name, f"{int((~finite).sum())} non-finite values (NaN/Inf), first in row {row}")
  if rec.n_audio == 0:
    raise bad("audio", "no audio rows")
  if rec.media_layout is not None:
    runs = rec.media_layout
    if not isinstance(runs, str) or not _RUNS_RE.fullmatch(runs):
      raise bad("media_layout", f"{runs!r} is not a placeholder runs string like 'V8A50V8A50'")
    totals = {k: 0 for k in "VA"}
    for k, n in re.findall(r"([VA])(\d+)", runs):
      totals[k] += int(n)
    # The layout must place every feature row exactly once, or the merge would shift rows between modalities.
    if (totals["V"], totals["A"]) != (rec.n_video, rec.n_audio):
      raise bad("media_layout", f"{runs!r} holds {totals['V']} video and {totals['A']} audio placeholders; "
                                f"the record has {rec.n_video} video and {rec.n_audio} audio rows")
  if rec.position_ids is not None:
    p = rec.position_ids
    if p.ndim != 2 or p.shape[0] != 3 or p.dtype != np.int32:
      raise bad("position_ids", f"expected [3, L] int32, got {p.shape} {p.dtype}")
  if len(rec.subtitle) > max_subtitle_chars:
    raise bad("subtitle", f"{len(rec.subtitle)} characters exceeds max_subtitle_chars={max_subtitle_chars}")
  words = [w.strip() for w in rec.openset if w.strip()]
  # Sentiment sets (MOSI, MOSEI, SIMS) carry only a valence, basic-emotion sets may carry only a one-hot label.
  if not words and rec.valence is None and not rec.onehot:
    raise bad("openset", "empty label list (and no one-hot label or valence)")
  if words and maps_word is not None and not any(maps_word(w) for w in words):
    raise bad("openset", f"no label word maps to an emotion cluster: {list(rec.openset)}")
  if rec.valence is not None and not np.isfinite(rec.valence):
    raise bad("valence", f"non-finite valence {rec.valence}")


class BadRecordLog:
  """Counts (and logs) every record skipped under on_bad_record='skip', by field, so nothing vanishes."""

  def __init__(self):
    self.count = 0
    self.by_field: collections.Counter[str] = collections.Counter()
    self.examples: list[str] = []  # the first few messages, for a report
    self.records: list = []  # every skipped record's id (its index in the source when no id could be read)

  def add(self, err: BadRecordError) -> None:
    self.count += 1
    self.records.append(err.record)
    self.by_field[err.field] += 1
    if len(self.examples) < 10:
      self.examples.append(str(err))
    _log.warning("skipping %s (%d skipped so far)", err, self.count)

  def summary(self) -> str:
    return f"{self.count} bad records skipped" + (f" by field {dict(self.by_field)}" if self.count else "")


def read_record(data: bytes, *, source: str, index: int, on_bad_record: str = "raise",
                log: BadRecordLog | None = None, video_dim: int | None = None, audio_dim: int | None = None,
                max_subtitle_chars: int = DEFAULT_MAX_SUBTITLE_CHARS,
                maps_word: Callable[[str], bool] | None = None) -> ClipRecord | None:
  """from_bytes + check under the on_bad_record policy: 'raise' raises, 'skip' counts in `log` and returns None."""
  if on_bad_record not in ON_BAD_RECORD:
    raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {ON_BAD_RECORD}")
  if on_bad_record == "skip" and log is None:
    raise ValueError("on_bad_record='skip' needs a BadRecordLog, so that skips are counted")
  try:
    rec = from_bytes(data, source=source, index=index)
    check(rec, video_dim=video_dim, audio_dim=audio_dim, max_subtitle_chars=max_subtitle_chars,
          maps_word=maps_word, source=source)
    return rec
  except BadRecordError as err:
    if on_bad_record == "raise":
      raise
    log.add(err)
    return None


def records_equal(a: ClipRecord, b: ClipRecord) -> bool:
  """Field-wise equality, arrays compared by dtype, shape and bytes (NaN-safe)."""
  for name in _FIELDS:
    x, y = getattr(a, name), getattr(b, name)
    if name in _ARRAY_FIELDS and x is not None and y is not None:
      if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
        return False
    elif x is None or y is None:
      if x is not y:
        return False
    elif x != y:
      return False
  return True
