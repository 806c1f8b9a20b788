"""Offline stand-ins for a Qwen2.5-Omni checkpoint's tokenizer and for real clips, shared by the Omni tests.

`write_omni_tokenizer` saves a byte-level tokenizer (bytes at ids 0..255, no merges) with the Omni chat and media
markers at their real ids, so placeholder ids match a real thinker's config; `write_random_clip` writes a short
mp4 of random frames with an AAC tone, which PyAV decodes like any clip.
"""

import os

import numpy as np

# The Omni marker ids of a real Qwen2.5-Omni tokenizer (the vocabulary must reach past them).
OMNI_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
            "<|audio_bos|>": 151647, "<|audio_eos|>": 151648, "<|vision_bos|>": 151652,
            "<|vision_eos|>": 151653, "<|IMAGE|>": 151655, "<|VIDEO|>": 151656}


def write_omni_tokenizer(directory, extra_tokens: dict[str, int] | None = None) -> None:
  """tokenizer.json in `directory`; `extra_tokens` (text -> id) are added as normal (non-special) tokens."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers
  extra = extra_tokens or {}
  vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
  vocab.update(OMNI_IDS)
  vocab.update(extra)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in OMNI_IDS])
  if extra:
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in extra])
  tok.save(os.path.join(directory, "tokenizer.json"))


def write_random_clip(path, n_frames, fps, audio_s, sr, *, seed=0, w=60, h=44, rising=False) -> None:
  """Random RGB frames and a 330 Hz mono tone (its amplitude rising over time when `rising`)."""
  import av
  rng = np.random.RandomState(seed)
  c = av.open(str(path), "w")
  vs = c.add_stream("mpeg4", rate=fps)
  vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
  a = c.add_stream("aac", rate=sr)
  a.layout = "mono"
  for _ in range(n_frames):
    for p in vs.encode(av.VideoFrame.from_ndarray((rng.rand(h, w, 3) * 255).astype(np.uint8), format="rgb24")):
      c.mux(p)
  for p in vs.encode():
    c.mux(p)
  t = np.arange(int(audio_s * sr)) / sr
  wave = 0.3 * np.sin(2 * np.pi * 330 * t) * ((1 + t) if rising else 1.0)
  frame = av.AudioFrame.from_ndarray(wave.astype(np.float32)[None], format="flt", layout="mono")
  frame.sample_rate = sr
  for p in a.encode(frame):
    c.mux(p)
  for p in a.encode():
    c.mux(p)
  c.close()
