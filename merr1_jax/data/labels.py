"""Readers for the field's label and annotation files (metrics.md §7), into the clip record schema.

Every reader returns a list of `Annotation`s (one per clip, in file order) and never loads a pickle: official files
that are pickles in disguise (MERTools' `label-6way.npz`) are refused with an error that says how to convert them
once, offline. Safe layouts read here: one-hot npz, valence CSV or npz, open-set CSV, subtitles CSV and the
MME-Emotion JSON. Bad rows follow schema.py's `on_bad_record`; under either policy a file that is not UTF-8 names
the byte offset and line, and a missing one raises FileNotFoundError naming the path. Details: docs/data.md,
"5. Datasets and label files".
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import zipfile
from typing import Any, Callable, Sequence

import numpy as np

from merr1_jax.data import schema

# Class orders of the integer label files, as metrics.md §7 lists them.
ONEHOT_CLASSES = {
    "mer2023": ("neutral", "angry", "happy", "sad", "worried", "surprise"),
    "mer2024": ("neutral", "angry", "happy", "sad", "worried", "surprise"),
    "meld": ("anger", "joy", "sadness", "neutral", "disgust", "fear", "surprise"),
    "iemocap4": ("happy", "sad", "neutral", "anger"),
}

BadRecordError = schema.BadRecordError

_CONVERT_HINT = (
    "It holds pickled Python objects, which this project never loads (unpickling runs code from the file). "
    "Convert it once, in your own trusted environment: for each corpus save arrays `{corpus}_name` (str), "
    "`{corpus}_emo` (str) or `{corpus}_label` (int) and optionally `{corpus}_val` (float) with np.savez; "
    "docs/data.md ('Converting the pickled label files') has the command.")


@dataclasses.dataclass(frozen=True)
class Annotation:
  """The labels of one clip, before features are attached."""
  id: str
  openset: tuple[str, ...] = ()
  onehot: str | None = None
  valence: float | None = None
  subtitle: str = ""


def parse_label_list(value: Any) -> list[str]:
  """metrics.md §1 steps 1-2: a list string (or list) into lowercased, stripped, non-empty items."""
  if isinstance(value, (list, tuple, np.ndarray)):
    items = [str(v) for v in value]
  elif value is None or (isinstance(value, float) and math.isnan(value)):
    items = []
  else:
    text = str(value)
    # Only ONE leading '[' and ONE trailing ']' go, so "[happy, sad]." keeps "sad]." (which maps to nothing).
    if text.startswith("["):
      text = text[1:]
    if text.endswith("]"):
      text = text[:-1]
    for quote in ("'", '"'):
      text = text.replace(quote, ",")
    items = text.split(",")
  return [w for w in (item.strip().lower() for item in items) if w]


class _Rows:
  """Applies the on_bad_record policy to row-level errors of one file."""

  def __init__(self, path: str, on_bad_record: str, log: schema.BadRecordLog | None):
    if on_bad_record not in schema.ON_BAD_RECORD:
      raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {schema.ON_BAD_RECORD}")
    if on_bad_record == "skip" and log is None:
      raise ValueError("on_bad_record='skip' needs a BadRecordLog, so that skips are counted")
    self.path, self.policy, self.log = path, on_bad_record, log
    self.out: list[Annotation] = []
    self.n_entries = 0
    self.first_entry: dict[str, int] = {}  # clip id -> the entry (0-based, file order) that first held it

  def add(self, row: str | int, make: Callable[[], Annotation], *, id_field: str = "name") -> None:
    entry, self.n_entries = self.n_entries, self.n_entries + 1
    try:
      ann = make()
      if ann.id in self.first_entry:
        raise self.bad(ann.id, id_field, f"duplicate clip id {ann.id!r}: entry {entry} repeats entry "
                                         f"{self.first_entry[ann.id]} (entries count from 0, in file order)")
    except BadRecordError as err:
      if self.policy == "raise":
        raise
      self.log.add(err)
      return
    except (ValueError, TypeError, KeyError) as e:
      err = BadRecordError(f"{type(e).__name__}: {e}", source=self.path, record=row, field="?")
      if self.policy == "raise":
        raise err from e
      self.log.add(err)
      return
    self.first_entry[ann.id] = entry
    self.out.append(ann)

  def bad(self, row, field: str, why: str) -> BadRecordError:
    return BadRecordError(why, source=self.path, record=row, field=field)


def _require(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"label file not found: {path}")
  return path


def _load_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except ValueError as e:
    if "allow_pickle" in str(e) or "Object arrays" in str(e):
      raise BadRecordError(_CONVERT_HINT, source=path, record="<file>", field="<npz>") from e
    raise BadRecordError(f"not a readable npz ({e})", source=path, record="<file>", field="<npz>") from e
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise BadRecordError(f"not a readable npz ({type(e).__name__}: {e})", source=path, record="<file>",
                         field="<npz>") from e


def _npz_prefix(arrays: dict[str, np.ndarray], corpus: str | None, path: str) -> str:
  """The key prefix of the arrays to read: f"{corpus}_" (corpus-prefixed layout) or "" (plain layout)."""
  corpora = sorted(k[:-len("_name")] for k in arrays if k.endswith("_name"))
  if corpus:
    if f"{corpus}_name" in arrays:
      return f"{corpus}_"
    if "name" in arrays and not corpora:  # a file converted for this one corpus, without the prefix
      return ""
    why = (f"no corpus {corpus!r}: expected the corpus-prefixed array `{corpus}_name` or, in a file that "
           f"holds this corpus alone, the plain array `name`; corpora present: {corpora}, arrays: {sorted(arrays)}")
  else:
    if "name" in arrays:
      return ""
    if len(corpora) == 1:
      return f"{corpora[0]}_"
    why = (f"expected the plain array `name` or exactly one corpus-prefixed `{{corpus}}_name`; corpora present: "
           f"{corpora} (choose one with corpus=...), arrays: {sorted(arrays)}")
  raise BadRecordError(why, source=path, record="<file>", field=f"{corpus}_name" if corpus else "name")


def _npz_column(arrays: dict[str, np.ndarray], key: str, prefix: str, path: str, *, required: bool):
  full = prefix + key
  if full not in arrays:
    if required:
      raise BadRecordError(f"missing array {full!r}; arrays present: {sorted(arrays)}", source=path,
                           record="<file>", field=full)
    return None
  col = arrays[full]
  if col.ndim != 1:
    raise BadRecordError(f"array {full!r} has shape {col.shape}, expected [N]", source=path, record="<file>",
                         field=full)
  return col


def _finite_float(value, rows: _Rows, row, field: str) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise rows.bad(row, field, f"{value!r} is not a number") from None
  if not math.isfinite(v):
    raise rows.bad(row, field, f"non-finite value {v}")
  return v


def read_onehot_npz(path, *, classes: Sequence[str] | None = None, corpus: str | None = None,
                    on_bad_record: str = "raise", log: schema.BadRecordLog | None = None) -> list[Annotation]:
  """One-hot label files: MER2023/2024 `label-6way.npz` (`emo`, `val`), MELD/IEMOCAP `label.npz` (`label`).

  `corpus` names the corpus to read (e.g. "test1_corpus"): its prefixed arrays, or the plain ones in a file that
  holds it alone. None reads the plain arrays, or the file's only corpus.
  """
  path = _require(path)
  arrays = _load_npz(path)
  prefix = _npz_prefix(arrays, corpus, path)
  names = _npz_column(arrays, "name", prefix, path, required=True)
  emo = _npz_column(arrays, "emo", prefix, path, required=False)
  label = _npz_column(arrays, "label", prefix, path, required=False)
  val = _npz_column(arrays, "val", prefix, path, required=False)
  label_field = "label"
  if emo is not None and np.issubdtype(emo.dtype, np.integer):  # a converted dict whose `emo` held class ids
    label, emo, label_field = emo, None, "emo"
  if emo is None and label is None:
    raise BadRecordError(f"needs an `{prefix}emo` (str) or a `{prefix}label` (int) array; arrays present: "
                         f"{sorted(arrays)}", source=path, record="<file>", field="emo")
  if label is not None and emo is None:
    file_classes = _npz_column(arrays, "classes", prefix, path, required=False)
    if file_classes is None and prefix:
      file_classes = _npz_column(arrays, "classes", "", path, required=False)
    classes = tuple(str(c) for c in file_classes) if file_classes is not None else classes
    if classes is None:
      raise BadRecordError("integer labels need a class order (`classes` array or argument)", source=path,
                           record="<file>", field="label")
  for col, field in ((emo, "emo"), (label, label_field), (val, "val")):
    if col is not None and len(col) != len(names):
      raise BadRecordError(f"{len(col)} entries for {len(names)} names", source=path, record="<file>",
                           field=field)
  rows = _Rows(path, on_bad_record, log)
  for i, name in enumerate(names):
    name = str(name)

    def make(i=i, name=name):
      if not name.strip():
        raise rows.bad(i, "name", "empty clip name")
      if emo is not None:
        word = str(emo[i]).strip().lower()
      else:
        k = label[i]
        if not np.issubdtype(label.dtype, np.integer) or not 0 <= int(k) < len(classes):
          raise rows.bad(name, label_field, f"label {k!r} is not a class index in [0, {len(classes)})")
        word = classes[int(k)]
      if not word:
        raise rows.bad(name, "emo", "empty emotion label")
      valence = None if val is None else _finite_float(val[i], rows, name, "val")
      return Annotation(id=name, openset=(word,), onehot=word, valence=valence)

    rows.add(i, make)
  return rows.out


def read_valence(path, *, corpus: str | None = None, on_bad_record: str = "raise",
                 log: schema.BadRecordLog | None = None) -> list[Annotation]:
  """Sentiment valence (MOSI, MOSEI, SIMS, SIMS v2): CSV `name,valence` (or `val`/`label`) or npz `name`, `val`."""
  path = _require(path)
  rows = _Rows(path, on_bad_record, log)
  if path.endswith(".npz"):
    arrays = _load_npz(path)
    prefix = _npz_prefix(arrays, corpus, path)
    names = _npz_column(arrays, "name", prefix, path, required=True)
    vals = _npz_column(arrays, "val", prefix, path, required=True)
    if len(vals) != len(names):
      raise BadRecordError(f"{len(vals)} valences for {len(names)} names", source=path, record="<file>",
                           field="val")
    pairs = [(str(n), v) for n, v in zip(names, vals)]
  else:
    table = _read_csv(path, required=("name",))
    column = next((c for c in ("valence", "val", "label") if c in table[0]), None) if table else "valence"
    if column is None:
      raise BadRecordError(f"no valence column (valence, val or label); columns: {list(table[0])}", source=path,
                           record="<file>", field="valence")
    pairs = [(r["name"], r[column]) for r in table]
  for i, (name, v) in enumerate(pairs):
    rows.add(name or i, lambda name=name, v=v, i=i: Annotation(
        id=_name(name, rows, i), valence=_finite_float(v, rows, name, "valence")))
  return rows.out


def _name(name: str, rows: _Rows, i: int) -> str:
  if not name or not name.strip():
    raise rows.bad(i, "name", "empty clip name")
  return name.strip()


def _read_text(path: str) -> str:
  """The whole file as UTF-8 text (a BOM is dropped). Other encodings are an error naming the byte and line:
  guessing an encoding would silently garble the clip names and labels."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    raise BadRecordError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} (line {line}) "
                         f"is invalid ({e.reason}); re-save the file as UTF-8", source=path, record=f"line {line}",
                         field="<encoding>") from None


