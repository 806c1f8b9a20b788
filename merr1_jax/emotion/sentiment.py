"""Open-set emotion words -> sentiment (-1, 0, +1): the offline VADER substitute of metrics.md §4.

The official MER-UniBench pipeline asks an LLM (Qwen2.5-7B-Instruct) whether a word list is positive, negative
or neutral. That needs a large model, so this module offers an offline stand-in, reported as a deviation:

1. Each word is lowercased and stripped. If any of its tokens is in the VADER lexicon, its score is VADER's
   ``compound`` polarity of the word (in [-1, 1]; VADER also handles phrases such as ``not happy``).
2. Otherwise the word falls back through the emotion-wheel tables: first its format-table raw words, then
   their synonym-table wheel words (each group in sorted order); the first that VADER knows gives the score.
3. A word nothing knows is ignored. The list's score is the mean over scored words (0 if none), and it is
   +1 above 0.05, -1 below -0.05, else 0 (VADER's usual thresholds).

``SentimentMapper`` is the interface :func:`merr1_jax.task.metrics.waf` takes: any callable words -> -1/0/+1 will do
(e.g. one that wraps an LLM judge).
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Sequence

from merr1_jax.emotion import wheel as wheel_lib

SentimentMapper = Callable[[Sequence[str]], int]
THRESHOLD = 0.05
_TOKEN = re.compile(r"[a-z']+")


@functools.lru_cache(maxsize=1)
def _analyzer():
  # Imported lazily: only WAF needs it. The lexicon ships inside the package; nothing is downloaded.
  from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

  return SentimentIntensityAnalyzer()


class VaderSentimentMapper:
  """The default open-set -> sentiment mapper (see module docstring). Word scores are memoised."""

  def __init__(self, format_version: str = "2025", threshold: float = THRESHOLD):
    self._wheel = wheel_lib.load(format_version)
    self.threshold = threshold
    self._cache: dict[str, float | None] = {}

  def _vader(self, text: str) -> float | None:
    analyzer = _analyzer()
    if not any(t in analyzer.lexicon for t in _TOKEN.findall(text)):
      return None
    return float(analyzer.polarity_scores(text)["compound"])

  def word_score(self, word: str) -> float | None:
    """VADER compound score of one word after the table fall-back, or None if nothing knows it."""
    word = word.lower().strip()
    if word not in self._cache:
      score = self._vader(word) if word else None
      if score is None:
        for fallback in (*self._wheel.raw_words(word), *self._wheel.candidates(word)):
          score = self._vader(fallback)
          if score is not None:
            break
      self._cache[word] = score
    return self._cache[word]

  def score(self, words: Sequence[str]) -> float:
    """Mean word score of a list (0.0 when no word is known)."""
    scores = [s for s in (self.word_score(w) for w in words) if s is not None]
    return sum(scores) / len(scores) if scores else 0.0

  def __call__(self, words: Sequence[str]) -> int:
    s = self.score(words)
    return 1 if s > self.threshold else -1 if s < -self.threshold else 0
