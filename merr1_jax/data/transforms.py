"""The per-example and per-batch transforms of the Grain input pipelines (pipeline.py): `MakeExample` turns an
example index into one unpadded example (decode the record, check it, render the chat prompt, tokenise) and
`Collate` pads a list of examples into one batch dict. numpy only (no jax), importable and picklable, because
Grain worker processes run them. Example index r * n_modes + m is record r in mode m; `PAD_INDEX` (-1) is an eval
padding row, collated at the end of the batch as a masked row. Details (example indices, prompts, the record
checks): docs/data.md, "6. Input pipelines".

Batch keys (numpy; B = batch_size; Lp, L, Tv, Ta are bucket lengths; C = len(label_vocab)):

  all kinds   ids [B] str            example_mask [B] bool (False on eval padding rows)
              video [B, Tv, Dv]      video_mask [B, Tv] bool      (feature rows, zero padded at the end)
              audio [B, Ta, Da]      audio_mask [B, Ta] bool
              openset [B] object (tuple of str)   onehot [B] str ('' = none)   valence [B] float32 (NaN = none)
              label_multihot [B, C] bool          (only with a closed label_vocab, e.g. MER-Synth; every
                                                   open-set word is in the vocab, the record check makes sure)
  eval, rl    prompt_tokens [B, Lp] int32  LEFT-padded with pad_id, so every prompt ends at column Lp-1
              prompt_mask [B, Lp] bool     positions [B, Lp] int32 (0 at the first real token, 0 on padding)
              mrope_positions [B, Lp, 3] int32   (only when every record carries precomputed position_ids;
                                                 batch-major, transposed from the records' [3, L])
  rl          fast_prompt_tokens / fast_prompt_mask / fast_positions: the same prompts in fast mode (the
              slow prompt + FAST_PREFIX), for fast rollouts and the fast teacher-forcing pass.
  eval        mode [B] str: the prompt mode.
  sft         tokens [B, L] int32: prompt + demo completion + EOS, RIGHT-padded with pad_id
              input_mask [B, L] bool   positions [B, L] int32
              loss_mask [B, L] bool: True on assistant tokens written by the model (completion + EOS), so the
                loss at column t is that of predicting tokens[t] from tokens[:t]; prompt, FAST_PREFIX and
                padding carry no loss.
              prompt_len [B] int32   mode [B] str ('slow' | 'fast'): each record gives one example per mode.
Every length is padded up to the smallest configured bucket that holds the batch's longest row (`bucket`), so
the model compiles one program per bucket, not per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from merr1_jax.data import schema
from merr1_jax.data.spec import PipelineConfig, RecordSource
from merr1_jax.task import prompts

PAD_INDEX = -1  # eval padding row: keeps every shard the same length without dropping records


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n (n must fit: the example transform rejects longer records first)."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


class WheelMaps:
  """word -> True when it maps to a cluster in at least one emotion wheel (level 1). Picklable: the tables
  load lazily in each process."""

  def __init__(self, format_version: str = "2025"):
    self.format_version = format_version
    self._wheel = None

  def __getstate__(self):
    return {"format_version": self.format_version, "_wheel": None}  # the tables are not shipped to workers

  def __call__(self, word: str) -> bool:
    if self._wheel is None:
      from merr1_jax import emotion  # local: the data modules stay numpy-only at import
      self._wheel = emotion.load(self.format_version)
      self._wheels = range(1, emotion.NUM_WHEELS + 1)
    return any(self._wheel.map_word(word, k) is not None for k in self._wheels)


@dataclasses.dataclass(frozen=True)
class ReferenceDims:
  """Feature widths every record must have: configured, or those of the first record with rows (`origin`)."""
  video: int | None = None
  audio: int | None = None
  origin: tuple[tuple[str, str], ...] = ()  # (modality, "record ID at WHERE") for inferred widths


def record_where(source: RecordSource, index: int, rec_id: str) -> str:
  """Where a decoded record is to be fixed: its source file when the source knows it (a prepared TFDS copy keeps
  each clip's `.rec` or label file: tfds_builders.TfdsSource.origin), else the source's own place for it."""
  origin = getattr(source, "origin", None)
  return origin(index, rec_id) if origin is not None else source.where(index)


def reference_dims(source: RecordSource, cfg: PipelineConfig) -> ReferenceDims:
  """The configured widths, else those of the first decodable record (in source order, over the whole source,
  so all processes agree) with rows of that modality. Undecodable records are passed over here; the record
  check reports them. Reads records until each unknown width is found (one, usually)."""
  dims = {"video": cfg.video_dim, "audio": cfg.audio_dim}
  origin = []
  for i in range(len(source) if None in dims.values() else 0):
    try:
      rec = schema.from_bytes(source.read(i), source=source.where(i), index=i)
    except schema.BadRecordError:
      continue
    for name in ("video", "audio"):
      x = getattr(rec, name)
      if dims[name] is None and x.ndim == 2 and x.shape[0]:
        dims[name] = int(x.shape[1])
        origin.append((name, f"record {rec.id!r} at {record_where(source, i, rec.id)}"))
    if None not in dims.values():
      break
  return ReferenceDims(video=dims["video"], audio=dims["audio"], origin=tuple(origin))


class MakeExample:
  """Index -> one example dict (unpadded). Importable and picklable, so Grain workers can run it."""

  def __init__(self, source: RecordSource, tokenizer, cfg: PipelineConfig, dims: ReferenceDims | None = None):
    self.source, self.tok, self.cfg = source, tokenizer, cfg
    self.dims = dims or ReferenceDims(video=cfg.video_dim, audio=cfg.audio_dim)
    self.video_id = tokenizer.id_of(prompts.VIDEO_TOKEN)
    self.audio_id = tokenizer.id_of(prompts.AUDIO_TOKEN)
    self.n_modes = len(cfg.sft_modes) if cfg.kind == "sft" else 1
    self.vocab = None if cfg.label_vocab is None else frozenset(cfg.label_vocab)
    self.wheel_maps = WheelMaps(cfg.wheel_format) if self.vocab is None and cfg.check_label_wheels else None

  def __len__(self) -> int:
    return len(self.source) * self.n_modes

  def record(self, index: int) -> schema.ClipRecord:
    rec = schema.from_bytes(self.source.read(index), source=self.source.where(index), index=index)
    where = record_where(self.source, index, rec.id)
    bad = lambda field, why: schema.BadRecordError(why, source=where, record=rec.id, field=field)  # noqa: E731
    # Records scored by HIT or WAF carry a one-hot label or a valence; only open-set-only records need a word
    # that the wheels map (a one-hot set's "neutral" maps nowhere, and that is its metric's business).
    open_set_only = rec.onehot is None and rec.valence is None
    schema.check(rec, video_dim=self.cfg.video_dim, audio_dim=self.cfg.audio_dim,
                 max_subtitle_chars=self.cfg.max_subtitle_chars,
                 maps_word=self.wheel_maps if open_set_only else None, source=where)
    if self.vocab is not None:
      outside = [w for w in rec.openset if w not in self.vocab]
      if outside:  # label_multihot has no column for them: an error, never a silently dropped label
        raise bad("openset", f"label words {outside} are not in the closed label_vocab")
    inferred = dict(self.dims.origin)
    for name in ("video", "audio"):
      x, want = getattr(rec, name), getattr(self.dims, name)
      if want is not None and x.shape[0] and x.shape[1] != want:
        by = f"the width of {inferred[name]}" if name in inferred else "the configured width"
        raise bad(name, f"feature dim {x.shape[1]} differs from {want}, {by}: one batch cannot hold both")
    longest = self.cfg.feature_buckets[-1]
    for name, n in (("video", rec.n_video), ("audio", rec.n_audio)):
      if n > longest:
        raise bad(name, f"{n} rows exceed the largest feature bucket {longest}")
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
    if index == PAD_INDEX:
      return {"pad": True}
    rec_index, mode_index = divmod(index, self.n_modes)
    rec = self.record(rec_index)
    where = record_where(self.source, rec_index, rec.id)
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
    if self.cfg.kind != "sft" and rec.position_ids is not None and rec.position_ids.shape[1] > len(ex["prompt"]):
      # The ids are placed on the prompt tokens (tokens past them continue as text): more ids than tokens means
      # the record was preprocessed with another template or tokenizer.
      raise schema.BadRecordError(f"position_ids cover {rec.position_ids.shape[1]} tokens, the prompt has "
                                  f"{len(ex['prompt'])}", source=where, record=rec.id, field="position_ids")
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
  """[B, L, 3] M-RoPE ids placed on the real tokens; tokens past the precomputed ids continue as text. Records
  store them [3, L] (transformers' layout); batches are batch-major like every other array."""
  if not recs or any(r.position_ids is None for r in recs):
    return None
  out = np.zeros(masks.shape + (3,), np.int32)
  for i, (rec, m) in enumerate(zip(recs, masks)):
    cols = np.flatnonzero(m)
    p = rec.position_ids
    if p.shape[1] > len(cols):  # MakeExample checks this per record; kept as a guard for direct callers
      raise schema.BadRecordError(f"position_ids cover {p.shape[1]} tokens, the prompt has {len(cols)}",
                                  source="batch", record=rec.id, field="position_ids")
    extra = np.arange(1, len(cols) - p.shape[1] + 1, dtype=np.int32) + (p.max() if p.size else -1)
    out[i, cols] = np.concatenate([p, np.broadcast_to(extra, (3, len(extra)))], axis=1).T
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
      if len(dims) > 1:  # MakeExample checks widths per record; kept as a guard for direct callers
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
        outside = [w for w in r.openset if w not in col]
        if outside:  # MakeExample rejects these records first; never drop a label silently
          raise schema.BadRecordError(f"label words {outside} are not in the closed label_vocab", source="batch",
                                      record=r.id, field="openset")
        multihot[i, [col[w] for w in r.openset]] = True
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
          batch["mrope_positions"] = np.pad(mrope, ((0, n_pad), (0, 0), (0, 0)))
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
