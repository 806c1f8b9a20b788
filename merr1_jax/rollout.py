"""Rollouts: a KV-cache sampler that prefills each prompt once, and teacher-forced scoring of given completions.

`sample` runs two compiled programs per shape bucket (architecture.md, data flow):
  1. prefill: embed the P prompts (features merged), run them through the decoder into a fresh cache, take the
     next-token logits of the last column, then repeat the cache and logits G times (prompt p -> rows p*G..p*G+G-1).
     The prompt, often long because of the video/audio placeholders, is processed once per prompt, not G times.
  2. decode: one `lax.while_loop` (cache donated) that samples a token per row, feeds it back and stops as soon as
     every row has hit a stop token or the length budget.
Row r draws its token at step t with key fold_in(fold_in(rng, r), t), so a batch of P prompts x G samples draws
exactly what the same prompts repeated G times (G = 1) draw: the shared prefix changes the cost, not the sample.

Modes (method.md, "Output format and the two modes"): in fast mode the prompt ends with FAST_PREFIX
(`<think></think><answer>`, the ids of `prompts.FAST_PREFIX`); `sample` appends it to slow prompts itself
(`append_fast_prefix`), bans the think tags so a fast rollout never writes a think block, and stops at `</answer>`
or EOS (`SpecialIds.sample_kwargs`).

Shapes are bounded: prompts are cut or left-padded to the smallest bucket holding their longest real row, so a
handful of programs serve a training run. All bad input (long prompt, cache overflow, ids outside the
vocabulary, right padding) is refused on the host before anything compiles.

`score` teacher-forces given completions through the same shared-prefix structure in one compiled program and
returns per-token log-probs chunked over the vocabulary (rl.token_logprobs) and, optionally, the category
log-mass at the answer anchors (method.md SFC steps 1-4). The RL step uses it for the reference, old-policy and
calibration passes. Its input is checked on the host too (ids in the vocabulary, bucket + completion length
within the cache), so a hand-built `Sequences` fails with a clear error before compilation.

Shape legend: P prompts, G samples per prompt, B = P*G rows, L prompt bucket, T completion length (max new
tokens), S cache slots = L + T, V vocab, D d_model, A anchors, K wheels, C clusters.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import prompts, rl, sharding
from merr1_jax.models import base

PROMPT_BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
COMPLETION_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class StopReason(enum.IntEnum):
  LENGTH = 0  # ran out of max_new_tokens
  EOS = 1  # wrote eos_id
  STOP = 2  # wrote another stop id (a stop string, e.g. </answer> in fast mode)


# ------------------------------------------------------------------------------------------ token ids


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

  def anchors(self, num_anchors: int) -> "AnchorSpec":
    return AnchorSpec(self.answer_open, self.separators, self.answer_close, num_anchors)


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
  """Where `score` reads category log-mass: rl.answer_anchors arguments (hashable, a static jit argument)."""

  answer_open: int
  separators: tuple[int, ...]
  answer_close: int
  num_anchors: int


# ------------------------------------------------------------------------------------- prompt handling


def _xp(a):
  return np if isinstance(a, np.ndarray) else jnp


def next_positions(positions, mask_BxL):
  """Position of the token after each row's prompt: max real position + 1 (all 3 M-RoPE axes continue as
  text from there, the Qwen2-VL rule); 0 for a row with no real token."""
  xp = _xp(mask_BxL)
  pos = positions if positions.ndim == 3 else positions[None]
  return xp.max(xp.where(mask_BxL[None], pos, -1), axis=(0, 2)).astype(xp.int32) + 1


def append_fast_prefix(inputs: base.ModelInputs, prefix_ids: Sequence[int]) -> base.ModelInputs:
  """Appends `prefix_ids` after every left-padded prompt, with positions continuing each row (1-D or 3-D).

  Left padding keeps every prompt ending at the last column, so the prefix is the same new columns for all rows.
  Works on numpy (host) or jax arrays; features are untouched (the prefix holds no placeholder).
  """
  xp = _xp(inputs.tokens)
  n, (b, _) = len(prefix_ids), inputs.tokens.shape
  new_pos_BxN = next_positions(inputs.positions, inputs.mask)[:, None] + xp.arange(n, dtype=xp.int32)[None]
  if inputs.positions.ndim == 3:
    new_pos = xp.broadcast_to(new_pos_BxN[None], (3, b, n))
  else:
    new_pos = new_pos_BxN
  return inputs.replace(
      tokens=xp.concatenate([inputs.tokens, xp.broadcast_to(xp.asarray(prefix_ids, xp.int32), (b, n))], 1),
      positions=xp.concatenate([inputs.positions, new_pos.astype(inputs.positions.dtype)], -1),
      mask=xp.concatenate([inputs.mask.astype(bool), xp.ones((b, n), bool)], 1))


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
  for b in sorted(buckets):
    if n <= b:
      return b
  raise ValueError(f"{what} of {n} tokens is longer than the largest bucket {max(buckets)}; raise the buckets "
                   "(never truncated silently)")


def _ends_with(tokens_BxL: np.ndarray, ids: Sequence[int]) -> np.ndarray:
  n = len(ids)
  return np.all(tokens_BxL[:, tokens_BxL.shape[1] - n:] == np.asarray(ids)[None], axis=1)


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
  if positions.shape not in (tokens.shape, (3, *tokens.shape)):
    raise ValueError(f"inputs.positions {positions.shape} must be [P, L] or [3, P, L] for tokens {tokens.shape}")
  if np.any(np.diff(mask.astype(np.int8), axis=1) < 0):
    rows = np.nonzero(np.any(np.diff(mask.astype(np.int8), axis=1) < 0, axis=1))[0]
    raise ValueError(f"inputs.mask rows {rows[:8].tolist()} are not left-padded (a real token follows padding); "
                     "the sampler needs every prompt to end at the last column")
  bad = (tokens < 0) | (tokens >= vocab_size)
  if np.any(bad & mask):
    raise ValueError(f"inputs.tokens holds ids outside the vocabulary [0, {vocab_size}): "
                     f"{np.unique(tokens[bad & mask])[:8].tolist()}")
  inputs = inputs.replace(tokens=tokens.astype(np.int32), positions=positions.astype(np.int32), mask=mask)
  if fast_prefix_ids:
    _check_ids(fast_prefix_ids, vocab_size, "fast_prefix_ids")
    has = _ends_with(tokens, fast_prefix_ids) & mask[:, -1]
    real = mask.any(1)  # empty rows (eval batch padding) follow the others
    if mode == "slow" and has.any():
      raise ValueError(f"mode='slow' but prompt rows {np.nonzero(has)[0][:8].tolist()} end with the fast prefix")
    if mode == "fast":
      if has.any() and not has[real].all():
        raise ValueError(f"mode='fast': rows {np.nonzero(has)[0][:8].tolist()} already end with the fast prefix and "
                         f"rows {np.nonzero(real & ~has)[0][:8].tolist()} do not; render the batch in one mode")
      if not has.any():
        inputs = append_fast_prefix(inputs, fast_prefix_ids)
  elif mode == "fast":
    raise ValueError("mode='fast' needs fast_prefix_ids (SpecialIds.sample_kwargs gives them)")
  real = int(inputs.mask.sum(1).max(initial=0))
  length = bucket(real, buckets, "prompt")
  have = inputs.tokens.shape[1]
  if have >= length:  # only padding columns are cut: every real token sits in the last `real` columns
    cut = lambda a, v: a[..., have - length:]
  else:
    cut = lambda a, v: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(length - have, 0)], constant_values=v)
  return inputs.replace(tokens=cut(inputs.tokens, pad_id), positions=cut(inputs.positions, 0),
                        mask=cut(inputs.mask, False))


def _check_ids(ids: Sequence[int], vocab_size: int, what: str) -> tuple[int, ...]:
  ids = tuple(int(i) for i in ids)
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"{what} {bad} outside the vocabulary [0, {vocab_size})")
  return ids


def _check_placeholders(model, inputs: base.ModelInputs) -> None:
  # embed() cannot check the placeholder/feature convention under jit; do it here on the host batch.
  check = getattr(model, "validate_inputs", None)
  if check is not None:
    check(inputs)
    return
  from merr1_jax.models import mllm
  if isinstance(model, mllm.MultimodalPolicy):
    mllm.validate_placeholders(model.config, inputs)


# -------------------------------------------------------------------------------------------- sharding


@dataclasses.dataclass(frozen=True)
class Layout:
  """Batch over `batch` mesh axes (data/fsdp), KV heads over `kv_heads` (tensor) where the rules say so."""

  mesh: jax.sharding.Mesh
  batch: tuple[str, ...]
  kv_heads: str | tuple[str, ...] | None

  @classmethod
  def make(cls, mesh: jax.sharding.Mesh, axis_rules: Mapping[str, Any] | None = None) -> "Layout":
    rules = dict(axis_rules or {})
    batch = rules.get("batch", tuple(a for a in ("data", "fsdp") if a in mesh.axis_names))
    return cls(mesh, (batch,) if isinstance(batch, str) else tuple(batch), rules.get("kv_heads"))

  @property
  def batch_size(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.batch]))

  def sharding(self, ndim: int, batch_axis: int = 0, kv_axis: int | None = None) -> jax.sharding.NamedSharding:
    spec = [None] * ndim
    spec[batch_axis] = self.batch or None
    if kv_axis is not None:
      spec[kv_axis] = self.kv_heads
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

  def place(self, a, batch_axis: int = 0) -> jax.Array:
    """One batch-major array -> a global array over the batch axes.

    Host values are the whole global batch, the same on every process (the trainer's RL and eval batches are),
    and each process copies only its devices' rows.
    """
    target = self.sharding(np.ndim(a), batch_axis)
    if isinstance(a, jax.Array):
      return jax.device_put(a, target)  # already on device: resharded there
    return sharding.from_global(np.asarray(a), target)

  def put(self, inputs: base.ModelInputs) -> base.ModelInputs:
    def put(name, a):
      if a is None:
        return None
      return self.place(a, 1 if name == "positions" and a.ndim == 3 else 0)
    return base.ModelInputs(**{f.name: put(f.name, getattr(inputs, f.name)) for f in dataclasses.fields(inputs)})

  def constrain(self, tree):
    """Batch-major leaves sharded on axis 0, a KVCache's k/v also over kv heads (axis 3); scalars replicated."""
    batch = lambda a: jax.lax.with_sharding_constraint(a, self.sharding(a.ndim)) if a.ndim else a  # noqa: E731

    def one(x):
      if isinstance(x, base.KVCache):
        kv = lambda a: jax.lax.with_sharding_constraint(a, self.sharding(a.ndim, 0, 3))  # noqa: E731
        return x.replace(k=kv(x.k), v=kv(x.v), valid=batch(x.valid), index=batch(x.index))
      return batch(x)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, base.KVCache))


