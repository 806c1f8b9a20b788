"""HF safetensors import/export: round trips, Omni prefixes and skipped towers, sharding, bad checkpoints."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from merr1_jax.models import base, hf_io, mllm, safetensors_io

V = 96


def _model(**kw):
  return mllm.build("tiny", vocab_size=V, video_dim=0, audio_dim=0, **kw)


def _params(model, seed=0):
  return jax.jit(model.init_params)(jax.random.key(seed))


def _flat(params):
  return {base.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _rewrite(src, dst, edit):
  """Copies a single-file checkpoint applying edit(dict name -> array) (returns the new dict)."""
  header, get = safetensors_io.open_tensors(str(src / "model.safetensors"))
  tensors = edit({k: np.array(get(k)) for k in header})
  dst.mkdir(exist_ok=True)
  safetensors_io.write(str(dst / "model.safetensors"),
                       [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
  if (src / "config.json").exists():
    (dst / "config.json").write_text((src / "config.json").read_text())
  return dst


@pytest.fixture
def exported(tmp_path):
  model = _model(tie_embeddings=False)
  params = _params(model)
  hf_io.save_hf(params, model.config, str(tmp_path / "ckpt"), dtype="float32")
  return model, params, tmp_path / "ckpt"


def test_export_then_transformers_gives_same_logits(exported):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model, params, ckpt = exported
  tm = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
  tokens = np.random.RandomState(0).randint(0, V, (2, 7))
  with torch.no_grad():
    ref = tm(torch.tensor(tokens)).logits.numpy()
  inputs = base.ModelInputs(tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.tile(jnp.arange(7), (2, 1)),
                            mask=jnp.ones((2, 7), bool))
  logits, _ = jax.jit(model.forward)(params, model.embed(params, inputs))
  assert np.abs(np.asarray(logits) - ref).max() <= 1e-4


def test_export_import_round_trip_is_exact_and_sharded_index_works(tmp_path):
  model = _model(tie_embeddings=True)
  params = _params(model, seed=3)
  files = hf_io.save_hf(params, model.config, str(tmp_path), dtype="float32", max_shard_bytes=200_000)
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
  loaded, report = hf_io.load_hf(str(tmp_path), model)
  assert report.clean and report.loaded == len(hf_io._expected_keys(model.config))
  want, got = _flat(params), _flat(loaded)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_omni_prefixes_load_and_towers_are_skipped_and_counted(exported, tmp_path):
  model, params, ckpt = exported

  def to_omni(t):
    out = {("thinker." + k): v for k, v in t.items()}  # thinker.model.* and thinker.lm_head.weight
    out["thinker.audio_tower.conv1.weight"] = np.ones((4, 3), np.float32)
    out["thinker.visual.blocks.0.attn.qkv.weight"] = np.ones((6, 2), np.float32)
    out["talker.model.layers.0.mlp.up_proj.weight"] = np.ones((2, 2), np.float32)
    out["token2wav.code2wav_dit_model.x"] = np.ones((2,), np.float32)
    return out

  omni = _rewrite(ckpt, tmp_path / "omni", to_omni)
  loaded, report = hf_io.load_hf(str(omni), model)
  assert report.clean
  assert report.skipped == {"audio_tower": 1, "visual": 1, "talker": 1, "token2wav": 1}
  for k, v in _flat(params).items():
    np.testing.assert_array_equal(_flat(loaded)[k], v, err_msg=k)


def test_load_places_each_tensor_on_its_target_sharding(exported):
  model, params, ckpt = exported
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tensor"))
  specs = base.param_partition_specs(params, model.partition_rules(), {"embed": "fsdp", "mlp": "tensor",
                                                                       "vocab": "tensor"})
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))
  loaded, _ = hf_io.load_hf(str(ckpt), model, shardings=shardings)
  flat_s = {base.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda s: isinstance(s, NamedSharding))[0]}
  up = [v for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0] if base.path_str(p).endswith("up_kernel")][0]
  assert up.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]:
    assert v.sharding.is_equivalent_to(flat_s[base.path_str(p)], v.ndim), base.path_str(p)
  for k, v in _flat(params).items():
    np.testing.assert_array_equal(_flat(loaded)[k], v, err_msg=k)


def test_missing_unexpected_and_shape_mismatch_are_listed(exported, tmp_path):
  model, params, ckpt = exported

  def damage(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.rotary.inv_freq"] = np.ones((4,), np.float32)
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].T.copy()
    return t

  bad = _rewrite(ckpt, tmp_path / "bad", damage)
  with pytest.raises(ValueError) as e:
    hf_io.load_hf(str(bad), model)
  msg = str(e.value)
  assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected (1): model.layers.0.self_attn.rotary.inv_freq" in msg
  assert "shape mismatch (1): model.layers.0.mlp.down_proj.weight" in msg

  loaded, report = hf_io.load_hf(str(bad), model, strict=False, rng=jax.random.key(7))
  assert report.missing == ["model.layers.1.mlp.up_proj.weight"]
  assert report.unexpected == ["model.layers.0.self_attn.rotary.inv_freq"]
  assert len(report.shape_mismatch) == 1
  got, want = _flat(loaded), _flat(params)
  fresh = _flat(_params(model, seed=7))
  up = "decoder/layers/up_kernel"
  np.testing.assert_array_equal(got[up][0], want[up][0])  # layer 0 loaded
  np.testing.assert_array_equal(got[up][1], fresh[up][1])  # layer 1 missing: fresh init, reported
  np.testing.assert_array_equal(got["decoder/layers/q_kernel"], want["decoder/layers/q_kernel"])


def test_pickled_checkpoints_are_refused(tmp_path, exported):
  (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
  model = exported[0]
  with pytest.raises(ValueError, match="refusing a pickled checkpoint"):
    hf_io.load_hf(str(tmp_path / "pytorch_model.bin"), model)
  with pytest.raises(ValueError, match="only pickled"):
    hf_io.load_hf(str(tmp_path), model)
  (tmp_path / "model.pt").write_bytes(b"x")
  with pytest.raises(ValueError, match="refusing a pickled checkpoint"):
    hf_io.load_hf(str(tmp_path / "model.pt"), model)
  index = tmp_path / "idx"
  index.mkdir()
  (index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
  with pytest.raises(ValueError, match="non-safetensors"):
    hf_io.load_hf(str(index), model)


def test_wrong_dtype_and_config_mismatch_are_clear_errors(exported, tmp_path):
  model, _, ckpt = exported
  ints = _rewrite(ckpt, tmp_path / "ints", lambda t: {**t, "model.norm.weight": np.ones((128,), np.int32)})
  with pytest.raises(ValueError, match=r"model.norm.weight .*dtype I32"):
    hf_io.load_hf(str(ints), model)
  cfg = json.loads((ckpt / "config.json").read_text())
  (ckpt / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3, "rope_theta": 5.0,
                                                "rope_parameters": {"rope_theta": 5.0}}))
  with pytest.raises(ValueError, match=r"num_layers: model 2 vs checkpoint 3(.|\n)*rope_theta"):
    hf_io.load_hf(str(ckpt), model)


def test_tied_model_rejects_an_untied_checkpoint_head(exported):
  _, _, ckpt = exported
  tied = _model(tie_embeddings=True)
  with pytest.raises(ValueError, match="tie_embeddings: model True vs checkpoint False"):
    hf_io.load_hf(str(ckpt), tied)
  with pytest.raises(ValueError, match=r"unexpected \(1\): lm_head.weight"):
    hf_io.load_hf(str(ckpt), tied, check_config_json=False)


def test_bf16_export_loads_into_bf16_params(tmp_path):
  model = _model(param_dtype="bfloat16")
  params = _params(model)
  hf_io.save_hf(params, model.config, str(tmp_path), dtype="bfloat16")
  header, _ = safetensors_io.read_header(str(tmp_path / "model.safetensors"))
  assert {v["dtype"] for v in header.values()} == {"BF16"}
  loaded, _ = hf_io.load_hf(str(tmp_path), model)
  for k, v in _flat(params).items():
    assert _flat(loaded)[k].dtype == v.dtype
    np.testing.assert_array_equal(_flat(loaded)[k], v, err_msg=k)
