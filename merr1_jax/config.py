"""Loading and validating the run config (configs/base.py): `load`, `to_json`, and `validate`, which runs before
anything is built and raises `ConfigError` naming the field: every field has a rule (type, range or choices;
`_FIELD_RULES`), then the checks that tie fields together (batch divisibility, the mesh against the devices). The
typed settings, and the checks that need them, are merr1_jax/training/settings.py's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from merr1_jax import rl
from merr1_jax.data import synth
from merr1_jax.models import presets

# Presets small enough to run on CPU with the tokenizer built from MER-Synth; every other preset is a real model
# that needs a HF tokenizer (data.tokenizer_dir, or the checkpoint at model.hf_path).
EMBEDDED_PRESETS = ("tiny", "small_20m")
EXPORT_DTYPES = ("bfloat16", "float16", "float32")  # models/hf_io.save_hf's dtypes
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
  """A config field is wrong; the message names it. The trainer prints it as one `error:` line, exit code 2."""


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` the way ml_collections' config_flags does (tests, evaluate, tools)."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_merr1_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------- validate

Rule = Callable[[Any], "str | None"]  # value -> an error message, or None when the value is fine


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int) -> Rule:
  return lambda v: None if _is_int(v) and v >= lo else f"must be an int >= {lo}, got {v!r}"


def _real(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
  lo_s = f"{'>' if lo_open else '>='} {lo}"
  hi_s = "" if hi is None else f" and {'<' if hi_open else '<='} {hi}"

  def check(v):
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi)))
    return None if ok else f"must be a finite number {lo_s}{hi_s}, got {v!r}"
  return check


def _one_of(*choices) -> Rule:
  return lambda v: None if v in choices else f"{v!r}: expected one of {', '.join(map(repr, choices))}"


def _calibration(v):
  if v == "none" or v in rl.CALIBRATIONS:
    return None
  return f"{v!r}: expected 'none' or one of {sorted(rl.CALIBRATIONS)} (rl.CALIBRATIONS[name] = fn adds one)"


def _bool(v):
  return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def _str(v):
  return None if isinstance(v, str) else f"must be a string, got {v!r}"


def _dir_or_empty(v):
  if not isinstance(v, str):
    return f"must be a directory path, got {v!r}"
  return None if not v or pathlib.Path(v).is_dir() else f"{v!r} is not a directory"


def _stages(v):
  ok = bool(v) and set(v) <= {"sft", "rl"} and list(v) == sorted(set(v), key=["sft", "rl"].index)
  return None if ok else f"{v!r}: use ('sft', 'rl'), ('sft',) or ('rl',)"


def _buckets(v):
  ok = (isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_int(b) and b >= 1 for b in v)
        and list(v) == sorted(set(v)))
  return None if ok else f"{v!r}: need a non-empty, strictly increasing tuple of positive ints"


def _dual_clip(v):
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v == 0 or v > 1)
  return None if ok else f"must be 0 (off) or a number > 1, got {v!r}"


def _regexes(v):
  if not isinstance(v, (tuple, list)) or not all(isinstance(p, str) for p in v):
    return f"must be a tuple of regex strings, got {v!r}"
  for p in v:
    try:
      re.compile(p)
    except re.error as e:
      return f"{p!r} is not a valid regex ({e})"
  return None


def _lora_stages(v):
  ok = isinstance(v, (tuple, list)) and v and all(s in ("sft", "rl") for s in v) and len(set(v)) == len(v)
  return None if ok else f"must be a non-empty tuple of distinct stages from ('sft', 'rl'), got {v!r}"


def _regex_or_empty(v):
  if not isinstance(v, str):
    return f"must be a regex string ('' = none), got {v!r}"
  try:
    re.compile(v)
  except re.error as e:
    return f"{v!r} is not a regex: {e}"
  return None


def _mesh_shape(v):
  ok = (isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_int(s) and (s >= 1 or s == -1) for s in v)
        and list(v).count(-1) <= 1)
  return None if ok else f"{v!r}: need 3 entries (data, fsdp, tensor), each >= 1, with at most one -1"


def _axis_rules(v):
  rules = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
  if not isinstance(rules, dict):
    return f"must map logical axis names to mesh axes, got {v!r}"
  for name, axes in rules.items():
    parts = axes if isinstance(axes, (tuple, list)) else (axes,)
    if not all(a is None or a in MESH_AXES for a in parts):
      return f"{name!r} -> {axes!r}: mesh axes are {MESH_AXES} (or None for replicated)"
  return None


def _coordinator(v):
  ok = isinstance(v, str) and (not v or re.fullmatch(r"[^:\s]+:\d+", v) is not None)
  return None if ok else f"{v!r}: expected host:port, or '' to auto-detect"


_W = _real(0.0)
# Every field outside `model` (whose fields ModelConfig validates, see `model_config`). A test checks that the
# default config has no field without a rule.
_FIELD_RULES: dict[str, Rule] = {
    "seed": _int(0), "workdir": _str, "resume": _one_of("auto", "force", "never"), "stages": _stages,
    "model.preset": _one_of(*presets.names()), "model.hf_path": _dir_or_empty,
    # data
    "data.name": _one_of("mer_synth", "mer_features"), "data.data_dir": _str, "data.records_dir": _str,
    "data.tokenizer_dir": _dir_or_empty, "data.synth_train": _int(1), "data.synth_validation": _int(1),
    "data.synth_test": _int(1), "data.synth_noise": _real(0.0),
    "data.synth_version": _one_of(*synth.VERSIONS), "data.on_bad_record": _one_of("raise", "skip"),
    "data.worker_count": _int(0), "data.eval_split": _one_of("train", "validation", "test"),
    "data.prompt_buckets": _buckets, "data.label_space": _one_of("wheels", "identity"),
    "data.wheel_level": _one_of(1, 2),
    # sft
    "sft.steps": _int(1), "sft.batch_size": _int(1), "sft.learning_rate": _real(0.0, lo_open=True),
    "sft.warmup_steps": _int(0), "sft.micro_batches": _int(1),
    # rl
    "rl.steps": _int(1), "rl.prompts_per_step": _int(1), "rl.n_slow": _int(0), "rl.n_fast": _int(0),
    "rl.temperature": _real(0.0, lo_open=True), "rl.top_p": _real(0.0, 1.0, lo_open=True),
    "rl.max_new_tokens_slow": _int(1), "rl.max_new_tokens_fast": _int(1), "rl.beta": _real(0.0),
    "rl.beta_decay_steps": _int(0), "rl.beta_final": _real(0.0), "rl.kl_estimator": _one_of(*rl.KL_ESTIMATORS),
    "rl.eps_low": _real(0.0, 1.0, hi_open=True), "rl.eps_high": _real(0.0), "rl.dual_clip": _dual_clip,
    "rl.aggregation": _one_of(*rl.AGGREGATIONS), "rl.entropy_coef": _real(0.0),
    "rl.learning_rate": _real(0.0, lo_open=True), "rl.warmup_steps": _int(0), "rl.micro_batches": _int(1),
    "rl.ppo_epochs": _int(1), "rl.mini_batches": _int(1),
    "rl.disentangle": _bool, "rl.scale": _bool, "rl.adv_eps": _real(0.0, lo_open=True),
    "rl.adv_ddof": _one_of(0, 1), "rl.group": _one_of("prompt", "mode"),
    "rl.w_rec_slow": _W, "rl.w_rec_fast": _W, "rl.w_prec_slow": _W, "rl.w_prec_fast": _W, "rl.w_fmt": _W,
    "rl.w_cal": _W, "rl.calibration": _calibration, "rl.cal_tau": _real(0.0, lo_open=True),
    "rl.cal_alpha": _real(0.0), "rl.num_anchors": _int(1), "rl.max_nonfinite_steps": _int(0),
    "rl.w_f1": _W, "rl.cal_level": _one_of("category", "word"), "rl.cal_precision_side": _bool,
    "rl.cal_space": _one_of("advantage", "reward", "mixed"), "rl.cal_mix": _real(0.0, 1.0),
    "rl.cal_reading": _one_of(*rl.READINGS), "rl.cal_std_floor": _real(0.0),
    "rl.probe_every": _int(0),
    "rl.freeze": _regexes,
    "lora.stages": _lora_stages, "lora.train_full": _regex_or_empty,
    # optimizer
    "optim.schedule": _one_of("constant", "cosine"), "optim.b1": _real(0.0, 1.0, hi_open=True),
    "optim.b2": _real(0.0, 1.0, hi_open=True), "optim.weight_decay": _real(0.0), "optim.clip_norm": _real(0.0),
    # mesh
    "mesh.shape": _mesh_shape, "mesh.axis_rules": _axis_rules, "mesh.coordinator": _coordinator,
    "mesh.device_memory_gb": _real(0.0),
    # checkpoint, log, eval
    "checkpoint.every": _int(1), "checkpoint.keep": _int(1), "checkpoint.async_save": _bool,
    "checkpoint.export_hf": _bool, "checkpoint.export_dtype": _one_of(*EXPORT_DTYPES),
    "log.every": _int(1), "log.tensorboard": _bool, "log.progress": _bool, "log.plots": _bool,
    "log.peak_flops": _real(0.0), "log.peak_bandwidth": _real(0.0),
    "eval.every": _int(0), "eval.batch_size": _int(1), "eval.max_new_tokens_slow": _int(1),
    "eval.max_new_tokens_fast": _int(1), "eval.format_version": _one_of("2025", "2026"),
}


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks every field and the fields that must agree; raises ConfigError naming the first bad field. Builds
  nothing. `num_devices` enables the checks against the mesh. training/settings.validate runs this, then the
  checks that need the typed settings (the model, the stages, the memory plan)."""

  def need(cond: bool, field: str, msg: str):
    if not cond:
      raise ConfigError(f"config.{field}: {msg}")

  for field, rule in _FIELD_RULES.items():
    try:
      value = _get(config, field)
    except (KeyError, AttributeError):
      raise ConfigError(f"config.{field}: missing (is this config built by configs/base.py?)") from None
    msg = rule(value)
    need(msg is None, field, msg or "")

  # Fields that must agree with each other.
  if config.data.name == "mer_features":
    need(bool(config.data.records_dir) and pathlib.Path(config.data.records_dir).is_dir(), "data.records_dir",
         f"{config.data.records_dir!r} is not a directory of preprocessed records")
  need(config.data.label_space == "wheels" or config.data.name == "mer_synth", "data.label_space",
       f"'identity' needs a dataset with a closed label list (mer_synth); {config.data.name!r} records carry "
       "open-vocabulary sets: use 'wheels'")
  r = config.rl
  need(r.n_slow + r.n_fast >= 2, "rl.n_slow",
       f"need n_slow + n_fast >= 2 completions per prompt (a group), got {r.n_slow} + {r.n_fast}")
  if r.group == "mode":
    need(r.n_slow != 1 and r.n_fast != 1, "rl.group", "per-mode groups need n_slow and n_fast != 1")
  need(r.calibration == "none" or r.n_slow > 0, "rl.calibration", f"{r.calibration} needs slow rollouts")
  need(r.cal_reading == "first" or r.calibration == "one_sided", "rl.cal_reading",
       f"{r.cal_reading!r} is read by rl.calibration='one_sided' only (now {r.calibration!r})")
  need(r.cal_level == "category" or config.data.name == "mer_synth", "rl.cal_level",
       f"'word' needs a dataset with a closed label list (mer_synth), not {config.data.name!r}")
  # Mini- and micro-batches split whole groups (prompts, each with its completions).
  need(r.prompts_per_step % r.mini_batches == 0, "rl.mini_batches",
       f"updates split prompts: prompts_per_step {r.prompts_per_step} is not divisible by {r.mini_batches} "
       "mini-batches")
  need(r.prompts_per_step % (r.mini_batches * r.micro_batches) == 0, "rl.micro_batches",
       f"updates split prompts: prompts_per_step {r.prompts_per_step} is not divisible by mini_batches x "
       f"micro_batches = {r.mini_batches * r.micro_batches}")
  need(not config.lora.train_full or config.model.lora_rank > 0, "lora.train_full",
       "is set but model.lora_rank is 0 (no adapters): set model.lora_rank, or use rl.freeze to choose what trains")
  need(not config.model.lora_rank or bool(set(config.lora.stages) & set(config.stages)), "lora.stages",
       f"model.lora_rank = {config.model.lora_rank} but none of lora.stages {tuple(config.lora.stages)} runs "
       f"(stages {tuple(config.stages)}): the adapters would never train; add one of {tuple(config.stages)} to "
       "lora.stages")
  need(config.sft.batch_size % config.sft.micro_batches == 0, "sft.micro_batches",
       f"sft.batch_size {config.sft.batch_size} is not divisible by {config.sft.micro_batches} micro-batches")

  if num_devices is not None:
    from merr1_jax.infra import sharding  # noqa: PLC0415 - keeps jax device queries out of import time
    try:
      shape = sharding.mesh_shape_for(config.mesh.shape, num_devices)
    except ValueError as e:
      raise ConfigError(f"config.mesh.shape: {e}") from e
    shards = shape[0] * shape[1]
    for field, rows in (("rl.prompts_per_step", r.prompts_per_step), ("sft.batch_size", config.sft.batch_size),
                        ("eval.batch_size", config.eval.batch_size)):
      need(rows % shards == 0, field, f"{rows} rows do not divide over the mesh's {shards} batch shards "
           f"(data x fsdp = {shape[0]} x {shape[1]})")
    parts = r.mini_batches * r.micro_batches
    if (r.prompts_per_step // parts) % shards:  # each part's groups over every batch shard
      need(False, "rl.micro_batches", f"grouped updates split whole groups: {r.prompts_per_step} prompts in "
           f"{parts} mini x micro-batches leave {r.prompts_per_step // parts} per part, which do not divide over the "
           f"mesh's {shards} batch shards; lower rl.micro_batches (docs/scaling.md)")
