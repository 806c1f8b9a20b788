"""Training observability: scalars to JSONL and TensorBoard, a progress bar with ETA, and PNG curves.

The JSONL file (``WORKDIR/metrics.jsonl``) holds one object per logged step: ``{"stage", "step", ...scalars}``.
Keys under ``time/`` are wall-clock measurements; everything else is a deterministic function of the run, which
the resume test relies on. On resume, lines past the restored step are dropped so a resumed run rewrites them,
and so is a torn last line (a crash in the middle of an append), with a warning; any other line that is not a
JSON object with a stage and a step is an error naming the file and line. Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from collections.abc import Mapping

import jax
import numpy as np

from merr1_jax.infra import artifacts

_log = logging.getLogger(__name__)


def _scalar(v) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(v.mean())


class MetricsWriter:
  """Appends step scalars to metrics.jsonl and (optionally) TensorBoard event files under WORKDIR/tb."""

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled and tensorboard:
      from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional, heavy import
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  def truncate_after(self, stage: str, step: int) -> None:
    """Drops lines of ``stage`` with a step > ``step`` (a resumed run logs them again) and a torn last line."""
    if not self.enabled or not self.path.exists():
      return
    keep = [line for line, row in _parse(self.path) if not (row["stage"] == stage and row["step"] > step)]
    artifacts.write_text_atomic(self.path, "".join(line + "\n" for line in keep))

  def write(self, stage: str, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"stage": stage, "step": int(step), **{k: _scalar(v) for k, v in sorted(scalars.items())}}
    with self.path.open("a") as f:
      f.write(json.dumps(row, allow_nan=True) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("stage", "step") and math.isfinite(v):
          self._tb.add_scalar(f"{stage}/{k}", v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _parse(path: pathlib.Path) -> list[tuple[str, dict]]:
  """(line, row) of every non-blank line. A last line that does not parse is torn (the process died in the middle
  of an append): dropped with a warning. Any other bad line raises ValueError naming the file and line."""
  lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
  out = []
  for i, (n, line) in enumerate(lines):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:
        _log.warning("%s: line %d is torn (%s: %.60r); dropped", path, n, e.msg, line)
        break
      raise ValueError(f"{path}, line {n}: not JSON ({e.msg} at column {e.colno}); only a torn last line is "
                       "dropped by itself: remove this one by hand") from None
    if not (isinstance(row, dict) and isinstance(row.get("stage"), str) and isinstance(row.get("step"), int)):
      raise ValueError(f"{path}, line {n}: expected a JSON object with a string 'stage' and an integer 'step'")
    out.append((line, row))
  return out


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl ([] without one), a torn last line dropped with a warning."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [row for _, row in _parse(path)] if path.exists() else []


def progress(total: int, initial: int, desc: str, enabled: bool = True):
  """A tqdm bar with ETA on the console (process 0 only)."""
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, initial=initial, desc=desc, disable=not enabled or jax.process_index() != 0,
              dynamic_ncols=True, smoothing=0.1)


_CURVES = {
    "sft": [("loss", "SFT loss")],
    "rl": [("reward/slow/f1", "slow F1 reward"), ("reward/fast/f1", "fast F1 reward"),
           ("reward/slow/recall", "slow recall"), ("reward/slow/precision", "slow precision"),
           ("reward/fast/recall", "fast recall"), ("reward/fast/precision", "fast precision"),
           ("reward/slow/calibration", "r_cal (slow)"), ("kl", "KL to reference"),
           ("length/slow/mean", "slow completion length"), ("entropy", "entropy")],
}


def plot_curves(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """PNG training curves from metrics.jsonl: WORKDIR/plots/{sft,rl}.png. Returns the files written."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  rows = read_metrics(workdir)
  out_dir = pathlib.Path(workdir) / "plots"
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  for stage, curves in _CURVES.items():
    stage_rows = [r for r in rows if r["stage"] == stage]
    curves = [(k, t) for k, t in curves if any(k in r for r in stage_rows)]
    if not curves:
      continue
    cols = min(3, len(curves))
    nrows = -(-len(curves) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, curves):
      pts = [(r["step"], r[key]) for r in stage_rows if key in r]
      xs, ys = zip(*pts)
      ax.plot(xs, ys, lw=1.0, alpha=0.5)
      if len(ys) >= 5:  # a moving average shows the trend through rollout noise
        k = max(2, len(ys) // 10)
        ax.plot(xs[k - 1:], np.convolve(ys, np.ones(k) / k, mode="valid"), lw=2.0)
      ax.set_title(title)
      ax.set_xlabel("step")
    for ax in list(axes.flat)[len(curves):]:
      ax.axis("off")
    fig.tight_layout()
    path = out_dir / f"{stage}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written
