"""Our side of the peer comparison: a spec.py workload's GRPO step with merr1_jax.

Loads the checkpoint prepare.py exported (hf_io.load_hf: the same weights the peers load), the same tokenizer
and the same prompt ids, then runs benchmarks/rl_step.Runner steps: shared-prefix sampling with no stop id (every
row decodes exactly its length), reference log-probs and the update prefix-grouped (the library's one layout:
each prompt computed once per pass), spec.reward on the decoded texts, group z-score
advantages, one make_rl_step update (PPO-clip + 0.04 x k3 KL, AdamW, grad-norm clip 1.0), float32 on the CPU,
attention per causal block of 128 queries (model.attention='blocked').
The step time is spec.StepClock's wall clock from step end to step end; the phases are Runner.step's own timers.

  --workload peer (default)  text only: 4 prompts x 8 slow completions of 64 tokens.
  --workload mer             the MER-R1 step's shape through the library's multimodal path: of each prompt's 1024
      positions the first 512 are video and the next 256 audio placeholders, replaced by projected feature rows
      (random features, F = 64 as in the small_20m preset; the projectors are not in the text-only checkpoint,
      so load_hf starts them from a fresh init, as when a run starts from a base HF checkpoint), then the last
      256 of the prompt's text ids. Per prompt 4 slow completions of 128 tokens and 4 fast ones of 16, sampled
      as the trainer does (experience.collect): one rollout per mode, the fast prompts ending with FAST_PREFIX
      and the think tags banned, then one advantage group per prompt over both modes and one GroupedRLBatch with
      a segment per mode. The peers get the same 1024 prompt tokens as text and 72 new tokens on every row.

  python benchmarks/peers/ours_grpo.py [--workload peer|mer] [--warmup 1] [--steps 3] [--out result.json]
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import spec  # noqa: E402

FEATURE_DIM = 64  # the small_20m preset's video_dim / audio_dim


def model_config(workload: spec.Workload):
  """The checkpoint's decoder, with the small_20m projectors when the workload has feature rows, attending with
  the causal-block kernel (model.attention='blocked': exact, our fastest on a CPU; TRL runs torch's SDPA)."""
  import prepare
  cfg = prepare.model_config().replace(attention="blocked")
  if workload.video_rows or workload.audio_rows:
    cfg = cfg.replace(video_dim=FEATURE_DIM, audio_dim=FEATURE_DIM)
  return cfg


def prompt_inputs(workload: spec.Workload, ids, cfg, seed: int = spec.SEED):
  """ModelInputs of the prompt ids, the first video_rows / audio_rows positions turned into placeholders with
  random features for them (fixed seed: the update's cost does not depend on the values)."""
  import numpy as np
  import rl_step

  from merr1_jax.models import base
  toks = np.array(ids, np.int32)
  feats = rl_step.place_features(toks, cfg, workload.video_rows, workload.audio_rows, np.random.RandomState(seed))
  pos = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape).copy()
  return base.ModelInputs(tokens=toks, positions=pos, mask=np.ones(toks.shape, bool), **feats)


def make_work(workload: spec.Workload, pad_id: int, fast_prefix_ids=(), fast_ban_ids=()):
  """rl_step.Work of a workload: its slow mode, and its fast mode when it has one."""
  import rl_step
  modes = dict((m, (n, t)) for m, n, t in workload.modes)
  slow_n, slow_t = modes["slow"]
  fast_n, fast_t = modes.get("fast", (0, 16))
  return rl_step.Work(prompts=workload.num_prompts, prompt_len=workload.prompt_len, group=slow_n, new_tokens=slow_t,
                      temperature=spec.TEMPERATURE, beta=spec.BETA, learning_rate=spec.LEARNING_RATE,
                      shared_prefix=True, pad_id=pad_id,
                      fast_group=fast_n, fast_new_tokens=fast_t, fast_prefix_ids=tuple(fast_prefix_ids),
                      fast_ban_ids=tuple(fast_ban_ids))


def main(argv=None) -> dict:
  args, wl = spec.parse(__doc__, argv)
  import jax
  import numpy as np

  import rl_step
  from merr1_jax import rollout
  from merr1_jax.data import tokenizer as tokenizer_lib
  from merr1_jax.models import hf_io, mllm

  prompts = spec.load_prompts(wl, args.prompts)
  tok = tokenizer_lib.load(args.ckpt)
  spec.check_prompt_ids([tok.encode(t) for t in prompts["texts"]], prompts, "ours")
  cfg = model_config(wl)
  model = mllm.build(cfg)
  params, report = hf_io.load_hf(args.ckpt, model)  # projectors='auto': a fresh init when the model has them
  if not report.clean:
    raise ValueError(f"{args.ckpt}: checkpoint does not match the model config: {report}")

  def reward_fn(completion_BxT: np.ndarray) -> np.ndarray:
    return np.asarray([spec.reward(tok.decode(row)) for row in completion_BxT], np.float32)

  fast = {}
  if any(m == "fast" for m, _, _ in wl.modes):
    ids = rollout.SpecialIds.from_tokenizer(tok)
    fast = dict(fast_prefix_ids=ids.fast_prefix, fast_ban_ids=ids.think)
  work = make_work(wl, tok.pad_id, **fast)
  runner = rl_step.Runner(model, params, work, reward_fn=reward_fn)
  inputs = prompt_inputs(wl, prompts["ids"], cfg)
  clock = spec.StepClock()
  clock.begin()
  for i in range(args.warmup + args.steps):
    t = runner.step(inputs, jax.random.key(spec.SEED + i))
    for k in ("gen_s", "score_s", "ref_s", "update_s"):
      clock.add(k, t[k])
    clock.lap(gen_tokens=t["gen_tokens"], loss=t["loss"], reward=t["reward_mean"])
  steps = clock.steps
  spec.check_gen_tokens(steps, wl, "ours")
  return spec.emit("ours", steps, args.warmup, args.out, versions={"jax": jax.__version__},
                   device=jax.devices()[0].device_kind, threads=os.cpu_count(), workload=wl.name,
                   projectors=report.projectors, modes=[list(m) for m in wl.modes])


if __name__ == "__main__":
  main()
