"""The trainer end to end on configs/smoke.py, in subprocesses: no network, exact resume after SIGKILL,
SIGTERM preemption, config validation and incompatible-checkpoint refusal."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from merr1_jax import config as cfglib

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs" / "smoke.py")

# Installed into the child's sys.path: any connection to a non-loopback address fails and is recorded.
_NO_NETWORK = '''
import os, socket
_log = os.environ["MERR1_NETLOG"]
_orig = socket.socket.connect
def _guard(self, address):
    host = address[0] if isinstance(address, tuple) else str(address)
    if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
        with open(_log, "a") as f:
            f.write(repr(address) + "\\n")
        raise OSError("network disabled by the test")
    return _orig(self, address)
socket.socket.connect = _guard
socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(OSError("network disabled by the test"))
'''


def _env(tmp: pathlib.Path, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XLA_FLAGS"))}
  guard = tmp / "guard"
  guard.mkdir(exist_ok=True)
  (guard / "sitecustomize.py").write_text(_NO_NETWORK)
  env.update(
      PYTHONPATH=os.pathsep.join([str(guard), str(ROOT)]), MERR1_NETLOG=str(tmp / "net.log"),
      HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
      JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
      **extra)
  return env


def _train(workdir, tmp, *overrides, env_extra=None, wait=True):
  cmd = [sys.executable, "-m", "merr1_jax.train", "--config", SMOKE, "--workdir", str(workdir), *overrides]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tmp, **(env_extra or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out


def _rl_rows(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: {k: v for k, v in r.items() if not k.startswith("time/")} for r in rows if r["stage"] == "rl"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted smoke run with the network disabled and a clean HF_HOME."""
  tmp = tmp_path_factory.mktemp("ref")
  rc, out = _train(tmp / "w", tmp)
  assert rc == 0, out[-4000:]
  return tmp


def test_smoke_run_needs_no_network(reference_run):
  w = reference_run / "w"
  assert not (reference_run / "net.log").exists(), (reference_run / "net.log").read_text()
  results = json.loads((w / "results.json").read_text())
  for stage in ("sft", "rl"):
    for mode in ("fast", "slow"):
      assert set(results[stage][mode]) == {"precision", "recall", "f"}
      assert all(0.0 <= v <= 1.0 for v in results[stage][mode].values())
  assert sorted(_rl_rows(w)) == [1, 2, 3]
  assert (w / "export" / "config.json").exists() and (w / "results.md").exists()
  assert (w / "plots" / "rl.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_sigkill_is_bit_identical(reference_run, tmp_path):
  w = tmp_path / "w"
  rc, out = _train(w, tmp_path, env_extra={"MERR1_SIGKILL_AT": "rl:1"})
  assert rc == -signal.SIGKILL, out[-3000:]
  assert sorted(_rl_rows(w)) == [1]
  rc, out = _train(w, tmp_path)
  assert rc == 0, out[-4000:]
  ref = reference_run / "w"
  assert _rl_rows(w)[2] == _rl_rows(ref)[2] and _rl_rows(w)[3] == _rl_rows(ref)[3]
  files = sorted(p.name for p in (ref / "export").glob("*.safetensors"))
  assert files
  for name in files:  # float32 export of the final policy: bit-identical
    assert (w / "export" / name).read_bytes() == (ref / "export" / name).read_bytes()


def test_sigterm_checkpoints_and_exits_zero_then_continues(tmp_path):
  w = tmp_path / "w"
  proc = _train(w, tmp_path, "--config.rl.steps=40", wait=False)
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    if (w / "metrics.jsonl").exists() and '"stage": "rl"' in (w / "metrics.jsonl").read_text():
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  saved = sorted(int(p.name) for p in (w / "checkpoints" / "rl").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < 40
  assert not (w / "results.json").exists()
  rc, out = _train(w, tmp_path, "--config.rl.steps=40")
  assert rc == 0, out[-3000:]
  assert sorted(_rl_rows(w)) == list(range(1, 41))


def test_incompatible_checkpoint_is_refused_unless_forced(reference_run, tmp_path):
  import shutil
  w = tmp_path / "w"
  shutil.copytree(reference_run / "w", w)
  rc, out = _train(w, tmp_path, "--config.rl.beta=0.5")
  assert rc != 0 and "rl.beta" in out, out[-3000:]
  rc, out = _train(w, tmp_path, "--config.rl.beta=0.5", "--config.resume=force")
  assert rc == 0, out[-3000:]


def _smoke():
  return cfglib.load(SMOKE)


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda c: setattr(c.model, "preset", "gpt5"), "model.preset"),
        (lambda c: setattr(c.rl, "micro_batches", 3), "rl.micro_batches"),
        (lambda c: setattr(c.rl, "n_slow", 1) or setattr(c.rl, "n_fast", 0), "rl.n_slow"),
        (lambda c: setattr(c.rl, "aggregation", "mean"), "rl.aggregation"),
        (lambda c: setattr(c.mesh, "shape", (3, 1, 1)), "mesh.shape"),
        (lambda c: setattr(c.rl, "prompts_per_step", 3) or setattr(c.mesh, "shape", (2, 1, 1)),
         "rl.prompts_per_step"),
        (lambda c: setattr(c, "resume", "maybe"), "resume"),
        (lambda c: setattr(c.data, "name", "mer_features"), "data.records_dir"),
    ],
)
def test_bad_configs_fail_before_anything_is_built(change, field):
  c = _smoke()
  change(c)
  with pytest.raises(cfglib.ConfigError, match=field.replace(".", r"\.")):
    cfglib.validate(c, num_devices=2)


def test_unknown_preset_in_config_arg():
  with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
    cfglib.load(SMOKE + ":model=gpt5")
  with pytest.raises(ValueError, match="expected model=PRESET"):
    cfglib.load(SMOKE + ":foo=bar")


def test_config_typos_fail_loudly(tmp_path):
  out = subprocess.run([sys.executable, "-m", "merr1_jax.train", "--config", SMOKE, "--workdir", str(tmp_path),
                        "--config.rl.betta=0.1"], cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0 and "betta" in out.stderr + out.stdout
  assert not (tmp_path / "checkpoints").exists()


def test_default_config_validates():
  cfglib.validate(cfglib.load(str(ROOT / "configs" / "base.py")), num_devices=1)
  cfglib.validate(cfglib.load(str(ROOT / "configs" / "base.py") + ":model=qwen2_5_omni_7b_thinker"), 8)


def test_evaluate_cli_reproduces_the_trainers_final_table(reference_run, tmp_path):
  """`python -m merr1_jax.evaluate` on the final checkpoint gives exactly the trainer's final eval numbers, and
  the report's fast-vs-slow analysis is consistent with its per-sample JSONL."""
  w = reference_run / "w"
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
