"""Both thinking modes from one prefill and one decode loop (`sample_modes`).

`sampler.sample` per mode prefills the same multimodal prompt twice (the fast prompt is the slow one plus
FAST_PREFIX) and runs two decode loops one after the other (128 + 16 sequential steps on the MER workload).
Here the P slow prompts are prefilled once into a base.SharedPrefixCache; the fast rows then feed FAST_PREFIX into
their own suffix caches (one teacher-forced extend call, the slow rows masked out), and every row decodes in one
`lax.while_loop` under its own mode's stop ids, banned ids and length budget (DecodeSpec.rules); the loop ends
when every row is done. Each mode's rows draw with the keys `sample` would give them (row r of mode m, the r-th
row of that mode's own batch: fold_in(fold_in(rng_m, r), t)), so given the same keys the tokens are those of
`sample` called per mode, up to float summation order (tests/test_rollout.py).

The joint Rollouts' `steps` is the shared loop's count (the longest budget at most), not each mode's own.
A model opts in with `shared_prefix_decode = True` (docs/porting.md); its `hidden` then also sees the extend call,
k tokens per row with the slow rows' mask all False.

Shape legend: P prompts, G_m samples per prompt in mode m, G = sum of G_m, B = P*G rows (row p*G + j: prompt p's
rows of each mode in the order `modes` lists them), k = len(FAST_PREFIX) ids, T_m mode m's budget, T = max T_m.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax.models import base
from merr1_jax.rollout import prompt_batch, sampler, shared_prefix
from merr1_jax.rollout.prompt_batch import PROMPT_BUCKETS

_SHARED_ARGS = ("eos_id", "pad_id", "fast_prefix_ids")  # must agree between the modes
_MODE_ARGS = {"num_samples", "max_new_tokens", "rng", "stop_ids", "eos_id", "ban_ids", "fast_prefix_ids", "pad_id"}


def _prefill_modes(model, counts: tuple[int, ...], fast: tuple[bool, ...], prefix_ids: tuple[int, ...],
                   suffix_len: int, pad_id: int, layout, params, prompt: base.ModelInputs):
  """(SharedPrefixCache, logits_BxV, next_pos_B): the prompts prefilled once; the fast rows' caches hold the k
  prefix ids and their logits and positions continue after it."""
  p, length = prompt.tokens.shape
  g = sum(counts)
  # The sampler's own shared-prefix prefill, then the fast rows' extend call.
  dcache, logits_BxV, next_pos_B = sampler._prefill(model, g, length + suffix_len, layout, params, prompt, True)
  fast_G = np.repeat(np.asarray(fast), counts)
  if not (prefix_ids and fast_G.any()):
    return dcache, logits_BxV, next_pos_B
  k = len(prefix_ids)
  fast_B = jnp.asarray(np.tile(fast_G, p))
  mask_Bxk = jnp.broadcast_to(fast_B[:, None], (p * g, k))
  tokens = jnp.where(mask_Bxk, jnp.asarray(prefix_ids, jnp.int32)[None], pad_id)
  pos = prompt_batch.text_positions(next_pos_B, k, prompt.positions)
  x = model.embed(params, base.ModelInputs(tokens=tokens, positions=pos, mask=mask_Bxk))
  h_BxkxD, dcache = model.hidden(params, x, dcache)  # the slow rows' k slots stay invalid
  ext_BxV = base.logits_from_hidden(h_BxkxD[:, -1:], model.unembed_weight(params))[:, 0]
  return (dcache, jnp.where(fast_B[:, None], ext_BxV, logits_BxV),
          next_pos_B + k * fast_B.astype(next_pos_B.dtype))


prefill_modes = jax.jit(_prefill_modes, static_argnames=("model", "counts", "fast", "prefix_ids", "suffix_len",
                                                         "pad_id", "layout"))


def _row_keys(rngs: Sequence[jax.Array], counts: Sequence[int], p: int) -> tuple[jax.Array, np.ndarray]:
  """Per row of the joint batch: its key fold_in(rng_m, r) with r its index in mode m's own batch, and m."""
  g = sum(counts)
  kind_B = np.tile(np.repeat(np.arange(len(counts)), counts), p)
  offset = np.concatenate([[0], np.cumsum(counts)[:-1]])
  col_B = np.tile(np.arange(g), p) - offset[kind_B]
  local_B = np.repeat(np.arange(p), g) * np.asarray(counts)[kind_B] + col_B
  rng_M = jnp.stack(list(rngs))
  return jax.vmap(jax.random.fold_in)(rng_M[kind_B], jnp.asarray(local_B, jnp.int32)), kind_B


