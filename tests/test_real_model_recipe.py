"""The real-model recipe end to end on a tiny random Qwen2.5-Omni thinker (issue 9, weights + acceptance).

Built offline here: a Qwen2.5-Omni thinker in transformers (random weights, towers included, saved as
safetensors), a byte-level tokenizer with the Omni marker ids and the answer tags saved beside it (a HF
checkpoint ships its tokenizer: the trainer reads it from model.hf_path), and three short mp4 clips. The
project's preprocessing turns the clips into feature records with the checkpoint's own towers; then the
trainer runs configs/smoke.py with the 3B-thinker preset's recipe, `model.hf_path` pointing at the checkpoint
(its dimensions copied into the model fields), mer_features data and 2 RL steps, and exports. Checked:
  (a) the parameters the run started from are the checkpoint's LM weights, tensor by tensor against the saved
      safetensors (read with the safetensors package) under the HF naming and layouts written out here;
  (b) the export holds every tower tensor byte for byte, and loads in transformers with no missing or unexpected
      key;
  (c) the exported thinker in transformers generates the same greedy tokens as the JAX policy the run ended with,
      on a text prompt and on a clip (transformers running the export's towers on its pixels and audio).
The RL stage starts from hf_path (stages = ('rl',)): the records carry no SFT demonstrations.

The run is a subprocess with one CPU device (the test process has conftest's eight fake ones, which the
trainer's mesh would take); a small driver wraps `Run.initial_params` and `artifacts.export_hf` to save the
parameters at step 0 and at the end. Shape legend: V vocab, D width, H heads, K KV heads, Dh head width, F MLP.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
av = pytest.importorskip("av")

from merr1_jax import rollout  # noqa: E402
from merr1_jax.models import base, hf_io, mllm, safetensors_io  # noqa: E402
from merr1_jax.rollout import sampling  # noqa: E402
from merr1_jax.task import prompts  # noqa: E402
from tests.helpers import shared  # noqa: E402
from tests.helpers.omni import write_omni_tokenizer, write_random_clip  # noqa: E402
from tests.helpers.torch_init import randomise  # noqa: E402
from tests.helpers.xla import COMPILE_FAST  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, H, K, DH, F, LAYERS = 32, 2, 1, 16, 64, 2
VOCAB = 151_680  # past every Omni marker id
# The answer tags as single tokens after the Omni added tokens, where data/tokenizer.build_qwen2_5 puts them.
TAG_IDS = {tag: 151665 + i for i, tag in enumerate(prompts.TAG_TOKENS)}
# name -> (frames, fps, audio seconds, sample rate, open-set label)
CLIPS = {"c_one": (6, 4, 1.2, 16000, "happy"), "c_two": (8, 4, 1.6, 22050, "sad, surprised"),
         "c_three": (4, 2, 1.0, 16000, "angry")}

_DRIVER = r"""
import json, sys
import numpy as np
import jax
from merr1_jax.infra import artifacts
from merr1_jax.training import setup as run_setup
from merr1_jax.training import trainer as train
from merr1_jax import config as cfglib
from merr1_jax.models import base

spec, overrides, workdir, out = sys.argv[1:5]
config = cfglib.load(spec)
for dotted, value in json.loads(overrides).items():
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = tuple(value) if isinstance(value, list) else value

def flat(params):
  return {base.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}

saved = {}
initial_params, export_hf = run_setup.Run.initial_params, artifacts.export_hf

def initial(self):
  params = initial_params(self)
  saved["init"] = flat(params)
  return params

def export(params, *args, **kwargs):
  saved["final"] = flat(params)
  return export_hf(params, *args, **kwargs)

run_setup.Run.initial_params = initial
artifacts.export_hf = export
train.train(config, workdir)
for name, tree in saved.items():
  np.savez(f"{out}/{name}.npz", **{k.replace("/", "."): v for k, v in tree.items()})
