"""Run artifacts, the files a run leaves behind, written so that a reader or a crash sees the old version or the
new one, never half of one: small text files (config.json, eval and results JSON / markdown, a trimmed
metrics.jsonl) and the final policy exported as a Hugging Face checkpoint directory.

Both write next to the final name and rename into place at the end (a rename within one directory is atomic on
POSIX file systems): a text file through a temp file in the same directory, flushed to disk first; an export
through ``<out_dir>.export-tmp``, swapped with the old directory only once every tensor file is written.
Training checkpoints are orbax's business (checkpoint.py), which finalises its step directories the same way.

API:
  write_text_atomic(path, text)
  read_json(path) -> the decoded value; ValueError naming the file (and line, column) when it is not JSON
  export_hf(params, model_config, out_dir, *, overwrite=False, **save_hf_kwargs) -> list[str] (file names)

Multi-host: export_hf is a collective (arrays sharded over hosts are gathered, then every process waits at a
barrier for the write); only process 0 writes. write_text_atomic is called by the process that owns the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import jax


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to a temp file in `path`'s directory, flushes it to disk and renames it over `path`: a
  reader (or a crash) sees the old file or the new one, never half of one."""
  path = os.fspath(path)
  # Named by the process (not mkstemp, whose files are private to the owner): the file gets the usual mode.
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path`. A file that is not UTF-8 JSON raises ValueError naming it (json's own error
  names no file); a missing one raises FileNotFoundError, which does."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{os.fspath(path)}: not UTF-8 text ({e})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(path)}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def export_hf(params: Any, model_config: Any, out_dir: str | os.PathLike, *, overwrite: bool = False,
              **kw: Any) -> list[str]:
  """Writes the policy as a HF checkpoint (``models.hf_io.save_hf``; kw: dtype, layout, hf_config,
  max_shard_bytes, copy_from; ``hf_io.export_kwargs(config.model.hf_path)`` gives layout and copy_from for a
  run that started from an Omni checkpoint, so that the export carries its towers). A LoRA policy is written
  with its adapters merged. Every process calls it: arrays sharded over hosts are gathered, process 0 writes
  into a tmp directory renamed to `out_dir` at the end (a crash never leaves a half export under the final name).
  Returns the file names (empty on other processes)."""
  from merr1_jax.models import hf_io
  return _export(params, out_dir, overwrite, lambda p, tmp: hf_io.save_hf(p, model_config, tmp, **kw))


def export_peft(params: Any, model_config: Any, out_dir: str | os.PathLike, *, overwrite: bool = False,
                base_model_name_or_path: str = "") -> list[str]:
  """Writes a LoRA policy's adapters as a PEFT adapter directory (``models.hf_io.save_peft``), the same way
  ``export_hf`` writes a checkpoint (gathered, tmp directory renamed at the end)."""
  from merr1_jax.models import hf_io
  return _export(params, out_dir, overwrite, lambda p, tmp: hf_io.save_peft(
      p, model_config, tmp, base_model_name_or_path=base_model_name_or_path))


def _export(params: Any, out_dir: str | os.PathLike, overwrite: bool, write) -> list[str]:
  out_dir = os.path.abspath(os.fspath(out_dir))
  multi = jax.process_count() > 1
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(params)):
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  files: list[str] = []
  if jax.process_index() == 0:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
      raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
    tmp = out_dir + ".export-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    files = write(params, tmp)
    if os.path.exists(out_dir):
      old = out_dir + ".export-old"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(out_dir, old)
      os.replace(tmp, out_dir)
      shutil.rmtree(old)
    else:
      os.replace(tmp, out_dir)
  if multi:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"export {out_dir}")
  return files
