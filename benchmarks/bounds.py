"""This machine's two bounds, measured: the float32 matmul rate and the memory read bandwidth.

The rollout and update benchmarks state their speeds against these, measured in the same run (rollout.py and
rl_step.py call `measure`), because a datasheet says little about a shared 2-core VM:
  matmul rate   a jitted [M, K] x [K, N] float32 matmul, 2 M K N FLOPs, at a large square shape and at the shapes
                of a decode step (few rows against a weight matrix), median over --repeats;
  bandwidth     a jitted sum over a float32 array far larger than the caches (bytes read / time), the most a
                step that streams its weights and KV cache once can get;
  step's dots   `dot_bound` of a `dot_inventory`: every matmul a jitted function runs (read from its jaxpr,
                scans counted by length), each timed alone at its own shapes inside a compiled loop (no
                dispatch in the time): the least time the function's matmuls take on this machine when XLA
                runs them one at a time. Small-row matmuls (a decode step's) run far below the large-square
                rate, so this is the bound a decode step can be held to; the peak-rate bound says how far the
                shapes themselves are from the hardware. `dots_alone` is the same as one program, to time
                beside the step itself.

  python benchmarks/bounds.py [--repeats 5] [--mib 512]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import report_util

SQUARE = (2048, 2048, 2048)
DECODE_SHAPES = ((16, 384, 1024), (64, 384, 1024), (64, 1024, 8192))  # rows x d_model x width (MLP, vocab)


def _median_s(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_flops_per_s(m: int, k: int, n: int, repeats: int) -> float:
  ka, kb = jax.random.split(jax.random.key(0))
  a, b = jax.random.normal(ka, (m, k), jnp.float32), jax.random.normal(kb, (k, n), jnp.float32)
  return 2.0 * m * k * n / _median_s(jax.jit(jnp.matmul), a, b, repeats=repeats)


def read_bytes_per_s(mib: int, repeats: int) -> float:
  x = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
  return x.size * 4 / _median_s(jax.jit(jnp.sum), x, repeats=repeats)


def _sub_jaxprs(value):
  """The jaxprs inside an equation's parameter (pjit's jaxpr, scan's body, cond's branches, custom_jvp's call)."""
  if hasattr(value, "eqns"):
    return [value]
  if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    return [value.jaxpr]
  if isinstance(value, (tuple, list)):
    return [j for v in value for j in _sub_jaxprs(v)]
  return []


def dot_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
  """2 x batch x lhs-free x rhs-free x contracted: the multiply-adds of one dot_general."""
  (lc, rc), (lb, rb) = dimension_numbers
  size = lambda shape, axes: math.prod(shape[a] for a in axes)  # noqa: E731
  free_l = [a for a in range(len(lhs_shape)) if a not in (*lc, *lb)]
  free_r = [a for a in range(len(rhs_shape)) if a not in (*rc, *rb)]
  return 2 * size(lhs_shape, lb) * size(lhs_shape, free_l) * size(rhs_shape, free_r) * size(lhs_shape, lc)


def dot_inventory(fn, *args) -> dict[tuple, int]:
  """{(lhs shape, rhs shape, dimension numbers, dtype): how many times fn(*args) runs it}, from fn's jaxpr: a
  scan body counts `length` times, a cond the branch with the most FLOPs; a while loop's trip count is unknown
  to the jaxpr, so a body with dots refuses (trace one step of a loop, not the loop)."""

  def walk(jaxpr) -> dict:
    out: dict[tuple, int] = {}
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        lhs, rhs = (v.aval for v in eqn.invars)
        key = (tuple(lhs.shape), tuple(rhs.shape), _dims(eqn.params["dimension_numbers"]), str(lhs.dtype))
        out[key] = out.get(key, 0) + 1
        continue
      subs = [walk(j) for k, v in eqn.params.items() for j in _sub_jaxprs(v)]
      if name == "cond":
        subs = [max(subs, key=lambda d: sum(dot_flops(*k[:3]) * c for k, c in d.items()))] if subs else []
      if name == "while" and any(subs):
        raise ValueError("dot_inventory: a while loop runs dots an unknown number of times; pass one step")
      times = eqn.params["length"] if name == "scan" else 1
      for sub in subs:
        for k, c in sub.items():
          out[k] = out.get(k, 0) + c * times
    return out

  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _dims(dimension_numbers) -> tuple:
  (lc, rc), (lb, rb) = dimension_numbers
  return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def dot_seconds(lhs_shape, rhs_shape, dimension_numbers, dtype="float32", *, iters: int = 20,
                repeats: int = 5) -> float:
  """Median seconds of one dot_general at these shapes: `dots_alone` of this one dot, `iters` steps, per dot."""
  fn, operands = dots_alone({(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers, dtype): 1}, iters)
  return _median_s(fn, operands, repeats=repeats) / iters


