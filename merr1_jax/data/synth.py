"""MER-Synth: the embedded default dataset, a seeded generator of multimodal emotion clips (docs/data.md).

Each clip has 1-3 true emotions from `EMOTIONS` (16 everyday words, each mapped by the emotion wheels), each shown
in a random subset of three modalities: video rows ("facial expression" prototypes), audio rows ("prosody") and a
subtitle line (a cue phrase, a neutral filler, or sarcasm), with nuisance and distractors on top, so that no single
modality suffices. SFT demonstrations come from a noisy annotator: slow (per-modality reasoning, then a
conservative answer) and fast (a broad answer), both imperfect on purpose. `SynthConfig(version=2)` makes the answer
need corroboration across modalities; version 1 (the default) is unchanged, byte for byte. Everything is a pure
function of (config, split, index), so generation is random-access and reproducible. Details: docs/data.md,
"4. MER-Synth".

Shape legend: Tv/Ta rows (config.min_rows..config.max_rows), Dv/Da = config.video_dim/audio_dim, C = len(EMOTIONS).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np

from merr1_jax.data import schema
from merr1_jax.task import prompts

DATASET = "mer_synth"
SPLITS = ("train", "validation", "test")
MODALITIES = ("face", "voice", "words")  # the names the slow demo's reasoning uses

# name, family, valence. Families share a prototype component (confusable emotions).
_EMOTION_TABLE = (
    ("happy", "joy", 1.0), ("excited", "joy", 0.8), ("proud", "joy", 0.7), ("grateful", "joy", 0.8),
    ("relieved", "ease", 0.6), ("calm", "ease", 0.4),
    ("sad", "sorrow", -0.8), ("lonely", "sorrow", -0.7), ("disappointed", "sorrow", -0.6),
    ("angry", "anger", -0.9), ("annoyed", "anger", -0.5), ("disgusted", "anger", -0.8),
    ("worried", "fear", -0.6), ("nervous", "fear", -0.5),
    ("surprised", "wonder", 0.2), ("confused", "wonder", -0.2),
)
EMOTIONS = tuple(e for e, _, _ in _EMOTION_TABLE)
FAMILY = {e: f for e, f, _ in _EMOTION_TABLE}
VALENCE = {e: v for e, _, v in _EMOTION_TABLE}
# Label prior: a few common emotions, so that "always predict the majority label" is a meaningful baseline.
PRIOR = {e: 1.0 for e in EMOTIONS} | {"happy": 3.0, "sad": 2.5, "angry": 2.0, "worried": 1.5, "surprised": 1.5}

# Subtitle phrases per emotion: cue phrases that mostly avoid naming the emotion.
PHRASES = {
    "happy": ("This is the best day in years.", "I love how this turned out.", "Everything feels right today."),
    "excited": ("I can not wait for tomorrow!", "We are really doing this!", "Tickets are booked, let us go!"),
    "proud": ("I did it all by myself.", "Look at what my son built.", "Nobody thought I could win."),
    "grateful": ("Thank you for staying with me.", "I owe you so much.", "You saved us, thank you."),
    "relieved": ("Finally, the test came back clear.", "Phew, they found the keys.", "It is over at last."),
    "calm": ("Let us just sit by the lake.", "There is no rush at all.", "Breathe in, it is fine."),
    "sad": ("She is not coming back.", "I lost the last photo of him.", "Nothing will be the same."),
    "lonely": ("Nobody called on my birthday.", "The house is so empty now.", "I eat dinner alone again."),
    "disappointed": ("I expected more from you.", "All that work for nothing.", "They picked someone else."),
    "angry": ("How dare you lie to me!", "Get out of my office now!", "You broke your promise again!"),
    "annoyed": ("Can you stop tapping that?", "Late again, seriously?", "I asked you three times."),
    "disgusted": ("That smell is revolting.", "Who left this rotten food here?", "How could anyone eat that?"),
    "worried": ("What if the results are bad?", "He should have called by now.", "I hope she is safe."),
    "nervous": ("My hands are shaking before the talk.", "The interview starts in five minutes.",
                "What if I forget my lines?"),
    "surprised": ("Wait, you are here?", "I never saw that coming!", "No way, is that real?"),
    "confused": ("Which door did you say?", "I do not understand the plan.", "Why is the map upside down?"),
}
SARCASM_PREFIX = "Oh great,"
# A negative emotion carried by a positive surface phrase (sarcasm): text says "happy", truth is negative.
SARCASM_SOURCES = ("happy", "excited", "grateful")
SARCASM_TARGETS = ("angry", "annoyed", "disappointed", "disgusted")
FILLERS = ("We should leave before dark.", "Did you bring the keys?", "The bus comes at nine.",
           "Put the box on the table.", "I will call you later.", "It is on the second floor.")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """Generator knobs. `noise` scales every corruption (feature noise, distractors, demo errors) together."""
  seed: int = 0
  n_train: int = 2000
  n_validation: int = 200
  n_test: int = 200
  video_dim: int = 32  # 32 > C = 16 prototypes: a linear read-out can separate them (16 cannot, well)
  audio_dim: int = 32
  min_rows: int = 4
  max_rows: int = 8
  noise: float = 1.0
  p_modality: float = 0.5  # chance that a true emotion shows in a given modality (at least one is forced)
  p_sarcasm: float = 0.3  # chance that a text-borne sarcasm-capable emotion is written sarcastically
  slow_keep_single: float = 0.35  # slow annotator: keep an emotion read in only one modality
  fast_keep_true: float = 0.95  # fast annotator: keep each true emotion read anywhere
  fast_extra: float = 0.6  # fast annotator: add a distractor/neighbour word
  version: int = 1  # 1: the original world; 2: corroboration (true = shown in >= 2 modalities), see above

  def __post_init__(self):
    if self.version not in VERSIONS:  # at construction, so a bad config fails before any clip is drawn
      raise ValueError(f"SynthConfig.version={self.version!r}; expected one of {VERSIONS}")

  def n(self, split: str) -> int:
    return {"train": self.n_train, "validation": self.n_validation, "test": self.n_test}[_check_split(split)]


@dataclasses.dataclass(frozen=True)
class ClipPlan:
  """The latent truth of one clip, before rendering: which emotion shows where. Tests and docs read it."""
  emotions: tuple[str, ...]  # true emotions, in EMOTIONS order
  cues: dict  # modality -> tuple of true emotions shown there
  distractors: dict  # modality -> tuple of wrong emotions shown weakly (words: the sarcastic surface emotion)
  sarcastic: str | None  # the true emotion the subtitle carries sarcastically, if any


VERSIONS = (1, 2)  # SynthConfig.version (checked in its __post_init__)
V2_DISTRACTOR = 0.5  # v2: chance (x noise) that face / voice show an uncorroborated distractor
V2_WORDS_DISTRACTOR = 0.3  # v2: chance (x noise) that a subtitle with no true emotion shows a wrong one's phrase


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  return split


def _rng(config: SynthConfig, *key: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, *key])))


@functools.lru_cache(maxsize=16)
def _prototypes(config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
  """Unit-RMS face and voice prototypes [C, D]: 0.6 family component + 0.8 own component."""
  rng = _rng(config, 1_000_003)
  families = sorted(set(FAMILY.values()))
  out = []
  for dim in (config.video_dim, config.audio_dim):
    fam = {f: rng.standard_normal(dim) for f in families}
    protos = np.stack([0.6 * fam[FAMILY[e]] + 0.8 * rng.standard_normal(dim) for e in EMOTIONS])
    out.append(protos / np.sqrt((protos ** 2).mean(axis=1, keepdims=True)))
  return out[0], out[1]


def _canonical(words) -> tuple[str, ...]:
  """De-duplicated, in EMOTIONS order: a fixed order is easier for a tiny model to learn than a random one."""
  present = set(words)
  return tuple(e for e in EMOTIONS if e in present)


def _draw_emotions(rng) -> tuple[str, ...]:
  k = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
  prior = np.array([PRIOR[e] for e in EMOTIONS])
  first = int(rng.choice(len(EMOTIONS), p=prior / prior.sum()))
  chosen = [first]
  while len(chosen) < k:
    # Co-occurring emotions usually share the valence sign of the first (sad + lonely, not sad + proud).
    same = np.array([np.sign(VALENCE[e]) == np.sign(VALENCE[EMOTIONS[first]]) for e in EMOTIONS])
    w = prior * np.where(same, 4.0, 1.0)
    w[chosen] = 0.0
    chosen.append(int(rng.choice(len(EMOTIONS), p=w / w.sum())))
  return _canonical(EMOTIONS[i] for i in chosen)


def plan_clip(config: SynthConfig, split: str, index: int) -> ClipPlan:
  """Draws the latent truth of clip `index` of `split`."""
  rng = _rng(config, SPLITS.index(_check_split(split)), index, 0)
  emotions = _draw_emotions(rng)
  if config.version == 2:
    return _plan_v2(rng, config, emotions)
  cues = {m: [] for m in MODALITIES}
  for e in emotions:
    shown = rng.random(len(MODALITIES)) < config.p_modality
    if not shown.any():
      shown[rng.integers(len(MODALITIES))] = True
    for m, s in zip(MODALITIES, shown):
      if s:
        cues[m].append(e)
  # The subtitle holds at most one emotional line, so keep one text-borne emotion; the others move to a
  # feature modality, so that every true emotion still has evidence somewhere.
  if len(cues["words"]) > 1:
    keep = cues["words"][int(rng.integers(len(cues["words"])))]
    for e in cues["words"]:
      if e != keep and e not in cues["face"] and e not in cues["voice"]:
        cues["face" if rng.random() < 0.5 else "voice"].append(e)
    cues["words"] = [keep]
  sarcastic = None
  wrong = [e for e in EMOTIONS if e not in emotions]
  distractors = {m: () for m in MODALITIES}
  for m in ("face", "voice"):
    if rng.random() < min(1.0, 0.4 * config.noise):
      distractors[m] = (wrong[int(rng.integers(len(wrong)))],)
  # The sarcastic surface emotion must be a wrong one, or the "conflict" would be a true cue.
  sources = [e for e in SARCASM_SOURCES if e not in emotions]
  if cues["words"] and cues["words"][0] in SARCASM_TARGETS and sources and rng.random() < config.p_sarcasm:
    sarcastic = cues["words"][0]
    distractors["words"] = (sources[int(rng.integers(len(sources)))],)
  return ClipPlan(emotions=emotions, cues={m: _canonical(v) for m, v in cues.items()},
                  distractors=distractors, sarcastic=sarcastic)


def _plan_v2(rng, config: SynthConfig, emotions: tuple[str, ...]) -> ClipPlan:
  """Version 2: each true emotion in >= 2 modalities, each distractor in exactly one (and different per modality)."""
  cues = {m: [] for m in MODALITIES}
  for e in emotions:
    shown = rng.random(len(MODALITIES)) < config.p_modality
    while shown.sum() < 2:
      shown[int(rng.choice(np.flatnonzero(~shown)))] = True
    for m, s in zip(MODALITIES, shown):
      if s:
        cues[m].append(e)
  # One emotional subtitle line at most: the words keep one true emotion; the others show in face and voice.
  if len(cues["words"]) > 1:
    keep = cues["words"][int(rng.integers(len(cues["words"])))]
    cues["words"] = [keep]
  for e in emotions:
    if e not in cues["words"]:
      for m in ("face", "voice"):
        if e not in cues[m]:
          cues[m].append(e)
  wrong = [e for e in EMOTIONS if e not in emotions]
  distractors = {m: () for m in MODALITIES}
  for m in ("face", "voice"):
    if rng.random() < min(1.0, V2_DISTRACTOR * config.noise):
      free = [e for e in wrong if e not in distractors["face"]]
      distractors[m] = (free[int(rng.integers(len(free)))],)
  taken = set(distractors["face"]) | set(distractors["voice"])
  sarcastic = None
  sources = [e for e in SARCASM_SOURCES if e not in emotions and e not in taken]
  if cues["words"] and cues["words"][0] in SARCASM_TARGETS and sources and rng.random() < config.p_sarcasm:
    # The line says a positive surface emotion; the true one is then read from face and voice only.
    sarcastic = cues["words"][0]
    cues["words"] = []
    for m in ("face", "voice"):
      if sarcastic not in cues[m]:
        cues[m].append(sarcastic)
    distractors["words"] = (sources[int(rng.integers(len(sources)))],)
  elif not cues["words"] and rng.random() < min(1.0, V2_WORDS_DISTRACTOR * config.noise):
    free = [e for e in wrong if e not in taken]
    distractors["words"] = (free[int(rng.integers(len(free)))],)
  return ClipPlan(emotions=emotions, cues={m: _canonical(v) for m, v in cues.items()},
                  distractors=distractors, sarcastic=sarcastic)


def _features(rng, plan: ClipPlan, modality: str, protos: np.ndarray, config: SynthConfig) -> np.ndarray:
  """[T, D] float16: windows of each cued prototype + distractor + clip offset + row noise.

  Version 1's distractors are weak (amplitude 0.25-0.45 against 0.8-1.3); version 2's are as strong as a true cue.
  """
  t = int(rng.integers(config.min_rows, config.max_rows + 1))
  d = protos.shape[1]
  lo, hi = (0.25, 0.45) if config.version == 1 else (0.8, 1.3)
  x = 0.3 * config.noise * rng.standard_normal(d)[None, :] + 0.5 * config.noise * rng.standard_normal((t, d))
  for e, amp_lo, amp_hi in ([(e, 0.8, 1.3) for e in plan.cues[modality]]
                            + [(e, lo, hi) for e in plan.distractors[modality]]):
    length = int(rng.integers((t + 1) // 2, t + 1))  # an expression lasts at least half the clip
    start = int(rng.integers(0, t - length + 1))
    x[start:start + length] += rng.uniform(amp_lo, amp_hi) * protos[EMOTIONS.index(e)]
  return x.astype(np.float16)


def _subtitle(rng, plan: ClipPlan) -> str:
  if plan.sarcastic is not None:
    src = plan.distractors["words"][0]
    phrase = PHRASES[src][int(rng.integers(3))]
    return f"{SARCASM_PREFIX} {phrase[0].lower()}{phrase[1:]}"
  if plan.cues["words"]:
    return PHRASES[plan.cues["words"][0]][int(rng.integers(3))]
  if plan.distractors["words"]:  # version 2 only: a wrong emotion's line, uncorroborated
    return PHRASES[plan.distractors["words"][0]][int(rng.integers(3))]
  return FILLERS[int(rng.integers(len(FILLERS)))]


def _annotate(rng, plan: ClipPlan, config: SynthConfig) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
  """The noisy annotator: its per-modality reading, then a conservative slow answer and a broad fast one."""
  miss = min(0.9, 0.12 * config.noise)
  take_distractor = min(1.0, 0.35 * config.noise)
  reading = {}
  for m in MODALITIES:
    seen = [e for e in plan.cues[m] if rng.random() >= miss]
    if m == "words" and plan.sarcastic is not None and plan.sarcastic in seen and rng.random() < take_distractor:
      seen = [plan.distractors["words"][0]]  # the annotator falls for the sarcasm
    seen += [e for e in plan.distractors[m] if m != "words" and rng.random() < take_distractor]
    reading[m] = _canonical(seen)
  votes = {e: sum(e in reading[m] for m in MODALITIES) for e in EMOTIONS}
  read = [e for e in EMOTIONS if votes[e]]
  slow = [e for e in read if votes[e] >= 2 or rng.random() < config.slow_keep_single]
  if not slow and read:
    slow = [max(read, key=lambda e: (votes[e], PRIOR[e]))]  # never an empty answer: the strongest reading
  fast = [e for e in read if e in plan.emotions and rng.random() < config.fast_keep_true]
  fast += [e for e in read if e not in plan.emotions]
  if rng.random() < config.fast_extra:
    # A valence neighbour from the same family: the broad, "it's some kind of X" guess.
    base = plan.emotions[int(rng.integers(len(plan.emotions)))]
    fam = [e for e in EMOTIONS if FAMILY[e] == FAMILY[base] and e not in plan.emotions]
    if fam:
      fast.append(fam[int(rng.integers(len(fam)))])
  fast = _canonical(fast) or _canonical(slow) or (plan.emotions[0],)
  return reading, _canonical(slow) or (plan.emotions[0],), fast[:4]


def _annotate_v2(rng, plan: ClipPlan, config: SynthConfig) -> tuple[dict, tuple[str, ...], tuple[str, ...]]:
  """Version 2's annotator: reads each modality literally (a distractor is as visible as a true cue; the sarcastic
  line reads as its surface emotion), missing each cue with probability 0.12 x noise. Slow: the corroboration rule
  on that reading (never empty: else the single reading of the highest prior). Fast: the union of the readings."""
  miss = min(0.9, 0.12 * config.noise)
  reading = {m: _canonical(e for e in (*plan.cues[m], *plan.distractors[m]) if rng.random() >= miss)
             for m in MODALITIES}
  votes = {e: sum(e in reading[m] for m in MODALITIES) for e in EMOTIONS}
  read = [e for e in EMOTIONS if votes[e]]
  slow = [e for e in read if votes[e] >= 2]
  if not slow and read:
    slow = [max(read, key=lambda e: (PRIOR[e], -EMOTIONS.index(e)))]
  fast = sorted(read, key=lambda e: (-votes[e], EMOTIONS.index(e)))[:4]
  return reading, _canonical(slow) or (plan.emotions[0],), _canonical(fast) or (plan.emotions[0],)


def render_think(reading: dict) -> str:
  """"face angry; voice none; words sad, lonely." (short: about 10-20 tokens)."""
  return "; ".join(f"{m} {', '.join(reading[m]) or 'none'}" for m in MODALITIES) + "."


def generate_clip(config: SynthConfig, split: str, index: int) -> schema.ClipRecord:
  """Clip `index` of `split` as a ClipRecord (features float16, feature_space 'raw', both demos)."""
  if not 0 <= index < config.n(split):
    raise IndexError(f"index {index} out of range for split {split!r} of size {config.n(split)}")
  plan = plan_clip(config, split, index)
  rng = _rng(config, SPLITS.index(split), index, 1)
  face_protos, voice_protos = _prototypes(config)
  video = _features(rng, plan, "face", face_protos, config)
  audio = _features(rng, plan, "voice", voice_protos, config)
  subtitle = _subtitle(rng, plan)
  reading, slow, fast = (_annotate if config.version == 1 else _annotate_v2)(rng, plan, config)
  primary = max(plan.emotions, key=lambda e: (PRIOR[e], -EMOTIONS.index(e)))
  return schema.ClipRecord(
      id=f"{DATASET}-{split}-{index:06d}", dataset=DATASET, video=video, audio=audio, subtitle=subtitle,
      openset=plan.emotions, feature_space="raw", onehot=primary,
      valence=float(np.mean([VALENCE[e] for e in plan.emotions])),
      demo_slow=prompts.render_completion(render_think(reading), slow, "slow"),
      demo_fast=prompts.render_completion("", fast, "fast"))


def generate_split(config: SynthConfig, split: str) -> Iterator[schema.ClipRecord]:
  for i in range(config.n(split)):
    yield generate_clip(config, split, i)


def corpus_texts(config: SynthConfig, split: str = "train", limit: int | None = 500) -> Iterator[str]:
  """Prompt + demo texts of the first `limit` clips, for training the synth tokenizer."""
  n = config.n(split) if limit is None else min(limit, config.n(split))
  for i in range(n):
    rec = generate_clip(config, split, i)
    for mode, demo in (("slow", rec.demo_slow), ("fast", rec.demo_fast)):
      yield prompts.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, mode) + demo
  # Every phrase and filler, so validation/test subtitles hold no unseen words.
  yield " ".join(p for ps in PHRASES.values() for p in ps) + " " + " ".join(FILLERS) + " " + SARCASM_PREFIX


def build_tokenizer(config: SynthConfig = SynthConfig(), vocab_size: int = 1024):
  """The embedded default tokenizer: byte-level BPE on the MER-Synth corpus, each emotion word one token."""
  from merr1_jax.data import tokenizer  # local: keeps `tokenizers` out of plain generation
  return tokenizer.build_synth_tokenizer(corpus_texts(config), vocab_size, priority_words=EMOTIONS)
