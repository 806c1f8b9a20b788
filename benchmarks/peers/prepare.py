"""Builds what the three GRPO scripts share: the tokenizer, the random-init weights and each workload's prompts.

Run in the project venv (compare.py does it first):

  python benchmarks/peers/prepare.py [--out_dir benchmarks/peers/.work]

Writes into <out_dir>/model/ a HF Qwen2 checkpoint (model.safetensors in float32, config.json via
hf_io.save_hf) with tokenizer.json + tokenizer_config.json beside it, and one prompts file per workload of
spec.WORKLOADS (<out_dir>/prompts.json for 'peer', prompts_<name>.json for the others: the same corpus texts,
cut to each workload's prompt length). Each side loads these same files, so vocab, dimensions and the initial
weights are identical in all three. The checkpoint is text only whatever the workload: the projectors our side
uses in the 'mer' workload are not in it (ours_grpo.py says how they are initialised).

The tokenizer is the MER-Synth byte-level BPE (no hub is reachable), padded with plain added tokens up to the
model's 8192-id vocabulary so that every id a random-init model samples decodes to some text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec  # noqa: E402

from merr1_jax.data import synth  # noqa: E402
from merr1_jax.models import hf_io, mllm, presets  # noqa: E402
from merr1_jax.task import prompts as prompt_fmt  # noqa: E402

_MARKERS = re.compile("|".join(re.escape(m) for m in prompt_fmt.SPECIAL_TOKENS + prompt_fmt.TAG_TOKENS))


def model_config():
  """small_20m's decoder, text only: the projectors are dropped so the three models hold the same weights."""
  m = spec.MODEL
  return presets.get("small_20m", vocab_size=m["vocab_size"], video_dim=0, audio_dim=0,
                     max_seq_len=m["max_seq_len"], rms_eps=m["rms_eps"], param_dtype="float32",
                     compute_dtype="float32")


def build_tokenizer(vocab_size: int):
  """MER-Synth BPE (1024 ids) + '<|x{i}|>' added tokens up to `vocab_size` ids."""
  import tokenizers
  tok = synth.build_tokenizer(vocab_size=1024)
  have = tok.vocab_size
  if have > vocab_size:
    raise ValueError(f"tokenizer has {have} ids, more than the model vocab {vocab_size}")
  tok.tok.add_tokens([tokenizers.AddedToken(f"<|x{i}|>", special=False, normalized=False)
                      for i in range(have, vocab_size)])
  if tok.vocab_size != vocab_size:
    raise ValueError(f"padded tokenizer has {tok.vocab_size} ids, expected {vocab_size}")
  return tok


def make_prompts(tok, n: int, length: int) -> dict:
  """n plain-text prompts (MER-Synth subtitles and reasoning, markers stripped) whose tokenisation is exactly
  `length` ids, checked by re-encoding the decoded text (so a peer tokenising the text gets the same ids)."""
  corpus = [_MARKERS.sub(" ", t) for t in synth.corpus_texts(synth.SynthConfig(), limit=400)]
  out_texts, out_ids, start = [], [], 0
  while len(out_texts) < n:
    text = " ".join(re.sub(r"\s+", " ", t).strip() for t in corpus[start:start + 40])
    start += 40
    if start > len(corpus):
      raise ValueError(f"could not build {n} prompts of {length} tokens from the MER-Synth corpus")
    ids = tok.encode(text)
    for cut in range(length, length - 8, -1):  # a cut inside a merge may re-encode differently: back off
      t = tok.decode(ids[:cut])
      if len(tok.encode(t)) == length:
        break
      t = None
    if t is None:
      continue
    out_texts.append(t)
    out_ids.append(tok.encode(t))
  return {"texts": out_texts, "ids": out_ids}


def prepare(out_dir: str = spec.WORK_DIR, seed: int = spec.SEED) -> dict:
  cfg = model_config()
  tok = build_tokenizer(cfg.vocab_size)
  model = mllm.build(cfg)
  params = model.init_params(jax.random.key(seed))
  ckpt = os.path.join(out_dir, "model")
  os.makedirs(ckpt, exist_ok=True)
  hf_io.save_hf(params, cfg, ckpt, dtype="float32")
  tok.save(ckpt)
  eos, pad = prompt_fmt.IM_END, prompt_fmt.PAD_TOKEN
  with open(os.path.join(ckpt, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad,
               "model_max_length": cfg.max_seq_len, "padding_side": "left", "clean_up_tokenization_spaces": False},
              f, indent=2)
  with open(os.path.join(ckpt, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, f)
  for wl in spec.WORKLOADS.values():  # every workload's prompts: a few seconds of tokenising
    prompts = make_prompts(tok, wl.num_prompts, wl.prompt_len)
    prompts.update(eos_id=tok.eos_id, pad_id=tok.pad_id)
    with open(os.path.join(out_dir, os.path.basename(wl.prompts_file)), "w") as f:
      json.dump(prompts, f)
  n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(params)))
  info = dict(params=n_params, vocab=cfg.vocab_size, d_model=cfg.d_model, layers=cfg.num_layers,
              heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, mlp=cfg.mlp_dim, ckpt=ckpt)
  with open(os.path.join(out_dir, "model_info.json"), "w") as f:
    json.dump(info, f)
  return info


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out_dir", default=spec.WORK_DIR)
  args = ap.parse_args(argv)
  print(json.dumps(prepare(args.out_dir)))


if __name__ == "__main__":
  main()