def _constrain(layout: Layout | None, tree):
  return tree if layout is None else layout.constrain(tree)


def _check_batch(layout: Layout | None, p: int) -> None:
  if layout is not None and p % layout.batch_size:
    raise ValueError(f"{p} prompts do not split over the batch mesh axes {layout.batch} "
                     f"({layout.batch_size} shards); pad the batch to a multiple")


# ---------------------------------------------------------------------------------------------- prefill


def _repeat(tree, g: int):
  # base.KVCache.repeat for any batch-major pytree (the protocol's cache contract).
  return tree if g == 1 else jax.tree.map(lambda a: jnp.repeat(a, g, axis=0), tree)


def _prefill(model, num_samples: int, cache_len: int, layout: Layout | None, params,
             prompt: base.ModelInputs):
  """Prompt batch -> (cache, next-token logits_BxV, next position_B), each repeated G times."""
  cache = _constrain(layout, model.init_cache(prompt.tokens.shape[0], cache_len))
  h_PxLxD, cache = model.hidden(params, model.embed(params, prompt), cache)
  # Only the last column predicts the first new token: unembed one position, not L (V can be 152k).
  logits_PxV = base.logits_from_hidden(h_PxLxD[:, -1:], model.unembed_weight(params))[:, 0]
  out = (cache, logits_PxV, next_positions(prompt.positions, prompt.mask))
  return _constrain(layout, _repeat(out, num_samples))


