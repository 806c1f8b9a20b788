"""The paper's ablation on the embedded default: a grid of ablation rows x seeds, one SFT per seed shared by every row.

    python benchmarks/ablation.py --presets grpo_f1,rd,rd_ad,mer_r1 --seeds 0,1,2 [--out /tmp/merr1_ablation]
        [--probe_every 20] [--write docs/benchmarks/ablation.md] [--config configs/base.py] [extra --config.x=y ...]

For each seed, one cold-start SFT (`--config.stages=('sft',)`) in OUT/seed<S>/sft; then for each row
(configs/base.py:ablation=ROW) the RL stage in OUT/seed<S>/<ROW>, which starts from that SFT checkpoint (copied
in: the trainer finds the SFT stage done and restores its final weights), so every row of a seed starts from the
same weights and reads the same data. A cell is done when its results.json exists; rerunning the same command
skips done cells and resumes a half-done one from its own checkpoints (the trainer's resume), so a grid stopped at
any point continues where it was. `--max_cells N` stops after N cells have run (tests, partial runs). OUT/grid.json
records the config file and pass-through flags (e.g. --config.data.synth_version=2, docs/data.md): a later run in
the same OUT with other flags is refused, since it would reuse SFT checkpoints made under another setting.

Outputs in OUT: ablation.json (every number), ablation.md (the tables below), ablation.png (slow and fast F per
row, seeds as points), interference.png (the probe's statistics over training, per row), and with --write the
"## Ablation" section of the docs (--section names another, for a second grid such as the SFCC variants
over one seed). The tables:
  * per row: mean, std and min over seeds of slow and fast precision / recall / F (MER-Synth test split, OV
    emotion-wheel level 1, x 100) and of the slow-F gain over SFT; the paper's reported number beside it;
  * paired comparisons: each row against the row it adds a switch to (rd vs grpo_f1, rd_ad vs rd, mer_r1 vs
    rd_ad, each SFCC variant vs mer_r1; the row above when that one is not in the grid), the difference of the OV
    F with a 95% interval from a bootstrap that resamples seeds, then clips within a seed, the same clips for both
    rows (a paired, two-level bootstrap);
  * the interference probe (method.md "Why disentangle") averaged over training, per row;
  * the reasoning check (docs/data.md): on each seed's SFT policy, the mean teacher-forced log-likelihood of the
    ground-truth answer after the clip's own reasoning, after another clip's reasoning, and after an empty one.

Nothing here tunes anything: the rows are configs/base.py's presets, the seeds are the command's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from typing import Callable

import numpy as np
import report_util

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from merr1_jax import emotion  # noqa: E402

ROWS = ("grpo_f1", "rd", "rd_ad", "mer_r1", "mer_r1_cg", "sfcc_max", "sfcc_word", "sfcc_emitted", "sfcc_no_prec",
        "sfcc_reward", "sfcc_mixed")
# The paper's MER-UniBench official-protocol means (a second-hand summary of its body: "reported").
REPORTED = {"grpo_f1": 77.87, "rd": 80.18, "rd_ad": 82.20, "mer_r1": 83.50, "sfcc_word": 81.81,
            "sfcc_emitted": 81.81, "sfcc_no_prec": 82.87, "sfcc_reward": 81.91, "sfcc_mixed": 83.11}
PARENT = {"rd": "grpo_f1", "rd_ad": "rd", "mer_r1": "rd_ad", "mer_r1_cg": "rd_ad", **{r: "mer_r1" for r in ROWS[5:]}}
# Comparisons beyond each row's parent that the verdicts need (row, other), made when both ran: the paper's
# chain MER-R1 > RD+AD > GRPO, and the one-sided calibration against the contrastive form it replaces.
EXTRA_PAIRS = (("rd_ad", "grpo_f1"), ("mer_r1", "grpo_f1"), ("mer_r1", "mer_r1_cg"))
SECTION = "## Ablation"
RUN_FLAGS = ("--config.log.progress=False", "--config.checkpoint.export_hf=False", "--config.log.plots=False")
Runner = Callable[[list[str], pathlib.Path], int]  # (command, log file) -> exit status


def run_process(cmd: list[str], log: pathlib.Path) -> int:
  with log.open("a") as f:
    return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode


def _train_cmd(config: str, row: str, seed: int, workdir: pathlib.Path, data_dir: pathlib.Path, extra) -> list[str]:
  return [sys.executable, "-m", "merr1_jax.train", "--config", f"{config}:ablation={row}", "--workdir", str(workdir),
          f"--config.seed={seed}", f"--config.data.data_dir={data_dir}", *RUN_FLAGS, *extra]


def _copy_sft(sft: pathlib.Path, cell: pathlib.Path) -> None:
  """The SFT stage's outputs into a fresh cell: the trainer then skips SFT and restores its final weights."""
  cell.mkdir(parents=True, exist_ok=True)
  if not (cell / "checkpoints" / "sft").exists():
    shutil.copytree(sft / "checkpoints" / "sft", cell / "checkpoints" / "sft")
  for name in ("eval_sft.json", "eval_sft_samples.jsonl", "tokenizer.json"):
    if not (cell / name).exists():
      shutil.copy2(sft / name, cell / name)
  if not (cell / "metrics.jsonl").exists():
    rows = [line for line in (sft / "metrics.jsonl").read_text().splitlines() if '"stage": "sft"' in line]
    (cell / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))


