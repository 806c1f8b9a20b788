"""A Qwen2 / Qwen2.5 / Qwen2.5-Omni-thinker text decoder in Flax NNX, with an explicit KV cache.

Parameter tree (N = num_layers, every block parameter stacked on a leading 'layers' axis):
  embed/embedding [V, D]          layers/{input_norm,post_norm}/scale [N, D]
  layers/{q,k,v}_kernel [N, D, H|K, Dh]  layers/{q,k,v}_bias [N, H|K, Dh]  layers/o_kernel [N, H, Dh, D]
  layers/{gate,up}_kernel [N, D, F]      layers/down_kernel [N, F, D]
  final_norm/scale [D]            lm_head [D, V] (untied only)

Attention: causal by sequence order (cache-slot order with a cache) and restricted to keys whose mask /
validity is True, so left or right padding never leaks into real tokens.

Shape legend: B batch, L new tokens, S cache slots, D d_model, V vocab, N layers, K kv heads, Dh head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from merr1_jax.models import base
from merr1_jax.models.config import ModelConfig
from merr1_jax.models.layers import Block, RMSNorm, attend, make_param, rope_cos_sin

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
             cache: base.KVCache | None = None) -> tuple[jax.Array, base.KVCache | None]:
    """Final-normed hidden states and the updated cache (None in, None out)."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    x = x_BxLxD.astype(cfg.jnp_compute_dtype)
    mask_BxL = mask_BxL.astype(bool)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

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
      q, k, v = blk.qkv(x, cos, sin)
      if k_all is None:
        keys, vals = k, v
      else:
        # Write only the L new slots of layer i, then read that layer's whole slab for attention.
        k_all = jax.lax.dynamic_update_slice(k_all, k[:, None].astype(k_all.dtype), (0, i, idx, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, v[:, None].astype(v_all.dtype), (0, i, idx, 0, 0))
        keys = jax.lax.dynamic_index_in_dim(k_all, i, axis=1, keepdims=False).astype(q.dtype)
        vals = jax.lax.dynamic_index_in_dim(v_all, i, axis=1, keepdims=False).astype(q.dtype)
      return blk.finish(x, attend(q, keys, vals, attn_mask)), k_all, v_all

    if cfg.remat != "none":
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat])

    k_all = None if cache is None else cache.k
    v_all = None if cache is None else cache.v
    if cfg.scan_layers:
      def body(carry, xs):
        i, layer_params = xs
        return layer(i, layer_params, *carry), None

      (x, k_all, v_all), _ = jax.lax.scan(
          body, (x, k_all, v_all), (jnp.arange(cfg.num_layers), layer_state))
    else:
      for i in range(cfg.num_layers):
        layer_params = jax.tree.map(lambda a, i=i: a[i], layer_state)
        x, k_all, v_all = layer(i, layer_params, x, k_all, v_all)

    h = self.final_norm(x)
    if cache is None:
      return h, None
    return h, base.KVCache(k=k_all, v=v_all, valid=valid, index=cache.index + l)


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
  ]
