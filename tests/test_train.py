"""The trainer end to end on configs/smoke.py, in subprocesses: no network, exact resume after SIGKILL,
SIGTERM preemption, observability (JSONL and TensorBoard), the command line's errors, config validation and
incompatible-checkpoint refusal."""

import json
import math
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from merr1_jax import config as cfglib
from merr1_jax.infra import memory
from merr1_jax.models import lora, mllm, presets
from merr1_jax.training import settings
from merr1_jax.training import setup as run_setup
from tests.helpers import runs, shared
from tests.helpers.runs import BASE, ROOT, SMOKE
from tests.helpers.runs import ckpt_meta as _ckpt_meta
from tests.helpers.runs import ckpt_state as _ckpt_state
from tests.helpers.runs import env as _env
from tests.helpers.runs import rows as _rows
from tests.helpers.runs import train as _train


def _tb_scalars(tb_dir: pathlib.Path) -> dict[str, dict[int, float]]:
  """tag -> {step: value} from the TFRecord-framed event files (u64 length, u32 crc, Event proto, u32 crc)."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415

  out: dict[str, dict[int, float]] = {}
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted smoke run with the network disabled, a clean HF_HOME and TensorBoard on: (its temp dir,
  the trainer's pid). Built once per session (tests/helpers/shared.py); the tests copy what they change."""

  def build(tmp):
    rc, out, pid = _train(tmp / "w", tmp, "--config.log.tensorboard=True")
    assert rc == 0, out[-4000:]
    (tmp / "pid").write_text(str(pid))

  tmp = shared.build_once(tmp_path_factory, "train_reference_run", build)
  return tmp, int((tmp / "pid").read_text())


def test_network_guard_refuses_lookups_and_connections_in_the_child(tmp_path):
  """The guard the smoke run relies on: loaded in a child with that environment, it refuses (and records) a
  name lookup, a connection by name and a connection by non-loopback address."""
  code = ("import socket\n"
          "for f in (lambda: socket.getaddrinfo('pypi.org', 443), "
          "lambda: socket.create_connection(('huggingface.co', 443), timeout=5), "
          "lambda: socket.socket().connect(('192.0.2.1', 80))):\n"
          "  try:\n    f()\n  except OSError as e:\n    print(e)\n  else:\n    print('CONNECTED')\n")
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert out.count("network disabled by the test") == 3 and "CONNECTED" not in out, out
  logged = (tmp_path / "net.log").read_text().splitlines()
  assert [line.split()[0] for line in logged] == ["getaddrinfo", "getaddrinfo", "connect"], logged
  assert (tmp_path / "guard.mark").read_text().split() == [str(proc.pid)]  # the canary of that process


def test_smoke_run_needs_no_network(reference_run):
  tmp, pid = reference_run
  w = tmp / "w"
  # The canary: the trainer process itself loaded the guard (else the empty net.log would prove nothing).
  assert str(pid) in (tmp / "guard.mark").read_text().split()
  assert not (tmp / "net.log").exists(), (tmp / "net.log").read_text()
  assert not any((tmp / "hf_home").glob("**/*"))  # nothing cached from the Hub either
  results = json.loads((w / "results.json").read_text())
  for stage in ("sft", "rl"):
    for mode in ("fast", "slow"):
      assert set(results[stage][mode]) == {"precision", "recall", "f"}
      assert all(0.0 <= v <= 1.0 for v in results[stage][mode].values())
  assert [r["step"] for r in _rows(w)] == [1, 2, 3]
  assert (w / "export" / "config.json").exists() and (w / "results.md").exists()
  assert (w / "plots" / "rl.png").read_bytes()[:4] == b"\x89PNG"
  assert not list(w.glob(".*.tmp"))  # the atomic writes left no temp files behind


# The scalar families issue 7 asks for, as the trainer names them (experience.py and train_step.py).
_RL_FAMILIES = {
    "reward components per mode": [f"reward/{m}/{o}" for m in ("slow", "fast") for o in ("recall", "precision",
                                                                                         "format")]
                                   + ["reward/slow/calibration"],
    "P/R/F of fast and slow rollouts": [f"reward/{m}/{o}" for m in ("slow", "fast")
                                        for o in ("precision", "recall", "f1")],
    "advantage stats": ["adv_mean", "adv_std", "adv_min", "adv_max", "adv/slow/mean", "adv/fast/mean"],
    "KL": ["kl"],
    "clip fractions": ["clip_frac_low", "clip_frac_high"],
    "entropy": ["entropy"],
    "lengths": ["length/slow/mean", "length/fast/mean"],
    "time split": ["time/rollout", "time/scoring", "time/update", "time/data"],
    "tokens/s": ["time/tokens_per_s"],
    "throughput": ["throughput/rollout_tokens_per_s_per_device", "throughput/train_tokens_per_s_per_device",
                   "throughput/tokens_per_s_per_device", "throughput/update_tflops_per_device",
                   "rollout/decode_steps"],
}


