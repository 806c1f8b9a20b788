"""The RL step's one batch layout: each prompt once, its completions as suffixes (prefix grouping).

In MER the prompt is the long part (hundreds to thousands of video/audio rows), a fast answer about 10 tokens and
a slow one 100-300. A `GroupedRLBatch` holds each prompt once and its completions in one `Segment` per thinking
mode (each with its own G and T, so fast answers are not padded to the slow length); `base.hidden_grouped` lets
every suffix attend to its prompt and causally to itself, so the prompt's activations exist once per group in the
forward and the backward. The passes here are the update's loss (`make_grouped_loss`), the old-policy pass
(`old_logprobs`) and the scoring pass without gradient (`score_pass`: reference log-probs, calibration log-mass).
A fast segment's suffix is FAST_PREFIX + the completion (the prefix carries no loss). tests/oracles/ungrouped.py
is the row-per-sequence oracle these are tested against; docs/method.md "Prefix-grouped passes" says more.

Shape legend: P prompts (groups), L prompt bucket, G suffixes of a segment per prompt, T its suffix length,
D d_model, V vocab, A anchors, K wheels, C clusters.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import rl
from merr1_jax.infra import sharding
from merr1_jax.models import base
from merr1_jax.rollout import prompt_batch

Array = jax.Array


@flax.struct.dataclass
class Segment:
  """G suffixes per prompt of one thinking mode. Per-token arrays are aligned with `tokens` (token t's value)."""

  tokens: Array  # [P, G, T] int32
  positions: Array  # [P, G, T] or [P, G, T, 3] int32, continuing the prompt
  mask: Array  # [P, G, T] bool: real tokens
  loss_mask: Array  # [P, G, T] bool: generated tokens (the fast prefix and padding carry no loss)
  advantages: Array  # [P, G] float32
  ref_logp: Array | None = None
  old_logp: Array | None = None
  behaviour_logp: Array | None = None
  mode_id: int = flax.struct.field(pytree_node=False, default=0)  # index into StepConfig.mode_names


@flax.struct.dataclass
class GroupedRLBatch:
  """One RL step's rollouts, grouped: P prompts once (features merged at their placeholders) and the segments."""

  prompt: base.ModelInputs  # [P, L], left-padded: its last column predicts every suffix's first token
  segments: tuple[Segment, ...]

  @property
  def advantages(self) -> Array:
    """[B] in rollout order: segment by segment, prompt p's rows of a segment at p*G .."""
    return jnp.concatenate([s.advantages.reshape(-1) for s in self.segments])

  def with_advantages(self, advantages_B) -> GroupedRLBatch:
    """The batch with the rows' advantages (rollout order, as `advantages` reads them) set per segment."""
    out, start = [], 0
    for seg in self.segments:
      n = seg.advantages.size
      out.append(seg.replace(advantages=advantages_B[start:start + n].reshape(seg.advantages.shape)))
      start += n
    return self.replace(segments=tuple(out))


def _embed_suffix(model, params, seg: Segment) -> base.Embedded:
  p, g, t = seg.tokens.shape
  flat = lambda a: a.reshape(p * g, t, *a.shape[3:])  # noqa: E731
  e = model.embed(params, base.ModelInputs(tokens=flat(seg.tokens), positions=flat(seg.positions),
                                           mask=flat(seg.mask)))
  return base.Embedded(x=e.x.reshape(p, g, t, -1), positions=seg.positions, mask=seg.mask)


def grouped_hidden(model, params, prompt: base.ModelInputs, segments: Sequence[Segment], dropout_key=None):
  """(h_prompt [P, L, D], per segment h [P, G, T, D], per segment h_pred [P, G, T, D]): h[..., t, :] is the state
  after suffix token t, h_pred[..., t, :] the one that predicts it (the prompt's last column for t = 0)."""
  h_p, h_s = base.hidden_grouped(model, params, model.embed(params, prompt),
                                 [_embed_suffix(model, params, s) for s in segments], dropout_key)
  preds = []
  for seg, h in zip(segments, h_s):
    p, g = seg.tokens.shape[:2]
    last = jnp.broadcast_to(h_p[:, None, -1:], (p, g, 1, h.shape[-1]))  # one position per suffix, not L
    preds.append(jnp.concatenate([last, h[:, :, :-1]], axis=2))
  return h_p, h_s, preds


def grouped_logprobs(model, params, prompt: base.ModelInputs, segments: Sequence[Segment], *, chunk_size: int,
                     with_entropy: bool, dropout_key=None) -> list[tuple[Array, Array | None]]:
  """Per segment, (logp [P, G, T], entropy [P, G, T] or None) of its suffix tokens, float32."""
  _, _, preds = grouped_hidden(model, params, prompt, segments, dropout_key)
  w = model.unembed_weight(params)
  out = []
  for seg, h in zip(segments, preds):
    res = rl.token_logprobs(h, w, seg.tokens, chunk_size=chunk_size, with_entropy=with_entropy)
    out.append(res if with_entropy else (res, None))
  return out


# --------------------------------------------------------------------------------------------- assembling


def segment(ro, prompt: base.ModelInputs, *, fast_prefix_ids: Sequence[int], mode_id: int,
            valid_B=None) -> Segment:
  """A host Segment of one mode's rollout against the (slow-rendered) `prompt` of its P prompts: the suffix is
  FAST_PREFIX + completion for a fast rollout, the completion for a slow one; positions continue the prompt
  (text on all three M-RoPE axes), 0 on padding; rows with `valid_B` False carry no loss."""
  pre = fast_prefix_ids if ro.mode == "fast" else ()
  return _segment(np.asarray(ro.completion), np.asarray(ro.completion_mask), ro.num_samples, pre, prompt, mode_id,
                  valid_B, np.asarray(ro.logp))


def token_segment(completions: Sequence[Sequence[int]], prompt: base.ModelInputs, *, num_samples: int,
                  prefix_ids: Sequence[int], mode_id: int, pad_id: int = 0) -> Segment:
  """A host Segment of given token lists (B = P * num_samples, rows p*G + g) after `prefix_ids`: e.g. the slow
  answers teacher-forced in the fast context (method.md E3 step 4), the context being prompt + FAST_PREFIX."""
  t = max([len(c) for c in completions] + [1])
  comp = np.full((len(completions), t), pad_id, np.int32)
  cmask = np.zeros((len(completions), t), bool)
  for i, c in enumerate(completions):
    comp[i, :len(c)], cmask[i, :len(c)] = c, True
  return _segment(comp, cmask, num_samples, prefix_ids, prompt, mode_id, None, None)


def _segment(comp, cmask, g, prefix_ids, prompt, mode_id, valid_B, behaviour) -> Segment:
  p = prompt.tokens.shape[0]
  pre = np.asarray(prefix_ids, np.int32)
  b, n = comp.shape[0], len(pre)
  valid = np.ones(b, bool) if valid_B is None else np.asarray(valid_B, bool)
  tokens = np.concatenate([np.broadcast_to(pre, (b, n)), comp], 1).astype(np.int32)
  mask = np.concatenate([np.ones((b, n), bool), cmask], 1)
  start = np.repeat(prompt_batch.next_positions(np.asarray(prompt.positions), np.asarray(prompt.mask)), g)
  positions = prompt_batch.text_positions(start, tokens.shape[1], np.asarray(prompt.positions))
  positions = np.where(mask.reshape(*mask.shape, *[1] * (positions.ndim - 2)), positions, 0).astype(np.int32)

  def groups(a):  # [B, ...] rows p*G + g -> [P, G, ...]
    return np.ascontiguousarray(a).reshape(p, g, *a.shape[1:])

  def per_token(a):  # completion values [B, T] -> suffix values, 0 on the prefix and on padding
    return None if a is None else groups(np.concatenate([np.zeros((b, n), np.float32), np.where(cmask, a, 0.0)], 1))

  return Segment(tokens=groups(tokens), positions=groups(positions), mask=groups(mask),
                 loss_mask=groups(np.concatenate([np.zeros((b, n), bool), cmask & valid[:, None]], 1)),
                 advantages=np.zeros((p, g), np.float32),
                 behaviour_logp=per_token(behaviour), mode_id=mode_id)


def score_pass(model, params, prompt: base.ModelInputs, segments: Sequence[Segment], *, chunk_size: int = 8192,
               token_sets=None, anchors=None, mesh=None, axis_rules=None) -> list[dict[str, Array]]:
  """The grouped teacher-forced pass without gradient (reference, calibration): per segment {'logp' [P, G, T]}
  and, with `token_sets` [K, C, V] and `anchors` (rollout.AnchorSpec), the category log-mass at the anchors of
  its suffix ({'logmass' [P, G, A, K, C], 'anchor_mask' [P, G, A]}). The anchors are the suffix positions holding
  the last <answer> and the separators after it: the states there predict an emotion word's first token, as in
  the oracle's scorer (tests/oracles/ungrouped.py)."""
  if (token_sets is None) != (anchors is None):
    raise ValueError("category log-mass needs both token_sets and anchors")
  segments = tuple(segments)
  _check_token_ids(model.config.vocab_size, segments)
  if mesh is not None:  # the prompts (and with them their whole groups) over the batch axes
    layout = sharding.BatchLayout.make(mesh, axis_rules)
    layout.check_rows(prompt.tokens.shape[0])
    prompt, segments = layout.place((prompt, segments))
  return _score_jit(model, (chunk_size, anchors), params, prompt, segments, token_sets)


def _score(model, spec, params, prompt, segments, token_sets):
  chunk_size, a = spec
  _, h_s, preds = grouped_hidden(model, params, prompt, segments)
  w = model.unembed_weight(params)
  outs = []
  for seg, h, h_pred in zip(segments, h_s, preds):
    logp = rl.token_logprobs(h_pred, w, seg.tokens, chunk_size=chunk_size)
    out = {"logp": jnp.where(seg.mask, logp, 0.0)}
    if a is not None:
      p, g, t = seg.tokens.shape
      idx, amask = rl.answer_anchors(seg.tokens.reshape(p * g, t), seg.mask.reshape(p * g, t), a.answer_open,
                                     jnp.asarray(a.separators, jnp.int32), a.answer_close, a.num_anchors)
      h_at = jnp.take_along_axis(h.reshape(p * g, t, -1), idx[..., None], axis=1)
      logmass = rl.category_logmass_from_hidden(h_at, w, token_sets, chunk_size=chunk_size)
      out.update(logmass=logmass.reshape(p, g, *logmass.shape[1:]), anchor_mask=amask.reshape(p, g, -1))
    outs.append(out)
  return outs


def _check_token_ids(vocab: int, segments: Sequence[Segment]) -> None:
  """Host-side, before anything compiles: every suffix id (padding included: it is embedded too) inside the
  vocabulary, which a jitted embedding lookup would otherwise clamp without a word. Arrays spread over several
  processes come from the sampler, which produced in-vocabulary ids itself."""
  for i, seg in enumerate(segments):
    if isinstance(seg.tokens, jax.Array) and not seg.tokens.is_fully_addressable:
      continue
    toks = np.asarray(seg.tokens)
    bad = (toks < 0) | (toks >= vocab)
    if bad.any():
      raise ValueError(f"segment {i} holds token ids outside the vocabulary [0, {vocab}): "
                       f"{np.unique(toks[bad])[:8].tolist()} in suffix rows {np.argwhere(bad.any(-1))[:8].tolist()}")


_score_jit = jax.jit(_score, static_argnames=("model", "spec"))


def slow_prompt(ros, inputs: base.ModelInputs, *, vocab_size: int, pad_id: int, buckets) -> base.ModelInputs:
  """The prompts in slow mode as the sampler prepares them (the grouped layout's shared prefix: a fast suffix
  carries FAST_PREFIX itself), from the slow rollout when there is one."""
  if "slow" in ros:
    return ros["slow"].prompt
  return prompt_batch.prepare_prompts(inputs, mode="slow", vocab_size=vocab_size, pad_id=pad_id, buckets=buckets)
