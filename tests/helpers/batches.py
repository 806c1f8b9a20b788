"""Hand-made RL batches for the step tests: rows of whole sequences (the oracle's RLBatch, tests/oracles), which
`ungrouped.as_grouped` hands to the library as its grouped batch, and a StepConfig with method.md E4's loss."""

import jax.numpy as jnp
import numpy as np

from merr1_jax import rl
from merr1_jax.models import base
from merr1_jax.training import step as ts
from tests.oracles import ungrouped

V = 64


def step_cfg(**kw) -> ts.StepConfig:
  """A StepConfig with the method.md E4 loss and beta = 0.04 unless overridden (the library holds no defaults)."""
  return ts.StepConfig(**{"loss": rl.LossConfig(), "beta": 0.04, **kw})


def row_batch(b=8, l=12, prompt=6, seed=0, ref=True, old=False):
  """B rows of L random tokens over vocabulary V: row 0 left-padded by 2, completions from column `prompt` (row 1
  two tokens shorter), random advantages and, when asked, reference and old log-probs."""
  rng = np.random.default_rng(seed)
  tok = jnp.asarray(rng.integers(0, V - 2, (b, l)), jnp.int32)
  mask = jnp.ones((b, l), bool).at[0, :2].set(False)  # one left-padded row
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  cm = jnp.zeros((b, l), bool).at[:, prompt:].set(True).at[1, l - 2:].set(False)  # a shorter completion
  logp = lambda: jnp.asarray(np.log(rng.uniform(0.01, 0.2, (b, l))), jnp.float32)
  return ungrouped.RLBatch(
      inputs=base.ModelInputs(tokens=tok, positions=pos, mask=mask),
      completion_mask=cm,
      advantages=jnp.asarray(rng.normal(size=b), jnp.float32),
      old_logp=logp() if old else None,
      ref_logp=logp() if ref else None,
  )
