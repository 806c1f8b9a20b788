"""TFDS builders that write clip records to ArrayRecord files, read back with no TensorFlow installed.

  mer_synth     MER-Synth (synth.py), splits train/validation/test; the builder config carries the SynthConfig.
  mer_features  a directory of records written by preprocessing: `{records_dir}/{split}/*.rec`, one
                `schema.to_bytes` record per file.
  mer_manual    the field's label files, placed by hand in `manual_dir` (labels.py reads them). One builder
                config per dataset (MER2023, MELD, CMU-MOSI, OV-MERD+, ...), naming the file and, for the
                MERTools npz files, the corpus of the test split (MER2023/2024: `test1_corpus`, MELD:
                `test_corpus`; docs/data.md lists the layouts and how to convert the pickled originals).
                Optional extras in manual_dir: `subtitle_chieng.csv` (subtitles, English column) and
                `features/{name}.npz` (arrays `video` [Tv, Dv], `audio` [Ta, Da]); without features a record is
                label-only (zero feature rows).

Each TFDS example is `{"id": str, "record": bytes}`: the record is the schema's portable msgpack, so TFDS only
stores and indexes it and there is one record format in the project. Read back with
`builder.as_data_source(split)` (random access over ArrayRecord, no TensorFlow), wrapped by `TfdsSource`, the
pipeline's record source, which names the ArrayRecord file and record on every failed read.

Bad input at build time follows `on_bad_record`: "raise" fails naming the file; "skip" leaves the item out,
counts it in `builder.bad` (a schema.BadRecordLog, which logs it) and stores the count and the first messages
in the dataset's metadata (`builder.info.metadata["bad_records"]`), so skips stay visible after the build.
A clip id seen twice in one split (within a label file, across the files of a glob, or across `.rec` files) is
such a bad item, named with both places; the second one is the one left out. (TFDS itself would fail on the
duplicate key with an unrelated error.)
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from merr1_jax.data import labels, schema, synth

_VERSION = tfds.core.Version("1.0.0")


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({"id": tfds.features.Text(),
                                     "record": tfds.features.Tensor(shape=(), dtype=np.object_)})


class _RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: the example layout, ArrayRecord as the default format, the bad-record policy."""

  VERSION = _VERSION

  def __init__(self, *, on_bad_record: str = "raise", **kwargs):
    if on_bad_record not in schema.ON_BAD_RECORD:
      raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {schema.ON_BAD_RECORD}")
    self.on_bad_record = on_bad_record
    self.bad = schema.BadRecordLog()
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=_features(),
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

  def check_config(self) -> None:
    """TFDS reuses a prepared dataset by config name alone; refuse one built from other generator knobs."""
    built = self.info.metadata.get("synth_config")
    if built is not None and "version" not in built:  # prepared before MER-Synth had versions: version 1
      built = {**built, "version": 1}
    want = dataclasses.asdict(self.builder_config.synth)
    if self.data_path.exists() and built != want:
      raise ValueError(f"{self.data_path} holds MER-Synth built with {built}, not {want}: use another config "
                       "name or data_dir")

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

  def _split_generators(self, dl_manager):
    del dl_manager
    if not os.path.isdir(self.records_dir):
      raise FileNotFoundError(f"records_dir {self.records_dir} does not exist")
    splits = sorted(d for d in os.listdir(self.records_dir) if os.path.isdir(os.path.join(self.records_dir, d)))
    if not splits:
      raise FileNotFoundError(f"records_dir {self.records_dir} has no split folders (train/, test/, ...)")
    return {s: self._generate_examples(os.path.join(self.records_dir, s)) for s in splits}

  def _generate_examples(self, folder: str):
    seen: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.rec"))):
      with open(path, "rb") as f:
        data = f.read()
      try:
        rec = schema.from_bytes(data, source=path)
      except schema.BadRecordError as err:
        self._bad(err)
        continue
      if self._unique(seen, rec.id, path):
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

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    out = {}
    for split, (pattern, corpus) in self.builder_config.files.items():
      paths = sorted(glob.glob(os.path.join(manual_dir, pattern)))
      if not paths:
        raise FileNotFoundError(f"{self.name}/{self.builder_config.name}: missing manual_dir file "
                                f"{os.path.join(manual_dir, pattern)}.{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      out[split] = self._generate_examples(manual_dir, paths, corpus)
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

  def _generate_examples(self, manual_dir: str, paths: list[str], corpus: str | None):
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


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | os.PathLike | None = None) -> None:
  """download_and_prepare offline: nothing is fetched (no GCS lookup), progress bars off."""
  tfds.disable_progress_bar()
  if isinstance(builder, MerSynth):
    builder.check_config()
  config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)


class TfdsSource:
  """The pipeline's RecordSource over `builder.as_data_source(split)`. Picklable (Grain workers)."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
    if isinstance(builder, MerSynth):
      builder.check_config()
    self.data = builder.as_data_source(split)
    self.split = split
    instructions = builder.info.splits[split].file_instructions
    self.files = [os.path.basename(fi.filename) for fi in instructions]
    self.dir = os.path.dirname(instructions[0].filename) if instructions else ""
    self.starts = list(np.cumsum([0] + [fi.take for fi in instructions])[:-1])

  def __len__(self) -> int:
    return len(self.data)

  def where(self, index: int) -> str:
    k = bisect.bisect_right(self.starts, index) - 1
    return f"{os.path.join(self.dir, self.files[k])} record {index - self.starts[k]} (split {self.split!r} #{index})"

  def read(self, index: int) -> bytes:
    try:
      ex = self.data[index]
    except RuntimeError as e:  # array_record/riegeli: corrupt chunk, short file, bad header
      raise schema.BadRecordError(f"unreadable ArrayRecord data ({e})", source=self.where(index), record=index,
                                  field="<array_record>") from e
    data = ex.get("record") if isinstance(ex, dict) else None
    if not data:  # a truncated ArrayRecord file reads back as empty records instead of failing
      raise schema.BadRecordError("empty record: the ArrayRecord file is truncated or was not written by "
                                  "these builders", source=self.where(index), record=index, field="record")
    return data


def load_source(name_or_builder, split: str, *, data_dir: str | os.PathLike | None = None, **kwargs) -> TfdsSource:
  """A prepared dataset's split as a pipeline RecordSource (builds nothing)."""
  builder = name_or_builder
  if isinstance(builder, str):
    builder = {"mer_synth": MerSynth, "mer_manual": MerManual}[builder](data_dir=data_dir, **kwargs)
  return TfdsSource(builder, split)