def _read_csv(path: str, *, required: Sequence[str]) -> list[dict[str, str]]:
  reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
  missing = [c for c in required if c not in (reader.fieldnames or ())]
  if missing:
    raise BadRecordError(f"missing columns {missing}; header is {reader.fieldnames}", source=path,
                         record="<header>", field=missing[0])
  try:
    return list(reader)
  except csv.Error as e:
    raise BadRecordError(f"CSV parse error: {e}", source=path, record=f"line {reader.line_num}",
                         field="<csv>") from e


def read_openset_csv(path, *, on_bad_record: str = "raise",
                     log: schema.BadRecordLog | None = None) -> list[Annotation]:
  """Open-vocabulary labels (OV-MERD+, MER2025 track 2): CSV `name,openset`. An empty list is a bad row."""
  path = _require(path)
  rows = _Rows(path, on_bad_record, log)
  for i, r in enumerate(_read_csv(path, required=("name", "openset"))):

    def make(r=r, i=i):
      name = _name(r["name"], rows, i)
      words = parse_label_list(r["openset"])
      if not words:
        raise rows.bad(name, "openset", f"empty label list {r['openset']!r}")
      return Annotation(id=name, openset=tuple(words))

    rows.add(r["name"] or i, make)
  return rows.out


def read_subtitles_csv(path, *, column: str = "english") -> dict[str, str]:
  """`subtitle_chieng.csv`: clip name -> subtitle text in `column`. Empty cells give ""."""
  path = _require(path)
  table = _read_csv(path, required=("name", column))
  out = {}
  for i, r in enumerate(table):
    name = (r["name"] or "").strip()
    if not name:
      raise BadRecordError("empty clip name", source=path, record=i, field="name")
    if name in out:
      raise BadRecordError("duplicate clip name", source=path, record=name, field="name")
    out[name] = r[column] or ""
  return out


