"""Builds everything a training run needs from the config, so that train.py can stay the loop only.

`setup(config, workdir)` starts jax.distributed when several hosts run, validates the config and checks it
against the workdir's checkpoints (both before anything is built or compiled: `check_resume`), then builds or
loads the tokenizer, prepares the dataset, builds the model, the mesh and the shardings, and returns a `Run`
holding them with small helpers (device placement, checkpointers, the stage's starting parameters).

The pieces the evaluate CLI shares are public: `build_model` (the model of a config and tokenizer) and
`open_data` (the prepared dataset as a `Data`: the trainer's own pipelines and eval datasets), so both read the
same records in the same order and batches by construction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import config as cfglib
from merr1_jax import rollout
from merr1_jax.data import pipeline, synth, tfds_builders
from merr1_jax.data import tokenizer as toklib
from merr1_jax.infra import artifacts, checkpoint, memory, observe, sharding
from merr1_jax.models import base, hf_io, lora, mllm
from merr1_jax.task import prompts, rewards
from merr1_jax.training import experience, settings
from merr1_jax.training import optimizer as optim
from merr1_jax.training import step as ts

_log = logging.getLogger("merr1_jax.run")


@dataclasses.dataclass
class Data:
  """A run's dataset: its prepared sources by split, and the pipelines the trainer and the evaluate CLI read."""

  config: Any
  tokenizer: Any
  model_config: Any
  sources: dict  # split -> pipeline.RecordSource

  def pipeline(self, kind: str, split: str = "train", **overrides) -> pipeline.Pipeline:
    """SFT: each process reads its own rows. RL and eval: every process reads the whole global batch, because
    the host work on their rollouts (decoding, rewards, metrics) needs every row's labels; their device work
    is still split over the mesh (sharding.BatchLayout), and prompts are little to read."""
    shards = jax.process_count() if kind == "sft" else 1
    pcfg = settings.pipeline_config(self.config, kind, self.model_config, shard_index=jax.process_index() % shards,
                                    shard_count=shards, **overrides)
    return pipeline.build(self.sources[split], self.tokenizer, pcfg)

  def eval_datasets(self) -> dict:
    """{dataset name: (eval pipeline, metric)}: what the trainer evaluates after each stage."""
    return {self.config.data.name: (self.pipeline("eval", self.config.data.eval_split),
                                    settings.own_metric(self.config))}


