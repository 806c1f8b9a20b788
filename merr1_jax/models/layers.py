"""Qwen2 building blocks in Flax NNX: RMSNorm, (M-)RoPE, GQA attention math, SwiGLU, one decoder block.

Every parameter carries logical axis names (`out_sharding` metadata, eager sharding off so no mesh is
needed to create it). Blocks are built `stacked`: each parameter has a leading 'layers' axis of size N,
so the decoder can scan over them or unroll them with the same parameter tree.

Precision: parameters are stored in `param_dtype` and cast to `compute_dtype` at use; norms, rotary
angles, attention scores and softmax run in float32 (bf16 softmax loses the tail mass log-probs need).

Shape legend: B batch, L query tokens, S key slots, D d_model, H query heads, K kv heads, G = H // K,
Dh head dim, F mlp width, N layers. In `attend_grouped` (prefix grouping): P prefixes of L tokens, G suffixes of
T tokens per prefix, J = H // K.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ATTENTION_KINDS is re-exported: what the kernels below accept.
from merr1_jax.models.config import ATTENTION_KINDS, LORA_KERNELS, ModelConfig, lora_targets  # noqa: F401

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite "minus infinity": a fully masked row stays NaN-free


def make_param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype: Any,
               init: str = "normal", std: float = 0.02, stack: int | None = None) -> nnx.Param:
  """A parameter with logical axes; `stack` prepends a 'layers' axis."""
  if stack is not None:
    shape, axes = (stack, *shape), ("layers", *axes)
  if init == "normal":
    value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  elif init == "zeros":
    value = jnp.zeros(tuple(shape), jnp.float32)
  elif init == "ones":
    value = jnp.ones(tuple(shape), jnp.float32)
  else:
    raise ValueError(f"unknown init {init!r}")
  return nnx.Param(value.astype(dtype), out_sharding=tuple(axes), eager_sharding=False)


def lead(w: jax.Array, ndim: int) -> jax.Array:
  """`w` with leading unit axes up to `ndim`: a broadcast written out, so that implicit rank promotion can be
  an error (the tests set jax_numpy_rank_promotion="raise")."""
  return w.reshape((1,) * (ndim - w.ndim) + w.shape)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * lead(scale.astype(jnp.float32), y.ndim)).astype(x.dtype)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype: Any, stack: int | None = None):
    self.scale = make_param(None, (dim,), ("norm",), dtype, init="ones", stack=stack)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


# ------------------------------------------------------------------------------------------------ rotary


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 mrope_section: Sequence[int] | None) -> tuple[jax.Array, jax.Array]:
  """float32 cos/sin [B, L, Dh] in the rotate-half layout (frequencies repeated over both halves).

  positions: [B, L] or, with M-RoPE, [B, L, 3] temporal/height/width ids (batch-major like every other batch
  array; this is the one place the position axis is split off). M-RoPE gives the first section[0] frequencies
  to the temporal ids, the next section[1] to height and the last to width; a [B, L] input under M-RoPE means
  text, where the three ids coincide.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
  if mrope_section is None:
    if positions.ndim != 2:
      raise ValueError(f"1-D RoPE model got positions of shape {positions.shape}; expected [B, L]")
    ang_BxLxR = positions.astype(jnp.float32)[..., None] * lead(inv_freq, 3)
  else:
    if positions.ndim == 2:
      positions = jnp.broadcast_to(positions[..., None], (*positions.shape, 3))
    if positions.ndim != 3 or positions.shape[-1] != 3:
      raise ValueError(f"M-RoPE model got positions of shape {positions.shape}; expected [B, L, 3]")
    ang_BxLx3xR = positions.astype(jnp.float32)[..., None] * lead(inv_freq, 4)
    # One-hot choice of the position axis per frequency: exact in float32 (x*1 + y*0 + z*0).
    axis_of_freq = np.repeat(np.arange(3), np.asarray(mrope_section))
    onehot_3xR = jnp.asarray(axis_of_freq[None, :] == np.arange(3)[:, None], jnp.float32)
    ang_BxLxR = jnp.einsum("blar,ar->blr", ang_BxLx3xR, onehot_3xR)
  ang_BxLxDh = jnp.concatenate([ang_BxLxR, ang_BxLxR], axis=-1)
  return jnp.cos(ang_BxLxDh), jnp.sin(ang_BxLxDh)


