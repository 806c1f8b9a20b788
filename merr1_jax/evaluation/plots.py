"""The PNG figures of an evaluation report (reports.write_reports): precision vs recall per sample, answer set
sizes, and the reliability diagram of the answer confidence.

Plots use matplotlib's Agg canvas through the object API (no pyplot, no display, no global backend switch), so
they render on a headless machine and never touch global matplotlib state.
"""

from __future__ import annotations

import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from merr1_jax.evaluation import core as evaluation
from merr1_jax.evaluation import stats as eval_stats

_COLORS = {"fast": "tab:orange", "slow": "tab:blue"}


def _save(fig: Figure, path: pathlib.Path) -> None:
  FigureCanvasAgg(fig)
  fig.savefig(path, format="png", dpi=100)


def pr_plot(result: evaluation.DatasetResult, path: pathlib.Path) -> None:
  modes = list(result.summary)
  fig = Figure(figsize=(4.2 * len(modes), 4))
  rng = np.random.default_rng(0)  # a little jitter: many samples share exact P/R values
  for i, mode in enumerate(modes):
    ax = fig.add_subplot(1, len(modes), i + 1)
    pts = np.asarray([(s["recall"], s["precision"]) for s in result.samples
                      if s["mode"] == mode and s["precision"] is not None], np.float64).reshape(-1, 2)
    jit = rng.uniform(-0.01, 0.01, pts.shape)
    ax.scatter(pts[:, 0] + jit[:, 0], pts[:, 1] + jit[:, 1], s=10, alpha=0.4, color=_COLORS.get(mode))
    if len(pts):
      ax.scatter([pts[:, 0].mean()], [pts[:, 1].mean()], marker="x", s=80, color="black", label="mean")
      ax.legend(loc="lower left")
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xlabel="recall", ylabel="precision",
           title=f"{result.dataset}: {mode}")
  fig.tight_layout()
  _save(fig, path)


def sizes_plot(results, path: pathlib.Path) -> None:
  fig = Figure(figsize=(5, 3.5))
  ax = fig.add_subplot(1, 1, 1)
  by_mode: dict[str, list[int]] = {}
  for r in results.values():
    for s in r.samples:
      by_mode.setdefault(s["mode"], []).append(len(s["words"]))
  top = max([max(v) for v in by_mode.values() if v] + [1])
  edges = np.arange(top + 2) - 0.5
  width = 0.8 / max(len(by_mode), 1)
  for i, (mode, sizes) in enumerate(by_mode.items()):
    counts, _ = np.histogram(sizes, bins=edges)
    ax.bar(np.arange(top + 1) + (i - (len(by_mode) - 1) / 2) * width, counts / max(len(sizes), 1), width=width,
           label=mode, color=_COLORS.get(mode))
  ax.set(xlabel="predicted emotions per answer", ylabel="fraction of samples", title="answer set sizes")
  ax.legend()
  fig.tight_layout()
  _save(fig, path)


def calibration_plot(results, mode: str, path: pathlib.Path) -> None:
  conf = [(s["confidence"], s["correct"]) for r in results.values() for s in r.samples
          if s["mode"] == mode and s["confidence"] is not None]
  cal = eval_stats.calibration_bins([c for c, _ in conf], [k for _, k in conf])
  fig = Figure(figsize=(4.5, 4.5))
  ax = fig.add_subplot(1, 1, 1)
  ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
  full = [b for b in cal["bins"] if b["n"]]
  if full:
    ax.plot([b["confidence"] for b in full], [b["correct"] for b in full], "o-", color=_COLORS.get(mode),
            label=f"{mode} (ECE {cal['ece']:.3f}, n={cal['n']})")
  else:
    ax.text(0.5, 0.5, "no confidence values\n(token_sets not given)", ha="center", va="center")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence at the first answer anchor",
         ylabel="precision of the answer", title=f"calibration: {mode}")
  ax.legend(loc="upper left")
  fig.tight_layout()
  _save(fig, path)
