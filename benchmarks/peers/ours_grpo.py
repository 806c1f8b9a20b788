"""Our side of the peer comparison: the spec.py GRPO configuration with merr1_jax, text only.

Loads the checkpoint prepare.py exported (hf_io.load_hf: the same weights the peers load), the same tokenizer
and the same prompt ids, then runs benchmarks/rl_step.Runner steps: shared-prefix sampling of exactly 64 tokens
per row (no stop id), reference log-probs and the update prefix-grouped (the library default, rl.prefix_grouped:
each prompt computed once per pass), spec.reward on the decoded texts, group z-score advantages, one make_rl_step
update (PPO-clip + 0.04 x k3 KL, AdamW, grad-norm clip 1.0), float32 on the CPU.
The step time is spec.StepClock's wall clock from step end to step end; the phases are Runner.step's own timers.

  python benchmarks/peers/ours_grpo.py [--warmup 1] [--steps 3] [--out result.json]
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import spec  # noqa: E402


def main(argv=None) -> dict:
  args = spec.arg_parser(__doc__).parse_args(argv)
  import jax
  import numpy as np

  import prepare
  import rl_step
  from merr1_jax.data import tokenizer as tokenizer_lib
  from merr1_jax.models import base, hf_io, mllm

  prompts = spec.load_prompts(args.prompts)
  tok = tokenizer_lib.load(args.ckpt)
  spec.check_prompt_ids([tok.encode(t) for t in prompts["texts"]], prompts, "ours")
  model = mllm.build(prepare.model_config())
  params, report = hf_io.load_hf(args.ckpt, model)
  if not report.clean:
    raise ValueError(f"{args.ckpt}: checkpoint does not match the model config: {report}")

  def reward_fn(completion_BxT: np.ndarray) -> np.ndarray:
    return np.asarray([spec.reward(tok.decode(row)) for row in completion_BxT], np.float32)

  work = rl_step.Work(prompts=spec.NUM_PROMPTS, prompt_len=spec.PROMPT_LEN, group=spec.GROUP,
                      new_tokens=spec.NEW_TOKENS, temperature=spec.TEMPERATURE, beta=spec.BETA,
                      learning_rate=spec.LEARNING_RATE, shared_prefix=True, pad_id=tok.pad_id,
                      grouped=True)  # the library default (rl.prefix_grouped)
  runner = rl_step.Runner(model, params, work, reward_fn=reward_fn)
  ids = np.asarray(prompts["ids"], np.int32)
  inputs = base.ModelInputs(tokens=ids, positions=np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape),
                            mask=np.ones(ids.shape, bool))
  clock = spec.StepClock()
  clock.begin()
  for i in range(args.warmup + args.steps):
    t = runner.step(inputs, jax.random.key(spec.SEED + i))
    for k in ("gen_s", "score_s", "ref_s", "update_s"):
      clock.add(k, t[k])
    clock.lap(gen_tokens=t["gen_tokens"], loss=t["loss"], reward=t["reward_mean"])
  steps = clock.steps
  return spec.emit("ours", steps, args.warmup, args.out, versions={"jax": jax.__version__},
                   device=jax.devices()[0].device_kind, threads=os.cpu_count())


if __name__ == "__main__":
  main()
