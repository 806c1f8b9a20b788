"""`python -m merr1_jax.evaluate`: evaluate a trained policy on one or more datasets and write the reports.

    python -m merr1_jax.evaluate --config configs/base.py --workdir W [--checkpoint STEP|STAGE:STEP|PATH]
        [--modes fast,slow] [--datasets mer_synth,ovmerd] [--num_samples N] [--baseline W/eval_sft.json]
        [--config.eval.batch_size=8 ...]

The policy comes from ONE place, `load_policy(config, workdir, checkpoint)`:
  * no --checkpoint: the latest step of the last stage in config.stages that has one (WORKDIR/checkpoints/<stage>),
    else the HF export WORKDIR/export;
  * STEP or STAGE:STEP: that training checkpoint (STEP alone: the last stage that holds it);
  * PATH: an exported HF policy directory (config.json + *.safetensors; models.hf_io.load_hf, which also restores
    the video/audio projectors that `save_hf` writes next to the HF weights), or a checkpoint step directory
    WORKDIR/checkpoints/<stage>/<step>.
The model is built from the config (models: config.model), and a checkpoint written under another model config
(another preset or size) is refused with the differing fields named.

One tokenizer, the one that goes with the policy, tokenizes the datasets, builds the model and decodes
(`load_tokenizer`): a tokenizer.json in the HF policy directory, else the run's, chosen as the trainer chooses it
(config.data.tokenizer_dir or a real model's hf_path, else WORKDIR/tokenizer.json, else the MER-Synth one rebuilt
from the config). When an HF directory and the run both have
one, they must agree on the vocabulary size and the special/tag token ids; otherwise it is an error naming both.

Datasets: the config's own (config.data.name, e.g. mer_synth: OV) is read by the trainer's own code
(run_setup: the same TFDS source, order and batching as the trainer's eval), so the CLI's numbers for a checkpoint
equal the trainer's by construction; and the prepared MER-UniBench sets of data/tfds_builders.MerManual (mer2023,
mer2024, meld, iemocap4: HIT; mosi, mosei, sims, simsv2: WAF; ovmerd: OV), batched with the same settings.

Reports go to WORKDIR/eval/ (reports.write_reports), including predictions CSVs for `python -m merr1_jax.metrics`
and the official tools. `--baseline` (an earlier report.json, or the trainer's WORKDIR/eval_<stage>.json) adds a
computed statement of whether the slow-minus-fast gap closed since then (reports.gap_change).

Bad input (a config that cannot be built, a bad --config override, a missing checkpoint, an unknown dataset, an
empty split, a checkpoint of another model, disagreeing tokenizers, an unreadable baseline) prints one
`error: ...` line and exits with status 2.
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
from merr1_jax import evaluation, prompts, reports, rewards, sharding
from merr1_jax.data import synth
from merr1_jax.data import tokenizer as toklib
from merr1_jax.models import hf_io, mllm

_log = logging.getLogger("merr1_jax.evaluate")

# MER-UniBench sets (tfds_builders.MerManual configs) and their metric (metrics.md §5).
MANUAL_METRICS = {"mer2023": "hit", "mer2024": "hit", "meld": "hit", "iemocap4": "hit", "mosi": "waf",
                  "mosei": "waf", "sims": "waf", "simsv2": "waf", "ovmerd": "ov"}
OWN_METRICS = {"mer_synth": "ov", "mer_features": "ov"}


class EvalError(Exception):
  """Bad CLI input; the message says what and where. Exit status 2."""


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


def _synth_config(config) -> synth.SynthConfig:
  # The trainer's generator settings (run_setup.setup): the same records and the same tokenizer corpus.
  return synth.SynthConfig(n_train=config.data.synth_train, n_validation=config.data.synth_validation,
                           n_test=config.data.synth_test, noise=config.data.synth_noise)


def _mesh(config):
  return sharding.make_mesh(config.mesh.shape)


# ------------------------------------------------------------------------------------------- tokenizer


def tokenizer_signature(tok) -> dict:
  """What a policy and its data must agree on: vocabulary size, eos/pad ids and every marker token's id."""
  out = {"vocab_size": int(tok.vocab_size), "eos_id": int(tok.eos_id), "pad_id": int(tok.pad_id)}
  for token in prompts.SPECIAL_TOKENS + prompts.TAG_TOKENS:
    try:
      out[token] = tok.id_of(token)
    except KeyError:
      out[token] = None
  return out