"""


def _preprocess_config(root, ckpt):
  import importlib.util
  spec = importlib.util.spec_from_file_location("_pp_recipe", os.path.join(ROOT, "configs", "preprocess.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.label_csv, c.subtitle_csv, c.video_dir = str(root / "label.csv"), str(root / "subtitle.csv"), str(root / "video")
  c.checkpoint_dir, c.output_dir = str(ckpt), str(root / "records")
  c.torch_dtype = c.feature_dtype = "float32"
  c.video.min_pixels, c.video.max_pixels = 2 * 28 * 28, 56 * 56  # 2x2 merged tokens per frame pair
  return c


def build_checkpoint(ckpt) -> None:
  """The tiny random thinker (towers included) saved by transformers as safetensors, the tokenizer beside it."""
  from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as co
  from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as mo
  cfg = co.Qwen2_5OmniThinkerConfig(
      audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                        d_model=16, output_dim=D, n_window=100, max_source_positions=1500),
      vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=D,
                         fullatt_block_indexes=[0], window_size=112),
      text_config=dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
                       num_attention_heads=H, num_key_value_heads=K, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}))
  cfg.vision_start_token_id = 151652  # transformers needs it set before a multimodal forward
  thinker = randomise(mo.Qwen2_5OmniThinkerForConditionalGeneration(cfg))
  thinker.save_pretrained(ckpt)
  write_omni_tokenizer(ckpt, TAG_IDS)


def make_records(root, ckpt) -> None:
  """Three clips -> feature records by the project's preprocessing with the checkpoint's towers (PyTorch)."""
  from merr1_jax.data import preprocess
  (root / "video").mkdir()
  for i, (name, (n, fps, audio_s, sr, _)) in enumerate(CLIPS.items()):
    write_random_clip(root / "video" / f"{name}.mp4", n, fps, audio_s, sr, seed=i)
  (root / "label.csv").write_text("name,openset\n" + "".join(f'{n},"{c[4]}"\n' for n, c in CLIPS.items()))
  (root / "subtitle.csv").write_text("name,english\n" + "".join(f"{n},I cannot believe it\n" for n in CLIPS))
  summary = preprocess.run(_preprocess_config(root, ckpt))
  assert (summary["written"], summary["failed"]) == (len(CLIPS), 0), summary


def train_overrides(ckpt, records) -> dict:
  """configs/smoke.py on the 3B-thinker preset's recipe, with the checkpoint's dimensions in the model fields (a
  real checkpoint matches its preset as it is; this one is tiny), kept to a couple of compiled programs."""
  mc = hf_io.config_from_hf(json.loads((ckpt / "config.json").read_text()))
  fields = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
            "rope_theta", "rms_eps", "tie_embeddings", "qkv_bias", "video_dim", "audio_dim", "projector",
            "video_token_id", "audio_token_id")
  over = {f"model.{f}": getattr(mc, f) for f in fields}
  over.update({
      "model.mrope_section": list(mc.mrope_section), "model.param_dtype": "float32",
      "model.compute_dtype": "float32", "model.scan_layers": False, "model.remat": "none",
      "model.max_seq_len": 2048, "model.hf_path": str(ckpt), "stages": ["rl"],
      "data.records_dir": str(records), "data.eval_split": "train",
      # 2 RL steps of 2 prompts x 2 slow samples, beta 0.04 against the loaded reference; no calibration pass
      # and no fast rollouts in RL (evaluation still runs both modes), so few programs compile.
      "rl.steps": 2, "rl.prompts_per_step": 2, "rl.n_slow": 2, "rl.n_fast": 0, "rl.calibration": "none",
      "rl.micro_batches": 1, "rl.max_new_tokens_slow": 8, "rl.max_new_tokens_fast": 4, "rl.learning_rate": 1e-4,
      "eval.batch_size": 4, "eval.max_new_tokens_slow": 8, "eval.max_new_tokens_fast": 4,
      "checkpoint.export_dtype": "float32", "log.plots": False})
  return over


def run_training(over: dict, work, out, cache_dir=os.path.join(ROOT, ".jax_cache")) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}  # one CPU device
  env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_COMPILATION_CACHE_DIR=cache_dir,
             XLA_FLAGS=COMPILE_FAST,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  spec = os.path.join(ROOT, "configs", "smoke.py") + ":model=qwen2_5_omni_3b_thinker,data=mer_features"
  os.makedirs(out, exist_ok=True)
  return subprocess.run([sys.executable, "-c", _DRIVER, spec, json.dumps(over), str(work), str(out)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def _build_recipe(root):
  build_checkpoint(root / "ckpt")
  make_records(root, root / "ckpt")
  proc = run_training(train_overrides(root / "ckpt", root / "records"), root / "work", root / "captured")
  assert proc.returncode == 0, proc.stderr[-6000:]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  """The recipe's run, once per session (tests/helpers/shared.py): every test only reads it."""
  from safetensors.numpy import load_file

  root = shared.build_once(tmp_path_factory, "real_model_recipe", _build_recipe)
  ckpt, work, out = root / "ckpt", root / "work", root / "captured"
  load = lambda name: {k.replace(".", "/"): v for k, v in np.load(out / f"{name}.npz").items()}  # noqa: E731
  config = hf_io.config_from_hf(json.loads((ckpt / "config.json").read_text()))
  return dict(root=root, ckpt=ckpt, export=work / "export", checkpoint=load_file(str(ckpt / "model.safetensors")),
              init=load("init"), final=load("final"), config=config,
              results=json.loads((work / "results.json").read_text()),
              metrics=[json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()])


