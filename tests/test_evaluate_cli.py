"""`python -m merr1_jax.evaluate`.

In process (fast): bad input exits 2 with one `error:` line (a config that cannot be built included); an HF export
and a training checkpoint load through `load_policy` (the same weights, projectors included, come back); a
checkpoint of another model (another size or another preset) is refused by field; one tokenizer, the policy's, is
used for data and model, and disagreeing tokenizers are refused; an end-to-end run writes the reports.

In subprocesses, on a smoke run trained long enough to answer in both modes (`trained`): the CLI reproduces the
trainer's SFT and RL eval exactly; the fast-vs-slow analysis agrees with samples.jsonl at both checkpoints; the RL
report states, from the numbers, whether the slow mode closed the gap; the predictions CSVs scored by
`python -m merr1_jax.metrics ov` give the report's numbers; the HF export evaluates exactly like the training
checkpoint; --num_samples works end to end.
"""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

import jax
import numpy as np
import pytest

from merr1_jax import config as cfglib
from merr1_jax import evaluate
from merr1_jax.data import pipeline, synth
from merr1_jax.evaluation import core as evaluation
from merr1_jax.evaluation import reports
from merr1_jax.infra import checkpoint
from merr1_jax.models import hf_io
from merr1_jax.task import metrics
from merr1_jax.training import settings
from merr1_jax.training import setup as run_setup
from tests.helpers import shared
from tests.helpers.trees import flat_params as _flat
from tests.helpers.xla import COMPILE_FAST

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "base.py")
SMOKE = str(ROOT / "configs" / "smoke.py")
SMALL = ["--config.data.synth_train=8", "--config.data.synth_validation=2", "--config.data.synth_test=4",
         "--config.eval.batch_size=8", "--config.eval.max_new_tokens_slow=6", "--config.eval.max_new_tokens_fast=4"]


def _config(*overrides):
  return evaluate.apply_overrides(cfglib.load(CONFIG), [*SMALL, *overrides])