def read_mme_json(path, *, on_bad_record: str = "raise",
                  log: schema.BadRecordLog | None = None) -> list[Annotation]:
  """MME-Emotion items: a JSON list of {video_id, label, label_set}; `label` becomes the open set."""
  path = _require(path)
  text = _read_text(path)
  try:
    items = json.loads(text)
  except json.JSONDecodeError as e:
    raise BadRecordError(f"not valid JSON ({e})", source=path, record="<file>", field="<json>") from e
  if not isinstance(items, list):
    raise BadRecordError("expected a JSON list of items", source=path, record="<file>", field="<json>")
  rows = _Rows(path, on_bad_record, log)
  for i, item in enumerate(items):

    def make(item=item, i=i):
      if not isinstance(item, dict) or "video_id" not in item or "label" not in item:
        raise rows.bad(i, "video_id", "item needs `video_id` and `label`")
      words = parse_label_list(item["label"])
      if not words:
        raise rows.bad(item["video_id"], "label", f"empty label {item['label']!r}")
      return Annotation(id=_name(str(item["video_id"]), rows, i), openset=tuple(words))

    rows.add(i, make, id_field="video_id")
  return rows.out


_F16_MAX = float(np.finfo(np.float16).max)  # 65504


def _features(x, *, dtype: str | None, field: str, record: str, source: str) -> np.ndarray:
  """`x` as a feature array of `dtype` (None: keep x's dtype if the schema allows it, else float16). Values too
  large for float16 are an error: the cast would turn them into Inf, and the record check would then blame Inf
  features instead of the range."""
  x = np.asarray(x)
  target = dtype or (x.dtype.name if x.dtype.name in schema.FEATURE_DTYPES else "float16")
  if target == "float16" and x.dtype != np.float16 and x.size:
    big = np.abs(x.astype(np.float64)) > _F16_MAX  # NaN/Inf compare False here; the record check reports them
    if big.any():
      row = int(np.argwhere(big)[0][0])
      raise BadRecordError(f"{int(big.sum())} values exceed the float16 range (|x| <= {_F16_MAX:g}; largest "
                           f"{float(np.abs(x.astype(np.float64))[big].max()):g}, first in row {row}); casting "
                           f"would make them Inf: rescale the features or keep their dtype (feature_dtype=None)",
                           source=source, record=record, field=field)
  return x.astype(schema.FEATURE_NUMPY_DTYPES[target], copy=False)


