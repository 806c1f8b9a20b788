"""Dataset-level emotion-recognition scores that agree with the MER-UniBench / OV-MER / MME-Emotion code.

Pure numpy/python (no jax). Definitions: docs/metrics.md; upstream: ../shared/docs/metrics.md §1-§4, §6.

* :func:`ov_score`  open-vocabulary EW score (OV-MERD+, MER2025 track 2): per wheel the F of the averaged P, R.
* :func:`m_avg`     the OV-MER paper's M-avg over 12 mappings (case1, case2, 5 wheels x 2 levels).
* :func:`hit_rate`  basic-emotion hit rate (MER2023/2024, MELD, IEMOCAP).
* :func:`waf`       sentiment weighted F1 (MOSI, MOSEI, SIMS, SIMS v2), with a pluggable words -> sentiment map.
* :func:`mme_emotion_scores`  MME-Emotion Rec-S / Rea-S / CoT-S from judge step scores.

Ground truth and predictions are sequences aligned by index. Each item is a word list or a label string
(parsed with :func:`merr1_jax.emotion.parse_label_list`, so ``"[happy, sad]"`` works). Scores are fractions in
[0, 1] (MME-Emotion: 0-100, as its paper reports). A score over zero scored samples is NaN, as upstream
(``np.mean([])``); the CLI prints it as null.

CLI: ``python -m merr1_jax.metrics {ov,hit,map} ...`` (see ``--help``; bad input -> ``error: ...``, exit 2).
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import numbers
import sys
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
  per_wheel = [_overlap(lambda ws, k=k: ew.map_words(ws, k, level), gt_words, pred_words) for k in WHEELS]
  return {
      "f": _mean([w["f"] for w in per_wheel]),
      "precision": _mean([w["precision"] for w in per_wheel]),
      "recall": _mean([w["recall"] for w in per_wheel]),
      "per_wheel": per_wheel,
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


# ---------------------------------------------------------------------------------------------------------------
# CLI

LABEL_COLUMNS = ("openset", "labels", "emotion")
# pandas' default NA tokens: upstream reads these cells as NaN, i.e. an empty label list.
_NA_TOKENS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


class CliError(Exception):
  """Bad CLI input; the message names the file and the row."""


def _csv_rows(f, path: str):
  """Yields (line, row) of a strict ``csv.reader``; a csv.Error becomes a CliError naming file and line.

  Strict parsing matters: the lenient reader lets an unterminated quote swallow every later line into one
  field, so two GT rows would silently score as one sample.
  """
  reader = csv.reader(f, strict=True)
  while True:
    start = reader.line_num + 1  # the line the next record starts on
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as e:
      if "end of data" in str(e):  # EOF inside a quoted field
        raise CliError(f"{path}, line {start}: malformed CSV: unterminated quote (a quoted field of the record "
                       f"starting on line {start} is never closed; the file ends at line {reader.line_num})") from None
      where = f"line {reader.line_num}" + (f" (record starting on line {start})" if reader.line_num != start else "")
      raise CliError(f"{path}, {where}: malformed CSV: {e}") from None
    yield reader.line_num, row


def read_label_csv(path: str) -> tuple[dict[str, str], dict]:
  """``name`` -> label cell of a ``name,openset`` (or ``labels`` / ``emotion``) CSV, and read statistics.

  Errors (CliError) name the file and line: unreadable or empty file, malformed CSV (strict quoting: an
  unterminated quote or text after a closing quote), no ``name`` column, no or several label columns, a row
  with the wrong field count, an empty or duplicate name. Empty or NaN label cells become ``""`` (the empty
  list, as upstream) and are counted in ``n_empty_labels``.
  """
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows = _csv_rows(f, path)
      _, header = next(rows, (0, None))
      if header is None:
        raise CliError(f"{path}: empty file (expected a header such as name,openset)")
      columns = [c.strip() for c in header]
      if "name" not in columns:
        raise CliError(f"{path}: no 'name' column in header {columns}")
      found = [c for c in LABEL_COLUMNS if c in columns]
      if len(found) != 1:
        what = "no label column" if not found else f"several label columns {found}"
        raise CliError(f"{path}: {what} in header {columns}; expected exactly one of {list(LABEL_COLUMNS)}")
      if len(set(columns)) != len(columns):
        raise CliError(f"{path}: duplicate column names in header {columns}")
      i_name, i_label = columns.index("name"), columns.index(found[0])
      labels: dict[str, str] = {}
      lines: dict[str, int] = {}
      n_empty = 0
      for line, row in rows:
        if not row:
          continue  # a blank line is not a record
        if len(row) != len(columns):
          raise CliError(f"{path}, line {line}: expected {len(columns)} fields ({','.join(columns)}), got {len(row)}")
        name, label = row[i_name].strip(), row[i_label]
        if not name:
          raise CliError(f"{path}, line {line}: empty name")
        if name in labels:
          raise CliError(f"{path}, line {line}: duplicate name {name!r} (first on line {lines[name]})")
        if label.strip() in _NA_TOKENS:
          n_empty, label = n_empty + 1, ""
        labels[name], lines[name] = label, line
  except OSError as e:
    raise CliError(f"{path}: cannot read: {e.strerror or e}") from None
  except UnicodeDecodeError as e:
    raise CliError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not labels:
    raise CliError(f"{path}: no data rows")
  return labels, {"path": path, "column": found[0], "lines": lines, "n_rows": len(labels), "n_empty_labels": n_empty}


def _join(gt_path: str, pred_path: str) -> tuple[list[str], list[str], dict]:
  gt, gt_info = read_label_csv(gt_path)
  pred, pred_info = read_label_csv(pred_path)
  missing = [n for n in gt if n not in pred]
  if missing:
    first = missing[0]
    raise CliError(f"{pred_path}: no prediction for {first!r} ({gt_path}, line {gt_info['lines'][first]}); "
                   f"{len(missing)} of {len(gt)} GT names are missing")
  names = list(gt)  # GT order, as upstream iterates name2gt
  counts = {"n_gt_empty_labels": gt_info["n_empty_labels"],
            "n_pred_empty_labels": sum(pred[n] == "" for n in names),
            "n_pred_unmatched": sum(n not in gt for n in pred)}
  return [gt[n] for n in names], [pred[n] for n in names], counts


def _json_safe(x):
  if isinstance(x, float) and math.isnan(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_json_safe(v) for v in x]
  return x


def _pct(x: float) -> str:
  return "   n/a" if math.isnan(x) else f"{100 * x:6.2f}"


def _print_table(header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  for r in [header, ["-" * w for w in widths], *rows]:
    print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def _cmd_ov(args) -> dict:
  gt, pred, counts = _join(args.gt, args.pred)
  out = ov_score(gt, pred, level=args.level, format_version=args.format_version) | counts
  if not args.json:
    rows = [[f"W{k}", _pct(w["f"]), _pct(w["precision"]), _pct(w["recall"]), w["n_scored"], w["n_skipped"]]
            for k, w in zip(WHEELS, out["per_wheel"])]
    rows.append(["mean", _pct(out["f"]), _pct(out["precision"]), _pct(out["recall"]), "", ""])
    _print_table(["wheel", "F", "P", "R", "scored", "skipped"], rows)
  return out


def _cmd_hit(args) -> dict:
  gt, pred, counts = _join(args.gt, args.pred)
  out = hit_rate(gt, pred, format_version=args.format_version) | counts
  if not args.json:
    rows = [[f"W{k}", _pct(w["hit"]), w["n_scored"], w["n_skipped"]] for k, w in zip(WHEELS, out["per_wheel"])]
    rows.append(["mean", _pct(out["hit"]), "", ""])
    _print_table(["wheel", "HIT", "scored", "skipped"], rows)
  return out


def _cmd_map(args) -> dict:
  words = [w.strip() for w in emotion.split_label_string(args.words)]
  if not words:
    raise CliError(f"--words: no words in {args.words!r}")
  ew = emotion.load(args.format_version)
  out = {w: [ew.map_word(w, k) for k in WHEELS] for w in words}
  if not args.json:
    _print_table(["word", *(f"W{k}" for k in WHEELS)], [[w, *(c or "-" for c in cs)] for w, cs in out.items()])
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m merr1_jax.metrics", description="MER-UniBench emotion metrics.")
  sub = p.add_subparsers(dest="command", required=True)

  def common(sp, pair: bool):
    if pair:
      sp.add_argument("--gt", required=True, help="CSV with name and openset (or labels / emotion)")
      sp.add_argument("--pred", required=True, help="CSV with name and openset; joined to GT by name")
    sp.add_argument("--format-version", choices=emotion.FORMAT_VERSIONS, default="2025")
    sp.add_argument("--json", action="store_true", help="print one JSON object")

  ov = sub.add_parser("ov", help="open-vocabulary EW score (F, P, R over 5 wheels)")
  common(ov, True)
  ov.add_argument("--level", type=int, choices=emotion.LEVELS, default=1)
  ov.set_defaults(fn=_cmd_ov)
  hit = sub.add_parser("hit", help="basic-emotion hit rate over 5 wheels")
  common(hit, True)
  hit.set_defaults(fn=_cmd_hit)
  mp = sub.add_parser("map", help="level-1 cluster of each word in wheels 1-5")
  mp.add_argument("--words", required=True, help='comma list, e.g. "happy,let down"')
  common(mp, False)
  mp.set_defaults(fn=_cmd_map)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)  # argparse itself prints "error: ..." and exits 2 on bad flags
  try:
    out = args.fn(args)
  except (CliError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(_json_safe(out), allow_nan=False))
  return 0


if __name__ == "__main__":
  sys.exit(main())
