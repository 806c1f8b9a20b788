"""The chat template and the slow/fast mode prefixes: the one place rollout, SFT and evaluation take them from.

A prompt is one Qwen-style chat turn (method.md "Output format and modes (reconstructed)"):

  <|im_start|>system\\n{system}<|im_end|>\\n
  <|im_start|>user\\n<|vision_bos|>{<|VIDEO|> x n_video}<|vision_eos|><|audio_bos|>{<|AUDIO|> x n_audio}<|audio_eos|>\\n
  Subtitle: {subtitle}\\n{question}<|im_end|>\\n
  <|im_start|>assistant\\n                       (+ FAST_PREFIX in fast mode)

With `media_runs` (e.g. "V8A50V8A50") the media block is Qwen2.5-Omni's interleaved one instead. Either way there
is one placeholder token per feature row, and the k-th `<|VIDEO|>` takes the k-th video row. Free text holding a
template marker is rejected. The EOS (`<|im_end|>`) closing the assistant turn is appended by the pipeline, not
part of these strings. Details: docs/data.md, "2. The chat template".
"""

from __future__ import annotations

import re
from typing import Sequence

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
VIDEO_TOKEN, AUDIO_TOKEN = "<|VIDEO|>", "<|AUDIO|>"
VISION_BOS, VISION_EOS, AUDIO_BOS, AUDIO_EOS = "<|vision_bos|>", "<|vision_eos|>", "<|audio_bos|>", "<|audio_eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODES = ("slow", "fast")
FAST_PREFIX = THINK_OPEN + THINK_CLOSE + ANSWER_OPEN  # prefilled in fast mode, part of the prompt, carries no loss
ANSWER_SEP = ", "

DEFAULT_SYSTEM = "You are an expert in multimodal emotion recognition."
DEFAULT_QUESTION = "Please recognize all possible emotional states of the character."

# Tokens that must be one id each. Tag tokens stay visible on decode; chat markers and placeholders are
# "special" (dropped by decode(skip_special=True)).
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, VIDEO_TOKEN, AUDIO_TOKEN, VISION_BOS, VISION_EOS, AUDIO_BOS,
                  AUDIO_EOS)
_MARKERS = TAG_TOKENS + SPECIAL_TOKENS
_RUNS_RE = re.compile(r"([VA]\d+)+")  # the schema's ClipRecord.media_layout format


def _check_free_text(text: str, what: str) -> None:
  if not isinstance(text, str):
    raise TypeError(f"{what} must be a string, got {type(text).__name__}")
  for m in _MARKERS:
    if m in text:
      raise ValueError(f"{what} contains the template marker {m!r}: {text[:80]!r}")


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {MODES}")


def parse_media_runs(media_runs: str) -> list[tuple[str, int]]:
  """"V8A50V4A25" -> [('V', 8), ('A', 50), ('V', 4), ('A', 25)]. Raises ValueError on anything else."""
  if not isinstance(media_runs, str) or not _RUNS_RE.fullmatch(media_runs):
    raise ValueError(f"media_runs={media_runs!r} is not a placeholder runs string like 'V8A50V8A50'")
  return [(k, int(n)) for k, n in re.findall(r"([VA])(\d+)", media_runs)]


def interleaved_media_block(media_runs: str) -> str:
  """Omni's use_audio_in_video block: both start markers, the runs expanded in order, both end markers."""
  body = "".join((VIDEO_TOKEN if k == "V" else AUDIO_TOKEN) * n for k, n in parse_media_runs(media_runs))
  return VISION_BOS + AUDIO_BOS + body + AUDIO_EOS + VISION_EOS


def render_prompt(subtitle: str, n_video: int, n_audio: int, mode: str, *, question: str = DEFAULT_QUESTION,
                  system: str = DEFAULT_SYSTEM, media_runs: str | None = None) -> str:
  """The chat prompt up to the assistant's first generated token (FAST_PREFIX included in fast mode).

  media_runs: None lays the media block out separately (video rows, then audio rows); a runs string such as
    "V8A50V8A50" gives the interleaved block, and must hold exactly n_video V and n_audio A placeholders.
  """
  _check_mode(mode)
  for name, n in (("n_video", n_video), ("n_audio", n_audio)):
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
      raise ValueError(f"{name} must be a non-negative int, got {n!r}")
  _check_free_text(subtitle, "subtitle")
  _check_free_text(question, "question")
  _check_free_text(system, "system")
  media = ""
  if media_runs is not None:
    runs = parse_media_runs(media_runs)
    totals = (sum(n for k, n in runs if k == "V"), sum(n for k, n in runs if k == "A"))
    if totals != (n_video, n_audio):  # a mismatch would shift feature rows in the merge
      raise ValueError(f"media_runs={media_runs!r} holds {totals[0]} video and {totals[1]} audio placeholders, "
                       f"expected n_video={n_video} and n_audio={n_audio}")
    media = interleaved_media_block(media_runs)
  else:
    if n_video:
      media += VISION_BOS + VIDEO_TOKEN * n_video + VISION_EOS
    if n_audio:
      media += AUDIO_BOS + AUDIO_TOKEN * n_audio + AUDIO_EOS
  # Newlines inside the subtitle would let it masquerade as template lines; flatten them.
  subtitle = " ".join(subtitle.split())
  user = f"{media}\nSubtitle: {subtitle}\n{question}"
  prompt = (f"{IM_START}system\n{system}{IM_END}\n"
            f"{IM_START}user\n{user}{IM_END}\n"
            f"{IM_START}assistant\n")
  return prompt + (FAST_PREFIX if mode == "fast" else "")


def render_answer(answer_words: Sequence[str]) -> str:
  """"w1, w2": the text between <answer> and </answer>."""
  if isinstance(answer_words, str):
    raise TypeError("answer_words must be a sequence of words, not one string")
  words = []
  for w in answer_words:
    _check_free_text(w, "answer word")
    w = w.strip()
    if not w or any(c in w for c in ",;\n"):
      raise ValueError(f"answer word {w!r} is empty or holds a separator")
    words.append(w)
  return ANSWER_SEP.join(words)


def render_completion(think: str, answer_words: Sequence[str], mode: str) -> str:
  """slow: "<think>{think}</think><answer>w1, w2</answer>"; fast: "w1, w2</answer>" (the part after FAST_PREFIX)."""
  _check_mode(mode)
  answer = render_answer(answer_words)
  if mode == "fast":
    if think:
      raise ValueError("fast mode has an empty think by construction; got reasoning text")
    return answer + ANSWER_CLOSE
  _check_free_text(think, "think")
  if not think.strip():
    raise ValueError("slow mode needs non-empty reasoning (method.md: the format reward requires it)")
  return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
