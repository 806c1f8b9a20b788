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
  """({tensor name: {'dtype', 'shape', 'data_offsets'}}, data start byte). Raises ValueError naming the file.

  Every entry is checked against the file before any data is read: a known dtype, a shape of non-negative
  ints, data_offsets [lo, hi] whose length is shape x itemsize, inside the data buffer (a truncated shard
  fails here, naming the first tensor past the end of the file, not later as a short memmap view).
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or n > size - 8:
      raise ValueError(f"{path}: not a safetensors file (header length {n} is implausible)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
  if not isinstance(header, dict):
    raise ValueError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
  header.pop("__metadata__", None)
  data_bytes = size - 8 - n
  for name, info in header.items():
    if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype "
                       f"{info.get('dtype') if isinstance(info, dict) else info!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
      raise ValueError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
      raise ValueError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[info["dtype"]]).itemsize
    if offsets[1] - offsets[0] != want:
      raise ValueError(f"{path}: tensor {name!r} byte range {offsets[1] - offsets[0]} != shape {shape} x "
                       f"{info['dtype']} ({want} bytes)")
    if offsets[1] > data_bytes:
      raise ValueError(f"{path}: tensor {name!r} ends at data byte {offsets[1]} but the file holds only "
                       f"{data_bytes} data bytes (truncated or corrupt shard)")
  return header, 8 + n


def open_tensors(path: str) -> tuple[dict[str, dict[str, Any]], Callable[[str], np.ndarray]]:
  """The header and a function name -> read-only memmap view (no data is read until used)."""
  header, start = read_header(path)
  buf = np.memmap(path, dtype=np.uint8, mode="r")

  def get(name: str) -> np.ndarray:
    info = header[name]
    lo, hi = info["data_offsets"]  # checked against shape and file size by read_header
    dtype = np.dtype(DTYPES[info["dtype"]])
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
