"""HF safetensors import/export: round trips (projectors included), Omni prefixes and skipped towers, sharding,
bad checkpoints and config values the decoder does not implement."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from merr1_jax.models import base, hf_io, mllm, safetensors_io
from tests.helpers.trees import flat_params as _flat

V = 96


def _model(**kw):
  return mllm.build("tiny", vocab_size=V, video_dim=0, audio_dim=0, **kw)


def _params(model, seed=0):
  return jax.jit(model.init_params)(jax.random.key(seed))


def _noisy(params, seed=1, std=0.1):
  """Every leaf moved by noise: a fresh init has zero biases and unit norms, which would hide a wrong or
  missing mapping of those tensors."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [(x + std * jax.random.normal(k, x.shape)).astype(x.dtype)
                                      for x, k in zip(leaves, keys)])


def _logits(model, params, tokens):
  b, l = tokens.shape
  inputs = base.ModelInputs(tokens=jnp.asarray(tokens, jnp.int32), positions=jnp.tile(jnp.arange(l), (b, 1)),
                            mask=jnp.ones((b, l), bool))
  return np.asarray(jax.jit(model.forward)(params, model.embed(params, inputs))[0])




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
  params = _noisy(_params(model))
  hf_io.save_hf(params, model.config, str(tmp_path / "ckpt"), dtype="float32")
  return model, params, tmp_path / "ckpt"