def apply_rope(x_BxLxHxDh: jax.Array, cos_BxLxDh: jax.Array, sin_BxLxDh: jax.Array) -> jax.Array:
  x = x_BxLxHxDh.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_BxLxDh[:, :, None, :] + rotated * sin_BxLxDh[:, :, None, :]
  return out.astype(x_BxLxHxDh.dtype)


# --------------------------------------------------------------------------------------------- attention


def attend(q_BxLxHxDh: jax.Array, k_BxSxKxDh: jax.Array, v_BxSxKxDh: jax.Array,
           mask_BxLxS: jax.Array) -> jax.Array:
  """Grouped-query softmax attention; scores and softmax in float32."""
  b, l, h, dh = q_BxLxHxDh.shape
  kh = k_BxSxKxDh.shape[2]
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, kh, h // kh, dh)
  s_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxSxKxDh,
                           preferred_element_type=jnp.float32) * (dh ** -0.5)
  s_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], s_BxKxGxLxS, _NEG)
  p_BxKxGxLxS = jax.nn.softmax(s_BxKxGxLxS, axis=-1)
  o = jnp.einsum("bkgls,bskd->blkgd", p_BxKxGxLxS.astype(v_BxSxKxDh.dtype), v_BxSxKxDh,
                 preferred_element_type=jnp.float32)
  return o.reshape(b, l, h, dh).astype(q_BxLxHxDh.dtype)


