"""Loading a trained policy for evaluation: a training checkpoint or an HF export, with the one tokenizer that
goes with it.

`load_policy(config, workdir, checkpoint)` is the one place the evaluate CLI gets (model, params, tokenizer) from:
no checkpoint (the latest one, else the HF export), STEP, STAGE:STEP, or a PATH (an HF policy directory or a
checkpoint step directory). A checkpoint of another model config is refused, and an HF directory's tokenizer must
agree with the run's. Every failure is an `EvalError` naming the file, checkpoint or field; a damaged checkpoint is
named together with the run's good ones, and nothing is evaluated in its place. Details: docs/evaluation.md,
"Running it".
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import jax

from merr1_jax import config as cfglib
from merr1_jax.data import synth
from merr1_jax.data import tokenizer as toklib
from merr1_jax.infra import checkpoint as ckptlib
from merr1_jax.infra import config_diff
from merr1_jax.infra import sharding
from merr1_jax.models import hf_io
from merr1_jax.task import prompts
from merr1_jax.training import settings
from merr1_jax.training import setup as run_setup

_log = logging.getLogger("merr1_jax.evaluate")


class EvalError(Exception):
  """Bad evaluation input; the message says what and where. The evaluate CLI exits with status 2."""


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
  directory = settings.tokenizer_dir(config)  # data.tokenizer_dir, or a real model's hf_path
  if directory:
    try:
      return toklib.load_hf(directory), f"tokenizer directory {directory}"
    except (OSError, ValueError) as e:  # FileNotFoundError included
      raise EvalError(f"tokenizer directory {directory} (config.data.tokenizer_dir or config.model.hf_path): "
                      f"cannot load a tokenizer: {e}") from None
  path = pathlib.Path(workdir) / "tokenizer.json"
  if path.is_file():
    try:
      return toklib.load(path), str(path)
    except ValueError as e:  # names the file
      raise EvalError(f"the run's tokenizer: {e}") from None
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
    try:
      hf_tok = toklib.load_hf(hf_file.parent)
    except ValueError as e:  # names the file
      raise EvalError(f"the policy's tokenizer: {e}") from None
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
  return synth.build_tokenizer(settings.synth_config(config))


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
  # A field added since the checkpoint was made (config_diff.ADDED_FIELDS) is absent there: it had the old value.
  old = {**{k.split(".", 1)[1]: v for k, v in config_diff.ADDED_FIELDS.items() if k.startswith("model.")}, **old}
  return [f"model.{k}: checkpoint {old.get(k, '<absent>')!r}, config {now.get(k, '<absent>')!r}"
          for k in sorted(set(old) | set(now)) if k != "hf_path" and norm(old.get(k)) != norm(now.get(k))]


def build_model(config, tok):
  """The policy model of `config.model`, with the tokenizer-derived fields from `tok` (run_setup.build_model)."""
  try:
    return run_setup.build_model(config, tok)
  except (ValueError, KeyError) as e:  # config.ConfigError included
    raise EvalError(f"config.model: {e}") from None


def load_params(config, workdir, kind: str, where, model):
  """The parameters of a resolved checkpoint (`resolve_checkpoint`) for `model`, on the config's mesh.

  Raises EvalError for a checkpoint that does not fit the model (naming the fields or tensors that differ).
  """
  mesh = sharding.make_mesh(config.mesh.shape)
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
  name, step = where
  stage = settings.stage(config, name)  # resolved once: LoRA, freezing, reference, as the trainer had them
  directory = pathlib.Path(workdir) / "checkpoints" / name
  template = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  # No config_json: the trainer's whole-config check would refuse any changed field (rl.steps, ...); only the
  # model section decides whether these weights fit, and it is compared here, naming each differing field.
  with ckptlib.Checkpointer(directory, save_every=1, keep=1_000_000, async_save=False) as ckpt:
    try:
      diffs = _model_differences(ckpt.stored_config(step), config)
    except ckptlib.DamagedCheckpointError as e:
      raise EvalError(damaged_message(config, workdir, e)) from None
    if diffs:
      raise EvalError(f"checkpoint {directory}/{step} was written for another model: " + "; ".join(diffs))
    try:
      if stage.lora:  # adapters only: the base is rebuilt as the trainer built it
        start = _stage_start(config, workdir, model, stage, shardings)
        abstract_state = _abstract_train_state(model, stage, start, mesh)
        state, _ = run_setup.restore_state(config, workdir, ckpt, step, abstract_state, start, stage,
                                           jax.tree.map(lambda a: a.sharding, abstract_state))
      else:
        state, _, _ = ckpt.restore(step, _abstract_train_state(model, stage, template, mesh))
    except ckptlib.DamagedCheckpointError as e:
      raise EvalError(damaged_message(config, workdir, e)) from None
    except ValueError as e:  # a leaf missing or reshaped (names every one), or another LoRA base
      raise EvalError(str(e)) from None
  return state.params


def good_checkpoints(config, workdir, exclude: str = "") -> list[str]:
  """'STAGE:STEP' of every training checkpoint of the run's stages that passes its check (checksum manifest,
  items present), newest stage and step first, but the step directory `exclude`. Reads every file of every
  step: for error messages."""
  out = []
  for stage in reversed(list(config.stages)):
    steps = _stage_steps(pathlib.Path(workdir), stage)
    if not steps:
      continue
    with ckptlib.Checkpointer(pathlib.Path(workdir) / "checkpoints" / stage, save_every=1, keep=1_000_000,
                              async_save=False) as ckpt:
      for step in reversed(steps):
        if ckpt.step_dir(step) == exclude:
          continue
        try:
          ckpt.check(step)
        except ckptlib.DamagedCheckpointError:
          continue
        out.append(f"{stage}:{step}")
  return out


def damaged_message(config, workdir, err: ckptlib.DamagedCheckpointError) -> str:
  """One line: the damaged checkpoint and what is wrong (`err`), then the run's good checkpoints."""
  good = good_checkpoints(config, workdir, exclude=err.path)
  tail = (f"good checkpoints: {', '.join(good)} (pass one with --checkpoint)" if good
          else "no other checkpoint of this run passes its check")
  return f"{err}; {tail}"