def to_record(ann: Annotation, *, dataset: str, video: np.ndarray | None = None, audio: np.ndarray | None = None,
              feature_space: str = "raw", subtitle: str | None = None, feature_dtype: str | None = "float16",
              source: str = "?") -> schema.ClipRecord:
  """Attaches features to an annotation, cast to `feature_dtype` (one of schema.FEATURE_DTYPES; None keeps the
  input's dtype when the schema allows it). Values beyond the float16 range raise BadRecordError naming
  `source`, the record and the field instead of becoming Inf. Missing features give [0, 0] arrays: a label-only
  record, which the training pipeline's check rejects (it needs audio rows) but label-only tools can use."""
  if feature_dtype is not None and feature_dtype not in schema.FEATURE_DTYPES:
    raise ValueError(f"feature_dtype={feature_dtype!r}; expected one of {schema.FEATURE_DTYPES} or None")
  empty = np.zeros((0, 0), np.float16)
  kw = dict(dtype=feature_dtype, record=ann.id, source=source)
  return schema.ClipRecord(
      id=ann.id, dataset=dataset,
      video=empty if video is None else _features(video, field="video", **kw),
      audio=empty if audio is None else _features(audio, field="audio", **kw),
      subtitle=ann.subtitle if subtitle is None else subtitle,
      openset=ann.openset, feature_space=feature_space, onehot=ann.onehot, valence=ann.valence)
