"""Dataset-level emotion-recognition scores that agree with the MER-UniBench / OV-MER / MME-Emotion code.

Pure numpy/python (no jax): `ov_score` (OV-MERD+, MER2025 track 2; per wheel the F of the averaged P, R),
`set_score` (the same arithmetic under any word -> cluster mappings), `m_avg` (the OV-MER paper's M-avg over 12
mappings), `hit_rate` (MER2023/2024, MELD, IEMOCAP), `waf` (MOSI, MOSEI, SIMS, SIMS v2; a pluggable words ->
sentiment map) and `mme_emotion_scores` (Rec-S / Rea-S / CoT-S). Ground truth and predictions are sequences
aligned by index, each item a word list or a label string (``"[happy, sad]"``). Scores are fractions in [0, 1]
(MME-Emotion: 0-100); a score over zero scored samples is NaN, as upstream. The command line is merr1_jax/metrics.py.
Definitions: docs/metrics.md; upstream: ../shared/docs/metrics.md §1-§4, §6.
"""

from __future__ import annotations

import collections
import math
import numbers
from typing import Callable, Iterable, Mapping, Sequence

from merr1_jax import emotion

WHEELS = tuple(range(1, emotion.NUM_WHEELS + 1))
M_AVG_METRICS = ("case1", "case2") + tuple(f"case3_wheel{k}_level{l}" for k in WHEELS for l in emotion.LEVELS)
NAN = float("nan")


def _parse_all(values, what: str) -> list[list[str]]:
  out = []
  for i, value in enumerate(values):
    try:
      out.append(emotion.parse_label_list(value))
    except TypeError as e:
      raise ValueError(f"{what}[{i}]: {e}") from None
  return out


def _aligned(gt, pred) -> tuple[list[list[str]], list[list[str]]]:
  gt_words, pred_words = _parse_all(gt, "gt"), _parse_all(pred, "pred")
  if len(gt_words) != len(pred_words):
    raise ValueError(f"gt and pred must be aligned: {len(gt_words)} vs {len(pred_words)} samples")
  return gt_words, pred_words


def _mean(xs: list[float]) -> float:
  return sum(xs) / len(xs) if xs else NAN


def _f(p: float, r: float) -> float:
  if math.isnan(p) or math.isnan(r):
    return NAN
  return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _overlap(to_set: Callable[[list[str]], set], gt_words, pred_words) -> dict:
  """metrics.md §2 for one mapping: F of the sample-averaged precision and recall."""
  precision, recall, skipped = [], [], 0
  for g_words, p_words in zip(gt_words, pred_words):
    g = to_set(g_words)
    if not g:  # nothing in the GT survives the mapping: the sample is not counted at all
      skipped += 1
      continue
    p = to_set(p_words)
    both = len(g & p)
    precision.append(both / len(p) if p else 0.0)
    recall.append(both / len(g))
  p, r = _mean(precision), _mean(recall)
  return {"f": _f(p, r), "precision": p, "recall": r, "n_scored": len(precision), "n_skipped": skipped}


def set_score(gt, pred, mappings: Sequence[Callable[[list[str]], set]]) -> dict:
  """metrics.md §2 under any label space: per mapping (a wheel), the F of the sample-averaged precision and
  recall of the mapped sets; ``f``, ``precision``, ``recall`` are their means over the mappings (``per_wheel``).

  ``ov_score`` is this with the five emotion wheels; a closed label list is one identity mapping.
  """
  gt_words, pred_words = _aligned(gt, pred)
  per_wheel = [_overlap(m, gt_words, pred_words) for m in mappings]
  return {"f": _mean([w["f"] for w in per_wheel]), "precision": _mean([w["precision"] for w in per_wheel]),
          "recall": _mean([w["recall"] for w in per_wheel]), "per_wheel": per_wheel}


def _dropped(ew: emotion.EmotionWheel, word_lists) -> int:
  return sum(not ew.is_known(w) for words in word_lists for w in words)


