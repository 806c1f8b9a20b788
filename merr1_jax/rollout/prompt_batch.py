"""Host-side prompt batches for the sampler and the scorer: special ids, the fast prefix, buckets, checks.

Everything here runs on numpy before anything is jitted, so bad input fails with a clear message naming the
field instead of a shape error inside a compiled program:
  * `SpecialIds` reads, once per tokenizer, the ids the rollouts need (EOS, pad, the think/answer tags, the
    separators an answer's emotion words are split on) and `AnchorSpec` where the calibration reads log-mass.
  * `prepare_prompts` checks a left-padded prompt batch, appends FAST_PREFIX (`<think></think><answer>`) in fast
    mode and cuts/pads it to the smallest bucket that holds its longest row, so a run compiles a handful of
    programs, one per bucket.
  * `check_ids`, `check_cache_length` and `check_prompt_rows` are the checks both the sampler and the scorer run.

Shape legend: P prompts, L prompt bucket, N prefix tokens. Positions are [P, L] (1-D RoPE) or [P, L, 3] (M-RoPE
t/h/w ids), batch-major like every batch array (models/base.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from merr1_jax.models import base
from merr1_jax.task import prompts

PROMPT_BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
COMPLETION_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
  """Where the scorer reads category log-mass: rl.answer_anchors arguments (hashable, a static jit argument)."""

  answer_open: int
  separators: tuple[int, ...]
  answer_close: int
  num_anchors: int


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The token ids the sampler and the scorer need, read once from a tokenizer (`from_tokenizer`)."""

  eos: int
  pad: int
  fast_prefix: tuple[int, ...]
  think: tuple[int, int]  # <think>, </think>
  answer_open: int
  answer_close: int
  separators: tuple[int, ...]  # tokens made only of answer separators (method.md parsing) and spaces

  @classmethod
  def from_tokenizer(cls, tok) -> "SpecialIds":
    seps = []
    for i in range(tok.vocab_size):
      text = tok.decode([i])
      if set(text) & set(",;\n\uff0c\uff1b") and set(text) <= set(",;\n\uff0c\uff1b \t"):
        seps.append(i)
    return cls(eos=tok.eos_id, pad=tok.pad_id, fast_prefix=tuple(tok.encode(prompts.FAST_PREFIX)),
               think=(tok.id_of(prompts.THINK_OPEN), tok.id_of(prompts.THINK_CLOSE)),
               answer_open=tok.id_of(prompts.ANSWER_OPEN), answer_close=tok.id_of(prompts.ANSWER_CLOSE),
               separators=tuple(seps))

  def sample_kwargs(self, mode: str) -> dict[str, Any]:
    """stop/ban/prefix ids for `sample` in `mode`: fast stops at </answer> too and may not open a think block."""
    prompts._check_mode(mode)
    fast = mode == "fast"
    return dict(stop_ids=(self.eos, self.answer_close) if fast else (self.eos,), eos_id=self.eos,
                ban_ids=self.think if fast else (), fast_prefix_ids=self.fast_prefix, pad_id=self.pad)

  def anchors(self, num_anchors: int) -> AnchorSpec:
    return AnchorSpec(self.answer_open, self.separators, self.answer_close, num_anchors)


def _xp(a):
  return np if isinstance(a, np.ndarray) else jnp


def next_positions(positions, mask_BxL):
  """Position of the token after each row's prompt: max real position + 1 (all 3 M-RoPE axes continue as
  text from there, the Qwen2-VL rule); 0 for a row with no real token. numpy or jax arrays."""
  xp = _xp(mask_BxL)
  pos_BxLxA = positions if positions.ndim == 3 else positions[..., None]
  return xp.max(xp.where(mask_BxL[..., None], pos_BxLxA, -1), axis=(1, 2)).astype(xp.int32) + 1