def _hf_layout(flat: dict) -> dict:
  """Our parameter tree -> HF thinker LM names and layouts ([out, in] weights), written out by hand."""
  out = {"model.embed_tokens.weight": flat["decoder/embed/embedding"], "lm_head.weight": flat["decoder/lm_head"].T,
         "model.norm.weight": flat["decoder/final_norm/scale"]}
  for i in range(LAYERS):
    p, g = f"model.layers.{i}.", lambda name: flat[f"decoder/layers/{name}"][i]  # noqa: E731
    out.update({
        p + "self_attn.q_proj.weight": g("q_kernel").reshape(D, H * DH).T,
        p + "self_attn.k_proj.weight": g("k_kernel").reshape(D, K * DH).T,
        p + "self_attn.v_proj.weight": g("v_kernel").reshape(D, K * DH).T,
        p + "self_attn.q_proj.bias": g("q_bias").reshape(-1), p + "self_attn.k_proj.bias": g("k_bias").reshape(-1),
        p + "self_attn.v_proj.bias": g("v_bias").reshape(-1),
        p + "self_attn.o_proj.weight": g("o_kernel").reshape(H * DH, D).T,
        p + "mlp.gate_proj.weight": g("gate_kernel").T, p + "mlp.up_proj.weight": g("up_kernel").T,
        p + "mlp.down_proj.weight": g("down_kernel").T,
        p + "input_layernorm.weight": g("input_norm/scale"),
        p + "post_attention_layernorm.weight": g("post_norm/scale"),
    })
  return out


def test_the_run_starts_from_the_checkpoint_lm_weights(recipe):
  init = recipe["init"]
  got = _hf_layout(init)
  assert len(init) == 3 + 12  # every parameter is an LM tensor mapped above (identity projectors: none)
  for name, value in got.items():
    np.testing.assert_array_equal(value, recipe["checkpoint"][name], err_msg=name)
  # ... and then ran its 2 RL steps and the evaluation after them.
  assert [m["step"] for m in recipe["metrics"] if m["stage"] == "rl"] == [1, 2]
  assert set(recipe["results"]) == {"rl"}