prefill = jax.jit(_prefill, static_argnames=("model", "num_samples", "cache_len", "layout"))


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
  mrope: bool  # positions are [3, B, 1]
  layout: Layout | None = None


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


def init_decode_state(spec: DecodeSpec, cache, logits_BxV, next_pos_B, rng) -> DecodeState:
  """State after sampling the first token from the prefill logits."""
  b, t = logits_BxV.shape[0], spec.max_new_tokens
  zeros = jnp.zeros((b, t), jnp.float32)
  state = DecodeState(
      t=jnp.zeros((), jnp.int32), cache=cache, tokens=jnp.full((b, t), spec.pad_id, jnp.int32), logp=zeros,
      logp_sampled=zeros, done=jnp.zeros((b,), bool), length=jnp.zeros((b,), jnp.int32),
      reason=jnp.full((b,), StopReason.LENGTH, jnp.int32), next_pos=next_pos_B,
      row_keys=jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b)))
  return _emit(spec, state, logits_BxV)


def _emit(spec: DecodeSpec, s: DecodeState, logits_BxV) -> DecodeState:
  """Samples column t for the live rows and records stops."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  chosen_BxV = logits_BxV
  if spec.ban_ids:  # a banned token is outside the sampler's support, like a top-k cut (sampling.py)
    chosen_BxV = logits_BxV.at[:, jnp.asarray(spec.ban_ids)].set(-jnp.inf)
  keys_B = jax.vmap(jax.random.fold_in, (0, None))(s.row_keys, s.t)
  smp = jax.vmap(lambda l_V, k: spec.method(l_V[None], k))(chosen_BxV, keys_B)
  tok_B, logp_sampled_B = smp.token_B[:, 0], smp.logp_sampled_B[:, 0]
  # Behaviour log-prob under the plain softmax of the raw logits: what the policy being trained assigns. The
  # method already computed it from the logits it was given, unless those had banned tokens.
  if spec.ban_ids:
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV, -1), tok_B[:, None], -1)[:, 0]
  else:
    logp_B = smp.logp_B[:, 0]
  live = ~s.done
  tok_B = jnp.where(live, tok_B, spec.pad_id)
  put = lambda buf, col: jax.lax.dynamic_update_slice_in_dim(buf, col[:, None].astype(buf.dtype), s.t, axis=1)
  is_eos = live & (tok_B == spec.eos_id) if spec.eos_id is not None else jnp.zeros_like(live)
  is_stop = live & jnp.isin(tok_B, jnp.asarray(spec.stop_ids, jnp.int32)) if spec.stop_ids else jnp.zeros_like(live)
  reason = jnp.where(is_eos, StopReason.EOS, jnp.where(is_stop, StopReason.STOP, s.reason))
  return s.replace(
      t=s.t + 1, tokens=put(s.tokens, tok_B), logp=put(s.logp, jnp.where(live, logp_B, 0.0)),
      logp_sampled=put(s.logp_sampled, jnp.where(live, logp_sampled_B, 0.0)), done=s.done | is_eos | is_stop,
      length=s.length + live.astype(jnp.int32), reason=reason.astype(jnp.int32))


def decode_step(model, spec: DecodeSpec, params, w_DxV, s: DecodeState) -> DecodeState:
  """Feeds column t-1 through the model (one cache slot) and samples column t."""
  tok_Bx1 = jax.lax.dynamic_slice_in_dim(s.tokens, s.t - 1, 1, axis=1)
  pos_Bx1 = (s.next_pos + s.t - 1)[:, None]
  pos = jnp.broadcast_to(pos_Bx1[None], (3, *pos_Bx1.shape)) if spec.mrope else pos_Bx1
  x = model.embed(params, base.ModelInputs(tokens=tok_Bx1, positions=pos, mask=jnp.ones_like(tok_Bx1, bool)))
  h_Bx1xD, cache = model.hidden(params, x, s.cache)
  s = _emit(spec, s.replace(cache=cache), base.logits_from_hidden(h_Bx1xD, w_DxV)[:, 0])
  return _constrain(spec.layout, s)


def _decode(model, spec: DecodeSpec, params, cache, logits_BxV, next_pos_B, rng) -> DecodeState:
  w_DxV = model.unembed_weight(params)  # hoisted out of the loop
  state = init_decode_state(spec, cache, logits_BxV, next_pos_B, rng)
  return jax.lax.while_loop(lambda s: (s.t < spec.max_new_tokens) & ~jnp.all(s.done),
                            lambda s: decode_step(model, spec, params, w_DxV, s), state)


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
  steps: jax.Array  # [] int32 decode iterations run (< max_new_tokens when every row stopped early)
  num_samples: int = flax.struct.field(pytree_node=False, default=1)
  mode: str = flax.struct.field(pytree_node=False, default="slow")

  @property
  def prompt_index(self) -> np.ndarray:
    return np.arange(self.completion.shape[0]) // self.num_samples

  @property
  def prompt_tokens(self) -> jax.Array:
    """[B, L] each row's prompt (a repeat of `prompt.tokens`)."""
    return jnp.repeat(self.prompt.tokens, self.num_samples, axis=0)


