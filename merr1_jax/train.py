"""The trainer's command line: `python -m merr1_jax.train --config configs/base.py --workdir W`.

The trainer itself is merr1_jax/training/trainer.py; this module only runs it, so the documented command stays.
"""

from absl import app

from merr1_jax import cli
from merr1_jax.training import trainer

if __name__ == "__main__":
  app.run(trainer.main, flags_parser=cli.parse_flags)
