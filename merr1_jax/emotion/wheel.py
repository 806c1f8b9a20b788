"""The emotion-wheel (EW) word mapping of MER-UniBench / OV-MER (metrics.md §1, steps 3-6).

Three tables, all vendored in ``emotion_wheel.json`` (see NOTICE and scripts/convert_emotion_wheel.py):

* format table: surface form -> raw words (``name`` column); every raw word also maps to itself.
* synonym table: word -> wheel words; every wheel word also maps to itself (union over 8 GPT runs).
* five wheels, each a tree level1 -> level2 -> [level3].

Mapping a word to wheel k ("case3"): take its raw words from the format table, their wheel words from the
synonym table, go through those candidates in sorted order and return the wheel-k cluster of the first one the
wheel knows. A word that is not a format-table key, or whose candidates the wheel does not know, is dropped
(None). ``neutral`` is in no table, so it is dropped everywhere. The OV-MER paper's two coarser mappings are
``case1`` (first sorted raw word) and ``case2`` (first sorted wheel word of that raw word).

Every lookup lowercases and strips the word first. The per-(wheel, level) maps are built once per loaded
wheel for all ~7.4k surface forms, so mapping a word is one dict lookup.
"""

from __future__ import annotations

import functools
import importlib.resources
import json

NUM_WHEELS = 5
LEVELS = (1, 2)
FORMAT_VERSIONS = ("2025", "2026")
_DATA_FILE = "emotion_wheel.json"


def _wheel_maps(tree: dict[str, dict[str, list[str]]]) -> tuple[dict[str, str], dict[str, str]]:
  """Level-1 and level-2 cluster maps of one wheel tree.

  Built in tree order with plain assignment, as upstream does, so a word listed twice takes the cluster
  of its last occurrence.
  """
  level1: dict[str, str] = {}
  level2: dict[str, str] = {}
  for l1, children in tree.items():
    level1[l1] = l1
    level2[l1] = sorted(children)[0]  # a level-1 word stands for its alphabetically first level-2 word
    for l2, leaves in children.items():
      level1[l2] = l1
      level2[l2] = l2
      for l3 in leaves:
        level1[l3] = l1
        level2[l3] = l2
  return level1, level2


class EmotionWheel:
  """Word -> cluster maps for one format-table version. Get instances with :func:`load`."""

  def __init__(self, data: dict, format_version: str):
    self.format_version = format_version
    table = dict(data["format"]["2025"])
    if format_version == "2026":
      table.update(data["format_2026_overrides"])
    raws: dict[str, set[str]] = {}
    for name, surfaces in table.items():
      for surface in surfaces:
        raws.setdefault(surface, set()).add(name)
      raws.setdefault(name, set()).add(name)
    self._raws = {w: tuple(sorted(r)) for w, r in raws.items()}
    self._synonym = {w: tuple(v) for w, v in data["synonym"].items()}
    # Candidate wheel words of each surface form, sorted: the order that makes case3 deterministic.
    self._candidates = {
        w: tuple(sorted({c for raw in r for c in self._synonym[raw]})) for w, r in self._raws.items()
    }
    self._wheel_maps = tuple(_wheel_maps(tree) for tree in data["wheels"])
    if len(self._wheel_maps) != NUM_WHEELS:
      raise ValueError(f"{_DATA_FILE}: expected {NUM_WHEELS} wheels, found {len(self._wheel_maps)}")
    self._case3: dict[tuple[int, int], dict[str, str]] = {}

  def __repr__(self) -> str:
    return f"EmotionWheel(format_version={self.format_version!r}, surface_forms={len(self._raws)})"

  def _wheel_map(self, wheel: int, level: int) -> dict[str, str]:
    if not isinstance(wheel, int) or not 1 <= wheel <= NUM_WHEELS:
      raise ValueError(f"wheel must be an int in 1..{NUM_WHEELS}, got {wheel!r}")
    if level not in LEVELS:
      raise ValueError(f"level must be 1 or 2, got {level!r}")
    return self._wheel_maps[wheel - 1][level - 1]

  def case3_table(self, wheel: int, level: int = 1) -> dict[str, str]:
    """Every surface form that maps into wheel ``wheel`` at ``level``, with its cluster (built once)."""
    key = (wheel, level)
    if key not in self._case3:
      wheel_map = self._wheel_map(wheel, level)
      table = {}
      for word, candidates in self._candidates.items():
        for c in candidates:
          if c in wheel_map:
            table[word] = wheel_map[c]
            break
      self._case3[key] = table
    return self._case3[key]

  def map_word(self, word: str, wheel: int, level: int = 1) -> str | None:
    """The wheel-``wheel`` cluster of ``word`` at ``level`` ("case3_wheelK_levelL"), or None if dropped."""
    return self.case3_table(wheel, level).get(word.lower().strip())

  def map_words(self, words, wheel: int, level: int = 1) -> set[str]:
    """The set of clusters of ``words``; dropped words contribute nothing."""
    table = self.case3_table(wheel, level)
    out = set()
    for word in words:
      cluster = table.get(word.lower().strip())
      if cluster is not None:
        out.add(cluster)
    return out

  def case1(self, word: str) -> str | None:
    """The first sorted raw word of ``word`` in the format table, or None if it is not a key."""
    raws = self._raws.get(word.lower().strip())
    return raws[0] if raws else None

  def case2(self, word: str) -> str | None:
    """The first sorted synonym-table wheel word of ``case1(word)``, or None."""
    raw = self.case1(word)
    return None if raw is None else self._synonym[raw][0]

  def is_known(self, word: str) -> bool:
    """Whether ``word`` is a format-table key (otherwise every mapping drops it)."""
    return word.lower().strip() in self._raws

  def raw_words(self, word: str) -> tuple[str, ...]:
    """The sorted raw words (format-table names) behind ``word``; empty if unknown."""
    return self._raws.get(word.lower().strip(), ())

  def candidates(self, word: str) -> tuple[str, ...]:
    """The sorted wheel words reachable from ``word`` through the format and synonym tables."""
    return self._candidates.get(word.lower().strip(), ())

  @functools.lru_cache(maxsize=None)
  def clusters(self, wheel: int, level: int = 1) -> tuple[str, ...]:
    """Every cluster the wheel map can return, sorted."""
    return tuple(sorted(set(self._wheel_map(wheel, level).values())))

  @functools.lru_cache(maxsize=None)
  def surface_forms(self) -> tuple[str, ...]:
    """Every word that can map (the format-table keys), sorted."""
    return tuple(sorted(self._raws))


@functools.lru_cache(maxsize=None)
def _read_data() -> dict:
  text = importlib.resources.files(__package__).joinpath(_DATA_FILE).read_text(encoding="utf-8")
  return json.loads(text)


@functools.lru_cache(maxsize=None)
def _load(format_version: str) -> EmotionWheel:
  return EmotionWheel(_read_data(), format_version)


def load(format_version: str = "2025") -> EmotionWheel:
  """The emotion wheel for a format-table version: "2025" (default, reproduces MER-UniBench) or "2026".

  Cached: every call with the same version returns the same object.
  """
  if format_version not in FORMAT_VERSIONS:
    raise ValueError(f"format_version must be one of {FORMAT_VERSIONS}, got {format_version!r}")
  return _load(format_version)
