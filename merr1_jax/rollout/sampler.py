"""The sampler: a KV-cache decode loop over a prompt batch that is prefilled once per prompt.

`sample` runs two compiled programs per shape bucket (architecture.md, data flow):
  1. prefill (rollout/shared_prefix.py): the P prompts into a fresh cache, the next-token logits of the last column
     repeated G times (prompt p -> rows p*G..p*G+G-1); the prompt cache kept once per prompt beside an empty
     cache per row for the new tokens (base.SharedPrefixCache, when the model accepts one), else repeated G times;
  2. decode: one `lax.while_loop` (cache donated) that samples a token per row, feeds it back and stops as soon as
     every row has hit a stop token or the length budget.
Row r draws its token at step t with key fold_in(fold_in(rng, r), t), so a batch of P prompts x G samples draws
exactly what the same prompts repeated G times (G = 1) draw: the shared prefix changes the cost, not the sample.

Modes (method.md, "Output format and modes"): in fast mode the prompt ends with FAST_PREFIX
(`<think></think><answer>`); `sample` appends it to slow prompts itself (prompt_batch.prepare_prompts), bans the
think tags so a fast rollout never writes a think block, and stops at `</answer>` or EOS
(`SpecialIds.sample_kwargs`). All bad input is refused on the host before anything compiles.

Shape legend: P prompts, G samples per prompt, B = P*G rows, L prompt bucket, T completion length (max new
tokens), S cache slots = L + T, V vocab, D d_model.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax.infra import sharding
from merr1_jax.models import base
from merr1_jax.rollout import prompt_batch, shared_prefix
from merr1_jax.rollout.prompt_batch import PROMPT_BUCKETS


class StopReason(enum.IntEnum):
  LENGTH = 0  # ran out of max_new_tokens
  EOS = 1  # wrote eos_id
  STOP = 2  # wrote another stop id (a stop string, e.g. </answer> in fast mode)


def _prefill(model, num_samples: int, cache_len: int, layout, params, prompt: base.ModelInputs,
             shared: bool = False):
  """Prompt batch -> (cache, next-token logits_BxV, next position_B) for the B = P*G rows.

  `cache_len` slots per row in all: with `shared`, a base.SharedPrefixCache (the prompt's L slots once per prompt,
  cache_len - L slots per row); otherwise the prompt's cache of cache_len slots repeated G times."""
  length = prompt.tokens.shape[1]
  cache, h_last_Px1xD, next_pos_P = shared_prefix.prefill_prompts(model, params, prompt,
                                                                  length if shared else cache_len, layout)
  # Only the last column predicts the first new token: unembed one position, not L (V can be 152k).
  logits_PxV = base.logits_from_hidden(h_last_Px1xD, model.unembed_weight(params))[:, 0]
  if not shared:
    return shared_prefix.repeat_rows((cache, logits_PxV, next_pos_P), num_samples, layout)
  logits_BxV, next_pos_B = shared_prefix.repeat_rows((logits_PxV, next_pos_P), num_samples, layout)
  return (shared_prefix.shared_decode_cache(model, cache, num_samples, cache_len - length, layout), logits_BxV,
          next_pos_B)


prefill = jax.jit(_prefill, static_argnames=("model", "num_samples", "cache_len", "layout", "shared"))