def test_jsonl_and_tensorboard_hold_the_issue_scalars(reference_run):
  w = reference_run[0] / "w"
  rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  rl_rows = [r for r in rows if r["stage"] == "rl"]
  assert [r["step"] for r in rl_rows] == [1, 2, 3]
  for family, keys in _RL_FAMILIES.items():
    for row in rl_rows:
      missing = [k for k in keys if k not in row]
      assert not missing, (family, missing)
      assert all(math.isfinite(row[k]) for k in keys), family
  for row in rl_rows:
    assert all(row[k] >= 0 for k in ("time/rollout", "time/scoring", "time/update", "time/data"))
    assert row["time/tokens_per_s"] > 0 and 0 <= row["clip_frac_low"] <= 1 and row["kl"] >= -1e-6
    assert min(row[k] for k in _RL_FAMILIES["throughput"]) > 0
    # One loop for both modes: as many decode steps as the longer budget at most (smoke: 16 slow, 6 fast).
    assert row["rollout/decode_steps"] <= 16
    # The CPU has no peak figures unless the config gives them: no MFU, no roofline fraction (not guessed).
    assert "throughput/update_mfu" not in row and "throughput/rollout_roofline_frac" not in row
  assert {r["step"] for r in rows if r["stage"] == "sft"} == {1, 2} and all("loss" in r for r in rows
                                                                           if r["stage"] == "sft")
  # TensorBoard: the same scalars, under "<stage>/<key>", one point per logged step, equal to the JSONL's.
  tb = _tb_scalars(w / "tb")
  for key in sorted({k for keys in _RL_FAMILIES.values() for k in keys}):
    assert sorted(tb.get(f"rl/{key}", {})) == [1, 2, 3], key
    for row in rl_rows:
      assert tb[f"rl/{key}"][row["step"]] == pytest.approx(row[key], rel=1e-6, abs=1e-30), key
  assert sorted(tb["sft/loss"]) == [1, 2]
  assert any(tag.startswith("eval_rl/") for tag in tb)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resume_after_sigkill_is_bit_identical(kind, reference_run, tmp_path_factory, tmp_path):
  """SIGKILL right after RL step 1's checkpoint, then the same command: the run resumes from step 1 and its rows,
  train states (a LoRA stage: adapters only, and its base's fingerprint), rng keys and exports equal those of an
  uninterrupted run to the bit. The LoRA run has dropout on, so resuming draws the same masks too."""
  lora = kind == "lora"
  over = runs.LORA_RUN if lora else ()
  ref = runs.lora_reference(tmp_path_factory) if lora else reference_run[0] / "w"
  last = 2 if lora else 3
  w = tmp_path / "w"
  rc, out, _ = _train(w, tmp_path, *over, env_extra={"MERR1_SIGKILL_AT": "rl:1"})
  assert rc == -signal.SIGKILL, out[-3000:]
  assert [r["step"] for r in _rows(w)] == [1]
  # The checkpoint carries the stage's rng key (seed 0: RL's key is key(seed + 1)), exactly.
  rng = _ckpt_meta(w / "checkpoints" / "rl", 1)["rng"]
  assert rng is not None and rng["data"] == np.asarray(jax.random.key_data(jax.random.key(1))).tolist()
  rc, out, _ = _train(w, tmp_path, *over)
  assert rc == 0, out[-4000:]
  assert "rl: resumed from step 1" in out
  rows, ref_rows = _rows(w), _rows(ref)
  assert [r["step"] for r in rows] == list(range(1, last + 1))  # the resumed run dropped nothing, added none
  assert rows[1:] == ref_rows[1:]
  if lora:  # the probe ran after every step, on both runs (and rows[1:] compared its values)
    assert all(math.isfinite(r["probe/grad_cos"]) for r in rows + ref_rows)
  # The train states, read back from both runs' checkpoints: parameters, AdamW state, step, reference.
  for step in range(2, last + 1):
    got, want = _ckpt_state(w / "checkpoints" / "rl", step), _ckpt_state(ref / "checkpoints" / "rl", step)
    assert got.keys() == want.keys()
    for k in want:
      assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (step, k)
    assert _ckpt_meta(w / "checkpoints" / "rl", step)["rng"] == _ckpt_meta(ref / "checkpoints" / "rl", step)["rng"]
  params = [k for k in got if "params" in k]
  assert params and any("opt_state" in k and "mu" in k for k in got)
  exports = ("export",)
  if lora:
    assert all("lora_" in k for k in params)  # adapter-only: no base weight in the checkpoint
    meta = _ckpt_meta(w / "checkpoints" / "rl", last)["extra"]["lora_base"]
    assert meta == _ckpt_meta(ref / "checkpoints" / "rl", last)["extra"]["lora_base"]
    assert meta["source"] == "random init, seed 0" and len(meta["fingerprint"]) == 64
    exports += ("export_base", "export_peft")
    cfg = json.loads((ref / "export_peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(ref / "export_base")
  for d in exports:  # float32 exports of the final policy (and the LoRA base and adapter): bit-identical
    files = sorted(p.name for p in (ref / d).glob("*.safetensors"))
    assert files, d
    for name in files:
      assert (w / d / name).read_bytes() == (ref / d / name).read_bytes(), (d, name)


def test_a_crash_before_the_first_checkpoint_leaves_no_duplicate_rows(tmp_path):
  """A step's metrics row is written before its checkpoint commits: a crash there, before a stage has any
  checkpoint, used to leave rows that the rerun wrote again. The rerun truncates every stage it runs to its last
  committed step, "none yet" included, so each (stage, step) appears once; a stale row left by some earlier
  crash (the issue's repro: `sft 1, loss 123`) is dropped too."""
  w = tmp_path / "w"
  w.mkdir()
  (w / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 1, "loss": 123.0}) + "\n")
  # No checkpoint before a stage's last step; the SFT stage alone (the crash and the rows are SFT's).
  over = ("--config.checkpoint.every=1000", "--config.stages=('sft',)")
  rc, out, _ = _train(w, tmp_path, *over, env_extra={"MERR1_SIGKILL_AFTER_LOG": "sft:1"})
  assert rc == -signal.SIGKILL, out[-3000:]
  assert not (w / "checkpoints" / "sft").exists() or not any((w / "checkpoints" / "sft").iterdir())
  # The crashed run itself started by dropping the stale row (no checkpoint yet), then logged step 1 and died.
  assert [(r["step"], r["loss"] != 123.0) for r in _rows(w, "sft")] == [(1, True)]
  rc, out, _ = _train(w, tmp_path, *over)
  assert rc == 0, out[-3000:]
  rows = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
  keys = [(r["stage"], r["step"]) for r in rows]
  assert len(keys) == len(set(keys)), keys
  assert [s for st, s in keys if st == "sft"] == [1, 2] and not [s for st, s in keys if st == "rl"]
  assert all(r["loss"] != 123.0 for r in rows if r["stage"] == "sft")


