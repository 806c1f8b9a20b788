"""The command line of the metrics, ``python -m merr1_jax.metrics {ov,hit,map} ...``, and its CSV readers.

    python -m merr1_jax.metrics ov  --gt GT.csv --pred PRED.csv [--level 1|2] [--format-version 2025|2026] [--json]
    python -m merr1_jax.metrics hit --gt GT.csv --pred PRED.csv [--format-version ...] [--json]
    python -m merr1_jax.metrics map --words "happy,let down" [--format-version ...] [--json]

The scores themselves live in `merr1_jax.task.metrics` (`ov_score`, `hit_rate`); this module turns two
``name,openset`` CSVs (the form upstream and `reports.write_reports` write) into aligned GT / prediction lists,
joined by name in GT order, and prints a per-wheel table or one JSON object (NaN -> null).

Input is read strictly, because a lenient reader scores a broken file instead of refusing it: strict CSV
quoting, exactly one label column, no duplicate or empty names, and every GT name predicted. Any problem is a
`CliError` naming the file and line; `main` prints it as ``error: ...`` and returns 2 (argparse does the same,
exit 2, for bad flags); success returns 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from typing import Sequence

from merr1_jax import emotion
from merr1_jax.task.metrics import WHEELS, hit_rate, ov_score

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
