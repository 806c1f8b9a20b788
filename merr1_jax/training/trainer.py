"""The MER-R1 trainer: `python -m merr1_jax.train --config configs/base.py --workdir W`.

The loop only: stages `sft` then `rl`, each resumable from WORKDIR/checkpoints/<stage>. Each RL step runs
rollouts in both modes, rewards, the calibration passes, advantages (merr1_jax/training/experience.py), then the sharded
jitted update (merr1_jax/training/step.py). Evaluation in both modes runs after each stage (and every
`eval.every` RL steps) through merr1_jax/evaluation/core.py, the same code as `python -m merr1_jax.evaluate`.

Outputs in WORKDIR: metrics.jsonl, tb/ (TensorBoard), checkpoints/, eval_<stage>.json, plots/*.png,
results.md, results.json ({"sft": {"fast": {"precision", "recall", "f"}, "slow": ...}, "rl": ...}) and export/
(the final policy as HF safetensors).

Bad input (a config field, a config-file argument, an override, an incompatible workdir) ends the run before
anything is compiled with one line `error: <field>: <what is wrong>` on stderr and exit status 2, and so does a
stage whose every checkpoint is damaged (a damaged step with a good older one is named in one line and the run
falls back to that one); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Mapping

import jax
import numpy as np
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from merr1_jax import cli, rollout
from merr1_jax import config as cfglib
from merr1_jax.evaluation import core as evaluation
from merr1_jax.evaluation import reports
from merr1_jax.infra import artifacts, observe, preemption, throughput
from merr1_jax.infra import checkpoint as ckptlib
from merr1_jax.models import hf_io, lora_export
from merr1_jax.training import experience, interference
from merr1_jax.training import step as ts
from merr1_jax.training.setup import Run, setup

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/base.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
flags.mark_flag_as_required("config")
_log = logging.getLogger("merr1_jax.train")


def _eval(run: Run, params, stage: str, step: int) -> dict:
  """Both modes on the eval split; summary, analysis and the records skipped as bad ({dataset: {split: {count,
  ids}}}) saved as WORKDIR/eval_<stage>.json (and reused on resume), the per-clip records as
  WORKDIR/eval_<stage>_samples.jsonl (what paired comparisons of runs read)."""
  result = evaluation.evaluate(run.model, params, run.tokenizer, run.data.eval_datasets(),
                               settings=run.eval_settings, token_sets=run.eval_token_sets, mesh=run.mesh,
                               progress=run.config.log.progress, split=run.config.data.eval_split)
  summary = {name: r.summary for name, r in result.items()}
  analysis = {name: r.analysis for name, r in result.items()}
  skipped = {name: r.skipped for name, r in result.items()}
  flat = {f"eval/{d}/{m}/{k}": v for d, s in summary.items() for m, vals in s.items() for k, v in vals.items()
          if isinstance(v, (int, float))}
  run.writer.write(f"eval_{stage}", step, flat)
  if jax.process_index() == 0:
    artifacts.write_text_atomic(run.workdir / f"eval_{stage}.json", json.dumps(
        {"step": step, "summary": summary, "analysis": analysis, "skipped": skipped}, indent=1, default=float))
    keep = ("dataset", "id", "mode", "sample", "gt", "precision", "recall", "words", "format_ok", "confidence")
    artifacts.write_text_atomic(run.workdir / f"eval_{stage}_samples.jsonl", "".join(
        json.dumps({k: s[k] for k in keep}) + "\n" for r in result.values() for s in r.samples))
  return {"summary": summary, "analysis": analysis, "skipped": skipped}


def _fault_injection(ckpt, stage: str, step: int, *, logged_only: bool = False) -> None:
  """Test hooks (docs/reliability.md), each a crash or hard preemption: MERR1_SIGKILL_AT=<stage>:<step> kills
  the process with SIGKILL right after that step's checkpoint is on disk; MERR1_SIGKILL_AFTER_LOG=<stage>:<step>
  right after the step's metrics row is written, before any checkpoint of it (`logged_only`)."""
  if os.environ.get("MERR1_SIGKILL_AFTER_LOG" if logged_only else "MERR1_SIGKILL_AT") == f"{stage}:{step}":
    if not logged_only:
      ckpt.wait()
    os.kill(os.getpid(), signal.SIGKILL)