def _flip_bytes(step_dir: pathlib.Path) -> str:
  """Overwrites eight bytes in the middle of the step's largest data file; returns the file relative to the step."""
  data = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + 8] = bytes(b ^ 0xFF for b in raw[mid:mid + 8])
  data.write_bytes(bytes(raw))
  return data.relative_to(step_dir).as_posix()


def test_a_damaged_final_checkpoint_is_named_and_the_run_falls_back_bit_identically(reference_run, tmp_path):
  """A finished run whose last RL checkpoint has eight flipped bytes (the issue: exit 0, unnoticed) and whose
  metrics.jsonl ends in a torn line (the issue: a JSONDecodeError until removed by hand). evaluate names the
  damaged step and the good ones; the rerun names it in one line, falls back to step 2 (state, data position and
  rng from step 2), drops the torn line, keeps the damaged step as 3.damaged and ends bit-identical to the
  uninterrupted run."""
  from merr1_jax.training import policy_io  # noqa: PLC0415

  ref = reference_run[0] / "w"
  w = tmp_path / "w"
  shutil.copytree(ref, w)
  rl = w / "checkpoints" / "rl"
  assert sorted(p.name for p in rl.iterdir()) == ["2", "3"]
  rel = _flip_bytes(rl / "3")
  what = f"checkpoint {rl}/3: {rel}: SHA-256 differs from the manifest (contents changed)"
  with pytest.raises(policy_io.EvalError) as err:
    policy_io.load_policy(cfglib.load(SMOKE), w, None)
  assert str(err.value) == f"{what}; good checkpoints: rl:2, sft:2, sft:1 (pass one with --checkpoint)"
  rows_before = (w / "metrics.jsonl").read_text()
  torn = '{"stage": "rl", "step": 4, "loss": 0.12'
  (w / "metrics.jsonl").write_text(rows_before + torn)
  rc, out, _ = _train(w, tmp_path)
  assert rc == 0, out[-4000:]
  assert f"{what}; the stage runs again from its newest good step" in out
  assert f"{what}; falling back to step 2" in out
  assert "rl: resumed from step 2" in out
  n_lines = len(rows_before.splitlines()) + 1
  assert f"{w / 'metrics.jsonl'}: line {n_lines} is torn" in out
  # The damaged step is kept, whole, beside the new one.
  assert sorted(p.name for p in rl.iterdir()) == ["2", "3", "3.damaged"]
  assert (rl / "3.damaged" / rel).read_bytes() != (ref / "checkpoints" / "rl" / "3" / rel).read_bytes()
  rows, ref_rows = _rows(w), _rows(ref)
  assert [r["step"] for r in rows] == [1, 2, 3] and rows == ref_rows
  got, want = _ckpt_state(rl, 3), _ckpt_state(ref / "checkpoints" / "rl", 3)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
  assert _ckpt_meta(rl, 3)["rng"] == _ckpt_meta(ref / "checkpoints" / "rl", 3)["rng"]
  for path in sorted((ref / "export").glob("*.safetensors")):
    assert (w / "export" / path.name).read_bytes() == path.read_bytes()


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
  from merr1_jax.infra import observe  # noqa: PLC0415

  writer = observe.MetricsWriter(tmp_path, tensorboard=False)
  for stage, step in (("sft", 1), ("sft", 2), ("rl", 1), ("rl", 2)):
    writer.write(stage, step, {"loss": float(step)})
  path = tmp_path / "metrics.jsonl"
  whole = path.read_text()
  path.write_text(whole + '{"stage": "rl", "step": 3, "lo')  # the process died in the middle of an append
  with caplog.at_level("WARNING", logger="merr1_jax.infra.observe"):
    assert [(r["stage"], r["step"]) for r in observe.read_metrics(tmp_path)] == [
        ("sft", 1), ("sft", 2), ("rl", 1), ("rl", 2)]
    writer.truncate_after("rl", 1)
  assert path.read_text() == "".join(whole.splitlines(keepends=True)[:3])
  torn = [r.getMessage() for r in caplog.records]
  assert len(torn) == 2 and all(m.startswith(f"{path}: line 5 is torn (") and m.endswith("); dropped")
                                for m in torn), torn
  # Only the last line may be torn: a bad line before others is an error naming it.
  path.write_text('{"stage": "sft", "step": 1}\n{"stage": "sft", "st\n{"stage": "rl", "step": 1}\n')
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}, line 2: not JSON "):
    writer.truncate_after("rl", 0)
  path.write_text('{"stage": "sft", "step": 1}\n[1, 2]\n{"stage": "rl", "step": 1}\n')
  with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: expected a JSON object with a string 'stage'"):
    observe.read_metrics(tmp_path)
  writer.close()


