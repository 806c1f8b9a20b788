"""A train state as a plain nested dict of named leaves (what a checkpoint stores, independent of flax and optax
classes), restore targets that carry shardings, and the rng key as exact JSON."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax.models import base


def named_leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  """(path components, leaf) in tree-flatten order; raises if two leaves share a name."""
  out, seen = [], set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = base.path_str(path)
    if name in seen or not name:
      raise ValueError(f"train state leaf name {name!r} is empty or not unique; cannot checkpoint by name")
    seen.add(name)
    out.append((tuple(name.split("/")), leaf))
  return out


def nest(named: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
  root: dict[str, Any] = {}
  for parts, leaf in named:
    node = root
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ValueError(f"train state leaf {'/'.join(parts)!r} sits under another leaf's name")
    node[parts[-1]] = leaf
  return root


def get_nested(nested: Mapping[str, Any], parts: tuple[str, ...]) -> Any:
  for p in parts:
    nested = nested[p]
  return nested


def abstract_leaf(name: str, x: Any) -> jax.ShapeDtypeStruct:
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
    return x
  raise ValueError(f"abstract_state leaf {name!r} carries no sharding; build the target with "
                   "abstract_with_shardings(jax.eval_shape(...), shardings)")


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStruct pytree like `state` (arrays or ShapeDtypeStructs), each leaf carrying its sharding from
  `shardings` (a pytree of the same structure, or one Sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


# ---------------------------------------------------------------------------------------------------- rng


def rng_to_json(rng: jax.Array) -> dict[str, Any]:
  """Exact: the key's uint32 words as JSON integers, plus the impl name to re-wrap them."""
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    impl, data = str(jax.random.key_impl(rng)), jax.random.key_data(rng)
  else:  # a raw uint32 key (the legacy jax.random.PRNGKey form)
    impl, data = None, rng
  if not data.is_fully_addressable:  # a key replicated over hosts: every process holds the whole value
    if not data.is_fully_replicated:
      raise ValueError("the rng key to checkpoint is sharded over processes; pass a replicated key")
    data = data.addressable_data(0)
  data = np.asarray(jax.device_get(data))
  return {"impl": impl, "dtype": data.dtype.name, "data": data.tolist()}


def rng_from_json(d: Mapping[str, Any]) -> jax.Array:
  data = jnp.asarray(np.asarray(d["data"], dtype=d["dtype"]))
  return data if d["impl"] is None else jax.random.wrap_key_data(data, impl=d["impl"])
