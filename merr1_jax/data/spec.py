"""What a pipeline reads and how it shapes the stream: the record-source protocol, an in-memory source, and
`PipelineConfig`. Apart from data/pipeline.py (which re-exports them) so that data/transforms.py can name them
without importing the pipeline that imports it."""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

from merr1_jax.data import schema
from merr1_jax.task import prompts

KINDS = ("sft", "rl", "eval")


class RecordSource(Protocol):
  """Random access to serialised records. `read` raises BadRecordError naming the file on a bad read. A source
  may also have `origin(index, rec_id) -> str`, the file a decoded record is to be fixed in (`where` otherwise):
  transforms.record_where."""

  def __len__(self) -> int: ...
  def read(self, index: int) -> bytes: ...
  def where(self, index: int) -> str: ...


class BytesSource:
  """In-memory records (tests, benchmarks, records built on the fly)."""

  def __init__(self, records: Sequence[bytes | schema.ClipRecord], name: str = "<memory>"):
    self._data = [r if isinstance(r, bytes) else schema.to_bytes(r) for r in records]
    self.name = name

  def __len__(self) -> int:
    return len(self._data)

  def read(self, index: int) -> bytes:
    return self._data[index]

  def where(self, index: int) -> str:
    return f"{self.name}[{index}]"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything that shapes the stream. Defaults suit training; eval sets shuffle=False, num_epochs=1."""
  kind: str = "rl"
  batch_size: int = 8
  mode: str = "slow"  # eval only: the prompt mode
  sft_modes: tuple[str, ...] = prompts.MODES  # sft: one example per record and mode
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None  # None repeats forever
  shard_index: int = 0  # this process (e.g. jax.process_index(), passed in by the caller)
  shard_count: int = 1
  drop_remainder: bool = True  # False (eval): keep the last partial batch, padded with masked rows
  prompt_buckets: tuple[int, ...] = (64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
  feature_buckets: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
  video_dim: int | None = None  # expected feature widths (None: the first record with rows sets them)
  audio_dim: int | None = None
  max_subtitle_chars: int = schema.DEFAULT_MAX_SUBTITLE_CHARS
  label_vocab: tuple[str, ...] | None = None  # closed label list: multi-hot labels; every label must be in it
  # Open vocabulary (no label_vocab): a record scored on its open set alone must have a word that maps through
  # the emotion wheels of this format version (metrics.md §1), else it is a bad record.
  check_label_wheels: bool = True
  wheel_format: str = "2025"
  question: str = prompts.DEFAULT_QUESTION
  feature_dtype: str = "float16"
  on_bad_record: str = "raise"
  worker_count: int = 0  # > 0: multiprocess prefetch (needs absl flags parsed; done here if not)
  worker_buffer_size: int = 2
  read_threads: int = 2
  prefetch_buffer: int = 8

  def validate(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r}; expected one of {KINDS}")
    if self.mode not in prompts.MODES or not set(self.sft_modes) <= set(prompts.MODES) or not self.sft_modes:
      raise ValueError(f"modes must come from {prompts.MODES}: mode={self.mode!r}, sft_modes={self.sft_modes}")
    if self.batch_size < 1 or not 0 <= self.shard_index < self.shard_count:
      raise ValueError(f"bad batch/shard: batch_size={self.batch_size}, shard {self.shard_index}/{self.shard_count}")
    if self.on_bad_record not in schema.ON_BAD_RECORD:
      raise ValueError(f"on_bad_record={self.on_bad_record!r}; expected one of {schema.ON_BAD_RECORD}")
    for name in ("prompt_buckets", "feature_buckets"):
      b = getattr(self, name)
      if not b or list(b) != sorted(set(b)) or b[0] < 1:
        raise ValueError(f"{name}={b} must be strictly increasing positive ints")