# ----------------------------------------------------------------------------------------------- decode


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static knobs of the decode loop (hashable: a jit static argument)."""

  method: Any  # a sampling.* dataclass
  max_new_tokens: int
  stop_ids: tuple[int, ...]
  eos_id: int | None
  ban_ids: tuple[int, ...]
  pad_id: int
  mrope: bool  # positions are [B, 1, 3]
  layout: sharding.BatchLayout | None = None
  # Several row kinds in one loop (rollout/modes.py): rule m = (stop_ids, ban_ids, max_new_tokens) applies to the
  # rows with DecodeState.kind == m; stop_ids and ban_ids above are then unused and max_new_tokens is the buffers'
  # width (the largest budget). Empty: one rule for every row, the fields above.
  rules: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...] = ()
  # Give the loop each layer's weights as its own array, split once before it (`hoist_layer_slices`). None: where
  # that is measured to pay, on the CPU with unrolled layers (docs/benchmarks/rollout.md).
  layer_slices: bool | None = None

  def __post_init__(self):
    if not (self.layer_slices is None or isinstance(self.layer_slices, bool)):
      raise ValueError(f"layer_slices must be None, True or False, got {self.layer_slices!r}")


@flax.struct.dataclass
class DecodeState:
  t: jax.Array  # [] int32: the completion column written next
  cache: Any
  tokens: jax.Array  # [B, T] int32
  logp: jax.Array  # [B, T] float32, untempered policy
  logp_sampled: jax.Array  # [B, T] float32, the distribution sampled from
  done: jax.Array  # [B] bool
  length: jax.Array  # [B] int32
  reason: jax.Array  # [B] int32 StopReason
  next_pos: jax.Array  # [B] int32, position of completion token 0
  row_keys: jax.Array  # [B] keys
  kind: jax.Array | None = None  # [B] int32: which of spec.rules a row follows (None: no rules)


def init_decode_state(spec: DecodeSpec, cache, logits_BxV, next_pos_B, rng, row_keys=None,
                      kind_B=None) -> DecodeState:
  """State after sampling the first token from the prefill logits. Row r draws with fold_in(rng, r), or with
  `row_keys[r]` when given."""
  b, t = logits_BxV.shape[0], spec.max_new_tokens
  zeros = jnp.zeros((b, t), jnp.float32)
  if row_keys is None:
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b))
  state = DecodeState(
      t=jnp.zeros((), jnp.int32), cache=cache, tokens=jnp.full((b, t), spec.pad_id, jnp.int32), logp=zeros,
      logp_sampled=zeros, done=jnp.zeros((b,), bool), length=jnp.zeros((b,), jnp.int32),
      reason=jnp.full((b,), StopReason.LENGTH, jnp.int32), next_pos=next_pos_B, row_keys=row_keys,
      kind=None if kind_B is None else jnp.asarray(kind_B, jnp.int32))
  return _emit(spec, state, logits_BxV)


def _id_table(vocab: int, id_sets) -> jax.Array:
  """[M, V] bool: row m is True at the ids of id_sets[m]."""
  table = np.zeros((len(id_sets), vocab), bool)
  for m, ids in enumerate(id_sets):
    table[m, list(ids)] = True
  return jnp.asarray(table)


def _emit(spec: DecodeSpec, s: DecodeState, logits_BxV) -> DecodeState:
  """Samples column t for the live rows and records stops."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  chosen_BxV = logits_BxV
  banned = any(r[1] for r in spec.rules) if spec.rules else bool(spec.ban_ids)
  if spec.rules and banned:  # each row its own kind's banned ids
    ban_BxV = _id_table(logits_BxV.shape[-1], [r[1] for r in spec.rules])[s.kind]
    chosen_BxV = jnp.where(ban_BxV, -jnp.inf, logits_BxV)
  elif spec.ban_ids:  # a banned token is outside the sampler's support, like a top-k cut (sampling.py)
    chosen_BxV = logits_BxV.at[:, jnp.asarray(spec.ban_ids)].set(-jnp.inf)
  keys_B = jax.vmap(jax.random.fold_in, (0, None))(s.row_keys, s.t)
  smp = jax.vmap(lambda l_V, k: spec.method(l_V[None], k))(chosen_BxV, keys_B)
  tok_B, logp_sampled_B = smp.token_B[:, 0], smp.logp_sampled_B[:, 0]
  # Behaviour log-prob under the plain softmax of the raw logits: what the policy being trained assigns. The
  # method already computed it from the logits it was given, unless those had banned tokens.
  if banned:
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, -1), tok_B[:, None], -1)[:, 0]
  else:
    logp_B = smp.logp_B[:, 0]
  live = ~s.done
  tok_B = jnp.where(live, tok_B, spec.pad_id)
  put = lambda buf, col: jax.lax.dynamic_update_slice_in_dim(buf, col[:, None].astype(buf.dtype), s.t, axis=1)
  is_eos = live & (tok_B == spec.eos_id) if spec.eos_id is not None else jnp.zeros_like(live)
  if spec.rules:
    is_stop = live & _id_table(logits_BxV.shape[-1], [r[0] for r in spec.rules])[s.kind, tok_B]
    # A row that has written its kind's budget is done (StopReason.LENGTH, the default reason).
    full = (s.length + 1) >= jnp.asarray([r[2] for r in spec.rules], jnp.int32)[s.kind]
  else:
    is_stop = live & jnp.isin(tok_B, jnp.asarray(spec.stop_ids, jnp.int32)) if spec.stop_ids else jnp.zeros_like(live)
    full = jnp.zeros_like(live)
  reason = jnp.where(is_eos, StopReason.EOS, jnp.where(is_stop, StopReason.STOP, s.reason))
  return s.replace(
      t=s.t + 1, tokens=put(s.tokens, tok_B), logp=put(s.logp, jnp.where(live, logp_B, 0.0)),
      logp_sampled=put(s.logp_sampled, jnp.where(live, logp_sampled_B, 0.0)),
      done=s.done | is_eos | is_stop | (live & full), length=s.length + live.astype(jnp.int32),
      reason=reason.astype(jnp.int32))