@dataclasses.dataclass
class Run:
  config: Any
  workdir: pathlib.Path
  tokenizer: Any
  model: base.PolicyModel
  mesh: jax.sharding.Mesh
  axis_rules: dict
  data: Data
  writer: observe.MetricsWriter
  ctx: experience.Context
  eval_settings: Any
  eval_token_sets: Any  # [K, C, V]: the evaluation's confidence read-out (the label space's categories)
  stages: tuple[ts.Stage, ...] = ()  # the configured stages, resolved once (settings.stages)
  experience: experience.ExperienceSettings | None = None  # an RL step's settings (settings.experience_settings)

  # -------------------------------------------------------------------------------------- placement
  def param_shardings(self, params):
    return sharding.param_shardings(self.model, params, self.mesh, self.axis_rules)

  def state_shardings(self, state):
    return sharding.state_shardings(state, self.param_shardings(state.params), self.mesh)

  def place(self, tree):
    """Puts a train state onto its shardings (parameters by the rules, the rest replicated)."""
    return jax.device_put(tree, self.state_shardings(tree))

  def to_device(self, batch):
    """A host SFT batch (every process holds its own rows) -> global arrays sharded over the batch axes.
    Processes bucket their rows on their own, so the batch is first padded to the longest (it is right-padded
    and masked)."""
    batch = sharding.pad_to_common_shape(jax.tree.map(np.asarray, batch))
    return sharding.to_global(batch, sharding.batch_shardings(batch, self.mesh))

  def global_to_device(self, batch):
    """A host batch that every process holds in full (the RL batch) -> global arrays over the batch axes."""
    batch = jax.tree.map(np.asarray, batch)
    return sharding.from_global(batch, sharding.batch_shardings(batch, self.mesh))

  @staticmethod
  def sft_batch(b) -> ts.SFTBatch:
    return ts.SFTBatch(inputs=base.ModelInputs(tokens=b["tokens"], positions=b["positions"], mask=b["input_mask"],
                                               video=b["video"], video_mask=b["video_mask"], audio=b["audio"],
                                               audio_mask=b["audio_mask"]),
                       loss_mask=b["loss_mask"])

  # ------------------------------------------------------------------------------------ checkpoints
  def checkpointer(self, stage: ts.Stage) -> checkpoint.Checkpointer:
    return open_checkpointer(self.config, self.workdir, stage.name)

  def stage_done(self, stage: ts.Stage) -> bool:
    """A stage is done when its final checkpoint and its evaluation exist."""
    if not (self.workdir / f"eval_{stage.name}.json").exists():
      return False
    ckpt = self.checkpointer(stage)
    latest = ckpt.latest_step()
    ckpt.close()
    return latest == stage.steps

  def final_params(self, stage: ts.Stage, start):
    """The parameters at the end of a finished stage, restored from its last checkpoint; `start` is what the stage
    started from (the previous stage's policy), which holds a LoRA stage's frozen base."""
    start = self.stage_start(stage, start)
    state = stage.abstract_state(start, self.model.config.jnp_compute_dtype)
    ckpt = self.checkpointer(stage)
    restored, _ = self.restore_state(ckpt, ckpt.latest_step(), state, start, stage)
    ckpt.close()
    return restored.params

  # ------------------------------------------------------------------------------------------- LoRA
  def stage_start(self, stage: ts.Stage, params):
    return stage_start(self.model, stage, params, self.param_shardings(params))

  def lora_base(self, stage: ts.Stage, params) -> dict | None:
    return lora_base(self.config, self.workdir, stage, params)

  def restore_state(self, ckpt, step: int, state, params, stage: ts.Stage, data_iter=None):
    return restore_state(self.config, self.workdir, ckpt, step, state, params, stage, self.state_shardings(state),
                         data_iter=data_iter)

  def initial_params(self):
    return initial_params(self.config, self.model, self.param_shardings(self.model.abstract_params()))

  def close(self):
    self.writer.close()


def initial_params(config, model, shardings):
  """What the first stage starts from: the HF checkpoint at model.hf_path, or the random init of config.seed (the
  embedded default), placed on `shardings`."""
  if config.model.hf_path:
    params, report = hf_io.load_hf(config.model.hf_path, model, shardings=shardings)
    _log.info("loaded %s: %s", config.model.hf_path, report)
    return params
  return jax.jit(model.init_params, out_shardings=shardings)(jax.random.key(config.seed))


def stage_start(model, stage: ts.Stage, params, shardings):
  """A stage's starting parameters. With LoRA adapters (docs/lora.md): the previous policy with its adapters merged
  into the kernels and fresh ones (B = 0, A from a key of the seed and stage), so that a LoRA stage's frozen base,
  and its KL reference, is the policy the previous stage ended with. Without adapters: `params`. `params` is
  donated (its arrays are deleted): use the returned tree."""
  mc = model.config
  if not mc.lora_rank:
    return params
  key = jax.random.fold_in(jax.random.key(stage.seed), 0x5EED + stage.index)
  # Donated: the folded kernels reuse the old buffers, so the base is never held twice (callers rebind `params`).
  return jax.jit(lambda p: lora.folded(p, mc, key), out_shardings=shardings, donate_argnums=0)(params)


def lora_base(config, workdir, stage: ts.Stage, params) -> dict | None:
  """What a LoRA stage's checkpoints record about its frozen base (None outside one): the fingerprint of every
  frozen leaf (lora.fingerprint) and where the base came from."""
  if not stage.lora:
    return None
  frozen = optim.split_trainable(params, stage.freeze)[1]
  if stage.name == "rl" and "sft" in config.stages:
    source = f"{pathlib.Path(workdir) / 'checkpoints' / 'sft'} step {config.sft.steps}, adapters merged"
  else:
    source = f"hf:{config.model.hf_path}" if config.model.hf_path else f"random init, seed {config.seed}"
  return {"fingerprint": lora.fingerprint(frozen, skip=lambda name: False), "source": source}


