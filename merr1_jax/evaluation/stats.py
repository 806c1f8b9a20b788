"""Per-sample statistics of an evaluation and their summaries (evaluation.py builds the records, reports.py shows
them): the per-sample precision and recall, the answer confidence at the first anchor, completion segment lengths,
the paired fast-vs-slow analysis and the calibration bins.

Shape legend: K wheels, C clusters (a label space's multi-hot [K, C]). Scores are fractions; a per-sample value
is None where it is undefined (no GT cluster), and summaries leave such samples out and count them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from merr1_jax import emotion, rollout
from merr1_jax.task import metrics, rewards


def fast_vs_slow(samples: Sequence[dict]) -> dict:
  """The paper's starting analysis: slow minus fast per-sample precision and recall, paired by example.

  Per example, each mode's scores are averaged over its samples; the difference d_i = slow_i - fast_i is then
  summarised by its mean, standard error, a normal 95% interval and the paired effect size d_z = mean / sd.
  Positive precision and negative recall differences are the "slow is more precise, fast recalls more" pattern.
  Examples with an undefined score (no GT cluster) are left out and counted.
  """
  per: dict[str, dict[str, list]] = {}
  for r in samples:
    per.setdefault(r["id"], {}).setdefault(r["mode"], []).append(r)
  out = {}
  for key in ("precision", "recall"):
    diffs, skipped = [], 0
    for modes in per.values():
      vals = {m: [x[key] for x in modes.get(m, []) if x[key] is not None] for m in ("slow", "fast")}
      if not vals["slow"] or not vals["fast"]:
        skipped += 1
        continue
      diffs.append(float(np.mean(vals["slow"]) - np.mean(vals["fast"])))
    n = len(diffs)
    mean = float(np.mean(diffs)) if n else None
    sd = float(np.std(diffs, ddof=1)) if n > 1 else None
    se = sd / math.sqrt(n) if sd is not None else None
    out[key] = {"slow_minus_fast": mean, "stderr": se, "n": n, "n_skipped": skipped,
                "ci95": None if se is None else [mean - 1.96 * se, mean + 1.96 * se],
                "effect_size_dz": None if not sd else mean / sd}
  return out


def segment_lengths(tokens: Sequence[int], mode: str, ids: rollout.SpecialIds) -> tuple[int | None, int | None]:
  """(think, answer) lengths in tokens of one completion (fast mode: the prefilled prefix counted in), each None
  when its tags are missing. The answer is the span inside the last <answer> that a </answer> follows."""
  seq = (list(ids.fast_prefix) if mode == "fast" else []) + [int(t) for t in tokens]
  think = None
  if ids.think[0] in seq and ids.think[1] in seq[seq.index(ids.think[0]):]:
    start = seq.index(ids.think[0])
    think = seq.index(ids.think[1], start) - start - 1
  answer = None
  closes = [i for i, t in enumerate(seq) if t == ids.answer_close]
  if closes:
    opens = [i for i, t in enumerate(seq[:closes[-1]]) if t == ids.answer_open]
    if opens:
      end = next(i for i in closes if i > opens[-1])
      answer = end - opens[-1] - 1
  return think, answer


def sample_pr(ew: emotion.EmotionWheel, gt: Sequence[str], pred: Sequence[str]) -> tuple[float | None, float | None]:
  """Per-sample level-1 precision and recall, averaged over the wheels whose GT maps somewhere (None if none)."""
  precision, recall = [], []
  for k in metrics.WHEELS:
    g = ew.map_words(gt, k)
    if not g:
      continue
    p = ew.map_words(pred, k)
    precision.append(len(g & p) / len(p) if p else 0.0)
    recall.append(len(g & p) / len(g))
  if not precision:
    return None, None
  return sum(precision) / len(precision), sum(recall) / len(recall)


def space_pr(space: rewards.LabelSpace, gt: Sequence[str], pred: Sequence[str]) -> tuple[float | None, float | None]:
  """`sample_pr` under any label space (metric 'set'): the wheels of `space` whose GT maps somewhere."""
  gt_KxC, _ = space.encode(gt)
  pred_KxC, _ = space.encode(pred)
  wheels = gt_KxC.any(-1)
  if not wheels.any():
    return None, None
  hit = (gt_KxC & pred_KxC).sum(-1)[wheels]
  n_pred = pred_KxC.sum(-1)[wheels]
  precision = np.where(n_pred > 0, hit / np.maximum(n_pred, 1), 0.0)
  recall = hit / gt_KxC.sum(-1)[wheels]
  return float(precision.mean()), float(recall.mean())


def masses(space: rewards.LabelSpace, logmass_KxC: np.ndarray, gt, pred) -> tuple[float | None, float | None]:
  """(confidence, gt_mass) of one sample at its first anchor; see the module docstring."""
  gt_KxC, _ = space.encode(gt)
  pred_KxC, _ = space.encode(pred)
  wheels = gt_KxC.any(-1)
  if not wheels.any():
    return None, None
  p_KxC = np.exp(logmass_KxC.astype(np.float64))
  conf = (p_KxC * pred_KxC).sum(-1)[wheels].mean()
  gt_mass = (p_KxC * gt_KxC).sum(-1)[wheels].mean()
  return float(conf), float(gt_mass)


def dist(xs: Sequence[float | None]) -> dict:
  vals = np.asarray([x for x in xs if x is not None], np.float64)
  if not vals.size:
    return {"mean": None, "median": None, "p90": None, "n": 0}
  return {"mean": float(vals.mean()), "median": float(np.median(vals)), "p90": float(np.percentile(vals, 90)),
          "n": int(vals.size)}


def calibration_bins(confidence: Sequence[float], correct: Sequence[float], n_bins: int = 10) -> dict:
  """Equal-width confidence bins on [0, 1]: per bin the count, mean confidence and mean correctness, and the
  expected calibration error sum_b n_b/n |conf_b - acc_b| (None without samples)."""
  conf, corr = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
  idx = np.clip((conf * n_bins).astype(int), 0, n_bins - 1)
  bins, ece = [], 0.0
  for b in range(n_bins):
    sel = idx == b
    n = int(sel.sum())
    bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": n,
                 "confidence": float(conf[sel].mean()) if n else None,
                 "correct": float(corr[sel].mean()) if n else None})
    if n:
      ece += n / conf.size * abs(conf[sel].mean() - corr[sel].mean())
  return {"bins": bins, "ece": float(ece) if conf.size else None, "n": int(conf.size)}