def _stage_start(config, workdir, model, stage, shardings):
  """The parameters a stage started from, as train.py chains them: the first stage from model.hf_path or the
  random init, a later one from the previous stage's last checkpoint; then run_setup.stage_start (LoRA folding)."""
  stages = list(config.stages)
  if stage.name not in stages:
    raise EvalError(f"checkpoint stage {stage.name!r} is not in config.stages {tuple(stages)}: its LoRA base cannot be "
                    "rebuilt; pass the stages the run trained with (--config.stages)")
  if stages.index(stage.name) == 0:
    params = run_setup.initial_params(config, model, shardings)
  else:
    prev = stages[stages.index(stage.name) - 1]
    params = load_params(config, workdir, "train", (prev, getattr(config, prev).steps), model)
  return run_setup.stage_start(model, stage, params, shardings)


def load_policy(config, workdir, checkpoint: str | None):
  """(model, params, tokenizer) of a training checkpoint or an exported HF policy (see the module docstring).

  Raises EvalError for a missing checkpoint, one written under another model config, or disagreeing tokenizers.
  """
  kind, where = resolve_checkpoint(config, workdir, checkpoint)
  tok = load_tokenizer(config, workdir, where if kind == "hf" else None)
  model = build_model(config, tok)
  return model, load_params(config, workdir, kind, where, model), tok


def _abstract_train_state(model, stage, template, mesh):
  """The stage's TrainState layout as the trainer builds it (Stage.abstract_state), with shardings: the
  checkpoint holds the whole state, and restore names every leaf that differs."""
  state = stage.abstract_state(template, model.config.jnp_compute_dtype)
  param_shardings = jax.tree.map(lambda a: a.sharding, template)
  return ckptlib.abstract_with_shardings(state, sharding.state_shardings(state, param_shardings, mesh))
