"""launch/: the local N-process launcher (real processes, a stand-in interpreter), the TPU pod and SLURM scripts
(syntax, DRY_RUN command lines parsed back with shlex), and a 2-process trainer run on the smoke config."""

import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.xla import COMPILE_FAST

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
TRAIN_ARGS = ["--config", "configs/smoke.py", "--workdir", "/runs/a b", "--config.mesh.shape=(1,4,1)",
              "--config.rl.beta=0.5", "--config.note=it's"]

# Stands in for the interpreter: records its argv and the launcher's environment, then behaves as FAKE_MODE says
# ('ok', or 'fail:ID:RC': process ID exits RC at once while the others sleep, as peers blocked in a collective).
_FAKE = """#!{python}
import json, os, sys, time
pid = os.environ.get("MERR1_PROCESS_ID", "x")
keys = ("MERR1_COORDINATOR", "MERR1_NUM_PROCESSES", "MERR1_PROCESS_ID", "XLA_FLAGS", "JAX_PLATFORMS")
with open(os.path.join(os.environ["FAKE_OUT"], "p" + pid + ".json"), "w") as f:
  json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}, "pid": os.getpid()}}, f)
mode = os.environ.get("FAKE_MODE", "ok")
if mode.startswith("fail:"):
  _, bad, rc = mode.split(":")
  if pid == bad:  # fail once every peer has started (and recorded itself)
    n = int(os.environ["MERR1_NUM_PROCESSES"])
    peers = [os.path.join(os.environ["FAKE_OUT"], "p%d.json" % i) for i in range(n)]
    deadline = time.time() + 20
    while not all(map(os.path.exists, peers)) and time.time() < deadline:
      time.sleep(0.05)
    sys.exit(int(rc))
  time.sleep(60)
  open(os.path.join(os.environ["FAKE_OUT"], "p" + pid + ".finished"), "w").close()
"""


@pytest.fixture
def fake_python(tmp_path):
  exe = tmp_path / "fake_python"
  exe.write_text(_FAKE.format(python=sys.executable))
  exe.chmod(0o755)
  out = tmp_path / "out"
  out.mkdir()
  return exe, out


def _run(cmd, env_extra=None, timeout=60):
  """Runs a launcher in its own process group, so that a timeout can stop everything it started."""
  env = {**os.environ, **(env_extra or {})}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    raise AssertionError(f"{cmd[0]} timed out after {timeout}s:\n{out[-4000:]}")
  return proc.returncode, out


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "tpu_pod.sh", "gpu_slurm.sh"])
def test_scripts_parse(script):
  out = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert os.access(LAUNCH / script, os.X_OK)


def test_local_launcher_gives_each_process_its_rank_and_waits_for_all(fake_python):
  exe, out = fake_python
  rc, log = _run([str(LAUNCH / "local_multiprocess.sh"), "3", *TRAIN_ARGS],
                 {"PYTHON": str(exe), "FAKE_OUT": str(out), "MERR1_PORT": "45678",
                  "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"})
  assert rc == 0, log
  assert "all 3 processes exited 0" in log
  for i in range(3):
    rec = json.loads((out / f"p{i}.json").read_text())
    assert rec["argv"] == ["-m", "merr1_jax.train", *TRAIN_ARGS]
    env = rec["env"]
    assert (env["MERR1_COORDINATOR"], env["MERR1_NUM_PROCESSES"], env["MERR1_PROCESS_ID"]) == (
        "127.0.0.1:45678", "3", str(i))
    assert env["JAX_PLATFORMS"] == "cpu"
    # The caller's device count (pytest's 8) is replaced by one device per process; other flags stay.
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_enable_fast_math=false",
                                        "--xla_force_host_platform_device_count=1"]


