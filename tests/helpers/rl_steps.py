"""Runs 2 data-parallel RL steps of a tiny model; the multi-process test starts this once per process.

Usage: python -m tests.helpers.rl_steps OUT.npz [PORT NUM_PROCESSES PROCESS_ID]
Without the distributed arguments it runs the same steps in a single process (the reference).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
import optax  # noqa: E402

from merr1_jax import sharding  # noqa: E402
from merr1_jax import train_step as ts  # noqa: E402
from merr1_jax.models import base, mllm  # noqa: E402

V, B, L = 64, 8, 10


def global_batch(seed):
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, V - 2, (B, L)).astype(np.int32)
  return ts.RLBatch(
      inputs=base.ModelInputs(tokens=tok, positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
                              mask=np.ones((B, L), bool)),
      completion_mask=np.arange(L)[None, :].repeat(B, 0) >= 5,
      advantages=rng.normal(size=B).astype(np.float32),
      old_logp=None,
      ref_logp=np.log(rng.uniform(0.01, 0.2, (B, L))).astype(np.float32),
  )


def main(out, port=None, nproc=1, pid=0):
  if port is not None:
    sharding.init_distributed(f"127.0.0.1:{port}", int(nproc), int(pid))
  model = mllm.build("tiny", vocab_size=V, video_dim=0, audio_dim=0, d_model=64, mlp_dim=128, head_dim=16)
  params = model.init_params(jax.random.key(0))
  # Plain SGD: Adam's update is ~lr * sign(g) where g ~ 0, which would turn float32 reduction-order noise
  # between the all-reduce and the single-process sum into visible parameter differences.
  tx = optax.sgd(0.5)
  mesh = sharding.make_mesh((-1, 1, 1))
  p_sh = sharding.param_shardings(model, params, mesh)
  state = ts.init_state(params, tx, with_reference=True)
  st_sh = sharding.state_shardings(state, p_sh, mesh)
  state = jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                       state, st_sh)
  b_sh = sharding.batch_shardings(global_batch(0), mesh)
  step = ts.make_rl_step(model, tx, ts.StepConfig(), state_shardings=st_sh, batch_shardings=b_sh)
  n, i = jax.process_count(), jax.process_index()
  for seed in (0, 1):
    full = global_batch(seed)
    rows = B // n
    local = jax.tree.map(lambda x: x[i * rows:(i + 1) * rows], full)  # this process's rows only
    state, metrics = step(state, sharding.to_global(local, b_sh))
  # Parameters are replicated over 'data': every process holds the full values.
  flat = {base.path_str(p): np.asarray(x.addressable_data(0))
          for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  if i == 0:
    np.savez(out, **flat, loss=np.asarray(metrics["loss"]))
  if port is not None:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