def _env() -> dict:
  """A child process as a user runs it: one CPU device (no forced device count), offline, the test cache."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XLA_FLAGS"))}
  env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS=COMPILE_FAST,
             JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _cli(capsys, workdir, *args):
  code = evaluate.main(["--config", CONFIG, "--workdir", str(workdir), "--no_progress", *SMALL, *args])
  return code, capsys.readouterr().err


def _model_and_params(config, workdir, seed=0):
  tok = evaluate.load_tokenizer(config, workdir)
  tok.save(pathlib.Path(workdir) / "tokenizer.json")  # as the trainer does
  model = run_setup.build_model(config, tok)
  return model, model.init_params(jax.random.key(seed))




@pytest.mark.parametrize("arg, want", [(":model=gpt5", "unknown model preset 'gpt5'; known presets: tiny"),
                                       (":foo=bar", "expected model=PRESET")])
def test_config_that_cannot_be_built(tmp_path, capsys, arg, want):
  code, err = _cli(capsys, tmp_path, "--config", CONFIG + arg)  # the last --config wins
  assert code == 2 and err.startswith(f"error: --config {CONFIG + arg}: ") and want in err
  assert err.count("\n") == 1 and "Traceback" not in err


def test_config_file_errors(tmp_path, capsys):
  code, err = _cli(capsys, tmp_path, "--config", str(tmp_path / "none.py"))
  assert code == 2 and "none.py does not exist" in err
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None):\n  return {}['model']\n")
  code, err = _cli(capsys, tmp_path, "--config", str(broken))
  assert code == 2 and err == f"error: --config {broken}: KeyError: 'model'\n"


def test_unknown_preset_subprocess_exits_2_without_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "merr1_jax.evaluate", "--config", CONFIG + ":model=gpt5",
                         "--workdir", str(tmp_path)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(errors) == 1 and "unknown model preset 'gpt5'" in errors[0]


def test_bad_baseline(tmp_path, capsys):
  (tmp_path / "notjson.json").write_text("{oops")
  (tmp_path / "other.json").write_text('{"rows": []}')
  (tmp_path / "nomodes.json").write_text('{"summary": {"mer_synth": 3}}')
  for name, want in (("none.json", "none.json: no such file"), ("notjson.json", "not a readable JSON file"),
                     ("other.json", "expected a report.json"), ("nomodes.json", "['mer_synth'] have no per-mode")):
    code, err = _cli(capsys, tmp_path, "--baseline", str(tmp_path / name))
    assert code == 2 and err.startswith(f"error: --baseline {tmp_path / name}: ") and want in err, err


def test_missing_checkpoint(tmp_path, capsys):
  code, err = _cli(capsys, tmp_path)
  assert code == 2 and "error: no checkpoint in" in err and "checkpoints/{sft,rl}" in err
  code, err = _cli(capsys, tmp_path, "--checkpoint", "40")
  assert code == 2 and "no checkpoint for step 40" in err
  code, err = _cli(capsys, tmp_path, "--checkpoint", str(tmp_path / "nowhere"))
  assert code == 2 and "nowhere: no such step or path" in err


def test_unknown_dataset(tmp_path, capsys):
  code, err = _cli(capsys, tmp_path, "--datasets", "mer_synth,mer2099")
  assert code == 2 and "unknown dataset(s) ['mer2099']" in err and "mer2023" in err


def test_empty_split(tmp_path, capsys, monkeypatch):
  code, err = _cli(capsys, tmp_path, "--config.data.synth_test=0")  # config.validate catches this one first
  assert code == 2 and "config.data.synth_test" in err
  # A split that exists but yields nothing: no records, or only bad ones (skipped and counted).
  for records, counts in (([], "0 records, 0 skipped as bad"), ([b"not a record"] * 3, "3 records, 3 skipped")):
    monkeypatch.setattr(evaluate, "_own_data", lambda config, workdir, tok, model, r=records: run_setup.Data(
        config, tok, model.config, {"test": pipeline.BytesSource(r, name="mer_synth/test")}))
    code, err = _cli(capsys, tmp_path, "--config.data.on_bad_record=skip")
    assert code == 2 and f"dataset 'mer_synth': the eval split 'test' has no examples ({counts}" in err
  monkeypatch.setattr(evaluate, "_own_data", lambda config, workdir, tok, model: run_setup.Data(
      config, tok, model.config, {"train": None}))
  code, err = _cli(capsys, tmp_path)
  assert code == 2 and "dataset 'mer_synth' has no split 'test'" in err and "(have ['train'])" in err


def test_bad_override_and_settings(tmp_path, capsys):
  code, err = _cli(capsys, tmp_path, "--config.eval.batch_size=3")
  assert code == 2 and "config.eval.batch_size" in err and "8 batch shards" in err  # 8 fake CPU devices
  code, err = _cli(capsys, tmp_path, "--config.eval.no_such_field=3")
  assert code == 2 and "no field 'no_such_field'" in err
  code, err = _cli(capsys, tmp_path, "--modes", "fast,medium")
  assert code == 2 and "settings.modes" in err


def test_hf_export_loads_and_mismatch_is_refused(tmp_path):
  config = _config()
  model, params = _model_and_params(config, tmp_path)
  hf_io.save_hf(params, model.config, str(tmp_path / "export"), dtype="float32")
  got_model, got, _ = evaluate.load_policy(config, tmp_path, None)  # no checkpoints: falls back to the export
  want, have = _flat(params), _flat(got)
  assert any(k.startswith("video_proj/") for k in want)  # the projectors come back too, not a fresh init
  assert want.keys() == have.keys() and all(np.array_equal(want[k], have[k]) for k in want)
  other = _config("--config.model.d_model=64")
  with pytest.raises(evaluate.EvalError, match="does not match the model of this config"):
    evaluate.load_policy(other, tmp_path, str(tmp_path / "export"))
  # An HF directory without the projectors (a base checkpoint, not an export) is not a policy to evaluate.
  (tmp_path / "export" / hf_io.PROJECTOR_FILE).unlink()
  with pytest.raises(evaluate.EvalError, match=f"export: does not match.*{hf_io.PROJECTOR_FILE}"):
    evaluate.load_policy(config, tmp_path, str(tmp_path / "export"))


def _save_train_checkpoint(config, workdir, stage, step, model, params):
  state, _ = settings.stage(config, stage).init_state(params, model.config.jnp_compute_dtype)
  with checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints" / stage, save_every=1, keep=5,
                               async_save=False, config_json=cfglib.to_json(config)) as ckpt:
    assert ckpt.save(step, state, force=True)


def test_training_checkpoint_loads_and_other_model_is_refused(tmp_path):
  config = _config()
  model, params = _model_and_params(config, tmp_path)
  _, later = _model_and_params(config, tmp_path, seed=1)
  _save_train_checkpoint(config, tmp_path, "sft", 3, model, params)
  _save_train_checkpoint(config, tmp_path, "sft", 5, model, later)
  for arg, want in (("sft:3", params), ("3", params), (None, later), (str(tmp_path / "checkpoints/sft/5"), later)):
    _, got, _ = evaluate.load_policy(config, tmp_path, arg)
    w, g = _flat(want), _flat(got)
    assert w.keys() == g.keys() and all(np.array_equal(w[k], g[k]) for k in w), arg
  # Another model (a different width): refused before any array is read, naming the field.
  other = _config("--config.model.d_model=64", "--config.model.head_dim=16")
  with pytest.raises(evaluate.EvalError, match=r"another model: model.d_model: checkpoint 96, config 64"):
    evaluate.load_policy(other, tmp_path, "sft:3")


def test_checkpoint_of_another_preset_is_refused(tmp_path, capsys):
  config = _config()
  model, params = _model_and_params(config, tmp_path)
  _save_train_checkpoint(config, tmp_path, "sft", 3, model, params)
  code, err = _cli(capsys, tmp_path, "--config", CONFIG + ":model=small_20m", "--checkpoint", "sft:3")
  assert code == 2 and "was written for another model: " in err
  assert "model.preset: checkpoint 'tiny', config 'small_20m'" in err


def _export_with_own_tokenizer(config, workdir, vocab_size):
  """An HF export whose directory carries its own tokenizer (vocab_size ids), and a model built for it."""
  tok = synth.build_tokenizer(settings.synth_config(config), vocab_size=vocab_size)
  model = evaluate.build_model(config, tok)
  hf_io.save_hf(model.init_params(jax.random.key(0)), model.config, str(workdir / "export"), dtype="float32")
  tok.save(workdir / "export" / "tokenizer.json")
  return tok


def test_one_tokenizer_the_policys(tmp_path, capsys, monkeypatch):
  """The export's tokenizer (not the run's rebuilt one) tokenizes the data, sizes the model and decodes."""
  config = _config()
  want = _export_with_own_tokenizer(config, tmp_path, vocab_size=450)
  seen = {}
  real_pipelines = evaluate.dataset_pipelines

  def pipelines(config, workdir, tok, names, model):
    seen["data"] = tok
    return real_pipelines(config, workdir, tok, names, model)

  def stop(model, params, tok, datasets, **kw):
    seen["model"], seen["decode"] = model, tok
    raise ValueError("stop here: the test needs no generation")

  monkeypatch.setattr(evaluate, "dataset_pipelines", pipelines)
  monkeypatch.setattr(evaluation, "evaluate", stop)
  code, err = _cli(capsys, tmp_path, "--checkpoint", str(tmp_path / "export"))
  assert code == 2 and "stop here" in err
  assert want.vocab_size != synth.build_tokenizer(settings.synth_config(config)).vocab_size  # not the run's
  assert seen["data"] is seen["decode"] and seen["data"].vocab_size == want.vocab_size
  assert seen["model"].config.vocab_size == want.vocab_size


def test_disagreeing_tokenizers_are_refused(tmp_path, capsys):
  config = _config()
  policy = _export_with_own_tokenizer(config, tmp_path, vocab_size=450)
  run = synth.build_tokenizer(settings.synth_config(config))
  run.save(tmp_path / "tokenizer.json")
  code, err = _cli(capsys, tmp_path, "--checkpoint", str(tmp_path / "export"))
  assert code == 2 and f"the policy's tokenizer {tmp_path}/export/tokenizer.json and the run's" in err
  assert f"{tmp_path}/tokenizer.json disagree (vocab_size: {policy.vocab_size} vs {run.vocab_size})" in err


def test_end_to_end_writes_reports(tmp_path, capsys):
  config = _config()
  model, params = _model_and_params(config, tmp_path)
  hf_io.save_hf(params, model.config, str(tmp_path / "export"), dtype="float32")
  code = evaluate.main(["--config", CONFIG, "--workdir", str(tmp_path), "--no_progress", *SMALL,
                        "--checkpoint", str(tmp_path / "export")])
  out = capsys.readouterr()
  assert code == 0, out.err
  rep = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert rep["meta"]["checkpoint"] == str(tmp_path / "export") and rep["meta"]["checkpoint_kind"] == "hf"
  summary = rep["datasets"]["mer_synth"]["summary"]
  assert set(summary) == {"fast", "slow"} and summary["fast"]["n_samples"] == 4  # 4 clips in one batch of 8
  assert "mer_synth [fast] ov:" in out.out
  lines = (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()
  assert len(lines) == 8 and {json.loads(l)["mode"] for l in lines} == {"fast", "slow"}


# ------------------------------------------------------------- what --out and --workdir may touch (issue 23)


@pytest.fixture(scope="module")
def evaluable(tmp_path_factory):
  """A workdir template that evaluates (an HF export and the run's tokenizer) and holds the files of a run."""
  w = tmp_path_factory.mktemp("evaluable") / "w"
  config = _config()
  model, params = _model_and_params(config, w)
  hf_io.save_hf(params, model.config, str(w / "export"), dtype="float32")
  for name, text in (("results.json", '{"sft": {}}\n'), ("metrics.jsonl", '{"step": 1}\n'),
                     ("config.json", "{}\n"), ("checkpoints/sft/3/state", "weights\n")):
    (w / name).parent.mkdir(parents=True, exist_ok=True)
    (w / name).write_text(text)
  return w


def _tree(root: pathlib.Path) -> dict:
  """Every path under root (symlinks not followed) -> its bytes (None for a directory)."""
  return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _copy_workdir(evaluable, tmp_path) -> pathlib.Path:
  w = tmp_path / "w"
  shutil.copytree(evaluable, w)
  return w


@pytest.mark.parametrize("case, why", [
    ("workdir", "is the workdir"), ("dot", "is the workdir"), ("symlink", "is the workdir"),
    ("parent", "contains the workdir"), ("checkpoints", "is inside the workdir's checkpoints"),
    ("foreign", "is a non-empty folder that is not a report of merr1_jax.evaluate"),
    ("file", "is not a folder")])
def test_out_that_is_not_a_report_folder_is_refused(evaluable, tmp_path, capsys, monkeypatch, case, why):
  """`--out` is refused, naming the path and why, before anything is built; nothing on disk changes (before
  issue 23 the report writer moved the folder aside and removed it: the workdir, its parent, a user's folder)."""
  w = _copy_workdir(evaluable, tmp_path)
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine\n")
  (tmp_path / "link").symlink_to(w, target_is_directory=True)
  out = {"workdir": str(w), "dot": ".", "symlink": str(tmp_path / "link"), "parent": str(tmp_path),
         "checkpoints": str(w / "checkpoints" / "sft" / "report"), "foreign": str(tmp_path / "mine"),
         "file": str(tmp_path / "mine" / "notes.txt")}[case]
  monkeypatch.chdir(w if case == "dot" else tmp_path)
  before = _tree(tmp_path)
  code, err = _cli(capsys, w, "--checkpoint", str(w / "export"), "--out", out)
  assert code == 2 and err.startswith(f"error: --out {out}: ") and why in err, err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert _tree(tmp_path) == before  # nothing removed, nothing created (no report, no temp folder)


def test_an_earlier_report_is_replaced_whole(evaluable, tmp_path, capsys):
  """A report folder of ours (its marker file) is replaced atomically by the next run: nothing of the old one
  stays (its slow-mode plot), and the new one is marked again."""
  w = _copy_workdir(evaluable, tmp_path)
  out = tmp_path / "report"
  code, err = _cli(capsys, w, "--checkpoint", str(w / "export"), "--out", str(out))
  assert code == 0, err
  assert (out / reports.MARKER).is_file() and (out / "calibration_slow.png").exists()
  code, err = _cli(capsys, w, "--checkpoint", str(w / "export"), "--out", str(out), "--modes", "fast")
  assert code == 0, err
  assert (out / reports.MARKER).is_file() and not (out / "calibration_slow.png").exists()
  assert set(json.loads((out / "report.json").read_text())["datasets"]["mer_synth"]["summary"]) == {"fast"}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "w"]  # no temp or old folder left


