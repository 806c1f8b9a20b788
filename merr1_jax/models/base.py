"""The model seam: the `PolicyModel` protocol the RL code depends on, its input/cache structs and helpers.

The RL code (rollout sampler, train step) holds `params` as a pytree and calls pure methods of a
`PolicyModel`, so `jax.jit`, `jax.grad`, buffer donation and shardings apply to params directly. It never
touches a model class. To port another model, implement this protocol and pass
`merr1_jax.models.contract.check_policy_contract`. The contract every adapter guarantees (forward == hidden @
unembed_weight, explicit batch-major positions, causal masked attention, a batch-major KV cache, no mesh to create
params, host-side `validate_inputs`) is in docs/porting.md, "What to implement".

Shape legend: B batch, L new tokens, S cache slots, D d_model, V vocab, N layers, K kv heads,
H query heads, Dh head dim, T feature rows (Tv video, Ta audio), F feature width.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp

Params = Any  # a pytree of arrays (an nnx.State for the bundled adapters)
PartitionRules = Sequence[tuple[str, tuple[str | None, ...]]]


@flax.struct.dataclass
class ModelInputs:
  """One batch as the data pipeline hands it over.

  tokens_BxL: int32 ids; video/audio placeholders where features go.
  positions: int32 `[B, L]` or `[B, L, 3]` (M-RoPE t/h/w ids).
  mask_BxL: bool, False on padding.
  video_BxTvxF / audio_BxTaxF: float features or None; *_mask_BxT: bool, True on real feature rows.
  Convention (shared with the data pipeline): in row b, #video placeholders == sum(video_mask[b]) and the
  k-th placeholder receives the k-th valid feature row; same for audio.
  """

  tokens: jax.Array
  positions: jax.Array
  mask: jax.Array
  video: jax.Array | None = None
  video_mask: jax.Array | None = None
  audio: jax.Array | None = None
  audio_mask: jax.Array | None = None


@flax.struct.dataclass
class Embedded:
  """The decoder's input: x_BxLxD in compute dtype, positions as in ModelInputs, mask_BxL."""

  x: jax.Array
  positions: jax.Array
  mask: jax.Array


@flax.struct.dataclass
class KVCache:
  """Explicit KV cache; every leaf is batch-major so repeat/shard along axis 0 treat them alike.

  k, v: [B, N, S, K, Dh] in compute dtype (one slab for all layers, so a layer scan can carry it).
  valid: [B, S] bool, True where a slot holds a real (unpadded) token.
  index: [B] int32, the next write slot. Equal across rows by construction (writes are shared); the model
    reads index[0]. It is stored per row only so that the cache repeats and shards like the other leaves.
  """

  k: jax.Array
  v: jax.Array
  valid: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  def repeat(self, group: int) -> "KVCache":
    """Each row repeated `group` times consecutively (prompt p -> rows p*G .. p*G+G-1)."""
    return jax.tree.map(lambda a: jnp.repeat(a, group, axis=0), self)


@flax.struct.dataclass
class SharedPrefixCache:
  """The decode cache of G rows per prompt (shared-prefix decoding, docs/architecture.md "Rollouts").

  prefix: a KVCache of the P prompts (P rows, the prompt's slots; read, never written, while decoding).
  suffix: a KVCache of the B = P*G rows (row r = p*G + g belongs to prompt p) holding only the generated tokens.
  A decode step attends to both and merges them exactly (models/layers.attend_grouped): the prompt's K/V is
  read once per prompt instead of once per row, and stored once (the cache shrinks by about G on long prompts).
  A model that accepts it in `hidden` says so with a class attribute `shared_prefix_decode = True`.
  """

  prefix: KVCache
  suffix: KVCache

  @property
  def group(self) -> int:
    return self.suffix.k.shape[0] // self.prefix.k.shape[0]


def empty_cache(batch: int, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int,
                dtype: Any) -> KVCache:
  shape = (batch, num_layers, max_len, num_kv_heads, head_dim)
  return KVCache(
      k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
      valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((batch,), jnp.int32))


@runtime_checkable
class PolicyModel(Protocol):
  """What the RL code needs from a model. All methods are pure; params are passed in."""

  config: Any  # has at least vocab_size, d_model, num_layers

  def init_params(self, rng: jax.Array) -> Params: ...

  def embed(self, params: Params, inputs: ModelInputs) -> Embedded: ...

  def hidden(self, params: Params, x: Embedded,
             cache: Any | None = None) -> tuple[jax.Array, Any | None]:
    """Final-normed hidden states h_BxLxD (compute dtype) and the updated cache (None without one).

    Optional: a `dropout_key=` keyword (a PRNG key) that turns on training-time dropout, e.g. LoRA's input
    dropout (ModelConfig.lora_dropout). The train steps pass it only when the config asks for dropout, so a
    model without the keyword works everywhere else."""
    ...

  def forward(self, params: Params, x: Embedded,
              cache: Any | None = None) -> tuple[jax.Array, Any | None]:
    """float32 logits_BxLxV == logits_from_hidden(h, unembed_weight(params)), and the updated cache."""
    ...

  def unembed_weight(self, params: Params) -> jax.Array:
    """w_DxV, so the RL code can compute log-probs in vocabulary chunks."""
    ...

  def init_cache(self, batch: int, max_len: int, dtype: Any | None = None) -> Any: ...

  def partition_rules(self) -> PartitionRules:
    """(regex over '/'-joined param paths, logical axes) pairs; first match wins; covers every param."""
    ...

  def validate_inputs(self, inputs: ModelInputs) -> None:
    """Host-side check of a concrete batch (numpy or jax arrays) before anything is jitted, of what the traced
    `embed` cannot check: per row, the number of video / audio placeholder tokens equals the number of valid
    feature rows (mask True); features have the [B, T, F] shape the model's projector takes and come with
    their mask; no features for a modality the model lacks. Raises ValueError naming the modality, the rows and
    the counts; returns None and leaves `inputs` unchanged otherwise. A text-only adapter checks that no
    features are given. The sampler calls it on every prompt batch (rollout/shared_prefix.py)."""
    ...


