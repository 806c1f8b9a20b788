"""HF export of a trained policy: back into a Qwen2.5-Omni thinker checkpoint with its towers copied through
(`save_hf(..., copy_from=SRC)`), and the acceptance check that an exported tiny policy generates the same
greedy tokens in transformers as our sampler."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rollout
from merr1_jax.models import base, hf_io, mllm, safetensors_io
from merr1_jax.rollout import sampling
from tests.helpers.torch_init import randomise
from tests.helpers.trees import flat_params as _flat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# transformers builds the Omni thinker's special tokens into its config: the vocabulary must hold them,
# so the tiny thinker has a real-sized vocabulary and a tiny everything else.
OMNI_VOCAB = 151_700




def _tensors(ckpt_dir):
  """name -> (dtype code, shape, raw bytes) over every safetensors file of a directory."""
  out = {}
  for f in sorted(ckpt_dir.glob("*.safetensors")):
    header, get = safetensors_io.open_tensors(str(f))
    for k, info in header.items():
      out[k] = (info["dtype"], tuple(info["shape"]), get(k).tobytes())
  return out


def _is_lm(key):
  return key.removeprefix("thinker.").startswith(("model.", "lm_head."))


def _thinker_config(text_extra=None, **thinker_kw):
  """A tiny Qwen2.5-Omni thinker config. No tie flag unless asked: transformers' defaults are the case real
  checkpoints hit (text_config True, thinker False; the thinker-level flag decides, so the head is untied)."""
  from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as omni_cfg
  text = dict(vocab_size=OMNI_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
              **(text_extra or {}))
  audio = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=16,
               output_dim=32, n_window=4, max_source_positions=64)
  vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                fullatt_block_indexes=[0], patch_size=2, temporal_patch_size=1, spatial_merge_size=1, window_size=4)
  return omni_cfg.Qwen2_5OmniThinkerConfig(text_config=text, audio_config=audio, vision_config=vision, **thinker_kw)




@pytest.fixture(scope="module")
def omni_src(tmp_path_factory):
  """A tiny random Qwen2.5-Omni thinker saved by transformers (offline), default tie flags (untied head),
  with a tokenizer-like side file."""
  torch.manual_seed(0)
  model = transformers.Qwen2_5OmniThinkerForConditionalGeneration(_thinker_config()).eval()
  src = tmp_path_factory.mktemp("omni") / "src"
  model.save_pretrained(str(src))
  (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
  (src / "spk_dict.pt").write_bytes(b"\x80\x04 a pickle that must not be copied")
  return src


def _thinker_logits(tm, tokens):
  with torch.no_grad():
    return tm(input_ids=torch.tensor(tokens)).logits.numpy()


def _our_logits(model, params, tokens):
  b, l = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[:, None], (b, l, 3))  # text: the 3 M-RoPE ids coincide
  inputs = base.ModelInputs(tokens=jnp.asarray(tokens, jnp.int32), positions=pos, mask=jnp.ones((b, l), bool))
  return np.asarray(jax.jit(model.forward)(params, model.embed(params, inputs))[0])


@pytest.mark.parametrize("variant,text_extra,thinker_kw,tied", [
    ("default", None, {}, False),  # what transformers writes by default: an untied lm_head.weight
    ("text_flag_false", {"tie_word_embeddings": False}, {}, False),
    ("thinker_tied", None, {"tie_word_embeddings": True}, True),  # text flag (True) agrees; no lm_head saved
    ("thinker_tied_text_untied", {"tie_word_embeddings": False}, {"tie_word_embeddings": True}, True),
])
def test_thinker_tie_follows_the_thinker_flag_and_loads_strictly(tmp_path, variant, text_extra, thinker_kw, tied):
  tm = randomise(transformers.Qwen2_5OmniThinkerForConditionalGeneration(_thinker_config(text_extra, **thinker_kw)))
  shares = tm.lm_head.weight.data_ptr() == tm.get_input_embeddings().weight.data_ptr()
  assert shares == tied, "transformers ties by the thinker-level flag (the premise of this test)"
  tm.save_pretrained(str(tmp_path))
  header, _ = safetensors_io.read_header(str(tmp_path / "model.safetensors"))
  assert ("lm_head.weight" in header) == (not tied)

  cfg = hf_io.config_from_hf(json.loads((tmp_path / "config.json").read_text()), video_dim=0, audio_dim=0)
  assert cfg.tie_embeddings == tied
  model = mllm.build(cfg)
  params, report = hf_io.load_hf(str(tmp_path), model, strict=True)
  assert report.clean and report.loaded == len(hf_io._expected_keys(cfg))
  tokens = np.random.RandomState(0).randint(0, 1000, (2, 6))
  np.testing.assert_allclose(_our_logits(model, params, tokens), _thinker_logits(tm, tokens), atol=1e-4, rtol=1e-4)


def test_omni_export_copies_towers_and_loads_in_transformers(omni_src, tmp_path):
  hf = json.loads((omni_src / "config.json").read_text())
  model = mllm.build(hf_io.config_from_hf(hf, video_dim=0, audio_dim=0))
  assert not model.config.tie_embeddings  # transformers' default thinker: untied
  params, report = hf_io.load_hf(str(omni_src), model)
  assert report.clean and report.skipped.get("audio_tower") and report.skipped.get("visual")

  # "Training": every LM parameter moves.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  trained = jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
                                         for x, k in zip(leaves, keys)])
  out = tmp_path / "export"
  files = hf_io.save_hf(trained, model.config, str(out), dtype="float32", layout="omni_thinker",
                        copy_from=str(omni_src), max_shard_bytes=8_000_000)
  assert "model.safetensors.index.json" in files  # the streaming path across several shards
  assert "tokenizer_config.json" in files and "config.json" in files and "spk_dict.pt" not in files
  assert not (out / "spk_dict.pt").exists()
  assert json.loads((out / "config.json").read_text()) == hf

  src_t, out_t = _tensors(omni_src), _tensors(out)
  assert src_t.keys() == out_t.keys()
  towers = [k for k in src_t if not _is_lm(k)]
  assert any(k.startswith("audio_tower.") for k in towers) and any(k.startswith("visual.") for k in towers)
  for k in towers:
    assert out_t[k] == src_t[k], k  # dtype, shape and bytes

  # LM weights: the trained ones, read back through our importer ...
  reloaded, report = hf_io.load_hf(str(out), model)
  assert report.clean
  want = _flat(trained)
  for k, v in _flat(reloaded).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)

  # ... and through transformers, checked against our tensors with the layout written out here.
  tm, info = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      str(out), dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  up = [v for k, v in sd.items() if k.endswith("layers.1.mlp.up_proj.weight") and "audio" not in k]
  assert len(up) == 1
  np.testing.assert_array_equal(up[0], want["decoder/layers/up_kernel"][1].T)
  q = [v for k, v in sd.items() if k.endswith("layers.0.self_attn.q_proj.weight") and "audio" not in k]
  np.testing.assert_array_equal(q[0], want["decoder/layers/q_kernel"][0].reshape(32, -1).T)
  np.testing.assert_array_equal(tm.lm_head.weight.detach().numpy(), want["decoder/lm_head"].T)
  tower = [k for k in src_t if k.startswith("audio_tower.") and k.endswith("weight")][0]
  np.testing.assert_array_equal(sd[[k for k in sd if k.endswith(tower)][0]],
                                np.frombuffer(src_t[tower][2], np.float32).reshape(src_t[tower][1]))

  # Text-only logits of the loaded thinker equal our forward (3-D positions coincide for text).
  tokens = np.random.RandomState(0).randint(0, 1000, (1, 6))
  np.testing.assert_allclose(_our_logits(model, trained, tokens), _thinker_logits(tm, tokens), atol=1e-4, rtol=1e-4)


def test_full_omni_layout_keeps_the_thinker_prefix_and_talker(omni_src, tmp_path):
  """A full Qwen2.5-Omni checkpoint (`thinker.` prefix, talker weights): the export keeps that layout."""
  hf = json.loads((omni_src / "config.json").read_text())
  full = tmp_path / "full"
  full.mkdir()
  header, get = safetensors_io.open_tensors(str(omni_src / "model.safetensors"))
  talker = np.arange(6, dtype=np.float32).reshape(2, 3)
  tensors = [("thinker." + k, tuple(i["shape"]), np.dtype(safetensors_io.DTYPES[i["dtype"]]),
              lambda k=k: get(k)) for k, i in header.items()]
  tensors.append(("talker.model.layers.0.mlp.up_proj.weight", (2, 3), np.float32, lambda: talker))
  safetensors_io.write(str(full / "model.safetensors"), tensors)
  (full / "config.json").write_text(json.dumps({"model_type": "qwen2_5_omni", "thinker_config": hf}))

  kwargs = hf_io.export_kwargs(str(full))
  assert kwargs == {"layout": "omni_thinker", "copy_from": str(full)}
  assert hf_io.export_kwargs("") == {}
  model = mllm.build(hf_io.config_from_hf(hf, video_dim=0, audio_dim=0))
  params, _ = hf_io.load_hf(str(full), model)
  trained = jax.tree.map(lambda x: x * 2, params)
  hf_io.save_hf(trained, model.config, str(tmp_path / "out"), dtype="float32", **kwargs)
  src_t, out_t = _tensors(full), _tensors(tmp_path / "out")
  assert src_t.keys() == out_t.keys()
  assert all(k.startswith(("thinker.", "talker.")) for k in out_t)
  assert out_t["talker.model.layers.0.mlp.up_proj.weight"] == src_t["talker.model.layers.0.mlp.up_proj.weight"]
  norm = np.frombuffer(out_t["thinker.model.norm.weight"][2], np.float32)
  np.testing.assert_array_equal(norm, 2 * np.frombuffer(src_t["thinker.model.norm.weight"][2], np.float32))


def test_copy_from_refuses_a_mismatched_model_and_a_qwen2_layout(omni_src, tmp_path):
  hf = json.loads((omni_src / "config.json").read_text())
  model = mllm.build(hf_io.config_from_hf(hf, video_dim=0, audio_dim=0))
  params = jax.jit(model.init_params)(jax.random.key(0))
  with pytest.raises(ValueError, match="copy_from needs layout='omni_thinker'"):
    hf_io.save_hf(params, model.config, str(tmp_path / "a"), layout="qwen2", copy_from=str(omni_src))
  other = mllm.build(hf_io.config_from_hf(hf, video_dim=0, audio_dim=0, num_layers=1))
  with pytest.raises(ValueError, match=r"config.json does not match(.|\n)*num_layers: model 1 vs checkpoint 2"):
    hf_io.save_hf(jax.jit(other.init_params)(jax.random.key(0)), other.config, str(tmp_path / "b"),
                  layout="omni_thinker", copy_from=str(omni_src))
  with pytest.raises(ValueError, match="same directory"):
    hf_io.save_hf(params, model.config, str(omni_src), layout="omni_thinker", copy_from=str(omni_src))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_exported_tiny_policy_generates_the_same_greedy_tokens_in_transformers(tmp_path):
  """Acceptance: the exported checkpoint of a tiny policy loads in transformers and generate(do_sample=False)
  produces exactly the tokens of rollout.sample with sampling.Greedy() (text-only prompts, no stop tokens)."""
  vocab, prompt_len, new = 96, 8, 12
  model = mllm.build("tiny", vocab_size=vocab, video_dim=0, audio_dim=0, tie_embeddings=False)
  params = jax.jit(model.init_params)(jax.random.key(5))
  # A random init is close to uniform: sharpen the head so that greedy choices are far from ties.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 8 if base.path_str(p).endswith("lm_head") else x, params)
  hf_io.save_hf(params, model.config, str(tmp_path), dtype="float32")

  prompts = np.random.RandomState(3).randint(1, vocab, (2, prompt_len)).astype(np.int32)
  inputs = base.ModelInputs(tokens=prompts, positions=np.tile(np.arange(prompt_len, dtype=np.int32), (2, 1)),
                            mask=np.ones((2, prompt_len), bool))
  ours = rollout.sample(model, params, inputs, mode="slow", num_samples=1, max_new_tokens=new,
                        method=sampling.Greedy(), stop_ids=(), rng=jax.random.key(0), buckets=(prompt_len,))
  assert np.asarray(ours.length).tolist() == [new, new]

  tm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = tm.generate(torch.tensor(prompts, dtype=torch.long), attention_mask=torch.ones(2, prompt_len),
                         do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                         pad_token_id=0)
  theirs = theirs[:, prompt_len:].numpy()
  np.testing.assert_array_equal(np.asarray(ours.completion), theirs)
  assert len(np.unique(theirs)) > 2  # the comparison covers varied tokens, not one repeated id