def decode_step(model, spec: DecodeSpec, params, w_DxV, s: DecodeState) -> DecodeState:
  """Feeds column t-1 through the model (one cache slot) and samples column t."""
  tok_Bx1 = jax.lax.dynamic_slice_in_dim(s.tokens, s.t - 1, 1, axis=1)
  pos_Bx1 = (s.next_pos + s.t - 1)[:, None]
  pos = jnp.broadcast_to(pos_Bx1[..., None], (*pos_Bx1.shape, 3)) if spec.mrope else pos_Bx1
  x = model.embed(params, base.ModelInputs(tokens=tok_Bx1, positions=pos, mask=jnp.ones_like(tok_Bx1, bool)))
  h_Bx1xD, cache = model.hidden(params, x, s.cache)
  s = _emit(spec, s.replace(cache=cache), base.logits_from_hidden(h_Bx1xD, w_DxV)[:, 0])
  return sharding.constrain(spec.layout, s)


def hoist_layer_slices(model, params):
  """(pieces, rebuild): each leaf whose first logical axis is 'layers' split into its per-layer arrays, and
  rebuild(pieces) -> a params tree of the same leaves (the pieces stacked again).

  Why: a model that runs its stacked layers unrolled reads layer i as `w[i]`, and inside a while loop XLA's CPU
  backend copies every such slice out of the stack on every step (all the layer weights, about 63 MB per step for
  small_20m). Split outside the loop and stacked again inside it, `w[i]` folds to piece i: no copy. The cost is a
  second copy of the layer weights while the loop runs."""
  leaves, treedef = jax.tree.flatten(params)
  axes = treedef.flatten_up_to(base.logical_axes(params, model.partition_rules()))  # one axes tuple per leaf
  stacked = [bool(a) and a[0] == "layers" for a in axes]
  pieces = [tuple(x[i] for i in range(x.shape[0])) if st else x for x, st in zip(leaves, stacked)]
  return pieces, lambda p: jax.tree.unflatten(treedef, [jnp.stack(x) if st else x for x, st in zip(p, stacked)])


def layer_slices_pay(model, spec: DecodeSpec) -> bool:
  if spec.layer_slices is not None:
    return spec.layer_slices
  # A scanned model dynamic-slices its stack (nothing to fold; a rebuilt stack would be copied every step); on
  # GPU/TPU the copies and the memory trade are unmeasured.
  return jax.default_backend() == "cpu" and not getattr(model.config, "scan_layers", False)


def loop_weights(model, spec: DecodeSpec, params):
  """(carried, rebuild) for a loop over decode steps: the loop carries `carried` and calls `rebuild(carried)` for
  the params tree inside its body; the layer pieces where `layer_slices_pay`, else the params themselves."""
  return hoist_layer_slices(model, params) if layer_slices_pay(model, spec) else (params, lambda p: p)