def text_positions(start_B, length: int, like):
  """[B, length] positions start, start + 1, ... ([B, length, 3] when `like` holds M-RoPE ids: text after a
  prompt continues on all three axes)."""
  xp = _xp(start_B)
  pos_BxN = start_B[:, None] + xp.arange(length, dtype=xp.int32)[None]
  return xp.broadcast_to(pos_BxN[..., None], (*pos_BxN.shape, 3)) if like.ndim == 3 else pos_BxN


def append_fast_prefix(inputs: base.ModelInputs, prefix_ids: Sequence[int]) -> base.ModelInputs:
  """Appends `prefix_ids` after every left-padded prompt, with positions continuing each row (1-D or 3-D).

  Left padding keeps every prompt ending at the last column, so the prefix is the same new columns for all rows.
  Works on numpy (host) or jax arrays; features are untouched (the prefix holds no placeholder).
  """
  xp = _xp(inputs.tokens)
  n, (b, _) = len(prefix_ids), inputs.tokens.shape
  new_pos = text_positions(next_positions(inputs.positions, inputs.mask), n, inputs.positions)
  return inputs.replace(
      tokens=xp.concatenate([inputs.tokens, xp.broadcast_to(xp.asarray(prefix_ids, xp.int32), (b, n))], 1),
      positions=xp.concatenate([inputs.positions, new_pos.astype(inputs.positions.dtype)], 1),
      mask=xp.concatenate([inputs.mask.astype(bool), xp.ones((b, n), bool)], 1))


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"{what} of {n} tokens is longer than the largest bucket {max(buckets)}; raise the buckets "
                   "(never truncated silently)")


def check_ids(ids: Sequence[int], vocab_size: int, what: str) -> tuple[int, ...]:
  ids = tuple(int(i) for i in ids)
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"{what} {bad} outside the vocabulary [0, {vocab_size})")
  return ids


def check_prompt_rows(tokens: np.ndarray, mask: np.ndarray, vocab_size: int, what: str) -> None:
  """Left padding (every prompt ends at the last column) and in-vocabulary ids on the real tokens."""
  steps = np.diff(mask.astype(np.int8), axis=1) < 0
  if steps.any():
    raise ValueError(f"{what}.mask rows {np.nonzero(steps.any(1))[0][:8].tolist()} are not left-padded (a real token "
                     "follows padding); the sampler needs every prompt to end at the last column")
  bad = ((tokens < 0) | (tokens >= vocab_size)) & mask
  if bad.any():
    raise ValueError(f"{what}.tokens holds ids outside the vocabulary [0, {vocab_size}): "
                     f"{np.unique(tokens[bad])[:8].tolist()} in rows {np.nonzero(bad.any(1))[0][:8].tolist()}")


def check_cache_length(model, prompt_len: int, new_len: int, max_cache_len: int | None, what: str) -> int:
  """prompt bucket + completion length must fit the cache (max_cache_len, default model.config.max_seq_len)."""
  limit = max_cache_len if max_cache_len is not None else getattr(model.config, "max_seq_len", None)
  if limit is not None and prompt_len + new_len > limit:
    raise ValueError(f"prompt bucket {prompt_len} + {what} {new_len} = {prompt_len + new_len} exceeds the cache "
                     f"length {limit} (max_cache_len / model.config.max_seq_len)")
  return prompt_len + new_len


def _ends_with(tokens_BxL: np.ndarray, ids: Sequence[int]) -> np.ndarray:
  n = len(ids)
  return np.all(tokens_BxL[:, tokens_BxL.shape[1] - n:] == np.asarray(ids)[None], axis=1)


