"""Input-pipeline throughput: batches/s, examples/s and records/s for the SFT, RL and eval pipelines over MER-Synth.

Builds MER-Synth as ArrayRecord (TFDS, in a temporary data_dir unless --data_dir is given), then times each
pipeline after a warm-up, with 0 workers (threads only) and with multiprocess prefetch. Prints a table.

  python benchmarks/data.py [--n_train 2000] [--batch_size 16] [--batches 100] [--workers 0,2]

What is counted, independently of each other, over the timed batches:
  batches   the batches the iterator returned;
  examples  the real rows in them (`example_mask`; eval padding rows are not examples);
  records   the clips those rows come from: SFT makes one example per record and mode (slow, fast), so an SFT
            record is 2 examples; RL and eval make one example per record (an RL example holds both prompts).

For scale: docs/benchmarks/default_run.md ("Default run") measures an RL step of the default run at about 0.3-1 s for 8
prompts, i.e. a demand of 8-27 records/s. The pipeline is not the bottleneck while its RL records/s stays far
above that; the last line prints the ratio against the fast end (0.3 s per step).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from absl import flags

from merr1_jax.data import pipeline, schema, synth
from merr1_jax.data import tfds_builders as tb

RL_STEP_S = 0.3  # the fast end of the default run's RL step (docs/benchmarks/default_run.md, "Default run")
RL_PROMPTS_PER_STEP = 8  # configs/base.py rl.prompts_per_step


def consume(it, n: int) -> tuple[int, int]:
  """Reads up to `n` batches; returns (batches read, real examples in them). Stops early at the end of a
  finite stream."""
  batches = examples = 0
  for _ in range(n):
    try:
      b = next(it)
    except StopIteration:
      break
    batches += 1
    examples += int(np.count_nonzero(b["example_mask"]))
  return batches, examples


def _time(p: pipeline.Pipeline, n: int, warmup: int) -> tuple[int, int, float]:
  it = iter(p)
  consume(it, warmup)  # worker start-up and first fills are not steady state
  t = time.perf_counter()
  batches, examples = consume(it, n)
  dt = time.perf_counter() - t
  del it  # multiprocess iterators must be released before exit
  return batches, examples, dt


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n_train", type=int, default=2000)
  ap.add_argument("--batch_size", type=int, default=16)
  ap.add_argument("--batches", type=int, default=100)
  ap.add_argument("--warmup", type=int, default=5)
  ap.add_argument("--workers", default="0,2", help="comma-separated worker counts")
  ap.add_argument("--kinds", default="rl,sft,eval")
  ap.add_argument("--data_dir", default=None)
  args = ap.parse_args(argv)
  flags.FLAGS.mark_as_parsed()

  cfg = synth.SynthConfig(n_train=args.n_train)
  with tempfile.TemporaryDirectory() as tmp:
    builder = tb.MerSynth(config=tb.MerSynthConfig(name=f"bench{args.n_train}", synth=cfg),
                          data_dir=args.data_dir or tmp)
    t = time.perf_counter()
    tb.prepare(builder)
    prep_s = time.perf_counter() - t
    src = tb.TfdsSource(builder, "train")
    tok = synth.build_tokenizer(cfg)

    # Raw read + decode rate of the ArrayRecord source, for reference.
    n_raw = min(len(src), 1000)
    t = time.perf_counter()
    for i in range(n_raw):
      schema.from_bytes(src.read(i))
    raw_rps = n_raw / (time.perf_counter() - t)

    rows = []
    for kind in args.kinds.split(","):
      for workers in (int(w) for w in args.workers.split(",")):
        pcfg = pipeline.PipelineConfig(kind=kind, batch_size=args.batch_size, label_vocab=synth.EMOTIONS,
                                       video_dim=cfg.video_dim, audio_dim=cfg.audio_dim, worker_count=workers,
                                       num_epochs=None, shuffle=True)
        per_record = len(pcfg.sft_modes) if kind == "sft" else 1
        batches, examples, dt = _time(pipeline.build(src, tok, pcfg), args.batches, args.warmup)
        records = examples / per_record
        rows.append({"kind": kind, "workers": workers, "batches": batches, "examples": examples,
                     "records": records, "examples_per_record": per_record, "seconds": dt,
                     "batches_per_s": batches / dt, "examples_per_s": examples / dt, "records_per_s": records / dt})

  print(f"MER-Synth train: {len(src)} records, prepared in {prep_s:.2f} s; "
        f"raw ArrayRecord read+decode: {raw_rps:,.0f} records/s")
  print(f"{'pipeline':<8} {'workers':>7} {'batch':>5} {'batches/s':>10} {'examples/s':>11} {'records/s':>10}")
  for r in rows:
    print(f"{r['kind']:<8} {r['workers']:>7} {args.batch_size:>5} {r['batches_per_s']:>10,.1f} "
          f"{r['examples_per_s']:>11,.0f} {r['records_per_s']:>10,.0f}")
  print("(SFT: 2 examples per record, slow and fast; RL and eval: 1)")
  rl = [r for r in rows if r["kind"] == "rl"]
  if rl:
    need = RL_PROMPTS_PER_STEP / RL_STEP_S
    best = min(r["records_per_s"] for r in rl)
    print(f"RL demand of the default run: {RL_PROMPTS_PER_STEP} records per {RL_STEP_S} s step = {need:.0f} "
          f"records/s; the slowest RL row supplies {best:,.0f} records/s ({best / need:,.0f}x)")
  return rows


if __name__ == "__main__":
  main()
