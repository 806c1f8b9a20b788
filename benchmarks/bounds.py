"""This machine's two bounds, measured: the float32 matmul rate and the memory read bandwidth.

The rollout and update benchmarks state their speeds against these, measured in the same run (rollout.py and
rl_step.py call `measure`), because a datasheet says little about a shared 2-core VM:
  matmul rate   a jitted [M, K] x [K, N] float32 matmul, 2 M K N FLOPs, at a large square shape and at the shapes
                of a decode step (few rows against a weight matrix), median over --repeats;
  bandwidth     a jitted sum over a float32 array far larger than the caches (bytes read / time), the most a
                step that streams its weights and KV cache once can get.

  python benchmarks/bounds.py [--repeats 5] [--mib 512]
"""

from __future__ import annotations

import argparse
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
