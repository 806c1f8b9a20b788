"""`python -m merr1_jax.evaluate`: bad input exits 2 with a clear message; an HF export and a training checkpoint
load through `load_policy` (the same weights come back); a checkpoint of another model is refused by field; an
end-to-end run writes the reports."""

import json
import pathlib

import jax
import numpy as np
import pytest

from merr1_jax import checkpoint, evaluate, optim, prompts
from merr1_jax import config as cfglib
from merr1_jax import train_step as ts
from merr1_jax.models import base, hf_io, mllm

CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "base.py")
SMALL = ["--config.data.synth_train=8", "--config.data.synth_validation=2", "--config.data.synth_test=4",
         "--config.eval.batch_size=8", "--config.eval.max_new_tokens_slow=6", "--config.eval.max_new_tokens_fast=4"]


def _config(*overrides):
  return evaluate.apply_overrides(cfglib.load(CONFIG), [*SMALL, *overrides])


def _cli(capsys, workdir, *args):
  code = evaluate.main(["--config", CONFIG, "--workdir", str(workdir), "--no_progress", *SMALL, *args])
  return code, capsys.readouterr().err


def _model_and_params(config, workdir, seed=0):
  tok = evaluate.load_tokenizer(config, workdir)
  tok.save(pathlib.Path(workdir) / "tokenizer.json")  # as the trainer does
  model = mllm.build(cfglib.model_config(config, vocab_size=tok.vocab_size,
                                         video_token_id=tok.id_of(prompts.VIDEO_TOKEN),
                                         audio_token_id=tok.id_of(prompts.AUDIO_TOKEN)))
  return model, model.init_params(jax.random.key(seed))


def _flat(params):
  return {base.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


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


def test_empty_split(tmp_path, capsys):
  code, err = _cli(capsys, tmp_path, "--config.data.synth_test=0")
  assert code == 2 and "dataset 'mer_synth': the eval split 'test' has no examples" in err


def test_bad_override_and_settings(tmp_path, capsys):
  code, err = _cli(capsys, tmp_path, "--config.eval.batch_size=3")
  assert code == 2 and "config.eval.batch_size=3 does not split over the" in err
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
  decoder = [k for k in want if k.startswith("decoder/")]
  assert decoder and all(np.array_equal(want[k], have[k]) for k in decoder)
  other = _config("--config.model.d_model=64")
  with pytest.raises(evaluate.EvalError, match="does not match the model of this config"):
    evaluate.load_policy(other, tmp_path, str(tmp_path / "export"))


def _save_train_checkpoint(config, workdir, stage, step, params):
  tx = optim.make_optimizer(cfglib.optim_config(config, stage), params)
  state = ts.init_state(params, tx, with_reference=stage == "rl" and config.rl.beta > 0)
  with checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints" / stage, save_every=1, keep=5,
                               async_save=False, config_json=cfglib.to_json(config)) as ckpt:
    assert ckpt.save(step, state, force=True)


def test_training_checkpoint_loads_and_other_model_is_refused(tmp_path):
  config = _config()
  model, params = _model_and_params(config, tmp_path)
  _, later = _model_and_params(config, tmp_path, seed=1)
  _save_train_checkpoint(config, tmp_path, "sft", 3, params)
  _save_train_checkpoint(config, tmp_path, "sft", 5, later)
  for arg, want in (("sft:3", params), ("3", params), (None, later), (str(tmp_path / "checkpoints/sft/5"), later)):
    _, got, _ = evaluate.load_policy(config, tmp_path, arg)
    w, g = _flat(want), _flat(got)
    assert w.keys() == g.keys() and all(np.array_equal(w[k], g[k]) for k in w), arg
  # Another model (a different width): refused before any array is read, naming the field.
  other = _config("--config.model.d_model=64", "--config.model.head_dim=16")
  with pytest.raises(evaluate.EvalError, match=r"another model: model.d_model: checkpoint 96, config 64"):
    evaluate.load_policy(other, tmp_path, "sft:3")


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