def test_local_launcher_fails_when_one_process_fails_and_stops_the_rest(fake_python):
  exe, out = fake_python
  t0 = time.time()
  rc, log = _run([str(LAUNCH / "local_multiprocess.sh"), "3", "--workdir", "/tmp/x"],
                 {"PYTHON": str(exe), "FAKE_OUT": str(out), "MERR1_PORT": "45679", "FAKE_MODE": "fail:1:3"})
  assert rc == 3, log
  assert time.time() - t0 < 30  # did not wait for the sleeping peers
  assert "exited with status 3" in log and "FAILED" in log
  peers = [json.loads((out / f"p{i}.json").read_text())["pid"] for i in (0, 2)]
  assert not any(_alive(p) for p in peers)
  assert not list(out.glob("*.finished"))


def test_local_launcher_rejects_a_bad_process_count():
  for bad in ([], ["0"], ["two"]):
    rc, log = _run([str(LAUNCH / "local_multiprocess.sh"), *bad])
    assert rc == 2 and "usage" in log, (bad, log)


def test_local_launcher_dry_run_prints_one_command_per_process():
  rc, log = _run([str(LAUNCH / "local_multiprocess.sh"), "2", *TRAIN_ARGS],
                 {"DRY_RUN": "1", "MERR1_PORT": "41000", "PYTHON": "python3"})
  assert rc == 0, log
  lines = log.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    words = shlex.split(line)
    assert words[:3] == ["cd", str(ROOT), "&&"]
    assert f"MERR1_PROCESS_ID={i}" in words and "MERR1_NUM_PROCESSES=2" in words
    assert "MERR1_COORDINATOR=127.0.0.1:41000" in words
    assert words[-len(TRAIN_ARGS) - 3:] == ["python3", "-m", "merr1_jax.train", *TRAIN_ARGS]


def _tpu(*args, **env):
  return _run([str(LAUNCH / "tpu_pod.sh"), *args], {"DRY_RUN": "1", "TPU_NAME": "pod", "ZONE": "us-east5-a", **env})


def test_tpu_pod_dry_run_runs_the_same_command_on_every_worker():
  rc, log = _tpu("train", *TRAIN_ARGS, NUM_WORKERS="4", COORDINATOR_IP="10.0.0.2", PROJECT="proj")
  assert rc == 0, log
  (line,) = log.strip().splitlines()
  words = shlex.split(line)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in words and words[words.index("--zone") + 1] == "us-east5-a"
  assert words[words.index("--project") + 1] == "proj"
  remote = words[words.index("--command") + 1]
  assert "MERR1_COORDINATOR=10.0.0.2:8476" in remote and "MERR1_NUM_PROCESSES=4" in remote
  assert "agent-worker-number" in remote  # each worker's rank comes from its own metadata server
  # The remote shell sees exactly our arguments, however they are quoted.
  remote_words = shlex.split(remote)
  assert remote_words[-len(TRAIN_ARGS) - 3:] == [".venv/bin/python", "-m", "merr1_jax.train", *TRAIN_ARGS]

  rc, log = _tpu("train", "--workdir", "/w", NUM_WORKERS="1")  # one host: no coordinator needed
  assert rc == 0 and "MERR1_" not in log, log


def test_tpu_pod_dry_run_setup_stop_and_missing_settings():
  rc, log = _tpu("setup")
  assert rc == 0, log
  lines = [shlex.split(line) for line in log.strip().splitlines()]
  assert [w[0] for w in lines] == ["tar", "gcloud", "gcloud"]
  assert "scp" in lines[1] and "--worker=all" in lines[2]
  assert "'jax[tpu]>=0.10.2,<0.13'" in lines[2][lines[2].index("--command") + 1]
  rc, log = _tpu("stop")
  assert rc == 0 and "kill -TERM" in log, log
  rc, log = _run([str(LAUNCH / "tpu_pod.sh"), "train", "--workdir", "/w"], {"DRY_RUN": "1", "ZONE": "z",
                                                                            "TPU_NAME": ""})
  assert rc != 0 and "TPU_NAME" in log, log
  rc, log = _tpu("fly")
  assert rc == 2 and "usage" in log, log