def test_a_mistyped_workdir_is_refused_and_not_created(tmp_path, capsys):
  w = tmp_path / "runs" / "typo"
  code, err = _cli(capsys, w)
  assert code == 2 and err == f"error: --workdir {w}: no such folder\n", err
  assert list(tmp_path.iterdir()) == []  # not created, and no dataset built in it
  (tmp_path / "file").write_text("x")
  code, err = _cli(capsys, tmp_path / "file")
  assert code == 2 and err == f"error: --workdir {tmp_path / 'file'}: not a folder\n", err


def test_a_judge_cache_inside_the_report_folder_is_refused(evaluable, tmp_path, capsys):
  """The report folder is replaced whole by every run: a judge cache kept there would be lost each time (before
  issue 23 the run went ahead, and the swap removed the cache it had just written)."""
  w = _copy_workdir(evaluable, tmp_path)
  items = tmp_path / "items.json"
  items.write_text(json.dumps([{"video_id": f"mer_synth-test-{i:06d}", "label": "happy", "label_set": "[happy]"}
                               for i in range(4)]))
  cache = tmp_path / "report" / "cache.jsonl"
  before = _tree(tmp_path)
  code, err = _cli(capsys, w, "--checkpoint", str(w / "export"), "--out", str(tmp_path / "report"),
                   "--mme_items", str(items), "--judge_cache", str(cache))
  assert code == 2 and err.startswith(f"error: --judge_cache {cache}: is inside the report folder ") and (
      "which each run replaces whole" in err), err
  assert _tree(tmp_path) == before


