"""The default run's acceptance figure: SFT vs MER-R1 RL slow-mode F on MER-Synth, over several seeds.

    python benchmarks/default_run.py --seeds 0,1,2 [--root /tmp/merr1_default] [--write docs/benchmarks/default_run.md]
        [--section "## Default run: LoRA"] [-- --config.model.lora_rank=8 ...]

Each seed runs the README's main command (`python -m merr1_jax.train --config configs/base.py`) in a fresh
workdir, timed from process start to exit (compilation included). The script prints one row per seed and the
mean and spread of the slow-mode F gain (RL minus SFT, percentage points), and with --write replaces the
"## Default run" section (or --section) of docs/benchmarks/default_run.md with the table, the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import report_util

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTION = "## Default run"


def run_seed(seed: int, root: pathlib.Path, extra: list[str]) -> dict:
  workdir = root / f"seed{seed}"
  shutil.rmtree(workdir, ignore_errors=True)
  cmd = [sys.executable, "-m", "merr1_jax.train", "--config", "configs/base.py", "--workdir", str(workdir),
         f"--config.seed={seed}", "--config.log.progress=False", *extra]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode:
    raise SystemExit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  res = json.loads((workdir / "results.json").read_text())
  return {"seed": seed, "wall_s": wall, **{f"{st}_{m}_{k}": 100 * res[st][m][k] for st in ("sft", "rl")
                                            for m in ("fast", "slow") for k in ("precision", "recall", "f")}}


def table(rows: list[dict]) -> str:
  out = ["| seed | wall (min) | SFT slow P / R / F | RL slow P / R / F | slow F gain | SFT fast F | RL fast F |",
         "|---|---|---|---|---|---|---|"]
  for r in rows:
    gain = r["rl_slow_f"] - r["sft_slow_f"]
    out.append(f"| {r['seed']} | {r['wall_s'] / 60:.1f} | {r['sft_slow_precision']:.1f} / {r['sft_slow_recall']:.1f}"
               f" / {r['sft_slow_f']:.2f} | {r['rl_slow_precision']:.1f} / {r['rl_slow_recall']:.1f} / "
               f"{r['rl_slow_f']:.2f} | {gain:+.2f} | {r['sft_fast_f']:.2f} | {r['rl_fast_f']:.2f} |")
  gains = [r["rl_slow_f"] - r["sft_slow_f"] for r in rows]
  walls = [r["wall_s"] / 60 for r in rows]
  spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
  out.append("")
  out.append(f"Slow-mode F gain (RL - SFT): mean **{statistics.mean(gains):+.2f}** points, min {min(gains):+.2f}, "
             f"max {max(gains):+.2f}, std {spread:.2f} over {len(rows)} seeds. Wall time: median "
             f"{statistics.median(walls):.1f} min, max {max(walls):.1f} min.")
  return "\n".join(out)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--root", default="/tmp/merr1_default")
  ap.add_argument("--write", default="", help="markdown file whose section (--section) is replaced")
  ap.add_argument("--section", default=SECTION, help="the section heading to replace or append (a variant's runs, "
                  "e.g. '## Default run: LoRA', keep the default run's own section)")
  ap.add_argument("--note", default="", help="a sentence about the conditions (e.g. other load on the machine)")
  ap.add_argument("extra", nargs="*", help="extra --config.x=y overrides passed to every run")
  args = ap.parse_args()
  root = pathlib.Path(args.root)
  rows = []
  for seed in (int(s) for s in args.seeds.split(",")):
    rows.append(run_seed(seed, root, args.extra))
    print(json.dumps(rows[-1]), flush=True)
  body = table(rows)
  cmd = "python benchmarks/default_run.py --seeds " + args.seeds + (" -- " + " ".join(args.extra) if args.extra else "")
  body = (f"MER-Synth test split (128 clips), OV emotion-wheel level-1 precision / recall / F x 100, greedy "
          f"decoding; SFT = after cold-start SFT, RL = after MER-R1 RL. Machine: {report_util.machine()}. Date: "
          f"{datetime.date.today()}. Command: `{cmd}`.{(' ' + args.note) if args.note else ''}\n\n{body}")
  print(body)
  if args.write:
    report_util.write_section(ROOT / args.write, args.section, f"{args.section}\n\n{body}\n")


if __name__ == "__main__":
  main()
