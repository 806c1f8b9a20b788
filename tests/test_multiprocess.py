"""Multi-host: two local processes (jax.distributed over 127.0.0.1, gloo collectives) run 2 data-parallel RL steps
and end with the same parameters as one process running the same steps; and ``sharding.init_distributed`` picks
the right ``jax.distributed.initialize`` call for explicit flags, the MERR1_* environment, TPU pods, SLURM and
Open MPI (with ``initialize`` replaced by a recorder).

The single-process reference runs first, inside the test process on one device, and only then the 2-process pair:
running all three at once overloaded 2-core machines. The subprocess timeout is generous on purpose: under load
the pair is slow, not wrong.
"""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from merr1_jax.infra import sharding
from tests.helpers.xla import COMPILE_FAST

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 900


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=1 {COMPILE_FAST}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _helper():
  spec = importlib.util.spec_from_file_location("rl_steps_helper", ROOT / "tests" / "helpers" / "rl_steps.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_two_processes_equal_one(tmp_path):
  one = _helper().run(devices=jax.devices()[:1])  # the reference, before the pair starts
  port = _free_port()
  cmd = [sys.executable, "-m", "tests.helpers.rl_steps", str(tmp_path / "multi.npz"), str(port), "2"]
  procs = [subprocess.Popen(cmd + [str(i)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  try:
    for i, p in enumerate(procs):
      out, _ = p.communicate(timeout=TIMEOUT_S)
      assert p.returncode == 0, f"process {i}:\n{out}"
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  multi = np.load(tmp_path / "multi.npz")
  assert sorted(multi.files) == sorted(one) and len(one) > 5
  for k, v in one.items():
    np.testing.assert_allclose(multi[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------------------ init_distributed

_CLUSTER_ENV = ("MERR1_COORDINATOR", "MERR1_NUM_PROCESSES", "MERR1_PROCESS_ID", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
AUTO = ((), {})  # jax.distributed.initialize() with no arguments: JAX's own cluster detection
EXPLICIT = ((), dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2))


@pytest.fixture
def initialize_calls(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  for key in _CLUSTER_ENV:
    monkeypatch.delenv(key, raising=False)
  return calls


@pytest.mark.parametrize("env,kwargs,want", [
    ({}, {}, None),  # one machine, one process
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}, {}, AUTO),  # TPU pod slice
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, {}, None),  # single-host TPU VM (a v5p-8)
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, {}, AUTO),  # multi-slice
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, {}, AUTO),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, {}, None),  # a one-task SLURM job is one process
    ({"OMPI_COMM_WORLD_SIZE": "4"}, {}, AUTO),
    ({}, dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2), EXPLICIT),
    ({"MERR1_COORDINATOR": "10.0.0.1:1234", "MERR1_NUM_PROCESSES": "4", "MERR1_PROCESS_ID": "2"}, {}, EXPLICIT),
    # Explicit settings win over cluster detection, and flags over the environment.
    ({"MERR1_COORDINATOR": "10.0.0.1:1234", "MERR1_NUM_PROCESSES": "4", "MERR1_PROCESS_ID": "2",
      "SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, {}, EXPLICIT),
    ({"MERR1_COORDINATOR": "other:1", "MERR1_NUM_PROCESSES": "9", "MERR1_PROCESS_ID": "9"},
     dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2), EXPLICIT),
])
def test_init_distributed_calls(initialize_calls, monkeypatch, env, kwargs, want):
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  started = sharding.init_distributed(**kwargs)
  assert started == (want is not None)
  assert initialize_calls == ([] if want is None else [want])


def test_init_distributed_explicit_coordinator_needs_ranks(initialize_calls, monkeypatch):
  monkeypatch.setenv("MERR1_COORDINATOR", "10.0.0.1:1234")
  with pytest.raises(ValueError, match="needs num_processes and process_id"):
    sharding.init_distributed()
  assert initialize_calls == []