def _check_flags(out: pathlib.Path, config: str, extra) -> None:
  """A grid directory holds one setting: its config file and pass-through flags, recorded in OUT/grid.json on the
  first run. Another setting in the same directory would mix cells (one seed's SFT reused under other data), so it
  is refused; the row and seed lists may differ (a second grid of SFCC variants shares the SFT of its seeds)."""
  want = {"config": config, "flags": list(extra)}
  path = out / "grid.json"
  if path.exists():
    got = json.loads(path.read_text())
    if got != want:
      raise SystemExit(f"{out} holds a grid run with {got}, not {want}: use another --out, or the same flags")
  else:
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(want, indent=1))


def run_grid(rows, seeds, out: pathlib.Path, config: str, extra, *, run: Runner = run_process,
             max_cells: int | None = None) -> list[str]:
  """Runs every cell not done yet (see the module docstring); returns the cells it ran, as 'seed/row'."""
  _check_flags(out, config, extra)
  cells = [(s, None) for s in seeds] + [(s, r) for s in seeds for r in rows]
  todo = [(s, r) for s, r in cells if not _done(out, s, r)]
  print(f"ablation grid: {len(cells)} cells ({len(seeds)} SFT + {len(seeds)} x {len(rows)} RL), "
        f"{len(cells) - len(todo)} already done", flush=True)
  ran, times = [], []
  for s, r in todo:
    if max_cells is not None and len(ran) >= max_cells:
      print(f"stopping after {max_cells} cell(s); rerun the same command to continue", flush=True)
      break
    cell = out / f"seed{s}" / (r or "sft")
    cell.mkdir(parents=True, exist_ok=True)
    if r is None:
      cmd = _train_cmd(config, rows[0], s, cell, out / f"seed{s}" / "data", ["--config.stages=('sft',)", *extra])
    else:
      _copy_sft(out / f"seed{s}" / "sft", cell)
      cmd = _train_cmd(config, r, s, cell, out / f"seed{s}" / "data", extra)
    left = len(todo) - len(ran)
    eta = f", about {statistics.median(times) * left / 60:.0f} min left" if times else ""
    print(f"[{len(ran) + 1}/{len(todo)}] seed {s} {r or 'sft'}: running{eta}", flush=True)
    t0 = time.perf_counter()
    code = run(cmd, cell / "train.log")
    if code != 0:
      raise SystemExit(f"seed {s} {r or 'sft'} failed (exit {code}); see {cell / 'train.log'}")
    times.append(time.perf_counter() - t0)
    ran.append(f"{s}/{r or 'sft'}")
    print(f"    done in {times[-1] / 60:.1f} min", flush=True)
  return ran


def _done(out: pathlib.Path, seed: int, row: str | None) -> bool:
  cell = out / f"seed{seed}" / (row or "sft")
  if row is None:
    return (cell / "eval_sft.json").exists() and (cell / "checkpoints" / "sft").exists()
  return (cell / "results.json").exists()


# ------------------------------------------------------------------------------------------------ numbers