def test_skipped_records_are_in_the_report(tmp_path, capsys, monkeypatch):
  """Records skipped as bad (data.on_bad_record=skip) are counted and named per split in report.json, not only
  on the console: one that cannot be read (named by its index in the source) and one whose label maps nowhere
  (named by its id)."""
  config = _config()
  model, params = _model_and_params(config, tmp_path)
  hf_io.save_hf(params, model.config, str(tmp_path / "export"), dtype="float32")
  good = list(synth.generate_split(settings.synth_config(config), "test"))
  bad = dataclasses.replace(good[0], id="clip_no_label", openset=("xyzzy",))
  records = [good[0], b"not a record", good[1], bad, good[2], good[3]]
  monkeypatch.setattr(evaluate, "_own_data", lambda config, workdir, tok, model: run_setup.Data(
      config, tok, model.config, {"test": pipeline.BytesSource(records, name="mer_synth/test")}))
  code, err = _cli(capsys, tmp_path, "--checkpoint", str(tmp_path / "export"), "--config.data.on_bad_record=skip")
  assert code == 0, err
  rep = json.loads((tmp_path / "eval" / "report.json").read_text())["datasets"]["mer_synth"]
  assert rep["n_examples"] == 4
  assert rep["skipped"] == {"test": {"count": 2, "ids": [1, "clip_no_label"]}}


