"""Two data-parallel RL steps of a very small model, for tests/test_multiprocess.py.

The test calls ``run(devices=[one device])`` in its own process for the single-process reference, then starts this
module once per process of a 2-process jax.distributed job (127.0.0.1, gloo collectives):

    python -m tests.helpers.rl_steps OUT.npz PORT NUM_PROCESSES PROCESS_ID

Process 0 writes the final parameters (and the last loss) to OUT.npz. The model and batch are as small as the
step allows (1 layer, d = 32, 4 rows of 8 tokens), so the pair compiles and runs in seconds on an idle 2-core box.
"""

import os
import sys

import numpy as np

V, B, L = 32, 4, 8


def global_batch(seed):
  """The library's batch of B rows, each its own prompt (4 tokens) and completion (4 tokens)."""
  from merr1_jax.models import base  # noqa: PLC0415
  from tests.oracles import ungrouped  # noqa: PLC0415
  rng = np.random.default_rng(seed)
  tok = rng.integers(0, V - 2, (B, L)).astype(np.int32)
  return ungrouped.as_grouped(ungrouped.RLBatch(
      inputs=base.ModelInputs(tokens=tok, positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
                              mask=np.ones((B, L), bool)),
      completion_mask=np.arange(L)[None, :].repeat(B, 0) >= 4,
      advantages=rng.normal(size=B).astype(np.float32),
      old_logp=None,
      ref_logp=np.log(rng.uniform(0.01, 0.2, (B, L))).astype(np.float32),
      loss_start=3,
  ))


def run(devices=None) -> dict[str, np.ndarray]:
  """2 steps on a ('data',) mesh over ``devices`` (default: every device of every process); returns the final
  parameters by path, plus the last loss."""
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from merr1_jax import rl  # noqa: PLC0415
  from merr1_jax.infra import sharding  # noqa: PLC0415
  from merr1_jax.models import base, mllm  # noqa: PLC0415
  from merr1_jax.training import step as ts  # noqa: PLC0415

  model = mllm.build("tiny", vocab_size=V, video_dim=0, audio_dim=0, d_model=32, num_layers=1, num_heads=2,
                     num_kv_heads=1, head_dim=16, mlp_dim=64)
  params = model.init_params(jax.random.key(0))
  # Plain SGD: Adam's update is ~lr * sign(g) where g ~ 0, which would turn float32 reduction-order noise
  # between the all-reduce and the single-process sum into visible parameter differences.
  tx = optax.sgd(0.5)
  mesh = sharding.make_mesh((-1, 1, 1), devices)
  p_sh = sharding.param_shardings(model, params, mesh)
  state = ts.init_state(params, tx, with_reference=True)
  st_sh = sharding.state_shardings(state, p_sh, mesh)
  state = jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                       state, st_sh)
  b_sh = sharding.batch_shardings(global_batch(0), mesh)
  cfg = ts.StepConfig(loss=rl.LossConfig(), beta=0.04)
  step = ts.make_rl_step(model, tx, cfg, state_shardings=st_sh, batch_shardings=b_sh)
  n, i = jax.process_count(), jax.process_index()
  for seed in (0, 1):
    full = global_batch(seed)
    rows = B // n
    local = jax.tree.map(lambda x: x[i * rows:(i + 1) * rows], full)  # this process's rows only
    state, metrics = step(state, sharding.to_global(local, b_sh))
  # Parameters are replicated over 'data': every process holds the full values.
  flat = {base.path_str(p): np.asarray(x.addressable_data(0))
          for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  return {**flat, "loss": np.asarray(metrics["loss"].addressable_data(0))}


def main(out, port, nproc, pid):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: PLC0415

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from merr1_jax.infra import sharding  # noqa: PLC0415

  sharding.init_distributed(f"127.0.0.1:{port}", int(nproc), int(pid))
  flat = run()
  if jax.process_index() == 0:
    np.savez(out, **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
