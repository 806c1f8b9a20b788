"""Checkpoints: bit-identical round trip, restore onto mesh shardings, exact data resume, retention, config
compatibility, a crash before finalisation, preemption signals, and HF export."""

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from merr1_jax.data import pipeline, synth
from merr1_jax.infra import artifacts, checkpoint, preemption, sharding
from merr1_jax.models import base, hf_io, mllm
from merr1_jax.training import optimizer as optim
from merr1_jax.training import step as ts
from tests.helpers.xla import COMPILE_FAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  return mllm.build("tiny", vocab_size=64, video_dim=0, audio_dim=0, d_model=64, mlp_dim=128, head_dim=16)


@pytest.fixture(scope="module")
def state(model):
  """A state with every part non-trivial: moments after one update, a bf16 reference, counters != 0."""

  def make():  # one jit: eager init and update would compile dozens of tiny ops one by one
    params = model.init_params(jax.random.key(0))
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2), params)
    st = ts.init_state(params, tx, with_reference=True, ref_dtype=jnp.bfloat16)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    updates, opt_state = tx.update(grads, st.opt_state, params)
    return st.replace(step=jnp.int32(7), params=jax.tree.map(jnp.add, params, updates), opt_state=opt_state,
                      nonfinite=jnp.int32(1))

  return jax.jit(make)()


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    assert a.dtype == b.dtype, base.path_str(path)
    # Bit equality (also for NaN payloads and -0.0): compare the raw bytes.
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8),
                                  err_msg=base.path_str(path))


def _single_device_target(state):
  return checkpoint.abstract_with_shardings(jax.eval_shape(lambda: state), SingleDeviceSharding(jax.devices()[0]))


def test_round_trip_is_bit_identical_even_when_the_state_is_donated_after_save(state, tmp_path):
  want = _host(state)
  live = jax.tree.map(jnp.copy, state)
  rng = jax.random.split(jax.random.key(42))[1]
  extra = {"stage": "rl", "reward": np.float32(0.5), "hist": jnp.arange(3)}
  ck = checkpoint.Checkpointer(tmp_path, save_every=100, keep=2)
  assert ck.save(7, live, rng=rng, extra=extra, force=True)
  # The trainer donates the state to the next step right after save() returns (the save is still in flight).
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.ones((), x.dtype), s), donate_argnums=0)
  live = bump(live)
  ck.wait()
  got, got_rng, got_extra = ck.restore(None, _single_device_target(state))
  assert isinstance(got, ts.TrainState) and isinstance(got.params, nnx.State)
  _assert_identical(got, want)
  assert got_rng.dtype == rng.dtype
  np.testing.assert_array_equal(jax.random.key_data(got_rng), jax.random.key_data(rng))
  assert got_extra == {"stage": "rl", "reward": 0.5, "hist": [0, 1, 2]}
  assert not np.array_equal(np.asarray(live.params["decoder"]["final_norm"]["scale"]),
                            want.params["decoder"]["final_norm"]["scale"])  # the donation really changed it
  ck.close()


def test_restore_names_mismatched_leaves(state, tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, async_save=False)
  ck.save(1, state)
  no_ref = state.replace(ref=None)
  with pytest.raises(ValueError, match="not in target: ref/decoder/embed/embedding"):
    ck.restore(1, _single_device_target(no_ref))
  bad = jax.eval_shape(lambda: state)
  with pytest.raises(ValueError, match="carries no sharding"):
    ck.restore(1, bad)  # eval_shape leaves carry no sharding
  wide = state.replace(step=jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"step: checkpoint \(\) int32, target \(2,\) int32"):
    ck.restore(1, _single_device_target(wide))
  with pytest.raises(FileNotFoundError, match="step 5"):
    ck.restore(5, _single_device_target(state))


def test_restore_onto_mesh_shardings(model, state, tmp_path):
  mesh = sharding.make_mesh((2, 2, 2))
  abstract = jax.eval_shape(lambda: state)
  shardings = sharding.state_shardings(abstract, sharding.param_shardings(model, abstract.params, mesh), mesh)
  target = checkpoint.abstract_with_shardings(abstract, shardings)
  ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1)
  ck.save(7, state)  # saved from one device, restored across eight
  got, rng, extra = ck.restore(7, target)
  assert rng is None and extra == {}
  _assert_identical(got, _host(state))
  split = 0
  for (path, leaf), want in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), base.path_str(path)
    split += isinstance(want, NamedSharding) and any(want.spec)
  assert split > 10  # parameters, moments and reference leaves really were spread over the mesh
  ck.close()


