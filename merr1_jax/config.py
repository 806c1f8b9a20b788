"""Loading and validating the run config (configs/base.py), and turning its sections into typed settings.

`validate(config, num_devices)` runs before anything is built and raises `ConfigError` with a message that
names the field. The typed settings (`model_config`, `step_config`, `optim_config`) are what the library code
takes; nothing below `train.py` reads the ConfigDict.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import ml_collections

from merr1_jax import rl
from merr1_jax import train_step as ts
from merr1_jax.models import presets
from merr1_jax.models.config import ModelConfig
from merr1_jax.optim import OptimConfig


class ConfigError(ValueError):
  """A config field is wrong; the message names it."""


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


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int | None = None,
                 video_token_id: int | None = None, audio_token_id: int | None = None) -> ModelConfig:
  """The ModelConfig of `config.model`, with the tokenizer-derived fields (-1 in the config) filled in."""
  m = config.model
  fields = {k: v for k, v in m.to_dict().items() if k not in ("preset", "hf_path")}
  fields["mrope_section"] = tuple(fields["mrope_section"]) or None
  for key, value in (("vocab_size", vocab_size), ("video_token_id", video_token_id),
                     ("audio_token_id", audio_token_id)):
    if fields[key] == -1:
      if value is None:
        raise ConfigError(f"model.{key} is -1 (from the tokenizer) but no tokenizer value was given")
      fields[key] = value
  try:
    return presets.get(m.preset, **fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"model: {e}") from e


def step_config(config: ml_collections.ConfigDict, stage: str) -> ts.StepConfig:
  r = config.rl
  loss = rl.LossConfig(eps_low=r.eps_low, eps_high=r.eps_high, dual_clip=r.dual_clip or None,
                       kl_estimator=r.kl_estimator, aggregation=r.aggregation, entropy_coef=r.entropy_coef,
                       max_len=max(r.max_new_tokens_slow, r.max_new_tokens_fast))  # Dr.GRPO's constant
  micro = config.sft.micro_batches if stage == "sft" else r.micro_batches
  return ts.StepConfig(loss=loss, beta=r.beta if stage == "rl" else 0.0, beta_decay_steps=r.beta_decay_steps,
                       beta_final=r.beta_final, micro_batches=micro)


def optim_config(config: ml_collections.ConfigDict, stage: str) -> OptimConfig:
  s = config.sft if stage == "sft" else config.rl
  o = config.optim
  return OptimConfig(learning_rate=s.learning_rate, schedule=o.schedule, warmup_steps=s.warmup_steps,
                     total_steps=max(s.steps, s.warmup_steps + 1), b1=o.b1, b2=o.b2,
                     weight_decay=o.weight_decay, clip_norm=o.clip_norm or None)


def rl_batch_size(config) -> int:
  return config.rl.prompts_per_step * (config.rl.n_slow + config.rl.n_fast)


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Checks the whole config; raises ConfigError naming the first bad field. Builds nothing."""

  def need(cond: bool, field: str, msg: str):
    if not cond:
      raise ConfigError(f"config.{field}: {msg}")

  need(config.model.preset in presets.names(), "model.preset",
       f"unknown preset {config.model.preset!r}; known: {', '.join(presets.names())}")
  need(config.resume in ("auto", "force", "never"), "resume", f"{config.resume!r} is not auto|force|never")
  need(bool(config.stages) and set(config.stages) <= {"sft", "rl"} and list(config.stages) == sorted(
      set(config.stages), key=["sft", "rl"].index), "stages", f"{config.stages!r}: use ('sft', 'rl'), ('sft',) or "
       "('rl',)")
  need(config.data.name in ("mer_synth", "mer_features"), "data.name",
       f"{config.data.name!r}: expected 'mer_synth' or 'mer_features'")
  need(config.data.on_bad_record in ("raise", "skip"), "data.on_bad_record", "expected 'raise' or 'skip'")
  need(config.data.eval_split in ("train", "validation", "test"), "data.eval_split", "train|validation|test")
  if config.data.name == "mer_features":
    need(bool(config.data.records_dir) and pathlib.Path(config.data.records_dir).is_dir(), "data.records_dir",
         f"{config.data.records_dir!r} is not a directory of preprocessed records")
  r = config.rl
  for f in ("steps", "prompts_per_step", "max_new_tokens_slow", "max_new_tokens_fast", "micro_batches",
            "num_anchors"):
    need(int(getattr(r, f)) >= 1, f"rl.{f}", f"must be >= 1, got {getattr(r, f)}")
  need(r.n_slow >= 0 and r.n_fast >= 0 and r.n_slow + r.n_fast >= 2, "rl.n_slow",
       f"need n_slow + n_fast >= 2 completions per prompt (a group), got {r.n_slow} + {r.n_fast}")
  need(r.group in ("prompt", "mode"), "rl.group", f"{r.group!r}: expected 'prompt' or 'mode'")
  if r.group == "mode":
    need(r.n_slow != 1 and r.n_fast != 1, "rl.group", "per-mode groups need n_slow and n_fast != 1")
  need(r.calibration in ("contrastive_gain", "none"), "rl.calibration",
       f"{r.calibration!r}: expected 'contrastive_gain' or 'none'")
  need(r.calibration == "none" or r.n_slow > 0, "rl.calibration", "contrastive_gain needs slow rollouts")
  need(r.kl_estimator in rl.KL_ESTIMATORS, "rl.kl_estimator", f"expected one of {rl.KL_ESTIMATORS}")
  need(r.aggregation in rl.AGGREGATIONS, "rl.aggregation", f"expected one of {rl.AGGREGATIONS}")
  need(r.temperature > 0 and 0 < r.top_p <= 1, "rl.temperature", "need temperature > 0 and 0 < top_p <= 1")
  need(r.cal_tau > 0, "rl.cal_tau", "must be > 0")
  need(r.dual_clip == 0 or r.dual_clip > 1, "rl.dual_clip", "must be 0 (off) or > 1")
  batch = rl_batch_size(config)
  need(batch % r.micro_batches == 0, "rl.micro_batches",
       f"the RL batch of {batch} rows (prompts_per_step x (n_slow + n_fast)) is not divisible by "
       f"{r.micro_batches} micro-batches")
  need(config.sft.batch_size % config.sft.micro_batches == 0, "sft.micro_batches",
       "sft.batch_size must be divisible by sft.micro_batches")
  need(config.optim.schedule in ("constant", "cosine"), "optim.schedule", "expected 'constant' or 'cosine'")
  need(config.checkpoint.every >= 1 and config.checkpoint.keep >= 1, "checkpoint.every",
       "checkpoint.every and checkpoint.keep must be >= 1")
  need(config.eval.format_version in ("2025", "2026"), "eval.format_version", "expected '2025' or '2026'")
  if num_devices is not None:
    from merr1_jax import sharding  # noqa: PLC0415 - keeps jax device queries out of import time
    try:
      shape = sharding.mesh_shape_for(config.mesh.shape, num_devices)
    except ValueError as e:
      raise ConfigError(f"config.mesh.shape: {e}") from e
    shards = shape[0] * shape[1]
    need(config.rl.prompts_per_step % shards == 0, "rl.prompts_per_step",
         f"{config.rl.prompts_per_step} prompts do not divide over the mesh's {shards} batch shards "
         f"(data x fsdp = {shape[0]} x {shape[1]})")
    need(config.sft.batch_size % shards == 0, "sft.batch_size",
         f"{config.sft.batch_size} rows do not divide over the mesh's {shards} batch shards")
  try:
    model_config(config, vocab_size=1024, video_token_id=1, audio_token_id=2)
  except ConfigError:
    raise
  except Exception as e:  # a bad model field
    raise ConfigError(f"config.model: {e}") from e
