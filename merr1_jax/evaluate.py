"""`python -m merr1_jax.evaluate`: evaluate a trained policy on one or more datasets and write the reports.

    python -m merr1_jax.evaluate --config configs/base.py --workdir W [--checkpoint STEP|STAGE:STEP|PATH]
        [--modes fast,slow] [--datasets mer_synth,ovmerd] [--num_samples N] [--config.eval.batch_size=8 ...]

The policy comes from ONE place, `load_policy(config, workdir, checkpoint)`:
  * no --checkpoint: the latest step of the last stage in config.stages that has one (WORKDIR/checkpoints/<stage>),
    else the HF export WORKDIR/export;
  * STEP or STAGE:STEP: that training checkpoint (STEP alone: the last stage that holds it);
  * PATH: an exported HF policy directory (config.json + *.safetensors; models.hf_io.load_hf), or a checkpoint
    step directory WORKDIR/checkpoints/<stage>/<step>.
The model is built from the config (models: config.model), and a checkpoint written under another model config
is refused with the differing fields named. The tokenizer is the run's (config.data.tokenizer_dir, or
WORKDIR/tokenizer.json, or a tokenizer.json in the HF directory, or the MER-Synth one rebuilt from the config).

Datasets: the config's own (config.data.name, e.g. mer_synth: OV), and the prepared MER-UniBench sets of
data/tfds_builders.MerManual (mer2023, mer2024, meld, iemocap4: HIT; mosi, mosei, sims, simsv2: WAF; ovmerd: OV).
Reports go to WORKDIR/eval/ (reports.write_reports). Bad input (missing checkpoint, unknown dataset, empty split,
config mismatch, a bad --config override) prints `error: ...` and exits with status 2.
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
from merr1_jax.data import pipeline, synth
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


def load_tokenizer(config, workdir: str | os.PathLike, hf_dir: str | None = None):
  if config.data.tokenizer_dir:
    return toklib.load_hf(config.data.tokenizer_dir)
  dirs = ([pathlib.Path(hf_dir)] if hf_dir else []) + [pathlib.Path(workdir)]
  candidates = [d / "tokenizer.json" for d in dirs]
  for path in candidates:
    if path.is_file():
      return toklib.load(path)
  return synth.build_tokenizer(_synth_config(config))


def _mesh(config):
  return sharding.make_mesh(config.mesh.shape)


# ---------------------------------------------------------------------------------------------- policy


def _is_hf_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _stage_steps(workdir: pathlib.Path, stage: str) -> list[int]:
  d = workdir / "checkpoints" / stage
  return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def resolve_checkpoint(config, workdir, checkpoint: str | None) -> tuple[str, object]:
  """('hf', path) or ('train', (stage, step)) for a --checkpoint value; EvalError naming what was looked for."""
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


def load_policy(config, workdir, checkpoint: str | None):
  """(model, params, tokenizer) of a training checkpoint or an exported HF policy (see the module docstring).

  Raises EvalError for a missing checkpoint or one written under another model config.
  """
  kind, where = resolve_checkpoint(config, workdir, checkpoint)
  tok = load_tokenizer(config, workdir, str(where) if kind == "hf" else None)
  model = mllm.build(cfglib.model_config(config, vocab_size=tok.vocab_size,
                                         video_token_id=tok.id_of(prompts.VIDEO_TOKEN),
                                         audio_token_id=tok.id_of(prompts.AUDIO_TOKEN)))
  mesh = _mesh(config)
  rules = dict(config.mesh.axis_rules)
  abstract = model.abstract_params()
  shardings = sharding.param_shardings(model, abstract, mesh, rules)
  if kind == "hf":
    try:
      params, report = hf_io.load_hf(str(where), model, shardings=shardings)
    except ValueError as e:  # config.json or tensors that do not fit this model
      raise EvalError(f"{where}: does not match the model of this config: {e}") from None
    _log.info("loaded HF policy %s: %s (video/audio projectors are not part of an HF export: random init)",
              where, report)
    return model, params, tok
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
  return model, state.params, tok


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


def dataset_pipelines(config, workdir, tok, names: Sequence[str], model_cfg: dict) -> dict:
  """name -> (pipeline, metric) for the eval split of each dataset; EvalError for unknown names or empty splits."""
  known = {config.data.name: OWN_METRICS.get(config.data.name, "ov")} | MANUAL_METRICS
  unknown = [n for n in names if n not in known]
  if unknown:
    raise EvalError(f"unknown dataset(s) {unknown}; known: {sorted(known)}")
  data_dir = config.data.data_dir or str(pathlib.Path(workdir) / "data")
  out = {}
  for name in names:
    split = config.data.eval_split
    if name == "mer_synth":
      source = pipeline.BytesSource(list(synth.generate_split(_synth_config(config), split)),
                                    name=f"mer_synth/{split}")
    else:
      source = _tfds_source(config, name, split, data_dir)
    pcfg = pipeline.PipelineConfig(
        kind="eval", mode="slow", batch_size=config.eval.batch_size, shuffle=False, num_epochs=1,
        drop_remainder=False, video_dim=model_cfg["video_dim"] or None, audio_dim=model_cfg["audio_dim"] or None,
        on_bad_record=config.data.on_bad_record, label_vocab=synth.EMOTIONS if name == "mer_synth" else None)
    p = pipeline.build(source, tok, pcfg)
    if p.bad.count:
      _log.warning("%s: %s", name, p.bad.summary())
    if p.n_examples == 0:
      raise EvalError(f"dataset {name!r}: the eval split {split!r} has no examples ({len(source)} records, "
                      f"{p.bad.count} skipped as bad)")
    out[name] = (p, known[name])
  return out


def _tfds_source(config, name: str, split: str, data_dir: str):
  from merr1_jax.data import tfds_builders  # noqa: PLC0415 (TFDS import is slow)
  try:
    if name == "mer_features":
      builder = tfds_builders.MerFeatures(records_dir=config.data.records_dir, data_dir=data_dir)
      tfds_builders.prepare(builder)
    else:
      builder = tfds_builders.MerManual(config=name, data_dir=data_dir)
    if split not in builder.info.splits:
      raise EvalError(f"dataset {name!r} has no split {split!r} in {data_dir} (have {list(builder.info.splits)}); "
                      "prepare it first (data/tfds_builders.prepare with manual_dir)")
    return tfds_builders.TfdsSource(builder, split)
  except EvalError:
    raise
  except (FileNotFoundError, AssertionError, ValueError) as e:
    raise EvalError(f"dataset {name!r}: cannot open the prepared data in {data_dir}: {e}") from None


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
  p.add_argument("--out", default=None, help="report directory (default WORKDIR/eval)")
  p.add_argument("--no_progress", action="store_true")
  return p


def run(args, overrides: Sequence[str]) -> dict:
  try:
    config = cfglib.load(args.config)
  except cfglib.ConfigError as e:
    raise EvalError(str(e)) from None
  apply_overrides(config, overrides)
  try:
    cfglib.validate(config, jax.device_count())
  except cfglib.ConfigError as e:
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
  # Data first: an unknown dataset or an empty split fails before any checkpoint is read.
  tok = load_tokenizer(config, workdir)
  datasets = dataset_pipelines(config, workdir, tok, names, config.model.to_dict())
  model, params, tok = load_policy(config, workdir, args.checkpoint)
  space = rewards.LabelSpace.emotion_wheel(settings.format_version)
  token_sets = rewards.category_token_sets(space, tok.encode, model.config.vocab_size)
  try:
    results = evaluation.evaluate(model, params, tok, datasets, settings=settings, token_sets=token_sets,
                                  mesh=_mesh(config), progress=not args.no_progress)
  except ValueError as e:
    raise EvalError(str(e)) from None
  kind, where = resolve_checkpoint(config, workdir, args.checkpoint)
  meta = {"checkpoint": str(where) if kind == "hf" else f"{workdir}/checkpoints/{where[0]}/{where[1]}",
          "checkpoint_kind": kind, "config": args.config, "overrides": list(overrides),
          "datasets": {n: m for n, (_, m) in datasets.items()}}
  if kind == "hf":
    meta["note"] = "HF exports carry no video/audio projector weights: those were randomly initialised"
  files = reports.write_reports(results, args.out or workdir / "eval", meta=meta)
  for name, r in results.items():
    for mode, s in r.summary.items():
      print(f"{name} [{mode}] {r.metric}: {reports.headline(r, mode)}")
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
