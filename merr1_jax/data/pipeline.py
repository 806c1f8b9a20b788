"""Grain input pipelines for SFT, RL and evaluation: which examples, in what order, on which process, batched how.
numpy only (no jax), so worker processes start fast.

This module holds the assembly: record source -> (skip policy: one validating scan) -> per-process shard of the
record indices (`shard_records`) -> examples -> seeded shuffle and repeat -> `MakeExample` -> batches padded to
length buckets (`Collate`) -> iterator. The transforms, the batch keys (a shape legend) and the record checks are
in data/transforms.py, the config and the record sources in data/spec.py (re-exported here). `it.get_state()` and
`it.set_state(s)` on a fresh iterator resume exactly, with or without workers. `on_bad_record` is "raise" (a
`BadRecordError` naming the file and record) or "skip" (decided up front, the same on every process); sharding
drops no record. Details: docs/data.md, "6. Input pipelines".
"""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from merr1_jax.data import schema, transforms
from merr1_jax.data.spec import KINDS, BytesSource, PipelineConfig, RecordSource  # noqa: F401 (re-exported)

_log = logging.getLogger(__name__)


def shard_records(records: np.ndarray, shard_index: int, shard_count: int, *, fill: str) -> tuple[np.ndarray, int]:
  """This process's share of `records` (dealt round-robin) and how many rows were added to even the shares out.

  Every share has ceil(n / shard_count) rows, so all processes run the same number of steps. fill="pad" tops
  the short shares up with PAD_INDEX rows (masked in the batch): every record appears exactly once over all
  shares (eval). fill="wrap" tops them up with records from the start of the list: every record appears at
  least once, with fewer than shard_count extra rows over all shares (training). Nothing is dropped either way.
  """
  if fill not in ("pad", "wrap"):
    raise ValueError(f"fill={fill!r}; expected 'pad' or 'wrap'")
  n = len(records)
  per = -(-n // shard_count)
  if fill == "pad" or n == 0:
    extended = np.concatenate([records, np.full(per * shard_count - n, transforms.PAD_INDEX, records.dtype)])
  else:
    extended = np.resize(records, per * shard_count)  # cyclic: the first records get a second row
  n_fill = int((np.arange(shard_index, per * shard_count, shard_count) >= n).sum())  # rows past the n records
  return extended[shard_index::shard_count], n_fill


def expand_modes(records: np.ndarray, n_modes: int) -> np.ndarray:
  """Record indices -> example indices r * n_modes + m, each record's modes side by side (padding stays pad)."""
  ex = (records[:, None] * n_modes + np.arange(n_modes)[None, :]).reshape(-1)
  return np.where(np.repeat(records, n_modes) == transforms.PAD_INDEX, transforms.PAD_INDEX, ex)


@dataclasses.dataclass
class Pipeline:
  dataset: grain.IterDataset  # iter(dataset) -> batches; the iterator has get_state/set_state
  bad: schema.BadRecordLog  # skipped records (on_bad_record="skip"); count 0 under "raise"
  n_examples: int  # examples in this process's shard for one epoch (padding rows excluded)
  steps_per_epoch: int
  n_padding: int = 0  # masked eval rows added to this shard so all shards are equally long
  n_repeated: int = 0  # training examples added to this shard (records seen twice per epoch), same reason
  n_dropped: int = 0  # examples lost to the last partial batch (finite num_epochs with drop_remainder)

  def __iter__(self):
    return iter(self.dataset)


def scan(make: transforms.MakeExample, policy: str, log: schema.BadRecordLog) -> np.ndarray:
  """The RECORD indices to use: all of them under 'raise' (errors surface lazily, naming the record), or
  under 'skip' those of the records whose examples all build; each bad record is counted and logged once."""
  n = make.n_modes
  if policy == "raise":
    return np.arange(len(make.source), dtype=np.int64)
  good = []
  for r in range(len(make.source)):
    try:
      for m in range(n):  # A record is all-or-nothing, so SFT modes stay balanced.
        make(r * n + m)
    except schema.BadRecordError as err:
      log.add(err)
    else:
      good.append(r)
  return np.asarray(good, np.int64)


def build(source: RecordSource, tokenizer, cfg: PipelineConfig) -> Pipeline:
  """The Grain pipeline for `cfg.kind` over `source` (batch layout: the docstring of data/transforms.py)."""
  cfg.validate()
  make = transforms.MakeExample(source, tokenizer, cfg, dims=transforms.reference_dims(source, cfg))
  bad = schema.BadRecordLog()
  records = scan(make, cfg.on_bad_record, bad)
  if bad.count:
    _log.warning("pipeline over %d records: %s", len(source), bad.summary())
  mine_records, n_fill = shard_records(records, cfg.shard_index, cfg.shard_count,
                                       fill="wrap" if cfg.drop_remainder else "pad")
  mine = expand_modes(mine_records, make.n_modes)
  n_fill *= make.n_modes
  if n_fill:
    what = "repeated records" if cfg.drop_remainder else "masked padding rows"
    _log.info("shard %d/%d: %d records do not divide over %d processes; %d %s added to this shard",
              cfg.shard_index, cfg.shard_count, len(records), cfg.shard_count, n_fill, what)
  ds = grain.MapDataset.source(mine)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  if cfg.num_epochs != 1:
    ds = ds.repeat(cfg.num_epochs)
  ds = ds.map(make).batch(cfg.batch_size, drop_remainder=cfg.drop_remainder,
                          batch_fn=transforms.Collate(cfg, tokenizer.pad_id))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=cfg.prefetch_buffer))
  if cfg.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain with workers needs absl flags parsed (outside app.run).
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                           per_worker_buffer_size=cfg.worker_buffer_size))
  n_real = int((mine != transforms.PAD_INDEX).sum())
  steps = len(mine) // cfg.batch_size if cfg.drop_remainder else -(-len(mine) // cfg.batch_size)
  n_dropped = 0
  if cfg.drop_remainder and cfg.num_epochs is not None:
    n_dropped = (len(mine) * cfg.num_epochs) % cfg.batch_size
    if n_dropped:
      _log.info("shard %d/%d: drop_remainder drops the last %d examples of %d epoch(s)", cfg.shard_index,
                cfg.shard_count, n_dropped, cfg.num_epochs)
  return Pipeline(dataset=it_ds, bad=bad, n_examples=n_real, steps_per_epoch=steps,
                  n_padding=0 if cfg.drop_remainder else n_fill, n_repeated=n_fill if cfg.drop_remainder else 0,
                  n_dropped=n_dropped)
