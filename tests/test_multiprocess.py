"""Two local processes (jax.distributed over 127.0.0.1, gloo collectives) run 2 data-parallel RL steps and end
with the same parameters as one process running the same steps."""

import os
import socket
import subprocess
import sys
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_two_processes_equal_one(tmp_path):
  port = _free_port()
  cmd = [sys.executable, "-m", "tests.helpers.rl_steps"]
  procs = [subprocess.Popen(cmd + [str(tmp_path / "multi.npz"), str(port), "2", str(i)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  single = subprocess.run(cmd + [str(tmp_path / "single.npz")], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=120)
  assert single.returncode == 0, single.stdout + single.stderr
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
  multi, one = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
  assert sorted(multi.files) == sorted(one.files) and len(one.files) > 5
  for k in one.files:
    np.testing.assert_allclose(multi[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
