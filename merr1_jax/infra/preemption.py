"""Preemption: SIGTERM (the grace-period notice of Cloud TPU/GPU preemption) becomes a flag that the training
loop reads at step boundaries, so a preempted run saves a checkpoint and exits 0 instead of dying mid-step.

A signal handler may run between any two bytecodes, so it only sets the flag; the loop decides when to act,
at a point where the state is whole and every process agrees on the step. On several hosts one process may be
signalled before the others: ``any_process_requested`` ORs the flag over processes, and because it is a
collective, every process calls it at the same step (docs/reliability.md, "Preemption").

API:
  PreemptionGuard(signals=(SIGTERM,), *, sigint=False): context manager (main thread only);
    .requested (bool), .signal (the last signal received, or None), .any_process_requested() -> bool
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np


class PreemptionGuard:
  """Turns SIGTERM (and SIGINT with sigint=True) into a flag checked at step boundaries, so the trainer can save
  and exit 0 instead of dying mid-step. A second SIGINT raises KeyboardInterrupt (a way out when a save
  hangs). Installs its handlers on enter (main thread only) and puts the previous ones back on exit."""

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *, sigint: bool = False):
    self.signals = tuple(dict.fromkeys(tuple(signals) + ((signal.SIGINT,) if sigint else ())))
    self.requested = False
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested, self.signal = True, signum

  def __enter__(self) -> "PreemptionGuard":
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)  # ValueError off the main thread: loud, on purpose
    return self

  def __exit__(self, *exc) -> None:
    for s, prev in self._previous.items():
      signal.signal(s, prev)
    self._previous.clear()

  def any_process_requested(self) -> bool:
    """`requested` OR-ed over all processes (one may be signalled before the others). A collective: all
    processes must call it at the same step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([self.requested], np.int32))
    return bool(np.asarray(flags).any())
