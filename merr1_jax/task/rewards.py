"""Host-side answer handling, label spaces, and the per-rollout rewards (docs/method.md, E1).

Text never enters jit: completions are parsed here on the host, words are mapped to integer cluster ids, and
the reward math then runs as vectorised JAX over small multi-hot arrays.

Shape legend:
  B: completions     K: label wheels (5 for the emotion wheels, 1 for a closed label list)
  C: clusters per wheel, padded to the largest wheel (``LabelSpace.cluster_mask`` says which slots exist)
  V: tokenizer vocabulary     O: reward objectives

Conventions:
  * A wheel whose ground-truth set is empty is skipped for that sample (``wheel_mask`` False).
  * Every reward is in [0, 1]; a malformed completion (format 0) scores 0 on every reward.
  * Precision of an empty prediction is 0; F1 is 0 when precision + recall is 0.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import emotion
from merr1_jax.task import prompts

Array = jax.Array

# ---------------------------------------------------------------------------------------------------------------
# Parsing and format (method.md, "Output format and modes")

_SPLIT = re.compile("[,;\n\uff0c\uff1b]")  # comma, semicolon, newline, full-width comma and semicolon
_BRACKETS = "[](){}\"'"  # stripped from both ends of the answer and of each item, with any Unicode whitespace
_TAGS = (prompts.THINK_OPEN, prompts.THINK_CLOSE, prompts.ANSWER_OPEN, prompts.ANSWER_CLOSE)


def extract_answer(text: str) -> str | None:
  """The text inside the last ``<answer>...</answer>`` pair, or None when there is none.

  "Last pair" means the last ``<answer>`` that a ``</answer>`` follows, up to the first ``</answer>`` after it,
  so stray or nested tags never leak into the words. Linear time.
  """
  last_close = text.rfind(prompts.ANSWER_CLOSE)
  open_ = text.rfind(prompts.ANSWER_OPEN, 0, max(last_close, 0))
  if last_close < 0 or open_ < 0:
    return None
  start = open_ + len(prompts.ANSWER_OPEN)
  return text[start : text.find(prompts.ANSWER_CLOSE, start)]


def _strip(text: str) -> str:
  """Strips brackets, quotes and any Unicode whitespace (str.strip(): U+00A0, U+3000, U+2009, U+0085, ...) from
  both ends until none remain, so `( fearful` and `\u00a0(\u00a0fearful` both give `fearful`."""
  while True:
    out = text.strip().strip(_BRACKETS)
    if out == text:
      return out
    text = out


def parse_answer(text: str) -> tuple[str, ...]:
  """Emotion words of a completion: split, lowercased, stripped, de-duplicated in first-seen order.

  Never raises; a completion without an answer block gives ().
  """
  body = extract_answer(text)
  if body is None:
    return ()
  words: dict[str, None] = {}
  for item in _SPLIT.split(_strip(body)):
    word = _strip(item).lower()
    if word:
      words[word] = None
  return tuple(words)


def assistant_text(completion: str, mode: str) -> str:
  """The whole assistant turn: in fast mode the prefilled prefix belongs to the prompt, so add it back."""
  if mode == "fast":
    return prompts.FAST_PREFIX + completion
  if mode == "slow":
    return completion
  raise ValueError(f"unknown mode {mode!r}; expected one of {prompts.MODES}")


def format_ok(completion: str, mode: str) -> bool:
  """1 when the completion fully matches its mode's format (method.md, r_fmt).

  Both modes: the assistant turn is exactly ``<think>T</think><answer>A</answer>`` (whitespace allowed between
  the blocks and at the end), each tag once, and A parses to at least one word. Slow mode needs a non-empty T;
  fast mode's T is the empty prefilled one.
  """
  text = assistant_text(completion, mode).strip()
  if any(text.count(tag) != 1 for tag in _TAGS):
    return False
  t_open, t_close = text.find(prompts.THINK_OPEN), text.find(prompts.THINK_CLOSE)
  a_open, a_close = text.find(prompts.ANSWER_OPEN), text.find(prompts.ANSWER_CLOSE)
  if not (t_open == 0 and t_open < t_close < a_open < a_close and text.endswith(prompts.ANSWER_CLOSE)):
    return False
  if text[t_close + len(prompts.THINK_CLOSE) : a_open].strip():
    return False
  think = text[t_open + len(prompts.THINK_OPEN) : t_close].strip()
  if (mode == "slow") != bool(think):
    return False
  return bool(parse_answer(text))


# ---------------------------------------------------------------------------------------------------------------
# Label spaces: words -> cluster ids per wheel (method.md, "Label space")


@dataclasses.dataclass(frozen=True, eq=False)
class LabelSpace:
  """Maps emotion words to cluster ids in K wheels.

  ``cluster_names[k]`` lists wheel k's clusters; ``mapper(word, k)`` returns a cluster name or None (dropped).
  ``vocabulary`` is every word that can map, used to build the calibration token sets.
  """

  name: str
  cluster_names: tuple[tuple[str, ...], ...]
  mapper: Callable[[str, int], str | None]
  vocabulary: tuple[str, ...]

  @property
  def num_wheels(self) -> int:
    return len(self.cluster_names)

  @property
  def num_clusters(self) -> int:
    return max(len(c) for c in self.cluster_names)

  @functools.cached_property
  def _index(self) -> tuple[dict[str, int], ...]:
    return tuple({c: i for i, c in enumerate(names)} for names in self.cluster_names)

  def cluster_mask(self) -> np.ndarray:
    """[K, C] bool: which padded cluster slots exist."""
    mask = np.zeros((self.num_wheels, self.num_clusters), bool)
    for k, names in enumerate(self.cluster_names):
      mask[k, : len(names)] = True
    return mask

  @functools.lru_cache(maxsize=200_000)
  def lookup(self, word: str) -> tuple[int, ...]:
    """Cluster id of ``word`` in each wheel, -1 where it is dropped."""
    word = word.strip().lower()
    out = []
    for k in range(self.num_wheels):
      cluster = self.mapper(word, k)
      out.append(-1 if cluster is None else self._index[k][cluster])
    return tuple(out)

  def mappings(self) -> list[Callable[[Sequence[str]], set]]:
    """Per wheel, words -> the set of their clusters (dropped words give nothing): metrics.set_score's input."""
    return [lambda ws, k=k: {c for w in ws if (c := self.lookup(w)[k]) >= 0} for k in range(self.num_wheels)]

  def encode(self, words: Iterable[str]) -> tuple[np.ndarray, int]:
    """Multi-hot [K, C] of a word list, and how many words mapped to nothing in every wheel."""
    hot = np.zeros((self.num_wheels, self.num_clusters), bool)
    dropped = 0
    for word in words:
      ids = self.lookup(word)
      if all(i < 0 for i in ids):
        dropped += 1
      for k, i in enumerate(ids):
        if i >= 0:
          hot[k, i] = True
    return hot, dropped

  def encode_batch(self, word_lists: Sequence[Iterable[str]]) -> tuple[np.ndarray, np.ndarray]:
    """[B, K, C] multi-hot and [B] dropped-word counts."""
    pairs = [self.encode(w) for w in word_lists]
    hot = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, self.num_wheels, self.num_clusters), bool)
    return hot, np.asarray([p[1] for p in pairs], np.int32)

  @classmethod
  def emotion_wheel(cls, format_version: str = "2025", level: int = 1) -> LabelSpace:
    """The MER-UniBench emotion-wheel space: 5 wheels, one cluster per wheel at most (metrics.md §1)."""
    ew = emotion.load(format_version)
    names = tuple(ew.clusters(k + 1, level) for k in range(emotion.NUM_WHEELS))
    return cls(
        name=f"emotion_wheel_{format_version}_level{level}",
        cluster_names=names,
        mapper=lambda w, k: ew.map_word(w, k + 1, level),
        vocabulary=ew.surface_forms(),
    )

  @classmethod
  def closed(cls, labels: Sequence[str]) -> LabelSpace:
    """The identity space over a closed label list (K = 1): a word maps to itself if it is in the list."""
    names = tuple(sorted({l.strip().lower() for l in labels}))
    if not names or any(not n for n in names):
      raise ValueError(f"a closed label space needs non-empty labels, got {list(labels)!r}")
    known = frozenset(names)
    return cls(
        name="closed",
        cluster_names=(names,),
        mapper=lambda w, k: w if w in known else None,
        vocabulary=names,
    )