def test_sigterm_checkpoints_and_exits_zero_then_continues(tmp_path):
  w = tmp_path / "w"
  # No cadence saves before the last step (12): a checkpoint below it can only come from the SIGTERM, which
  # lands at the first step boundary after the first RL row. RL alone, from the random init.
  over = ("--config.rl.steps=12", "--config.checkpoint.every=1000", "--config.stages=('rl',)")
  proc = _train(w, tmp_path, *over, wait=False)
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    if (w / "metrics.jsonl").exists() and '"stage": "rl"' in (w / "metrics.jsonl").read_text():
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the run ended before the test could signal it"
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "preempted (SIGTERM)" in out
  stopped = _rows(w)[-1]["step"]
  saved = sorted(int(p.name) for p in (w / "checkpoints" / "rl").iterdir() if p.name.isdigit())
  assert saved == [stopped] and stopped < 12, (saved, stopped)
  assert not (w / "results.json").exists()
  rc, out, _ = _train(w, tmp_path, *over)
  assert rc == 0, out[-3000:]
  assert f"rl: resumed from step {stopped}" in out
  assert [r["step"] for r in _rows(w)] == list(range(1, 13))


def test_incompatible_checkpoint_is_refused_unless_forced(reference_run, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(reference_run[0] / "w", w)
  saved_config = (w / "config.json").read_bytes()
  rc, out, _ = _train(w, tmp_path, "--config.rl.beta=0.5")
  assert rc == 2, out[-3000:]
  error = [line for line in out.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "Traceback" not in out, out[-3000:]
  assert "rl.beta: stored 0.04, now 0.5" in error[0] and "--config.resume=force" in error[0], error
  # Refused before the setup built anything: no dataset opened, and the workdir's config left as it was.
  assert "dataset_builder" not in out and (w / "config.json").read_bytes() == saved_config
  rc, out, _ = _train(w, tmp_path, "--config.rl.beta=0.5", "--config.resume=force")
  assert rc == 0, out[-3000:]


@pytest.mark.parametrize("change,field", [(lambda c: setattr(c.rl, "beta", 0.5), "rl.beta: stored 0.04, now 0.5"),
                                          (lambda c: setattr(c.sft, "learning_rate", 0.5), "sft.learning_rate")])
def test_incompatible_workdir_is_refused_before_anything_is_built(reference_run, tmp_path, monkeypatch, change,
                                                                  field):
  """In process, with jax.jit, the tokenizer, the dataset and the model builder made to fail: the workdir check
  of setup() runs before any of them, for the SFT and the RL checkpoints."""
  w = tmp_path / "w"
  shutil.copytree(reference_run[0] / "w" / "checkpoints", w / "checkpoints")
  config = _smoke()
  config.mesh.shape = (1, 1, -1)  # whatever the devices in this process (the mesh is not part of the check)
  change(config)

  def built(*args, **kwargs):
    raise AssertionError("something was built or compiled before the workdir check")

  monkeypatch.setattr(jax, "jit", built)
  monkeypatch.setattr(run_setup, "_tokenizer", built)
  monkeypatch.setattr(run_setup, "open_data", built)
  monkeypatch.setattr(run_setup.mllm, "build", built)
  with pytest.raises(cfglib.ConfigError) as e:
    run_setup.setup(config, w)
  assert field in str(e.value) and "--config.resume=force" in str(e.value), str(e.value)
  assert not (w / "config.json").exists()


_CRASHING_CONFIG = '''
def get_config(arg=None):
  raise RuntimeError("a bug in the config file")
'''


@pytest.mark.parametrize("args,expect", [
    (["--config", SMOKE + ":model=gpt5"], "unknown model preset 'gpt5'"),
    (["--config", SMOKE + ":mesh=v9"], "config arg mesh=v9: unknown mesh preset"),
    (["--config", SMOKE, "--config.mesh.shape=(3,1,1)"], "config.mesh.shape: mesh shape (3, 1, 1) needs 3 devices"),
    (["--config", SMOKE, "--config.rl.betta=0.1"], "--config.rl.betta=0.1: the config has no field 'rl.betta' "
                                                   "(did you mean 'beta'?)"),
    (["--config", SMOKE, "--config.rl.beta=abc"], "flag --config.rl.beta=abc: could not convert"),
    (["--config", SMOKE, "--config.log.every=0"], "config.log.every: must be an int >= 1, got 0"),
    (["--config", str(ROOT / "configs" / "nope.py")], "does not exist"),
])
def test_command_line_errors_are_one_line_and_exit_2(tmp_path, args, expect):
  proc = subprocess.run([sys.executable, "-m", "merr1_jax.train", *args, "--workdir", str(tmp_path / "w")],
                        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expect in last, proc.stderr[-3000:]
  assert not (tmp_path / "w").exists()  # nothing was written


def test_a_crash_in_a_config_file_keeps_its_traceback(tmp_path):
  bad = tmp_path / "crash.py"
  bad.write_text(_CRASHING_CONFIG)
  proc = subprocess.run([sys.executable, "-m", "merr1_jax.train", "--config", str(bad), "--workdir",
                         str(tmp_path / "w")], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode not in (0, 2) and "Traceback" in proc.stderr and "a bug in the config file" in proc.stderr
  assert "error: " not in proc.stderr


# --------------------------------------------------------------------------------------------- validate


def _smoke():
  return cfglib.load(SMOKE)


def _set(c, dotted, value):
  *parents, leaf = dotted.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.preset", "gpt5", "config.model.preset: 'gpt5'"),
        ("rl.micro_batches", 3, "config.rl.micro_batches: updates split prompts: prompts_per_step 2 is not divisible "
                                "by mini_batches x micro_batches = 3"),
        ("rl.mini_batches", 3, "config.rl.mini_batches: updates split prompts: prompts_per_step 2 is not divisible "
                               "by 3 mini-batches"),
        ("rl.ppo_epochs", 0, "config.rl.ppo_epochs: must be an int >= 1"),
        ("rl.aggregation", "mean", "config.rl.aggregation: 'mean'"),
        ("mesh.shape", (3, 1, 1), "config.mesh.shape: mesh shape (3, 1, 1) needs 3 devices but 2"),
        ("resume", "maybe", "config.resume: 'maybe'"),
        ("data.name", "mer_features", "config.data.records_dir"),
        # Typo-class values the audit found passing (each used to fail later, or never).
        ("log.every", 0, "config.log.every: must be an int >= 1, got 0"),
        ("checkpoint.export_dtype", "fp16", "config.checkpoint.export_dtype: 'fp16'"),
        ("data.synth_test", 0, "config.data.synth_test: must be an int >= 1, got 0"),
        ("eval.batch_size", 0, "config.eval.batch_size: must be an int >= 1, got 0"),
        ("sft.steps", -1, "config.sft.steps: must be an int >= 1, got -1"),
        ("eval.every", -5, "config.eval.every: must be an int >= 0, got -5"),
        ("data.prompt_buckets", (), "config.data.prompt_buckets: (): need a non-empty"),
        ("data.prompt_buckets", (128, 96), "config.data.prompt_buckets"),
        ("rl.top_p", 1.5, "config.rl.top_p: must be a finite number > 0.0 and <= 1.0, got 1.5"),
        ("rl.temperature", 0.0, "config.rl.temperature"),
        ("rl.dual_clip", 0.5, "config.rl.dual_clip: must be 0 (off) or a number > 1"),
        ("rl.eps_low", 1.0, "config.rl.eps_low"),
        ("rl.adv_ddof", 2, "config.rl.adv_ddof: 2"),
        ("rl.freeze", ("(unclosed",), "config.rl.freeze: '(unclosed' is not a valid regex"),
        ("optim.b2", 1.0, "config.optim.b2"),
        ("optim.schedule", "linear", "config.optim.schedule: 'linear'"),
        ("mesh.axis_rules", {"embed": "fsdpp"}, "config.mesh.axis_rules: 'embed' -> 'fsdpp'"),
        ("mesh.coordinator", "10.0.0.1", "config.mesh.coordinator: '10.0.0.1': expected host:port"),
        ("eval.format_version", "2024", "config.eval.format_version: '2024'"),
        ("eval.batch_size", 3, "config.eval.batch_size: 3 rows do not divide over the mesh's 2 batch shards"),
        ("data.tokenizer_dir", "/nonexistent/tokenizer", "config.data.tokenizer_dir: '/nonexistent/tokenizer' is "
                                                         "not a directory"),
        ("model.num_layers", 0, "config.model: ModelConfig.num_layers"),
        ("model.param_dtype", "fp8", "config.model: ModelConfig.param_dtype"),
    ],
)
def test_bad_configs_fail_before_anything_is_built(field, value, message):
  c = _smoke()
  if field == "mesh.axis_rules":
    c.mesh.axis_rules.embed = value["embed"]
  else:
    _set(c, field, value)
  with pytest.raises(cfglib.ConfigError) as e:
    settings.validate(c, num_devices=2)
  assert message in str(e.value), str(e.value)


def test_a_stage_is_resolved_once_from_the_config():
  """settings.stage decides each stage's meaning in one place: LoRA, freezing, the reference, dropout, the step
  and the optimizer's horizon (updates = steps x ppo_epochs x mini_batches in RL)."""
  c = _smoke()
  c.rl.beta, c.rl.ppo_epochs, c.rl.mini_batches, c.rl.freeze = 0.04, 2, 2, ("final_norm",)
  sft, rl_stage = settings.stages(c)
  assert (sft.name, sft.index, sft.steps, sft.lora, sft.with_reference) == ("sft", 0, c.sft.steps, False, False)
  assert sft.freeze == () and sft.step.beta == 0.0 and sft.optim.total_steps == c.sft.steps
  assert (rl_stage.name, rl_stage.index, rl_stage.with_reference, rl_stage.freeze) == ("rl", 1, True, ("final_norm",))
  assert rl_stage.step.beta == 0.04 and (rl_stage.step.ppo_epochs, rl_stage.step.mini_batches) == (2, 2)
  assert rl_stage.optim.total_steps == c.rl.steps * 4 and rl_stage.step.dropout_seed is None
  c.rl.beta = 0.0
  assert not settings.stage(c, "rl").with_reference
  c.model.lora_rank, c.model.lora_dropout, c.lora.stages = 4, 0.1, ("rl",)
  sft, rl_stage = settings.stages(c)
  assert not sft.lora and sft.freeze == (lora.ADAPTER.pattern,) and sft.step.dropout_seed is None
  assert rl_stage.lora and rl_stage.freeze == (lora.freeze_rule(c.lora.train_full), "final_norm")
  assert rl_stage.step.dropout_seed is not None
  c.stages = ("rl",)
  assert [s.name for s in settings.stages(c)] == ["rl"]


def test_cross_field_checks():
  c = _smoke()
  c.rl.n_slow, c.rl.n_fast = 1, 0
  with pytest.raises(cfglib.ConfigError, match=r"config\.rl\.n_slow: need n_slow \+ n_fast >= 2"):
    settings.validate(c)
  c = _smoke()
  c.rl.prompts_per_step, c.mesh.shape = 3, (2, 1, 1)
  with pytest.raises(cfglib.ConfigError, match=r"config\.rl\.prompts_per_step: 3 rows do not divide"):
    settings.validate(c, num_devices=2)
  c = _smoke()
  c.rl.n_slow, c.rl.calibration = 0, "contrastive_gain"
  with pytest.raises(cfglib.ConfigError, match=r"config\.rl\.calibration: contrastive_gain needs slow rollouts"):
    settings.validate(c)


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict) and k != "axis_rules":
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def test_every_field_has_a_rule():
  """Systematic: every field outside `model` (which ModelConfig checks) is checked by validate."""
  fields = {k for k, _ in _leaves(_smoke().to_dict()) if not k.startswith("model.") or k in ("model.preset",
                                                                                            "model.hf_path")}
  assert fields == set(cfglib._FIELD_RULES), fields ^ set(cfglib._FIELD_RULES)


# Fields with no typo-class value: any path (only used when written to / read), and an empty tuple of regexes or
# of axis rules is valid.
_FREE_FIELDS = {"workdir", "data.data_dir", "data.records_dir", "rl.freeze", "mesh.axis_rules"}


@pytest.mark.parametrize("field", sorted(set(cfglib._FIELD_RULES) - _FREE_FIELDS))
def test_every_field_refuses_a_typo_class_value(field):
  """Per field, a value of its own type that no run can use: -10**6 for ints, NaN for floats, 'bogus' for
  strings, () for tuples. Each must fail validate() with a message that names the field."""
  c = _smoke()
  default = dict(_leaves(c.to_dict()))[field]
  # Booleans: ConfigDict refuses other types, but not None.
  bad = None if isinstance(default, bool) else {int: -10**6, float: float("nan"), str: "bogus", tuple: ()}[
      type(default)]
  _set(c, field, bad)
  with pytest.raises(cfglib.ConfigError, match=f"^config\\.{field.replace('.', '[.]')}: "):
    settings.validate(c, num_devices=1)


@pytest.mark.parametrize("field", sorted(cfglib._FIELD_RULES))
def test_every_field_refuses_none(field):
  """ConfigDict lets any field be set to None (`--config.rl.steps=None` too); no field accepts it."""
  c = _smoke()
  _set(c, field, None)
  with pytest.raises(cfglib.ConfigError, match=f"^config\\.{field.replace('.', '[.]')}: "):
    settings.validate(c, num_devices=1)


def test_unknown_preset_in_config_arg():
  with pytest.raises(cfglib.ConfigError, match="unknown model preset 'gpt5'"):
    cfglib.load(SMOKE + ":model=gpt5")
  with pytest.raises(cfglib.ConfigError, match="expected model=PRESET, data=NAME, mesh=NAME or ablation=ROW"):
    cfglib.load(SMOKE + ":foo=bar")
  with pytest.raises(cfglib.ConfigError, match="config arg data=mer: unknown dataset"):
    cfglib.load(SMOKE + ":data=mer")


def test_default_config_validates(tmp_path):
  settings.validate(cfglib.load(BASE), num_devices=1, device_memory_gb=16.0)
  real = cfglib.load(BASE + ":model=qwen2_5_omni_7b_thinker")
  real.model.hf_path = str(tmp_path)
  assert tuple(real.mesh.shape) == (1, -1, 1)  # a real model shards its parameters by default
  assert settings.tokenizer_dir(real) == str(tmp_path)  # and reads its tokenizer from the checkpoint
  settings.validate(real, 8, 80.0)


# ------------------------------------------------------------------------------------ recipes and memory


def test_param_count_matches_the_models_abstract_parameters():
  for name, kw in (("tiny", {"vocab_size": 1024}), ("qwen2_5_omni_7b_thinker", {}),
                   ("qwen2_5_omni_3b_thinker", {})):
    mc = presets.get(name, **kw)
    leaves = jax.tree.leaves(mllm.build(mc).abstract_params())
    assert memory.param_count(mc) == sum(int(np.prod(x.shape)) for x in leaves), name


def test_state_memory_estimate_is_the_scaling_doc_arithmetic():
  """docs/scaling.md, per parameter: bf16 weights 2 B + AdamW moments 2 x 2 B + a gradient 2 B (+ 4 B float32
  accumulators with micro-batches) + the bf16 reference 2 B."""
  mc = presets.get("qwen2_5_omni_7b_thinker")
  n = memory.param_count(mc)
  gb = lambda m, **kw: memory.state_gb_per_device(m, **kw)  # noqa: E731
  assert gb(mc, with_reference=True, micro_batches=1, model_shards=1) == pytest.approx(n * 10 / 1e9)
  assert gb(mc, with_reference=True, micro_batches=8, model_shards=8) == pytest.approx(n * 14 / 8e9)
  assert gb(mc, with_reference=False, micro_batches=1, model_shards=8) == pytest.approx(n * 8 / 8e9)
  assert gb(mc.replace(param_dtype="float32"), with_reference=True, micro_batches=1,
            model_shards=4) == pytest.approx(n * 18 / 4e9)


@pytest.mark.parametrize("mesh,devices,shape,memory", [("gpu8", 8, (1, 8, 1), 80.0), ("v5p8", 4, (1, 4, 1), 95.0),
                                                       ("v4_32", 16, (1, 16, 1), 32.0)])
def test_mesh_presets_fit_the_7b_thinker(tmp_path, mesh, devices, shape, memory):
  c = cfglib.load(f"{BASE}:model=qwen2_5_omni_7b_thinker,data=mer_features,mesh={mesh}")
  c.model.hf_path = c.data.records_dir = str(tmp_path)
  assert tuple(c.mesh.shape) == shape and c.mesh.device_memory_gb == memory
  settings.validate(c, devices)
  with pytest.raises(cfglib.ConfigError, match=rf"config\.mesh\.shape: mesh shape {re.escape(str(shape))} needs "
                                               rf"{devices} devices but {devices * 2}"):
    settings.validate(c, devices * 2)


def test_replicating_a_real_model_that_cannot_fit_is_refused(tmp_path):
  c = cfglib.load(f"{BASE}:model=qwen2_5_omni_7b_thinker")
  c.model.hf_path = str(tmp_path)
  c.mesh.shape = (-1, 1, 1)  # the embedded default: every device holds the whole train state
  # With micro-batches the RL state holds float32 gradient accumulators: 7.62e9 x 14 B = 106.6 GB.
  c.rl.micro_batches, c.rl.prompts_per_step = 8, 64  # each micro-batch's 8 prompts over the 8 batch shards
  with pytest.raises(cfglib.ConfigError, match=r"config\.mesh\.shape: mesh \(8, 1, 1\) splits the parameters 1 "
                                               r"way\(s\): the rl train state .*needs 106\.6 GB per device.*80 GB"):
    settings.validate(c, 8, 80.0)
  c.rl.micro_batches = 1  # the recipe's own (a whole group per device): no accumulators, 7.62e9 x 10 B
  with pytest.raises(cfglib.ConfigError, match=r"needs 76\.2 GB per device, more than 75% of the 80 GB"):
    settings.validate(c, 8, 80.0)
  c.mesh.device_memory_gb = 141.0  # an H200 holds that (76 GB <= 75% of 141 GB)
  settings.validate(c, 8, 80.0)
  c.mesh.device_memory_gb = 0.0  # unknown memory (CPU): not checked
  settings.validate(c, 8)


def test_a_real_model_needs_a_tokenizer(tmp_path):
  c = cfglib.load(f"{BASE}:model=qwen2_5_omni_3b_thinker")
  with pytest.raises(cfglib.ConfigError, match=r"config\.data\.tokenizer_dir: model 'qwen2_5_omni_3b_thinker'.*"
                                               r"needs a HF tokenizer"):
    settings.validate(c)
  c.data.tokenizer_dir = str(tmp_path)
  settings.validate(c)
  assert settings.tokenizer_dir(cfglib.load(BASE)) == ""  # the embedded model builds the MER-Synth one


def test_evaluate_cli_reproduces_the_trainers_final_table(reference_run, tmp_path):
  """`python -m merr1_jax.evaluate` on the final checkpoint gives exactly the trainer's final eval numbers, and
  the report's fast-vs-slow analysis is consistent with its per-sample JSONL."""
  w = reference_run[0] / "w"
  out_dir = tmp_path / "eval"
  proc = subprocess.run([sys.executable, "-m", "merr1_jax.evaluate", "--config", SMOKE, "--workdir", str(w),
                         "--out", str(out_dir), "--no_progress"], cwd=ROOT, env=_env(tmp_path),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((out_dir / "report.json").read_text())["datasets"]["mer_synth"]
  trainer = json.loads((w / "eval_rl.json").read_text())["summary"]["mer_synth"]
  for mode in ("fast", "slow"):
    for key in ("precision", "recall", "f", "format_failure_rate", "mean_num_emotions"):
      assert report["summary"][mode][key] == trainer[mode][key], (mode, key)
  # Recompute the paired slow-minus-fast differences from samples.jsonl.
  samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
  by_id = {}
  for s in samples:
    by_id.setdefault(s["id"], {})[s["mode"]] = s
  for key in ("precision", "recall"):
    diffs = [m["slow"][key] - m["fast"][key] for m in by_id.values()
             if m["slow"][key] is not None and m["fast"][key] is not None]
    got = report["analysis"]["fast_vs_slow"][key]
    assert got["n"] == len(diffs) > 0
    assert got["slow_minus_fast"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
  results_md = (w / "results.md").read_text()
  assert "slow - fast precision" in results_md
