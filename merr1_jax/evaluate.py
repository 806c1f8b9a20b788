"""`python -m merr1_jax.evaluate`: evaluate a trained policy on one or more datasets and write the reports.

    python -m merr1_jax.evaluate --config configs/base.py --workdir W [--checkpoint STEP|STAGE:STEP|PATH]
        [--modes fast,slow] [--datasets mer_synth,ovmerd] [--num_samples N] [--baseline W/eval_sft.json]
        [--mme_items ITEMS.json [--judge rule|module:Class] [--judge_cache PATH]] [--config.eval.batch_size=8 ...]

The policy and its one tokenizer come from `load_policy` (training/policy_io.py). The config's own dataset is read
by the trainer's own code, so a checkpoint's numbers equal the trainer's eval of it; the prepared MER-UniBench sets
and MME-Emotion (`--mme_items`, judged by evaluation/mme.py) are optional. Reports go to WORKDIR/eval/ or --out
(reports.write_reports), a folder each run replaces whole; `--baseline` adds whether the slow-minus-fast gap
closed. Bad input prints one `error: ...` line and exits with status 2. Details: docs/evaluation.md, "Running it",
"Reports" and "MME-Emotion".
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import pathlib
import sys
from typing import Sequence

import jax
import numpy as np

from merr1_jax import config as cfglib
from merr1_jax.evaluation import core as evaluation
from merr1_jax.evaluation import mme, mme_judges, reports
from merr1_jax.infra import sharding
from merr1_jax.task import rewards
from merr1_jax.training import settings as settingslib
from merr1_jax.training import setup as run_setup
from merr1_jax.training.policy_io import (
  EvalError,
  build_model,
  load_params,
  load_policy,  # noqa: F401 - part of this module's API (tests, notebooks)
  load_tokenizer,
  resolve_checkpoint,
)

_log = logging.getLogger("merr1_jax.evaluate")

# The prepared sets (tfds_builders.MerManual configs) and their metric (metrics.md §5): MER-UniBench's, and
# MME-Emotion's clips.
MANUAL_METRICS = {"mer2023": "hit", "mer2024": "hit", "meld": "hit", "iemocap4": "hit", "mosi": "waf",
                  "mosei": "waf", "sims": "waf", "simsv2": "waf", "ovmerd": "ov",
                  "mme_emotion": "ov"}  # OV scores its words; its benchmark scores come from the judge (--mme_items)


# ---------------------------------------------------------------------------------------------- config


def build_config(spec: str, overrides: Sequence[str] = ()):
  """The config of `spec` (path/to/config.py[:arg]) with the `--config.*` overrides applied.

  Any failure to build it is an EvalError naming the spec: a missing file, a config file's own check (an unknown
  preset raises ValueError or config.ConfigError), or an error inside the config file.
  """
  try:
    config = cfglib.load(spec)
  except ValueError as e:  # config.ConfigError included
    raise EvalError(f"--config {spec}: {e}") from None
  except Exception as e:  # noqa: BLE001 (a broken config file: report it as one line, not a traceback)
    raise EvalError(f"--config {spec}: {type(e).__name__}: {e}") from None
  return apply_overrides(config, overrides)


def apply_overrides(config, overrides: Sequence[str]):
  """`--config.a.b=value` overrides (value as a Python literal, else a string), type-checked by ConfigDict."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise EvalError(f"unrecognised argument {item!r} (overrides look like --config.eval.batch_size=8)")
    key, _, text = item[len("--config."):].partition("=")
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise EvalError(f"--config.{key}: no field {p!r}")
      node = node[p]
    if parts[-1] not in node:
      raise EvalError(f"--config.{key}: no field {parts[-1]!r}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      setattr(node, parts[-1], value)
    except (TypeError, ValueError, AttributeError) as e:
      raise EvalError(f"--config.{key}={text}: {e}") from None
  return config


def _mesh(config):
  return sharding.make_mesh(config.mesh.shape)


# ------------------------------------------------------------------------------------------------ data


def _own_data(config, workdir, tok, model) -> run_setup.Data:
  """The config's dataset by the trainer's own code (run_setup.open_data: TFDS, prepared in the data_dir if
  needed): the same sources, order and batching as the trainer's eval."""
  data_dir = config.data.data_dir or str(pathlib.Path(workdir) / "data")
  try:
    return run_setup.open_data(config, workdir, tok, model.config)
  except (FileNotFoundError, AssertionError, ValueError, OSError) as e:
    raise EvalError(f"dataset {config.data.name!r}: cannot prepare or open it in {data_dir}: {e}") from None


def _check_split(name: str, split: str, sources: dict, where: str) -> None:
  if split not in sources:
    raise EvalError(f"dataset {name!r} has no split {split!r} in {where} (have {sorted(sources)}); set "
                    "config.data.eval_split or prepare it first (data/tfds_builders.prepare with manual_dir)")


def dataset_pipelines(config, workdir, tok, names: Sequence[str], model) -> dict:
  """name -> (pipeline, metric) for the eval split of each dataset; EvalError for unknown names or empty splits.

  The config's own dataset is `run_setup.Data.eval_datasets()`, exactly what the trainer evaluates on. The
  MER-UniBench sets use the trainer's eval batching too (`Data.pipeline('eval', ...)`), without MER-Synth's
  closed label vocabulary.
  """
  known = {config.data.name: settingslib.own_metric(config)} | MANUAL_METRICS
  unknown = [n for n in names if n not in known]
  if unknown:
    raise EvalError(f"unknown dataset(s) {unknown}; known: {sorted(known)}")
  data_dir = config.data.data_dir or str(pathlib.Path(workdir) / "data")
  split = config.data.eval_split
  out = {}
  for name in names:
    if name == config.data.name:
      data = _own_data(config, workdir, tok, model)
      _check_split(name, split, data.sources, data_dir)
      (p, _), = data.eval_datasets().values()
      n_records = len(data.sources[split])
    else:
      source = _tfds_source(name, split, data_dir)
      manual = config.copy_and_resolve_references()
      manual.data.name = name  # not mer_synth: no closed label vocabulary
      p = run_setup.Data(manual, tok, model.config, {split: source}).pipeline("eval", split)
      n_records = len(source)
    if p.bad.count:
      _log.warning("%s: %s", name, p.bad.summary())
    if p.n_examples == 0:
      raise EvalError(f"dataset {name!r}: the eval split {split!r} has no examples ({n_records} records, "
                      f"{p.bad.count} skipped as bad)")
    out[name] = (p, known[name])
  return out


def _tfds_source(name: str, split: str, data_dir: str):
  from merr1_jax.data import tfds_builders  # noqa: PLC0415 (TFDS import is slow)
  try:
    builder = tfds_builders.MerManual(config=name, data_dir=data_dir)
    _check_split(name, split, builder.info.splits, data_dir)
    return tfds_builders.TfdsSource(builder, split)
  except EvalError:
    raise
  except (FileNotFoundError, AssertionError, ValueError) as e:
    raise EvalError(f"dataset {name!r}: cannot open the prepared data in {data_dir}: {e}") from None


# --------------------------------------------------------------------------------------------- baseline


def read_baseline(path: str | os.PathLike) -> dict:
  """{'source': path, 'datasets': {name: {'metric', 'summary': {mode: numbers}}}} of an earlier evaluation:
  a report.json of this CLI, or the trainer's WORKDIR/eval_<stage>.json. EvalError naming the file otherwise."""
  path = pathlib.Path(path)
  try:
    obj = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise EvalError(f"--baseline {path}: no such file") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise EvalError(f"--baseline {path}: not a readable JSON file ({e})") from None
  if isinstance(obj, dict) and isinstance(obj.get("datasets"), dict):  # report.json
    datasets = {n: {"metric": d.get("metric"), "summary": d.get("summary")} for n, d in obj["datasets"].items()
                if isinstance(d, dict)}
  elif isinstance(obj, dict) and isinstance(obj.get("summary"), dict):  # the trainer's eval_<stage>.json
    datasets = {n: {"metric": None, "summary": s} for n, s in obj["summary"].items()}
  else:
    raise EvalError(f"--baseline {path}: expected a report.json of `python -m merr1_jax.evaluate` (a 'datasets' "
                    "object) or the trainer's WORKDIR/eval_<stage>.json (a 'summary' object)")
  bad = [n for n, d in datasets.items() if not isinstance(d["summary"], dict)
         or not all(isinstance(v, dict) for v in d["summary"].values())]
  if bad:
    raise EvalError(f"--baseline {path}: dataset(s) {bad} have no per-mode summary")
  return {"source": str(path), "datasets": datasets}


# ------------------------------------------------------------------------------------------------- MME-Emotion


def mme_setup(args, workdir: pathlib.Path, modes: Sequence[str], format_version: str = "2025") -> dict:
  """The --mme_items side, checked before anything is evaluated: the item specs, the judge, the cache path."""
  if "slow" not in modes:
    raise EvalError(f"--mme_items {args.mme_items}: MME-Emotion judges the slow mode's reasoning; add slow to "
                    f"--modes (have {list(modes)})")
  try:
    items = mme.read_items(args.mme_items)
  except FileNotFoundError:
    raise EvalError(f"--mme_items {args.mme_items}: no such file") from None
  except (OSError, ValueError) as e:  # labels.BadRecordError names the item and field
    raise EvalError(f"--mme_items {args.mme_items}: {e}") from None
  try:
    judge = mme_judges.load_judge(args.judge, format_version)
  except ValueError as e:
    raise EvalError(str(e)) from None
  return {"source": args.mme_items, "items": items, "judge": judge,
          "cache": pathlib.Path(args.judge_cache or workdir / "mme_judge_cache.jsonl")}


def judge_mme(setup: dict, results) -> dict:
  """mme.run_mme over the slow-mode samples of `results` whose ids are the items', through the cache."""
  samples = [s for r in results.values() for s in r.samples]
  try:
    items = mme.items_from_samples(setup["items"], samples, source=f"--mme_items {setup['source']}")
    return mme.run_mme(items, mme.CachedJudge(setup["judge"], setup["cache"]))
  except OSError as e:
    raise EvalError(f"--judge_cache {setup['cache']}: {e}") from None
  except ValueError as e:  # the items, a cache line (file:line), a judge's reply (judge and item)
    raise EvalError(str(e)) from None


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m merr1_jax.evaluate", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/base.py[:arg]")
  p.add_argument("--workdir", required=True)
  p.add_argument("--checkpoint", default=None, help="STEP, STAGE:STEP, or a path (HF dir or checkpoint step dir)")
  p.add_argument("--modes", default="fast,slow")
  p.add_argument("--datasets", default=None, help="comma list (default: the config's dataset)")
  p.add_argument("--num_samples", type=int, default=1, help="1 = greedy; N > 1 samples at --temperature")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--baseline", default=None,
                 help="an earlier report.json or WORKDIR/eval_<stage>.json: report whether the slow-fast gap closed")
  p.add_argument("--mme_items", default=None,
                 help="MME-Emotion items JSON: judge the slow-mode completions of the samples with these ids")
  p.add_argument("--judge", default="rule",
                 help="MME judge: rule (offline stand-in, not the benchmark's LLM judge) or module:Class")
  p.add_argument("--judge_cache", default=None, help="judge cache JSONL (default WORKDIR/mme_judge_cache.jsonl)")
  p.add_argument("--out", default=None, help="report directory (default WORKDIR/eval)")
  p.add_argument("--no_progress", action="store_true")
  return p


