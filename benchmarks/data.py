"""Input-pipeline throughput: records/s and batches/s for the SFT, RL and eval pipelines over MER-Synth.

Builds MER-Synth as ArrayRecord (TFDS, in a temporary data_dir unless --data_dir is given), then times each
pipeline after a warm-up, with 0 workers (threads only) and with multiprocess prefetch. Prints a table.

  python benchmarks/data.py [--n_train 2000] [--batch_size 16] [--batches 100] [--workers 0,2]

For scale: a tiny-model RL step on this CPU takes tens to hundreds of milliseconds (ecosystem.md), so the
pipeline is not the bottleneck while batches/s stays well above the step rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from absl import flags

from merr1_jax.data import pipeline, schema, synth
from merr1_jax.data import tfds_builders as tb


def _time_batches(p: pipeline.Pipeline, n: int, warmup: int) -> float:
  it = iter(p)
  for _ in range(warmup):  # worker start-up and first fills are not steady state
    next(it)
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  dt = time.perf_counter() - t
  del it  # multiprocess iterators must be released before exit (ecosystem.md pitfall 5)
  return dt


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
        p = pipeline.build(src, tok, pcfg)
        dt = _time_batches(p, args.batches, args.warmup)
        rows.append({"kind": kind, "workers": workers, "batches_per_s": args.batches / dt,
                     "records_per_s": args.batches * args.batch_size / dt})

  print(f"MER-Synth train: {len(src)} records, prepared in {prep_s:.2f} s; "
        f"raw ArrayRecord read+decode: {raw_rps:,.0f} records/s")
  print(f"{'pipeline':<8} {'workers':>7} {'batch':>5} {'records/s':>10} {'batches/s':>10}")
  for r in rows:
    print(f"{r['kind']:<8} {r['workers']:>7} {args.batch_size:>5} {r['records_per_s']:>10,.0f} "
          f"{r['batches_per_s']:>10,.1f}")
  return rows


if __name__ == "__main__":
  main()
