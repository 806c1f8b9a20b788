"""Running the trainer as a child process in tests: the configs, an environment without network access (a
sitecustomize guard that records and refuses every non-local lookup or connection), and readers of what a run
wrote (metrics rows, checkpoint states and metadata)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from tests.helpers.xla import COMPILE_FAST

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
SMOKE = str(ROOT / "configs" / "smoke.py")
BASE = str(ROOT / "configs" / "base.py")

# Installed as the child's sitecustomize: it records that it loaded (the canary), then refuses and records every
# name lookup of, and connection to, a host that is not this machine.
_NO_NETWORK = '''
import os, socket
with open(os.environ["MERR1_GUARD_MARK"], "a") as f:
    f.write(f"{os.getpid()}\\n")
_log = os.environ["MERR1_NETLOG"]
_LOCAL = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}
def _refuse(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")
    raise OSError(f"network disabled by the test: {what}")
def _name(host):
    return host.decode() if isinstance(host, bytes) else host
def _wrap_connect(orig):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _name(address[0]) not in _LOCAL:
            _refuse(f"connect {address!r}")
        return orig(self, address)
    return connect
def _wrap_lookup(orig):
    def lookup(host, *args, **kwargs):
        if _name(host) not in _LOCAL:
            _refuse(f"{orig.__name__} {host!r}")
        return orig(host, *args, **kwargs)
    return lookup
socket.socket.connect = _wrap_connect(socket.socket.connect)
socket.socket.connect_ex = _wrap_connect(socket.socket.connect_ex)
for _f in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
    setattr(socket, _f, _wrap_lookup(getattr(socket, _f)))
'''


def env(tmp: pathlib.Path, **extra) -> dict:
  """The child's environment: no HF or XLA settings of ours, the network guard, the shared compile cache with
  every program in it (a trainer compiles many small ones; cached, a warm smoke run took 30 s instead of 37)."""
  out = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XLA_FLAGS"))}
  guard = tmp / "guard"
  guard.mkdir(exist_ok=True)
  (guard / "sitecustomize.py").write_text(_NO_NETWORK)
  out.update(
      PYTHONPATH=os.pathsep.join([str(guard), str(ROOT)]), MERR1_NETLOG=str(tmp / "net.log"),
      MERR1_GUARD_MARK=str(tmp / "guard.mark"), HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1",
      JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"), XLA_FLAGS=COMPILE_FAST,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **extra)
  return out


def train(workdir, tmp, *overrides, env_extra=None, wait=True, config=SMOKE):
  """(returncode, output, pid), or the Popen when wait=False."""
  cmd = [sys.executable, "-m", "merr1_jax.train", "--config", config, "--workdir", str(workdir), *overrides]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env(tmp, **(env_extra or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  return proc.returncode, out, proc.pid


def rows(workdir, stage="rl"):
  """The stage's JSONL rows in file order, without the wall-clock keys (`time/*` and the `throughput/*` rates)."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows
          if r["stage"] == stage]


def ckpt_state(stage_dir: pathlib.Path, step: int) -> dict:
  """A saved train state as {leaf path: numpy array}, read straight from the orbax files (no target)."""
  tree = ocp.StandardCheckpointer().restore(stage_dir / str(step) / "state")
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def ckpt_meta(stage_dir: pathlib.Path, step: int) -> dict:
  return json.loads((stage_dir / str(step) / "meta" / "metadata").read_text())


# A LoRA run (RL only, from the random init) with dropout, so that resuming is shown to draw the same masks, and
# the interference probe after every step (it reads the reference after the step has donated the old state).
LORA_RUN = ("--config.model.lora_rank=4", "--config.model.lora_dropout=0.1", "--config.stages=('rl',)",
            "--config.rl.steps=2", "--config.rl.probe_every=1")


def lora_reference(tmp_path_factory) -> pathlib.Path:
  """The workdir of one uninterrupted LoRA_RUN, built once per session across xdist workers."""
  from tests.helpers import shared  # noqa: PLC0415

  def build(tmp):
    rc, out, _ = train(tmp / "w", tmp, *LORA_RUN)
    assert rc == 0, out[-4000:]

  return shared.build_once(tmp_path_factory, "lora_reference_run", build) / "w"