def ov_score(gt, pred, *, level: int = 1, format_version: str = "2025") -> dict:
  """Open-vocabulary EW score (metrics.md §2).

  Returns ``f``, ``precision``, ``recall`` (means over the 5 wheels, as upstream averages the per-wheel
  [F, P, R] rows), ``per_wheel`` (5 dicts with f/precision/recall/n_scored/n_skipped), ``n_samples``, and
  ``gt_words_dropped`` / ``pred_words_dropped``: words that are no format-table key, so map nowhere.
  """
  if level not in emotion.LEVELS:
    raise ValueError(f"level must be 1 or 2, got {level!r}")
  ew = emotion.load(format_version)
  gt_words, pred_words = _aligned(gt, pred)
  return set_score(gt_words, pred_words, [lambda ws, k=k: ew.map_words(ws, k, level) for k in WHEELS]) | {
      "level": level,
      "format_version": format_version,
      "n_samples": len(gt_words),
      "gt_words_dropped": _dropped(ew, gt_words),
      "pred_words_dropped": _dropped(ew, pred_words),
  }


def _metric_mapper(ew: emotion.EmotionWheel, metric: str) -> Callable[[list[str]], set]:
  if metric in ("case1", "case2"):
    fn = ew.case1 if metric == "case1" else ew.case2
    return lambda ws: {c for c in map(fn, ws) if c is not None}
  _, wheel, level = metric.split("_")  # case3_wheelK_levelL
  k, l = int(wheel.removeprefix("wheel")), int(level.removeprefix("level"))
  return lambda ws: ew.map_words(ws, k, l)


def m_avg(gt, pred, *, format_version: str = "2025") -> dict:
  """The OV-MER paper's M-avg: the mean F over the 12 mappings in ``M_AVG_METRICS``.

  Returns ``m_avg``, ``values`` (the 12 F values in ``M_AVG_METRICS`` order), ``metrics`` (their names) and
  ``per_metric`` (name -> f/precision/recall/n_scored/n_skipped).
  """
  ew = emotion.load(format_version)
  gt_words, pred_words = _aligned(gt, pred)
  per_metric = {m: _overlap(_metric_mapper(ew, m), gt_words, pred_words) for m in M_AVG_METRICS}
  values = [per_metric[m]["f"] for m in M_AVG_METRICS]
  return {
      "m_avg": _mean(values),
      "values": values,
      "metrics": list(M_AVG_METRICS),
      "per_metric": per_metric,
      "format_version": format_version,
      "n_samples": len(gt_words),
  }


def hit_rate(gt, pred, *, format_version: str = "2025") -> dict:
  """Basic-emotion hit rate (metrics.md §3), level 1.

  Per wheel: samples whose mapped GT is empty (neutral, or a label the wheel lacks) are skipped; a scored
  sample counts ``|P ∩ G|`` (0 or 1 for one-hot GT; upstream does not clip it for multi-label GT).
  Returns ``hit`` (mean over wheels), ``per_wheel`` (hit/n_scored/n_skipped), counts as in :func:`ov_score`.
  """
  ew = emotion.load(format_version)
  gt_words, pred_words = _aligned(gt, pred)
  per_wheel = []
  for k in WHEELS:
    hits, skipped = [], 0
    for g_words, p_words in zip(gt_words, pred_words):
      g = ew.map_words(g_words, k)
      if not g:
        skipped += 1
        continue
      hits.append(len(g & ew.map_words(p_words, k)))
    per_wheel.append({"hit": _mean(hits), "n_scored": len(hits), "n_skipped": skipped})
  return {
      "hit": _mean([w["hit"] for w in per_wheel]),
      "per_wheel": per_wheel,
      "format_version": format_version,
      "n_samples": len(gt_words),
      "gt_words_dropped": _dropped(ew, gt_words),
      "pred_words_dropped": _dropped(ew, pred_words),
  }


def weighted_f1(y_true: Sequence, y_pred: Sequence) -> float:
  """Support-weighted F1 over the labels seen in either sequence (scikit-learn ``average='weighted'``).

  A label with no predicted or no true member has precision or recall 0 (sklearn's zero_division=0).
  """
  if len(y_true) != len(y_pred):
    raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
  if not y_true:
    return NAN
  tp, n_pred, n_true = collections.Counter(), collections.Counter(y_pred), collections.Counter(y_true)
  for t, p in zip(y_true, y_pred):
    tp[t] += t == p
  total = 0.0
  for label in set(n_true) | set(n_pred):
    prec = tp[label] / n_pred[label] if n_pred[label] else 0.0
    rec = tp[label] / n_true[label] if n_true[label] else 0.0
    total += n_true[label] * (2 * prec * rec / (prec + rec) if prec + rec else 0.0)
  return total / len(y_true)


