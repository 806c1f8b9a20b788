"""A prepared TFDS split as the pipeline's record source: random access over its ArrayRecord files (no
TensorFlow), naming the file and record, and the clip's own source file, on every failed read."""

from __future__ import annotations

import bisect
import os
from typing import Any

import numpy as np

from merr1_jax.data import schema


class TfdsSource:
  """The pipeline's RecordSource over `builder.as_data_source(split)`. Picklable (Grain workers).

  `where(index)` names the ArrayRecord file and record of the copy; `origin(index, rec_id)` the source file the
  record was built from (the one to fix), with the copy's place, when the dataset recorded its sources."""

  def __init__(self, builder: Any, split: str):  # a tfds.core.DatasetBuilder, prepared
    if callable(getattr(builder, "check_config", None)):  # MerSynth: the generator settings it was built with
      builder.check_config()
    self.data = builder.as_data_source(split)
    self.split = split
    instructions = builder.info.splits[split].file_instructions
    self.files = [os.path.basename(fi.filename) for fi in instructions]
    self.dir = os.path.dirname(instructions[0].filename) if instructions else ""
    self.starts = list(np.cumsum([0] + [fi.take for fi in instructions])[:-1])
    sources = builder.info.metadata.get("sources") or {}
    # records_dir as configured now (the fingerprint vouches that its files are those built), else as recorded.
    self.source_root = getattr(builder, "records_dir", None) or sources.get("root", "")
    self.source_files = dict((sources.get("splits") or {}).get(split) or {})  # clip id -> file under the root

  def __len__(self) -> int:
    return len(self.data)

  def where(self, index: int) -> str:
    k = bisect.bisect_right(self.starts, index) - 1
    return f"{os.path.join(self.dir, self.files[k])} record {index - self.starts[k]} (split {self.split!r} #{index})"

  def origin(self, index: int, rec_id: str) -> str:
    """The record's source file (and its place in the copy), or the copy alone when it has no recorded source."""
    rel = self.source_files.get(rec_id)
    if rel is None:
      return self.where(index)
    return f"{os.path.join(self.source_root, rel)} (prepared copy: {self.where(index)})"

  def read(self, index: int) -> bytes:
    try:
      ex = self.data[index]
    except RuntimeError as e:  # array_record/riegeli: corrupt chunk, short file, bad header
      raise schema.BadRecordError(f"unreadable ArrayRecord data ({e}); delete {self.dir} to prepare it again",
                                  source=self.where(index), record=index, field="<array_record>") from e
    data = ex.get("record") if isinstance(ex, dict) else None
    if not data:  # a truncated ArrayRecord file reads back as empty records instead of failing
      raise schema.BadRecordError(f"empty record: the ArrayRecord file is truncated or was not written by these "
                                  f"builders; delete {self.dir} to prepare it again", source=self.where(index),
                                  record=index, field="record")
    return data
