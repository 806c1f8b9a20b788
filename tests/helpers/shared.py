"""A directory that the whole test session builds once, whichever xdist worker asks for it first.

A module-scoped fixture runs once per worker, so with `pytest -n 2` a fixture that trains a smoke run ran twice,
both copies competing for the same two cores. (pytest-xdist's `--dist loadgroup` would keep such tests on one
worker, but it does not group under pytest 9.2: it renames `item._nodeid`, which pytest 9 no longer reads.)
Here the first worker builds the directory under a file lock and marks it done; any other worker waits on the
lock, then reads what was built. A build that fails leaves no mark, so the next caller builds (and fails) again
and every test that needs it reports the error.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from typing import Callable

import filelock

DONE = ".built"


def session_root(tmp_path_factory) -> pathlib.Path:
  """The directory every worker of this session shares (the parent of the per-worker basetemps under xdist)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """`root/name`, built by `build(path)` in this session unless another worker already has; callers only read it."""
  root = session_root(tmp_path_factory)
  path = root / name
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not (path / DONE).exists():
      if path.exists():
        shutil.rmtree(path)  # a failed earlier build
      path.mkdir()
      build(path)
      (path / DONE).touch()
  return path
