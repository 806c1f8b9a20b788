"""The shared-prefix prefill that the sampler and the scorer both start with, and their common host checks.

`prefill_prompts` runs the P prompts (features merged at their placeholders by `model.embed`) through the decoder
into a fresh KV cache once; `repeat_rows` then broadcasts the cache and the prompt's last hidden state to the G
rows of each prompt (prompt p -> rows p*G .. p*G+G-1, base.KVCache's contract). The prompt, often long because
of the video/audio rows, is processed once per prompt, not G times.

`shared_decode_cache` is the alternative to repeating the cache: the prompts' slots kept once per prompt and
an empty suffix cache per row (base.SharedPrefixCache), which the decode step attends to in two parts.

`place_prompt` is the host side both callers share: the model's own input check (`PolicyModel.validate_inputs`,
what the traced `embed` cannot check), the split over the mesh's batch axes, and device placement.

Shape legend: P prompts, G rows per prompt, B = P*G, L prompt bucket, S cache slots, D d_model.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from merr1_jax.infra import sharding
from merr1_jax.models import base
from merr1_jax.rollout import prompt_batch


def place_prompt(model: base.PolicyModel, prompt: base.ModelInputs, mesh: jax.sharding.Mesh | None,
                 axis_rules: Mapping[str, Any] | None) -> tuple[base.ModelInputs, sharding.BatchLayout | None]:
  """Checks a prepared host prompt batch with the model and the mesh, then puts it on the devices."""
  model.validate_inputs(prompt)
  layout = sharding.BatchLayout.make(mesh, axis_rules) if mesh is not None else None
  if layout is None:
    return jax.tree.map(jnp.asarray, prompt), None
  layout.check_rows(prompt.tokens.shape[0])
  return layout.place(prompt), layout


def prefill_prompts(model: base.PolicyModel, params: Any, prompt: base.ModelInputs, cache_len: int,
                    layout: sharding.BatchLayout | None) -> tuple[Any, jax.Array, jax.Array]:
  """(cache, h_last_Px1xD, next_pos_P): the prompts in a fresh cache of `cache_len` slots, the hidden state of
  the last column (it predicts the first new token) and the position that the first new token takes."""
  cache = sharding.constrain(layout, model.init_cache(prompt.tokens.shape[0], cache_len))
  h_PxLxD, cache = model.hidden(params, model.embed(params, prompt), cache)
  return cache, h_PxLxD[:, -1:], prompt_batch.next_positions(prompt.positions, prompt.mask)


def shared_decode_cache(model: base.PolicyModel, prefix: Any, g: int, suffix_len: int,
                        layout: sharding.BatchLayout | None) -> base.SharedPrefixCache:
  """The prompts' cache (P rows, as prefilled) kept once, and an empty cache of `suffix_len` slots for each of
  the P*G rows' own tokens (base.SharedPrefixCache), constrained to the batch layout."""
  suffix = model.init_cache(prefix.k.shape[0] * g, suffix_len, prefix.k.dtype)
  return sharding.constrain(layout, base.SharedPrefixCache(prefix=prefix, suffix=suffix))


def supports_shared_decode(model: base.PolicyModel, requested: bool | None) -> bool:
  """Whether to decode with a base.SharedPrefixCache: `requested`, or (None) whenever the model accepts one."""
  able = bool(getattr(model, "shared_prefix_decode", False))
  if requested and not able:
    raise ValueError(f"shared_decode=True, but {type(model).__name__} does not accept a base.SharedPrefixCache "
                     "(no `shared_prefix_decode = True`); pass shared_decode=None or False")
  return able if requested is None else bool(requested)


def repeat_rows(tree: Any, g: int, layout: sharding.BatchLayout | None) -> Any:
  """Every batch-major leaf repeated G times consecutively (base.KVCache.repeat for any pytree), constrained."""
  if g > 1:
    tree = jax.tree.map(lambda a: jnp.repeat(a, g, axis=0), tree)
  return sharding.constrain(layout, tree)