def attend_grouped(q_PxGxTxHxDh: jax.Array, k_PxLxKxDh: jax.Array, v_PxLxKxDh: jax.Array, mask_PxL: jax.Array,
                   ks_PxGxTxKxDh: jax.Array, vs_PxGxTxKxDh: jax.Array, mask_PxGxTxT: jax.Array) -> jax.Array:
  """Attention of G suffixes per prefix to their shared prefix's keys and, causally, to their own (prefix grouping).

  Every suffix token attends to the P-th prefix's valid keys (all of them precede it) and to the keys of its own
  suffix that `mask_PxGxTxT` allows. The prefix keys and values enter once per prefix and are broadcast over G
  inside the einsums: no [P x G, L, ...] copy exists in the forward pass, and their gradient is the sum over the
  G suffixes. One softmax over both key sets, float32, as `attend`: the same numbers as attending to the
  concatenated sequence, up to the order of the sums.
  """
  p, g, t, h, dh = q_PxGxTxHxDh.shape
  kh = k_PxLxKxDh.shape[2]
  q = q_PxGxTxHxDh.reshape(p, g, t, kh, h // kh, dh)
  s_pref = jnp.einsum("pgtkjd,plkd->pgkjtl", q, k_PxLxKxDh, preferred_element_type=jnp.float32) * (dh ** -0.5)
  s_self = jnp.einsum("pgtkjd,pgskd->pgkjts", q, ks_PxGxTxKxDh, preferred_element_type=jnp.float32) * (dh ** -0.5)
  s_pref = jnp.where(mask_PxL[:, None, None, None, None, :], s_pref, _NEG)
  s_self = jnp.where(mask_PxGxTxT[:, :, None, None], s_self, _NEG)
  prob = jax.nn.softmax(jnp.concatenate([s_pref, s_self], axis=-1), axis=-1)
  p_pref, p_self = prob[..., :s_pref.shape[-1]], prob[..., s_pref.shape[-1]:]
  o = (jnp.einsum("pgkjtl,plkd->pgtkjd", p_pref.astype(v_PxLxKxDh.dtype), v_PxLxKxDh,
                  preferred_element_type=jnp.float32)
       + jnp.einsum("pgkjts,pgskd->pgtkjd", p_self.astype(vs_PxGxTxKxDh.dtype), vs_PxGxTxKxDh,
                    preferred_element_type=jnp.float32))
  return o.reshape(p, g, t, h, dh).astype(q_PxGxTxHxDh.dtype)


# ------------------------------------------------------------------------------------ attention kernels
#
# ModelConfig.attention picks how the prompt-length passes attend: 'reference' is the einsum code above (the
# default, what every parity test pins); 'blocked' is the same einsums one query block at a time, skipping the key
# blocks a causal mask hides (exact; the fastest choice on a CPU for long prompts); 'xla' and 'cudnn' are
# jax.nn.dot_product_attention's implementations (cuDNN's fused flash attention needs a GPU and bf16/fp16 inputs).
# Decode steps always use attend_grouped: one query per row against the prompt read once per prompt, exact, where
# a fused kernel's bf16 log-sum-exp would make the two-part merge inexact. A TPU Pallas kernel is not wired in.
# docs/architecture.md, "Attention kernels".

# Query positions per block of the 'blocked' kind. At L = 1024 it computes 36 of the 64 score tiles a full pass
# computes. 128 was picked on the 2-core AMD EPYC box by timing one layer's prompt attention, forward + backward
# (64 and 256 within 5% of it, 512 about 1.6x slower; a one-off check, not a benchmark figure: the measured effect
# on the RL step is in docs/benchmarks/rl_step.md, "RL step: the MER step with causal-block attention").
CAUSAL_BLOCK = 128


def attend_causal_blocks(q_BxLxHxDh: jax.Array, k_BxLxKxDh: jax.Array, v_BxLxKxDh: jax.Array,
                         mask_BxLxL: jax.Array, block: int = CAUSAL_BLOCK) -> jax.Array:
  """`attend` for a causal self-attention pass (key j is query j's position; the mask allows no key after its
  query), one block of `block` queries at a time against the keys up to the block's end: the keys it skips are
  masked in every row of the block, so it computes the same softmax as `attend` up to the order of the sums,
  with about half the score work at L >> block and smaller intermediates. Rows the mask leaves without a key
  (padding) average their block's visible values instead of all L: nothing reads them."""
  l = q_BxLxHxDh.shape[1]
  if k_BxLxKxDh.shape[1] != l or mask_BxLxL.shape[1:] != (l, l):
    raise ValueError(f"attend_causal_blocks needs a self-attention pass: {l} queries, "
                     f"{k_BxLxKxDh.shape[1]} keys, mask {mask_BxLxL.shape}")
  if l <= block:
    return attend(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, mask_BxLxL)
  outs = [attend(q_BxLxHxDh[:, i:i + block], k_BxLxKxDh[:, :i + block], v_BxLxKxDh[:, :i + block],
                 mask_BxLxL[:, i:i + block, :i + block]) for i in range(0, l, block)]
  return jnp.concatenate(outs, axis=1)


def _fused(kind: str, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS):
  if kind == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(f"ModelConfig.attention='cudnn' needs a GPU (this backend is {jax.default_backend()!r}); "
                     "use 'reference' or 'xla'")
  return jax.nn.dot_product_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask=mask_BxLxS[:, None],
                                      implementation=kind)


def attention(kind: str, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, causal: bool = False):
  """`attend` through the chosen kernel. `causal`: the caller's mask allows no key after its query, key j being
  query j's position (a self-attention pass without a cache), which 'blocked' needs to skip key blocks; without
  it 'blocked' is 'reference'."""
  if kind == "blocked" and causal:
    return attend_causal_blocks(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS, CAUSAL_BLOCK)
  if kind in ("reference", "blocked"):
    return attend(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS)
  return _fused(kind, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_BxLxS)