def restore_state(config, workdir, ckpt, step: int, state, params, stage: ts.Stage, state_shardings,
                  data_iter=None):
  """(state, rng) of checkpoint `step` for a template `state` whose parameters are `params` (its shardings
  `state_shardings`). A LoRA stage's checkpoint holds the trainable leaves only: the frozen base is `params`'
  own, once its fingerprint matches the one the checkpoint recorded; another base raises ConfigError naming both."""
  target, shardings = stage.checkpoint_view(state), stage.checkpoint_view(state_shardings)
  restored, rng, extra = ckpt.restore(step, checkpoint.abstract_with_shardings(target, shardings),
                                      data_iter=data_iter)
  if not stage.lora:
    return restored, rng
  want, got = lora_base(config, workdir, stage, params), extra.get("lora_base") or {}
  if got.get("fingerprint") != want["fingerprint"]:
    raise cfglib.ConfigError(
        f"config.model: the LoRA checkpoint {ckpt.directory}/{step} was trained on another base (stored "
        f"{got.get('fingerprint', '<none>')[:16]} from {got.get('source', '<unknown>')}; now "
        f"{want['fingerprint'][:16]} from {want['source']}): resume it on the base it was trained on, or start in "
        "a fresh workdir")
  return ts.with_frozen(restored, params), rng


def open_checkpointer(config, workdir: pathlib.Path, stage: str) -> checkpoint.Checkpointer:
  """The stage's Checkpointer; opening it compares the stored config with `config` (IncompatibleCheckpointError
  unless config.resume == 'force')."""
  c = config.checkpoint
  # Fields that do not change what a stage's checkpoint means: where/how output is written, evaluation, the
  # resume policy itself, the mesh (restore reshards onto the current one), and (for SFT) everything about the
  # later RL stage.
  ignore = set(checkpoint.DEFAULT_IGNORE_KEYS) | {"workdir", "resume", "log", "eval", "checkpoint", "mesh",
                                                  "data.worker_count", "data.data_dir"}
  if stage == "sft":
    ignore |= {"rl", "stages"}
  return checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints" / stage, save_every=c.every, keep=c.keep,
                                 async_save=c.async_save, config_json=cfglib.to_json(config),
                                 force=config.resume == "force", ignore_keys=frozenset(ignore),
                                 force_hint="--config.resume=force")


def check_resume(config, workdir: pathlib.Path) -> None:
  """Refuses, before anything is built or compiled, a workdir whose checkpoints of a configured stage were saved
  under an incompatible config (ConfigError naming the fields), or any checkpoint under resume='never'."""
  root = pathlib.Path(workdir) / "checkpoints"
  if config.resume == "never" and root.exists() and any(root.iterdir()):
    raise cfglib.ConfigError(f"config.resume='never' but {root} holds checkpoints; use another workdir")
  for stage in config.stages:
    if not (root / stage).is_dir():
      continue
    try:
      open_checkpointer(config, workdir, stage).close()
    except checkpoint.IncompatibleCheckpointError as e:
      raise cfglib.ConfigError(f"config.resume: {e}") from e


def _tokenizer(config, workdir: pathlib.Path):
  if settings.tokenizer_dir(config):
    return toklib.load_hf(settings.tokenizer_dir(config))
  path = workdir / "tokenizer.json"
  if path.exists():
    return toklib.load(path)
  tok = synth.build_tokenizer(settings.synth_config(config))
  if jax.process_index() == 0:
    # Written aside and renamed: another process checking `path` meanwhile never reads half a file.
    tok.save(path.with_name("tokenizer.partial.json"))
    os.replace(path.with_name("tokenizer.partial.json"), path)
  return tok


def build_model(config, tok) -> mllm.MultimodalPolicy:
  """The policy model of `config.model`, with the fields the tokenizer decides (vocabulary, placeholder ids)."""
  return mllm.build(settings.model_config(config, vocab_size=tok.vocab_size,
                                          video_token_id=tok.id_of(prompts.VIDEO_TOKEN),
                                          audio_token_id=tok.id_of(prompts.AUDIO_TOKEN)))