def _batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if x[k].dtype == object:
        assert list(x[k]) == list(y[k]), k
      else:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_data_iterator_resumes_exactly(tmp_path):
  cfg = synth.SynthConfig(n_train=16, n_validation=4, n_test=4)
  records = list(synth.generate_split(cfg, "train"))
  tok = synth.build_tokenizer(cfg, vocab_size=512)
  pcfg = pipeline.PipelineConfig(kind="rl", batch_size=4, label_vocab=synth.EMOTIONS, video_dim=cfg.video_dim,
                                 audio_dim=cfg.audio_dim, seed=5)
  make = lambda: iter(pipeline.build(pipeline.BytesSource(records), tok, pcfg))  # noqa: E731
  it = make()
  for _ in range(3):  # 4 batches an epoch: the 6 read after the save cross an epoch boundary
    next(it)
  small = {"w": jnp.arange(4.0)}
  ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1)
  ck.save(3, small, data_iter=it)
  expected = [next(it) for _ in range(6)]  # read while the save may still be in flight
  ck.wait()
  fresh = make()
  got, _, _ = ck.restore(3, _single_device_target(small), data_iter=fresh)
  _batches_equal([next(fresh) for _ in range(6)], expected)
  np.testing.assert_array_equal(got["w"], np.arange(4.0))
  # A checkpoint without a data position says so instead of silently starting the stream over.
  ck.save(4, small)
  with pytest.raises(ValueError, match="no data-iterator position"):
    ck.restore(4, _single_device_target(small), data_iter=make())
  ck.close()


def test_save_every_keep_and_latest_step(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, save_every=2, keep=2)
  assert ck.latest_step() is None
  with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
    ck.restore(None, {"w": jax.ShapeDtypeStruct((), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0]))})
  saved = [s for s in range(1, 10) if ck.save(s, {"w": jnp.float32(s)})]
  assert saved == [2, 4, 6, 8] and [s for s in range(10) if ck.should_save(s)] == [0, 2, 4, 6, 8]
  ck.wait()
  assert ck.all_steps() == [6, 8] and ck.latest_step() == 8
  legacy_rng = jax.random.PRNGKey(3)  # raw uint32 key words, no key dtype
  assert ck.save(9, {"w": jnp.float32(9)}, rng=legacy_rng, force=True)  # e.g. the preemption save
  assert not ck.save(9, {"w": jnp.float32(-1)}, force=True)  # already on disk: not rewritten
  ck.close()
  reopened = checkpoint.Checkpointer(tmp_path, save_every=2, keep=2)
  assert reopened.all_steps() == [8, 9]
  target = {"w": jax.ShapeDtypeStruct((), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0]))}
  state9, rng9, _ = reopened.restore(None, target)
  assert float(state9["w"]) == 9.0 and rng9.dtype == jnp.uint32
  np.testing.assert_array_equal(rng9, legacy_rng)
  assert float(reopened.restore(8, target)[0]["w"]) == 8.0
  with pytest.raises(ValueError, match="save_every"):
    checkpoint.Checkpointer(tmp_path / "x", save_every=0, keep=1)


def test_incompatible_config_error_says_how_to_force(tmp_path):
  ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json=json.dumps({"rl": {"beta": 0.04}}))
  ck.save(1, {"w": jnp.zeros(2)})
  ck.close()
  now = json.dumps({"rl": {"beta": 0.1}})
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"or pass force=True to resume"):
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json=now)
  # The trainer names its own flag.
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"or pass --config\.resume=force to resume"):
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json=now, force_hint="--config.resume=force")