def category_token_sets(space: LabelSpace, encode: Callable[[str], list[int]], vocab_size: int) -> np.ndarray:
  """T(c) of method.md SFC step 1, as a [K, C, V] bool mask.

  T(c) holds the first token of every vocabulary word that maps to cluster c, tokenised with and without a
  leading space. A token claimed by two clusters of the same wheel is removed from both: it cannot tell them
  apart.
  """
  owner = [dict() for _ in range(space.num_wheels)]  # token -> cluster id, or -1 when ambiguous
  for word in space.vocabulary:
    ids = space.lookup(word)
    firsts = {toks[0] for toks in (encode(word), encode(" " + word)) if toks}
    for k, c in enumerate(ids):
      if c < 0:
        continue
      for tok in firsts:
        if not 0 <= tok < vocab_size:
          raise ValueError(f"tokenizer gave id {tok} for {word!r}, outside the vocabulary of {vocab_size}")
        prev = owner[k].get(tok, c)
        owner[k][tok] = c if prev == c else -1
  sets = np.zeros((space.num_wheels, space.num_clusters, vocab_size), bool)
  for k, table in enumerate(owner):
    for tok, c in table.items():
      if c >= 0:
        sets[k, c, tok] = True
  return sets


# ---------------------------------------------------------------------------------------------------------------
# Host side: completions -> arrays


@dataclasses.dataclass(frozen=True)
class ScoredBatch:
  """Numpy arrays describing a batch of completions against their ground truth."""

  pred_BxKxC: np.ndarray  # bool
  gt_BxKxC: np.ndarray  # bool
  format_ok_B: np.ndarray  # bool
  valid_B: np.ndarray  # bool: the ground truth maps to at least one cluster
  num_words_B: np.ndarray  # int32: parsed answer words
  dropped_B: np.ndarray  # int32: parsed words outside the label space
  words: tuple[tuple[str, ...], ...]