def _builder(config, data_dir: str):
  if config.data.name == "mer_synth":
    synth_cfg = settings.synth_config(config)
    # TFDS reuses prepared data by config name: name it after the generator settings.
    name = "s{}_n{}_{}_{}_noise{}".format(synth_cfg.seed, synth_cfg.n_train, synth_cfg.n_validation,
                                         synth_cfg.n_test, str(synth_cfg.noise).replace(".", "p"))
    if synth_cfg.version != 1:  # version 1 keeps its earlier name, so data prepared before versions still loads
      name += f"_v{synth_cfg.version}"
    return tfds_builders.MerSynth(config=tfds_builders.MerSynthConfig(name=name, synth=synth_cfg),
                                  data_dir=data_dir)
  return tfds_builders.MerFeatures(records_dir=config.data.records_dir, data_dir=data_dir)


def open_data(config, workdir, tok, model_config) -> Data:
  """The config's dataset, prepared in data.data_dir (default WORKDIR/data) by process 0 if needed, as a Data.
  A copy prepared before is checked against its sources first (tfds_builders.prepare): rebuilt when the `.rec`
  files changed, refused when built with other MER-Synth settings."""
  data_dir = config.data.data_dir or str(pathlib.Path(workdir) / "data")
  builder = _builder(config, data_dir)
  if jax.process_index() == 0:
    tfds_builders.prepare(builder)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("dataset prepared")
    if jax.process_index() != 0:
      # A builder reads the dataset info when it is made: one made before process 0 wrote the data has no splits.
      builder = _builder(config, data_dir)
  sources = {split: tfds_builders.TfdsSource(builder, split) for split in builder.info.splits}
  return Data(config=config, tokenizer=tok, model_config=model_config, sources=sources)


def experience_context(config, tok, model, mesh) -> experience.Context:
  """The fixed part of every RL step: special ids, the label space and the calibration's token sets."""
  space, cal_space = settings.label_space(config), settings.calibration_space(config)
  cats = cal_space or space
  token_sets = rewards.category_token_sets(cats, tok.encode, model.config.vocab_size)
  return experience.Context(model=model, tokenizer=tok, ids=rollout.SpecialIds.from_tokenizer(tok), space=space,
                            token_sets=jnp.asarray(token_sets), cluster_mask=jnp.asarray(cats.cluster_mask()),
                            mesh=mesh, axis_rules=dict(config.mesh.axis_rules), cal_space=cal_space)


def eval_token_sets(config, tok, model, ctx: experience.Context):
  """The category token sets of the evaluation's confidence read-out (the label space's, settings.label_space)."""
  if ctx.cal_space is None:
    return ctx.token_sets
  space = settings.label_space(config)
  return jnp.asarray(rewards.category_token_sets(space, tok.encode, model.config.vocab_size))


def setup(config, workdir) -> Run:
  """Validates and checks the workdir, then builds the run. Raises ConfigError before anything is compiled."""
  sharding.init_distributed(config.mesh.coordinator or None)
  settings.validate(config, jax.device_count(), memory.local_device_memory_gb())
  workdir = pathlib.Path(workdir)
  check_resume(config, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    artifacts.write_text_atomic(workdir / "config.json", json.dumps(config.to_dict(), indent=1, default=str))
  tok = _tokenizer(config, workdir)
  model = build_model(config, tok)
  mesh = sharding.make_mesh(config.mesh.shape)
  ctx = experience_context(config, tok, model, mesh)
  return Run(config=config, workdir=workdir, tokenizer=tok, model=model, mesh=mesh,
             axis_rules=dict(config.mesh.axis_rules), data=open_data(config, workdir, tok, model.config),
             writer=observe.MetricsWriter(workdir, tensorboard=config.log.tensorboard), ctx=ctx,
             eval_settings=settings.evaluation_settings(config),
             eval_token_sets=eval_token_sets(config, tok, model, ctx), stages=settings.stages(config),
             experience=settings.experience_settings(config))
