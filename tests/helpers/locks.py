"""The lock files in requirements/ (docs/install.md), read for the tests that check them against the ranges."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def lock(python: str) -> dict:
  """{distribution: version} of requirements/lock-py<python>.txt (names lower-case, '_' as '-')."""
  lines = [l.split("#")[0].strip() for l in (ROOT / "requirements" / f"lock-py{python}.txt").read_text().splitlines()]
  return {n.lower().replace("_", "-"): v for n, v in (l.split("==") for l in lines if l)}
