"""Converts the official MER-UniBench emotion-wheel tables into one vendored JSON.

Run once, offline, whenever the upstream tables change:

    python scripts/convert_emotion_wheel.py --data ../shared/data/emotion_wheel \
        --out merr1_jax/emotion/emotion_wheel.json

Inputs (folder layout of github.com/zeroQiaoba/MERTools@89120b78, MER2025_Track23/emotion_wheel/):

* ``format.csv`` (2025) and ``2026/format.csv``: columns ``name, format``; ``format`` is a comma list of
  surface forms of the raw word ``name``.
* ``synonym.xlsx``: eight runs of column pairs ``word_runK, synonym_runK`` (a wheel word and a comma list of
  its synonyms).
* ``wheel1..5.xlsx``: columns ``level1, level2, level3``; an empty cell repeats the cell above.

The official code reads these with pandas; this script reads them with ``csv`` and ``openpyxl`` and
reproduces the pandas behaviour that matters here: cells equal to one of pandas' default NA tokens are empty,
and an empty ``format`` cell is an empty list. Everything is lowercased and stripped exactly where the
official code does it (format-table entries are only stripped; synonym and wheel words are lowercased too).

Output schema (``schema_version`` 1):

* ``format``: ``{"2025": {name: [surface, ...]}}`` in file order.
* ``format_2026_overrides``: the rows of the 2026 table that differ from 2025 (same names, same order).
* ``synonym``: ``{word: [wheel word, ...]}``, the union over the 8 runs, lists sorted; every wheel word in the
  table also maps to itself.
* ``wheels``: five trees ``{level1: {level2: [level3, ...]}}`` in sheet order (order matters: the official
  level-1 map is built by iterating this tree and later entries overwrite earlier ones).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys

from merr1_jax.emotion.labels import split_label_string

SOURCE = {
    "repository": "https://github.com/zeroQiaoba/MERTools",
    "commit": "89120b780ab18b28349f0e37dcc12b8cc253cb02",
    "folders": {
        "2025": "MER2025/MER2025_Track23/emotion_wheel/",
        "2026": "MER2026/MER2026_Track2/emotion_wheel/ (format.csv only)",
    },
    "license": "Apache-2.0; the authors ask for non-commercial, research use",
}
SCHEMA_VERSION = 1
NUM_RUNS = 8
NUM_WHEELS = 5

# pandas.read_csv / read_excel default NA tokens (pandas 2.x): such a cell reads as NaN upstream.
_PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})


class TableError(ValueError):
  """A source table does not have the expected shape."""


def _cell(value, where: str) -> str | None:
  """An xlsx/csv cell as upstream sees it: None for NaN, otherwise the string."""
  if value is None:
    return None
  if not isinstance(value, str):
    raise TableError(f"{where}: expected text, got {type(value).__name__} {value!r}")
  return None if value in _PANDAS_NA else value


def _split_list(text: str | None) -> list[str]:
  """The upstream list-string parser (metrics.md §1 step 1) without lowercasing: the package's own."""
  return split_label_string(text or "")


def read_format_csv(path: pathlib.Path) -> dict[str, list[str]]:
  with path.open(newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f))
  if not rows or rows[0] != ["name", "format"]:
    raise TableError(f"{path}: header must be name,format, got {rows[:1]}")
  table: dict[str, list[str]] = {}
  for line, row in enumerate(rows[1:], start=2):
    if len(row) != 2:
      raise TableError(f"{path}:{line}: expected 2 fields, got {len(row)}")
    name = _cell(row[0], f"{path}:{line}")
    if name is None:
      raise TableError(f"{path}:{line}: empty name")
    if name in table:
      raise TableError(f"{path}:{line}: duplicate name {name!r}")
    table[name] = _split_list(_cell(row[1], f"{path}:{line}"))
  return table


