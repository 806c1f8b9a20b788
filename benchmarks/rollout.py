"""Rollout speed: prefill and generated tokens/s, with two side-by-side ratios measured in the same run.

  (a) shared-prefix prefill (each prompt once, cache repeated G times) against prefilling the prompt repeated G
      times, as Tunix, R1-Omni and TRL do;
  (b) the whole decode loop in one jit (`rollout.decode`, a lax.while_loop) against a Python loop over the same
      jitted one-token step (`rollout.decode_step`, state donated): once with no host sync inside the loop (the
      most favourable case for the Python loop) and once with the per-step `all(done)` check that an
      early-stopping Python loop needs.

Random weights, random prompt tokens, float32, one CPU device. Every time is the median over --repeats timed
runs after one warm-up run (compilation excluded); the variants run interleaved and each ratio is the median of
the per-repeat ratios, so load from other processes on a shared machine moves both sides of a ratio alike.
Decode runs with no stop id, so every row generates exactly --new_tokens tokens and both loops do the same work.

  python benchmarks/rollout.py [--presets tiny,small_20m] [--prompt_len 512] [--group 8] [--prompts 2]
                               [--decode_prompts 2] [--decode_prompt_len 64] [--new_tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time

import bounds as bounds_mod
import jax
import jax.numpy as jnp
import numpy as np
import report_util

from merr1_jax import rollout
from merr1_jax.infra import throughput
from merr1_jax.models import base, mllm
from merr1_jax.rollout import sampler, sampling


def _prompts(vocab: int, p: int, length: int, seed: int) -> base.ModelInputs:
  toks = np.random.RandomState(seed).randint(16, vocab - 16, (p, length)).astype(np.int32)
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (p, length)).copy()
  return base.ModelInputs(tokens=jnp.asarray(toks), positions=jnp.asarray(pos), mask=jnp.ones((p, length), bool))


def _paired_times(fns: dict, repeats: int, setup=lambda: ()) -> dict:
  """Median wall time of each fn(*setup()) after one warm-up each (setup untimed), and the median of the
  per-repeat ratios to the first fn. The fns run interleaved in every repeat, so a load change on a shared
  machine hits them alike and the ratios stay meaningful even when the absolute times drift."""
  for fn in fns.values():
    jax.block_until_ready(fn(*setup()))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      args = jax.block_until_ready(setup())
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[k].append(time.perf_counter() - t)
  first = next(iter(fns))
  return {k: dict(s=statistics.median(v), ratio=statistics.median(a / b for a, b in zip(v, times[first])))
          for k, v in times.items()}


def bench_prefill(model, params, *, p: int, length: int, group: int, new_tokens: int, repeats: int) -> dict:
  prompt = _prompts(model.config.vocab_size, p, length, seed=0)
  repeated = jax.tree.map(lambda a: jnp.repeat(a, group, axis=0), prompt)
  s = length + new_tokens
  t = _paired_times({"shared": lambda: rollout.prefill(model, group, s, None, params, prompt),
                      "repeated": lambda: rollout.prefill(model, 1, s, None, params, repeated)}, repeats)
  shared_t, repeated_t = t["shared"]["s"], t["repeated"]["s"]
  # Sanity: both give the G rows the same next-token logits.
  a = rollout.prefill(model, group, s, None, params, prompt)[1]
  b = rollout.prefill(model, 1, s, None, params, repeated)[1]
  err = float(jnp.max(jnp.abs(a - b)))
  return dict(shared_s=shared_t, repeated_s=repeated_t, speedup=t["repeated"]["ratio"], max_logit_diff=err,
              shared_tok_s=p * length / shared_t, repeated_tok_s=p * group * length / repeated_t)


def bench_decode(model, params, *, p: int, group: int, length: int, new_tokens: int, repeats: int) -> dict:
  prompt = _prompts(model.config.vocab_size, p, length, seed=1)
  cache_len = length + new_tokens
  spec = rollout.DecodeSpec(sampling.Temperature(1.0), new_tokens, stop_ids=(), eos_id=None, ban_ids=(),
                            pad_id=0, mrope=False)
  rng = jax.random.key(0)

  def fresh():  # decode donates the cache: every run starts from a new prefilled one (untimed)
    return rollout.prefill(model, group, cache_len, None, params, prompt)

  def whole(cache, logits, next_pos):
    return rollout.decode(model, spec, params, cache, logits, next_pos, rng).tokens

  init = jax.jit(rollout.init_decode_state, static_argnums=0)
  step = jax.jit(rollout.decode_step, static_argnums=(0, 1), donate_argnums=4)
  w = jax.jit(model.unembed_weight)(params)

  def python_loop(cache, logits, next_pos):
    s = init(spec, cache, logits, next_pos, rng)
    for _ in range(new_tokens - 1):
      s = step(model, spec, params, w, s)
    return s.tokens

  def python_loop_early_stop(cache, logits, next_pos):
    # What a Python loop needs to stop when every row is done: one host sync per step.
    s = init(spec, cache, logits, next_pos, rng)
    for _ in range(new_tokens - 1):
      s = step(model, spec, params, w, s)
      if bool(jnp.all(s.done)):
        break
    return s.tokens

  same = bool(jnp.all(whole(*fresh()) == python_loop(*fresh())))
  t = _paired_times({"whole": whole, "loop": python_loop, "sync": python_loop_early_stop}, repeats, fresh)
  b = p * group
  tok_s = {k: b * new_tokens / v["s"] for k, v in t.items()}
  return dict(rows=b, whole_s=t["whole"]["s"], loop_s=t["loop"]["s"], sync_s=t["sync"]["s"],
              speedup=t["loop"]["ratio"], speedup_sync=t["sync"]["ratio"], same_tokens=same,
              whole_tok_s=tok_s["whole"], loop_tok_s=tok_s["loop"], sync_tok_s=tok_s["sync"])


def bench_decode_cache(model, params, *, p: int, group: int, length: int, new_tokens: int, repeats: int,
                       bounds: dict | None) -> dict:
  """(c) The decode loop against the shared prefix (base.SharedPrefixCache) and against the repeated cache, and
  where a step's time goes: the loop, the loop reading the stacked layer weights (`DecodeSpec.layer_slices=False`,
  the loop before the weights were split outside it), the decoder alone (a loop of `hidden` steps feeding the
  cache), the LM head and the sampling alone (a loop of unembedding + `_emit` on a fixed hidden state). The parts
  take the weights as arguments, as the loop does, and keep every output live: XLA would otherwise fold constant
  weights into the program and delete the work whose result is unused (the last layer, the log-prob buffers)."""
  prompt = _prompts(model.config.vocab_size, p, length, seed=2)
  spec = rollout.DecodeSpec(sampling.Temperature(1.0), new_tokens, stop_ids=(), eos_id=None, ban_ids=(), pad_id=0,
                            mrope=False)
  rng, b = jax.random.key(0), p * group

  def fresh(shared):
    return lambda: rollout.prefill(model, group, length + new_tokens, None, params, prompt, shared)

  stacked = dataclasses.replace(spec, layer_slices=False)

  def loop(c, logits, next_pos, spec=spec):
    return rollout.decode(model, spec, params, c, logits, next_pos, rng).tokens

  @functools.partial(jax.jit, donate_argnums=1)
  def decoder_only(params, c, logits, next_pos):
    pieces, rebuild = sampler.loop_weights(model, spec, params)  # as the loop takes them

    def body(i, carry):
      c, acc = carry
      tok = jnp.full((b, 1), 20, jnp.int32) + i
      p = rebuild(pieces)
      x = model.embed(p, base.ModelInputs(tokens=tok, positions=(next_pos + i)[:, None],
                                          mask=jnp.ones_like(tok, bool)))
      h, c = model.hidden(p, x, c)
      return c, acc + h  # h is used: the last layer and the final norm stay in the program
    return jax.lax.fori_loop(0, new_tokens - 1, body, (c, jnp.zeros((b, 1, model.config.d_model), jnp.float32)))

  @jax.jit
  def head_and_sampling(w, logits, next_pos):
    h = jnp.full((b, 1, model.config.d_model), 0.01, jnp.float32)
    s = sampler.init_decode_state(spec, None, logits, next_pos, rng)
    body = lambda i, s: sampler._emit(spec, s, base.logits_from_hidden(h * (1 + i), w)[:, 0])  # noqa: E731
    return jax.lax.fori_loop(0, new_tokens - 1, body, s)  # the whole state: log-prob buffers included

  w = jax.jit(model.unembed_weight)(params)
  parts = (("loop", loop), ("loop_stacked", functools.partial(loop, spec=stacked)),
           ("decoder", lambda c, logits, next_pos: decoder_only(params, c, logits, next_pos)),
           ("head_sampling", lambda c, logits, next_pos: head_and_sampling(w, logits, next_pos)))
  out, inventory = {}, {}
  for name, shared in (("shared", True), ("repeated", False)):
    # The step's own dots and nothing else, as one program of as many steps as the loop (bounds.dots_alone).
    inventory[name] = step_dots(model, spec, params, w, fresh(shared)(), rng)
    dots_fn, operands = bounds_mod.dots_alone(inventory[name], new_tokens - 1)
    t = _paired_times(dict(parts) | {"dots": lambda c, logits, next_pos: dots_fn(operands)}, repeats,
                      fresh(shared))
    out[name] = {k: v["s"] / (new_tokens - 1) for k, v in t.items()}  # per decode step
    out[name]["stacked_ratio"] = t["loop_stacked"]["ratio"]  # median per-repeat ratio to the loop, same run
    out[name]["loop_over_dots"] = 1 / t["dots"]["ratio"]  # the loop against its dots alone, paired per repeat
  ref = loop(*fresh(True)())
  same = bool(jnp.all(ref == loop(*fresh(False)()))) and bool(jnp.all(ref == loop(*fresh(True)(), spec=stacked)))
  cfg = model.config
  param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
  s_slots = length + new_tokens
  costs = {"shared": throughput.decode_step_cost(cfg, param_bytes, b, s_slots, p * length + b * new_tokens, 4),
           "repeated": throughput.decode_step_cost(cfg, param_bytes, b, s_slots, b * s_slots, 4)}
  row = dict(rows=b, same_tokens=same, speedup=out["repeated"]["loop"] / out["shared"]["loop"], steps=out,
             flops=costs["shared"][0], bytes={k: v[1] for k, v in costs.items()})
  if bounds is not None:
    row.update(matmul_rate=bounds["matmul_flops_s"], bandwidth=bounds["bandwidth_bytes_s"])
    for k in ("shared", "repeated"):
      flops, nbytes = costs[k]
      dots = bounds_mod.dot_bound(inventory[k], repeats=7)
      if abs(dots["flops"] - flops) > 1e-6 * flops:  # the cost model and the traced step must agree
        raise AssertionError(f"{k}: the step's dots do {dots['flops']:.4g} FLOPs, the cost model {flops:.4g}")
      row[f"{k}_dots"] = dots["dots"]
      row[f"{k}_bound_s"] = {"compute (peak rate)": flops / bounds["matmul_flops_s"],
                             "compute (each of the step's dots timed alone, summed)": dots["seconds"],
                             "compute (the step's dots as one program, timed beside the loop)": out[k]["dots"],
                             "memory": nbytes / bounds["bandwidth_bytes_s"]}
  return row


def step_dots(model, spec, params, w, prefilled, rng) -> dict:
  """bounds.dot_inventory of one decode step (rollout.decode_step) from this prefilled cache."""
  s = rollout.init_decode_state(spec, *prefilled, rng)
  return bounds_mod.dot_inventory(lambda params, w, s: rollout.decode_step(model, spec, params, w, s), params, w, s)


def step_dot_bound(model, spec, params, w, prefilled, rng, *, iters: int = 20, repeats: int = 7) -> dict:
  """bounds.dot_bound of one decode step from this prefilled cache: the step's matmuls, read from its jaxpr,
  each timed alone at its own shapes."""
  return bounds_mod.dot_bound(step_dots(model, spec, params, w, prefilled, rng), iters=iters, repeats=repeats)


def bench_modes(model, params, *, p: int, length: int, slow: tuple[int, int], fast: tuple[int, int],
                repeats: int) -> dict:
  """(d) Generation of both modes (no stop id: fixed lengths), as the RL step samples them: one prefill and one
  decode loop (rollout.sample_modes) against a sample() call per mode, with the shared-prefix decode cache and
  with the repeated one (the path before both)."""
  prompt = _prompts(model.config.vocab_size, p, length, seed=3)
  k = (7, 8, 9)  # any three ids stand for FAST_PREFIX on random prompts
  kw = {"slow": dict(num_samples=slow[0], max_new_tokens=slow[1], rng=jax.random.key(1), stop_ids=(),
                     fast_prefix_ids=k),
        "fast": dict(num_samples=fast[0], max_new_tokens=fast[1], rng=jax.random.key(2), stop_ids=(),
                     fast_prefix_ids=k)}
  method, buckets = sampling.Temperature(1.0), (length, length + len(k))

  def joint(layer_slices=None):
    return [r.completion for r in rollout.sample_modes(model, params, prompt, modes=kw, method=method,
                                                       buckets=buckets, layer_slices=layer_slices).values()]

  def per_mode(shared):
    return lambda: [rollout.sample(model, params, prompt, mode=m, method=method, buckets=buckets,
                                   shared_decode=shared, **kw[m]).completion for m in kw]

  t = _paired_times({"joint": joint, "joint_stacked": functools.partial(joint, layer_slices=False),
                     "per_mode_shared": per_mode(True), "per_mode_repeated": per_mode(False)}, repeats)
  paths = (joint(), per_mode(False)(), per_mode(True)(), joint(layer_slices=False))
  same = all(bool(jnp.all(x == y)) for other in paths[1:] for x, y in zip(paths[0], other))
  return dict(same_tokens=same, **{f"{k}_s": v["s"] for k, v in t.items()},
              speedup_vs_repeated=t["per_mode_repeated"]["ratio"], speedup_vs_shared=t["per_mode_shared"]["ratio"],
              speedup_vs_stacked=t["joint_stacked"]["ratio"])


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--presets", default="tiny,small_20m")
  ap.add_argument("--prompt_len", type=int, default=512)
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--decode_prompts", type=int, default=2)
  ap.add_argument("--decode_prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--parts", default="prefill,decode,cache,modes",
                  help="which comparisons: prefill (a), decode (b), cache (c), modes (d)")
  ap.add_argument("--cache_prompts", type=int, default=4)
  ap.add_argument("--cache_prompt_len", type=int, default=1024)
  ap.add_argument("--cache_new_tokens", type=int, default=32)
  ap.add_argument("--modes_prompt_len", type=int, default=1024)
  ap.add_argument("--slow", default="4,128", help="slow completions per prompt, new tokens (part d)")
  ap.add_argument("--fast", default="4,16", help="fast completions per prompt, new tokens (part d)")
  ap.add_argument("--bounds", action="store_true", help="measure the machine's bounds first (benchmarks/bounds.py)")
  args = ap.parse_args(argv)
  parts = set(args.parts.split(","))
  if parts - {"prefill", "decode", "cache", "modes"}:
    raise ValueError(f"unknown --parts {sorted(parts - {'prefill', 'decode', 'cache', 'modes'})}")
  print(f"# {report_util.cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
  bounds = bounds_mod.measure() if args.bounds else None
  if bounds is not None:
    print(f"# bounds: {bounds_mod.describe(bounds)}")
  rows = []
  for name in args.presets.split(","):
    model = mllm.build(name)
    params = model.init_params(jax.random.key(0))
    n_params = sum(a.size for a in jax.tree.leaves(params))
    row = dict(preset=name, params=n_params)
    rows.append(row)
    print(f"\n## {name} ({n_params / 1e6:.1f}M params)")
    if "cache" in parts:
      c = row["cache"] = bench_decode_cache(model, params, p=args.cache_prompts, group=args.group,
                                            length=args.cache_prompt_len, new_tokens=args.cache_new_tokens,
                                            repeats=args.repeats, bounds=bounds)
      print(f"decode cache, {c['rows']} rows ({args.cache_prompts} prompts x G={args.group}), prompt "
            f"{args.cache_prompt_len}, {args.cache_new_tokens} new tokens; ms per decode step:")
      for k in ("shared", "repeated"):
        st = c["steps"][k]
        print(f"  {k:9s} loop {st['loop'] * 1e3:7.1f}   (stacked weights {st['loop_stacked'] * 1e3:7.1f})   "
              f"decoder alone {st['decoder'] * 1e3:7.1f}   LM head + sampling alone {st['head_sampling'] * 1e3:6.1f}"
              f"   reads {c['bytes'][k] / 1e6:.0f} MB/step\n  {'':9s} the loop is {st['stacked_ratio']:.2f}x faster "
              "with the layer weights split before it (median of per-repeat ratios)")
        for d in sorted(c.get(f"{k}_dots", []), key=lambda d: -d["seconds"]):
          print(f"    dot {d['lhs']} x {d['rhs']} x{d['count']}: {d['rate'] / 1e9:.0f} GFLOP/s, "
                f"{d['seconds'] * 1e3:.2f} ms per step")
        for bk, bv in c.get(f"{k}_bound_s", {}).items():
          print(f"    bound, {bk}: {bv * 1e3:.1f} ms -> the loop is {st['loop'] / bv:.1f}x it")
        print(f"    the loop against its dots as one program, median of the per-repeat ratios: "
              f"{st['loop_over_dots']:.2f}x")
      print(f"  shared-prefix decode {c['speedup']:.2f}x faster (same tokens: {c['same_tokens']}); "
            f"{c['flops'] / 1e9:.2f} GFLOP per step")
    if "modes" in parts:
      slow, fast = (tuple(int(x) for x in a.split(",")) for a in (args.slow, args.fast))
      m = row["modes"] = bench_modes(model, params, p=args.cache_prompts, length=args.modes_prompt_len, slow=slow,
                                     fast=fast, repeats=args.repeats)
      print(f"generation of both modes ({args.cache_prompts} prompts of {args.modes_prompt_len}, slow {slow}, "
            f"fast {fast}):\n  one prefill + one loop {m['joint_s'] * 1e3:.0f} ms; per mode, shared cache "
            f"{m['per_mode_shared_s'] * 1e3:.0f} ms; per mode, repeated cache {m['per_mode_repeated_s'] * 1e3:.0f} ms"
            f"\n  speedup {m['speedup_vs_repeated']:.2f}x over the repeated per-mode path, "
            f"{m['speedup_vs_shared']:.2f}x over per-mode shared (same tokens: {m['same_tokens']})\n  one loop "
            f"reading the stacked layer weights (layer_slices=False) {m['joint_stacked_s'] * 1e3:.0f} ms: the split "
            f"is {m['speedup_vs_stacked']:.2f}x faster")
    if not parts & {"prefill", "decode"}:
      continue
    pre = bench_prefill(model, params, p=args.prompts, length=args.prompt_len, group=args.group,
                        new_tokens=args.new_tokens, repeats=args.repeats)
    dec = bench_decode(model, params, p=args.decode_prompts, group=args.group, length=args.decode_prompt_len,
                       new_tokens=args.new_tokens, repeats=args.repeats)
    row.update(prefill=pre, decode=dec)
    print(f"prefill {args.prompts} prompts x {args.prompt_len} tokens, G={args.group}:")
    print(f"  shared prefix   {pre['shared_s'] * 1e3:9.1f} ms   {pre['shared_tok_s']:10.0f} prompt tok/s")
    print(f"  repeated G x    {pre['repeated_s'] * 1e3:9.1f} ms   {pre['repeated_tok_s']:10.0f} prompt tok/s")
    print(f"  speedup {pre['speedup']:.2f}x   (max |logit diff| {pre['max_logit_diff']:.1e})")
    print(f"decode {dec['rows']} rows x {args.new_tokens} new tokens (prompt {args.decode_prompt_len}):")
    print(f"  whole-loop jit  {dec['whole_s'] * 1e3:9.1f} ms   {dec['whole_tok_s']:10.0f} generated tok/s")
    print(f"  Python loop     {dec['loop_s'] * 1e3:9.1f} ms   {dec['loop_tok_s']:10.0f} generated tok/s")
    print(f"  Python loop + early-stop check {dec['sync_s'] * 1e3:9.1f} ms   {dec['sync_tok_s']:10.0f} generated tok/s")
    print(f"  speedup {dec['speedup']:.2f}x over the loop, {dec['speedup_sync']:.2f}x over the loop with the check"
          f"   (same tokens: {dec['same_tokens']})")
  return rows


if __name__ == "__main__":
  main()