def per_clip_wheel_pr(samples: list[dict], gt_by_id: dict, mode: str, fmt: str = "2025"):
  """(ids, P[N, 5], R[N, 5]) per clip and wheel at level 1, NaN where the GT maps nowhere in that wheel: the
  pieces of metrics.ov_score (metrics.md §2), so a resample of clips gives its OV F without re-mapping words."""
  ew = emotion.load(fmt)
  rows = sorted((s for s in samples if s["mode"] == mode and s["sample"] == 0), key=lambda s: s["id"])
  p, r = np.full((len(rows), 5), np.nan), np.full((len(rows), 5), np.nan)
  for i, s in enumerate(rows):
    for k in range(5):
      g = ew.map_words(gt_by_id[s["id"]], k + 1)
      if g:
        q = ew.map_words(s["words"], k + 1)
        p[i, k], r[i, k] = (len(g & q) / len(q) if q else 0.0), len(g & q) / len(g)
  return [s["id"] for s in rows], p, r


def ov_f(p: np.ndarray, r: np.ndarray) -> float:
  """metrics.ov_score's F from per-clip P/R [N, 5]: per wheel the F of the clip means, then the wheel mean."""
  pm, rm = np.nanmean(p, 0), np.nanmean(r, 0)
  return float(np.mean(np.where(pm + rm > 0, 2 * pm * rm / np.maximum(pm + rm, 1e-30), 0.0)))


def paired_bootstrap(a: dict, b: dict, reps: int = 2000, seed: int = 0) -> dict:
  """OV F(a) - OV F(b) over seeds, with a 95% interval from a two-level paired bootstrap: seeds with replacement,
  then clips with replacement within each drawn seed (the same clips for a and b). a, b: seed -> (P, R)."""
  seeds = sorted(set(a) & set(b))
  diff = statistics.mean(ov_f(*a[s]) - ov_f(*b[s]) for s in seeds)
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(reps):
    ss = rng.choice(seeds, len(seeds))
    vals = []
    for s in ss:
      idx = rng.integers(0, len(a[s][0]), len(a[s][0]))
      vals.append(ov_f(a[s][0][idx], a[s][1][idx]) - ov_f(b[s][0][idx], b[s][1][idx]))
    draws.append(np.mean(vals))
  lo, hi = np.percentile(draws, [2.5, 97.5])
  return {"diff": 100 * diff, "ci95": [100 * float(lo), 100 * float(hi)], "seeds": len(seeds),
          "per_seed": [100 * (ov_f(*a[s]) - ov_f(*b[s])) for s in seeds]}


def _stats(xs: list[float]) -> dict:
  return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "min": min(xs),
          "n": len(xs)}


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(out: pathlib.Path, rows, seeds) -> dict:
  """Every finished cell's numbers: results, per-clip P/R for the paired comparisons, probe averages."""
  cells, clips = {}, {}
  for s in seeds:
    for r in rows:
      cell = out / f"seed{s}" / r
      if not (cell / "results.json").exists():
        continue
      res = json.loads((cell / "results.json").read_text())
      probes = [m for m in _read_jsonl(cell / "metrics.jsonl") if m["stage"] == "rl" and "probe/rho" in m]
      cells[(s, r)] = {"results": res, "probe": {k: statistics.mean(p[k] for p in probes)
                                                  for k in (probes[0] if probes else {}) if k.startswith("probe/")},
                       "probe_curve": [{k: v for k, v in p.items() if k == "step" or k.startswith("probe/")}
                                       for p in probes],
                       "diagnostics": cell_diagnostics(cell)}
      samples = _read_jsonl(cell / "eval_rl_samples.jsonl")
      gt = {x["id"]: x["gt"] for x in samples}
      for mode in ("slow", "fast"):
        _, p, rr = per_clip_wheel_pr(samples, gt, mode)
        clips[(s, r, mode)] = (p, rr)
        if not np.isclose(ov_f(p, rr), res["rl"][mode]["f"], atol=1e-9):  # the pieces must rebuild the table
          raise SystemExit(f"seed {s} {r} {mode}: per-clip OV F {ov_f(p, rr)} != results.json {res['rl'][mode]['f']}")
  return {"cells": cells, "clips": clips}


_PART_KEYS = ("probe/grad_", "probe/var_adv_")


