"""TFDS builders that write clip records to ArrayRecord files, read back with no TensorFlow installed.

  mer_synth     MER-Synth (synth.py), splits train/validation/test; the builder config carries the SynthConfig.
  mer_features  a directory of records written by preprocessing: `{records_dir}/{split}/*.rec`.
  mer_manual    the field's label files placed by hand in `manual_dir` (labels.py reads them), one builder config
                per dataset; optional subtitles and `features/{name}.npz` beside them (docs/data.md).

Each TFDS example is `{"id": str, "record": bytes}` (the schema's msgpack: one record format in the project),
read back with `builder.as_data_source(split)` through `TfdsSource`, which names the ArrayRecord file and record
on every failed read. Bad items follow `on_bad_record` (a duplicate clip id is one; skips are counted in the
dataset's metadata). `prepare` rebuilds a dataset whose sources changed (data/fingerprint.py), beside the old one,
swapped in once the build succeeded (docs/reliability.md "Prepared data follows its sources").
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import shutil
import socket
import tempfile
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from merr1_jax.data import fingerprint, labels, schema, synth
from merr1_jax.data.tfds_source import TfdsSource

_VERSION = tfds.core.Version("1.0.0")
_log = logging.getLogger(__name__)
def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                     "record": tfds.features.Tensor(shape=(), dtype=np.object_)})


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo for datasets built on this machine: never looked up on TFDS's public bucket.

  TFDS's own lookup, made whenever a builder is constructed before its data exists, creates a temporary directory
  before it checks whether the bucket may be read, and never removes it: one empty /tmp/tmp*tfds per builder, a
  thousand after a day of tests and grids. Ours are local builds, so there is nothing to look up."""

  def initialize_from_bucket(self) -> None:
    return None


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: the example layout, ArrayRecord as the default format, the bad-record policy."""

  VERSION = _VERSION

  def __init__(self, *, on_bad_record: str = "raise", **kwargs):
    if on_bad_record not in schema.ON_BAD_RECORD:
      raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {schema.ON_BAD_RECORD}")
    self.on_bad_record = on_bad_record
    self.bad = schema.BadRecordLog()
    kwargs.setdefault("file_format", "array_record")
    self._init_kwargs = dict(kwargs, on_bad_record=on_bad_record)  # `fresh` makes the same builder elsewhere
    super().__init__(**kwargs)

  def fresh(self, data_dir: str) -> "_RecordBuilder":
    """The same builder (class, config, sources, policy) over another data_dir: where a rebuild is made."""
    return type(self)(**{**self._init_kwargs, "data_dir": data_dir})

  def source_files(self, manual_dir: str | os.PathLike | None = None) -> dict[str, str] | None:
    """{name relative to the sources' root: path} of every file the dataset is built from; None: unknown now."""
    del manual_dir
    return None

  def source_root(self, manual_dir: str | os.PathLike | None = None) -> str:
    del manual_dir
    return "?"

  def stale_reason(self, manual_dir: str | os.PathLike | None = None) -> str | None:
    """Why the prepared dataset no longer matches its sources (None: it does, or the sources are not here)."""
    files = self.source_files(manual_dir)
    if files is None:  # e.g. only the data_dir was copied to this machine: nothing to compare with, or rebuild from
      _log.warning("%s: its sources (%s) are not here, so it cannot be checked against them; using it as built",
                   self.data_path, self.source_root(manual_dir))
      return None
    meta = self.info.metadata
    fp = meta.get("fingerprint")
    if fp is None:
      return "it was prepared before datasets recorded what they were built from (rebuilt once to record it)"
    changes = fingerprint.changes(fp, files)
    if any(changes.values()):
      return f"{self.source_root(manual_dir)} changed since it was built: {fingerprint.describe(changes)}"
    skipped = (meta.get("bad_records") or {}).get("count", 0)
    if skipped and self.on_bad_record == "raise":
      return (f"it was built with on_bad_record='skip' and left out {skipped} bad records; now "
              "on_bad_record='raise'")
    return None

  def _sources(self, root: str, splits) -> tuple[dict, dict]:
    """Starts this build's record of its sources in the metadata: (fingerprint files, {split: {id: file}})."""
    fp = self.info.metadata["fingerprint"] = fingerprint.new_fingerprint(self.name)
    ids = {s: {} for s in splits}
    self.info.metadata["sources"] = {"root": os.path.abspath(root), "splits": ids}
    return fp["files"], ids

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(builder=self, description=self.__doc__, features=_features(),
                             metadata=tfds.core.MetadataDict())

  def _bad(self, err: schema.BadRecordError) -> None:
    if self.on_bad_record == "raise":
      raise err
    self.bad.add(err)
    self.info.metadata["bad_records"] = {"count": self.bad.count, "by_field": dict(self.bad.by_field),
                                         "examples": list(self.bad.examples)}

  @staticmethod
  def _example(rec: schema.ClipRecord) -> tuple[str, dict]:
    return rec.id, {"id": rec.id, "record": schema.to_bytes(rec)}

  def _unique(self, seen: dict[str, str], rec_id: str, where: str) -> bool:
    """False (after raising or counting it) when `rec_id` was already written to this split."""
    if rec_id in seen:
      self._bad(schema.BadRecordError(f"duplicate clip id {rec_id!r}; first seen in {seen[rec_id]}", source=where,
                                      record=rec_id, field="id"))
      return False
    seen[rec_id] = where
    return True


@dataclasses.dataclass
class MerSynthConfig(tfds.core.BuilderConfig):
  synth: synth.SynthConfig = dataclasses.field(default_factory=synth.SynthConfig)


class MerSynth(_RecordBuilder):
  """MER-Synth: seeded synthetic multimodal emotion clips with slow/fast SFT demonstrations."""

  BUILDER_CONFIGS = [MerSynthConfig(name="default", description="synth.SynthConfig() defaults")]

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    info.metadata["synth_config"] = dataclasses.asdict(self.builder_config.synth)
    return info

  def check_config(self, *, unrecorded_ok: bool = False) -> None:
    """TFDS reuses a prepared dataset by config name alone; refuse one built from other generator knobs, or (unless
    `unrecorded_ok`: prepare rebuilds it) one that records none."""
    built = self.info.metadata.get("synth_config")
    if built is None and self.data_path.exists() and not unrecorded_ok:
      raise ValueError(f"{self.data_path} records no MER-Synth generator settings (prepared before they were "
                       "recorded): prepare it again (tfds_builders.prepare) to rebuild it")
    if built is not None and "version" not in built:  # prepared before MER-Synth had versions: version 1
      built = {**built, "version": 1}
    want = dataclasses.asdict(self.builder_config.synth)
    if self.data_path.exists() and built is not None and built != want:
      changed = ", ".join(f"{k} {built.get(k, '<unset>')!r} -> {want.get(k, '<unset>')!r}"
                          for k in sorted(set(built) | set(want)) if built.get(k) != want.get(k))
      raise ValueError(f"{self.data_path} holds MER-Synth built with other generator settings ({changed}; built "
                       f"with {built}, not {want}): use another config name or data_dir")

  def stale_reason(self, manual_dir=None) -> str | None:
    """The generator settings are MER-Synth's fingerprint (check_config refuses others); data that records none
    was prepared before they were recorded and is rebuilt once."""
    del manual_dir
    if self.info.metadata.get("synth_config") is None:
      return "it records no generator settings (prepared before they were recorded; rebuilt once to record them)"
    return None

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in synth.SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    for i in range(self.builder_config.synth.n(split)):
      yield self._example(synth.generate_clip(self.builder_config.synth, split, i))


class MerFeatures(_RecordBuilder):
  """Records written by offline preprocessing: `{records_dir}/{split}/*.rec`, one record per file."""

  def __init__(self, *, records_dir: str | os.PathLike, **kwargs):
    self.records_dir = os.fspath(records_dir)
    super().__init__(**kwargs)
    self._init_kwargs["records_dir"] = self.records_dir

  def _splits(self) -> list[str]:
    return sorted(d for d in os.listdir(self.records_dir) if os.path.isdir(os.path.join(self.records_dir, d)))

  def _rec_files(self, split: str) -> list[tuple[str, str]]:
    """(name relative to records_dir, path) of a split's record files, in build order."""
    paths = sorted(glob.glob(os.path.join(glob.escape(self.records_dir), glob.escape(split), "*.rec")))
    return [(f"{split}/{os.path.basename(p)}", p) for p in paths]

  def source_files(self, manual_dir=None) -> dict[str, str] | None:
    del manual_dir
    if not os.path.isdir(self.records_dir):
      return None
    return {rel: path for split in self._splits() for rel, path in self._rec_files(split)}

  def source_root(self, manual_dir=None) -> str:
    del manual_dir
    return f"records_dir {self.records_dir}"

  def _split_generators(self, dl_manager):
    del dl_manager
    if not os.path.isdir(self.records_dir):
      raise FileNotFoundError(f"records_dir {self.records_dir} does not exist")
    splits = self._splits()
    if not splits:
      raise FileNotFoundError(f"records_dir {self.records_dir} has no split folders (train/, test/, ...)")
    files, ids = self._sources(self.records_dir, splits)
    return {s: self._generate_examples(s, files, ids[s]) for s in splits}

  def _generate_examples(self, split: str, files: dict, ids: dict):
    seen: dict[str, str] = {}
    for rel, path in self._rec_files(split):
      with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
      files[rel] = fingerprint.entry(st, hashlib.sha256(data).hexdigest())  # the bytes built, skipped ones too
      try:
        rec = schema.from_bytes(data, source=path, index=0)  # one record per file: record 0 until its id is read
      except schema.BadRecordError as err:
        self._bad(err)
        continue
      if self._unique(seen, rec.id, path):
        ids[rec.id] = rel
        yield self._example(rec)


@dataclasses.dataclass
class MerManualConfig(tfds.core.BuilderConfig):
  """One labelled dataset: which reader, which file in manual_dir (glob allowed) for each split."""
  reader: str = "openset_csv"  # onehot_npz | valence | openset_csv | mme_json
  files: dict = dataclasses.field(default_factory=dict)  # split -> (file pattern, corpus prefix or None)
  classes: tuple[str, ...] | None = None  # onehot_npz with integer labels


def _manual(name, reader, file, classes=None, description="", corpus=None):
  return MerManualConfig(name=name, reader=reader, files={"test": (file, corpus)}, classes=classes,
                         description=description)


class MerManual(_RecordBuilder):
  """Benchmark label files (metrics.md §7), placed by hand in manual_dir, as clip records."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Place the dataset's label file in manual_dir under the name the builder config lists (e.g. label-6way.npz,
  label.npz, label.csv), converted to the safe layouts of docs/data.md ("manual_dir layouts"; no pickles: the
  MERTools npz files must be converted once, in your own trusted environment, with the command given there).
  Optional: subtitle_chieng.csv (name,english) and features/{name}.npz (arrays video, audio).
  """
  BUILDER_CONFIGS = [
      # MER-UniBench's MER2023/2024 test sets are MERTools' `test1_corpus`, MELD's is `test_corpus`; the reader
      # also takes the plain arrays of a file converted for that corpus alone.
      _manual("mer2023", "onehot_npz", "label-6way.npz", labels.ONEHOT_CLASSES["mer2023"], "MER2023, HIT",
              corpus="test1_corpus"),
      _manual("mer2024", "onehot_npz", "label-6way.npz", labels.ONEHOT_CLASSES["mer2024"], "MER2024, HIT",
              corpus="test1_corpus"),
      _manual("meld", "onehot_npz", "label.npz", labels.ONEHOT_CLASSES["meld"], "MELD, HIT", corpus="test_corpus"),
      _manual("iemocap4", "onehot_npz", "label.npz", labels.ONEHOT_CLASSES["iemocap4"], "IEMOCAP-4, HIT"),
      _manual("mosi", "valence", "label.csv", description="CMU-MOSI, WAF"),
      _manual("mosei", "valence", "label.csv", description="CMU-MOSEI, WAF"),
      _manual("sims", "valence", "label.csv", description="CH-SIMS, WAF"),
      _manual("simsv2", "valence", "label.csv", description="CH-SIMS v2, WAF"),
      _manual("ovmerd", "openset_csv", "label.csv", description="OV-MERD+, EW F"),
      MerManualConfig(name="mer2025_track2", reader="openset_csv", files={"train": ("track2_train_*.csv", None)},
                      description="MER2025 track 2 training labels"),
      _manual("mme_emotion", "mme_json", "*.json", description="MME-Emotion items"),
  ]

  def source_files(self, manual_dir=None) -> dict[str, str] | None:
    """The label files of every split, the subtitle file and the per-clip feature files."""
    if manual_dir is None or not os.path.isdir(manual_dir):
      return None
    root = glob.escape(os.fspath(manual_dir))
    paths = [p for pattern, _ in self.builder_config.files.values() for p in glob.glob(os.path.join(root, pattern))]
    paths += glob.glob(os.path.join(root, "subtitle_chieng.csv")) + glob.glob(os.path.join(root, "features", "*.npz"))
    return {os.path.relpath(p, manual_dir): p for p in sorted(set(paths))}

  def source_root(self, manual_dir=None) -> str:
    return f"manual_dir {manual_dir}"

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    files, ids = self._sources(manual_dir, self.builder_config.files)
    # The readers open the files themselves, so they are hashed first; a file that changes after this reads
    # as changed at the next check (its times fall within fingerprint.RACY_NS of the fingerprint, or after it).
    for rel, path in (self.source_files(manual_dir) or {}).items():
      files[rel] = fingerprint.entry(os.stat(path), fingerprint.sha256(path))
    out = {}
    for split, (pattern, corpus) in self.builder_config.files.items():
      paths = sorted(glob.glob(os.path.join(manual_dir, pattern)))
      if not paths:
        raise FileNotFoundError(f"{self.name}/{self.builder_config.name}: missing manual_dir file "
                                f"{os.path.join(manual_dir, pattern)}.{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      out[split] = self._generate_examples(manual_dir, paths, corpus, ids[split])
    return out

  def _read(self, path: str, corpus: str | None) -> list[labels.Annotation]:
    cfg, kw = self.builder_config, {"on_bad_record": self.on_bad_record, "log": self.bad}
    if cfg.reader == "onehot_npz":
      return labels.read_onehot_npz(path, classes=cfg.classes, corpus=corpus, **kw)
    if cfg.reader == "valence":
      return labels.read_valence(path, corpus=corpus, **kw)
    if cfg.reader == "openset_csv":
      return labels.read_openset_csv(path, **kw)
    if cfg.reader == "mme_json":
      return labels.read_mme_json(path, **kw)
    raise ValueError(f"unknown reader {cfg.reader!r}")

  def _generate_examples(self, manual_dir: str, paths: list[str], corpus: str | None, ids: dict):
    subtitle_file = os.path.join(manual_dir, "subtitle_chieng.csv")
    subtitles = labels.read_subtitles_csv(subtitle_file) if os.path.isfile(subtitle_file) else {}
    feature_dir = os.path.join(manual_dir, "features")
    seen: dict[str, str] = {}
    for path in paths:
      anns = self._read(path, corpus)
      if self.bad.count:  # readers count row skips in self.bad; mirror them into the metadata
        self.info.metadata["bad_records"] = {"count": self.bad.count, "by_field": dict(self.bad.by_field),
                                             "examples": list(self.bad.examples)}
      for ann in anns:
        if not self._unique(seen, ann.id, path):  # within one file the reader already refused duplicates
          continue
        feature_path = os.path.join(feature_dir, f"{ann.id}.npz")
        try:
          video, audio = _load_features(feature_dir, ann.id) if os.path.isdir(feature_dir) else (None, None)
          rec = labels.to_record(ann, dataset=self.builder_config.name, video=video, audio=audio,
                                 subtitle=subtitles.get(ann.id, ann.subtitle), source=feature_path)
        except schema.BadRecordError as err:
          self._bad(err)
          continue
        ids[ann.id] = os.path.relpath(path, manual_dir)
        yield self._example(rec)


def _load_features(feature_dir: str, name: str) -> tuple[np.ndarray, np.ndarray]:
  path = os.path.join(feature_dir, f"{name}.npz")
  if not os.path.isfile(path):
    raise schema.BadRecordError("feature file missing", source=path, record=name, field="features")
  try:
    with np.load(path, allow_pickle=False) as z:
      return z["video"], z["audio"]
  except Exception as e:  # zip, key and pickle errors all mean the same thing here: unusable features.
    raise schema.BadRecordError(f"unreadable features ({type(e).__name__}: {e})", source=path, record=name,
                                field="features") from e


def _download_and_prepare(builder: tfds.core.DatasetBuilder, manual_dir) -> None:
  config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)


def _rebuild(builder: _RecordBuilder, manual_dir) -> None:
  """Builds the dataset again beside the old one (a hidden folder in the same data_dir root) and swaps it in
  once built: a failed build leaves the old copy where it was. `builder` then reads the new copy."""
  root = os.fspath(builder.data_dir_root)
  staging = tempfile.mkdtemp(prefix=f".rebuild-{builder.name}-{socket.gethostname()}-{os.getpid()}-", dir=root)
  try:
    fresh = builder.fresh(staging)
    _download_and_prepare(fresh, manual_dir)
    live, aside = os.fspath(builder.data_path), os.path.join(staging, "replaced")
    os.rename(live, aside)
    try:
      os.rename(fresh.data_path, live)
    except BaseException:
      os.rename(aside, live)
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  builder.info.read_from_directory(builder.data_path)  # splits and metadata of the new copy
  builder.bad = fresh.bad


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | os.PathLike | None = None) -> None:
  """download_and_prepare offline (nothing is fetched, no GCS lookup; progress bars off), keeping a prepared
  dataset in step with its sources: other MER-Synth settings are refused, and a dataset whose sources changed
  (or that records none) is rebuilt, logging why. mer_manual is checked only when `manual_dir` is given."""
  tfds.disable_progress_bar()
  if isinstance(builder, MerSynth):
    builder.check_config(unrecorded_ok=True)
  if isinstance(builder, _RecordBuilder) and builder.data_path.exists():
    reason = builder.stale_reason(manual_dir)
    if reason is None:
      return
    _log.warning("%s is stale: %s; rebuilding it", builder.data_path, reason)
    _rebuild(builder, manual_dir)
    return
  _download_and_prepare(builder, manual_dir)


def load_source(name_or_builder, split: str, *, data_dir: str | os.PathLike | None = None, **kwargs) -> TfdsSource:
  """A prepared dataset's split as a pipeline RecordSource (builds nothing)."""
  builder = name_or_builder
  if isinstance(builder, str):
    builder = {"mer_synth": MerSynth, "mer_manual": MerManual}[builder](data_dir=data_dir, **kwargs)
  return TfdsSource(builder, split)
