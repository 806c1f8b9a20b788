"""The scorer: teacher-forced log-probs of given completions, and the category log-mass at answer anchors.

`score` runs given completions through the same shared-prefix structure as the sampler, in one compiled program
and without gradient: the P prompts are prefilled once (rollout/shared_prefix.py), their cache repeated to the G rows of
each prompt, then the completions go through the decoder in one call. It returns per-token log-probs streamed
over the vocabulary (rl.token_logprobs) and, optionally, the category log-mass at the answer anchors (method.md
SFC steps 1-4). The RL step uses it for the reference and calibration passes.

Its input is checked on the host too (ids in the vocabulary, left-padded prompts, bucket + completion length
within the cache), so a hand-built `Sequences` fails with a clear error before compilation.

Shape legend: P prompts, G completions per prompt, B = P*G rows, L prompt bucket, T completion length, D d_model,
V vocab, A anchors, K wheels, C clusters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import rl, sharding
from merr1_jax.models import base
from merr1_jax.rollout import shared_prefix
from merr1_jax.rollout import prompt_batch
from merr1_jax.rollout.prompt_batch import COMPLETION_BUCKETS, PROMPT_BUCKETS, AnchorSpec


@flax.struct.dataclass
class Sequences:
  """Completions to score in a prompt's context (a sampler.Rollout has the same fields)."""

  prompt: base.ModelInputs  # P prompts, left-padded (prompt_batch.prepare_prompts)
  completion: jax.Array  # [B, T] int32
  completion_mask: jax.Array  # [B, T] bool
  num_samples: int = flax.struct.field(pytree_node=False, default=1)


def make_sequences(inputs: base.ModelInputs, completions: Sequence[Sequence[int]], *, mode: str, num_samples: int,
                   vocab_size: int, fast_prefix_ids: Sequence[int] | None = None, pad_id: int = 0,
                   buckets: Sequence[int] = PROMPT_BUCKETS,
                   completion_buckets: Sequence[int] = COMPLETION_BUCKETS) -> Sequences:
  """Host-side: P prompts plus B = P * num_samples token lists (e.g. a slow answer teacher-forced in the fast
  context, method.md SFC step 4), right-padded to a completion bucket."""
  prompt = prompt_batch.prepare_prompts(inputs, mode=mode, vocab_size=vocab_size, fast_prefix_ids=fast_prefix_ids,
                                        pad_id=pad_id, buckets=buckets)
  if len(completions) != prompt.tokens.shape[0] * num_samples:
    raise ValueError(f"{len(completions)} completions for {prompt.tokens.shape[0]} prompts x {num_samples} samples")
  t = prompt_batch.bucket(max([len(c) for c in completions] + [1]), completion_buckets, "completion")
  toks, mask = np.full((len(completions), t), pad_id, np.int32), np.zeros((len(completions), t), bool)
  for i, c in enumerate(completions):
    toks[i, :len(c)] = prompt_batch.check_ids(c, vocab_size, f"completion {i} token")
    mask[i, :len(c)] = True
  return Sequences(prompt=prompt, completion=toks, completion_mask=mask, num_samples=num_samples)


@flax.struct.dataclass
class Scores:
  logp: jax.Array  # [B, T] float32 log p(completion[t] | context), 0 off the mask
  entropy: jax.Array | None = None  # [B, T] float32 when asked for
  logmass: jax.Array | None = None  # [B, A, K, C] float32 category log-mass at the anchors (rl.category_logmass)
  anchor_mask: jax.Array | None = None  # [B, A] bool
  anchor_index: jax.Array | None = None  # [B, A] int32: anchor a predicts completion token anchor_index[b, a]


@dataclasses.dataclass(frozen=True)
class _ScoreSpec:
  num_samples: int
  chunk_size: int
  with_entropy: bool
  anchors: AnchorSpec | None
  layout: sharding.BatchLayout | None


def _anchor_logmass(spec: _ScoreSpec, prompt, completion_BxT, mask_BxT, h_pred_BxTxD, w_DxV, token_sets):
  """(logmass_BxAxKxC, anchor_mask_BxA, anchor_index_BxA) at the anchors of each completion (E3 steps 1-2)."""
  a, g = spec.anchors, spec.num_samples
  # The token sitting at each h_pred position (fast mode: <answer> is the prompt's last token).
  ctx_BxT = jnp.concatenate([jnp.repeat(prompt.tokens[:, -1:], g, 0), completion_BxT[:, :-1]], axis=1)
  ctx_mask = jnp.concatenate([jnp.repeat(prompt.mask[:, -1:], g, 0), mask_BxT[:, :-1]], axis=1)
  idx_BxA, amask_BxA = rl.answer_anchors(ctx_BxT, ctx_mask, a.answer_open, jnp.asarray(a.separators, jnp.int32),
                                         a.answer_close, a.num_anchors)
  h_BxAxD = jnp.take_along_axis(h_pred_BxTxD, idx_BxA[..., None], axis=1)
  logmass = rl.category_logmass_from_hidden(h_BxAxD, w_DxV, token_sets, chunk_size=spec.chunk_size)
  return logmass, amask_BxA, idx_BxA