def _slurm(per, *args):
  env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  env.update(DRY_RUN="1", PER=per, PYTHON="/venv/bin/python")
  return subprocess.run(["bash", str(LAUNCH / "gpu_slurm.sh"), *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=30)


def test_slurm_dry_run_one_process_per_gpu_is_auto_detected():
  out = _slurm("gpu", *TRAIN_ARGS)
  assert out.returncode == 0, out.stderr
  words = shlex.split(out.stdout)
  assert words[0] == "srun" and "--ntasks-per-node=8" in words and "--nodes=2" in words
  assert not any(w.startswith("--gpus-per-task") for w in words)  # each task must see every GPU of its node
  assert words[-len(TRAIN_ARGS) - 3:] == ["/venv/bin/python", "-m", "merr1_jax.train", *TRAIN_ARGS]
  assert "MERR1_" not in out.stdout  # jax.distributed reads SLURM_* itself


def test_slurm_one_process_per_node_sets_ranks_inside_each_task(fake_python):
  exe, out_dir = fake_python
  out = _slurm("node", *TRAIN_ARGS)
  assert out.returncode == 0, out.stderr
  words = shlex.split(out.stdout)
  assert words[0] == "srun" and "--ntasks-per-node=1" in words
  # Run what srun would start in task 1, with the stand-in interpreter.
  task = words[words.index("bash"):]
  task[task.index("/venv/bin/python")] = str(exe)
  env = {**os.environ, "SLURM_PROCID": "1", "FAKE_OUT": str(out_dir)}
  done = subprocess.run(task, env=env, capture_output=True, text=True, timeout=30)
  assert done.returncode == 0, done.stderr
  rec = json.loads((out_dir / "p1.json").read_text())
  assert rec["argv"] == ["-m", "merr1_jax.train", *TRAIN_ARGS]
  assert rec["env"]["MERR1_NUM_PROCESSES"] == "2" and rec["env"]["MERR1_COORDINATOR"].startswith("NODE0:")


def test_slurm_rejects_an_unknown_mode():
  out = _slurm("socket", "--workdir", "/w")
  assert out.returncode == 2 and "PER must be" in out.stderr


def test_two_process_smoke_training_run(tmp_path):
  """SFT (each process its rows), evaluation and RL (every process the global batch, rollouts split over the
  two processes' devices) to the end: about 70 s on two busy cores once the compilation cache is warm."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XLA_FLAGS"))}
  # Every program is cached, the many small ones of the host-side reward code too: each process compiles all
  # of them, so on two cores they cost more than in a one-process run.
  env.update(HF_HUB_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS=COMPILE_FAST)
  work = tmp_path / "w"
  cmd = [str(LAUNCH / "local_multiprocess.sh"), "2", "--config", "configs/smoke.py", "--workdir", str(work),
         "--config.rl.prompts_per_step=2", "--config.rl.steps=2", "--config.sft.steps=2"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=240)  # only stops a hung run; a loaded machine can take twice as long
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # a failed process can leave its peer waiting in a collective
    out, _ = proc.communicate()
  assert proc.returncode == 0, out[-4000:]
  assert "[p0]" in out and "[p1]" in out
  assert "all 2 processes exited 0" in out
  results = json.loads((work / "results.json").read_text())
  assert set(results) == {"sft", "rl"} and all(set(v) == {"fast", "slow", "skipped"} for v in results.values())
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [(r["stage"], r["step"]) for r in rows if r["stage"] in ("sft", "rl")] == [
      ("sft", 1), ("sft", 2), ("rl", 1), ("rl", 2)]  # process 0 alone writes the logs
  assert all(math.isfinite(r["loss"]) for r in rows if r["stage"] in ("sft", "rl"))
  assert (work / "checkpoints" / "rl" / "2").is_dir() and (work / "export" / "model.safetensors").is_file()
