"""LoRA (models/lora.py, docs/lora.md): exact base at init, gradients only where the rules say, the reference as the
base with adapters off, merged and PEFT exports against transformers + peft, sharding, the memory plan, and the
trainer's adapter-only checkpoints (resume after SIGKILL, refusal of another base or rank)."""

import re
import shutil
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from merr1_jax import config as cfglib
from merr1_jax.infra import memory, sharding
from merr1_jax.models import base, hf_io, lora, lora_export, mllm, presets
from merr1_jax.training import optimizer as optim
from merr1_jax.training import settings
from merr1_jax.training import step as ts
from tests.helpers import runs
from tests.helpers.batches import V
from tests.helpers.batches import row_batch as _batch
from tests.helpers.batches import step_cfg as _step_cfg
from tests.helpers.runs import BASE, SMOKE
from tests.helpers.runs import train as _train
from tests.helpers.trees import flat_params as _flat
from tests.oracles import ungrouped

RANK = 4


def _model(rank=RANK, **kw):
  return mllm.build("tiny", vocab_size=V, video_dim=0, audio_dim=0, d_model=64, mlp_dim=128, num_heads=4,
                    num_kv_heads=2, head_dim=16, lora_rank=rank, **kw)




def _with_random_b(params, seed=1, scale=0.05):
  """Adapters that do something: every B drawn at random (at init B = 0 and the adapters are invisible), each
  leaf's key folded from a stable hash of its path (Python's `hash` of a str is salted per process)."""
  key = jax.random.key(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: scale * jax.random.normal(
          jax.random.fold_in(key, zlib.crc32(base.path_str(p).encode()) % 2**31), x.shape)
      if base.path_str(p).endswith("_lora_b") else x, params)


def _inputs(b=2, l=7, seed=0):
  tokens = np.random.RandomState(seed).randint(0, V, (b, l))
  return base.ModelInputs(tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.broadcast_to(jnp.arange(l), (b, l)),
                          mask=jnp.ones((b, l), bool)), tokens


def _logits(model, params, inputs):
  return np.asarray(model.forward(params, model.embed(params, inputs))[0])


def test_at_initialisation_the_lora_model_is_exactly_its_base():
  m, mb = _model(), _model(rank=0)
  p, pb = m.init_params(jax.random.key(0)), mb.init_params(jax.random.key(0))
  flat, flat_b = _flat(p), _flat(pb)
  assert {n for n in flat if lora.is_adapter(n)} == {f"decoder/layers/{k}_lora_{ab}" for k in
                                                     ("q", "k", "v", "o", "gate", "up", "down") for ab in "ab"}
  for name, x in flat_b.items():  # the base's values do not depend on LoRA (A draws from its own key)
    assert np.array_equal(flat[name], x), name
  for name, x in flat.items():
    if lora.is_adapter(name):
      assert x.dtype == np.float32
      assert (not x.any()) == name.endswith("_lora_b"), name  # B = 0, A random
  inputs, _ = _inputs()
  assert np.array_equal(_logits(m, p, inputs), _logits(mb, pb, inputs))


