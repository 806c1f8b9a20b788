"""What the checkpoint checksum manifest costs: `Checkpointer.save` + `wait` of the default run's train state
(configs/base.py, the RL stage's: parameters, AdamW moments, the KL reference) with and without the manifest.

    python benchmarks/checkpoint_manifest.py [--config configs/base.py] [--stage rl] [--repeats 9]

Each repeat saves the same state into two fresh directories, one per setting, in alternating order (so a warm
page cache or a busy disk favours neither), with the config's async_save; the timed span is save() until wait()
returns, which is when the step is committed (the manifest is written inside that span, just before orbax's
rename). Prints the median of each, the overhead in percent (the ratio of the medians, and the median of the
paired per-repeat differences, which a busy machine blurs less), the manifest's own time on a saved step
(`checkpoint.write_manifest`), the state's size, the machine and the date.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import shutil
import statistics
import subprocess
import tempfile
import time

import jax

from merr1_jax import config as cfglib
from merr1_jax.data import synth
from merr1_jax.infra import checkpoint
from merr1_jax.training import settings
from merr1_jax.training import setup as run_setup

ROOT = pathlib.Path(__file__).resolve().parent.parent


def default_state(spec: str, stage: str):
  """(config, the stage's initial train state) as the trainer builds it for the MER-Synth config `spec`."""
  config = cfglib.load(spec)
  tok = synth.build_tokenizer(settings.synth_config(config))
  model = run_setup.build_model(config, tok)
  params = jax.jit(model.init_params)(jax.random.key(config.seed))
  state, _ = settings.stage(config, stage).init_state(params, model.config.jnp_compute_dtype)
  return config, jax.block_until_ready(state)


def time_save(directory: pathlib.Path, state, *, manifest: bool, async_save: bool) -> float:
  ck = checkpoint.Checkpointer(directory, save_every=1, keep=2, async_save=async_save, manifest=manifest)
  ck.wait()  # orbax's start-up work (tmp directory clean-up) is not the save's
  t0 = time.perf_counter()
  ck.save(1, state, rng=jax.random.key(1), extra={"stage": "rl"})
  ck.wait()
  seconds = time.perf_counter() - t0
  ck.close()
  return seconds


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
  except (OSError, subprocess.CalledProcessError, StopIteration):
    return platform.processor() or "unknown CPU"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default=str(ROOT / "configs" / "base.py"))
  ap.add_argument("--stage", default="rl", choices=("sft", "rl"))
  ap.add_argument("--repeats", type=int, default=9)
  args = ap.parse_args()
  config, state = default_state(args.config, args.stage)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  root = pathlib.Path(tempfile.mkdtemp(prefix="merr1_manifest_bench_"))
  times: dict[bool, list[float]] = {True: [], False: []}
  hash_times = []
  try:
    time_save(root / "warmup", state, manifest=True, async_save=config.checkpoint.async_save)
    for i in range(args.repeats):
      for manifest in ((True, False) if i % 2 == 0 else (False, True)):
        d = root / f"r{i}_{manifest}"
        times[manifest].append(time_save(d, state, manifest=manifest, async_save=config.checkpoint.async_save))
      t0 = time.perf_counter()
      checkpoint.write_manifest(root / f"r{i}_False" / "1")
      hash_times.append(time.perf_counter() - t0)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  with_m, without = statistics.median(times[True]), statistics.median(times[False])
  paired = statistics.median(a - b for a, b in zip(times[True], times[False]))
  print(f"state: {args.config} ({args.stage} stage), {len(jax.tree.leaves(state))} arrays, {nbytes / 2**20:.1f} MiB;"
        f" async_save={config.checkpoint.async_save}; {args.repeats} repeats")
  print(f"save + wait without manifest: median {without * 1e3:.1f} ms "
        f"(min {min(times[False]) * 1e3:.1f}, max {max(times[False]) * 1e3:.1f})")
  print(f"save + wait with manifest:    median {with_m * 1e3:.1f} ms "
        f"(min {min(times[True]) * 1e3:.1f}, max {max(times[True]) * 1e3:.1f})")
  print(f"overhead: {100 * (with_m - without) / without:+.1f}% of a save (medians); paired difference: median "
        f"{paired * 1e3:+.1f} ms = {100 * paired / without:+.1f}%; write_manifest alone on a saved step: median "
        f"{statistics.median(hash_times) * 1e3:.1f} ms = {100 * statistics.median(hash_times) / without:.1f}%")
  print(f"machine: {cpu_model()}, {jax.devices()[0].platform}; date: {datetime.date.today().isoformat()}")


if __name__ == "__main__":
  main()