def test_write_text_atomic_replaces_whole_files_only(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  artifacts.write_text_atomic(path, "old")
  assert path.read_text() == "old" and os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
  # A failure before the rename leaves the old file whole, and no temp file behind.
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
  with pytest.raises(OSError, match="disk gone"):
    artifacts.write_text_atomic(path, "new")
  monkeypatch.undo()
  assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
  artifacts.write_text_atomic(path, "new")
  assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_incompatible_config_names_the_field(tmp_path):
  stored = {"model": {"d_model": 64, "heads": [4, 2]}, "rl": {"beta": 0.04}, "workdir": "/a", "log_every": 10}
  ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json=json.dumps(stored))
  ck.save(1, {"w": jnp.zeros(2)})
  ck.close()
  now = {"model": {"d_model": 64, "heads": [4, 1]}, "rl": {"beta": 0.1, "clip": 0.2}, "workdir": "/b",
         "log_every": 5}
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"rl\.beta: stored 0\.04, now 0\.1") as e:
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json=json.dumps(now))
  # workdir and log_every are ignored by default; a new key shows as absent on the stored side.
  assert e.value.differences == [("model.heads", [4, 2], [4, 1]), ("rl.beta", 0.04, 0.1),
                                 ("rl.clip", "<absent>", 0.2)]
  forced = checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json=json.dumps(now), force=True)
  assert forced.stored_config() == stored
  forced.save(2, {"w": jnp.ones(2)})
  forced.close()
  # The latest checkpoint now carries the new config: reopening with it is clean.
  checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json=json.dumps(now)).close()
  assert checkpoint.config_differences(stored, now, ignore_keys=("model", "rl.*", "workdir", "log_every")) == []
  # Explicit ignore_keys replace the defaults; a bare name matches that component at any depth.
  keys = [k for k, _, _ in checkpoint.config_differences(stored, now, ignore_keys=("heads",))]
  assert keys == ["log_every", "rl.beta", "rl.clip", "workdir"]
  with pytest.raises(ValueError, match="not valid JSON"):
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=1, config_json="{beta: 1")


def test_a_field_added_since_a_checkpoint_is_no_difference_at_its_old_value():
  """model.attention did not exist in checkpoints made before it: absent there means the reference kernel, so a
  run resuming with that value resumes, and any other value is reported as usual."""
  stored = {"model": {"d_model": 64}}
  assert checkpoint.config_differences(stored, {"model": {"d_model": 64, "attention": "reference"}}) == []
  assert checkpoint.config_differences(stored, {"model": {"d_model": 64, "attention": "xla"}}) == [
      ("model.attention", "<absent>", "xla")]
  # Evaluation's check of a training checkpoint's model section reads it the same way.
  from merr1_jax import config as cfglib  # noqa: PLC0415
  from merr1_jax.training import policy_io  # noqa: PLC0415
  config = cfglib.load("configs/base.py")
  model = json.loads(cfglib.to_json(config))["model"]
  older = {k: v for k, v in model.items() if k != "attention"}
  assert policy_io._model_differences({"model": older}, config) == []
  config.model.attention = "xla"
  assert policy_io._model_differences({"model": older}, config) == [
      "model.attention: checkpoint 'reference', config 'xla'"]
  # Only for the registered fields: another new key is still a difference.
  assert checkpoint.config_differences(stored, {"model": {"d_model": 64, "heads": 4}}) == [
      ("model.heads", "<absent>", 4)]


_CRASH = r"""
import os, sys
import jax.numpy as jnp
from orbax.checkpoint.path import atomicity  # public: orbax.checkpoint.path re-exports it
from merr1_jax.infra import checkpoint
ck = checkpoint.Checkpointer(sys.argv[1], save_every=1, keep=5)
ck.save(1, {"w": jnp.full((4,), 1.0)})
ck.wait()
real = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self, *a, **k):
  if self._final_path.name == "2":  # every item of step 2 is written; die just before the step's rename
    os._exit(17)
  return await real(self, *a, **k)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
ck.save(2, {"w": jnp.full((4,), 2.0)})
ck.wait()
os._exit(0)
"""


def test_crash_before_finalisation_leaves_no_complete_looking_checkpoint(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=COMPILE_FAST, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 17, proc.stderr[-2000:]
  tmp_dirs = [n for n in os.listdir(tmp_path) if n.startswith("2") and "tmp" in n]
  assert tmp_dirs and "2" not in os.listdir(tmp_path)
  assert os.path.isdir(tmp_path / tmp_dirs[0] / "state")  # the data was there, only the rename was missing
  ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=5)
  assert ck.latest_step() == 1 and ck.all_steps() == [1]
  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0]))}
  np.testing.assert_array_equal(ck.restore(None, target)[0]["w"], np.full(4, 1.0, np.float32))
  # The resumed run reaches step 2 again: the save goes through and the leftover is gone (orbax cleans tmp
  # directories in the background when the manager opens and waits for that before its first save).
  assert ck.save(2, {"w": jnp.full((4,), 3.0)})
  ck.wait()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  np.testing.assert_array_equal(ck.restore(2, target)[0]["w"], np.full(4, 3.0, np.float32))
  ck.close()