def dots_alone(inventory: dict[tuple, int], steps: int):
  """A program of the inventory's dots and nothing else, `steps` times over: (fn, operands), run as fn(operands).
  Every occurrence gets its own operands (ten layers' weights are ten arrays, as in the real step, so none is
  read from cache more than the step reads it); each step changes the smaller operand of every dot, so no dot is
  hoisted out of the loop, and every output is summed into the result, so none is dropped. Timed beside the step
  itself (interleaved, the same load), it is the bound the step can be held to on this machine."""
  ops, keys = [], iter(jax.random.split(jax.random.key(1), 2 * sum(inventory.values())))
  for (lhs, rhs, dn, dtype), count in inventory.items():
    for _ in range(count):
      ops.append((jax.random.normal(next(keys), lhs, dtype), jax.random.normal(next(keys), rhs, dtype), _dims(dn)))
  operands = [(a, b) for a, b, _ in ops]
  dims = [dn for _, _, dn in ops]

  @jax.jit
  def fn(operands):
    def body(i, outs):  # each dot's output accumulated whole: a sum inside the loop could be folded into the dot
      new = []
      for (a, b), dn, acc in zip(operands, dims, outs):
        step = i.astype(a.dtype)
        a, b = (a + step, b) if a.size <= b.size else (a, b + step)
        new.append(acc + jax.lax.dot_general(a, b, dn))
      return tuple(new)
    zeros = tuple(jnp.zeros(jax.eval_shape(lambda a, b, dn=dn: jax.lax.dot_general(a, b, dn), a, b).shape, a.dtype)
                  for (a, b), dn in zip(operands, dims))
    return sum(jnp.sum(o) for o in jax.lax.fori_loop(0, steps, body, zeros))

  return fn, operands


def dot_bound(inventory: dict[tuple, int], iters: int = 20, repeats: int = 5) -> dict:
  """A dot_inventory's matmuls at their own measured speed: {'flops', 'seconds' (the sum over dots of count x
  time), 'dots': [{'lhs', 'rhs', 'count', 'flops', 'seconds', 'rate'} ...]} (see the module docstring)."""
  dots = []
  for (lhs, rhs, dn, dtype), count in inventory.items():
    t = dot_seconds(lhs, rhs, dn, dtype, iters=iters, repeats=repeats)
    f = dot_flops(lhs, rhs, dn)
    dots.append(dict(lhs=lhs, rhs=rhs, count=count, flops=f * count, seconds=t * count, rate=f / t))
  return dict(flops=float(sum(d["flops"] for d in dots)), seconds=sum(d["seconds"] for d in dots), dots=dots)


def measure(repeats: int = 5, mib: int = 512) -> dict:
  """{'matmul_flops_s': large square float32 matmul rate, 'decode_matmul_flops_s': {shape: rate},
  'bandwidth_bytes_s': read bandwidth} of this machine, now."""
  return dict(matmul_flops_s=matmul_flops_per_s(*SQUARE, repeats),
              decode_matmul_flops_s={"x".join(map(str, s)): matmul_flops_per_s(*s, repeats) for s in DECODE_SHAPES},
              bandwidth_bytes_s=read_bytes_per_s(mib, repeats))


def describe(b: dict) -> str:
  shapes = ", ".join(f"{s}: {v / 1e9:.0f}" for s, v in b["decode_matmul_flops_s"].items())
  return (f"float32 matmul {b['matmul_flops_s'] / 1e9:.0f} GFLOP/s at {'x'.join(map(str, SQUARE))} "
          f"(decode shapes {shapes} GFLOP/s); read bandwidth {b['bandwidth_bytes_s'] / 1e9:.1f} GB/s")


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--mib", type=int, default=512, help="size of the array the bandwidth test sums")
  args = ap.parse_args(argv)
  print(f"# {report_util.cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
        f"{jax.default_backend()}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
  b = measure(args.repeats, args.mib)
  print(describe(b))
  return b


if __name__ == "__main__":
  main()
