"""A seconds-scale version of configs/base.py for smoke, resume and preemption tests (and a quick local check).

    python -m merr1_jax.train --config configs/smoke.py --workdir /tmp/smoke

Same code paths as the default run (SFT -> eval -> RL with calibration and KL -> eval -> export), on a few
clips with a smaller model and short generations. The numbers it produces mean nothing.
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("_merr1_base_config", pathlib.Path(__file__).with_name("base.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
  c = _base.get_config(arg)
  c.model.d_model, c.model.num_heads, c.model.num_kv_heads, c.model.head_dim, c.model.mlp_dim = 32, 2, 1, 16, 64
  c.data.synth_train, c.data.synth_validation, c.data.synth_test = 24, 4, 4
  c.sft.steps, c.sft.batch_size, c.sft.warmup_steps = 2, 8, 0
  c.rl.steps, c.rl.prompts_per_step, c.rl.n_slow, c.rl.n_fast = 3, 2, 2, 2
  c.rl.max_new_tokens_slow, c.rl.max_new_tokens_fast = 16, 6
  c.eval.batch_size, c.eval.max_new_tokens_slow, c.eval.max_new_tokens_fast = 4, 16, 6
  c.checkpoint.every = 1
  c.checkpoint.export_dtype = "float32"
  c.log.tensorboard = False
  c.log.progress = False
  return c