def test_the_adapter_forward_is_the_low_rank_update_of_every_kernel():
  """Independent reference: W + (alpha / r) A B formed here in numpy for each adapted kernel, run by the base
  model; and `lora_export.merged` equals it."""
  m, mb = _model(lora_alpha=8.0), _model(rank=0)
  p = _with_random_b(m.init_params(jax.random.key(0)))
  flat = _flat(p)
  n_in = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
  ref = {}
  for name, x in flat.items():
    if lora.is_adapter(name):
      continue
    k = re.search(r"layers/(\w+)_kernel$", name)
    if k and k.group(1) in n_in:
      a, b = flat[name.replace("_kernel", "_lora_a")], flat[name.replace("_kernel", "_lora_b")]
      upd = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
      assert upd.shape == x.shape
      x = x + (8.0 / RANK) * upd
    ref[name] = x
  pb = jax.tree_util.tree_map_with_path(lambda path, _: jnp.asarray(ref[base.path_str(path)]),
                                        mb.abstract_params())
  inputs, _ = _inputs()
  got = _logits(m, p, inputs)
  assert np.abs(got - _logits(mb, mb.init_params(jax.random.key(0)), inputs)).max() > 1e-2  # adapters act
  np.testing.assert_allclose(got, _logits(mb, pb, inputs), rtol=1e-5, atol=1e-5)
  merged, cfg = lora_export.merged(p, m.config)
  assert cfg.lora_rank == 0
  np.testing.assert_allclose(_logits(mb, merged, inputs), got, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- dropout
def test_lora_dropout_drops_only_the_adapter_inputs():
  """Block._proj with a key against the formula written here: x W + (alpha / r) (m * x / (1 - p)) A B with m the
  documented mask bernoulli(fold_in(key, kernel index), 1 - p); the base path sees x; no key = no dropout."""
  from merr1_jax.models import layers  # noqa: PLC0415

  m = _model(lora_dropout=0.25)
  p = _with_random_b(m.init_params(jax.random.key(0)))
  blk = m._module(p).decoder.layers
  graphdef, stacked = nnx.split(blk)
  blk0 = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))  # layer 0, unstacked
  x = jax.random.normal(jax.random.key(5), (2, 3, 64))
  key = jax.random.key(9)
  w, a, b = (np.asarray(getattr(blk0, f"up_{n}")[...], np.float64) for n in ("kernel", "lora_a", "lora_b"))
  keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 5), 0.75, x.shape))  # 'up' is kernel 5
  xn = np.asarray(x, np.float64)
  want = xn @ w + (16.0 / RANK) * ((np.where(keep, xn / 0.75, 0.0) @ a) @ b)
  np.testing.assert_allclose(np.asarray(blk0._proj("up", x, key)), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(blk0._proj("up", x)), xn @ w + (16.0 / RANK) * ((xn @ a) @ b),
                             rtol=1e-5, atol=1e-5)
  assert 0.6 < keep.mean() < 0.9
  # Inverted dropout keeps the projection's expectation: the mean over 256 masks is ~1/16 as far from the
  # no-dropout output as one mask (a missing 1 / (1 - p) would leave a quarter of the adapter's output off).
  proj = jax.jit(lambda k: blk0._proj("up", x, k))
  one_err = np.abs(np.asarray(proj(key)) - np.asarray(proj(None))).mean()
  mean = np.mean([np.asarray(proj(jax.random.key(100 + k))) for k in range(256)], axis=0)
  assert np.abs(mean - np.asarray(proj(None))).mean() < 0.2 * one_err
  assert np.array_equal(np.asarray(layers.lora_dropout_input(x, key, 0.0, "up")), np.asarray(x))


def test_lora_dropout_in_the_model_is_seeded_and_invisible_at_b_zero():
  m = _model(lora_dropout=0.5)
  p0 = m.init_params(jax.random.key(0))
  p = _with_random_b(p0, scale=0.2)
  inputs, _ = _inputs()
  hidden = jax.jit(lambda prm, k: m.hidden(prm, m.embed(prm, inputs), dropout_key=k)[0])
  plain = np.asarray(hidden(p, None))  # no key: no dropout (the same program, so bit-comparable)
  # B = 0: the adapters add nothing, with or without their inputs dropped.
  assert np.array_equal(np.asarray(hidden(p0, jax.random.key(1))), np.asarray(hidden(p0, None)))
  h1, h1b, h2 = (np.asarray(hidden(p, jax.random.key(k))) for k in (1, 1, 2))
  assert np.array_equal(h1, h1b) and np.abs(h1 - h2).max() > 1e-3 and np.abs(h1 - plain).max() > 1e-3


