"""Evaluation reports: JSON, markdown, JSONL, CSV and PNG files from `evaluation.DatasetResult`s.

`write_reports(results, out_dir, meta=..., mme=..., baseline=...)` writes report.json (every number),
report.md (the MER-UniBench-style table, per-mode statistics, fast vs slow), samples.jsonl, the field's
labels/predictions CSVs and the plots (evaluation/plots.py) into `out_dir`, atomically and only over an earlier
report of ours (`MARKER`, `check_report_dir`); docs/evaluation.md lists the files. With a `baseline` report,
`gap_change` states per dataset whether the slow-minus-fast gap closed. Scores are fractions in report.json and
points (x 100) in report.md; a gap is slow minus fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from merr1_jax import emotion
from merr1_jax.evaluation import core as evaluation
from merr1_jax.evaluation import mme as mmelib
from merr1_jax.evaluation import plots as report_plots


def json_safe(x: Any) -> Any:
  """NaN/inf -> None, numpy scalars -> Python, tuples -> lists: strict JSON (allow_nan=False) holds."""
  if isinstance(x, Mapping):
    return {str(k): json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def headline(result: evaluation.DatasetResult, mode: str) -> float | None:
  v = result.summary[mode].get(evaluation.HEADLINE[result.metric])
  return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def benchmark_means(results: Mapping[str, evaluation.DatasetResult]) -> dict[str, float | None]:
  """Per mode: the plain mean of the headline scores over the datasets that ran that mode (metrics.md §5)."""
  modes = dict.fromkeys(m for r in results.values() for m in r.summary)
  out = {}
  for mode in modes:
    vals = [headline(r, mode) for r in results.values() if mode in r.summary]
    out[mode] = None if not vals or any(v is None for v in vals) else float(np.mean(vals))
  return out


def mode_gap(summary: Mapping[str, Mapping], key: str) -> float | None:
  """Slow minus fast of one summary number (the headline: OV F, HIT, WAF); None unless both modes have it."""
  vals = [summary.get(m, {}).get(key) for m in ("slow", "fast")]
  if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
    return None
  return float(vals[0]) - float(vals[1])


def gap_verdict(before: float, after: float) -> str:
  """Whether the slow-minus-fast gap closed between two evaluations (e.g. SFT -> RL).

  'closed': slow was behind (gap < 0) and is not any more (gap >= 0); 'narrowed, not closed': still behind, by
  less; 'not closed': behind by as much or more. Slow not behind in the first place: 'no gap to close' if it is
  still not behind, 'opened' if it fell behind.
  """
  if before >= 0:
    return "no gap to close" if after >= 0 else "opened"
  if after >= 0:
    return "closed"
  return "narrowed, not closed" if after > before else "not closed"


def gap_change(results: Mapping[str, evaluation.DatasetResult], baseline: Mapping[str, Any]) -> dict:
  """Per dataset of `results`: the slow-minus-fast headline gap in `baseline` (evaluate.read_baseline) and now,
  the verdict (`gap_verdict`) and a one-line statement; a dataset that cannot be compared gets a `reason`."""
  out = {}
  for name, r in results.items():
    key = evaluation.HEADLINE[r.metric]
    now = mode_gap(r.summary, key)
    base = baseline["datasets"].get(name)
    before = None if base is None else mode_gap(base["summary"], key)
    entry: dict[str, Any] = {"metric": r.metric, "key": key, "baseline_source": baseline["source"],
                             "before": before, "after": now}
    if base is None:
      entry["reason"] = f"{name} is not in the baseline (it has {sorted(baseline['datasets'])})"
    elif base.get("metric") not in (None, r.metric):
      entry["reason"] = f"the baseline scored {name} with {base['metric']!r}, this run with {r.metric!r}"
    elif before is None or now is None:
      entry["reason"] = f"both modes' {key!r} are needed in the baseline and in this run"
    else:
      entry["verdict"] = gap_verdict(before, now)
      entry["statement"] = (f"{name}: slow-fast {r.metric.upper()} {key} gap {100 * before:+.2f} -> "
                            f"{100 * now:+.2f} points ({entry['verdict']})")
    out[name] = entry
  return out


def gap_lines(results: Mapping[str, evaluation.DatasetResult], baseline: Mapping[str, Any]) -> list[str]:
  """The statements of `gap_change` (or why a dataset could not be compared), one line per dataset."""
  return [g.get("statement") or f"{name}: no gap comparison ({g['reason']})"
          for name, g in gap_change(results, baseline).items()]


# -------------------------------------------------------------------------------------------- writers


def _report_json(results, meta: dict, baseline: Mapping[str, Any] | None, csvs: dict) -> dict:
  datasets = {name: {"metric": r.metric, "headline": evaluation.HEADLINE[r.metric], "n_examples": r.n_examples,
                     "skipped": r.skipped, "settings": r.settings, "summary": r.summary, "analysis": r.analysis,
                     **({"csv": csvs[name]} if name in csvs else {})}
              for name, r in results.items()}
  out = {"meta": meta, "datasets": datasets, "mean": benchmark_means(results)}
  if baseline is not None:
    out["gap_change"] = gap_change(results, baseline)
  return json_safe(out)


CSV_METRICS = ("ov", "hit")  # metrics whose ground truth is a word list (`python -m merr1_jax.metrics ov|hit`)


def _label_cell(words) -> str:
  return "[" + ", ".join(words) + "]"


def _round_trips(words) -> bool:
  """Whether upstream's list-string parser (emotion.split_label_string) gives these words back."""
  return [w.lower() for w in emotion.split_label_string(_label_cell(words))] == [w.strip().lower() for w in words]