def _transformers_logits(ckpt, tokens):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tm, info = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32,
                                                               output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  with torch.no_grad():
    return tm.eval()(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_export_then_transformers_gives_same_logits(tmp_path, tie):
  model = _model(tie_embeddings=tie)
  params = _noisy(_params(model))  # non-zero biases, non-unit norms: their mapping shows in the logits
  hf_io.save_hf(params, model.config, str(tmp_path), dtype="float32")
  header, _ = safetensors_io.read_header(str(tmp_path / "model.safetensors"))
  assert ("lm_head.weight" in header) == (not tie)
  tokens = np.random.RandomState(0).randint(0, V, (2, 7))
  assert np.abs(_logits(model, params, tokens) - _transformers_logits(tmp_path, tokens)).max() <= 1e-4


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


def test_missing_keys_are_named_with_the_checkpoints_own_prefix(exported, tmp_path):
  model, _, ckpt = exported

  def to_thinker(t):
    out = {"thinker." + k: v for k, v in t.items()}
    del out["thinker.model.layers.1.mlp.up_proj.weight"], out["thinker.lm_head.weight"]
    return out

  with pytest.raises(ValueError) as e:
    hf_io.load_hf(str(_rewrite(ckpt, tmp_path / "omni", to_thinker)), model)
  assert "missing (2): thinker.model.layers.1.mlp.up_proj.weight, thinker.lm_head.weight" in str(e.value)

  def to_bare(t):  # a bare text model: no prefix at all
    out = {k.removeprefix("model."): v for k, v in t.items()}
    del out["layers.0.input_layernorm.weight"], out["lm_head.weight"]
    return out

  _, report = hf_io.load_hf(str(_rewrite(ckpt, tmp_path / "bare", to_bare)), model, strict=False)
  assert report.missing == ["layers.0.input_layernorm.weight", "lm_head.weight"]


# ------------------------------------------------------------------------------------ projectors in the export


def _mllm(**kw):
  return mllm.build("tiny", vocab_size=V, tie_embeddings=False, **kw)  # video_dim 32, audio_dim 16: 'mlp'


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_export_carries_the_projectors_and_load_restores_every_param_bit_exactly(tmp_path, param_dtype):
  model = _mllm(param_dtype=param_dtype)
  params = _noisy(_params(model, seed=4))
  flat = _flat(params)
  proj = sorted(k for k in flat if "_proj/" in k)
  assert len(proj) == 8 and all(np.abs(flat[k].astype(np.float32)).max() > 0 for k in proj)  # biases too
  files = hf_io.save_hf(params, model.config, str(tmp_path), dtype=param_dtype)
  assert hf_io.PROJECTOR_FILE in files and "model.safetensors.index.json" in files
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == {"model.safetensors"}  # the HF loaders never see our file
  header, _ = safetensors_io.read_header(str(tmp_path / hf_io.PROJECTOR_FILE))
  assert sorted(header) == proj
  assert {h["dtype"] for h in header.values()} == {"F32" if param_dtype == "float32" else "BF16"}

  loaded, report = hf_io.load_hf(str(tmp_path), model, projectors="require")
  assert report.clean and report.projectors == "loaded"
  assert report.loaded == len(hf_io._expected_keys(model.config)) + len(proj)
  got = _flat(loaded)
  assert got.keys() == flat.keys()
  for k, v in flat.items():
    assert got[k].dtype == v.dtype, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_export_with_projectors_still_loads_in_transformers(tmp_path):
  model = _mllm()
  params = _noisy(_params(model, seed=2))
  hf_io.save_hf(params, model.config, str(tmp_path), dtype="float32")
  assert (tmp_path / hf_io.PROJECTOR_FILE).exists()
  tokens = np.random.RandomState(1).randint(0, V - 2, (2, 6))  # no placeholders: text-only logits
  assert np.abs(_logits(model, params, tokens) - _transformers_logits(tmp_path, tokens)).max() <= 1e-4


def test_projector_file_absent_present_or_mismatched(tmp_path, caplog):
  model = _mllm()
  params = _noisy(_params(model))
  lm_only = mllm.build("tiny", vocab_size=V, tie_embeddings=False, video_dim=0, audio_dim=0)
  hf_io.save_hf(_params(lm_only), lm_only.config, str(tmp_path / "base"), dtype="float32")  # a base checkpoint
  assert not (tmp_path / "base" / hf_io.PROJECTOR_FILE).exists()
  with pytest.raises(ValueError, match=f"no {hf_io.PROJECTOR_FILE}, but the model has parameters(.|\n)*video_proj"):
    hf_io.load_hf(str(tmp_path / "base"), model, projectors="require")
  with caplog.at_level(logging.WARNING, logger="merr1_jax.models.hf_io"):
    loaded, report = hf_io.load_hf(str(tmp_path / "base"), model, rng=jax.random.key(9))
  assert report.clean and report.projectors == "init"
  assert hf_io.PROJECTOR_FILE in caplog.text and "fresh init" in caplog.text
  fresh = _flat(_params(model, seed=9))
  np.testing.assert_array_equal(_flat(loaded)["video_proj/in_kernel"], fresh["video_proj/in_kernel"])
  with pytest.raises(ValueError, match="projectors must be"):
    hf_io.load_hf(str(tmp_path / "base"), model, projectors="yes")

  hf_io.save_hf(params, model.config, str(tmp_path / "full"), dtype="float32")
  # The file is checked like the HF tensors: a model without an audio projector finds it unexpected ...
  video_only = _mllm(audio_dim=0)
  with pytest.raises(ValueError, match=rf"unexpected \(4\): {hf_io.PROJECTOR_FILE}:audio_proj/in_bias"):
    hf_io.load_hf(str(tmp_path / "full"), video_only)
  # ... a wider audio feature a shape mismatch, and a file without some projector tensors lists them missing.
  with pytest.raises(ValueError, match=rf"shape mismatch \(1\): {hf_io.PROJECTOR_FILE}:audio_proj/in_kernel"):
    hf_io.load_hf(str(tmp_path / "full"), _mllm(audio_dim=24))
  header, get = safetensors_io.open_tensors(str(tmp_path / "full" / hf_io.PROJECTOR_FILE))
  kept = {k: np.array(get(k)) for k in header if not k.startswith("video_proj/")}
  safetensors_io.write(str(tmp_path / "full" / hf_io.PROJECTOR_FILE),
                       [(k, v.shape, v.dtype, lambda v=v: v) for k, v in kept.items()])
  with pytest.raises(ValueError, match=rf"missing \(4\): {hf_io.PROJECTOR_FILE}:video_proj/in_bias"):
    hf_io.load_hf(str(tmp_path / "full"), model)


# --------------------------------------------------------------------------------------------- bad input


def _qwen2_config(**kw):
  return {"model_type": "qwen2", "vocab_size": V, "hidden_size": 128, "intermediate_size": 384,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, **kw}


def test_config_json_missing_key_or_malformed_names_the_file(exported):
  model, _, ckpt = exported
  cfg = json.loads((ckpt / "config.json").read_text())
  del cfg["num_attention_heads"]
  (ckpt / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=rf"{ckpt}/config.json: missing required key 'num_attention_heads'"):
    hf_io.load_hf(str(ckpt), model)
  (ckpt / "config.json").write_text('{"vocab_size": 96,')
  with pytest.raises(ValueError, match=rf"{ckpt}/config.json: malformed JSON"):
    hf_io.load_hf(str(ckpt), model)
  (ckpt / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match=rf"{ckpt}/config.json: expected a JSON object"):
    hf_io.load_hf(str(ckpt), model)
  # Nested configs name the key's full path.
  with pytest.raises(ValueError, match="missing required key 'thinker_config.text_config.vocab_size'"):
    hf_io.config_from_hf({"thinker_config": {"text_config": {"hidden_size": 8, "num_attention_heads": 2}}})


def test_index_without_weight_map_or_malformed_names_the_index(exported, tmp_path):
  model = exported[0]
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"metadata": {"total_size": 1}}))
  with pytest.raises(ValueError, match=rf"{index}: no 'weight_map' object"):
    hf_io.load_hf(str(tmp_path), model)
  index.write_text("{not json")
  with pytest.raises(ValueError, match=rf"{index}: malformed JSON"):
    hf_io.load_hf(str(tmp_path), model)
  index.write_text(json.dumps({"weight_map": {"model.norm.weight": 3}}))
  with pytest.raises(ValueError, match=rf"{index}: weight_map values must be shard file names"):
    hf_io.load_hf(str(tmp_path), model)