def summarize(data: dict, rows, seeds) -> dict:
  """Per-row statistics over seeds and the paired comparisons (ablation.json's content)."""
  cells, clips = data["cells"], data["clips"]
  table = {}
  for r in rows:
    got = [cells[(s, r)]["results"] for s in seeds if (s, r) in cells]
    if not got:
      continue
    entry = {f"{st}_{m}_{k}": _stats([100 * g[st][m][k] for g in got])
             for st in ("sft", "rl") for m in ("slow", "fast") for k in ("precision", "recall", "f")}
    entry["gain_slow_f"] = _stats([100 * (g["rl"]["slow"]["f"] - g["sft"]["slow"]["f"]) for g in got])
    entry["seeds"] = [s for s in seeds if (s, r) in cells]
    entry["reported"] = REPORTED.get(r)
    probes = [cells[(s, r)]["probe"] for s in seeds if (s, r) in cells and cells[(s, r)]["probe"]]
    entry["probe"] = {k: statistics.mean(p[k] for p in probes) for k in probes[0]} if probes else {}
    diags = [cells[(s, r)].get("diagnostics", {}) for s in seeds if (s, r) in cells]
    entry["diagnostics"] = {k: statistics.mean(d[k] for d in diags if d.get(k) is not None)
                            for k in sorted({k for d in diags for k in d})
                            if any(d.get(k) is not None for d in diags)}
    if entry["probe"].get("probe/grad_norm_rec") == 0 and entry["probe"].get("probe/grad_norm_prec") == 0:
      # Cells run before the probe omitted them: zero parts mean the row has no such objectives (grpo_f1).
      entry["probe"] = {k: v for k, v in entry["probe"].items() if not k.startswith(_PART_KEYS)}
    table[r] = entry
  paired = {}
  for i, r in enumerate(rows):
    # The row it adds a switch to when that row ran, else the row above it in this grid.
    parent = PARENT.get(r) if PARENT.get(r) in rows else (rows[i - 1] if i else None)
    if parent is None or parent not in table or r not in table:
      continue
    for mode in ("slow", "fast"):
      a = {s: clips[(s, r, mode)] for s in seeds if (s, r, mode) in clips}
      b = {s: clips[(s, parent, mode)] for s in seeds if (s, parent, mode) in clips}
      if set(a) & set(b):
        paired[f"{r}_vs_{parent}_{mode}"] = {"row": r, "parent": parent, "mode": mode, **paired_bootstrap(a, b)}
  for r, other in EXTRA_PAIRS:
    if r in table and other in table and f"{r}_vs_{other}_slow" not in paired:
      for mode in ("slow", "fast"):
        a = {s: clips[(s, r, mode)] for s in seeds if (s, r, mode) in clips}
        b = {s: clips[(s, other, mode)] for s in seeds if (s, other, mode) in clips}
        if set(a) & set(b):
          paired[f"{r}_vs_{other}_{mode}"] = {"row": r, "parent": other, "mode": mode, **paired_bootstrap(a, b)}
  for p in paired.values():
    p["mde80"] = detectable_effect(p["per_seed"])
  # Slow minus fast within each row, paired by clip: "slow overtakes fast only after MER-R1".
  gap = {}
  for r in table:
    a = {s: clips[(s, r, "slow")] for s in seeds if (s, r, "slow") in clips}
    b = {s: clips[(s, r, "fast")] for s in seeds if (s, r, "fast") in clips}
    if a and b:
      gap[r] = paired_bootstrap(a, b)
      gap[r]["mde80"] = detectable_effect(gap[r]["per_seed"])
  return {"rows": table, "paired": paired, "slow_minus_fast": gap}


def detectable_effect(per_seed: list[float], power: float = 0.8, alpha: float = 0.05) -> float | None:
  """The smallest true mean paired difference that a two-sided t-test at `alpha` over these many seeds detects
  with `power`, taking the observed between-seed standard deviation of the paired differences as the truth:
  (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n). None with fewer than 2 seeds."""
  n = len(per_seed)
  if n < 2:
    return None
  from scipy import stats  # noqa: PLC0415

  sd = statistics.stdev(per_seed)
  return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1)) * sd / n ** 0.5)