def _decode(model, spec: DecodeSpec, params, cache, logits_BxV, next_pos_B, rng, row_keys=None,
            kind_B=None) -> DecodeState:
  w_DxV = model.unembed_weight(params)  # hoisted out of the loop
  state = init_decode_state(spec, cache, logits_BxV, next_pos_B, rng, row_keys, kind_B)
  pieces, rebuild = loop_weights(model, spec, params)
  return jax.lax.while_loop(lambda s: (s.t < spec.max_new_tokens) & ~jnp.all(s.done),
                            lambda s: decode_step(model, spec, rebuild(pieces), w_DxV, s), state)


# The final state carries the cache out, so the donated prefill cache is updated in place.
decode = jax.jit(_decode, static_argnames=("model", "spec"), donate_argnames=("cache",))


# ----------------------------------------------------------------------------------------------- sample


@flax.struct.dataclass
class Rollout:
  """What `sample` returns. Row r = p * num_samples + g is sample g of prompt p."""

  prompt: base.ModelInputs  # the P prompts as prefilled: bucketed, left-padded, FAST_PREFIX included
  completion: jax.Array  # [B, T] int32, pad_id after the end
  completion_mask: jax.Array  # [B, T] bool, True on generated tokens (the stop token included)
  logp: jax.Array  # [B, T] float32 behaviour log-probs (untempered, untruncated policy), 0 off the mask
  logp_sampled: jax.Array  # [B, T] float32 log-probs under the distribution sampled from
  stop_reason: jax.Array  # [B] int32 StopReason
  length: jax.Array  # [B] int32 completion lengths
  prompt_length: jax.Array  # [B] int32 real prompt tokens (prefix included)
  steps: jax.Array  # [] int32 decode iterations run (< max_new_tokens when every row stopped early; from
  #                   sample_modes, the joint loop's count, up to the longest mode's budget)
  num_samples: int = flax.struct.field(pytree_node=False, default=1)
  mode: str = flax.struct.field(pytree_node=False, default="slow")

  @property
  def prompt_index(self) -> np.ndarray:
    return np.arange(self.completion.shape[0]) // self.num_samples

  @property
  def prompt_tokens(self) -> jax.Array:
    """[B, L] each row's prompt (a repeat of `prompt.tokens`)."""
    return jnp.repeat(self.prompt.tokens, self.num_samples, axis=0)


def check_sample_args(vocab: int, num_samples, max_new_tokens, method, stop_ids, eos_id, ban_ids, pad_id):
  """(stop_ids, eos_id, ban_ids, pad_id) checked against the vocabulary and each other."""
  for name, v in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  stop_ids = prompt_batch.check_ids(stop_ids, vocab, "stop id")
  ban_ids = prompt_batch.check_ids(ban_ids, vocab, "ban id")
  (pad_id,) = prompt_batch.check_ids([pad_id], vocab, "pad_id")
  if eos_id is not None:
    (eos_id,) = prompt_batch.check_ids([eos_id], vocab, "eos_id")
    stop_ids = tuple(dict.fromkeys(stop_ids + (eos_id,)))
  if set(stop_ids) & set(ban_ids):
    raise ValueError(f"ids {sorted(set(stop_ids) & set(ban_ids))} are both stop and banned ids")
  try:
    hash(method)
  except TypeError as e:
    raise ValueError(f"method {method!r} must be hashable (a frozen sampling.* dataclass): it is a static "
                     "argument of the compiled loop") from e
  return stop_ids, eos_id, ban_ids, pad_id