# What the progress bar shows after each step: (metric, label, format).
_BAR_FIELDS = (("loss", "loss", "{:.3f}"), ("reward/slow/f1", "reward/slow/f1", "{:.3f}"),
               ("throughput/tokens_per_s_per_device", "tok/s/dev", "{:.0f}"),
               ("throughput/update_mfu", "mfu", "{:.1%}"))


def _stage_loop(run: Run, stage: ts.Stage, state, step_fn, batches, ckpt, guard,
                rng=None, lora_base=None) -> tuple[object, bool]:
  """Runs `step_fn(state, batch, step) -> (state, metrics)` until the stage's steps; returns (state, preempted). Each
  checkpoint stores the stage's rng key `rng` (None: the stage draws no random numbers); in a LoRA stage it holds
  the trainable leaves only and `lora_base` (Run.lora_base: the frozen base's fingerprint and source)."""
  name, steps = stage.name, stage.steps
  extra = {"stage": name, **({"lora_base": lora_base} if lora_base else {})}
  start = int(state.step)
  bar = observe.progress(steps, start, name, run.config.log.progress)
  t_data = time.perf_counter()
  for step in range(start + 1, steps + 1):
    batch = next(batches)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch, step)
    metrics["time/data"] = t0 - t_data
    metrics["time/step"] = time.perf_counter() - t0
    ts.check_nonfinite(metrics, run.config.rl.max_nonfinite_steps, where=f" in {name} step {step}")
    if step % run.config.log.every == 0 or step == steps:
      run.writer.write(name, step, metrics)
    _fault_injection(ckpt, name, step, logged_only=True)
    bar.update(1)
    bar.set_postfix({name: fmt.format(float(metrics[k])) for k, name, fmt in _BAR_FIELDS if k in metrics})
    # Agreed over all processes: a signal may reach them at different steps, and saving is collective.
    stop = guard.any_process_requested()
    if ckpt.should_save(step) or step == steps or stop:
      ckpt.save(step, stage.checkpoint_view(state), data_iter=batches, rng=rng, extra=extra, force=True)
      _fault_injection(ckpt, name, step)
    if name == "rl" and run.config.eval.every and step % run.config.eval.every == 0 and step < steps:
      _eval(run, state.params, f"rl_step{step}", step)
    if stop:
      bar.close()
      return state, True
    t_data = time.perf_counter()
  bar.close()
  return state, False


def _restore(run: Run, ckpt, state, batches, stage: ts.Stage):
  """(state, rng) of the newest checkpoint that restores, the data iterator moved to its position; (state, None)
  if none exists. A damaged step is named in one line and the next older one used (Checkpointer.restore_newest:
  state, data position and rng all come from the step chosen); none usable raises NoUsableCheckpointError.

  Either way the stage's metrics.jsonl rows past the step restored (0 when no checkpoint exists yet) are
  dropped: a step's row is written before its asynchronous checkpoint commits, so a crash (or a fallback past
  a damaged step) leaves rows of steps that the rerun computes again (docs/reliability.md)."""
  found = ckpt.restore_newest(
      lambda step: run.restore_state(ckpt, step, state, state.params, stage, data_iter=batches))
  run.writer.truncate_after(stage.name, found[0] if found else 0)
  if found is None:
    return state, None
  step, (state, rng) = found
  _log.info("%s: resumed from step %d", stage.name, step)
  return state, rng


