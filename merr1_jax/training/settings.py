"""The one seam between the run config (a ConfigDict, configs/base.py) and the library's typed settings.

Every frozen settings object the library takes is built here from a config, and nowhere else: `model_config`,
`stage` / `stages` (training.step.Stage: steps, freezing, LoRA, reference, step and optimizer settings),
`experience_settings`, `evaluation_settings`, `synth_config`, `pipeline_config`; `validate` is the whole check of
a config (config.validate's field rules, then what needs these objects). The library dataclasses hold no copy of
the config's defaults (configs/base.py sets them); nothing below the trainer reads the ConfigDict.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from merr1_jax import config as cfglib
from merr1_jax import rl
from merr1_jax.data import pipeline as pipelib
from merr1_jax.data import synth as synthlib
from merr1_jax.evaluation import core as evaluation
from merr1_jax.infra import memory
from merr1_jax.models import lora, presets
from merr1_jax.models.config import ModelConfig
from merr1_jax.rollout import sampling
from merr1_jax.task import prompts, rewards
from merr1_jax.training import experience
from merr1_jax.training import optimizer as optimlib
from merr1_jax.training import step as ts

Config = ml_collections.ConfigDict
def is_embedded(config: ml_collections.ConfigDict) -> bool:
  """Whether the model is one of the small presets that run on the MER-Synth tokenizer (no HF checkpoint)."""
  return config.model.preset in cfglib.EMBEDDED_PRESETS


def tokenizer_dir(config: ml_collections.ConfigDict) -> str:
  """The HF tokenizer directory of the run: data.tokenizer_dir, else model.hf_path for a real model (a HF
  checkpoint ships its tokenizer); "" = build the MER-Synth tokenizer (embedded models)."""
  if config.data.tokenizer_dir:
    return config.data.tokenizer_dir
  return "" if is_embedded(config) else config.model.hf_path


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
        raise cfglib.ConfigError(f"model.{key} is -1 (from the tokenizer) but no tokenizer value was given")
      fields[key] = value
  try:
    return presets.get(m.preset, **fields)
  except (TypeError, ValueError) as e:
    raise cfglib.ConfigError(f"config.model: {e}") from e


def validate(config: Config, num_devices: int | None = None, device_memory_gb: float | None = None) -> None:
  """The whole check of a run's config before anything is built (ConfigError naming the first bad field): every
  field and the fields that agree (config.validate), then what needs the typed settings: a tokenizer for a real
  model, the model section itself, lora.train_full's regex, and, with `num_devices` and a device size
  (`device_memory_gb`, or config.mesh.device_memory_gb, which wins), that the largest stage's train state fits."""
  cfglib.validate(config, num_devices)

  def need(cond: bool, field: str, msg: str):
    if not cond:
      raise cfglib.ConfigError(f"config.{field}: {msg}")

  if not is_embedded(config) or config.data.name == "mer_features":
    need(bool(tokenizer_dir(config)), "data.tokenizer_dir",
         f"model {config.model.preset!r} on data {config.data.name!r} needs a HF tokenizer: set "
         "data.tokenizer_dir, or model.hf_path to the HF checkpoint that holds it")
  mc = model_config(config, vocab_size=1024, video_token_id=1, audio_token_id=2)
  if config.lora.train_full and mc.lora_rank:  # like rl.freeze: a regex that matches nothing is a typo
    need(memory.train_full_count(mc, config.lora.train_full) > 0, "lora.train_full",
         f"{config.lora.train_full!r} matches no parameter of the model (paths look like 'decoder/embed/embedding', "
         "'decoder/layers/q_kernel', 'video_proj/in_kernel')")
  device_gb = config.mesh.device_memory_gb or device_memory_gb
  if num_devices is not None and device_gb:
    from merr1_jax.infra import sharding  # noqa: PLC0415 - keeps jax device queries out of import time
    _check_memory(config, mc, sharding.mesh_shape_for(config.mesh.shape, num_devices), device_gb)


