"""Pluggable clip encoders for offline preprocessing, and the Qwen2.5-Omni tower encoder.

An `Encoder` turns decoded media (media.Video frames, 16 kHz audio) into feature rows, says how its
placeholders are laid out in the prompt (`placeholder_runs`) and, for M-RoPE models, computes the 3-D position
ids of a whole tokenised prompt (`position_ids`). The preprocessing job (preprocess.py) owns everything else.

`OmniTowerEncoder` runs the vision and audio towers of a Qwen2.5-Omni thinker from a local HF checkpoint
directory in PyTorch (transformers), never the LM. Their outputs already live in the LM's embedding space
(feature_space 'lm_embed'). The pixel and audio inputs are prepared as the Omni processor prepares them:
frames are normalised with the CLIP mean/std and cut into [t, h, w] patch grids (temporal patch 2, patch 14,
merge 2) in the vision tower's patch order; audio becomes Whisper log-mel features (128 bins, 10 ms hop,
padded to 30 s with a mask). The placeholder layout comes from the processor's own `replace_video_with_audio_token`
(chunks of 2 s: video rows then audio rows) and the position ids from the thinker's own `get_rope_index`, so
both are transformers' code, not a copy of it. torch and transformers' modeling code are imported lazily: the
core package never needs torch.

Shape legend: T frames, H/W frame size, N audio samples, P patches, C = 3 * temporal_patch * patch**2,
Nv/Na video/audio feature rows, D the LM width, L prompt tokens.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Protocol

import numpy as np

from merr1_jax.data import media

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN / STD: the Qwen2-VL/Omni normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAYOUTS = ("separate", "interleaved")
VISION_START_TOKEN_ID = 151652  # some thinker configs lack it; transformers needs it for a multimodal forward


@dataclasses.dataclass(frozen=True)
class Encoded:
  video: np.ndarray  # [Nv, D] float32, in prompt order
  audio: np.ndarray  # [Na, D] float32
  video_grid_thw: tuple[int, int, int]  # patch grid (before the 2x2 merge)
  second_per_grid: float  # seconds of video per temporal grid step
  audio_feature_len: int  # valid log-mel frames


class Encoder(Protocol):
  feature_space: str  # schema.FEATURE_SPACES
  feature_dim: int

  def encode(self, video: media.Video, audio_N: np.ndarray) -> Encoded: ...

  def placeholder_runs(self, enc: Encoded, layout: str) -> list[tuple[str, int]]:
    """The placeholders of the media block in prompt order, as runs [('V', n), ('A', m), ...]."""
    ...

  def position_ids(self, prompt_ids: np.ndarray, enc: Encoded, layout: str) -> np.ndarray | None:
    """[3, L] int32 M-RoPE ids for the tokenised prompt, or None for 1-D RoPE models."""
    ...


def patchify_video(frames_TxHxWx3: np.ndarray, *, patch: int = 14, merge: int = 2, temporal_patch: int = 2,
                   mean=CLIP_MEAN, std=CLIP_STD) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Normalised frames -> pixel rows [P, C] in the vision tower's order, and the grid (t, h, w).

  Row order is (t, h-block, w-block, h-in-block, w-in-block): the 2x2 patches that the merger joins are
  consecutive. Each row holds (channel, frame-in-temporal-patch, y, x). A frame count that is not a multiple
  of temporal_patch is padded by repeating the last frame, as the processor does.
  """
  x = frames_TxHxWx3.astype(np.float32) / 255.0
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  x_TxCxHxW = x.transpose(0, 3, 1, 2)
  if pad := -len(x_TxCxHxW) % temporal_patch:
    x_TxCxHxW = np.concatenate([x_TxCxHxW, np.repeat(x_TxCxHxW[-1:], pad, axis=0)])
  t_all, c, h, w = x_TxCxHxW.shape
  if h % (patch * merge) or w % (patch * merge):
    raise ValueError(f"frame size {h}x{w} is not a multiple of {patch * merge}")
  gt, gh, gw = t_all // temporal_patch, h // patch, w // patch
  p = x_TxCxHxW.reshape(gt, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
  # axes: 0 t, 1 tp, 2 c, 3 hb, 4 hm, 5 py, 6 wb, 7 wm, 8 px  ->  t, hb, wb, hm, wm | c, tp, py, px
  p = p.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return np.ascontiguousarray(p.reshape(gt * gh * gw, c * temporal_patch * patch * patch)), (gt, gh, gw)


def runs_to_string(runs: list[tuple[str, int]]) -> str:
  """[('V', 8), ('A', 50)] -> 'V8A50' (the compact form written next to each record)."""
  return "".join(f"{k}{n}" for k, n in runs if n)


def string_to_runs(s: str) -> list[tuple[str, int]]:
  runs = [(k, int(n)) for k, n in re.findall(r"([VA])(\d+)", s)]
  if runs_to_string(runs) != s:
    raise ValueError(f"bad placeholder layout {s!r}: expected runs like 'V8A50V8A50'")
  return runs


# ----------------------------------------------------------------------------------- Qwen2.5-Omni towers


def _thinker_config_dict(checkpoint_dir: str) -> dict:
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{checkpoint_dir}: no config.json (expected a Qwen2.5-Omni checkpoint directory)")
  try:
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  cfg = cfg.get("thinker_config", cfg)  # a full Omni checkpoint nests the thinker's config
  for key in ("vision_config", "audio_config", "text_config"):
    if not isinstance(cfg.get(key), dict):
      raise ValueError(f"{path}: no {key}; not a Qwen2.5-Omni (thinker) config")
  return cfg


def _tower_state(checkpoint_dir: str, prefixes: tuple[str, ...]) -> dict[str, "object"]:
  """Tower tensors (torch) from the checkpoint's safetensors files; only the tower keys are read."""
  from safetensors import safe_open

  files = sorted(glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))
  if not files:
    raise FileNotFoundError(f"{checkpoint_dir}: no .safetensors files (pickled checkpoints are refused)")
  out = {}
  for file in files:
    with safe_open(file, framework="pt") as f:
      for key in f.keys():
        for pfx in prefixes:
          if key.startswith(pfx):
            out.setdefault(pfx, {})[key[len(pfx):]] = f.get_tensor(key)
  return out