def _final_checkpoint_ok(run: Run, stage: ts.Stage) -> bool:
  """Whether a finished stage's last checkpoint passes its check (manifest, items); a damaged one is named and
  the stage runs again from its newest good step (the rerun is bit-identical: docs/reliability.md)."""
  ckpt = run.checkpointer(stage)
  try:
    ckpt.check(ckpt.latest_step())
    return True
  except ckptlib.DamagedCheckpointError as e:
    _log.warning("%s; the stage runs again from its newest good step", e)
    return False
  finally:
    ckpt.close()


def _open_stage(run: Run, stage: ts.Stage, params, make_step):
  """(state, jitted step, batches, checkpointer, saved rng) of a stage, restored from its newest checkpoint: the
  starting parameters (LoRA folded), the placed train state, the step, the data stream at the restored position."""
  params = run.stage_start(stage, params)
  state, tx = stage.init_state(params, run.model.config.jnp_compute_dtype)
  state = run.place(state)
  step = make_step(run.model, tx, stage.step, state_shardings=run.state_shardings(state))
  batches = iter(run.data.pipeline(stage.name))
  ckpt = run.checkpointer(stage)
  state, rng = _restore(run, ckpt, state, batches, stage)
  return state, step, batches, ckpt, rng


def run_sft(run: Run, stage: ts.Stage, params, guard):
  # SFT draws no random numbers: no rng to carry.
  state, step, batches, ckpt, _ = _open_stage(run, stage, params, ts.make_sft_step)

  def sft_step(state, batch, i):
    state, metrics = step(state, run.to_device(run.sft_batch(batch)))
    return state, {k: float(v) for k, v in metrics.items()}

  state, preempted = _stage_loop(run, stage, state, sft_step, batches, ckpt, guard,
                                 lora_base=run.lora_base(stage, state.params))
  ckpt.close()
  return state.params, preempted


def run_rl(run: Run, stage: ts.Stage, params, guard):
  cfg = run.config
  state, step, batches, ckpt, saved_key = _open_stage(run, stage, params, ts.make_rl_step)
  exp = run.experience
  # The interference probe's fixed prompts: the first batch of a fresh RL stream (the same on every resume).
  probe_batch = next(iter(run.data.pipeline("rl"))) if cfg.rl.probe_every else None
  # The stage's key: a fresh run derives it from the seed, a resumed one takes the checkpoint's (saved with
  # every checkpoint), so resuming never depends on re-deriving it.
  base_key = jax.random.key(cfg.seed + 1) if saved_key is None else saved_key

  # Throughput accounting (infra/throughput.py): the peaks of the config or the device's datasheet, if any.
  devices = run.mesh.size if run.mesh is not None else 1
  _, peak_flops, peak_bw = throughput.peaks_from_config(cfg.log, jax.devices()[0])
  cfg_model = run.ctx.model.config
  param_bytes = int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(state.params)))
  kv_itemsize = np.dtype(cfg_model.jnp_compute_dtype).itemsize
  shared_decode = rollout.shared_prefix.supports_shared_decode(run.ctx.model, None)

  def rl_step(state, batch, i):
    t0 = time.perf_counter()
    ref = ts.reference_params(state) if stage.with_reference else None
    # Step i's key is fold_in(stage key, i): a resumed run draws the same rollouts as an uninterrupted one.
    rl_batch, metrics, _ = experience.collect(run.ctx, exp, state.params, ref, batch,
                                              jax.random.fold_in(base_key, i))
    t1 = time.perf_counter()
    state, update = step(state, run.global_to_device(rl_batch))
    update = {k: float(v) for k, v in update.items()}  # waits for the device
    t2 = time.perf_counter()
    tokens = float(sum(np.asarray(s.loss_mask).sum() for s in rl_batch.segments))
    metrics.update(update)
    metrics.update({"time/update": t2 - t1,
                    "time/tokens_per_s": tokens / max(t2 - t0, 1e-9)})
    metrics.update(throughput.rl_step_metrics(
        cfg_model, prompt_mask=rl_batch.prompt.mask, segments=[(s.mask, s.loss_mask) for s in rl_batch.segments],
        t_rollout=metrics["time/rollout"], t_update=t2 - t1, t_step=t2 - t0, devices=devices,
        param_bytes=param_bytes, decode_steps=int(metrics.get("rollout/decode_steps", 0)), peak_flops=peak_flops,
        peak_bandwidth=peak_bw, kv_itemsize=kv_itemsize, shared_decode=shared_decode))
    if probe_batch is not None and (i == 1 or i % cfg.rl.probe_every == 0):
      # On the updated policy, with a fixed key per step. The reference is read from the new state: the step
      # donated the old one, whose buffers `ref` shares (frozen leaves, state.ref).
      ref = ts.reference_params(state) if stage.with_reference else None
      metrics.update(interference.probe(run.ctx, exp, state.params, ref, probe_batch,
                                        jax.random.fold_in(base_key, 1_000_000 + i), freeze=stage.freeze))
    return state, metrics

  state, preempted = _stage_loop(run, stage, state, rl_step, batches, ckpt, guard, rng=base_key,
                                 lora_base=run.lora_base(stage, state.params))
  ckpt.close()
  return state.params, preempted