def _sheet_rows(path: pathlib.Path, header: list[str]) -> list[tuple]:
  import openpyxl  # Only this offline script needs openpyxl; the package never reads xlsx.

  wb = openpyxl.load_workbook(path, read_only=True)
  try:
    rows = list(wb.worksheets[0].iter_rows(values_only=True))
  finally:
    wb.close()
  if not rows or list(rows[0][: len(header)]) != header:
    raise TableError(f"{path}: header must start with {header}, got {rows[:1]}")
  body = [tuple(r[: len(header)]) + (None,) * (len(header) - len(r)) for r in rows[1:]]
  while body and all(c is None for c in body[-1]):  # pandas drops trailing blank rows
    body.pop()
  return body


def read_synonyms(path: pathlib.Path, wheel_words: set[str]) -> dict[str, list[str]]:
  header = [f"{kind}_run{k}" for k in range(1, NUM_RUNS + 1) for kind in ("word", "synonym")]
  merged: dict[str, set[str]] = {}
  for line, row in enumerate(_sheet_rows(path, header), start=2):
    for k in range(NUM_RUNS):
      where = f"{path}:{line}:{header[2 * k]}"
      word = _cell(row[2 * k], where)
      if word is None:
        raise TableError(f"{where}: empty wheel word")
      word = word.strip().lower()
      if word not in wheel_words:
        raise TableError(f"{where}: {word!r} is not a word of any wheel")
      merged.setdefault(word, set()).add(word)
      for syn in _split_list(_cell(row[2 * k + 1], where)):
        merged.setdefault(syn.strip().lower(), set()).add(word)
  return {w: sorted(v) for w, v in merged.items()}


def read_wheel(path: pathlib.Path) -> dict[str, dict[str, list[str]]]:
  tree: dict[str, dict[str, list[str]]] = {}
  current = ["", "", ""]
  for line, row in enumerate(_sheet_rows(path, ["level1", "level2", "level3"]), start=2):
    for i, value in enumerate(row):
      value = _cell(value, f"{path}:{line}:level{i + 1}")
      if value is not None:
        current[i] = value
    l1, l2, l3 = (c.lower().strip() for c in current)
    tree.setdefault(l1, {}).setdefault(l2, []).append(l3)
  return tree


def build(data_dir: pathlib.Path) -> dict:
  data_dir = pathlib.Path(data_dir)
  wheels = [read_wheel(data_dir / f"wheel{k}.xlsx") for k in range(1, NUM_WHEELS + 1)]
  wheel_words = {w for t in wheels for l1, sub in t.items() for w in (l1, *sub, *(x for v in sub.values() for x in v))}
  synonym = read_synonyms(data_dir / "synonym.xlsx", wheel_words)
  fmt_2025 = read_format_csv(data_dir / "format.csv")
  fmt_2026 = read_format_csv(data_dir / "2026" / "format.csv")
  if list(fmt_2025) != list(fmt_2026):
    raise TableError("format.csv and 2026/format.csv list different names; store the 2026 table in full")
  for version, table in (("2025", fmt_2025), ("2026", fmt_2026)):
    missing = sorted(n for n in table if n not in synonym)
    if missing:  # upstream would raise KeyError on these in case 2/3
      raise TableError(f"{version} format.csv names missing from synonym.xlsx: {missing[:10]}")
  return {
      "schema_version": SCHEMA_VERSION,
      "source": SOURCE,
      "format": {"2025": fmt_2025},
      "format_2026_overrides": {n: v for n, v in fmt_2026.items() if fmt_2025[n] != v},
      "synonym": synonym,
      "wheels": wheels,
  }


def dumps(obj: dict) -> str:
  return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


def main(argv=None) -> int:
  root = pathlib.Path(__file__).resolve().parent.parent
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", type=pathlib.Path, default=root.parent / "shared" / "data" / "emotion_wheel")
  p.add_argument("--out", type=pathlib.Path, default=root / "merr1_jax" / "emotion" / "emotion_wheel.json")
  args = p.parse_args(argv)
  try:
    text = dumps(build(args.data))
  except (TableError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  args.out.write_text(text, encoding="utf-8")
  print(f"wrote {args.out} ({len(text)} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