def test_dropout_in_the_train_steps_is_seeded_and_keeps_the_first_ratio_at_one():
  """The RL step with dropout, on a multimodal batch of grouped suffixes: the same seed gives the same update,
  another seed another; one update has ratio exactly 1 (the old log-probs are the update's own, dropout and
  all); no seed = the dropout-free step; micro-batches draw their own masks but stay deterministic. The SFT step
  (a LoRA SFT stage) the same way."""
  from tests.helpers import grouped_batches as tg  # noqa: PLC0415

  _, _, _, group, _, _ = tg.batches("mm", p=2)
  m = mllm.build("tiny", vocab_size=tg.V, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                 init_std=0.08, video_dim=12, audio_dim=10, video_token_id=tg.VIDEO, audio_token_id=tg.AUDIO,
                 lora_rank=RANK, lora_dropout=0.3)
  p = _with_random_b(m.init_params(jax.random.key(0)))
  freeze = (lora.freeze_rule(""),)

  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2), p, freeze=freeze)
  steps = {}  # one compiled step per setting, reused for the repeat

  def run(seed, **kw):
    key = (seed, tuple(kw.items()))
    if key not in steps:
      steps[key] = ts.make_rl_step(m, tx, _step_cfg(dropout_seed=seed, **kw))
    state = ts.init_state(jax.tree.map(jnp.copy, p), tx, with_reference=True, freeze=freeze)
    new, metrics = steps[key](state, group)
    return _flat(new.params), metrics

  a, ma = run(3)
  b, _ = run(3)
  c, _ = run(4)
  off, _ = run(None)
  assert all(np.array_equal(a[n], b[n]) for n in a)
  assert any(not np.array_equal(a[n], c[n]) for n in a if lora.is_adapter(n))
  assert any(not np.array_equal(a[n], off[n]) for n in a if lora.is_adapter(n))
  assert float(ma["ratio_mean"]) == 1.0 and float(ma["ratio_min"]) == 1.0
  assert int(ma["skipped"]) == 0
  d, _ = run(3, micro_batches=2)
  e, _ = run(3, micro_batches=2)
  assert all(np.array_equal(d[n], e[n]) for n in d)

  ms = _model(lora_dropout=0.3)
  ps = _with_random_b(ms.init_params(jax.random.key(0)))
  txs = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2), ps, freeze=freeze)
  b0 = _batch(seed=0)
  sft = ts.SFTBatch(inputs=b0.inputs, loss_mask=b0.completion_mask)
  sft_steps = {seed: ts.make_sft_step(ms, txs, _step_cfg(beta=0.0, dropout_seed=seed)) for seed in (3, None)}

  def run_sft(seed):
    state = ts.init_state(jax.tree.map(jnp.copy, ps), txs, with_reference=False, freeze=freeze)
    return _flat(sft_steps[seed](state, sft)[0].params)

  s3, s3b, s_off = run_sft(3), run_sft(3), run_sft(None)
  assert all(np.array_equal(s3[n], s3b[n]) for n in s3)
  assert any(not np.array_equal(s3[n], s_off[n]) for n in s3 if lora.is_adapter(n))


def test_the_trainer_turns_dropout_on_only_in_lora_stages():
  from merr1_jax.training import settings  # noqa: PLC0415

  c = cfglib.load(SMOKE)
  c.model.lora_rank, c.model.lora_dropout = 4, 0.1
  assert settings.stage(c, "sft").step.dropout_seed is None  # SFT fine-tunes in full: the adapters are frozen
  rl_seed = settings.stage(c, "rl").step.dropout_seed
  assert isinstance(rl_seed, int)
  c.lora.stages = ("sft", "rl")
  assert settings.stage(c, "sft").step.dropout_seed not in (None, rl_seed)
  c.model.lora_dropout = 0.0
  assert settings.stage(c, "rl").step.dropout_seed is None
  with pytest.raises(ValueError, match="lora_dropout"):
    _model(rank=0, lora_dropout=0.1)
  with pytest.raises(ValueError, match="lora_dropout"):
    _model(lora_dropout=1.0)


def _rl_steps(model, params, freeze, n=3, **cfg_kw):
  tx = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-2), params, freeze=freeze)
  state = ts.init_state(jax.tree.map(jnp.copy, params), tx, with_reference=True, freeze=freeze)
  step = ts.make_rl_step(model, tx, _step_cfg(**cfg_kw))
  for s in range(n):
    state, metrics = step(state, ungrouped.as_grouped(_batch(seed=s)))
    assert int(metrics["skipped"]) == 0
  return state


@pytest.mark.parametrize("train_full,param_dtype", [("", "float32"), (r"embed/embedding", "float32"),
                                                    ("", "bfloat16")])
