"""Grain input pipelines for SFT, RL and evaluation. numpy only (no jax), so worker processes start fast.

Steps, in order: a random-access record source -> (skip policy: one validating scan) -> per-process shard of
the record indices -> seeded shuffle and repeat -> per-example transform (decode, check, render the chat prompt,
tokenise) -> batching with padding to length buckets -> `to_iter_dataset` -> optional multiprocess prefetch.
Everything before the iterator is a `grain.MapDataset`, so the iterator state is a small position: save it with
`it.get_state()` (or `grain.checkpoint.CheckpointSave(it)` inside an orbax composite) and `it.set_state(s)` on
a fresh iterator resumes with exactly the batches that would have followed, with or without workers.

Batch keys (numpy; B = batch_size; Lp, L, Tv, Ta are bucket lengths; C = len(label_vocab)):

  all kinds   ids [B] str            example_mask [B] bool (False on eval padding rows)
              video [B, Tv, Dv]      video_mask [B, Tv] bool      (feature rows, zero padded at the end)
              audio [B, Ta, Da]      audio_mask [B, Ta] bool
              openset [B] object (tuple of str)   onehot [B] str ('' = none)   valence [B] float32 (NaN = none)
              label_multihot [B, C] bool          (only with a closed label_vocab, e.g. MER-Synth)
  eval, rl    prompt_tokens [B, Lp] int32  LEFT-padded with pad_id, so every prompt ends at column Lp-1
              prompt_mask [B, Lp] bool     positions [B, Lp] int32 (0 at the first real token, 0 on padding)
              mrope_positions [3, B, Lp] int32   (only when every record carries precomputed position_ids)
  rl          fast_prompt_tokens / fast_prompt_mask / fast_positions: the same prompts in fast mode (the
              slow prompt + FAST_PREFIX), for fast rollouts and the fast teacher-forcing pass.
  eval        mode [B] str: the prompt mode.
  sft         tokens [B, L] int32: prompt + demo completion + EOS, RIGHT-padded with pad_id
              input_mask [B, L] bool   positions [B, L] int32
              loss_mask [B, L] bool: True on assistant tokens written by the model (completion + EOS), so the
                loss at column t is that of predicting tokens[t] from tokens[:t]; prompt, FAST_PREFIX and
                padding carry no loss.
              prompt_len [B] int32   mode [B] str ('slow' | 'fast'): each record gives one example per mode.

Prompts: `prompts.render_prompt` with the record's `media_layout` (None: video block then audio block; a runs
string such as "V8A50V8A50": Omni's interleaved block). Either way the k-th VIDEO/AUDIO placeholder of a row
takes its k-th feature row in the model's merge, so `video`/`audio` are never reordered.

Bad records: `on_bad_record="raise"` fails on the first bad record with a `BadRecordError` naming the file and
record. `"skip"` validates every record once, up front, in this process (the same decode/check/render/tokenise
that the workers run), leaves the bad ones out of the index list and counts them in `Pipeline.bad` (a
`schema.BadRecordLog`, which also logs each one). Skips are thus decided before sharding and identical on all
processes, so the shards stay disjoint and equal in size.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol, Sequence

import grain
import numpy as np

from merr1_jax import prompts
from merr1_jax.data import schema

KINDS = ("sft", "rl", "eval")
_log = logging.getLogger(__name__)
_PAD_INDEX = -1  # eval padding row: keeps every shard the same length without dropping records


class RecordSource(Protocol):
  """Random access to serialised records. `read` raises BadRecordError naming the file on a bad read."""

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
  video_dim: int | None = None  # expected feature widths (None: not checked, but a batch must agree)
  audio_dim: int | None = None
  max_subtitle_chars: int = schema.DEFAULT_MAX_SUBTITLE_CHARS
  label_vocab: tuple[str, ...] | None = None  # closed label list: multi-hot labels, and labels must map into it
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


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (n must fit: the example transform rejects longer records first)."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


class MakeExample:
  """Index -> one example dict (unpadded). Importable and picklable, so Grain workers can run it."""

  def __init__(self, source: RecordSource, tokenizer, cfg: PipelineConfig):
    self.source, self.tok, self.cfg = source, tokenizer, cfg
    self.video_id = tokenizer.id_of(prompts.VIDEO_TOKEN)
    self.audio_id = tokenizer.id_of(prompts.AUDIO_TOKEN)
    self.n_modes = len(cfg.sft_modes) if cfg.kind == "sft" else 1
    vocab = cfg.label_vocab
    self.maps_word = None if vocab is None else frozenset(vocab).__contains__

  def __len__(self) -> int:
    return len(self.source) * self.n_modes

  def record(self, index: int) -> schema.ClipRecord:
    where = self.source.where(index)
    rec = schema.from_bytes(self.source.read(index), source=where, index=index)
    schema.check(rec, video_dim=self.cfg.video_dim, audio_dim=self.cfg.audio_dim,
                 max_subtitle_chars=self.cfg.max_subtitle_chars, maps_word=self.maps_word, source=where)
    longest = self.cfg.feature_buckets[-1]
    for name, n in (("video", rec.n_video), ("audio", rec.n_audio)):
      if n > longest:
        raise schema.BadRecordError(f"{n} rows exceed the largest feature bucket {longest}", source=where,
                                    record=rec.id, field=name)
    return rec

  def _prompt(self, rec: schema.ClipRecord, mode: str, where: str) -> np.ndarray:
    try:
      # An interleaved record (Omni's use_audio_in_video) carries its placeholder runs: its prompt, and thus its
      # precomputed position ids, only line up with the features when rendered in that order.
      text = prompts.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, mode, question=self.cfg.question,
                                   media_runs=rec.media_layout)
    except ValueError as e:  # e.g. a template marker inside the subtitle, or runs that miscount the rows
      field = "media_layout" if "media_runs" in str(e) else "subtitle"
      raise schema.BadRecordError(str(e), source=where, record=rec.id, field=field) from e
    ids = np.asarray(self.tok.encode(text), np.int32)
    # One id per feature row is the contract with the model's feature merge; check it, do not assume it.
    if (ids == self.video_id).sum() != rec.n_video or (ids == self.audio_id).sum() != rec.n_audio:
      raise schema.BadRecordError("placeholder count differs from the feature rows after tokenisation",
                                  source=where, record=rec.id, field="subtitle")
    return ids

  def _fits(self, n: int, rec, where: str, what: str) -> None:
    if n > self.cfg.prompt_buckets[-1]:
      raise schema.BadRecordError(f"{what} of {n} tokens exceeds the largest bucket {self.cfg.prompt_buckets[-1]}",
                                  source=where, record=rec.id, field="subtitle")

  def __call__(self, index) -> dict:
    index = int(index)
    if index == _PAD_INDEX:
      return {"pad": True}
    rec_index, mode_index = divmod(index, self.n_modes)
    rec = self.record(rec_index)
    where = self.source.where(rec_index)
    ex = {"pad": False, "rec": rec}
    if self.cfg.kind == "sft":
      mode = self.cfg.sft_modes[mode_index]
      demo = rec.demo_slow if mode == "slow" else rec.demo_fast
      if not demo:
        raise schema.BadRecordError(f"no {mode} demonstration for SFT", source=where, record=rec.id,
                                    field=f"demo_{mode}")
      prompt = self._prompt(rec, mode, where)
      completion = np.asarray(self.tok.encode(demo) + [self.tok.eos_id], np.int32)
      ex.update(mode=mode, prompt=prompt, completion=completion)
      self._fits(len(prompt) + len(completion), rec, where, "sequence")
    elif self.cfg.kind == "rl":
      ex.update(prompt=self._prompt(rec, "slow", where), fast_prompt=self._prompt(rec, "fast", where))
      self._fits(len(ex["fast_prompt"]), rec, where, "prompt")
    else:
      ex.update(mode=self.cfg.mode, prompt=self._prompt(rec, self.cfg.mode, where))
      self._fits(len(ex["prompt"]), rec, where, "prompt")
    return ex


def _pad_rows(xs: list[np.ndarray], length: int, dim: int, dtype) -> tuple[np.ndarray, np.ndarray]:
  out = np.zeros((len(xs), length, dim), dtype)
  mask = np.zeros((len(xs), length), bool)
  for i, x in enumerate(xs):
    out[i, :len(x)] = x
    mask[i, :len(x)] = True
  return out, mask


def _left_pad(seqs: list[np.ndarray], length: int, pad_id: int):
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s):
      tokens[i, length - len(s):] = s
      mask[i, length - len(s):] = True
  positions = np.maximum(np.cumsum(mask, axis=1, dtype=np.int32) - 1, 0)
  return tokens, mask, positions


def _mrope(recs, masks: np.ndarray) -> np.ndarray | None:
  """[3, B, L] M-RoPE ids placed on the real tokens; tokens past the precomputed ids continue as text."""
  if not recs or any(r.position_ids is None for r in recs):
    return None
  out = np.zeros((3,) + masks.shape, np.int32)
  for i, (rec, m) in enumerate(zip(recs, masks)):
    cols = np.flatnonzero(m)
    p = rec.position_ids
    if p.shape[1] > len(cols):
      raise schema.BadRecordError(f"position_ids cover {p.shape[1]} tokens, the prompt has {len(cols)}",
                                  record=rec.id, field="position_ids")
    extra = np.arange(1, len(cols) - p.shape[1] + 1, dtype=np.int32) + (p.max() if p.size else -1)
    out[:, i, cols] = np.concatenate([p, np.broadcast_to(extra, (3, len(extra)))], axis=1)
  return out


class Collate:
  """List of examples -> one padded batch dict (see the module docstring). Importable, for Grain workers."""

  def __init__(self, cfg: PipelineConfig, pad_id: int):
    self.cfg, self.pad_id = cfg, pad_id

  def __call__(self, examples: Sequence[dict]) -> dict:
    cfg = self.cfg
    real = [e for e in examples if not e["pad"]]
    recs = [e["rec"] for e in real]
    n_pad = cfg.batch_size - len(real)  # padding rows (eval shards, the last eval batch) go at the end
    dtype = np.dtype(cfg.feature_dtype)
    batch = {"ids": np.asarray([r.id for r in recs] + [""] * n_pad),
             "example_mask": np.asarray([True] * len(recs) + [False] * n_pad)}
    for name, want in (("video", cfg.video_dim), ("audio", cfg.audio_dim)):
      dims = {getattr(r, name).shape[1] for r in recs if getattr(r, name).shape[0]}
      if len(dims) > 1:
        raise schema.BadRecordError(f"feature widths {sorted(dims)} differ within one batch",
                                    source="batch", record=",".join(r.id for r in recs), field=name)
      dim = dims.pop() if dims else (want or 0)
      rows = [getattr(r, name) for r in recs] + [np.zeros((0, dim))] * n_pad
      length = bucket(max(len(x) for x in rows), cfg.feature_buckets)
      batch[name], batch[f"{name}_mask"] = _pad_rows(rows, length, dim, dtype)
    openset = np.empty(cfg.batch_size, object)
    openset[:] = [r.openset for r in recs] + [()] * n_pad
    batch["openset"] = openset
    batch["onehot"] = np.asarray([r.onehot or "" for r in recs] + [""] * n_pad)
    batch["valence"] = np.asarray([np.nan if r.valence is None else r.valence for r in recs] + [np.nan] * n_pad,
                                  np.float32)
    if cfg.label_vocab is not None:
      col = {w: j for j, w in enumerate(cfg.label_vocab)}
      multihot = np.zeros((cfg.batch_size, len(col)), bool)
      for i, r in enumerate(recs):
        multihot[i, [col[w] for w in r.openset if w in col]] = True
      batch["label_multihot"] = multihot
    if cfg.kind == "sft":
      self._sft(batch, real, n_pad)
    else:
      prefixes = (("", "prompt"), ("fast_", "fast_prompt")) if cfg.kind == "rl" else (("", "prompt"),)
      for prefix, key in prefixes:
        seqs = [e[key] for e in real] + [np.zeros(0, np.int32)] * n_pad
        tokens, mask, positions = _left_pad(seqs, bucket(max(map(len, seqs)), cfg.prompt_buckets), self.pad_id)
        batch.update({f"{prefix}prompt_tokens": tokens, f"{prefix}prompt_mask": mask, f"{prefix}positions": positions})
        if prefix == "" and (mrope := _mrope(recs, mask[:len(recs)])) is not None:
          batch["mrope_positions"] = np.pad(mrope, ((0, 0), (0, n_pad), (0, 0)))
      if cfg.kind == "eval":
        batch["mode"] = np.asarray([cfg.mode] * cfg.batch_size)
    return batch

  def _sft(self, batch: dict, real: list[dict], n_pad: int) -> None:
    seqs = [np.concatenate([e["prompt"], e["completion"]]) for e in real]
    length = bucket(max([len(s) for s in seqs] + [1]), self.cfg.prompt_buckets)
    tokens = np.full((self.cfg.batch_size, length), self.pad_id, np.int32)
    input_mask = np.zeros(tokens.shape, bool)
    loss_mask = np.zeros(tokens.shape, bool)
    for i, (e, s) in enumerate(zip(real, seqs)):
      tokens[i, :len(s)] = s
      input_mask[i, :len(s)] = True
      loss_mask[i, len(e["prompt"]):len(s)] = True
    batch.update(tokens=tokens, input_mask=input_mask, loss_mask=loss_mask,
                 positions=np.maximum(np.cumsum(input_mask, axis=1, dtype=np.int32) - 1, 0),
                 prompt_len=np.asarray([len(e["prompt"]) for e in real] + [0] * n_pad, np.int32),
                 mode=np.asarray([e["mode"] for e in real] + [""] * n_pad))


def shard_indices(indices: np.ndarray, shard_index: int, shard_count: int, *, drop_remainder: bool) -> np.ndarray:
  """This process's disjoint, equal-sized share. Without drop_remainder the short shards are padded with
  _PAD_INDEX rows (masked in the batch), so every process runs the same number of eval steps."""
  per = len(indices) // shard_count if drop_remainder else -(-len(indices) // shard_count)
  mine = indices[shard_index::shard_count][:per]
  return np.concatenate([mine, np.full(per - len(mine), _PAD_INDEX, indices.dtype)])


@dataclasses.dataclass
class Pipeline:
  dataset: grain.IterDataset  # iter(dataset) -> batches; the iterator has get_state/set_state
  bad: schema.BadRecordLog  # skipped records (on_bad_record="skip"); count 0 under "raise"
  n_examples: int  # examples in this process's shard for one epoch (padding rows excluded)
  steps_per_epoch: int

  def __iter__(self):
    return iter(self.dataset)


def scan(make: MakeExample, policy: str, log: schema.BadRecordLog) -> np.ndarray:
  """The example indices to use: all of them under 'raise' (errors surface lazily, naming the record), or
  under 'skip' those of the records whose examples all build; each bad record is counted and logged once."""
  n = make.n_modes
  if policy == "raise":
    return np.arange(len(make), dtype=np.int64)
  good = []
  for r in range(len(make.source)):
    try:
      for m in range(n):  # A record is all-or-nothing, so SFT modes stay balanced.
        make(r * n + m)
    except schema.BadRecordError as err:
      log.add(err)
    else:
      good.extend(range(r * n, r * n + n))
  return np.asarray(good, np.int64)


def build(source: RecordSource, tokenizer, cfg: PipelineConfig) -> Pipeline:
  """The Grain pipeline for `cfg.kind` over `source` (see the module docstring for the batch layout)."""
  cfg.validate()
  make = MakeExample(source, tokenizer, cfg)
  bad = schema.BadRecordLog()
  indices = scan(make, cfg.on_bad_record, bad)
  if bad.count:
    _log.warning("pipeline over %d records: %s", len(source), bad.summary())
  mine = shard_indices(indices, cfg.shard_index, cfg.shard_count, drop_remainder=cfg.drop_remainder)
  ds = grain.MapDataset.source(mine)
  if cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  if cfg.num_epochs != 1:
    ds = ds.repeat(cfg.num_epochs)
  ds = ds.map(make).batch(cfg.batch_size, drop_remainder=cfg.drop_remainder,
                          batch_fn=Collate(cfg, tokenizer.pad_id))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                               prefetch_buffer_size=cfg.prefetch_buffer))
  if cfg.worker_count > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags (ecosystem.md pitfall 5).
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                           per_worker_buffer_size=cfg.worker_buffer_size))
  n_real = int((mine != _PAD_INDEX).sum())
  steps = len(mine) // cfg.batch_size if cfg.drop_remainder else -(-len(mine) // cfg.batch_size)
  return Pipeline(dataset=it_ds, bad=bad, n_examples=n_real, steps_per_epoch=steps)
