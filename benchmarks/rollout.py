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
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import report_util

from merr1_jax import rollout
from merr1_jax.models import base, mllm
from merr1_jax.rollout import sampling


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
  args = ap.parse_args(argv)
  print(f"# {report_util.cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
        f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
  rows = []
  for name in args.presets.split(","):
    model = mllm.build(name)
    params = model.init_params(jax.random.key(0))
    n_params = sum(a.size for a in jax.tree.leaves(params))
    pre = bench_prefill(model, params, p=args.prompts, length=args.prompt_len, group=args.group,
                        new_tokens=args.new_tokens, repeats=args.repeats)
    dec = bench_decode(model, params, p=args.decode_prompts, group=args.group, length=args.decode_prompt_len,
                       new_tokens=args.new_tokens, repeats=args.repeats)
    rows.append(dict(preset=name, params=n_params, prefill=pre, decode=dec))
    print(f"\n## {name} ({n_params / 1e6:.1f}M params)")
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