def _write_results(run: Run, evals: dict[str, dict]) -> dict:
  data = run.config.data.name
  results = _training_results(evals, data)
  if jax.process_index() == 0:
    artifacts.write_text_atomic(run.workdir / "results.json", json.dumps(results, indent=1))
    md = _results_markdown(evals, data, run.config.data.eval_split)
    artifacts.write_text_atomic(run.workdir / "results.md", md)
    print("\n" + md)
  return results


# ----------------------------------------------------------------------------------------- results.json / .md


def _results_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
  """The markdown table of results.json ({stage: {mode: {precision, recall, f}}}), in points."""
  lines = ["| checkpoint | mode | precision | recall | F |", "|---|---|---|---|---|"]
  for stage in ("sft", "rl"):
    for mode in ("fast", "slow"):
      r = results.get(stage, {}).get(mode)
      if r:
        lines.append(f"| {stage} | {mode} | {100 * r['precision']:.2f} | {100 * r['recall']:.2f} | "
                     f"{100 * r['f']:.2f} |")
  return "\n".join(lines)


def _training_gap_lines(evals: Mapping[str, Mapping], data: str) -> str:
  """The fast-vs-slow analysis per stage: slow minus fast, paired per clip, with 95% intervals."""
  lines = []
  for stage, ev in evals.items():
    g = ev.get("analysis", {}).get(data, {}).get("fast_vs_slow")
    if not g or g["precision"]["slow_minus_fast"] is None:
      continue
    cell = lambda d: f"{100 * d['slow_minus_fast']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
    lines.append(f"- {stage}: slow - fast precision {cell(g['precision'])}, recall {cell(g['recall'])} "
                 f"(points, n = {g['precision']['n']} clips)")
  return "\n".join(lines)


def _training_results(evals: Mapping[str, Mapping], data: str) -> dict:
  """results.json's content from the trainer's per-stage evaluations (eval_<stage>.json): per stage, each mode's
  numbers and `skipped`, the records of each evaluated split skipped as bad ({split: {'count', 'ids'}}; absent
  for an eval_<stage>.json written before it was recorded)."""
  out = {}
  for stage, ev in evals.items():
    out[stage] = {mode: {k: float(v[k]) for k in ("precision", "recall", "f")}
                  for mode, v in ev["summary"][data].items()}
    if data in ev.get("skipped", {}):
      out[stage]["skipped"] = ev["skipped"][data]
  return out