def _score(model, spec: _ScoreSpec, params, prompt: base.ModelInputs, completion_BxT, mask_BxT, token_sets):
  t, length = completion_BxT.shape[1], prompt.tokens.shape[1]
  w_DxV = model.unembed_weight(params)
  cache, h_last_Px1xD, next_P = shared_prefix.prefill_prompts(model, params, prompt, length + t, spec.layout)
  cache, last_Bx1xD, next_B = shared_prefix.repeat_rows((cache, h_last_Px1xD, next_P), spec.num_samples, spec.layout)
  pos = prompt_batch.text_positions(next_B, t, prompt.positions)
  x = model.embed(params, base.ModelInputs(tokens=completion_BxT, positions=pos, mask=mask_BxT))
  h_BxTxD, _ = model.hidden(params, x, cache)
  # h_pred[t] is the state that predicts completion[t]: the prompt's last column for t = 0.
  h_pred_BxTxD = jnp.concatenate([last_Bx1xD, h_BxTxD[:, :-1]], axis=1)
  out = rl.token_logprobs(h_pred_BxTxD, w_DxV, completion_BxT, chunk_size=spec.chunk_size,
                          with_entropy=spec.with_entropy)
  logp, ent = out if spec.with_entropy else (out, None)
  scores = Scores(logp=jnp.where(mask_BxT, logp, 0.0), entropy=None if ent is None else jnp.where(mask_BxT, ent, 0.0))
  if spec.anchors is None:
    return scores
  logmass, amask, idx = _anchor_logmass(spec, prompt, completion_BxT, mask_BxT, h_pred_BxTxD, w_DxV, token_sets)
  return scores.replace(logmass=logmass, anchor_mask=amask, anchor_index=idx)


_score_jit = jax.jit(_score, static_argnames=("model", "spec"))


def _check_sequences(model, seqs: Sequences, max_cache_len: int | None) -> None:
  p, b = seqs.prompt.tokens.shape[0], seqs.completion.shape[0]
  if b != p * seqs.num_samples:
    raise ValueError(f"{b} completion rows for {p} prompts x {seqs.num_samples} samples")
  vocab = model.config.vocab_size
  if np.shape(seqs.completion_mask) != np.shape(seqs.completion) or np.ndim(seqs.completion) != 2:
    raise ValueError(f"seqs.completion {np.shape(seqs.completion)} and seqs.completion_mask "
                     f"{np.shape(seqs.completion_mask)} must both be [B, T]")
  # A global array spread over processes comes from `sample`, which produced in-vocabulary ids itself.
  local = not isinstance(seqs.completion, jax.Array) or seqs.completion.is_fully_addressable
  comp_np = np.asarray(seqs.completion) if local else np.zeros((1, 1), np.int32)
  bad = (comp_np < 0) | (comp_np >= vocab)
  if bad.any():
    raise ValueError(f"seqs.completion holds ids outside the vocabulary [0, {vocab}): "
                     f"{np.unique(comp_np[bad])[:8].tolist()} in rows {np.nonzero(bad.any(1))[0][:8].tolist()}")
  prompt_batch.check_prompt_rows(np.asarray(seqs.prompt.tokens), np.asarray(seqs.prompt.mask).astype(bool), vocab,
                                 "seqs.prompt")
  prompt_batch.check_cache_length(model, seqs.prompt.tokens.shape[1], np.shape(seqs.completion)[1], max_cache_len,
                                  "completion length")


def score(model, params, seqs: Sequences, *, chunk_size: int = 8192, with_entropy: bool = False,
          token_sets: jax.Array | None = None, anchors: AnchorSpec | None = None,
          max_cache_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
          axis_rules: Mapping[str, Any] | None = None) -> Scores:
  """Teacher-forced log-probs of `seqs.completion` given its prompt, in one compiled forward pass (no gradient).

  `seqs` is a `Sequences` or a sampler.Rollout (same fields). With `token_sets` ([K, C, V],
  rewards.category_token_sets) and `anchors`, also the category log-mass at the answer anchors (method.md SFC
  steps 1-3 on a slow rollout, step 4 on a fast teacher-forced answer).

  Hand-built `Sequences` are checked on the host before anything compiles, like `sample`'s input: completion and
  mask shapes, every completion id (padding included: it is embedded too) and every real prompt id inside the
  vocabulary, left-padded prompts, and prompt bucket + completion length within the cache (`max_cache_len`,
  default model.config.max_seq_len).
  """
  if (token_sets is None) != (anchors is None):
    raise ValueError("category log-mass needs both token_sets and anchors")
  if token_sets is not None and token_sets.shape[-1] != model.config.vocab_size:
    raise ValueError(f"token_sets vocab {token_sets.shape[-1]} != model vocab {model.config.vocab_size}")
  _check_sequences(model, seqs, max_cache_len)
  layout = sharding.BatchLayout.make(mesh, axis_rules) if mesh is not None else None
  prompt, completion, mask = seqs.prompt, seqs.completion, seqs.completion_mask
  if layout is not None:
    layout.check_rows(prompt.tokens.shape[0])
    prompt, completion, mask = layout.place((prompt, completion, mask))
  spec = _ScoreSpec(seqs.num_samples, chunk_size, with_entropy, anchors, layout)
  return _score_jit(model, spec, params, prompt, jnp.asarray(completion, jnp.int32), jnp.asarray(mask, bool),
                    token_sets)