def _wait_for(pred, timeout=2.0):
  end = time.monotonic() + timeout
  while not pred() and time.monotonic() < end:
    time.sleep(0.01)
  return pred()


def test_preemption_guard_sets_the_flag_and_restores_handlers():
  calls = []
  sentinel = lambda signum, frame: calls.append(signum)  # noqa: E731
  prev_term, prev_int = signal.signal(signal.SIGTERM, sentinel), signal.getsignal(signal.SIGINT)
  try:
    with preemption.PreemptionGuard() as guard:
      assert not guard.requested
      os.kill(os.getpid(), signal.SIGTERM)
      assert _wait_for(lambda: guard.requested)  # still alive: the signal only set the flag
      assert guard.signal == signal.SIGTERM and guard.any_process_requested()
      assert signal.getsignal(signal.SIGINT) is prev_int  # SIGINT untouched unless asked for
    assert signal.getsignal(signal.SIGTERM) is sentinel and not calls
    os.kill(os.getpid(), signal.SIGTERM)  # the previous handler is live again
    assert _wait_for(lambda: calls == [signal.SIGTERM])
    with preemption.PreemptionGuard(sigint=True) as guard:
      os.kill(os.getpid(), signal.SIGINT)
      assert _wait_for(lambda: guard.requested) and guard.signal == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is the way out of a stuck save
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for(lambda: False, timeout=1.0)
    assert signal.getsignal(signal.SIGINT) is prev_int
  finally:
    signal.signal(signal.SIGTERM, prev_term)


def test_export_hf_round_trips_through_load_hf(model, state, tmp_path):
  out = tmp_path / "hf"
  files = artifacts.export_hf(state.params, model.config, out, dtype="float32")
  assert "config.json" in os.listdir(out) and any(f.endswith(".safetensors") for f in os.listdir(out))
  assert set(files) <= set(os.listdir(out))
  loaded, report = hf_io.load_hf(str(out), model)
  assert report.clean and report.loaded > 0
  _assert_identical(loaded, _host(state.params))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    artifacts.export_hf(state.params, model.config, out, dtype="float32")
  doubled = jax.tree.map(lambda x: 2 * x, state.params)
  artifacts.export_hf(doubled, model.config, out, dtype="float32", overwrite=True)
  _assert_identical(hf_io.load_hf(str(out), model)[0], _host(doubled))
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no tmp / old directories left behind


_TWO_PROCESSES = r"""
import os, signal, sys
import grain
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

directory, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from merr1_jax.infra import checkpoint
from merr1_jax.infra import preemption
mesh = Mesh(np.asarray(jax.devices()), ("x",))
host_w = np.arange(24, dtype=np.float32).reshape(8, 3)
make = lambda x, spec: jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])
state = {"w": make(host_w, P("x")), "step": make(np.asarray(5, np.int32), P())}
data = lambda: iter(grain.MapDataset.range(100 * pid, 100 * pid + 48).shuffle(seed=1).batch(4).to_iter_dataset())
it = data()
for _ in range(3):
  next(it)
ck = checkpoint.Checkpointer(directory, save_every=5, keep=1)
assert ck.save(5, state, data_iter=it, rng=jax.random.key(9), extra={"stage": "rl"})
expected = [next(it) for _ in range(8)]
ck.wait()
target = checkpoint.abstract_with_shardings(jax.eval_shape(lambda: state),
                                            {"w": state["w"].sharding, "step": state["step"].sharding})
fresh = data()
got, rng, extra = ck.restore(None, target, data_iter=fresh)
for shard in got["w"].addressable_shards:  # each process holds (and checks) its own rows
  np.testing.assert_array_equal(shard.data, host_w[shard.index])
assert got["w"].sharding == state["w"].sharding and int(got["step"].addressable_data(0)) == 5
assert extra == {"stage": "rl"} and (jax.random.key_data(rng) == jax.random.key_data(jax.random.key(9))).all()
for a, b in zip([next(fresh) for _ in range(8)], expected):  # the position of this process's own stream
  np.testing.assert_array_equal(a, b)
assert expected[0].min() >= 100 * pid
ck.close()
with preemption.PreemptionGuard() as guard:
  if pid == 1:  # only one process is told to stop; both must see it
    os.kill(os.getpid(), signal.SIGTERM)
    while not guard.requested:
      pass
  assert guard.any_process_requested()
  assert guard.requested == (pid == 1)
print("ok", pid)
"""