def score_completions(
    completions: Sequence[str],
    modes: Sequence[str],
    gt_words: Sequence[Sequence[str]],
    space: LabelSpace,
) -> ScoredBatch:
  """Parses each completion in its mode and maps prediction and ground truth to the label space."""
  if not len(completions) == len(modes) == len(gt_words):
    raise ValueError(f"lengths differ: {len(completions)} completions, {len(modes)} modes, {len(gt_words)} GTs")
  words = tuple(parse_answer(assistant_text(c, m)) for c, m in zip(completions, modes))
  fmt = np.asarray([format_ok(c, m) for c, m in zip(completions, modes)], bool)
  pred, dropped = space.encode_batch(words)
  gt, _ = space.encode_batch(gt_words)
  return ScoredBatch(
      pred_BxKxC=pred,
      gt_BxKxC=gt,
      format_ok_B=fmt,
      valid_B=gt.any(axis=(1, 2)),
      num_words_B=np.asarray([len(w) for w in words], np.int32),
      dropped_B=dropped,
      words=words,
  )


# ---------------------------------------------------------------------------------------------------------------
# Reward math (vectorised JAX) and the registry


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RewardInputs:
  """Device-side reward inputs: the multi-hot arrays of a ScoredBatch."""

  pred_BxKxC: Array
  gt_BxKxC: Array
  format_ok_B: Array

  @classmethod
  def from_scored(cls, s: ScoredBatch) -> RewardInputs:
    return cls(jnp.asarray(s.pred_BxKxC), jnp.asarray(s.gt_BxKxC), jnp.asarray(s.format_ok_B))


def set_rewards(pred_BxKxC: Array, gt_BxKxC: Array) -> tuple[Array, Array, Array]:
  """(E1) (recall_B, precision_B, f1_B): per-wheel set scores averaged over the wheels with a non-empty GT.

  rec_k = |P∩G|/|G|, prec_k = |P∩G|/|P| (0 if P is empty), f1_k = 2 prec rec / (prec + rec) (0 if both are 0).
  A sample whose GT is empty in every wheel scores 0.
  """
  p = pred_BxKxC.astype(jnp.float32)
  g = gt_BxKxC.astype(jnp.float32)
  hit_BxK = (p * g).sum(-1)
  n_p, n_g = p.sum(-1), g.sum(-1)
  rec = hit_BxK / jnp.maximum(n_g, 1.0)
  prec = hit_BxK / jnp.maximum(n_p, 1.0)
  f1 = jnp.where(prec + rec > 0, 2 * prec * rec / jnp.maximum(prec + rec, 1e-30), 0.0)
  wheel_BxK = n_g > 0
  n_wheels = jnp.maximum(wheel_BxK.sum(-1), 1)
  mean = lambda x: jnp.where(wheel_BxK, x, 0.0).sum(-1) / n_wheels
  return mean(rec), mean(prec), mean(f1)


RewardFn = Callable[[RewardInputs], Array]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
  """Adds a reward ``fn(RewardInputs) -> [B] float32 in [0, 1]`` to the registry under ``name``."""

  def wrap(fn: RewardFn) -> RewardFn:
    if name in REWARDS:
      raise ValueError(f"reward {name!r} is already registered")
    REWARDS[name] = fn
    return fn

  return wrap


def _gated(x_B: Array, inputs: RewardInputs) -> Array:
  return jnp.where(inputs.format_ok_B.astype(bool), x_B, 0.0)


@register_reward("recall")
def recall_reward(inputs: RewardInputs) -> Array:
  """(E1) r_rec: ``set_rewards`` recall, 0 on malformed completions."""
  return _gated(set_rewards(inputs.pred_BxKxC, inputs.gt_BxKxC)[0], inputs)


@register_reward("precision")
def precision_reward(inputs: RewardInputs) -> Array:
  """(E1) r_prec: ``set_rewards`` precision, 0 on malformed completions."""
  return _gated(set_rewards(inputs.pred_BxKxC, inputs.gt_BxKxC)[1], inputs)


@register_reward("f1")
def f1_reward(inputs: RewardInputs) -> Array:
  """(E1) r_f1: ``set_rewards`` F1, 0 on malformed completions (not one of the default RL objectives)."""
  return _gated(set_rewards(inputs.pred_BxKxC, inputs.gt_BxKxC)[2], inputs)


@register_reward("format")
def format_reward(inputs: RewardInputs) -> Array:
  """r_fmt: 1 when ``format_ok`` held for the completion (method.md, "Format reward")."""
  return inputs.format_ok_B.astype(jnp.float32)


def compute_rewards(names: Sequence[str], inputs: RewardInputs) -> Array:
  """(E1) [B, O] rewards, one column per registered name, in order."""
  unknown = [n for n in names if n not in REWARDS]
  if unknown:
    raise ValueError(f"unknown reward(s) {unknown}; registered: {sorted(REWARDS)}")
  return jnp.stack([REWARDS[n](inputs) for n in names], axis=1)