def sample(model, params, inputs: base.ModelInputs, *, mode: str, num_samples: int, max_new_tokens: int,
           method, stop_ids: Sequence[int], rng: jax.Array, eos_id: int | None = None,
           ban_ids: Sequence[int] = (), fast_prefix_ids: Sequence[int] | None = None, pad_id: int = 0,
           buckets: Sequence[int] = PROMPT_BUCKETS, max_cache_len: int | None = None,
           mesh: jax.sharding.Mesh | None = None, axis_rules: Mapping[str, Any] | None = None) -> Rollout:
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
  """
  vocab = model.config.vocab_size
  for name, v in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}")
  stop_ids = _check_ids(stop_ids, vocab, "stop id")
  ban_ids = _check_ids(ban_ids, vocab, "ban id")
  (pad_id,) = _check_ids([pad_id], vocab, "pad_id")
  if eos_id is not None:
    (eos_id,) = _check_ids([eos_id], vocab, "eos_id")
    stop_ids = tuple(dict.fromkeys(stop_ids + (eos_id,)))
  if set(stop_ids) & set(ban_ids):
    raise ValueError(f"ids {sorted(set(stop_ids) & set(ban_ids))} are both stop and banned ids")
  try:
    hash(method)
  except TypeError as e:
    raise ValueError(f"method {method!r} must be hashable (a frozen sampling.* dataclass): it is a static "
                     "argument of the compiled loop") from e
  prompt = prepare_prompts(inputs, mode=mode, vocab_size=vocab, fast_prefix_ids=fast_prefix_ids,
                           pad_id=pad_id, buckets=buckets)
  length = prompt.tokens.shape[1]
  limit = max_cache_len if max_cache_len is not None else getattr(model.config, "max_seq_len", None)
  if limit is not None and length + max_new_tokens > limit:
    raise ValueError(f"prompt bucket {length} + max_new_tokens {max_new_tokens} = {length + max_new_tokens} "
                     f"exceeds the cache length {limit} (max_cache_len / model.config.max_seq_len)")
  _check_placeholders(model, prompt)
  layout = Layout.make(mesh, axis_rules) if mesh is not None else None
  _check_batch(layout, prompt.tokens.shape[0])
  real_len = prompt.mask.sum(1).astype(np.int32)
  prompt = layout.put(prompt) if layout is not None else jax.tree.map(jnp.asarray, prompt)
  cache, logits, next_pos = prefill(model, num_samples, length + max_new_tokens, layout, params, prompt)
  spec = DecodeSpec(method, max_new_tokens, stop_ids, eos_id, ban_ids, pad_id, prompt.positions.ndim == 3, layout)
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


# ------------------------------------------------------------------------------------------------ score


@flax.struct.dataclass
class Sequences:
  """Completions to score in a prompt's context (a Rollout has the same fields)."""

  prompt: base.ModelInputs  # P prompts, left-padded (prepare_prompts)
  completion: jax.Array  # [B, T] int32
  completion_mask: jax.Array  # [B, T] bool
  num_samples: int = flax.struct.field(pytree_node=False, default=1)