def check_paths(args) -> tuple[pathlib.Path, pathlib.Path]:
  """(workdir, report folder), checked before anything is built or written: the workdir must exist (a mistyped
  one is not created), the report folder must be one that a report may replace (reports.check_report_dir: not
  the workdir, not around it, not in its checkpoints, not someone else's non-empty folder), and the MME judge
  cache must not be inside it (the next report would remove it)."""
  workdir = pathlib.Path(args.workdir)
  if not workdir.exists():
    raise EvalError(f"--workdir {workdir}: no such folder")
  if not workdir.is_dir():
    raise EvalError(f"--workdir {workdir}: not a folder")
  out = args.out or workdir / "eval"
  try:
    resolved = reports.check_report_dir(out, workdir=workdir)
  except reports.ReportDirError as e:
    raise EvalError(f"--out {out}: {e.reason}") from None
  cache = getattr(args, "judge_cache", None)
  if cache and resolved in pathlib.Path(cache).expanduser().resolve().parents:
    raise EvalError(f"--judge_cache {cache}: is inside the report folder {out}, which each run replaces whole; keep "
                    f"it outside (default {workdir / 'mme_judge_cache.jsonl'})")
  return workdir, resolved


def run(args, overrides: Sequence[str]) -> dict:
  workdir, out = check_paths(args)
  config = build_config(args.config, overrides)
  try:
    settingslib.validate(config, jax.device_count())
  except ValueError as e:  # config.ConfigError included
    raise EvalError(f"config: {e}") from None
  shards = _mesh(config).shape["data"] * _mesh(config).shape["fsdp"]
  if config.eval.batch_size % shards:
    raise EvalError(f"config.eval.batch_size={config.eval.batch_size} does not split over the {shards} batch "
                    "shards of the mesh (data x fsdp); use a multiple")
  if jax.process_count() > 1:
    raise EvalError("the evaluate CLI runs on one process (per-sample results are not gathered across hosts)")
  names = [n for n in (args.datasets or config.data.name).split(",") if n]
  modes = tuple(m for m in args.modes.split(",") if m)
  try:
    settings = settingslib.evaluation_settings(config, modes=modes, num_samples=args.num_samples,
                                               temperature=args.temperature)
    settings.validate()
  except ValueError as e:
    raise EvalError(str(e)) from None
  baseline = read_baseline(args.baseline) if args.baseline else None
  judging = mme_setup(args, workdir, modes, config.eval.format_version) if args.mme_items else None
  # Which policy (directory listings only): its tokenizer is the one the data is tokenized with. A missing
  # checkpoint is reported after the datasets are checked, so an unknown dataset or an empty split comes first.
  try:
    kind, where = resolve_checkpoint(config, workdir, args.checkpoint)
    missing = None
  except EvalError as e:
    kind, where, missing = None, None, e
  tok = load_tokenizer(config, workdir, where if kind == "hf" else None)
  model = build_model(config, tok)
  datasets = dataset_pipelines(config, workdir, tok, names, model)
  if missing is not None:
    raise missing
  params = load_params(config, workdir, kind, where, model)
  token_sets = rewards.category_token_sets(settings.space, tok.encode, model.config.vocab_size)
  try:
    results = evaluation.evaluate(model, params, tok, datasets, settings=settings, token_sets=token_sets,
                                  mesh=_mesh(config), progress=not args.no_progress, split=config.data.eval_split)
  except ValueError as e:
    raise EvalError(str(e)) from None
  meta = {"checkpoint": str(where) if kind == "hf" else f"{workdir}/checkpoints/{where[0]}/{where[1]}",
          "checkpoint_kind": kind, "config": args.config, "overrides": list(overrides),
          "datasets": {n: m for n, (_, m) in datasets.items()}}
  scores = judge_mme(judging, results) if judging else None
  try:
    files = reports.write_reports(results, out, meta=meta, baseline=baseline, mme=scores, workdir=workdir)
  except reports.ReportDirError as e:  # something appeared in the folder while we evaluated
    raise EvalError(f"--out {args.out or out}: {e.reason}") from None
  for name, r in results.items():
    for mode in r.summary:
      print(f"{name} [{mode}] {r.metric}: {reports.headline(r, mode)}")
  for line in reports.skipped_lines({n: r.skipped for n, r in results.items()}):
    print(f"skipped as bad records: {line}")
  if baseline is not None:
    for line in reports.gap_lines(results, baseline):
      print(line)
  if scores is not None:
    o, calls = scores["overall"], scores["judge_calls"]
    print(f"mme-emotion [{scores['judge']}]: Rec-S {o['rec_s']:.2f} Rea-S {o['rea_s']:.2f} CoT-S {o['cot_s']:.2f} "
          f"({scores['n_items']} items; judge asked {calls['asked']}, cached {calls['cached']})")
  print(f"reports: {files['report.md'].parent}")
  return results


def main(argv: Sequence[str] | None = None) -> int:
  args, overrides = _parser().parse_known_args(argv)  # argparse itself exits 2 on bad flags
  try:
    run(args, overrides)
  except EvalError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  np.set_printoptions(precision=4)
  sys.exit(main())