def prediction_csvs(result: evaluation.DatasetResult) -> tuple[dict[str, str], dict]:
  """({file name: CSV text}, info) in the field's `name,openset` format for an OV or HIT dataset: the ground
  truth (labels_<dataset>.csv) and one predictions file per mode and sample index. info names the files and
  counts the cells whose words do not survive the format (a word holding a quote, bracket or comma, which
  upstream's parser splits: those rows would score differently there); `skipped` says why no file was written."""
  if result.metric not in CSV_METRICS:
    return {}, {"skipped": f"metric {result.metric!r}: its ground truth is not a word list"}
  stem = _safe_name(result.dataset)
  by_key: dict[tuple[str, int], list[dict]] = {}
  for s in result.samples:
    by_key.setdefault((s["mode"], int(s["sample"])), []).append(s)
  if not by_key:
    return {}, {"skipped": "no samples"}
  first = next(iter(by_key.values()))
  ids = [s["id"] for s in first]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    return {}, {"skipped": f"duplicate id {dup!r}: the name,openset format needs unique names"}
  multi = any(k[1] > 0 for k in by_key)
  texts, bad = {}, 0

  def table(rows) -> str:
    nonlocal bad
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "openset"])
    for name, words in rows:
      words = [str(x) for x in words]
      bad += not _round_trips(words)
      w.writerow([name, _label_cell(words)])
    return buf.getvalue()

  labels = f"labels_{stem}.csv"
  texts[labels] = table((s["id"], s["gt"]) for s in first)
  preds: dict[str, list[str]] = {}
  for (mode, k), rows in by_key.items():
    name = f"predictions_{stem}_{mode}" + (f"_sample{k}" if multi else "") + ".csv"
    texts[name] = table((s["id"], s["words"]) for s in rows)
    preds.setdefault(mode, []).append(name)
  return texts, {"labels": labels, "predictions": preds, "n_cells_not_representable": bad}


def _pct(v) -> str:
  return "n/a" if v is None else f"{100 * v:.2f}"


def _num(v, fmt="{:.2f}") -> str:
  return "n/a" if v is None else fmt.format(v)