def make_sequences(inputs: base.ModelInputs, completions: Sequence[Sequence[int]], *, mode: str, num_samples: int,
                   vocab_size: int, fast_prefix_ids: Sequence[int] | None = None, pad_id: int = 0,
                   buckets: Sequence[int] = PROMPT_BUCKETS,
                   completion_buckets: Sequence[int] = COMPLETION_BUCKETS) -> Sequences:
  """Host-side: P prompts plus B = P * num_samples token lists (e.g. a slow answer teacher-forced in the fast
  context, method.md SFC step 4), right-padded to a completion bucket."""
  prompt = prepare_prompts(inputs, mode=mode, vocab_size=vocab_size, fast_prefix_ids=fast_prefix_ids,
                           pad_id=pad_id, buckets=buckets)
  if len(completions) != prompt.tokens.shape[0] * num_samples:
    raise ValueError(f"{len(completions)} completions for {prompt.tokens.shape[0]} prompts x {num_samples} samples")
  t = bucket(max([len(c) for c in completions] + [1]), completion_buckets, "completion")
  toks, mask = np.full((len(completions), t), pad_id, np.int32), np.zeros((len(completions), t), bool)
  for i, c in enumerate(completions):
    toks[i, :len(c)] = _check_ids(c, vocab_size, f"completion {i} token")
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
  layout: Layout | None