def sample(model, params, inputs: base.ModelInputs, *, mode: str, num_samples: int, max_new_tokens: int,
           method, stop_ids: Sequence[int], rng: jax.Array, eos_id: int | None = None,
           ban_ids: Sequence[int] = (), fast_prefix_ids: Sequence[int] | None = None, pad_id: int = 0,
           buckets: Sequence[int] = PROMPT_BUCKETS, max_cache_len: int | None = None,
           mesh: jax.sharding.Mesh | None = None, axis_rules: Mapping[str, Any] | None = None,
           shared_decode: bool | None = None, layer_slices: bool | None = None) -> Rollout:
  """Draws `num_samples` completions per prompt; see the module docstring.

  Args:
    model, params: a base.PolicyModel and its params (sharded by the caller when `mesh` is given; never gathered).
    inputs: P left-padded prompts (ModelInputs, host arrays), rendered in `mode` or, for mode='fast', in slow
      mode (the prefix is then appended here).
    mode: 'slow' | 'fast'.
    method: a sampling.* method (static: a new method compiles a new loop).
    stop_ids: ids that end a row (EOS included or given as eos_id). eos_id: which one reports StopReason.EOS.
    ban_ids: ids never sampled (fast mode: the think tags). fast_prefix_ids: ids of prompts.FAST_PREFIX.
    rng: the step key; row r at step t uses fold_in(fold_in(rng, r), t).
    buckets: prompt length buckets. max_cache_len: bucket + max_new_tokens may not exceed it (default
      model.config.max_seq_len).
    mesh, axis_rules: run with the batch over axis_rules['batch'] (default the mesh's data/fsdp axes) and the
      KV cache heads over axis_rules['kv_heads']. On a mesh over several processes, every process passes the
      same (global) `inputs`; the outputs are global arrays (sharding.to_host gathers them).
    shared_decode: decode with the prompt's KV cache stored once per prompt (base.SharedPrefixCache) rather than
      repeated per row. None: whenever the model accepts it (`shared_prefix_decode = True`). The same samples
      either way, up to float summation order (tests/test_rollout.py).
    layer_slices: DecodeSpec.layer_slices (None: where it pays); the same samples either way.
  """
  vocab = model.config.vocab_size
  stop_ids, eos_id, ban_ids, pad_id = check_sample_args(vocab, num_samples, max_new_tokens, method, stop_ids,
                                                         eos_id, ban_ids, pad_id)
  prompt = prompt_batch.prepare_prompts(inputs, mode=mode, vocab_size=vocab, fast_prefix_ids=fast_prefix_ids,
                                        pad_id=pad_id, buckets=buckets)
  length = prompt.tokens.shape[1]
  cache_len = prompt_batch.check_cache_length(model, length, max_new_tokens, max_cache_len, "max_new_tokens")
  real_len = prompt.mask.sum(1).astype(np.int32)
  prompt, layout = shared_prefix.place_prompt(model, prompt, mesh, axis_rules)
  shared = shared_prefix.supports_shared_decode(model, shared_decode)
  cache, logits, next_pos = prefill(model, num_samples, cache_len, layout, params, prompt, shared)
  spec = DecodeSpec(method, max_new_tokens, stop_ids, eos_id, ban_ids, pad_id, prompt.positions.ndim == 3, layout,
                    layer_slices=layer_slices)
  s = decode(model, spec, params, cache, logits, next_pos, rng)
  return Rollout(prompt=prompt, completion=s.tokens,
                 completion_mask=jnp.arange(max_new_tokens)[None] < s.length[:, None],
                 logp=s.logp, logp_sampled=s.logp_sampled, stop_reason=s.reason, length=s.length,
                 prompt_length=jnp.repeat(jnp.asarray(real_len), num_samples), steps=s.t,
                 num_samples=num_samples, mode=mode)


def completion_texts(tokenizer, result: Rollout) -> list[str]:
  """Each row's completion as text, for rewards.parse_answer / format_ok with `result.mode`.

  EOS is dropped. A stop-string token (</answer> in fast mode) is kept: it is part of the answer format that
  rewards.format_ok checks.
  """
  toks, lengths = np.asarray(result.completion), np.asarray(result.length)
  reasons = np.asarray(result.stop_reason)
  return [tokenizer.decode(toks[r, :lengths[r] - (reasons[r] == StopReason.EOS)]) for r in range(len(toks))]
