"""A Qwen2 / Qwen2.5 / Qwen2.5-Omni-thinker text decoder in Flax NNX, with an explicit KV cache.

Parameter tree (N = num_layers, every block parameter stacked on a leading 'layers' axis):
  embed/embedding [V, D]          layers/{input_norm,post_norm}/scale [N, D]
  layers/{q,k,v}_kernel [N, D, H|K, Dh]  layers/{q,k,v}_bias [N, H|K, Dh]  layers/o_kernel [N, H, Dh, D]
  layers/{gate,up}_kernel [N, D, F]      layers/down_kernel [N, F, D]
  final_norm/scale [D]            lm_head [D, V] (untied only)

Attention: causal by sequence order (cache-slot order with a cache) and restricted to keys whose mask /
validity is True, so left or right padding never leaks into real tokens. With a base.SharedPrefixCache the new
tokens attend to their prompt's shared slots and to their own (shared-prefix decoding).

Shape legend: B batch, L new tokens, S cache slots, D d_model, V vocab, N layers, K kv heads, Dh head dim.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from merr1_jax.models import base
from merr1_jax.models.config import ModelConfig
from merr1_jax.models.layers import (Block, RMSNorm, attend_grouped, attention, attention_grouped, make_param,
                                     rope_cos_sin)

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Embed(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.embedding = make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                                cfg.jnp_param_dtype, std=cfg.init_std)


class Decoder(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg, rngs=rngs)
    self.layers = Block(cfg, rngs=rngs, stack=cfg.num_layers)
    self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, cfg.jnp_param_dtype)
    if not cfg.tie_embeddings:
      self.lm_head = make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                cfg.jnp_param_dtype, std=cfg.init_std)

  def embed_tokens(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.embed.embedding[...], tokens_BxL, axis=0).astype(self.cfg.jnp_compute_dtype)

  def unembed_weight(self) -> jax.Array:
    if self.cfg.tie_embeddings:
      return self.embed.embedding[...].T
    return self.lm_head[...]

  def hidden(self, x_BxLxD: jax.Array, positions: jax.Array, mask_BxL: jax.Array,
             cache: base.KVCache | None = None, dropout_key: jax.Array | None = None
             ) -> tuple[jax.Array, base.KVCache | None]:
    """Final-normed hidden states and the updated cache (None in, None out). A `dropout_key` turns on the LoRA
    adapters' input dropout (cfg.lora_dropout), layer i drawing from fold_in(dropout_key, i)."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    x = x_BxLxD.astype(cfg.jnp_compute_dtype)
    mask_BxL = mask_BxL.astype(bool)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    if isinstance(cache, base.SharedPrefixCache):
      return self._hidden_shared(x, cos, sin, mask_BxL, cache, dropout_key)

    # A self-attention pass (key slot j is query j's position): no cache, or a cache of exactly L slots (the
    # shared-prefix prefill into a fresh cache: writing L tokens into L slots can only start at slot 0; any other
    # index would overflow the cache, wrong under every kernel). layers.attention's 'blocked' needs it.
    causal = cache is None or cache.max_len == l
    if cache is None:
      causal_LxL = jnp.tril(jnp.ones((l, l), bool))
      attn_mask = mask_BxL[:, None, :] & causal_LxL[None]
      idx, valid = None, None
    else:
      idx = cache.index[0]  # one shared write slot for all rows (see base.KVCache)
      valid = jax.lax.dynamic_update_slice(cache.valid, mask_BxL, (0, idx))
      slot_S = jnp.arange(cache.max_len)
      q_slot_L = idx + jnp.arange(l)
      attn_mask = valid[:, None, :] & (slot_S[None, None, :] <= q_slot_L[None, :, None])

    graphdef, layer_state = nnx.split(self.layers)

    def layer(i, layer_params, x, k_all, v_all):
      blk = nnx.merge(graphdef, layer_params)
      key = base.fold_key(dropout_key, i)
      q, k, v = blk.qkv(x, cos, sin, key)
      if k_all is None:
        keys, vals = k, v
      else:
        # Write only the L new slots of layer i, then read that layer's whole slab for attention.
        k_all = jax.lax.dynamic_update_slice(k_all, k[:, None].astype(k_all.dtype), (0, i, idx, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, v[:, None].astype(v_all.dtype), (0, i, idx, 0, 0))
        keys = jax.lax.dynamic_index_in_dim(k_all, i, axis=1, keepdims=False).astype(q.dtype)
        vals = jax.lax.dynamic_index_in_dim(v_all, i, axis=1, keepdims=False).astype(q.dtype)
      return (blk.finish(x, attention(cfg.attention, q, keys, vals, attn_mask, causal=causal), key),
              k_all, v_all)

    k_all = None if cache is None else cache.k
    v_all = None if cache is None else cache.v
    x, k_all, v_all = self._run_layers(layer, layer_state, (x, k_all, v_all))
    h = self.final_norm(x)
    if cache is None:
      return h, None
    return h, base.KVCache(k=k_all, v=v_all, valid=valid, index=cache.index + l)


  def _hidden_shared(self, x_BxLxD, cos, sin, mask_BxL, cache: base.SharedPrefixCache, dropout_key):
    """`hidden` with a SharedPrefixCache: the L new tokens of each row go into its suffix cache; they attend to
    their prompt's prefix slots (P rows, shared by the G rows of a prompt) and, causally, to their own suffix."""
    pre, suf = cache.prefix, cache.suffix
    b, l, _ = x_BxLxD.shape
    p = pre.k.shape[0]
    g = b // p
    idx = suf.index[0]  # one shared write slot for all rows, as in `hidden`
    valid = jax.lax.dynamic_update_slice(suf.valid, mask_BxL, (0, idx))
    slot_S = jnp.arange(suf.max_len)
    self_mask = valid[:, None, :] & (slot_S[None, None, :] <= (idx + jnp.arange(l))[None, :, None])
    self_mask_PxGxLxS = self_mask.reshape(p, g, l, suf.max_len)
    split = lambda a: a.reshape(p, g, *a.shape[1:])  # noqa: E731 (rows p*G + g -> [P, G, ...])
    graphdef, layer_state = nnx.split(self.layers)

    def layer(i, layer_params, x, k_all, v_all):
      blk = nnx.merge(graphdef, layer_params)
      key = base.fold_key(dropout_key, i)
      q, k, v = blk.qkv(x, cos, sin, key)
      k_all = jax.lax.dynamic_update_slice(k_all, k[:, None].astype(k_all.dtype), (0, i, idx, 0, 0))
      v_all = jax.lax.dynamic_update_slice(v_all, v[:, None].astype(v_all.dtype), (0, i, idx, 0, 0))
      layer_of = lambda a: jax.lax.dynamic_index_in_dim(a, i, axis=1, keepdims=False).astype(q.dtype)  # noqa: E731
      # Always the einsum form, whatever cfg.attention says (layers.py, "attention kernels").
      o = attend_grouped(split(q), layer_of(pre.k), layer_of(pre.v), pre.valid, split(layer_of(k_all)),
                         split(layer_of(v_all)), self_mask_PxGxLxS)
      return blk.finish(x, o.reshape(q.shape), key), k_all, v_all

    x, k_all, v_all = self._run_layers(layer, layer_state, (x_BxLxD, suf.k, suf.v))
    suffix = base.KVCache(k=k_all, v=v_all, valid=valid, index=suf.index + l)
    return self.final_norm(x), cache.replace(suffix=suffix)

  def _run_layers(self, layer, layer_state, carry):
    """carry -> layer(i, params_i, *carry) for i = 0 .. N-1: one lax.scan over the stacked blocks, or unrolled;
    rematerialised per block when cfg.remat says so."""
    cfg = self.cfg
    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      def body(c, xs):
        i, layer_params = xs
        return layer(i, layer_params, *c), None

      carry, _ = jax.lax.scan(body, carry, (jnp.arange(cfg.num_layers), layer_state))
      return carry
    for i in range(cfg.num_layers):
      carry = layer(i, jax.tree.map(lambda a, i=i: a[i], layer_state), *carry)
    return carry

  def hidden_grouped(self, x_PxLxD: jax.Array, positions: jax.Array, mask_PxL: jax.Array,
                     suffixes: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
                     dropout_key: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Final-normed hidden states of P prefixes and of each segment of G suffixes per prefix (prefix grouping).

    `suffixes` holds (x_PxGxTxD, positions [P, G, T] or [P, G, T, 3], mask_PxGxT) per segment (e.g. one per
    thinking mode, each with its own G and T). Every suffix token attends to its prefix's valid tokens and
    causally to its own suffix's valid tokens (layers.attend_grouped): the prefix is computed once per group, and
    the hidden states equal those of `hidden` on each prefix + suffix sequence (up to the order of float sums).
    With a `dropout_key` (LoRA input dropout) layer i's prefix draws from fold_in(fold_in(key, i), 0) and segment
    j's suffixes from fold_in(fold_in(key, i), 1 + j): one prefix mask per group, which the G ungrouped rows would
    each have drawn anew (the same in expectation, not bit for bit).
    """
    cfg = self.cfg
    dt = cfg.jnp_compute_dtype
    p, l, d = x_PxLxD.shape
    mask_PxL = mask_PxL.astype(bool)
    cos_p, sin_p = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    pref_mask = mask_PxL[:, None, :] & jnp.tril(jnp.ones((l, l), bool))[None]
    segs = []
    for x_s, pos_s, m_s in suffixes:
      _, g, t, _ = x_s.shape
      cos, sin = rope_cos_sin(pos_s.reshape(p * g, t, *pos_s.shape[3:]), cfg.head_dim, cfg.rope_theta,
                              cfg.mrope_section)
      self_mask = m_s.astype(bool)[:, :, None, :] & jnp.tril(jnp.ones((t, t), bool))[None, None]
      segs.append((g, t, cos, sin, self_mask))
    graphdef, layer_state = nnx.split(self.layers)

    def layer(i, layer_params, x_p, xs):
      blk = nnx.merge(graphdef, layer_params)
      key = base.fold_key(dropout_key, i)
      pk = base.fold_key(key, 0)
      q, k, v = blk.qkv(x_p, cos_p, sin_p, pk)
      out = []
      for j, (x_s, (g, t, cos, sin, self_mask)) in enumerate(zip(xs, segs)):
        sk = base.fold_key(key, 1 + j)
        qs, ks, vs = blk.qkv(x_s.reshape(p * g, t, d), cos, sin, sk)
        split = lambda a: a.reshape(p, g, t, *a.shape[2:])  # noqa: E731
        o = attention_grouped(cfg.attention, split(qs), k, v, mask_PxL, split(ks), split(vs), self_mask)
        out.append(blk.finish(x_s.reshape(p * g, t, d), o.reshape(p * g, t, *o.shape[3:]), sk).reshape(p, g, t, d))
      return blk.finish(x_p, attention(cfg.attention, q, k, v, pref_mask, causal=True), pk), tuple(out)

    x_p, xs = self._run_layers(layer, layer_state, (x_PxLxD.astype(dt), tuple(x.astype(dt) for x, _, _ in suffixes)))
    return self.final_norm(x_p), tuple(self.final_norm(x) for x in xs)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any | None = None) -> base.KVCache:
  return base.empty_cache(batch, cfg.num_layers, max_len, cfg.num_kv_heads, cfg.head_dim,
                          dtype or cfg.jnp_compute_dtype)


def partition_rules(prefix: str = "") -> list[tuple[str, tuple[str | None, ...]]]:
  """Path regex -> logical axes for the decoder's parameters (the same axes the Params carry)."""
  p = prefix
  return [
      (rf"{p}embed/embedding$", ("vocab", "embed")),
      (rf"{p}lm_head$", ("embed", "vocab")),
      (rf"{p}final_norm/scale$", ("norm",)),
      (rf"{p}layers/(input_norm|post_norm)/scale$", ("layers", "norm")),
      (rf"{p}layers/q_kernel$", ("layers", "embed", "q_heads", "head_dim")),
      (rf"{p}layers/(k|v)_kernel$", ("layers", "embed", "kv_heads", "head_dim")),
      (rf"{p}layers/q_bias$", ("layers", "q_heads", "head_dim")),
      (rf"{p}layers/(k|v)_bias$", ("layers", "kv_heads", "head_dim")),
      (rf"{p}layers/o_kernel$", ("layers", "q_heads", "head_dim", "embed")),
      (rf"{p}layers/(gate|up)_kernel$", ("layers", "embed", "mlp")),
      (rf"{p}layers/down_kernel$", ("layers", "mlp", "embed")),
      # LoRA adapters (models/lora.py): A has the kernel's input axes, B its output axes; the rank is replicated.
      (rf"{p}layers/(q|k|v|gate|up)_lora_a$", ("layers", "embed", "lora")),
      (rf"{p}layers/o_lora_a$", ("layers", "q_heads", "head_dim", "lora")),
      (rf"{p}layers/down_lora_a$", ("layers", "mlp", "lora")),
      (rf"{p}layers/q_lora_b$", ("layers", "lora", "q_heads", "head_dim")),
      (rf"{p}layers/(k|v)_lora_b$", ("layers", "lora", "kv_heads", "head_dim")),
      (rf"{p}layers/(gate|up)_lora_b$", ("layers", "lora", "mlp")),
      (rf"{p}layers/(o|down)_lora_b$", ("layers", "lora", "embed")),
  ]