# ------------------------------------------------------------------------- a trained smoke run (subprocesses)

# configs/smoke.py, trained long enough that both modes give answers that score: with its 2 SFT steps every
# answer is empty, and equal zeros would show nothing. The evaluate CLI gets the same overrides, so it evaluates
# with the trainer's eval settings.
TRAIN = ["--config.sft.steps=150", "--config.data.synth_train=64", "--config.data.synth_test=12",
         "--config.checkpoint.every=75", "--config.eval.max_new_tokens_slow=40",
         "--config.eval.max_new_tokens_fast=10"]
SFT_STEPS = 150


def _run(*cmd, timeout=900):
  proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The trained smoke workdir, built once per session (tests/helpers/shared.py); tests only read it."""
  build = lambda d: _run("merr1_jax.train", "--config", SMOKE, "--workdir", str(d / "w"), *TRAIN)  # noqa: E731
  return shared.build_once(tmp_path_factory, "evaluate_cli_trained", build) / "w"


def _run_eval(workdir, out, *args) -> str:
  """The evaluate CLI on `workdir` with the trainer's settings, writing to `out`; its stdout."""
  return _run("merr1_jax.evaluate", "--config", SMOKE, "--workdir", str(workdir), "--out", str(out),
              "--no_progress", *TRAIN, *args)