def attention_grouped(kind: str, q_PxGxTxHxDh, k_PxLxKxDh, v_PxLxKxDh, mask_PxL, ks_PxGxSxKxDh, vs_PxGxSxKxDh,
                      mask_PxGxTxS):
  """`attend_grouped` through the chosen kernel, differentiable: each suffix attends to its prefix's keys and
  its own as one sequence. A fused kernel takes one key set per row, so the prefix K/V is broadcast over the G
  suffixes: G copies of a layer's prompt K/V (forward and backward), which the reference avoids. 'blocked' is
  'reference' here: every suffix token sees its whole prefix, so no key block is hidden from a query block."""
  if kind in ("reference", "blocked"):
    return attend_grouped(q_PxGxTxHxDh, k_PxLxKxDh, v_PxLxKxDh, mask_PxL, ks_PxGxSxKxDh, vs_PxGxSxKxDh, mask_PxGxTxS)
  p, g, t, h, dh = q_PxGxTxHxDh.shape
  l, s = k_PxLxKxDh.shape[1], ks_PxGxSxKxDh.shape[2]
  both = lambda pre, own: jnp.concatenate(  # noqa: E731 ([P, L, ...], [P, G, S, ...] -> [P*G, L + S, ...])
      [jnp.broadcast_to(pre[:, None], (p, g, *pre.shape[1:])), own], axis=2).reshape(p * g, l + s, *own.shape[3:])
  mask = jnp.concatenate([jnp.broadcast_to(mask_PxL[:, None, None, :], (p, g, t, l)), mask_PxGxTxS], axis=-1)
  o = _fused(kind, q_PxGxTxHxDh.reshape(p * g, t, h, dh), both(k_PxLxKxDh, ks_PxGxSxKxDh),
             both(v_PxLxKxDh, vs_PxGxSxKxDh), mask.reshape(p * g, t, l + s))
  return o.reshape(p, g, t, h, dh)


# The base projections, written as before LoRA existed (the same XLA dots, so runs without adapters are unchanged).
_PROJ_EINSUM = {"q": "bld,dhk->blhk", "k": "bld,dhk->blhk", "v": "bld,dhk->blhk", "o": "blhk,hkd->bld",
                "gate": "bld,df->blf", "up": "bld,df->blf", "down": "blf,fd->bld"}


