"""LoRA on the decoder's projections: which leaves are adapters, their init, merging, the reference, the base's hash.

The adapters live in the policy's own parameter tree, beside the kernel they adapt (layers.Block): for a targeted
kernel `layers/<name>_kernel` (ModelConfig.lora_targets), `layers/<name>_lora_a` holds A (the kernel's input axes
x r) and `layers/<name>_lora_b` holds B (r x its output axes), both float32 and stacked over layers like the kernel.
The projection computes `x W + (alpha / r) (x A) B` without forming `A B` (the frozen W then needs no weight
gradient). B starts at zero, so an adapted model starts as exactly its base.

Why in-tree adapters rather than a wrapper library: Flax NNX's `nnx.LoRA` wraps 2-D Linear kernels and qwix
rewrites the module graph; our kernels are head-shaped ([D, H, Dh], [H, Dh, D]) and stacked over layers for
`lax.scan`, and the train step already freezes by path regex (optim.split_trainable). Two leaves per kernel and
one extra `tensordot` pair keep everything else (sharding rules, checkpoints, HF I/O) working by path.

What the trainer does with them (docs/lora.md): a LoRA stage trains the adapters (and the leaves `lora.train_full`
names) and freezes the base; its reference policy is the base with the adapters disabled (`disabled`: B = 0), so
no second copy of the weights exists; its checkpoints hold the trainable leaves only, with the base's `fingerprint`.

Shape legend: N layers, D d_model, H query heads, K kv heads, Dh head dim, F mlp width, r rank.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax.models import base
from merr1_jax.models.config import LORA_KERNELS, ModelConfig, lora_targets

ADAPTER = re.compile(r"layers/(q|k|v|o|gate|up|down)_lora_(a|b)$")
# Not an adapter: a regex that re.search matches on every parameter path except the adapters (the freeze rule
# of a LoRA stage, extended by `freeze_rule` with the leaves that train in full).
_NOT_ADAPTER = r"^(?!.*layers/(?:q|k|v|o|gate|up|down)_lora_[ab]$)"


def is_adapter(path: str) -> bool:
  return ADAPTER.search(path) is not None


def freeze_rule(train_full: str = "") -> str:
  """The freeze regex of a LoRA stage: every leaf except the adapters and those `train_full` (a regex) matches."""
  if not train_full:
    return _NOT_ADAPTER + ".*"
  return _NOT_ADAPTER + f"(?!.*(?:{train_full})).*"


def flat_leaves(params) -> dict[str, Any]:
  return {base.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def init_adapters(params, cfg: ModelConfig, rng: jax.Array):
  """`params` with every A drawn afresh (normal, std 1 / sqrt(fan_in)) and every B zero.

  The draw uses its own key (fold_in(rng, kernel index)), so a model's base initial values are the same with and
  without adapters. Leaves keep their dtype (float32) and sharding."""
  names = list(LORA_KERNELS)

  def fresh(path, x):
    m = ADAPTER.search(base.path_str(path))
    if m is None:
      return x
    if m.group(2) == "b":
      return jnp.zeros_like(x)
    n_in = LORA_KERNELS[m.group(1)]
    fan_in = int(np.prod(x.shape[1:1 + n_in]))  # after the stacked 'layers' axis
    key = jax.random.fold_in(rng, 0x10BA + names.index(m.group(1)))
    return (jax.random.normal(key, x.shape, jnp.float32) * fan_in ** -0.5).astype(x.dtype)

  del cfg
  return jax.tree_util.tree_map_with_path(fresh, params)


def disabled(params):
  """The base policy: every B set to zero (x W + s (x A) 0 == x W exactly), every other leaf shared, not copied."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.lax.full_like(x, 0) if base.path_str(p).endswith("_lora_b") else x, params)


def delta(a, b, n_in: int, scale: float):
  """The kernel-shaped update (alpha / r) A B of one stacked adapter pair, float32: [N, in..., out...]."""
  n = a.shape[0]
  a2 = a.astype(jnp.float32).reshape(n, -1, a.shape[-1])  # [N, in, r]
  b2 = b.astype(jnp.float32).reshape(n, b.shape[1], -1)  # [N, r, out]
  # HIGHEST: a float32 product on every backend (TPU's default is one bfloat16 pass, GPU's may be TF32), so the
  # merged export and the stage fold do not depend on where they ran.
  prod = jnp.einsum("nir,nro->nio", a2, b2, precision=jax.lax.Precision.HIGHEST)
  return (scale * prod).reshape(*a.shape[:-1], *b.shape[2:])