def _read_eval(out, stdout: str) -> dict:
  return {"report": json.loads((out / "report.json").read_text()), "md": (out / "report.md").read_text(),
          "samples": [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()],
          "out": out, "stdout": stdout}


def _evaluate(workdir, out, *args) -> dict:
  return _read_eval(out, _run_eval(workdir, out, *args))


def _shared_eval(tmp_path_factory, name: str, workdir, *args) -> dict:
  """An evaluation of the trained workdir, run once per session like `trained`."""

  def build(d):
    (d / "stdout.txt").write_text(_run_eval(workdir, d / "eval", *args))

  d = shared.build_once(tmp_path_factory, name, build)
  return _read_eval(d / "eval", (d / "stdout.txt").read_text())


@pytest.fixture(scope="module")
def sft_eval(trained, tmp_path_factory):
  return _shared_eval(tmp_path_factory, "evaluate_cli_sft_eval", trained, "--checkpoint", f"sft:{SFT_STEPS}")


@pytest.fixture(scope="module")
def rl_eval(trained, sft_eval, tmp_path_factory):
  """The final checkpoint (no --checkpoint), compared with the SFT evaluation."""
  return _shared_eval(tmp_path_factory, "evaluate_cli_rl_eval", trained, "--baseline",
                      str(sft_eval["out"] / "report.json"))


def _plain(x):
  """NaN -> None, as report.json writes it, so the trainer's JSON and the report compare exactly."""
  return json.loads(json.dumps(x).replace("NaN", "null"))


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_cli_reproduces_the_trainers_eval_exactly(trained, sft_eval, rl_eval, stage):
  ev = {"sft": sft_eval, "rl": rl_eval}[stage]
  trainer = json.loads((trained / f"eval_{stage}.json").read_text())
  report = ev["report"]["datasets"]["mer_synth"]
  assert _plain(report["summary"]) == _plain(trainer["summary"]["mer_synth"])  # every number, not a few
  assert _plain(report["analysis"]) == _plain(trainer["analysis"]["mer_synth"])
  # Not equal by luck: answers were given and scored, in both modes.
  for mode in ("fast", "slow"):
    assert any(s["words"] for s in ev["samples"] if s["mode"] == mode), (stage, mode)
  assert max(report["summary"][m]["f"] for m in ("fast", "slow")) > 0