def test_two_processes_save_and_restore_their_shards_and_streams(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {COMPILE_FAST}",
             PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(tmp_path / "ck"), str(port), str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=180)[0] for p in procs]
  finally:
    for p in procs:  # one failing process leaves the other waiting at a barrier
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]
  # One data-position file per process, under the same step.
  files = [n for n in os.listdir(tmp_path / "ck" / "5" / "data") if n.endswith(".json")]
  assert sorted(files) == ["process_0-of-2.json", "process_1-of-2.json"]


# ------------------------------------------------------------------------------------ damaged checkpoints


def _small(step: int) -> dict:
  """A state whose values say which step saved it (big enough for several KB of TensorStore data files)."""
  return {"w": jnp.arange(8192, dtype=jnp.float32) * step, "b": {"c": jnp.full((16, 16), float(step))}}


def _small_target() -> dict:
  return _single_device_target(_small(0))


def _stream():
  cfg = synth.SynthConfig(n_train=16, n_validation=4, n_test=4)
  tok = synth.build_tokenizer(cfg, vocab_size=512)
  pcfg = pipeline.PipelineConfig(kind="rl", batch_size=4, label_vocab=synth.EMOTIONS, video_dim=cfg.video_dim,
                                 audio_dim=cfg.audio_dim, seed=5)
  records = list(synth.generate_split(cfg, "train"))
  return lambda: iter(pipeline.build(pipeline.BytesSource(records), tok, pcfg))


def _save_three(directory, make_iter=None, **kw) -> tuple:
  """Steps 1, 2, 3 (one batch read between saves), each with its own rng key; returns (checkpointer, the three
  batches that follow step 2's position)."""
  ck = checkpoint.Checkpointer(directory, save_every=1, keep=5, **kw)
  it = make_iter() if make_iter else None
  after_two = None
  for step in (1, 2, 3):
    if it is not None:
      next(it)
    ck.save(step, _small(step), data_iter=it, rng=jax.random.key(100 + step), extra={"step": step})
    if step == 2 and it is not None:
      ck.wait()
      after_two = [next(it) for _ in range(3)]
      it = make_iter()  # step 3 saves another stream's position
      for _ in range(3):
        next(it)
  ck.wait()
  return ck, after_two