def _check_memory(config: Config, mc: ModelConfig, shape, device_gb: float) -> None:
  """Refuses a mesh whose per-device share of the largest stage's train state exceeds the state's share of a
  device (memory.STATE_MEMORY_FRACTION)."""
  model_shards = shape[1] * shape[2]
  full = memory.train_full_count(mc, config.lora.train_full) if mc.lora_rank else 0
  by_name = {s.name: s for s in stages(config)}
  gb = {name: memory.state_gb_per_device(
      mc, with_reference=s.with_reference, micro_batches=s.step.micro_batches, model_shards=model_shards,
      lora_stage=s.lora, train_full_params=full) for name, s in by_name.items()}
  stage = max(gb, key=gb.get)
  need_gb, with_ref, micro = gb[stage], by_name[stage].with_reference, by_name[stage].step.micro_batches
  if need_gb > memory.STATE_MEMORY_FRACTION * device_gb:
    raise cfglib.ConfigError(
        f"config.mesh.shape: mesh {tuple(shape)} splits the parameters {model_shards} way(s): the {stage} train "
        f"state of {config.model.preset} ({memory.param_count(mc) / 1e9:.2f} B parameters in {mc.param_dtype}: "
        f"weights, AdamW moments, gradients{' with float32 accumulators' if micro > 1 else ''}"
        f"{', the KL reference' if with_ref else ''}"
        f"{', LoRA: adapters trained, base frozen' if by_name[stage].lora else ''})"
        f" needs {need_gb:.1f} GB per device, more than "
        f"{memory.STATE_MEMORY_FRACTION:.0%} of the {device_gb:g} GB a device has (mesh.device_memory_gb); shard it "
        "with a mesh preset (configs/base.py:...,mesh=gpu8|v5p8|v4_32) or --config.mesh.shape='(1,N,1)', or train "
        "LoRA adapters (--config.model.lora_rank=8, lora.stages; docs/lora.md)")


def stage(config: Config, name: str) -> ts.Stage:
  """The stage `name` ('sft' or 'rl') of the run: its steps, freezing, LoRA, reference, step and optimizer
  settings, each decided here once."""
  lora_stage = bool(config.model.lora_rank) and name in tuple(config.lora.stages)
  return ts.Stage(name=name, steps=int(getattr(config, name).steps), lora=lora_stage,
                  freeze=_freeze(config, name, lora_stage), with_reference=name == "rl" and config.rl.beta > 0,
                  step=_step_config(config, name, lora_stage), optim=_optim_config(config, name), seed=int(config.seed))


def stages(config: Config) -> tuple[ts.Stage, ...]:
  """The configured stages, in order."""
  return tuple(stage(config, name) for name in config.stages)


def _step_config(config: Config, name: str, lora_stage: bool) -> ts.StepConfig:
  """The jitted step's settings: the PPO-clip + KL loss (method.md E4) and how an update is split."""
  r = config.rl
  loss = rl.LossConfig(eps_low=r.eps_low, eps_high=r.eps_high, dual_clip=r.dual_clip or None,
                       kl_estimator=r.kl_estimator, aggregation=r.aggregation, entropy_coef=r.entropy_coef,
                       max_len=max(r.max_new_tokens_slow, r.max_new_tokens_fast))  # Dr.GRPO's constant
  # LoRA input dropout acts only where adapters train; each stage its own stream (seed, stage index).
  dropout = _dropout_seed(config.seed, name) if config.model.lora_dropout and lora_stage else None
  if name == "sft":
    return ts.StepConfig(loss=loss, beta=0.0, micro_batches=config.sft.micro_batches, dropout_seed=dropout)
  return ts.StepConfig(loss=loss, beta=r.beta, beta_decay_steps=r.beta_decay_steps, beta_final=r.beta_final,
                       micro_batches=r.micro_batches, ppo_epochs=r.ppo_epochs, mini_batches=r.mini_batches,
                       dropout_seed=dropout)


def _dropout_seed(seed: int, name: str) -> int:
  """A stage's dropout seed: the run's seed and the stage, so SFT and RL never share masks (fits a uint32)."""
  return (int(seed) * 1_000_003 + {"sft": 1, "rl": 2}[name]) % (2 ** 31)


def _optim_config(config: Config, name: str) -> optimlib.OptimConfig:
  """AdamW for a stage. The schedule counts optimizer updates (ppo_epochs x mini_batches per RL step, 1 per SFT
  step), so warmup and the cosine horizon are the stage's steps times its updates per step."""
  s = config.sft if name == "sft" else config.rl
  o = config.optim
  k = config.rl.ppo_epochs * config.rl.mini_batches if name == "rl" else 1
  return optimlib.OptimConfig(learning_rate=s.learning_rate, schedule=o.schedule, warmup_steps=s.warmup_steps * k,
                              total_steps=max(s.steps, s.warmup_steps + 1) * k, b1=o.b1, b2=o.b2,
                              weight_decay=o.weight_decay, clip_norm=o.clip_norm or None)


def advantage_settings(config: Config) -> experience.AdvantageSettings:
  """DOD / coupled advantages (method.md E2); weights per mode in prompts.MODES order, one per
  experience.OBJECTIVES (calibration: slow only); the calibration's share in reward space (E3 "Variants")."""
  r = config.rl
  per_mode = {"slow": (r.w_rec_slow, r.w_prec_slow, r.w_f1, r.w_fmt, r.w_cal),
              "fast": (r.w_rec_fast, r.w_prec_fast, r.w_f1, r.w_fmt, 0.0)}
  in_reward = {"advantage": 0.0, "reward": 1.0, "mixed": float(r.cal_mix)}[r.cal_space]
  return experience.AdvantageSettings(disentangle=r.disentangle, scale=r.scale, eps=r.adv_eps, ddof=r.adv_ddof,
                                      group=r.group, weights=tuple(per_mode[m] for m in prompts.MODES),
                                      cal_in_reward=in_reward, cal_std_floor=float(r.cal_std_floor))


