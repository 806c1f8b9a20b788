"""Minimal safetensors reading (memory-mapped, header first) and streaming writing, numpy only.

Why not the `safetensors` package's loaders: its numpy backend has no bfloat16, and the flax backend
materialises whole files on the default device. Here a header can be read without touching data (so
missing/unexpected keys are reported before anything loads), and each tensor is a zero-copy memmap view
that the importer transforms and places on its target sharding one tensor at a time. The writer computes
the header from shapes first and then streams tensors, so export holds one tensor in host memory.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}} (plus an
optional "__metadata__"), then the data buffer.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES: dict[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> tuple[dict[str, dict[str, Any]], int]:
  """({tensor name: {'dtype', 'shape', 'data_offsets'}}, data start byte). Raises ValueError naming the file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or n > os.path.getsize(path) - 8:
      raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  header.pop("__metadata__", None)
  for name, info in header.items():
    if info.get("dtype") not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
  return header, 8 + n


def open_tensors(path: str) -> tuple[dict[str, dict[str, Any]], Callable[[str], np.ndarray]]:
  """The header and a function name -> read-only memmap view (no data is read until used)."""
  header, start = read_header(path)
  buf = np.memmap(path, dtype=np.uint8, mode="r")

  def get(name: str) -> np.ndarray:
    info = header[name]
    lo, hi = info["data_offsets"]
    dtype = np.dtype(DTYPES[info["dtype"]])
    count = int(np.prod(info["shape"], dtype=np.int64))
    if hi - lo != count * dtype.itemsize:
      raise ValueError(f"{path}: tensor {name!r} byte range {hi - lo} != shape {info['shape']} x {dtype}")
    return buf[start + lo:start + hi].view(dtype).reshape(info["shape"])

  return header, get


def write(path: str, tensors: Iterable[tuple[str, tuple[int, ...], Any, Callable[[], np.ndarray]]],
          metadata: dict[str, str] | None = None) -> None:
  """Streams tensors given as (name, shape, numpy dtype, thunk producing the array) into one file."""
  tensors = list(tensors)
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "np"}}
  offset = 0
  for name, shape, dtype, _ in tensors:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data buffer starts 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype, thunk in tensors:
      arr = np.ascontiguousarray(thunk(), dtype=dtype)
      if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} produced shape {arr.shape}, planned {shape}")
      f.write(arr.tobytes())
  os.replace(tmp, path)
