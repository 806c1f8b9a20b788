"""What a prepared dataset was built from: a fingerprint of its source files (size, mtime, ctime, SHA-256) and the
files that changed since (docs/reliability.md "Prepared data follows its sources")."""

from __future__ import annotations

import hashlib
import os
import time

# A source file whose mtime or ctime is this close to (or after) the moment its fingerprint was taken is hashed
# again on every check: file times are coarse (a clock tick), so a rewrite within it can keep the same times.
RACY_NS = 2_000_000_000


def sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()  # reads in chunks: record files may be large


def entry(st: os.stat_result, sha256: str) -> dict:
  return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "sha256": sha256}


def new_fingerprint(kind: str) -> dict:
  """An empty fingerprint, timed now (before any source file is read), to be filled with `entry`s."""
  return {"kind": kind, "taken_ns": time.time_ns(), "files": {}}


def changes(fp: dict, files: dict[str, str]) -> dict[str, list[str]]:
  """The source files (relative name -> path) that differ from the fingerprint: changed, added, removed."""
  old = fp.get("files") or {}
  out = {"changed": [], "added": sorted(set(files) - set(old)), "removed": sorted(set(old) - set(files))}
  for rel in sorted(set(files) & set(old)):
    st, was = os.stat(files[rel]), old[rel]
    if st.st_size != was["size"]:
      out["changed"].append(rel)
      continue
    same_times = (st.st_mtime_ns, st.st_ctime_ns) == (was["mtime_ns"], was["ctime_ns"])
    if same_times and max(st.st_mtime_ns, st.st_ctime_ns) < fp["taken_ns"] - RACY_NS:
      continue  # untouched since well before the fingerprint: not read again
    if sha256(files[rel]) != was["sha256"]:
      out["changed"].append(rel)
  return out


def describe(changes: dict[str, list[str]], shown: int = 5) -> str:
  parts = []
  for what, names in changes.items():
    if names:
      more = f", +{len(names) - shown} more" if len(names) > shown else ""
      parts.append(f"{len(names)} {what} ({', '.join(names[:shown])}{more})")
  return "; ".join(parts)
