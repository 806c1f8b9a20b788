"""Decoding clips with PyAV: uniformly sampled, resized video frames and 16 kHz mono audio.

The sampling and resolution rules are those the Qwen2.5-Omni processor applies to a video (the qwen-omni-utils
reference): frames are taken uniformly at `fps` (2 per second), at least `min_frames`, at most `max_frames`
and never more than the clip has, rounded down to a multiple of the temporal patch (2); each frame is resized
bicubically so both sides are multiples of 28 (patch 14 x merge 2), keeping the aspect ratio, with the pixel
count between `min_pixels` and a per-frame cap that shrinks as the frame count grows (`total_pixels` is the
budget for the whole clip).

Everything here is numpy + PyAV + Pillow: no torch. A clip that cannot be used raises `MediaError`, which
names the file, the stream ('video' / 'audio') and the reason, so the preprocessing job can report it per clip.

Shape legend: T sampled frames, H/W frame height/width (after resizing), N audio samples.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

SAMPLE_RATE = 16_000  # what the Omni audio feature extractor (Whisper log-mel) expects
PATCH_FACTOR = 28  # patch_size 14 x spatial merge 2: resized sides are multiples of this


class MediaError(ValueError):
  """A clip's media cannot be used. The message names the file, the stream and the reason."""

  def __init__(self, reason: str, *, path: str, stream: str):
    self.reason, self.path, self.stream = reason, path, stream
    super().__init__(f"{stream} of {path}: {reason}")


@dataclasses.dataclass(frozen=True)
class VideoSpec:
  """Frame sampling and resizing rules (defaults: the Qwen2.5-Omni processor's)."""
  fps: float = 2.0  # frames sampled per second of video
  min_frames: int = 4
  max_frames: int = 768  # the frame cap
  frame_factor: int = 2  # = the vision tower's temporal_patch_size: frame counts are multiples of it
  min_pixels: int = 128 * 28 * 28  # per frame, after resizing
  max_pixels: int = 768 * 28 * 28  # per frame, after resizing (before the total budget applies)
  total_pixels: int = 24576 * 28 * 28  # budget for all frames of a clip; divides the per-frame cap
  factor: int = PATCH_FACTOR

  def validate(self) -> None:
    if self.fps <= 0 or self.frame_factor < 1 or self.factor < 1:
      raise ValueError(f"bad VideoSpec {self}: fps, frame_factor and factor must be positive")
    if not 0 < self.min_frames <= self.max_frames:
      raise ValueError(f"bad VideoSpec: need 0 < min_frames ({self.min_frames}) <= max_frames ({self.max_frames})")
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f"bad VideoSpec: need 0 < min_pixels ({self.min_pixels}) <= max_pixels ({self.max_pixels})")


@dataclasses.dataclass(frozen=True)
class Video:
  frames: np.ndarray  # [T, H, W, 3] uint8 RGB, resized
  sample_fps: float  # sampled frames per second of video (T / duration)
  total_frames: int  # frames in the file
  source_fps: float


def _floor_to(x: float, k: int) -> int:
  return int(math.floor(x / k) * k)


def _ceil_to(x: float, k: int) -> int:
  return int(math.ceil(x / k) * k)


def num_frames(total_frames: int, source_fps: float, spec: VideoSpec) -> int:
  """How many frames to sample from a clip of `total_frames` at `source_fps` (see the module docstring)."""
  lo = _ceil_to(spec.min_frames, spec.frame_factor)
  hi = _floor_to(min(spec.max_frames, total_frames), spec.frame_factor)
  want = total_frames / source_fps * spec.fps
  n = _floor_to(min(max(want, lo), hi, total_frames), spec.frame_factor)
  if not spec.frame_factor <= n <= total_frames:
    raise ValueError(f"cannot sample {spec.frame_factor}+ frames from {total_frames}")
  return n