def sample_modes(model, params, inputs: base.ModelInputs, *, modes: Mapping[str, Mapping[str, Any]], method,
                 buckets: Sequence[int] = PROMPT_BUCKETS, max_cache_len: int | None = None,
                 mesh: jax.sharding.Mesh | None = None, axis_rules: Mapping[str, Any] | None = None,
                 shared_decode: bool | None = None, layer_slices: bool | None = None) -> dict[str, sampler.Rollout]:
  """{mode: Rollout} as `{m: sampler.sample(model, params, inputs, mode=m, method=method, **modes[m])}` would
  give, from one prefill and one decode loop (module docstring).

  inputs: the P prompts rendered in slow mode (the fast rows get FAST_PREFIX here). modes: per mode, `sample`'s
  own keyword arguments (num_samples, max_new_tokens, rng, stop_ids, and those of SpecialIds.sample_kwargs);
  eos_id, pad_id and fast_prefix_ids must agree between the modes. A model that does not accept a
  base.SharedPrefixCache (or shared_decode=False, or a single mode) falls back to `sample` per mode.
  layer_slices: sampler.DecodeSpec.layer_slices (None: where it pays).
  """
  names = list(modes)
  if not names or len(set(names)) != len(names) or set(names) - {"slow", "fast"}:
    raise ValueError(f"modes must name 'slow' and/or 'fast' once each, got {names}")
  common = dict(buckets=buckets, max_cache_len=max_cache_len, mesh=mesh, axis_rules=axis_rules)
  if len(names) == 1 or not shared_prefix.supports_shared_decode(model, shared_decode):
    return {m: sampler.sample(model, params, inputs, mode=m, method=method, shared_decode=shared_decode,
                              layer_slices=layer_slices, **common, **modes[m]) for m in names}
  kws = [dict(modes[m]) for m in names]
  for m, kw in zip(names, kws):
    unknown = set(kw) - _MODE_ARGS
    if unknown:
      raise TypeError(f"sample_modes: mode {m!r} got unknown arguments {sorted(unknown)}; `sample` takes "
                      f"{sorted(_MODE_ARGS)}")
  for key in _SHARED_ARGS:  # must agree: eos_id always (absent = no EOS), the others where given
    vals = {m: tuple(kw[key] or ()) if key == "fast_prefix_ids" else kw.get(key) for m, kw in zip(names, kws)
            if key in kw or key == "eos_id"}
    if len(set(vals.values())) > 1:
      raise ValueError(f"sample_modes: {key} differs between the modes ({vals}); it must be the same")
  vocab = model.config.vocab_size
  checked = [sampler.check_sample_args(vocab, kw.get("num_samples"), kw.get("max_new_tokens"), method,
                                        kw.get("stop_ids", ()), kw.get("eos_id"), kw.get("ban_ids", ()),
                                        kw.get("pad_id", 0)) for kw in kws]
  given = lambda key, default: next((kw[key] for kw in kws if key in kw), default)  # noqa: E731
  eos_id, pad_id = kws[0].get("eos_id"), given("pad_id", 0)
  prefix_ids = prompt_batch.check_ids(given("fast_prefix_ids", None) or (), vocab, "fast_prefix_ids")
  if "fast" in names and not prefix_ids:
    raise ValueError("mode 'fast' needs fast_prefix_ids (SpecialIds.sample_kwargs gives them)")
  counts = tuple(int(kw["num_samples"]) for kw in kws)
  budgets = tuple(int(kw["max_new_tokens"]) for kw in kws)
  fast = tuple(m == "fast" for m in names)
  prep = lambda m: prompt_batch.prepare_prompts(inputs, mode=m, vocab_size=vocab, fast_prefix_ids=prefix_ids,  # noqa: E731
                                                pad_id=pad_id, buckets=buckets)
  # Every mode's prompt is prepared (and refused if bad) on the host before anything compiles: the slow one is
  # prefilled, the fast one is what the fast Rollout reports (the slow one + FAST_PREFIX, bucketed on its own).
  host = {m: prep(m) for m in names}
  prompt = host["slow"] if "slow" in host else prep("slow")
  length, t_max = prompt.tokens.shape[1], max(budgets)
  k = len(prefix_ids) if any(fast) else 0
  prompt_batch.check_cache_length(model, length, k + t_max, max_cache_len, "fast prefix + max_new_tokens")
  placed, layout = shared_prefix.place_prompt(model, prompt, mesh, axis_rules)
  p = prompt.tokens.shape[0]
  cache, logits, next_pos = prefill_modes(model, counts, fast, prefix_ids if k else (), k + t_max, pad_id, layout,
                                          params, placed)
  rules = tuple((stop, ban, budget) for (stop, _, ban, _), budget in zip(checked, budgets))
  spec = sampler.DecodeSpec(method, t_max, (), eos_id, (), pad_id, placed.positions.ndim == 3, layout, rules,
                            layer_slices)
  row_keys, kind_B = _row_keys([kw["rng"] for kw in kws], counts, p)
  s = sampler.decode(model, spec, params, cache, logits, next_pos, None, row_keys, jnp.asarray(kind_B))
  out = {}
  for m_i, (m, t_m) in enumerate(zip(names, budgets)):
    rows = np.nonzero(kind_B == m_i)[0]  # prompt-major: prompt p's rows of mode m, in order
    take = lambda a: jnp.take(a, jnp.asarray(rows), axis=0)  # noqa: E731
    own = placed if m == "slow" else shared_prefix.place_prompt(model, host[m], mesh, axis_rules)[0]
    real_len = host[m].mask.sum(1).astype(np.int32)  # from the host copy: a global array may span processes
    length_B = take(s.length)
    out[m] = sampler.Rollout(
        prompt=own, completion=take(s.tokens)[:, :t_m],
        completion_mask=jnp.arange(t_m)[None] < length_B[:, None], logp=take(s.logp)[:, :t_m],
        logp_sampled=take(s.logp_sampled)[:, :t_m], stop_reason=take(s.reason), length=length_B,
        prompt_length=jnp.repeat(jnp.asarray(real_len), counts[m_i]), steps=s.t, num_samples=counts[m_i], mode=m)
  return out