class OmniTowerEncoder:
  """The Qwen2.5-Omni thinker's vision + audio towers (torch) and its placeholder layout / TMRoPE ids."""

  feature_space = "lm_embed"

  def __init__(self, checkpoint_dir: str, *, dtype: str = "float32", device: str = "cpu"):
    import torch
    from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as co
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as mo
    from transformers import WhisperFeatureExtractor

    self._torch = torch
    cfg_dict = _thinker_config_dict(checkpoint_dir)
    self.config = co.Qwen2_5OmniThinkerConfig(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    if getattr(self.config, "vision_start_token_id", None) is None:
      self.config.vision_start_token_id = VISION_START_TOKEN_ID
    vc, ac = self.config.vision_config, self.config.audio_config
    self.patch, self.merge, self.temporal_patch = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
    self.feature_dim = int(self.config.text_config.hidden_size)
    if vc.out_hidden_size != self.feature_dim or ac.output_dim != self.feature_dim:
      raise ValueError(f"{checkpoint_dir}: tower widths {vc.out_hidden_size}/{ac.output_dim} differ from the "
                       f"LM width {self.feature_dim}")
    self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    self.device = torch.device(device)
    state = _tower_state(checkpoint_dir, ("thinker.visual.", "visual.", "thinker.audio_tower.", "audio_tower."))
    self.visual = self._load(mo.Qwen2_5OmniVisionEncoder, vc, state, ("thinker.visual.", "visual."), checkpoint_dir)
    self.audio_tower = self._load(mo.Qwen2_5OmniAudioEncoder, ac, state,
                                  ("thinker.audio_tower.", "audio_tower."), checkpoint_dir)
    fe_path = os.path.join(checkpoint_dir, "preprocessor_config.json")
    self.feature_extractor = (WhisperFeatureExtractor.from_pretrained(checkpoint_dir, local_files_only=True)
                              if os.path.isfile(fe_path) else WhisperFeatureExtractor(feature_size=ac.num_mel_bins))

    # transformers' own layout and TMRoPE code, bound to small shims that carry only what it reads.
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor
    base = mo.Qwen2_5OmniPreTrainedModelForConditionalGeneration
    merge = self.merge

    class _Rope:
      get_rope_index = base.get_rope_index
      get_llm_pos_ids_for_vision = base.get_llm_pos_ids_for_vision
      get_chunked_index = base.get_chunked_index
      config = self.config
      spatial_merge_size = merge

    class _Layout:
      replace_video_with_audio_token = Qwen2_5OmniProcessor.replace_video_with_audio_token
      get_chunked_index = Qwen2_5OmniProcessor.get_chunked_index
      video_processor = type("VP", (), {"merge_size": merge})
      video_token, audio_token, audio_bos_token, audio_eos_token = "V", "A", "", ""

    self._rope, self._layout = _Rope(), _Layout()

  def _load(self, cls, sub_config, state, prefixes, checkpoint_dir):
    tensors = next((state[p] for p in prefixes if p in state), None)
    if tensors is None:
      raise ValueError(f"{checkpoint_dir}: no tower weights under {' / '.join(prefixes)}")
    module = cls._from_config(sub_config)
    result = module.load_state_dict(tensors, strict=False)
    # Non-persistent buffers (rotary tables) are rebuilt by the module; everything else must be in the file.
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
      raise ValueError(f"{checkpoint_dir}: {cls.__name__} weights do not match its config: missing "
                       f"{missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    return module.to(self.device, self.dtype).eval()

  def pixel_inputs(self, frames_TxHxWx3: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    return patchify_video(frames_TxHxWx3, patch=self.patch, merge=self.merge, temporal_patch=self.temporal_patch)

  def audio_inputs(self, audio_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whisper log-mel [1, 128, 3000] and its frame mask [1, 3000], as the Omni processor builds them."""
    out = self.feature_extractor(audio_N, sampling_rate=media.SAMPLE_RATE, padding="max_length",
                                 return_attention_mask=True, return_tensors="np")
    return out["input_features"].astype(np.float32), out["attention_mask"].astype(np.int64)

  def encode(self, video: media.Video, audio_N: np.ndarray) -> Encoded:
    torch = self._torch
    pixels_PxC, grid = self.pixel_inputs(video.frames)
    mel, mel_mask = self.audio_inputs(audio_N)
    n_mel = int(mel_mask.sum())
    with torch.inference_mode():
      grid_t = torch.tensor([grid], device=self.device)
      v = self.visual(torch.from_numpy(pixels_PxC).to(self.device, self.dtype), grid_thw=grid_t).pooler_output
      # The thinker drops padded mel frames and hands the tower one [bins, frames] slab with the lengths.
      feats = torch.from_numpy(mel[0][:, mel_mask[0].astype(bool)]).to(self.device, self.dtype)
      lens = torch.tensor([n_mel], device=self.device)
      after_cnn, _ = self.audio_tower._get_feat_extract_output_lengths(lens)
      a = self.audio_tower(feats, feature_lens=lens, aftercnn_lens=after_cnn).last_hidden_state
    return Encoded(video=v.float().cpu().numpy(), audio=a.float().cpu().numpy(), video_grid_thw=tuple(grid),
                   second_per_grid=self.temporal_patch / video.sample_fps, audio_feature_len=n_mel)

  def placeholder_runs(self, enc: Encoded, layout: str) -> list[tuple[str, int]]:
    if layout not in LAYOUTS:
      raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    nv, na = len(enc.video), len(enc.audio)
    if layout == "separate":
      return [("V", nv), ("A", na)]
    s = self._layout.replace_video_with_audio_token(
        {"video_grid_thw": [enc.video_grid_thw], "video_second_per_grid": [enc.second_per_grid]}, 0,
        {"num_audio_tokens": [na]}, 0, position_id_per_seconds=self.config.position_id_per_seconds,
        seconds_per_chunk=self.config.seconds_per_chunk)
    runs = [(m.group()[0], len(m.group())) for m in re.finditer(r"V+|A+", s)]
    if sum(n for k, n in runs if k == "V") != nv or sum(n for k, n in runs if k == "A") != na:
      raise AssertionError(f"interleaved layout {runs_to_string(runs)} does not hold {nv} video and {na} audio rows")
    return runs

  def position_ids(self, prompt_ids: np.ndarray, enc: Encoded, layout: str) -> np.ndarray:
    torch = self._torch
    ids = torch.as_tensor(np.asarray(prompt_ids, np.int64))[None]
    pos, _ = self._rope.get_rope_index(
        ids, None, torch.tensor([enc.video_grid_thw]), torch.ones_like(ids), layout == "interleaved",
        torch.tensor([enc.audio_feature_len]), torch.tensor([enc.second_per_grid]))
    return pos[:, 0].numpy().astype(np.int32)

  def marker_ids(self) -> dict[str, int]:
    """The thinker's ids for the prompt markers (the tokenizer must agree)."""
    c = self.config
    return {"<|VIDEO|>": c.video_token_id, "<|AUDIO|>": c.audio_token_id,
            "<|vision_bos|>": c.vision_start_token_id, "<|audio_bos|>": c.audio_start_token_id,
            "<|audio_eos|>": c.audio_end_token_id}
