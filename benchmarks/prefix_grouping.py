"""Prefix grouping, pass by pass: each teacher-forced pass of an RL step in the grouped and the ungrouped layout.

    python benchmarks/prefix_grouping.py [--preset small_20m] [--ratios 1,4,16] [--group 8] [--new_tokens 32]
        [--prompts 2] [--repeats 5] [--warmup 2] [--json out.json] [--write docs/benchmarks/prefix_grouping.md]

For r = L / T in --ratios (prompt length L = r x T), on random weights and random tokens (the cost of a pass does
not depend on the values), with P prompts x G completions of T tokens:
  update       one RL update (PPO-clip + k3 KL, one AdamW step): the oracle's step on the RLBatch of full sequences
               (tests/oracles/ungrouped.py, the layout the trainer ran before) vs train_step.make_rl_step on the
               GroupedRLBatch (each prompt once, its completions as suffixes);
  old policy   the old-policy log-prob pass of PPO iterations (the oracle's old_logprobs vs batch_loss.old_logprobs);
  reference    the reference log-probs (the oracle's scorer, which prefills each prompt once and then repeats its
               cache G times, vs grouped.score_pass);
  calibration  the slow answers' category log-mass in their own context and teacher-forced in the fast context
               (two oracle scorer passes with anchors vs one grouped.score_pass over both segments);
  step         the four together (what the RL step spends outside generation, which both layouts share).
Each time is the median over --repeats runs after --warmup runs (compilation excluded), the two layouts
interleaved in every repeat, and each ratio is the median of the per-repeat ratios (load drift on a shared machine
hits both alike). The ideal pointwise saving of the update is G (1 + r) / (r + G): the ungrouped layout computes
G (L + T) token rows, the grouped one L + G T.

Shape legend: P prompts, G completions per prompt, L prompt length, T completion length, r = L / T.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import report_util
import rl_step

from merr1_jax import rl, rollout
from merr1_jax.models import presets
from merr1_jax.rollout import passes as grouped
from merr1_jax.training import assembly, batch_loss
from merr1_jax.training import step as ts

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # the repository: tests.oracles
from tests.oracles import ungrouped  # noqa: E402

SECTION = "## Prefix grouping"
PARTS = ("update", "old policy", "reference", "calibration", "step")


def _anchor_rollout(ro: rollout.Rollout, anchor_open: int, sep: int, close: int) -> rollout.Rollout:
  """The rollout with an answer in every completion: <answer> w , w </answer> at its end (the calibration's input)."""
  comp = np.array(ro.completion)
  comp[:, -5:] = [anchor_open, 20, sep, 21, close]
  return ro.replace(completion=comp)


def passes(model, params, work: rl_step.Work, rs) -> dict[str, dict]:
  """{part: {'ungrouped': fn, 'grouped': fn}}: each fn runs one pass to completion."""
  cfg = model.config
  ro = _anchor_rollout(rl_step.synthetic_rollout(cfg, work, rs), 7, 9, 8)
  b, t = ro.completion.shape
  adv = rs.randn(b).astype(np.float32)
  ref = [-rs.rand(b, t).astype(np.float32)]
  flat = jax.tree.map(jnp.asarray, ungrouped.assemble([ro], adv, pad_id=0, ref_logp=ref))
  segs = assembly.segments([ro], ro.prompt, fast_prefix_ids=())
  group = jax.tree.map(jnp.asarray, assembly.assemble(segs, ro.prompt, adv, [ref[0].reshape(segs[0].tokens.shape)]))
  tx = optax.adamw(1e-6)
  step_cfg = ts.StepConfig(loss=rl.LossConfig(kl_estimator="k3"), beta=work.beta, ppo_epochs=1)
  update = {"ungrouped": ungrouped.rl_step(model, tx, step_cfg), "grouped": ts.make_rl_step(model, tx, step_cfg)}
  # Each update donates its state: give both layouts their own copy of the weights.
  state = {k: ts.init_state(jax.tree.map(jnp.copy, params), tx, with_reference=True) for k in ("ungrouped", "grouped")}

  def run_update(kind, batch):
    def fn():
      state[kind], m = update[kind](state[kind], batch)
      return m["loss"]
    return fn

  old_f = jax.jit(lambda p, bt: ungrouped.old_logprobs(model, step_cfg, p, bt))
  old_g = jax.jit(lambda p, bt: batch_loss.old_logprobs(model, step_cfg, p, bt))
  sets = jnp.asarray(rs.rand(1, 8, cfg.vocab_size) < 0.05)
  anchors = rollout.AnchorSpec(answer_open=7, separators=(9,), answer_close=8, num_anchors=4)
  fast_prefix = (4, 5, 7)  # <think> </think> <answer>
  answers = [list(c[-4:]) for c in np.asarray(ro.completion)]  # w , w </answer>
  fast_seqs = ungrouped.make_sequences(ro.prompt, answers, mode="fast", num_samples=work.group,
                                       vocab_size=cfg.vocab_size, fast_prefix_ids=fast_prefix,
                                       buckets=(work.prompt_len + 3, 4 * work.prompt_len))
  prompt = ro.prompt
  own = grouped.segment(ro, prompt, fast_prefix_ids=(), mode_id=0)
  cf = grouped.token_segment(answers, prompt, num_samples=work.group, prefix_ids=fast_prefix, mode_id=1)

  def calib_f():
    a = ungrouped.score(model, params, ro, token_sets=sets, anchors=anchors)
    c = ungrouped.score(model, params, fast_seqs, token_sets=sets, anchors=anchors)
    return a.logmass, c.logmass

  def calib_g():
    return [o["logmass"] for o in grouped.score_pass(model, params, prompt, [own, cf], token_sets=sets,
                                                     anchors=anchors)]

  fns = {
      "update": {"ungrouped": run_update("ungrouped", flat), "grouped": run_update("grouped", group)},
      "old policy": {"ungrouped": lambda: old_f(params, flat), "grouped": lambda: old_g(params, group)},
      "reference": {"ungrouped": lambda: ungrouped.score(model, params, ro).logp,
                    "grouped": lambda: grouped.score_pass(model, params, prompt, [own])[0]["logp"]},
      "calibration": {"ungrouped": calib_f, "grouped": calib_g},
  }
  return fns


def measure(fns: dict, warmup: int, repeats: int) -> dict:
  times = {part: {k: [] for k in ("ungrouped", "grouped")} for part in PARTS}
  for i in range(warmup + repeats):
    step = {"ungrouped": 0.0, "grouped": 0.0}
    for part, pair in fns.items():
      for kind, fn in pair.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        dt = time.perf_counter() - t0
        step[kind] += dt
        if i >= warmup:
          times[part][kind].append(dt)
    if i >= warmup:
      for kind in step:
        times["step"][kind].append(step[kind])
  return {part: {"ungrouped_s": statistics.median(t["ungrouped"]), "grouped_s": statistics.median(t["grouped"]),
                 "ratio": statistics.median(u / g for u, g in zip(t["ungrouped"], t["grouped"]))}
          for part, t in times.items()}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="small_20m")
  ap.add_argument("--ratios", default="1,4,16")
  ap.add_argument("--group", type=int, default=8)
  ap.add_argument("--new_tokens", type=int, default=32)
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--json", default="")
  ap.add_argument("--write", default="")
  args = ap.parse_args(argv)
  cfg = presets.get(args.preset, video_dim=0, audio_dim=0)
  model = rl_step.mllm.build(cfg)
  params = model.init_params(jax.random.key(0))
  rows = []
  for r in [int(x) for x in args.ratios.split(",")]:
    work = rl_step.Work(prompts=args.prompts, prompt_len=r * args.new_tokens, group=args.group,
                        new_tokens=args.new_tokens)
    res = measure(passes(model, params, work, np.random.RandomState(r)), args.warmup, args.repeats)
    ideal = args.group * (1 + r) / (r + args.group)
    rows.append({"r": r, "L": work.prompt_len, "T": args.new_tokens, "ideal_update": ideal, **res})
    print(f"r = {r:2d} (L {work.prompt_len}, T {args.new_tokens}, G {args.group}): ideal {ideal:.2f}x; "
          + "; ".join(f"{p} {res[p]['ungrouped_s'] * 1e3:.0f} -> {res[p]['grouped_s'] * 1e3:.0f} ms "
                      f"({res[p]['ratio']:.2f}x)" for p in PARTS), flush=True)
  meta = {"command": "python benchmarks/prefix_grouping.py " + " ".join(argv if argv is not None else sys.argv[1:]),
          "machine": report_util.machine(), "date": datetime.date.today().isoformat(), "preset": args.preset,
          "prompts": args.prompts, "group": args.group}
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
  if args.write:
    report_util.write_section(args.write, SECTION, markdown(rows, meta))
  return {"meta": meta, "rows": rows}


def markdown(rows, meta) -> str:
  out = [SECTION, "", f"Command: `{meta['command']}`. Machine: {meta['machine']}. Date: {meta['date']}. Preset "
         f"{meta['preset']} (random weights), P = {meta['prompts']} prompts x G = {meta['group']} completions; "
         "medians (ms) ungrouped -> grouped and the median per-repeat ratio.", "",
         "| r = L/T | L | T | ideal (update) | " + " | ".join(PARTS) + " |", "|---" * (4 + len(PARTS)) + "|"]
  for row in rows:
    cells = [f"{row[p]['ungrouped_s'] * 1e3:.0f} -> {row[p]['grouped_s'] * 1e3:.0f} ({row[p]['ratio']:.2f}x)"
             for p in PARTS]
    out.append(f"| {row['r']} | {row['L']} | {row['T']} | {row['ideal_update']:.2f}x | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


if __name__ == "__main__":
  main()