def test_truncated_shard_names_the_file_and_the_tensor(exported, tmp_path):
  model, _, ckpt = exported
  shard = ckpt / "model.safetensors"
  header, start = safetensors_io.read_header(str(shard))
  last = max(header, key=lambda k: header[k]["data_offsets"][1])
  data = shard.read_bytes()
  (tmp_path / "model.safetensors").write_bytes(data[:len(data) - 10])
  with pytest.raises(ValueError, match=rf"{tmp_path}/model.safetensors: tensor '{last}' ends at data byte "
                                       r"\d+ but the file holds only \d+ data bytes \(truncated"):
    hf_io.load_hf(str(tmp_path), model, check_config_json=False)
  # A header whose offsets disagree with the shape is caught the same way, before any data is read.
  bad = dict(header)
  bad[last] = {**header[last], "data_offsets": [header[last]["data_offsets"][0], header[last]["data_offsets"][1] - 4]}
  blob = json.dumps(bad).encode()
  (tmp_path / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + data[start:])
  with pytest.raises(ValueError, match=rf"tensor '{last}' byte range"):
    safetensors_io.read_header(str(tmp_path / "model.safetensors"))


@pytest.mark.parametrize("edit,field,value", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
     "rope_scaling.type", "'yarn'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling.rope_type", "'linear'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}),
     "rope_parameters.rope_type", "'dynamic'"),
    (dict(rope_parameters={"rope_theta": 1e6, "factor": 2.0}), "rope_parameters.factor", "2.0"),
    (dict(use_sliding_window=True, sliding_window=4096), "use_sliding_window", "True"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types", r"\['full_attention'"),
    (dict(hidden_act="gelu"), "hidden_act", "'gelu'"),
    (dict(thinker_config={"text_config": _qwen2_config(hidden_act="relu")}),
     "thinker_config.text_config.hidden_act", "'relu'"),
])
def test_unsupported_config_values_are_refused(exported, edit, field, value):
  model, _, ckpt = exported
  cfg = {**json.loads((ckpt / "config.json").read_text()), **edit}
  (ckpt / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=rf"{ckpt}/config.json: {field} = {value}.* is not supported"):
    hf_io.load_hf(str(ckpt), model)


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "default", "rope_theta": 1e6},
    # Qwen2.5-Omni's published text_config spells M-RoPE as plain RoPE with sections (both type keys) ...
    {"mrope_section": [8, 4, 4], "rope_type": "default", "type": "default"},
    # ... and Qwen2-VL-era configs as type 'mrope'.
    {"type": "mrope", "mrope_section": [8, 4, 4]},
])
def test_plain_rope_and_mrope_configs_are_accepted(rope):
  cfg = hf_io.config_from_hf(_qwen2_config(rope_scaling=rope, rope_theta=1e6, hidden_act="silu",
                                           use_sliding_window=False, sliding_window=None))
  assert cfg.rope_theta == 1e6
  assert cfg.mrope_section == (tuple(rope["mrope_section"]) if rope and "mrope_section" in rope else None)