def _run_tokenizer(config, workdir) -> tuple[object | None, str]:
  """The run's tokenizer on disk, chosen as the trainer chooses it (run_setup), or None when there is none."""
  directory = cfglib.tokenizer_dir(config)  # data.tokenizer_dir, or a real model's hf_path
  if directory:
    try:
      return toklib.load_hf(directory), f"tokenizer directory {directory}"
    except (OSError, ValueError) as e:  # FileNotFoundError included
      raise EvalError(f"tokenizer directory {directory} (config.data.tokenizer_dir or config.model.hf_path): "
                      f"cannot load a tokenizer: {e}") from None
  path = pathlib.Path(workdir) / "tokenizer.json"
  if path.is_file():
    return toklib.load(path), str(path)
  return None, ""


def load_tokenizer(config, workdir: str | os.PathLike, hf_dir: str | os.PathLike | None = None):
  """The one tokenizer of an evaluation: the HF policy directory's tokenizer.json when `hf_dir` has one, else
  the run's (config.tokenizer_dir(config), WORKDIR/tokenizer.json, or MER-Synth's rebuilt from the config).

  Raises EvalError when the HF directory's tokenizer and the run's disagree on the vocabulary size or the
  special/tag token ids (the policy would read token ids its data never meant).
  """
  run_tok, run_where = _run_tokenizer(config, workdir)
  hf_file = pathlib.Path(hf_dir) / "tokenizer.json" if hf_dir else None
  if hf_file is not None and hf_file.is_file():
    hf_tok = toklib.load_hf(hf_file.parent)
    if run_tok is not None:
      want, have = tokenizer_signature(hf_tok), tokenizer_signature(run_tok)
      diffs = [f"{k}: {want[k]} vs {have[k]}" for k in want if want[k] != have[k]]
      if diffs:
        raise EvalError(f"the policy's tokenizer {hf_file} and the run's {run_where} disagree ("
                        + "; ".join(diffs) + "): evaluate the policy with the workdir or tokenizer_dir it was "
                        "trained with")
    return hf_tok
  if run_tok is not None:
    return run_tok
  return synth.build_tokenizer(_synth_config(config))


# ---------------------------------------------------------------------------------------------- policy


def _is_hf_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _stage_steps(workdir: pathlib.Path, stage: str) -> list[int]:
  d = workdir / "checkpoints" / stage
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def resolve_checkpoint(config, workdir, checkpoint: str | None) -> tuple[str, object]:
  """('hf', path) or ('train', (stage, step)) for a --checkpoint value; EvalError naming what was looked for.
  Reads directory listings only, no arrays."""
  workdir = pathlib.Path(workdir)
  stages = list(config.stages)
  if checkpoint is None or checkpoint == "":
    for stage in reversed(stages):
      steps = _stage_steps(workdir, stage)
      if steps:
        return "train", (stage, steps[-1])
    if _is_hf_dir(workdir / "export"):
      return "hf", workdir / "export"
    raise EvalError(f"no checkpoint in {workdir}: looked for {workdir}/checkpoints/{{{','.join(stages)}}}/<step> "
                    f"and an HF export in {workdir}/export")
  stage, sep, step_text = checkpoint.rpartition(":")
  if step_text.isdigit():
    step = int(step_text)
    candidates = [stage] if sep else list(reversed(stages))
    for s in candidates:
      if step in _stage_steps(workdir, s):
        return "train", (s, step)
    have = {s: _stage_steps(workdir, s) for s in stages}
    raise EvalError(f"no checkpoint for step {step} in {workdir}/checkpoints/{{{','.join(candidates)}}}; "
                    f"steps found: {have}")
  path = pathlib.Path(checkpoint)
  if _is_hf_dir(path):
    return "hf", path
  if path.is_dir() and path.name.isdigit() and path.parent.parent.name == "checkpoints":
    return "train", (path.parent.name, int(path.name))
  if not path.exists():
    raise EvalError(f"--checkpoint {checkpoint}: no such step or path")
  raise EvalError(f"--checkpoint {checkpoint}: neither an HF policy directory (config.json + *.safetensors) nor "
                  "a training checkpoint step directory (WORKDIR/checkpoints/<stage>/<step>)")


def _model_differences(stored: dict | None, config) -> list[str]:
  if not stored or "model" not in stored:
    return []
  now = json.loads(cfglib.to_json(config))["model"]
  old = stored["model"]
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (JSON turns tuples into lists)
  return [f"model.{k}: checkpoint {old.get(k, '<absent>')!r}, config {now.get(k, '<absent>')!r}"
          for k in sorted(set(old) | set(now)) if k != "hf_path" and norm(old.get(k)) != norm(now.get(k))]


