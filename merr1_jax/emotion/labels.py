"""Label-string parsing, exactly as the MER-UniBench / OV-MER evaluation code does it (metrics.md §1, steps 1-2).

Upstream keeps its quirks and so do we, since scores must agree on the same inputs:

* Only one leading ``[`` and one trailing ``]`` are removed, so ``"[happy, sad]."`` yields ``sad].``, which
  later maps to nothing.
* The separators are ``'``, ``"`` and ``,``; spaces inside an item are kept (``"let down"`` is one word).
* A Python list or numpy array is taken as the item list without splitting.
* ``''`` and NaN (also ``None``) are the empty list.
"""

from __future__ import annotations

import math
import re

import numpy as np

_SEPARATORS = re.compile(r"['\",]")


def _is_nan(value) -> bool:
  if value is None:
    return True
  try:
    return isinstance(value, (float, np.floating)) and math.isnan(value)
  except TypeError:
    return False


def split_label_string(text: str) -> list[str]:
  """Step 1 for a string: strip one ``[`` and one ``]``, split on quotes and commas, strip, drop empties."""
  if not text:
    return []
  if text[0] == "[":
    text = text[1:]
  # Upstream indexes text[-1] here and would crash on "["; an empty remainder is simply the empty list.
  if text and text[-1] == "]":
    text = text[:-1]
  return [item.strip() for item in _SEPARATORS.split(text) if item.strip()]


def parse_label_list(value) -> list[str]:
  """A label cell (list string, list, array, '' or NaN) as a list of lowercased, stripped words.

  List and array items are kept one for one (an empty item stays, and maps to nothing later); only
  strings are split. Anything else is a TypeError: a number is not a label.
  """
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    items = value
  elif isinstance(value, str):
    items = split_label_string(value)
  elif _is_nan(value):
    items = []
  else:
    raise TypeError(f"a label must be a list string, a list of words, '' or NaN; got {type(value).__name__} {value!r}")
  out = []
  for item in items:
    if not isinstance(item, str):
      raise TypeError(f"label items must be strings; got {type(item).__name__} {item!r} in {value!r}")
    out.append(item.lower().strip())
  return out