def _report_md(results, meta: dict, baseline: Mapping[str, Any] | None = None) -> str:
  names = list(results)
  modes = list(dict.fromkeys(m for r in results.values() for m in r.summary))
  means = benchmark_means(results)
  lines = ["# Evaluation report", ""]
  for key in ("checkpoint", "extractor", "sentiment_mapper", "decoding"):
    if key in meta:
      lines.append(f"- **{key.replace('_', ' ')}**: {meta[key]}")
  skips = skipped_lines({n: r.skipped for n, r in results.items()})
  if skips:
    lines.append("- **skipped as bad records**: " + "; ".join(skips))
  lines += ["", "Scores in % (OV: EW F level 1; HIT: hit rate; WAF: weighted F1). Mean: plain mean over the "
            "columns (MER-UniBench).", ""]
  lines.append("| mode | " + " | ".join(f"{n} ({results[n].metric.upper()})" for n in names) + " | Mean |")
  lines.append("|---" * (len(names) + 2) + "|")
  for mode in modes:
    cells = [_pct(headline(results[n], mode)) if mode in results[n].summary else "-" for n in names]
    lines.append(f"| {mode} | " + " | ".join(cells) + f" | {_pct(means.get(mode))} |")
  lines += ["", "## Per-mode statistics", "",
            "| dataset | mode | samples | format fail % | truncated % | mean #emotions | answer tok mean/med/p90 "
            "| think tok mean/med/p90 | confidence | ECE |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  for n in names:
    for mode, s in results[n].summary.items():
      dist = lambda d: "/".join(_num(d[k], "{:.1f}") for k in ("mean", "median", "p90"))
      lines.append(f"| {n} | {mode} | {s['n_samples']} | {_pct(s['format_failure_rate'])} | "
                   f"{_pct(s['truncated_rate'])} | {_num(s['mean_num_emotions'])} | {dist(s['answer_tokens'])} | "
                   f"{dist(s['think_tokens'])} | {_num(s['confidence_mean'], '{:.3f}')} | "
                   f"{_num(s['ece'], '{:.3f}')} |")
  gaps = [(n, results[n].analysis["fast_vs_slow"]) for n in names if "fast_vs_slow" in results[n].analysis]
  if gaps:
    lines += ["", "## Fast vs slow (slow minus fast, points)", "",
              "Precision and recall: per-sample differences paired per example, with a normal 95% interval and "
              "the paired effect size d_z. Headline gap: slow minus fast of the dataset score.", "",
              "| dataset | precision diff [95% CI] | d_z | recall diff [95% CI] | d_z | n | headline gap |",
              "|---|---|---|---|---|---|---|"]
    for n, g in gaps:
      cell = lambda d: ("n/a" if d["slow_minus_fast"] is None else
                        f"{100 * d['slow_minus_fast']:+.2f}" + ("" if d["ci95"] is None else
                        f" [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"))
      key = evaluation.HEADLINE[results[n].metric]
      head = mode_gap(results[n].summary, key)
      lines.append(f"| {n} | {cell(g['precision'])} | {_num(g['precision']['effect_size_dz'])} | "
                   f"{cell(g['recall'])} | {_num(g['recall']['effect_size_dz'])} | {g['precision']['n']} | "
                   f"{key} {'n/a' if head is None else f'{100 * head:+.2f}'} |")
  if baseline is not None:
    lines += ["", f"## Did the slow mode close the gap? (baseline: {baseline['source']})", ""]
    lines += [f"- {line}" for line in gap_lines(results, baseline)]
  return "\n".join(lines) + "\n"


def skipped_lines(skipped: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
  """'dataset split: N (ids ...)' for every split of {dataset: {split: {'count', 'ids'}}} that skipped records."""
  out = []
  for name, splits in skipped.items():
    for split, s in (splits or {}).items():
      if s.get("count"):
        ids = "ids not recorded" if s.get("ids") is None else "ids " + ", ".join(map(str, s["ids"]))
        out.append(f"{name} {split}: {s['count']} ({ids})")
  return out


def _safe_name(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


MARKER = ".merr1_report"  # in every report folder: what marks it as one that a later report may replace


class ReportDirError(ValueError):
  """An `out_dir` that write_reports must not replace: `path` (as given) and `reason`."""

  def __init__(self, path, reason: str):
    self.path, self.reason = str(path), reason
    super().__init__(f"report folder {path}: {reason}")


def _inside(path: pathlib.Path, root: pathlib.Path) -> bool:
  return path == root or root in path.parents


def check_report_dir(out_dir: str | os.PathLike, *, workdir: str | os.PathLike | None = None) -> pathlib.Path:
  """The report folder `out_dir` with symlinks and `.`/`..` resolved, or ReportDirError (a ValueError) saying why
  writing a report there would lose something: it is the workdir, contains it, or lies inside (or contains) the
  workdir's checkpoints; it exists and is not a folder; it is a non-empty folder without `MARKER` (not a report
  of ours). An absent or empty folder, or an earlier report of ours, may be replaced."""
  out = pathlib.Path(out_dir).expanduser().resolve()

  def refuse(reason: str):
    raise ReportDirError(out_dir, reason)

  if workdir is not None:
    w = pathlib.Path(workdir).expanduser().resolve()
    ckpts = (w / "checkpoints").resolve()  # it may be a symlink to another disk
    whole = "a report folder is replaced whole, so give the report one of its own"
    if out == w:
      refuse(f"is the workdir {w}; {whole} (default {w / 'eval'})")
    if _inside(w, out):
      refuse(f"contains the workdir {w} (resolved: {out}); {whole}")
    if _inside(out, ckpts):
      refuse(f"is inside the workdir's checkpoints {ckpts}")
    if _inside(ckpts, out):
      refuse(f"contains the workdir's checkpoints {ckpts} (resolved: {out}); {whole}")
  if out.exists() and not out.is_dir():
    refuse(f"exists and is not a folder (resolved: {out})")
  if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
    refuse(f"is a non-empty folder that is not a report of merr1_jax.evaluate (no {MARKER} in {out}); a report "
           "folder is replaced whole, so name a new or empty folder, or move this one away yourself (a report "
           f"written before the marker existed: create {out / MARKER} to let it be replaced)")
  return out


def write_reports(results: Mapping[str, evaluation.DatasetResult], out_dir: str | os.PathLike, *,
                  meta: Mapping[str, Any], baseline: Mapping[str, Any] | None = None,
                  mme: Mapping[str, Any] | None = None,
                  workdir: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
  """Writes every report file atomically into `out_dir` (see the module docstring); returns name -> final path.
  `out_dir` must pass `check_report_dir` (with `workdir`, the run it must not touch), else ReportDirError before
  anything is written.

  `meta` is stored in report.json; the extractor, sentiment mapper and decoding of the first result are added
  when absent, so a report always says how its words were obtained. `baseline` ({'source', 'datasets': {name:
  {'metric', 'summary'}}}, evaluate.read_baseline) adds the gap comparison; `mme` (mme.run_mme's result) the
  MME-Emotion files and section.
  """
  if not results:
    raise ValueError("write_reports needs at least one DatasetResult")
  first = next(iter(results.values())).settings
  meta = {"extractor": first.get("extractor"), "sentiment_mapper": first.get("sentiment_mapper"),
          "decoding": first.get("decoding"), "settings": first} | dict(meta)
  out = check_report_dir(out_dir, workdir=workdir)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    files = {}

    def put(name: str, text: str) -> None:
      (tmp / name).write_text(text, encoding="utf-8")
      files[name] = out / name

    put(MARKER, json.dumps({"written_by": "merr1_jax.evaluation.reports.write_reports"}) + "\n")
    csvs = {}
    for name, r in results.items():
      texts, info = prediction_csvs(r)
      csvs[name] = info
      for file, text in texts.items():
        put(file, text)
    report = _report_json(results, meta, baseline, csvs)
    md = _report_md(results, meta, baseline)
    if mme is not None:
      report["mme"] = json_safe(mmelib.summary(mme))
      md += "\n" + mmelib.markdown(mme)
      put("mme.json", json.dumps(report["mme"], indent=1, allow_nan=False) + "\n")
      put("mme_judge.jsonl", mmelib.judge_jsonl(mme["items"]))
    put("report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    put("report.md", md)
    put("samples.jsonl", "".join(json.dumps(json_safe(s), allow_nan=False, ensure_ascii=False) + "\n"
                                 for r in results.values() for s in r.samples))
    for name, r in results.items():
      png = f"pr_{_safe_name(name)}.png"
      report_plots.pr_plot(r, tmp / png)
      files[png] = out / png
    report_plots.sizes_plot(results, tmp / "set_sizes.png")
    files["set_sizes.png"] = out / "set_sizes.png"
    for mode in dict.fromkeys(m for r in results.values() for m in r.summary):
      png = f"calibration_{mode}.png"
      report_plots.calibration_plot(results, mode, tmp / png)
      files[png] = out / png
    check_report_dir(out, workdir=workdir)  # again: something may have been put there while we evaluated
    _swap(tmp, out)
  except BaseException:  # Ctrl-C included: never leave the temp directory behind
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return files


def _swap(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Replaces `out` (absent, empty, or a report of ours: check_report_dir) by `tmp`: a directory rename cannot
  overwrite a non-empty directory, so the old one is moved aside first; at every instant `out` is either the
  complete old report, absent, or the complete new one."""
  if out.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "report")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out)