def omission_rate(samples: list[dict], gt_by_id: dict, fmt: str = "2025") -> float | None:
  """The paper's premise on one evaluation (docs/method.md E3 "Diagnostics"): the share of clips where the fast
  answer names a correct level-1 cluster (in any wheel) that the slow answer does not (first sample of each)."""
  ew = emotion.load(fmt)
  by_id = {}
  for x in samples:
    if x["sample"] == 0:
      by_id.setdefault(x["id"], {})[x["mode"]] = x["words"]
  hits = []
  for i, modes in by_id.items():
    if "slow" not in modes or "fast" not in modes:
      continue
    omitted = False
    for k in range(1, 6):
      g = ew.map_words(gt_by_id[i], k)
      if g and (ew.map_words(modes["fast"], k) & g) - ew.map_words(modes["slow"], k):
        omitted = True
    hits.append(omitted)
  return statistics.mean(hits) if hits else None


def cell_diagnostics(cell: pathlib.Path, last: int = 100) -> dict:
  """What the calibration pays for, from one RL cell (docs/method.md E3 "Diagnostics"): the calibration metrics
  (cal/*) and the slow answer's length averaged over the last `last` RL steps, and the premise (omission_rate)
  on the SFT and the RL evaluations."""
  rows = [m for m in _read_jsonl(cell / "metrics.jsonl") if m.get("stage") == "rl"][-last:]
  keys = sorted({k for m in rows for k in m if k.startswith("cal/")} | {"answer/slow/num_words"})
  out = {k: statistics.mean(m[k] for m in rows if k in m) for k in keys if any(k in m for m in rows)}
  for stage in ("sft", "rl"):
    path = cell / f"eval_{stage}_samples.jsonl"
    if path.exists():
      samples = _read_jsonl(path)
      out[f"omits/{stage}"] = omission_rate(samples, {x["id"]: x["gt"] for x in samples})
  return out


# ------------------------------------------------------------------------------------------ reasoning check


def reasoning_check(out: pathlib.Path, seed: int, config_spec: str, extra) -> dict:
  """On seed's SFT policy: the mean teacher-forced log-likelihood (nats per clip) of the ground-truth answer after
  (own) the clip's own reasoning (its annotator reading, as in the slow demonstrations), (other) another clip's
  reasoning, (none) the empty think of fast mode. own > none > other says the reasoning carries information that
  the fast answer lacks (docs/data.md, "Does the reasoning carry information?")."""
  from merr1_jax import evaluate, rollout  # noqa: PLC0415 (jax)
  from merr1_jax.data import synth  # noqa: PLC0415
  from merr1_jax.rollout import passes as grouped  # noqa: PLC0415
  from merr1_jax.task import prompts  # noqa: PLC0415
  from merr1_jax.training import (
    policy_io,  # noqa: PLC0415
    settings,  # noqa: PLC0415
  )
  from merr1_jax.training import setup as run_setup  # noqa: PLC0415

  sft = out / f"seed{seed}" / "sft"
  config = evaluate.build_config(f"{config_spec}:ablation={ROWS[0]}", [
      f"--config.seed={seed}", f"--config.data.data_dir={out / f'seed{seed}' / 'data'}", *extra])
  model, params, tok = policy_io.load_policy(config, sft, None)
  records = {r.id: r for r in synth.generate_split(settings.synth_config(config), config.data.eval_split)}
  order = sorted(records)
  think = {i: records[i].demo_slow.split(prompts.THINK_OPEN, 1)[1].split(prompts.THINK_CLOSE, 1)[0] for i in order}
  other = {i: think[order[(k + 1) % len(order)]] for k, i in enumerate(order)}
  ids = rollout.SpecialIds.from_tokenizer(tok)
  got = {"own": [], "other": [], "none": []}
  for batch in run_setup.open_data(config, sft, tok, model.config).pipeline("eval", config.data.eval_split):
    prompt = rollout.prepare_prompts(rollout.batch_inputs(batch, "slow"), mode="slow", vocab_size=tok.vocab_size,
                                     pad_id=ids.pad, buckets=tuple(config.data.prompt_buckets))
    rows = [str(i) if m else order[0] for i, m in zip(batch["ids"], batch["example_mask"])]
    answer = {i: tok.encode(prompts.render_answer(records[i].openset) + prompts.ANSWER_CLOSE) for i in rows}
    for name, mode in (("own", "slow"), ("other", "slow"), ("none", "fast")):
      if mode == "slow":
        src = think if name == "own" else other
        heads = [tok.encode(prompts.THINK_OPEN + src[i] + prompts.THINK_CLOSE + prompts.ANSWER_OPEN) for i in rows]
      else:
        heads = [[] for _ in rows]
      pre = ids.fast_prefix if mode == "fast" else ()  # the fast context: the prompt + FAST_PREFIX
      seg = grouped.token_segment([h + answer[i] for h, i in zip(heads, rows)], prompt, num_samples=1,
                                  prefix_ids=pre, mode_id=0, pad_id=ids.pad)
      logp = np.asarray(grouped.score_pass(model, params, prompt, [seg])[0]["logp"])[:, 0, len(pre):]
      for j, (h, i) in enumerate(zip(heads, rows)):
        if batch["example_mask"][j]:
          got[name].append(float(logp[j, len(h):len(h) + len(answer[i])].sum()))
  diff = lambda a, b: _mean_ci([x - y for x, y in zip(got[a], got[b])])  # noqa: E731
  return {"n": len(got["own"]), **{k: statistics.mean(v) for k, v in got.items()},
          "own_minus_none": diff("own", "none"), "none_minus_other": diff("none", "other"),
          "own_minus_other": diff("own", "other")}