def sample_indices(total_frames: int, n: int) -> np.ndarray:
  """n frame indices spread evenly over [0, total_frames - 1], first and last included."""
  return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def smart_resize(height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
  """The nearest (h, w), both multiples of `factor`, with the aspect ratio kept and h*w in the pixel range."""
  if min(height, width) < 1:
    raise ValueError(f"frame of {height}x{width} pixels")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds 200")
  h = max(factor, round(height / factor) * factor)
  w = max(factor, round(width / factor) * factor)
  if h * w > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h, w = max(factor, _floor_to(height / beta, factor)), max(factor, _floor_to(width / beta, factor))
  elif h * w < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h, w = _ceil_to(height * beta, factor), _ceil_to(width * beta, factor)
  return h, w


def frame_size(height: int, width: int, n_frames: int, spec: VideoSpec) -> tuple[int, int]:
  """The resized frame size for a clip of n_frames sampled frames (the per-frame cap shares total_pixels)."""
  cap = max(min(spec.max_pixels, spec.total_pixels / n_frames * spec.frame_factor), int(spec.min_pixels * 1.05))
  return smart_resize(height, width, factor=spec.factor, min_pixels=spec.min_pixels, max_pixels=int(cap))


def _open(path: str, stream: str):
  import av  # PyAV: the `media` extra. Imported here so the core package does not need it.
  if not os.path.isfile(path):
    raise MediaError("file not found", path=path, stream=stream)
  if os.path.getsize(path) == 0:
    raise MediaError("empty file (0 bytes)", path=path, stream=stream)
  try:
    return av.open(path)
  except Exception as e:  # FFmpeg raises several types (InvalidDataError, OSError subclasses) for bad files.
    raise MediaError(f"cannot open ({type(e).__name__}: {e})", path=path, stream=stream) from e


def read_video(path: str, spec: VideoSpec = VideoSpec()) -> Video:
  """Decodes, samples and resizes the first video stream of `path`. Raises MediaError."""
  from PIL import Image

  spec.validate()
  # Pass 1 counts decoded frames (container frame counts are often missing or approximate), pass 2 keeps
  # only the sampled ones, so memory holds T frames, not the whole clip.
  with _open(path, "video") as c:
    if not c.streams.video:
      # An mp4 whose video track holds no samples shows no video stream at all: name that case.
      empty = not c.duration
      raise MediaError("zero-length clip (empty container, no video samples)" if empty else "no video stream",
                       path=path, stream="video")
    s = c.streams.video[0]
    rate = s.average_rate or s.guessed_rate
    try:
      total = sum(1 for _ in c.decode(s))
    except Exception as e:
      raise MediaError(f"corrupt video data ({type(e).__name__}: {e})", path=path, stream="video") from e
  if total == 0:
    raise MediaError("zero-length clip (no decodable frames)", path=path, stream="video")
  if not rate or float(rate) <= 0:
    raise MediaError("unknown frame rate", path=path, stream="video")
  source_fps = float(rate)
  try:
    n = num_frames(total, source_fps, spec)
  except ValueError as e:
    raise MediaError(str(e), path=path, stream="video") from e
  wanted = sample_indices(total, n)
  want_set = set(wanted.tolist())
  keep: dict[int, np.ndarray] = {}
  with _open(path, "video") as c:
    try:
      for i, frame in enumerate(c.decode(c.streams.video[0])):
        if i in want_set and i not in keep:
          keep[i] = frame.to_ndarray(format="rgb24")
    except Exception as e:
      raise MediaError(f"corrupt video data ({type(e).__name__}: {e})", path=path, stream="video") from e
  missing = [int(i) for i in wanted if int(i) not in keep]
  if missing:
    raise MediaError(f"frames {missing[:5]} did not decode on the second pass", path=path, stream="video")
  h0, w0 = keep[int(wanted[0])].shape[:2]
  try:
    h, w = frame_size(h0, w0, n, spec)
  except ValueError as e:
    raise MediaError(str(e), path=path, stream="video") from e
  frames = np.stack([np.asarray(Image.fromarray(keep[int(i)]).resize((w, h), Image.BICUBIC)) for i in wanted])
  return Video(frames=frames, sample_fps=n / (total / source_fps), total_frames=total, source_fps=source_fps)


def read_audio(path: str, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """The first audio stream of `path` (a wav file or a video's track), mono float32 at `sample_rate`."""
  import av

  with _open(path, "audio") as c:
    if not c.streams.audio:
      raise MediaError("no audio stream", path=path, stream="audio")
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks = []
    try:
      for frame in c.decode(c.streams.audio[0]):
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
      chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
    except Exception as e:
      raise MediaError(f"corrupt audio data ({type(e).__name__}: {e})", path=path, stream="audio") from e
  x = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
  if x.size == 0:
    raise MediaError("zero-length audio (no samples)", path=path, stream="audio")
  if not np.isfinite(x).all():
    raise MediaError("non-finite audio samples", path=path, stream="audio")
  return x