def _biggest_data_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _damage(step_dir, how: str) -> str:
  """Damages a committed step as the issue's cases did; returns a regex for what the one-line error must say."""
  data = _biggest_data_file(step_dir)
  rel = re.escape(data.relative_to(step_dir).as_posix())
  size = data.stat().st_size
  if how == "truncated":
    data.write_bytes(data.read_bytes()[:size // 2])
    return rf"{rel}: {size // 2} bytes, the manifest says {size} \(truncated\)"
  if how == "missing_folder":
    n = sum(p.is_file() for p in (step_dir / "state").rglob("*"))
    shutil.rmtree(step_dir / "state")
    return rf"state/: missing \({n} files\)"
  if how == "corrupt_metadata":  # same length, not JSON any more
    meta = step_dir / "meta" / "metadata"
    meta.write_bytes(b"\x00" * meta.stat().st_size)
    return r"meta/metadata: SHA-256 differs from the manifest \(contents changed\)"
  if how == "flipped_bytes":  # eight bytes overwritten in the middle of the largest data file
    raw = bytearray(data.read_bytes())
    raw[size // 2:size // 2 + 8] = bytes(b ^ 0xFF for b in raw[size // 2:size // 2 + 8])
    data.write_bytes(bytes(raw))
    return rf"{rel}: SHA-256 differs from the manifest \(contents changed\)"
  raise ValueError(how)


DAMAGE = ["truncated", "missing_folder", "corrupt_metadata", "flipped_bytes"]


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path):
  for async_save in (True, False):
    d = tmp_path / f"async{async_save}"
    ck = checkpoint.Checkpointer(d, save_every=1, keep=5, async_save=async_save)
    ck.save(1, _small(1))
    ck.wait()
    manifest = json.loads((d / "1" / checkpoint.MANIFEST).read_text())
    on_disk = sorted(p.relative_to(d / "1").as_posix() for p in (d / "1").rglob("*") if p.is_file())
    # Everything but the manifest and the two files orbax writes after it (commit time, commit marker).
    assert sorted(manifest["files"]) == [f for f in on_disk if f not in (
        checkpoint.MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt")]
    assert "meta/metadata" in manifest["files"] and any(f.startswith("state/") for f in manifest["files"])
    for rel, entry in manifest["files"].items():  # an independent hash of each file
      raw = (d / "1" / rel).read_bytes()
      assert entry == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}, rel
    assert checkpoint.manifest_problems(d / "1") == []
    assert json.loads((d / "1" / "meta" / "metadata").read_text())["manifest"] is True
    ck.close()


@pytest.mark.parametrize("how", DAMAGE)
def test_each_kind_of_damage_is_named_in_one_line(tmp_path, how):
  """The issue's four cases: a truncated data file (61 lines of TensorStore), a missing state/ folder
  (`KeyError: Unknown key: state`), corrupt metadata (a JSON error naming no file), flipped bytes (not noticed
  at all). Each must raise one line naming the step and the file."""
  ck, _ = _save_three(tmp_path)
  want = _damage(tmp_path / "3", how)
  with pytest.raises(Exception) as err:
    ck.restore(3, _small_target())
  msg = str(err.value)
  assert "\n" not in msg and re.fullmatch(rf"checkpoint {re.escape(str(tmp_path))}/3: {want}", msg), msg
  assert type(err.value).__name__ == "DamagedCheckpointError" and err.value.step == 3
  np.testing.assert_array_equal(ck.restore(2, _small_target())[0]["w"], np.arange(8192, dtype=np.float32) * 2)
  ck.close()


@pytest.mark.parametrize("how", DAMAGE)
def test_restore_newest_falls_back_to_the_newest_good_step(tmp_path, how, caplog):
  make = _stream()
  ck, after_two = _save_three(tmp_path, make)
  want = _damage(tmp_path / "3", how)
  kept = sorted(p.relative_to(tmp_path / "3").as_posix() for p in (tmp_path / "3").rglob("*") if p.is_file())
  it = make()
  with caplog.at_level(logging.WARNING, logger="merr1_jax.infra.checkpoint"):
    step, (state, rng, extra) = ck.restore_newest(lambda s: ck.restore(s, _small_target(), data_iter=it))
  # State, rng, extra and the data position all come from step 2.
  assert step == 2 and extra == {"step": 2}
  _assert_identical(state, _host(_small(2)))
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(102)))
  _batches_equal([next(it) for _ in range(3)], after_two)
  lines = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
  assert len(lines) == 1 and re.fullmatch(
      rf"checkpoint {re.escape(str(tmp_path))}/3: {want}; falling back to step 2", lines[0]), lines
  # Step 3 is kept aside, whole, and out of the way: the resumed run saves its step 3 again.
  assert sorted(p.relative_to(tmp_path / "3.damaged").as_posix()
                for p in (tmp_path / "3.damaged").rglob("*") if p.is_file()) == kept
  assert ck.all_steps() == [1, 2]
  assert ck.save(3, _small(30))
  ck.close()
  again = checkpoint.Checkpointer(tmp_path, save_every=1, keep=5)
  assert again.all_steps() == [1, 2, 3]
  np.testing.assert_array_equal(again.restore(3, _small_target())[0]["w"], np.arange(8192, dtype=np.float32) * 30)
  again.close()


def test_no_usable_step_is_one_error_naming_each_and_moves_nothing(tmp_path, caplog):
  ck, _ = _save_three(tmp_path)
  wants = {3: _damage(tmp_path / "3", "flipped_bytes"), 2: _damage(tmp_path / "2", "missing_folder"),
           1: _damage(tmp_path / "1", "truncated")}
  with caplog.at_level(logging.WARNING, logger="merr1_jax.infra.checkpoint"):
    with pytest.raises(checkpoint.NoUsableCheckpointError) as err:
      ck.restore_newest(lambda s: ck.restore(s, _small_target()))
  msg = str(err.value)
  assert "\n" not in msg and msg.startswith(f"no usable checkpoint in {tmp_path} (step 3: ")
  for step, want in wants.items():
    assert re.search(rf"step {step}: {want}", msg), (step, msg)
  assert [r.getMessage().rsplit("; ", 1)[-1] for r in caplog.records if "checkpoint" in r.getMessage()] == [
      "falling back to step 2", "falling back to step 1", "no older step to fall back to"]
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]  # nothing set aside when nothing loaded
  # An empty directory is no error: a fresh stage.
  assert checkpoint.Checkpointer(tmp_path / "empty", save_every=1, keep=1).restore_newest(lambda s: s) is None
  ck.close()