def lora_dropout_input(x: jax.Array, key: jax.Array, rate: float, name: str) -> jax.Array:
  """Inverted dropout of an adapter's input: each element of x kept with probability 1 - rate and scaled by
  1 / (1 - rate), else 0. The mask is jax.random.bernoulli(fold_in(key, i), 1 - rate, x.shape) with i the
  kernel's index in LORA_KERNELS, so each projection of a layer draws its own mask (PEFT: one Dropout each)."""
  if not rate:
    return x
  keep = jax.random.bernoulli(jax.random.fold_in(key, list(LORA_KERNELS).index(name)), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm decoder block: x + o(attn(norm(x))), then x + down(silu(gate(h)) * up(h)), h = norm(x).

  Split in two halves (`qkv`, `finish`) so the decoder owns the cache writes between them.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
    d, h, kh, dh, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    pdt, std = cfg.jnp_param_dtype, cfg.init_std
    p = lambda shape, axes, init="normal": make_param(rngs, shape, axes, pdt, init, std, stack)
    self.input_norm = RMSNorm(d, cfg.rms_eps, pdt, stack)
    self.q_kernel = p((d, h, dh), ("embed", "q_heads", "head_dim"))
    self.k_kernel = p((d, kh, dh), ("embed", "kv_heads", "head_dim"))
    self.v_kernel = p((d, kh, dh), ("embed", "kv_heads", "head_dim"))
    if cfg.qkv_bias:
      self.q_bias = p((h, dh), ("q_heads", "head_dim"), "zeros")
      self.k_bias = p((kh, dh), ("kv_heads", "head_dim"), "zeros")
      self.v_bias = p((kh, dh), ("kv_heads", "head_dim"), "zeros")
    self.o_kernel = p((h, dh, d), ("q_heads", "head_dim", "embed"))
    self.post_norm = RMSNorm(d, cfg.rms_eps, pdt, stack)
    self.gate_kernel = p((d, f), ("embed", "mlp"))
    self.up_kernel = p((d, f), ("embed", "mlp"))
    self.down_kernel = p((f, d), ("mlp", "embed"))
    self.qkv_bias = cfg.qkv_bias
    self.cdt = cfg.jnp_compute_dtype
    # LoRA adapters (models/lora.py), float32 whatever the base's dtype. A starts at zero here and is drawn by
    # MultimodalPolicy.init_params from its own key, so the base's initial values do not depend on LoRA.
    self.lora = lora_targets(cfg)
    self.lora_scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0
    self.lora_dropout = float(cfg.lora_dropout)
    axes = {"q": ("embed", "q_heads", "head_dim"), "k": ("embed", "kv_heads", "head_dim"),
            "v": ("embed", "kv_heads", "head_dim"), "o": ("q_heads", "head_dim", "embed"),
            "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
    for name in self.lora:
      shape, n_in = getattr(self, f"{name}_kernel").shape[1 if stack is not None else 0:], LORA_KERNELS[name]
      ax, r = axes[name], cfg.lora_rank
      setattr(self, f"{name}_lora_a", make_param(None, (*shape[:n_in], r), (*ax[:n_in], "lora"), jnp.float32,
                                                 "zeros", stack=stack))
      setattr(self, f"{name}_lora_b", make_param(None, (r, *shape[n_in:]), ("lora", *ax[n_in:]), jnp.float32,
                                                 "zeros", stack=stack))

  def _w(self, param: nnx.Param) -> jax.Array:
    return param[...].astype(self.cdt)

  def _proj(self, name: str, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """x @ <name>_kernel over the kernel's input axes, plus the adapter's (alpha / r) (x A) B when it has one.

    With a `dropout_key` and lora_dropout > 0 the adapter sees lora_dropout_input(x, key, p, name) instead of x
    (the base path never does)."""
    n_in = LORA_KERNELS[name]
    y = jnp.einsum(_PROJ_EINSUM[name], x, self._w(getattr(self, f"{name}_kernel")))
    if name in self.lora:
      xd = x if dropout_key is None else lora_dropout_input(x, dropout_key, self.lora_dropout, name)
      xa = jnp.tensordot(xd, self._w(getattr(self, f"{name}_lora_a")), axes=n_in)
      y = y + self.lora_scale * jnp.tensordot(xa, self._w(getattr(self, f"{name}_lora_b")), axes=1)
    return y

  def qkv(self, x_BxLxD, cos_BxLxDh, sin_BxLxDh, dropout_key=None):
    h = self.input_norm(x_BxLxD)
    q, k, v = (self._proj(n, h, dropout_key) for n in ("q", "k", "v"))
    if self.qkv_bias:
      q, k, v = (q + lead(self._w(self.q_bias), q.ndim), k + lead(self._w(self.k_bias), k.ndim),
                 v + lead(self._w(self.v_bias), v.ndim))
    return apply_rope(q, cos_BxLxDh, sin_BxLxDh), apply_rope(k, cos_BxLxDh, sin_BxLxDh), v

  def finish(self, x_BxLxD, attn_BxLxHxDh, dropout_key=None):
    x = x_BxLxD + self._proj("o", attn_BxLxHxDh, dropout_key)
    h = self.post_norm(x)
    gate = jax.nn.silu(self._proj("gate", h, dropout_key))
    return x + self._proj("down", gate * self._proj("up", h, dropout_key), dropout_key)