def _paired(samples, key):
  by_id = {}
  for s in samples:
    by_id.setdefault(s["id"], {}).setdefault(s["mode"], []).append(s[key])
  diffs, skipped = [], 0
  for modes in by_id.values():
    slow = [v for v in modes.get("slow", []) if v is not None]
    fast = [v for v in modes.get("fast", []) if v is not None]
    if slow and fast:
      diffs.append(statistics.fmean(slow) - statistics.fmean(fast))
    else:
      skipped += 1
  return diffs, skipped


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_fast_vs_slow_analysis_agrees_with_the_samples(sft_eval, rl_eval, stage):
  """At the SFT-only checkpoint and after RL: the per-mode P/R/F and the paired slow-minus-fast precision and
  recall differences, with their size (stderr, 95% interval, d_z), recomputed from samples.jsonl; and the
  report.md row shows them."""
  ev = {"sft": sft_eval, "rl": rl_eval}[stage]
  report = ev["report"]["datasets"]["mer_synth"]
  for mode in ("fast", "slow"):
    rows = [s for s in ev["samples"] if s["mode"] == mode]
    ov = metrics.ov_score([s["gt"] for s in rows], [s["words"] for s in rows])
    for k in ("f", "precision", "recall"):
      assert report["summary"][mode][k] == pytest.approx(ov[k], abs=1e-12), (mode, k)
  row = next(line for line in ev["md"].splitlines() if line.startswith("| mer_synth | ") and "d_z" not in line
             and line.count("|") == 8)
  cells = [c.strip() for c in row.strip("|").split("|")]
  for key, cell, dz_cell in (("precision", cells[1], cells[2]), ("recall", cells[3], cells[4])):
    diffs, skipped = _paired(ev["samples"], key)
    got = report["analysis"]["fast_vs_slow"][key]
    n = len(diffs)
    assert got["n"] == n == 12 and got["n_skipped"] == skipped == 0
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    assert got["slow_minus_fast"] == pytest.approx(mean, abs=1e-12)
    assert got["stderr"] == pytest.approx(sd / math.sqrt(n), abs=1e-12)
    assert got["ci95"] == pytest.approx([mean - 1.96 * sd / math.sqrt(n), mean + 1.96 * sd / math.sqrt(n)])
    assert got["effect_size_dz"] == (pytest.approx(mean / sd) if sd else None)
    lo, hi = got["ci95"]
    assert cell == f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
    assert dz_cell == ("n/a" if not sd else f"{mean / sd:.2f}")
  gap = report["summary"]["slow"]["f"] - report["summary"]["fast"]["f"]
  assert cells[6] == f"f {100 * gap:+.2f}"


def test_rl_report_states_whether_the_slow_mode_closed_the_gap(trained, sft_eval, rl_eval):
  sft = sft_eval["report"]["datasets"]["mer_synth"]["summary"]
  rl = rl_eval["report"]["datasets"]["mer_synth"]["summary"]
  before, after = sft["slow"]["f"] - sft["fast"]["f"], rl["slow"]["f"] - rl["fast"]["f"]
  g = rl_eval["report"]["gap_change"]["mer_synth"]
  assert g["before"] == pytest.approx(before, abs=1e-12) and g["after"] == pytest.approx(after, abs=1e-12)
  closed = before < 0 <= after
  assert (g["verdict"] == "closed") == closed
  assert (g["verdict"] == "no gap to close") == (before >= 0 and after >= 0)
  assert (g["verdict"] == "opened") == (after < 0 <= before)
  assert (g["verdict"] == "narrowed, not closed") == (before < after < 0)
  assert (g["verdict"] == "not closed") == (after <= before < 0)
  statement = f"mer_synth: slow-fast OV f gap {100 * before:+.2f} -> {100 * after:+.2f} points ({g['verdict']})"
  assert g["statement"] == statement
  assert f"- {statement}" in rl_eval["md"] and statement in rl_eval["stdout"]
  assert f"baseline: {sft_eval['out'] / 'report.json'}" in rl_eval["md"]
  # The trainer's own eval of the SFT stage is a baseline too, with the same numbers (identical by construction).
  base = evaluate.read_baseline(trained / "eval_sft.json")
  assert _plain(base["datasets"]["mer_synth"]["summary"]) == _plain(sft)