def test_steps_saved_before_manifests_load_unverified_and_damage_still_reads_as_one_line(tmp_path, caplog):
  ck, _ = _save_three(tmp_path, manifest=False)
  assert not (tmp_path / "3" / checkpoint.MANIFEST).exists()
  with caplog.at_level(logging.WARNING, logger="merr1_jax.infra.checkpoint"):
    got = ck.restore(3, _small_target())[0]
  _assert_identical(got, _host(_small(3)))
  assert any("saved before checksum manifests; loading it unverified" in r.getMessage() for r in caplog.records)
  shutil.rmtree(tmp_path / "3" / "state")
  with pytest.raises(checkpoint.DamagedCheckpointError, match=r"^checkpoint .*/3: state/: missing$"):
    ck.restore(3, _small_target())
  data = _biggest_data_file(tmp_path / "2")
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  with pytest.raises(checkpoint.DamagedCheckpointError, match=r"^checkpoint .*/2: cannot be read \(") as err:
    ck.restore(2, _small_target())
  assert "\n" not in str(err.value) and len(str(err.value)) < 500
  (tmp_path / "1" / "meta" / "metadata").write_text('{"format": 1, "ste')
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r"^checkpoint .*/1: meta/metadata: cannot be read \(JSONDecodeError: "):
    ck.restore(1, _small_target())
  ck.close()
  # A step saved with a manifest that lost it is damaged, not "old".
  ck2, _ = _save_three(tmp_path / "new")
  os.remove(tmp_path / "new" / "3" / checkpoint.MANIFEST)
  with pytest.raises(checkpoint.DamagedCheckpointError,
                     match=r"/3: merr1_manifest\.json: missing \(the step was saved with one\)$"):
    ck2.restore(3, _small_target())
  ck2.close()


def test_a_damaged_latest_meta_does_not_block_opening_or_the_config_check(tmp_path, caplog):
  cfg = json.dumps({"rl": {"beta": 0.04}})
  ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep=5, config_json=cfg)
  for step in (1, 2):
    ck.save(step, _small(step))
  ck.close()
  (tmp_path / "2" / "meta" / "metadata").write_text("{not json")
  with caplog.at_level(logging.WARNING, logger="merr1_jax.infra.checkpoint"):
    reopened = checkpoint.Checkpointer(tmp_path, save_every=1, keep=5, config_json=cfg)
  assert any(re.match(rf"checkpoint {re.escape(str(tmp_path))}/2: meta/metadata: .*; comparing the config with "
                      "an older step$", r.getMessage()) for r in caplog.records)
  reopened.close()
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"\(latest step 1\).*rl\.beta"):
    checkpoint.Checkpointer(tmp_path, save_every=1, keep=5, config_json=json.dumps({"rl": {"beta": 0.1}}))


def test_read_json_names_the_file(tmp_path):
  path = tmp_path / "eval_rl.json"
  path.write_text('{"step": 3, "summary": ')
  with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not valid JSON \(Expecting value at line 1 "
                                       r"column 24\)$"):
    artifacts.read_json(path)
  path.write_bytes(b"\xff\xfe")
  with pytest.raises(ValueError, match=r"eval_rl\.json: not UTF-8 text"):
    artifacts.read_json(path)
  path.write_text('{"a": [1, 2]}')
  assert artifacts.read_json(path) == {"a": [1, 2]}