def _results_markdown(evals: Mapping[str, Mapping], data: str, split: str) -> str:
  """WORKDIR/results.md: the final table, the fast-vs-slow lines and the records skipped as bad, if any."""
  skips = [f"- {stage}: {line}" for stage, ev in evals.items()
           for line in reports.skipped_lines({data: ev.get("skipped", {}).get(data, {})})]
  return (f"# MER-R1 results ({data}, {split} split, OV emotion-wheel level 1, fractions x 100)\n\n"
          f"{_results_table(_training_results(evals, data))}\n\nFast vs slow:\n{_training_gap_lines(evals, data)}\n"
          + ("\nSkipped as bad records:\n" + "\n".join(skips) + "\n" if skips else ""))


def train(config, workdir: str) -> dict:
  """Runs the configured stages in `workdir` and returns results.json's content (empty if preempted)."""
  run = setup(config, workdir)
  params = run.initial_params()
  summaries: dict[str, dict] = {}
  with preemption.PreemptionGuard() as guard:
    for stage in run.stages:
      done = run.stage_done(stage) and _final_checkpoint_ok(run, stage)
      if not done:
        params, preempted = {"sft": run_sft, "rl": run_rl}[stage.name](run, stage, params, guard)
        if preempted:
          _log.warning("preempted (SIGTERM): checkpoint saved; rerun the same command to continue")
          run.close()
          return {}
        summaries[stage.name] = _eval(run, params, stage.name, stage.steps)
      else:
        params = run.final_params(stage, params)
        summaries[stage.name] = artifacts.read_json(run.workdir / f"eval_{stage.name}.json")
  results = _write_results(run, summaries)
  if config.log.plots and jax.process_index() == 0:
    observe.plot_curves(run.workdir)
  if config.checkpoint.export_hf:
    # An Omni starting checkpoint is exported in its own layout, towers copied through unchanged; a LoRA policy
    # with its adapters merged.
    artifacts.export_hf(params, run.model.config, run.workdir / "export", overwrite=True,
                        dtype=config.checkpoint.export_dtype, **hf_io.export_kwargs(config.model.hf_path))
    if run.stages[-1].lora:
      _export_adapters(run, params)
  run.close()
  return results


def _export_adapters(run: Run, params) -> None:
  """The last stage's adapters as a PEFT adapter (WORKDIR/export_peft) and, unless that base is the unchanged
  model.hf_path checkpoint, the base they apply to (WORKDIR/export_base: the policy without its adapters). Not for
  a Qwen2.5-Omni base (PEFT keys are Qwen2ForCausalLM's; the merged export keeps the Omni layout)."""
  config = run.config
  base_path = config.model.hf_path
  if hf_io.export_kwargs(base_path).get("layout", "qwen2") != "qwen2":
    _log.warning("no PEFT adapter written: its keys follow Qwen2ForCausalLM's module tree, and this run's base is a "
                 "Qwen2.5-Omni checkpoint; use the merged export in %s", run.workdir / "export")
    return
  if not (tuple(config.stages) == ("rl",) and base_path and not config.lora.train_full):
    base_params, base_cfg = lora_export.base_only(params, run.model.config)
    base_path = str(run.workdir / "export_base")
    artifacts.export_hf(base_params, base_cfg, base_path, overwrite=True, dtype=config.checkpoint.export_dtype,
                        **hf_io.export_kwargs(config.model.hf_path))
  artifacts.export_peft(params, run.model.config, run.workdir / "export_peft", overwrite=True,
                        base_model_name_or_path=base_path)


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    cli.usage_error("--workdir is required (or set --config.workdir)")
  # Library chatter (orbax, absl, TFDS) at WARNING; the trainer's own progress at INFO.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("merr1_jax").setLevel(logging.INFO)
  try:
    train(config, workdir)
  except cfglib.ConfigError as e:  # validate() or the workdir check: before anything was compiled
    cli.usage_error(str(e))
  except ckptlib.NoUsableCheckpointError as e:  # every step of a stage damaged: names each, one line
    cli.usage_error(str(e))