def fold_key(key: jax.Array | None, i: Any) -> jax.Array | None:
  """fold_in(key, i), or None for no key: the dropout keys (layer, update, micro-batch) derive this way."""
  return None if key is None else jax.random.fold_in(key, i)


def dropout_kwargs(key: jax.Array | None) -> dict[str, jax.Array]:
  """The optional `dropout_key=` of PolicyModel.hidden / hidden_grouped, passed only when there is a key, so a
  model without the keyword runs every dropout-free pass."""
  return {} if key is None else {"dropout_key": key}


def hidden_grouped(model: PolicyModel, params: Params, prefix: Embedded, suffixes: Sequence[Embedded],
                   dropout_key: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """(h_PxLxD, per segment h_PxGxTxD): P prefixes and segments of G suffixes each, every suffix attending to its
  prefix and causally to itself (the RL step's passes, merr1_jax/rollout/passes.py).

  A model with a `hidden_grouped` member computes each prefix once per group (models/layers.attend_grouped). Any
  other PolicyModel gets the same numbers from `hidden` on each prefix + suffix sequence: the prefix repeated per
  suffix, slower, but no method to write (docs/porting.md)."""
  if callable(getattr(model, "hidden_grouped", None)):
    h_p, h_s = model.hidden_grouped(params, prefix, list(suffixes), **dropout_kwargs(dropout_key))
    return h_p, tuple(h_s)
  if not suffixes:
    return model.hidden(params, prefix, **dropout_kwargs(dropout_key))[0], ()
  p, l = prefix.mask.shape
  h_p, outs = None, []
  for j, s in enumerate(suffixes):
    g, t = s.mask.shape[1:3]
    rep = lambda a: jnp.repeat(a, g, axis=0)  # noqa: E731 ([P, L, ...] -> rows p*G + g)
    flat = lambda a: a.reshape(p * g, t, *a.shape[3:])  # noqa: E731
    seq = Embedded(x=jnp.concatenate([rep(prefix.x), flat(s.x).astype(prefix.x.dtype)], 1),
                   positions=jnp.concatenate([rep(prefix.positions), flat(s.positions)], 1),
                   mask=jnp.concatenate([rep(prefix.mask), flat(s.mask)], 1).astype(bool))
    h, _ = model.hidden(params, seq, **dropout_kwargs(fold_key(dropout_key, j)))
    h = h.reshape(p, g, l + t, -1)
    h_p = h[:, 0, :l] if h_p is None else h_p
    outs.append(h[:, :, l:])
  return h_p, tuple(outs)


def logits_from_hidden(h_BxLxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
  """The unembedding every adapter uses: float32 accumulation and output (log-probs need the range)."""
  return jnp.einsum("bld,dv->blv", h_BxLxD, w_DxV.astype(h_BxLxD.dtype),
                    preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------- sharding


def path_str(path: Sequence[Any]) -> str:
  """'/'-joined names of a jax key path (DictKey / GetAttrKey / SequenceKey / plain strings)."""
  parts = []
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]  # an nnx.Variable's payload: the variable itself is the parameter
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  return "/".join(parts)


def logical_axes(params: Params, rules: PartitionRules) -> Any:
  """A pytree like `params` whose leaves are logical-axis tuples, from the first matching rule.

  Raises ValueError listing every parameter that no rule covers or whose rank differs from its rule's.
  """
  compiled = [(re.compile(pat), axes) for pat, axes in rules]
  problems: list[str] = []

  def pick(path, leaf):
    name = path_str(path)
    for pat, axes in compiled:
      if pat.search(name):
        if len(axes) != len(leaf.shape):
          problems.append(f"{name}: rule {pat.pattern!r} gives {axes} for shape {tuple(leaf.shape)}")
        return tuple(axes)
      # keep looking
    problems.append(f"{name}: no partition rule matches")
    return None

  out = jax.tree_util.tree_map_with_path(pick, params)
  if problems:
    raise ValueError("partition rules do not fit the parameters:\n  " + "\n  ".join(problems))
  return out


def logical_to_mesh_spec(axes: Sequence[str | None],
                         axis_rules: Mapping[str, str | tuple[str, ...] | None]) -> jax.sharding.PartitionSpec:
  """Maps logical names to mesh axes with a rules table from the config (e.g. {'embed': 'fsdp',
  'mlp': 'tensor', 'vocab': 'tensor'}); unknown or None names are replicated. A mesh axis is used at most
  once per array (the later dim stays replicated), as PartitionSpec requires."""
  used: set[str] = set()
  spec = []
  for name in axes:
    mesh_axes = axis_rules.get(name) if name is not None else None
    if mesh_axes is None:
      spec.append(None)
      continue
    tup = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if used & set(tup):
      spec.append(None)
      continue
    used |= set(tup)
    spec.append(tup[0] if len(tup) == 1 else tup)
  return jax.sharding.PartitionSpec(*spec)


def param_partition_specs(params: Params, rules: PartitionRules,
                          axis_rules: Mapping[str, str | tuple[str, ...] | None]) -> Any:
  """PartitionSpec pytree for `params`: partition_rules (path -> logical) then axis_rules (logical -> mesh)."""
  axes = logical_axes(params, rules)
  return jax.tree.map(lambda a: logical_to_mesh_spec(a, axis_rules), axes,
                      is_leaf=lambda a: isinstance(a, tuple))