def _with_fast_prefix(inputs: base.ModelInputs, mode: str, fast_prefix_ids: Sequence[int] | None,
                      vocab_size: int) -> base.ModelInputs:
  """Fast mode: keep rows that already end with the prefix (the pipeline's fast_prompt_tokens), else append it;
  slow mode refuses rows ending with it."""
  if not fast_prefix_ids:
    if mode == "fast":
      raise ValueError("mode='fast' needs fast_prefix_ids (SpecialIds.sample_kwargs gives them)")
    return inputs
  check_ids(fast_prefix_ids, vocab_size, "fast_prefix_ids")
  has = _ends_with(inputs.tokens, fast_prefix_ids) & inputs.mask[:, -1]
  real = inputs.mask.any(1)  # empty rows (eval batch padding) follow the others
  if mode == "slow" and has.any():
    raise ValueError(f"mode='slow' but prompt rows {np.nonzero(has)[0][:8].tolist()} end with the fast prefix")
  if mode == "fast" and has.any() and not has[real].all():
    raise ValueError(f"mode='fast': rows {np.nonzero(has)[0][:8].tolist()} already end with the fast prefix and "
                     f"rows {np.nonzero(real & ~has)[0][:8].tolist()} do not; render the batch in one mode")
  return append_fast_prefix(inputs, fast_prefix_ids) if mode == "fast" and not has.any() else inputs


def prepare_prompts(inputs: base.ModelInputs, *, mode: str, vocab_size: int,
                    fast_prefix_ids: Sequence[int] | None = None, pad_id: int = 0,
                    buckets: Sequence[int] = PROMPT_BUCKETS) -> base.ModelInputs:
  """Host-side: checks a left-padded prompt batch, adds FAST_PREFIX where needed, cuts/pads it to a bucket.

  Fast mode accepts prompts rendered in either mode: rows already ending with `fast_prefix_ids` (the pipeline's
  fast_prompt_tokens) are kept, slow rows get the prefix appended; a batch mixing both is refused. Slow mode
  refuses prompts that end with the fast prefix. Raises ValueError naming the field on any bad input.
  """
  prompts._check_mode(mode)
  tokens, mask = np.asarray(inputs.tokens), np.asarray(inputs.mask).astype(bool)
  positions = np.asarray(inputs.positions)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(f"inputs.tokens {tokens.shape} and inputs.mask {mask.shape} must both be [P, L]")
  if positions.shape not in (tokens.shape, (*tokens.shape, 3)):
    raise ValueError(f"inputs.positions {positions.shape} must be [P, L] or [P, L, 3] for tokens {tokens.shape}")
  check_prompt_rows(tokens, mask, vocab_size, "inputs")
  inputs = inputs.replace(tokens=tokens.astype(np.int32), positions=positions.astype(np.int32), mask=mask)
  inputs = _with_fast_prefix(inputs, mode, fast_prefix_ids, vocab_size)
  real = int(inputs.mask.sum(1).max(initial=0))
  length = bucket(real, buckets, "prompt")
  have = inputs.tokens.shape[1]
  if have >= length:  # only padding columns are cut: every real token sits in the last `real` columns
    cut = lambda a, v: a[:, have - length:]
  else:
    cut = lambda a, v: np.pad(a, [(0, 0), (length - have, 0)] + [(0, 0)] * (a.ndim - 2), constant_values=v)
  return inputs.replace(tokens=cut(inputs.tokens, pad_id), positions=cut(inputs.positions, 0),
                        mask=cut(inputs.mask, False))


def batch_inputs(batch: Mapping[str, np.ndarray], mode: str = "slow") -> base.ModelInputs:
  """ModelInputs from a data-pipeline RL/eval batch (docs/data.md keys) for prompts rendered in `mode`.

  M-RoPE batches carry 3-D positions for the slow prompt only: take mode='slow' and let `sample` append the
  fast prefix (pass mode='fast' to `sample`).
  """
  prompts._check_mode(mode)
  pre = "fast_" if mode == "fast" else ""
  if mode == "fast" and "mrope_positions" in batch:
    raise ValueError("this batch has M-RoPE positions for slow prompts only: use batch_inputs(batch, 'slow') "
                     "with sample(mode='fast')")
  feats = {k: batch.get(k) for k in ("video", "video_mask", "audio", "audio_mask")}
  positions = batch[f"{pre}positions"] if pre else batch.get("mrope_positions", batch["positions"])
  return base.ModelInputs(tokens=batch[f"{pre}prompt_tokens"], mask=batch[f"{pre}prompt_mask"],
                          positions=positions, **feats)