def merged_leaves(params, cfg: ModelConfig) -> dict[str, Any]:
  """{path: leaf} of the base model with W + (alpha / r) A B in each adapted kernel, adapters left out.

  The sum is formed in float32 and cast to the kernel's dtype. models/lora_export.py puts the leaves back into the
  base model's tree (`merged`); `folded` puts them back into this one."""
  flat = flat_leaves(params)
  out = {}
  for name, x in flat.items():
    if is_adapter(name):
      continue
    m = re.search(r"layers/(q|k|v|o|gate|up|down)_kernel$", name)
    if m and m.group(1) in lora_targets(cfg):
      stem = name[: -len("_kernel")]
      d = delta(flat[stem + "_lora_a"], flat[stem + "_lora_b"], LORA_KERNELS[m.group(1)],
                cfg.lora_alpha / cfg.lora_rank)
      x = (x.astype(jnp.float32) + d).astype(x.dtype)
    out[name] = x
  return out


@jax.jit
def _leaf_hashes(leaves):
  """Two 32-bit position-mixed sums of each leaf's bits (wrapping uint32 arithmetic), on device: any changed
  value, swapped position or other dtype changes them with overwhelming probability. The flat position comes
  from per-axis iotas, so a sharded leaf is reduced where it lies (a reshape to 1-D would gather it)."""
  out = []
  for x in leaves:
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
    bits = bits.astype(jnp.uint32)
    idx = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
      idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= x.shape[axis]
    h1 = jnp.sum((bits ^ (idx * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA6B), dtype=jnp.uint32)
    h2 = jnp.sum((bits + idx * jnp.uint32(0xC2B2AE35)) * (idx | jnp.uint32(1)), dtype=jnp.uint32)
    out.append(jnp.stack([h1, h2]))
  return out


def fingerprint(params, skip=is_adapter) -> str:
  """A sha256 hex digest of the parameters' names, shapes, dtypes and values, adapters excluded by default: the
  identity of a LoRA stage's frozen base that its checkpoints record and resume compares.

  The values enter through per-leaf 64-bit device-side sums of their bits (`_leaf_hashes`), so hashing a sharded
  7B base reads each weight once on its own device and moves only 8 bytes per leaf to the host."""
  flat = sorted((n, x) for n, x in flat_leaves(params).items() if not skip(n))
  sums = jax.device_get(_leaf_hashes([x for _, x in flat]))
  h = hashlib.sha256()
  for (name, x), s in zip(flat, sums):
    h.update(f"{name}:{tuple(x.shape)}:{jnp.dtype(x.dtype).name}:{int(s[0])}:{int(s[1])};".encode())
  return h.hexdigest()


def count(cfg: ModelConfig) -> int:
  """Adapter parameters of `cfg` (A and B of every targeted kernel, every layer)."""
  d, h, k, dh, f, r = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.lora_rank
  io = {"q": (d, h * dh), "k": (d, k * dh), "v": (d, k * dh), "o": (h * dh, d), "gate": (d, f), "up": (d, f),
        "down": (f, d)}
  return cfg.num_layers * sum(r * (io[n][0] + io[n][1]) for n in lora_targets(cfg))


def folded(params, cfg: ModelConfig, rng: jax.Array):
  """`params` with the adapters merged into their kernels (`merged_leaves`) and fresh adapters (`init_adapters`, B = 0):
  the same policy, whose base is now the whole of it. A LoRA stage starts here, so its base (and its reference)
  is the policy the previous stage ended with. When every B is zero the base's values are unchanged (W + 0, up
  to the sign of a zero). The sum is rounded to the kernel's dtype: with a bfloat16 base, updates below half a
  bfloat16 ulp of their weight are lost in the fold (docs/lora.md, "Stages")."""
  flat = merged_leaves(params, cfg)
  out = jax.tree_util.tree_map_with_path(lambda p, x: flat.get(base.path_str(p), x), params)
  return init_adapters(out, cfg, rng)
