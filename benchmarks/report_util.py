"""Small helpers the benchmark scripts share: the machine's description and replacing a docs section.

Every benchmark states the machine and the command next to its figures (docs/benchmarks.md), so they all
describe the CPU the same way and write their section of the docs the same way.
"""

from __future__ import annotations

import os
import pathlib
import platform
import re


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo), else what platform reports."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def machine() -> str:
  """'N CPU cores (model), Python x.y.z, OS': the line a benchmark's doc section carries."""
  return f"{os.cpu_count()} CPU cores ({cpu_name()}), Python {platform.python_version()}, {platform.system()}"


def write_section(path: str | os.PathLike, heading: str, body: str) -> None:
  """Replaces the `heading` section of a markdown file (up to the next '## ') with `body`, or appends it.
  `body` starts with the heading line itself."""
  path = pathlib.Path(path)
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: body.rstrip("\n") + "\n\n", text, count=1)
  else:
    text = text.rstrip("\n") + "\n\n" + body
  path.write_text(text.rstrip("\n") + "\n")