def test_gradients_reach_only_the_adapters_and_the_train_full_leaves(train_full, param_dtype):
  """The base (bfloat16 too) is bit-identical after training; adapters and their AdamW moments are float32."""
  m = _model(param_dtype=param_dtype)
  p0 = m.init_params(jax.random.key(0))
  state = _rl_steps(m, p0, (lora.freeze_rule(train_full),))
  before, after = _flat(p0), _flat(state.params)
  trained = {n for n in before if lora.is_adapter(n) or (train_full and re.search(train_full, n))}
  for name in before:
    if name in trained:
      assert not np.array_equal(before[name], after[name]), name
    else:
      assert np.array_equal(before[name], after[name]), name  # the base, bit for bit
  # The optimizer state and the reference hold nothing of the frozen base, and no copy of the adapters.
  opt_names = {re.sub(r"^.*?(decoder/.*)$", r"\1", base.path_str(p))
               for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0] if "decoder" in base.path_str(p)}
  assert opt_names == trained
  assert set(state.ref) == (trained - {n for n in trained if lora.is_adapter(n)})
  for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    if lora.is_adapter(base.path_str(p)) and x.ndim:
      assert x.dtype == jnp.float32, base.path_str(p)
  assert {after[n].dtype for n in before if not lora.is_adapter(n)} == {np.dtype(jnp.dtype(param_dtype))}


def test_the_reference_is_the_base_with_the_adapters_off():
  """After training, reference_params scores like the base model built and loaded on its own (from the base's
  HF export), and it holds no second copy of the weights."""
  m, mb = _model(), _model(rank=0)
  state = _rl_steps(m, m.init_params(jax.random.key(0)), (lora.freeze_rule(),))
  ref = ts.reference_params(state)
  flat_ref, flat_pol = _flat(ref), _flat(state.params)
  assert all(not flat_ref[n].any() for n in flat_ref if n.endswith("_lora_b"))
  assert state.ref == {}  # nothing trainable but the adapters: the reference copies nothing
  base_params, base_cfg = lora_export.base_only(state.params, m.config)
  assert base_cfg.lora_rank == 0
  inputs, _ = _inputs()
  policy = _logits(m, state.params, inputs)
  reference = _logits(m, ref, inputs)
  separate = _logits(mb, base_params, inputs)
  assert np.abs(policy - separate).max() > 1e-3  # the adapters moved the policy
  np.testing.assert_allclose(reference, separate, rtol=0, atol=1e-6)
  assert all(np.array_equal(flat_ref[n], flat_pol[n]) for n in flat_ref if not n.endswith("_lora_b"))