def build_model(config, tok):
  """The policy model of `config.model`, with the tokenizer-derived fields from `tok` (as run_setup.setup)."""
  try:
    return mllm.build(cfglib.model_config(config, vocab_size=tok.vocab_size,
                                           video_token_id=tok.id_of(prompts.VIDEO_TOKEN),
                                           audio_token_id=tok.id_of(prompts.AUDIO_TOKEN)))
  except (ValueError, KeyError) as e:  # config.ConfigError included
    raise EvalError(f"config.model: {e}") from None


def load_params(config, workdir, kind: str, where, model):
  """The parameters of a resolved checkpoint (`resolve_checkpoint`) for `model`, on the config's mesh.

  Raises EvalError for a checkpoint that does not fit the model (naming the fields or tensors that differ).
  """
  mesh = _mesh(config)
  rules = dict(config.mesh.axis_rules)
  abstract = model.abstract_params()
  shardings = sharding.param_shardings(model, abstract, mesh, rules)
  if kind == "hf":
    try:
      params, report = hf_io.load_hf(str(where), model, shardings=shardings, projectors="require")
    except (ValueError, FileNotFoundError) as e:  # config.json, tensors or projectors that do not fit this model
      raise EvalError(f"{where}: does not match the model of this config: {e}") from None
    _log.info("loaded HF policy %s: %s", where, report)
    return params
  stage, step = where
  from merr1_jax import checkpoint as ckptlib  # noqa: PLC0415 (orbax is slow to import; HF loading skips it)
  directory = pathlib.Path(workdir) / "checkpoints" / stage
  template = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  # No config_json: the trainer's whole-config check would refuse any changed field (rl.steps, ...); only the
  # model section decides whether these weights fit, and it is compared here, naming each differing field.
  with ckptlib.Checkpointer(directory, save_every=1, keep=1_000_000, async_save=False) as ckpt:
    diffs = _model_differences(ckpt.stored_config(step), config)
    if diffs:
      raise EvalError(f"checkpoint {directory}/{step} was written for another model: " + "; ".join(diffs))
    try:
      state, _, _ = ckpt.restore(step, _abstract_train_state(config, model, stage, template, mesh))
    except ValueError as e:  # a leaf missing or reshaped: names every one
      raise EvalError(str(e)) from None
  return state.params


def load_policy(config, workdir, checkpoint: str | None):
  """(model, params, tokenizer) of a training checkpoint or an exported HF policy (see the module docstring).

  Raises EvalError for a missing checkpoint, one written under another model config, or disagreeing tokenizers.
  """
  kind, where = resolve_checkpoint(config, workdir, checkpoint)
  tok = load_tokenizer(config, workdir, where if kind == "hf" else None)
  model = build_model(config, tok)
  return model, load_params(config, workdir, kind, where, model), tok


def _abstract_train_state(config, model, stage: str, template, mesh):
  """The stage's TrainState layout as the trainer builds it (run_setup.Run.final_params), with shardings: the
  checkpoint holds the whole state, and restore names every leaf that differs."""
  from merr1_jax import checkpoint as ckptlib  # noqa: PLC0415
  from merr1_jax import optim  # noqa: PLC0415
  from merr1_jax import train_step as ts  # noqa: PLC0415
  freeze = tuple(config.rl.freeze) if stage == "rl" else ()
  tx = optim.make_optimizer(cfglib.optim_config(config, stage), template, freeze=freeze)
  state = jax.eval_shape(lambda p: ts.init_state(p, tx, with_reference=stage == "rl" and config.rl.beta > 0,
                                                 freeze=freeze, ref_dtype=model.config.jnp_compute_dtype), template)
  param_shardings = jax.tree.map(lambda a: a.sharding, template)
  return ckptlib.abstract_with_shardings(state, sharding.state_shardings(state, param_shardings, mesh))


# ------------------------------------------------------------------------------------------------ data


def _trainer_run(config, workdir, tok, model, sources: dict):
  """A run_setup.Run holding only what its data methods read, so that the CLI calls the trainer's own
  `Run.eval_datasets` / `Run.pipeline` (same source, order and batching) instead of a copy of them."""
  from merr1_jax import run_setup  # noqa: PLC0415
  return run_setup.Run(config=config, workdir=pathlib.Path(workdir), tokenizer=tok, model=model, mesh=None,
                       axis_rules=dict(config.mesh.axis_rules), sources=sources, writer=None, ctx=None,
                       eval_settings=None, eval_dataset_name=config.data.name)