def _score(model, spec: _ScoreSpec, params, prompt: base.ModelInputs, completion_BxT, mask_BxT, token_sets):
  g, (b, t), length = spec.num_samples, completion_BxT.shape, prompt.tokens.shape[1]
  w_DxV = model.unembed_weight(params)
  cache = _constrain(spec.layout, model.init_cache(prompt.tokens.shape[0], length + t))
  h_PxLxD, cache = model.hidden(params, model.embed(params, prompt), cache)
  cache, last_Bx1xD, next_B = _constrain(spec.layout, _repeat(
      (cache, h_PxLxD[:, -1:], next_positions(prompt.positions, prompt.mask)), g))
  pos_BxT = next_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
  pos = jnp.broadcast_to(pos_BxT[None], (3, b, t)) if prompt.positions.ndim == 3 else pos_BxT
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
  a = spec.anchors
  # The token sitting at each h_pred position (fast mode: <answer> is the prompt's last token).
  ctx_BxT = jnp.concatenate([jnp.repeat(prompt.tokens[:, -1:], g, 0), completion_BxT[:, :-1]], axis=1)
  ctx_mask = jnp.concatenate([jnp.repeat(prompt.mask[:, -1:], g, 0), mask_BxT[:, :-1]], axis=1)
  idx_BxA, amask_BxA = rl.answer_anchors(ctx_BxT, ctx_mask, a.answer_open, jnp.asarray(a.separators, jnp.int32),
                                         a.answer_close, a.num_anchors)
  h_BxAxD = jnp.take_along_axis(h_pred_BxTxD, idx_BxA[..., None], axis=1)
  logmass = rl.category_logmass_from_hidden(h_BxAxD, w_DxV, token_sets, chunk_size=spec.chunk_size)
  return scores.replace(logmass=logmass, anchor_mask=amask_BxA, anchor_index=idx_BxA)