def test_predictions_csvs_scored_by_the_metrics_cli(rl_eval):
  """`python -m merr1_jax.metrics ov` on the CLI's own labels/predictions CSVs gives the report's numbers."""
  out, report = rl_eval["out"], rl_eval["report"]["datasets"]["mer_synth"]
  info = report["csv"]
  assert info["n_cells_not_representable"] == 0
  for mode in ("fast", "slow"):
    pred = out / info["predictions"][mode][0]
    assert pred.name == f"predictions_mer_synth_{mode}.csv"
    cli = json.loads(_run("merr1_jax.metrics", "ov", "--gt", str(out / info["labels"]), "--pred", str(pred),
                          "--json", timeout=300))
    for k in ("f", "precision", "recall"):
      assert report["summary"][mode][k] == pytest.approx(cli[k], abs=1e-12), (mode, k)
    assert cli["n_pred_unmatched"] == 0


def test_hf_export_evaluates_like_the_training_checkpoint(trained, rl_eval, tmp_path):
  """The trainer's export of the final policy (float32, projectors included) gives the same numbers and the
  same completions as its final training checkpoint."""
  ev = _evaluate(trained, tmp_path / "eval", "--checkpoint", str(trained / "export"))
  assert ev["report"]["meta"]["checkpoint_kind"] == "hf"
  assert rl_eval["report"]["meta"]["checkpoint_kind"] == "train"
  got, want = ev["report"]["datasets"]["mer_synth"], rl_eval["report"]["datasets"]["mer_synth"]
  assert _plain(got["summary"]) == _plain(want["summary"]) and _plain(got["analysis"]) == _plain(want["analysis"])
  assert [s["completion"] for s in ev["samples"]] == [s["completion"] for s in rl_eval["samples"]]


def test_num_samples_end_to_end(trained, tmp_path):
  n = 2
  ev = _evaluate(trained, tmp_path / "eval", "--num_samples", str(n), "--temperature", "1.5", "--modes", "fast")
  report = ev["report"]["datasets"]["mer_synth"]
  s = report["summary"]["fast"]
  assert report["settings"]["decoding"] == "temperature 1.5" and set(report["summary"]) == {"fast"}
  assert s["n_samples"] == n * 12 and s["n_prompts"] == 12
  by_id = {}
  for r in ev["samples"]:
    by_id.setdefault(r["id"], []).append(r)
  assert len(by_id) == 12 and all(sorted(r["sample"] for r in rows) == list(range(n)) for rows in by_id.values())
  assert any(len({r["completion"] for r in rows}) > 1 for rows in by_id.values())  # real samples, not copies
  ov = metrics.ov_score([r["gt"] for r in ev["samples"]], [r["words"] for r in ev["samples"]])
  assert s["f"] == pytest.approx(ov["f"], abs=1e-12)  # the main numbers average all N samples
  def f1(r):
    p, rec = r["precision"], r["recall"]
    return 2 * p * rec / (p + rec) if p + rec else 0.0

  best = [max(rows, key=lambda r: (f1(r), -r["sample"])) for rows in by_id.values()]  # first sample on ties
  want = metrics.ov_score([r["gt"] for r in best], [r["words"] for r in best])
  assert s["best_of_n"]["f"] == pytest.approx(want["f"], abs=1e-12) and s["best_of_n"]["f"] >= s["f"] - 1e-12
  assert report["csv"]["predictions"]["fast"] == [f"predictions_mer_synth_fast_sample{k}.csv" for k in range(n)]
