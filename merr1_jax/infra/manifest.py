"""The checksum manifest of a checkpoint step: the size and SHA-256 of each of its files, written into the
orbax tmp directory just before the atomic rename, so every committed step carries one (docs/reliability.md).

Not covered: the manifest itself and the two files orbax writes after it (the step's _CHECKPOINT_METADATA,
updated with the commit time, and the top-level commit_success.txt).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
from typing import Any

from orbax.checkpoint.path import atomicity  # public: orbax.checkpoint.path re-exports it

from merr1_jax.infra import artifacts

MANIFEST = "merr1_manifest.json"
MANIFEST_FORMAT = 1
# Written by orbax's finalize after the manifest (the step metadata gets the commit time; then the commit marker).
_UNCOVERED = frozenset({MANIFEST, atomicity.COMMIT_SUCCESS_FILE, "_CHECKPOINT_METADATA"})
_CHUNK = 1 << 22
_PARALLEL_BYTES = 64 << 20  # below this, threads cost more than they save


def _digest(path: str) -> tuple[int, str]:
  h, n = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
      n += len(chunk)
  return n, h.hexdigest()


def _digests(step_dir: str, rels: list[str]) -> dict[str, tuple[int, str]]:
  """{relative path: (size, sha256)}; a large step's files are hashed in parallel (hashlib releases the GIL)."""
  digest = lambda r: _digest(os.path.join(step_dir, r))  # noqa: E731
  if len(rels) < 2 or sum(os.path.getsize(os.path.join(step_dir, r)) for r in rels) < _PARALLEL_BYTES:
    return {r: digest(r) for r in rels}
  with concurrent.futures.ThreadPoolExecutor(min(8, len(rels))) as pool:
    return dict(zip(rels, pool.map(digest, rels)))


def _covered_files(step_dir: str) -> list[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
      if rel not in _UNCOVERED:
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str | os.PathLike) -> dict[str, Any]:
  """Writes `step_dir`/merr1_manifest.json (every covered file's size and SHA-256); returns it. Written plainly,
  not renamed into place: the step's own rename commits it, and a manifest that a power cut leaves short makes
  the step read as damaged, which is what it then is (orbax does not flush the data files either)."""
  step_dir = os.fspath(step_dir)
  files = _digests(step_dir, _covered_files(step_dir))
  manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256",
              "files": {rel: {"size": n, "sha256": h} for rel, (n, h) in files.items()}}
  with open(os.path.join(step_dir, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=0, sort_keys=True)
  return manifest


def manifest_problems(step_dir: str | os.PathLike) -> list[str] | None:
  """What is wrong with `step_dir`'s files against its manifest ([] when nothing), or None when it has no
  manifest. A problem names the file (or the whole missing folder) and what differs."""
  step_dir = os.fspath(step_dir)
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(path):
    return None
  try:
    manifest = artifacts.read_json(path)
    files = manifest["files"]
    want = {rel: (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    return [f"{MANIFEST}: unreadable ({e})"]
  problems, missing_dirs, present = [], set(), []
  for rel in sorted(want):
    if os.path.isfile(os.path.join(step_dir, rel)):
      present.append(rel)
      continue
    top = rel.split("/")[0]
    if "/" in rel and not os.path.isdir(os.path.join(step_dir, top)):
      if top not in missing_dirs:
        missing_dirs.add(top)
        problems.append(f"{top}/: missing ({sum(r.startswith(top + '/') for r in want)} files)")
    else:
      problems.append(f"{rel}: missing")
  sizes = {rel: os.path.getsize(os.path.join(step_dir, rel)) for rel in present}
  for rel in present:
    if sizes[rel] != want[rel][0]:
      how = "truncated" if sizes[rel] < want[rel][0] else "grown"
      problems.append(f"{rel}: {sizes[rel]} bytes, the manifest says {want[rel][0]} ({how})")
  same_size = [rel for rel in present if sizes[rel] == want[rel][0]]
  for rel, (_, sha) in _digests(step_dir, same_size).items():
    if sha != want[rel][1]:
      problems.append(f"{rel}: SHA-256 differs from the manifest (contents changed)")
  return problems


class ManifestTemporaryPath(atomicity.AtomicRenameTemporaryPath):
  """orbax's atomic-rename step directory, with the manifest written into the tmp directory just before the
  rename: every process has written its files by then (orbax waits at a barrier), and finalize runs on the
  primary process only. orbax gives each item's directory (state/, meta/, data/) the same class: those are
  inside a step's tmp directory and get no manifest of their own (the step's covers them)."""

  async def finalize(self, *args, **kwargs):
    if atomicity.TMP_DIR_SUFFIX not in self.get_final().parent.name:
      await asyncio.to_thread(write_manifest, os.fspath(self.get()))
    return await super().finalize(*args, **kwargs)