def test_export_copies_the_towers_and_loads_in_transformers(recipe):
  def tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
      header, get = safetensors_io.open_tensors(str(f))
      out.update({k: (i["dtype"], tuple(i["shape"]), get(k).tobytes()) for k, i in header.items()})
    return out

  src, exp = tensors(recipe["ckpt"]), tensors(recipe["export"])
  assert src.keys() == exp.keys()
  towers = [k for k in src if k.startswith(("audio_tower.", "visual."))]
  assert towers and len(towers) + len(_hf_layout(recipe["init"])) == len(src)
  for k in towers:
    assert exp[k] == src[k], k  # dtype, shape and bytes
  for name, value in _hf_layout(recipe["final"]).items():  # the LM tensors are the trained policy's
    assert exp[name][2] == np.ascontiguousarray(value, np.float32).tobytes(), name
  tm, info = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
      str(recipe["export"]), dtype=torch.float32, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def _greedy_jax(recipe, inputs: base.ModelInputs, new: int) -> np.ndarray:
  model = mllm.build(recipe["config"])
  final = recipe["final"]
  params = jax.tree_util.tree_map_with_path(lambda p, a: jnp.asarray(final[base.path_str(p)]),
                                            model.abstract_params())
  ours = rollout.sample(model, params, inputs, mode="slow", num_samples=1, max_new_tokens=new,
                        method=sampling.Greedy(), stop_ids=(), rng=jax.random.key(0),
                        buckets=(inputs.tokens.shape[1],))
  return np.asarray(ours.completion)


def test_exported_thinker_generates_the_policy_greedy_tokens(recipe):
  """On a text prompt and on a clip (its record for us; its pixels and audio through the export's towers for
  transformers), generate(do_sample=False) of the exported thinker = rollout.sample(Greedy) of the final policy."""
  from merr1_jax.data import encoders, featurize, media, schema
  from merr1_jax.data import tokenizer as tokenizer_lib
  new = 10
  tm = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(recipe["export"]),
                                                                             dtype=torch.float32).eval()
  greedy = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0)

  tok = tokenizer_lib.load_hf(str(recipe["export"]))  # the tokenizer travels with the export
  ids = np.asarray([tok.encode("<|im_start|>user\nHow does the speaker feel?<|im_end|>\n<|im_start|>assistant\n")],
                   np.int32)
  n = ids.shape[1]
  ours = _greedy_jax(recipe, base.ModelInputs(
      tokens=ids, positions=np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (1, n, 3)),
      mask=np.ones(ids.shape, bool)),
      new)
  with torch.no_grad():
    theirs = tm.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones(1, n), **greedy)
  np.testing.assert_array_equal(ours, theirs[:, n:].numpy())
  assert len(np.unique(ours)) > 2  # varied tokens, not one repeated id

  name = "c_two"  # 2 s of video: an interleaved V A V A layout
  folder = recipe["root"] / "records" / "train"
  rec = schema.from_bytes((folder / f"{name}.rec").read_bytes())
  ids = np.asarray([json.loads((folder / f"{name}.layout.json").read_text())["prompt_ids"]], np.int32)
  n = ids.shape[1]
  ours = _greedy_jax(recipe, base.ModelInputs(
      tokens=ids, positions=rec.position_ids.T[None], mask=np.ones(ids.shape, bool), video=rec.video[None],
      video_mask=np.ones((1, rec.n_video), bool), audio=rec.audio[None], audio_mask=np.ones((1, rec.n_audio), bool)),
      new)
  pp = _preprocess_config(recipe["root"], recipe["export"])
  enc = encoders.OmniTowerEncoder(str(recipe["export"]))
  video = media.read_video(os.path.join(pp.video_dir, f"{name}.mp4"), featurize._video_spec(pp))
  pixels, grid = enc.pixel_inputs(video.frames)
  mel, mel_mask = enc.audio_inputs(media.read_audio(os.path.join(pp.video_dir, f"{name}.mp4")))
  with torch.no_grad():
    theirs = tm.generate(
        input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.ones(1, n, dtype=torch.long),
        pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.tensor([grid]),
        input_features=torch.from_numpy(mel), feature_attention_mask=torch.from_numpy(mel_mask),
        use_audio_in_video=True, video_second_per_grid=torch.tensor([2 / video.sample_fps]), **greedy)
  np.testing.assert_array_equal(ours, theirs[:, n:].numpy())