def waf(gt_valence: Sequence[float], pred, *, mapper: emotion.SentimentMapper | None = None) -> dict:
  """Sentiment WAF and ACC (metrics.md §4).

  ``pred`` items are word lists / label strings, turned into -1/0/+1 by ``mapper`` (default: the offline
  :class:`merr1_jax.emotion.VaderSentimentMapper`, a documented deviation from the official LLM), or numbers,
  taken as already-mapped sentiment. Samples with GT valence 0 are skipped (counted); the rest compare
  ``gt > 0`` with ``pred > 0``, so a neutral prediction counts as negative.
  """
  if len(gt_valence) != len(pred):
    raise ValueError(f"gt_valence and pred must be aligned: {len(gt_valence)} vs {len(pred)} samples")
  if mapper is None:
    mapper = emotion.VaderSentimentMapper()
  y_true, y_pred, skipped, neutral = [], [], 0, 0
  for i, (g, p) in enumerate(zip(gt_valence, pred)):
    if isinstance(g, bool) or not isinstance(g, numbers.Real) or math.isnan(g):
      raise ValueError(f"gt_valence[{i}] must be a real number, got {g!r}")
    if g == 0:
      skipped += 1
      continue
    if isinstance(p, numbers.Real) and not isinstance(p, bool):
      s = float(p)
      if math.isnan(s):
        raise ValueError(f"pred[{i}] is NaN")
    else:
      try:
        s = mapper(emotion.parse_label_list(p))
      except TypeError as e:
        raise ValueError(f"pred[{i}]: {e}") from None
    neutral += s == 0
    y_true.append(g > 0)
    y_pred.append(s > 0)
  acc = _mean([float(t == p) for t, p in zip(y_true, y_pred)])
  return {"waf": weighted_f1(y_true, y_pred), "acc": acc, "n_scored": len(y_true), "n_skipped": skipped,
          "n_pred_neutral": neutral}


def _step_scores(item, i: int) -> tuple[str, list[int]]:
  task, scores = "all", item
  if isinstance(item, Mapping):
    if "scores" not in item:
      raise ValueError(f"items[{i}]: a mapping item needs a 'scores' list, got keys {sorted(item)}")
    task, scores = str(item.get("task", "all")), item["scores"]
  if isinstance(scores, (str, bytes)) or not isinstance(scores, Iterable):
    raise ValueError(f"items[{i}]: scores must be a list of 0/1, got {scores!r}")
  scores = list(scores)
  if not scores:
    raise ValueError(f"items[{i}]: no step scores (the last one is the answer, so at least one is needed)")
  bad = [s for s in scores if isinstance(s, str) or s not in (0, 1)]
  if bad:
    raise ValueError(f"items[{i}]: step scores must be 0 or 1, got {bad[:3]}")
  return task, [int(s) for s in scores]


def _mme_summary(rows: list[tuple[int, float]]) -> dict:
  rec = 100 * _mean([r for r, _ in rows])
  rea = 100 * _mean([a for _, a in rows])
  return {"rec_s": rec, "rea_s": rea, "cot_s": 0.5 * rec + 0.5 * rea, "n": len(rows)}


def mme_emotion_scores(items) -> dict:
  """MME-Emotion arithmetic (metrics.md §6) from judge step scores.

  Each item is a list of 0/1 step scores whose last entry is the answer, or a mapping
  ``{"task": str, "scores": [...]}``. Per item, rec = answer score and rea = mean of the other steps (0 when
  there are none); Rec-S and Rea-S are 100 x their means over items, CoT-S = (Rec-S + Rea-S) / 2.
  Returns ``overall`` (over all items), ``per_task`` and ``task_mean`` (the plain mean of the per-task scores).
  """
  by_task: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
  for i, item in enumerate(items):
    task, scores = _step_scores(item, i)
    reasoning = scores[:-1]
    by_task[task].append((scores[-1], sum(reasoning) / len(reasoning) if reasoning else 0.0))
  if not by_task:
    raise ValueError("mme_emotion_scores needs at least one item")
  per_task = {t: _mme_summary(rows) for t, rows in sorted(by_task.items())}
  overall = _mme_summary([r for rows in by_task.values() for r in rows])
  task_mean = {k: _mean([s[k] for s in per_task.values()]) for k in ("rec_s", "rea_s", "cot_s")}
  return {"overall": overall, "per_task": per_task, "task_mean": task_mean}