def dataset_name(config_spec: str, extra) -> str:
  """"MER-Synth version V, noise N" of the grid's config (docs/data.md), for the report's header."""
  from merr1_jax import evaluate  # noqa: PLC0415

  d = evaluate.build_config(f"{config_spec}:ablation={ROWS[0]}", list(extra)).data
  return f"MER-Synth version {d.synth_version}, noise {d.synth_noise}" if d.name == "mer_synth" else d.name


def _mean_ci(xs: list[float]) -> dict:
  m, se = statistics.mean(xs), statistics.stdev(xs) / len(xs) ** 0.5
  return {"mean": m, "ci95": [m - 1.96 * se, m + 1.96 * se]}


# ----------------------------------------------------------------------------------------------- reports


def _cell(st: dict, digits: int = 2) -> str:
  return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f} ({st['min']:.{digits}f})"


def markdown(summary: dict, reasoning: dict, meta: dict) -> str:
  rows = summary["rows"]
  out = [f"{meta.get('section', SECTION)}\n",
         f"Command: `{meta['command']}`. Machine: {meta['machine']}. Date: {meta['date']}. "
         f"Seeds: {', '.join(map(str, meta['seeds']))}. Each RL row starts from its seed's SFT checkpoint.\n",
         f"{meta.get('dataset', 'MER-Synth')} test split, OV emotion-wheel level 1, x 100; mean ± std (min) over "
         "seeds. Reported: the paper's "
         "MER-UniBench mean (a second-hand summary; another dataset and model, so only the ordering compares).\n",
         "| row | reported | slow P | slow R | slow F | fast P | fast R | fast F | slow F gain over SFT |",
         "|---|---|---|---|---|---|---|---|---|"]
  for r, e in rows.items():
    rep = f"{e['reported']:.2f}" if e["reported"] is not None else "-"
    cells = " | ".join(_cell(e[f"rl_{m}_{k}"]) for m in ("slow", "fast") for k in ("precision", "recall", "f"))
    out.append(f"| {r} | {rep} | {cells} | {_cell(e['gain_slow_f'])} |")
  first = next(iter(rows.values()), None)
  if first:
    cells = " | ".join(_cell(first[f"sft_{m}_{k}"]) for m in ("slow", "fast") for k in ("precision", "recall", "f"))
    out.append(f"| (SFT) | | {cells} | |")
  out += ["", "Paired comparisons (row minus the row it adds a switch to; OV F points; 95% interval from a paired "
          "bootstrap over seeds, then clips):", "",
          "| comparison | mode | difference | 95% interval | per seed | detectable (80%) | reported difference |",
          "|---|---|---|---|---|---|---|"]
  mde = lambda p: f"{p['mde80']:.2f}" if p.get("mde80") is not None else "-"  # noqa: E731
  for p in summary["paired"].values():
    rep = REPORTED.get(p["row"]), REPORTED.get(p["parent"])
    rep_s = f"{rep[0] - rep[1]:+.2f}" if None not in rep and p["mode"] == "slow" else "-"
    out.append(f"| {p['row']} vs {p['parent']} | {p['mode']} | {p['diff']:+.2f} | [{p['ci95'][0]:+.2f}, "
               f"{p['ci95'][1]:+.2f}] | {', '.join(f'{x:+.2f}' for x in p['per_seed'])} | {mde(p)} | {rep_s} |")
  out += ["", "Detectable (80%): the smallest true paired difference a two-sided t-test over these seeds would find "
          "with 80% power, taking the observed between-seed spread as the truth.", ""]
  if summary.get("slow_minus_fast"):
    out += ["Slow F minus fast F within each row (paired by clip):", "",
            "| row | slow - fast | 95% interval | per seed | detectable (80%) |", "|---|---|---|---|---|"]
    for r, p in summary["slow_minus_fast"].items():
      out.append(f"| {r} | {p['diff']:+.2f} | [{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}] | "
                 f"{', '.join(f'{x:+.2f}' for x in p['per_seed'])} | {mde(p)} |")
  diag = {r: e.get("diagnostics", {}) for r, e in rows.items() if e.get("diagnostics")}
  if diag:
    keys = ["answer/slow/num_words", "cal/len_corr", "cal/only_signal_frac", "cal/anchor_gain/a0",
            "cal/anchor_gain/a1", "cal/anchor_gain/a2", "omits/sft", "omits/rl"]
    out += ["", "Calibration diagnostics (method.md E3 \"Diagnostics\"; training metrics over the last 100 RL steps, "
            "omits/*: the share of test clips whose slow answer omits a correct cluster the fast answer names), "
            "mean over seeds:", "", "| row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    fmt_d = lambda d, k: f"{d[k]:.3f}" if d.get(k) is not None else "-"  # noqa: E731
    out += [f"| {r} | " + " | ".join(fmt_d(d, k) for k in keys) + " |" for r, d in diag.items()]
  probed = {r: e["probe"] for r, e in rows.items() if e["probe"]}
  if probed:
    keys = ("s_rec", "s_prec", "rho", "corr_adv_rec", "corr_adv_prec", "pred_corr_coupled_rec",
            "pred_corr_disentangled", "grad_cos", "var_adv_rec", "var_adv_prec")
    out += ["", "Interference probe (method.md \"Why disentangle\"), averaged over training and seeds:",
            "", "| row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    # A row without recall and precision objectives (grpo_f1: one F1 reward) has no per-objective parts.
    fmt = lambda p, k: f"{p['probe/' + k]:.3f}" if "probe/" + k in p else "-"  # noqa: E731
    out += [f"| {r} | " + " | ".join(fmt(p, k) for k in keys) + " |" for r, p in probed.items()]
  if reasoning:
    out += ["", "Reasoning check on the SFT policy (nats per clip, ground-truth answer log-likelihood; docs/data.md):",
            "", "| seed | own reasoning | another clip's | none (fast) | own - none | none - other |",
            "|---|---|---|---|---|---|"]
    for s, c in reasoning.items():
      ci = lambda d: f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"  # noqa: E731
      out.append(f"| {s} | {c['own']:.2f} | {c['other']:.2f} | {c['none']:.2f} | {ci(c['own_minus_none'])} | "
                 f"{ci(c['none_minus_other'])} |")
  return "\n".join(out) + "\n"


def plots(summary: dict, data: dict, out: pathlib.Path) -> list[pathlib.Path]:
  """ablation.png (slow / fast F per row, seeds as points) and interference.png (probe curves per row)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  rows = list(summary["rows"])
  fig = Figure(figsize=(1.3 * len(rows) + 2, 4))
  ax = fig.add_subplot(1, 1, 1)
  for j, (mode, color) in enumerate((("slow", "tab:blue"), ("fast", "tab:orange"))):
    xs = np.arange(len(rows)) + (j - 0.5) * 0.35
    means = [summary["rows"][r][f"rl_{mode}_f"]["mean"] for r in rows]
    stds = [summary["rows"][r][f"rl_{mode}_f"]["std"] for r in rows]
    ax.bar(xs, means, 0.35, yerr=stds, color=color, alpha=0.6, label=f"{mode} F")
    for x, r in zip(xs, rows):
      pts = [100 * c["results"]["rl"][mode]["f"] for (s, rr), c in data["cells"].items() if rr == r]
      ax.scatter([x] * len(pts), pts, color="black", s=8, zorder=3)
  ax.set_xticks(range(len(rows)), rows, rotation=20)
  lo = min(summary["rows"][r][f"rl_{m}_f"]["min"] for r in rows for m in ("slow", "fast"))
  ax.set(ylabel="OV F (x 100)", ylim=(max(0.0, lo - 5), None), title="MER-R1 ablation on MER-Synth")
  ax.legend()
  fig.tight_layout()
  FigureCanvasAgg(fig)
  paths = [out / "ablation.png"]
  fig.savefig(paths[0], dpi=110)
  curves = {r: [c["probe_curve"] for (s, rr), c in data["cells"].items() if rr == r and c["probe_curve"]] for r in rows}
  curves = {r: v for r, v in curves.items() if v}
  if curves:
    present = {k for runs in curves.values() for run in runs for p in run for k in p}
    keys = [k for k in ("probe/corr_adv_rec", "probe/corr_adv_prec", "probe/grad_cos", "probe/rho") if k in present]
    fig = Figure(figsize=(4.2 * len(keys), 3.4))
    for i, k in enumerate(keys):
      ax = fig.add_subplot(1, len(keys), i + 1)
      for r, runs in curves.items():
        steps = [p["step"] for p in runs[0]]
        vals = np.mean([[p.get(k, np.nan) for p in run][:len(steps)] for run in runs if len(run) >= len(steps)],
                       axis=0)
        ax.plot(steps, vals, label=r)
      ax.set(title=k.removeprefix("probe/"), xlabel="RL step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    paths.append(out / "interference.png")
    fig.savefig(paths[1], dpi=110)
  return paths


def main(argv=None, *, run: Runner = run_process) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", default="grpo_f1,rd,rd_ad,mer_r1", help=f"comma list of rows: {', '.join(ROWS)}")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--out", default="/tmp/merr1_ablation")
  ap.add_argument("--config", default="configs/base.py", help="the config file whose ablation=ROW presets run")
  ap.add_argument("--probe_every", type=int, default=20, help="rl.probe_every of every RL cell (0: no probe)")
  ap.add_argument("--max_cells", type=int, default=None, help="stop after this many cells (rerun to continue)")
  ap.add_argument("--no_reasoning_check", action="store_true")
  ap.add_argument("--write", default="", help="markdown file whose --section is replaced")
  ap.add_argument("--section", default=SECTION, help="the heading written (a second grid, e.g. the SFCC variants "
                  "over fewer seeds, gets its own section)")
  args, extra = ap.parse_known_args(argv)
  rows = [r for r in args.presets.split(",") if r]
  unknown = [r for r in rows if r not in ROWS]
  if unknown or not rows:
    raise SystemExit(f"unknown preset(s) {unknown}; known: {', '.join(ROWS)}")
  seeds = [int(s) for s in args.seeds.split(",") if s]
  out = pathlib.Path(args.out)
  extra = [*extra, f"--config.rl.probe_every={args.probe_every}"]
  ran = run_grid(rows, seeds, out, args.config, extra, run=run, max_cells=args.max_cells)
  if not all(_done(out, s, r) for s in seeds for r in rows):
    return {"ran": ran, "complete": False}
  data = collect(out, rows, seeds)
  summary = summarize(data, rows, seeds)
  reasoning = {} if args.no_reasoning_check else {s: reasoning_check(out, s, args.config, extra) for s in seeds}
  meta = {"command": shlex.join(["python", "benchmarks/ablation.py", *(argv if argv is not None else sys.argv[1:])]),
          "machine": report_util.machine(), "date": datetime.date.today().isoformat(), "seeds": seeds,
          "section": args.section, "dataset": dataset_name(args.config, extra)}
  md = markdown(summary, reasoning, meta)
  (out / "ablation.json").write_text(json.dumps({"meta": meta, **summary, "reasoning": reasoning}, indent=1))
  (out / "ablation.md").write_text(md)
  plots(summary, data, out)
  if args.write:
    report_util.write_section(ROOT / args.write, args.section, md)
  print(md)
  return {"ran": ran, "complete": True, "summary": summary, "reasoning": reasoning}


if __name__ == "__main__":
  main()