def _own_sources(config, workdir) -> dict:
  """split -> source of the config's dataset, by the trainer's code (TFDS, prepared in the data_dir if needed)."""
  from merr1_jax import run_setup  # noqa: PLC0415
  data_dir = config.data.data_dir or str(pathlib.Path(workdir) / "data")
  try:
    return run_setup._sources(config, pathlib.Path(workdir), _synth_config(config))  # noqa: SLF001
  except (FileNotFoundError, AssertionError, ValueError, OSError) as e:
    raise EvalError(f"dataset {config.data.name!r}: cannot prepare or open it in {data_dir}: {e}") from None


def _check_split(name: str, split: str, sources: dict, where: str) -> None:
  if split not in sources:
    raise EvalError(f"dataset {name!r} has no split {split!r} in {where} (have {sorted(sources)}); set "
                    "config.data.eval_split or prepare it first (data/tfds_builders.prepare with manual_dir)")


def dataset_pipelines(config, workdir, tok, names: Sequence[str], model) -> dict:
  """name -> (pipeline, metric) for the eval split of each dataset; EvalError for unknown names or empty splits.

  The config's own dataset is `run_setup.Run.eval_datasets()`, exactly what the trainer evaluates on. The
  MER-UniBench sets use the trainer's eval batching too (`Run.pipeline('eval', ...)`), without MER-Synth's
  closed label vocabulary.
  """
  known = {config.data.name: OWN_METRICS.get(config.data.name, "ov")} | MANUAL_METRICS
  unknown = [n for n in names if n not in known]
  if unknown:
    raise EvalError(f"unknown dataset(s) {unknown}; known: {sorted(known)}")
  data_dir = config.data.data_dir or str(pathlib.Path(workdir) / "data")
  split = config.data.eval_split
  out = {}
  for name in names:
    if name == config.data.name:
      sources = _own_sources(config, workdir)
      _check_split(name, split, sources, data_dir)
      (p, _), = _trainer_run(config, workdir, tok, model, sources).eval_datasets().values()
      n_records = len(sources[split])
    else:
      source = _tfds_source(name, split, data_dir)
      manual = config.copy_and_resolve_references()
      manual.data.name = name  # not mer_synth: no closed label vocabulary
      p = _trainer_run(manual, workdir, tok, model, {split: source}).pipeline("eval", split)
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
  p.add_argument("--out", default=None, help="report directory (default WORKDIR/eval)")
  p.add_argument("--no_progress", action="store_true")
  return p


def run(args, overrides: Sequence[str]) -> dict:
  config = build_config(args.config, overrides)
  try:
    cfglib.validate(config, jax.device_count())
  except ValueError as e:  # config.ConfigError included
    raise EvalError(f"config: {e}") from None
  shards = _mesh(config).shape["data"] * _mesh(config).shape["fsdp"]
  if config.eval.batch_size % shards:
    raise EvalError(f"config.eval.batch_size={config.eval.batch_size} does not split over the {shards} batch "
                    "shards of the mesh (data x fsdp); use a multiple")
  if jax.process_count() > 1:
    raise EvalError("the evaluate CLI runs on one process (per-sample results are not gathered across hosts)")
  workdir = pathlib.Path(args.workdir)
  names = [n for n in (args.datasets or config.data.name).split(",") if n]
  modes = tuple(m for m in args.modes.split(",") if m)
  settings = evaluation.EvalSettings(
      modes=modes, num_samples=args.num_samples, temperature=args.temperature,
      max_new_tokens={"slow": config.eval.max_new_tokens_slow, "fast": config.eval.max_new_tokens_fast},
      format_version=config.eval.format_version, seed=config.seed)
  try:
    settings.validate()
  except ValueError as e:
    raise EvalError(str(e)) from None
  baseline = read_baseline(args.baseline) if args.baseline else None
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
  space = rewards.LabelSpace.emotion_wheel(settings.format_version)
  token_sets = rewards.category_token_sets(space, tok.encode, model.config.vocab_size)
  try:
    results = evaluation.evaluate(model, params, tok, datasets, settings=settings, token_sets=token_sets,
                                  mesh=_mesh(config), progress=not args.no_progress)
  except ValueError as e:
    raise EvalError(str(e)) from None
  meta = {"checkpoint": str(where) if kind == "hf" else f"{workdir}/checkpoints/{where[0]}/{where[1]}",
          "checkpoint_kind": kind, "config": args.config, "overrides": list(overrides),
          "datasets": {n: m for n, (_, m) in datasets.items()}}
  files = reports.write_reports(results, args.out or workdir / "eval", meta=meta, baseline=baseline)
  for name, r in results.items():
    for mode in r.summary:
      print(f"{name} [{mode}] {r.metric}: {reports.headline(r, mode)}")
  if baseline is not None:
    for line in reports.gap_lines(results, baseline):
      print(line)
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