_score_jit = jax.jit(_score, static_argnames=("model", "spec"))


def score(model, params, seqs: Sequences | Rollout, *, chunk_size: int = 8192, with_entropy: bool = False,
          token_sets: jax.Array | None = None, anchors: AnchorSpec | None = None,
          max_cache_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
          axis_rules: Mapping[str, Any] | None = None) -> Scores:
  """Teacher-forced log-probs of `seqs.completion` given its prompt, in one compiled forward pass (no gradient).

  The prompt is prefilled once and its cache shared by its num_samples rows, like `sample`. With `token_sets`
  ([K, C, V], rewards.category_token_sets) and `anchors`, also the category log-mass at the answer anchors
  (method.md SFC steps 1-3 on a slow rollout, step 4 on a fast teacher-forced answer).

  Hand-built `Sequences` are checked on the host before anything compiles, like `sample`'s input: completion and
  mask shapes, every completion id (padding included: it is embedded too) and every real prompt id inside the
  vocabulary, and prompt bucket + completion length within the cache (`max_cache_len`, default
  model.config.max_seq_len).
  """
  if (token_sets is None) != (anchors is None):
    raise ValueError("category log-mass needs both token_sets and anchors")
  if token_sets is not None and token_sets.shape[-1] != model.config.vocab_size:
    raise ValueError(f"token_sets vocab {token_sets.shape[-1]} != model vocab {model.config.vocab_size}")
  p, b = seqs.prompt.tokens.shape[0], seqs.completion.shape[0]
  if b != p * seqs.num_samples:
    raise ValueError(f"{b} completion rows for {p} prompts x {seqs.num_samples} samples")
  if np.any(np.diff(np.asarray(seqs.prompt.mask).astype(np.int8), axis=1) < 0):
    raise ValueError("seqs.prompt is not left-padded; build it with prepare_prompts / make_sequences")
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
  ptok, pmask = np.asarray(seqs.prompt.tokens), np.asarray(seqs.prompt.mask).astype(bool)
  bad = ((ptok < 0) | (ptok >= vocab)) & pmask
  if bad.any():
    raise ValueError(f"seqs.prompt.tokens holds ids outside the vocabulary [0, {vocab}): "
                     f"{np.unique(ptok[bad])[:8].tolist()} in prompts {np.nonzero(bad.any(1))[0][:8].tolist()}")
  length, t = ptok.shape[1], np.shape(seqs.completion)[1]
  limit = max_cache_len if max_cache_len is not None else getattr(model.config, "max_seq_len", None)
  if limit is not None and length + t > limit:
    raise ValueError(f"prompt bucket {length} + completion length {t} = {length + t} exceeds the cache length "
                     f"{limit} (max_cache_len / model.config.max_seq_len)")
  layout = Layout.make(mesh, axis_rules) if mesh is not None else None
  _check_batch(layout, p)
  prompt = layout.put(seqs.prompt) if layout is not None else seqs.prompt
  spec = _ScoreSpec(seqs.num_samples, chunk_size, with_entropy, anchors, layout)
  completion, mask = seqs.completion, seqs.completion_mask
  if layout is not None:
    completion, mask = layout.place(completion), layout.place(mask)
  return _score_jit(model, spec, params, prompt, jnp.asarray(completion, jnp.int32), jnp.asarray(mask, bool),
                    token_sets)


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
  return base.ModelInputs(tokens=batch[f"{pre}prompt_tokens"], mask=batch[f"{pre}prompt_mask"],
                          positions=batch.get("mrope_positions", batch[f"{pre}positions"]) if not pre
                          else batch[f"{pre}positions"], **feats)