def experience_settings(config: Config) -> experience.ExperienceSettings:
  """What one RL step's experience needs (merr1_jax/training/experience.py)."""
  r = config.rl
  method = sampling.TopP(r.temperature, p=r.top_p) if r.top_p < 1 else sampling.Temperature(r.temperature)
  return experience.ExperienceSettings(
      n_slow=r.n_slow, n_fast=r.n_fast,
      max_new_tokens=(("slow", r.max_new_tokens_slow), ("fast", r.max_new_tokens_fast)), method=method,
      advantage=advantage_settings(config), calibration=r.calibration,
      cal=rl.CalibrationConfig(tau=r.cal_tau, alpha=r.cal_alpha, precision_side=r.cal_precision_side,
                               reading=r.cal_reading),
      num_anchors=r.num_anchors,
      with_reference=stage(config, "rl").with_reference, prompt_buckets=tuple(config.data.prompt_buckets))


def evaluation_settings(config: Config, **overrides: Any) -> evaluation.EvalSettings:
  """Evaluation in both modes with the config's limits; the evaluate CLI overrides modes, samples, temperature."""
  e = config.eval
  return evaluation.EvalSettings(
      max_new_tokens={"slow": e.max_new_tokens_slow, "fast": e.max_new_tokens_fast},
      format_version=e.format_version, seed=config.seed, label_space=label_space(config), **overrides)


def synth_config(config: Config) -> synthlib.SynthConfig:
  """The MER-Synth generator of the run (the same records and tokenizer corpus for trainer and CLI)."""
  d = config.data
  return synthlib.SynthConfig(n_train=d.synth_train, n_validation=d.synth_validation, n_test=d.synth_test,
                              noise=d.synth_noise, version=d.synth_version)


def pipeline_config(config: Config, kind: str, mc: ModelConfig, *, shard_index: int, shard_count: int,
             **overrides: Any) -> pipelib.PipelineConfig:
  """A Grain pipeline's settings: `kind` 'sft' | 'rl' | 'eval', this process's shard of it."""
  c = config
  batch = {"sft": c.sft.batch_size, "rl": c.rl.prompts_per_step, "eval": c.eval.batch_size}[kind]
  return pipelib.PipelineConfig(
      kind=kind, batch_size=batch // shard_count, seed=c.seed, shuffle=kind != "eval",
      num_epochs=1 if kind == "eval" else None, shard_index=shard_index, shard_count=shard_count,
      drop_remainder=kind != "eval", video_dim=mc.video_dim or None, audio_dim=mc.audio_dim or None,
      on_bad_record=c.data.on_bad_record, worker_count=c.data.worker_count,
      label_vocab=synthlib.EMOTIONS if c.data.name == "mer_synth" else None, wheel_format=c.eval.format_version,
      prompt_buckets=tuple(c.data.prompt_buckets), **overrides)


def label_space(config: Config) -> rewards.LabelSpace:
  """The run's label space (method.md "Label space"): the emotion wheels at data.wheel_level, or the identity over
  the dataset's closed label list (MER-Synth's words)."""
  if config.data.label_space == "identity":
    return rewards.LabelSpace.closed(synthlib.EMOTIONS)
  return rewards.LabelSpace.emotion_wheel(config.eval.format_version, config.data.wheel_level)


def calibration_space(config: Config) -> rewards.LabelSpace | None:
  """The calibration's categories when they are not the label space's: word-level confidence makes each of the
  dataset's label words its own category (method.md E3 "Variants"); None = the label space's categories."""
  if config.rl.cal_level == "word":
    return rewards.LabelSpace.closed(synthlib.EMOTIONS)
  return None


def own_metric(config: Config) -> str:
  """The metric of the config's own dataset: the field's OV score ('ov', wheels at level 1) when the label space
  is that, else the same set arithmetic under the configured space ('set')."""
  return "ov" if config.data.label_space == "wheels" and config.data.wheel_level == 1 else "set"


def _freeze(config: Config, name: str, lora_stage: bool) -> tuple[str, ...]:
  """The stage's freeze regexes: rl.freeze in RL; a LoRA stage freezes every leaf but the adapters and
  lora.train_full's; any other stage of a LoRA model freezes the adapters (B stays 0: the base trains in full)."""
  own = tuple(config.rl.freeze) if name == "rl" else ()
  if not config.model.lora_rank:
    return own
  if lora_stage:
    return (lora.freeze_rule(config.lora.train_full),) + own
  return (lora.ADAPTER.pattern,) + own