def test_merged_export_and_peft_adapter_match_the_jax_policy(tmp_path):
  """save_hf merges the adapters (reloaded: 1e-5 against the adapter forward); save_peft's adapter loads in peft
  onto transformers' Qwen2ForCausalLM of the base export and gives the JAX policy's logits (1e-4)."""
  if sys.version_info >= (3, 12):  # the 3.12 lane installs no torch (docs/install.md); on 3.11 a missing peft fails
    pytest.importorskip("peft", reason="torch and peft are installed on the Python 3.11 lane only")
  import peft  # noqa: PLC0415 - the test extra pins it on 3.11: a missing peft fails here, it is not skipped
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  m, mb = _model(tie_embeddings=False), _model(rank=0, tie_embeddings=False)
  p = _with_random_b(m.init_params(jax.random.key(0)))
  inputs, tokens = _inputs()
  want = _logits(m, p, inputs)

  hf_io.save_hf(p, m.config, str(tmp_path / "merged"), dtype="float32")
  merged, report = hf_io.load_hf(str(tmp_path / "merged"), mb)
  assert report.clean
  np.testing.assert_allclose(_logits(mb, merged, inputs), want, rtol=1e-5, atol=1e-5)

  base_params, base_cfg = lora_export.base_only(p, m.config)
  hf_io.save_hf(base_params, base_cfg, str(tmp_path / "base"), dtype="float32")
  files = hf_io.save_peft(p, m.config, str(tmp_path / "adapter"), base_model_name_or_path=str(tmp_path / "base"))
  assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
  tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
  pm = peft.PeftModel.from_pretrained(tm, str(tmp_path / "adapter")).eval()
  loaded = {k for k, _ in pm.named_parameters() if "lora_" in k}
  assert len(loaded) == 2 * 7 * m.config.num_layers  # every adapter of every layer found its module
  with torch.no_grad():
    got = pm(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pm.disable_adapter(), torch.no_grad():  # adapters off in peft = our base
    np.testing.assert_allclose(pm(torch.tensor(tokens)).logits.numpy(), _logits(mb, base_params, inputs),
                               rtol=1e-4, atol=1e-4)
  merged_tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
  with torch.no_grad():
    np.testing.assert_allclose(merged_tm(torch.tensor(tokens)).logits.numpy(), want, rtol=1e-4, atol=1e-4)


def test_peft_export_needs_adapters(tmp_path):
  m = _model(rank=0)
  with pytest.raises(ValueError, match="no LoRA adapters"):
    hf_io.save_peft(m.init_params(jax.random.key(0)), m.config, str(tmp_path))


@pytest.mark.parametrize("mesh_shape,opt", [((8, 1, 1), "sgd"), ((2, 2, 2), "sgd"), ((2, 2, 2), "adamw")])
def test_sharded_lora_step_equals_unsharded(mesh_shape, opt):
  """(8, 1, 1) replicates the parameters; (2, 2, 2) shards A and B by their partition rules (fsdp and tensor).
  SGD with momentum, which unlike Adam sees a constant gradient-scale error, on both; the training optimizer
  (AdamW, its moments sharded like the adapters) where there is something to shard."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices; tests/conftest.py sets them")
  m = _model()
  params = m.init_params(jax.random.key(0))
  freeze = (lora.freeze_rule(),)
  tx = (optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3), params, freeze=freeze) if opt == "adamw"
        else optax.sgd(0.5, momentum=0.9))  # init_state initialises it on the trainable (adapter) leaves only
  batches = [ungrouped.as_grouped(_batch(seed=s, old=True)) for s in (0, 1)]
  state = ts.init_state(jax.tree.map(jnp.copy, params), tx, with_reference=True, freeze=freeze)
  step = ts.make_rl_step(m, tx, _step_cfg(micro_batches=2))
  for b in batches:
    state, _ = step(state, b)
  mesh = sharding.make_mesh(mesh_shape)
  p_sh = sharding.param_shardings(m, params, mesh)
  sstate = ts.init_state(jax.device_put(jax.tree.map(jnp.copy, params), p_sh), tx, with_reference=True,
                         freeze=freeze)
  st_sh = sharding.state_shardings(sstate, p_sh, mesh)
  b_sh = sharding.batch_shardings(batches[0], mesh)
  sstep = ts.make_rl_step(m, tx, _step_cfg(micro_batches=2), state_shardings=st_sh, batch_shardings=b_sh)
  sstate = jax.device_put(sstate, st_sh)
  for b in batches:
    sstate, _ = sstep(sstate, jax.device_put(b, b_sh))
  got, want = _flat(sstate.params), _flat(state.params)
  assert any(lora.is_adapter(n) and want[n].any() and n.endswith("_lora_b") for n in want)
  # B started at 0: the steps moved it far beyond the tolerance below.
  assert max(np.abs(want[n]).max() for n in want if n.endswith("_lora_b")) > 1e-3
  if mesh_shape == (2, 2, 2):  # q's A [N, D, r] over fsdp on D, its B [N, r, H, Dh] over tensor on H
    a_spec = sstate.params["decoder"]["layers"]["q_lora_a"].get_value().sharding.spec
    b_spec = sstate.params["decoder"]["layers"]["q_lora_b"].get_value().sharding.spec
    assert tuple(a_spec)[:2] == (None, "fsdp") and tuple(b_spec)[:3] == (None, None, "tensor"), (a_spec, b_spec)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_fingerprint_sees_one_ulp_of_the_base_and_ignores_the_adapters():
  m = _model()
  p = m.init_params(jax.random.key(0))
  fp = lora.fingerprint(p)
  assert fp == lora.fingerprint(jax.tree.map(jnp.copy, p)) and len(fp) == 64
  assert lora.fingerprint(_with_random_b(p)) == fp
  bumped = jax.tree_util.tree_map_with_path(
      lambda path, x: x.at[(0,) * x.ndim].set(jnp.nextafter(x[(0,) * x.ndim], jnp.inf))
      if base.path_str(path) == "decoder/layers/up_kernel" else x, p)
  assert lora.fingerprint(bumped) != fp
  swapped = jax.tree_util.tree_map_with_path(
      lambda path, x: x[::-1] if base.path_str(path) == "decoder/layers/up_kernel" else x, p)  # layers swapped
  assert lora.fingerprint(swapped) != fp


def test_folding_merges_the_adapters_and_starts_fresh_ones():
  m = _model()
  p = _with_random_b(m.init_params(jax.random.key(0)))
  inputs, _ = _inputs()
  f = lora.folded(p, m.config, jax.random.key(3))
  flat = _flat(f)
  assert all(not flat[n].any() for n in flat if n.endswith("_lora_b"))
  before = _flat(p)
  assert all(not np.array_equal(flat[n], before[n]) for n in flat if n.endswith("_lora_a"))  # A drawn afresh
  np.testing.assert_allclose(_logits(m, f, inputs), _logits(m, p, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", presets.names())
def test_every_preset_takes_adapters_and_their_partition_rules(preset):
  """lora_rank = 8 on every preset: abstract parameters (nothing allocated), adapters float32 and covered by the
  partition rules with the rank replicated, their count as memory.lora_param_count says."""
  mc = presets.get(preset, lora_rank=8, **({"vocab_size": V} if preset in ("tiny", "small_20m") else {}))
  model = mllm.build(mc)
  abstract = model.abstract_params()
  axes = base.logical_axes(abstract, model.partition_rules())
  named = {base.path_str(p): (x, a) for (p, x), a in zip(jax.tree_util.tree_flatten_with_path(abstract)[0],
                                                        jax.tree.leaves(axes, is_leaf=lambda t: isinstance(t, tuple)))}
  adapters = {n: v for n, v in named.items() if lora.is_adapter(n)}
  assert len(adapters) == 14 and all(x.dtype == jnp.float32 and "lora" in a for x, a in adapters.values())
  assert memory.lora_param_count(mc) == sum(int(np.prod(x.shape)) for x, _ in adapters.values())


def test_config_checks_for_lora():
  with pytest.raises(ValueError, match="lora_rank: must be an int >= 0"):
    presets.get("tiny", lora_rank=-1)
  with pytest.raises(ValueError, match="lora_targets: .*matches none of the decoder kernels"):
    presets.get("tiny", lora_rank=4, lora_targets="attn")
  assert lora.lora_targets(presets.get("tiny", lora_rank=4, lora_targets=r"^decoder/layers/(q|v)_kernel$")) == (
      "q", "v")  # searched in the full parameter path
  qv = presets.get("tiny", vocab_size=V, lora_rank=2, lora_targets=r"layers/(q|v)_kernel$")
  d, hd, kd = qv.d_model, qv.num_heads * qv.head_dim, qv.num_kv_heads * qv.head_dim
  assert lora.count(qv) == qv.num_layers * 2 * ((d + hd) + (d + kd))  # r (in + out) per adapted kernel
  mc = presets.get("tiny", lora_rank=8)
  leaves = jax.tree_util.tree_flatten_with_path(mllm.build(mc).abstract_params())[0]
  assert lora.count(mc) == sum(int(np.prod(x.shape)) for p, x in leaves if lora.is_adapter(base.path_str(p)))
  c = cfglib.load(BASE)
  c.lora.train_full = "embed"
  with pytest.raises(cfglib.ConfigError, match="lora.train_full: is set but model.lora_rank is 0"):
    settings.validate(c)
  c.model.lora_rank, c.lora.train_full = 8, "embeddings"  # a typo: the path is decoder/embed/embedding
  with pytest.raises(cfglib.ConfigError, match=r"lora.train_full: 'embeddings' matches no parameter"):
    settings.validate(c)
  c.lora.train_full = "embed/embedding"
  settings.validate(c)
  c.lora.stages, c.stages = ("sft",), ("rl",)
  with pytest.raises(cfglib.ConfigError, match=r"lora.stages: model.lora_rank = 8 but none of lora.stages.*add one"):
    settings.validate(c)


def test_memory_plan_with_lora_on_one_gpu(tmp_path):
  """The 7B thinker, bf16 base: full fine-tuning on one 80 GB GPU is refused; with LoRA the RL state is the
  frozen base (2 B per weight) plus float32 adapters with their moments and gradient (16 B each), no reference
  copy, and the gpu1 mesh preset validates."""
  mc = presets.get("qwen2_5_omni_7b_thinker", lora_rank=8)
  n, a = memory.param_count(mc), memory.lora_param_count(mc)
  assert a == lora.count(mc) > 0
  gb = memory.state_gb_per_device(mc, with_reference=True, micro_batches=1, model_shards=1, lora_stage=True)
  assert gb == pytest.approx((n * 2 + a * 16) / 1e9)
  c = cfglib.load(f"{BASE}:model=qwen2_5_omni_7b_thinker,data=mer_features,mesh=gpu1")
  c.model.hf_path = c.data.records_dir = str(tmp_path)
  assert tuple(c.mesh.shape) == (1, 1, 1) and c.mesh.device_memory_gb == 80.0
  with pytest.raises(cfglib.ConfigError, match=r"mesh.shape: .*train LoRA adapters"):
    settings.validate(c, 1)
  c.model.lora_rank, c.lora.stages = 8, ("sft", "rl")
  settings.validate(c, 1)


# ------------------------------------------------------------------------------------------- trainer
_LORA_RUN = runs.LORA_RUN


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
  """One uninterrupted LoRA run (tests/helpers/runs.py); its SIGKILL resume is tests/test_train.py's, with the full
  run's."""
  return runs.lora_reference(tmp_path_factory)


def test_a_lora_checkpoint_refuses_another_rank_or_base(lora_reference, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(lora_reference, w)
  other_rank = [a.replace("lora_rank=4", "lora_rank=8") for a in _LORA_RUN]  # only the rank differs
  assert other_rank != list(_LORA_RUN)
  rc, out, _ = _train(w, tmp_path, *other_rank)
  assert rc == 2 and re.search(r"model\.lora_rank: stored 4, now 8", out), out[-2000:]
  rc, out, _ = _train(w, tmp_path, *_LORA_RUN, "--config.seed=1", "--config.resume=force")
  assert rc == 2, out[-3000:]
  assert re.search(r"error: config\.model: the LoRA checkpoint .*rl/2 was trained on another base \(stored "
                   r"[0-9a-f]{16} from random init, seed 0; now [0-9a-f]{16} from random init, seed 1\)", out), \
      out[-2000:]


def test_the_evaluate_cli_loads_a_lora_checkpoint_onto_its_rebuilt_base(lora_reference):
  """policy_io (the evaluate CLI's loader) rebuilds an adapter-only checkpoint's base as the trainer did: the
  policy it loads, merged, is bit for bit the trainer's own float32 merged export."""
  from merr1_jax.training import policy_io  # noqa: PLC0415

  c = cfglib.load(SMOKE)
  c.model.lora_rank, c.model.lora_dropout, c.stages, c.rl.steps = 4, 0.1, ("rl",), 2
  model, params, _ = policy_io.load_policy(c, lora_reference, None)
  merged, base_cfg = lora_export.merged(params, model.config)
  exported, report = hf_io.load_hf(str(lora_reference / "export"), mllm.MultimodalPolicy(base_cfg),
                                   projectors="require")
  assert report.clean
  got, want = _flat(merged), _flat(exported)
  assert got.keys() == want.keys()
  for name in want:
    assert np.array_equal(got[name], want[name]), name
  c.seed = 1  # another random init: another base, which the checkpoint refuses by its fingerprint
  with pytest.raises(policy_io.EvalError, match="trained on another base"):
    policy_io.load_policy(c, lora_reference, None)
