"""The ablation presets (configs/base.py:ablation=ROW) and the grid runner (benchmarks/ablation.py): the rows differ
only in what their names say, a half-done grid resumes without redoing a cell, and the report's numbers rebuild
the field's metric from per-clip pieces."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest

from merr1_jax import config as cfglib
from merr1_jax.training import settings
from merr1_jax.data import synth
from merr1_jax.task import metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import ablation  # noqa: E402

BASE = str(ROOT / "configs" / "base.py")


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out |= _flat(v, f"{prefix}{k}.")
    else:
      out[f"{prefix}{k}"] = v
  return out


def _row(name):
  return _flat(cfglib.load(f"{BASE}:ablation={name}").to_dict())


REC_PREC = {"rl.w_rec_slow", "rl.w_rec_fast", "rl.w_prec_slow", "rl.w_prec_fast"}


@pytest.mark.parametrize("row,other,keys", [
    ("rd", "grpo_f1", REC_PREC | {"rl.w_f1"}),  # one F1 reward -> recall and precision as two rewards
    ("rd_ad", "rd", {"rl.disentangle"}),  # ... normalised separately (DOD)
    ("mer_r1", "rd_ad", {"rl.calibration"}),  # + SFCC (one-sided, with the default std floor)
    ("mer_r1_cg", "rd_ad", {"rl.calibration", "rl.cal_std_floor"}),  # + SFCC in the contrastive form, no floor
    ("sfcc_max", "mer_r1", {"rl.cal_reading"}),
    ("sfcc_word", "mer_r1", {"rl.cal_level"}),
    ("sfcc_emitted", "sfcc_word", {"rl.cal_reading"}),
    ("sfcc_no_prec", "mer_r1", {"rl.cal_precision_side"}),
    ("sfcc_reward", "mer_r1", {"rl.cal_space"}),
    ("sfcc_mixed", "mer_r1", {"rl.cal_space"}),
])
def test_rows_differ_only_in_what_their_names_say(row, other, keys):
  a, b = _row(row), _row(other)
  assert a.keys() == b.keys()
  assert {k for k in a if a[k] != b[k]} == keys
  settings.validate(cfglib.load(f"{BASE}:ablation={row}"))
  assert (a["rl.n_slow"], a["rl.n_fast"]) == (4, 0)  # the reported 4 responses per prompt, all slow


def test_unknown_row_is_a_clear_error():
  with pytest.raises(cfglib.ConfigError, match="unknown ablation row; known: grpo_f1, rd"):
    cfglib.load(f"{BASE}:ablation=dpo")


def _words(rng, k):
  return list(rng.choice(synth.EMOTIONS, size=k, replace=False))


def test_ov_f_from_per_clip_pieces_is_the_field_metric():
  rng = np.random.default_rng(0)
  gt = {f"c{i}": _words(rng, int(rng.integers(1, 4))) for i in range(40)}
  samples = [{"id": i, "mode": "slow", "sample": 0, "words": _words(rng, int(rng.integers(0, 4)))} for i in gt]
  _, p, r = ablation.per_clip_wheel_pr(samples, gt, "slow")
  want = metrics.ov_score([gt[s["id"]] for s in samples], [s["words"] for s in samples])
  assert ablation.ov_f(p, r) == pytest.approx(want["f"], abs=1e-12)


def test_paired_bootstrap():
  rng = np.random.default_rng(1)
  pr = {s: (rng.random((30, 5)), rng.random((30, 5))) for s in range(3)}
  same = ablation.paired_bootstrap(pr, pr, reps=200)
  assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
  better = {s: (np.minimum(p + 0.2, 1.0), np.minimum(r + 0.2, 1.0)) for s, (p, r) in pr.items()}
  up = ablation.paired_bootstrap(better, pr, reps=200)
  assert up["diff"] > 5 and up["ci95"][0] > 0 and len(up["per_seed"]) == 3


def _f_ref(p, r):
  """OV F from per-clip P/R [N, 5] (metrics.md §2), written here: per wheel the F of the clip means (NaN rows of a
  wheel skipped), then the mean over the 5 wheels."""
  fs = []
  for k in range(p.shape[1]):
    keep = ~np.isnan(p[:, k])
    pm, rm = p[keep, k].mean(), r[keep, k].mean()
    fs.append(2 * pm * rm / (pm + rm) if pm + rm > 0 else 0.0)
  return sum(fs) / len(fs)


def _bootstrap_ref(a, b, reps, seed):
  """The paired bootstrap as a plain loop, with the same draws as benchmarks/ablation.py: per replicate
  rng.choice over the sorted seeds, then per drawn seed rng.integers for its clips (shared by a and b); the interval
  is the 2.5th and 97.5th percentile of the replicate means, in percent."""
  seeds = sorted(set(a) & set(b))
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(reps):
    drawn = rng.choice(seeds, len(seeds))
    diffs = []
    for s in drawn:
      n = len(a[s][0])
      idx = rng.integers(0, n, n)
      diffs.append(_f_ref(a[s][0][idx], a[s][1][idx]) - _f_ref(b[s][0][idx], b[s][1][idx]))
    draws.append(sum(diffs) / len(diffs))
  draws.sort()
  return [100 * q for q in np.percentile(draws, [2.5, 97.5])]


def _pr_pair(rng, deltas, n=40):
  """(a, b) seed -> (P, R) [n, 5]: b is a with every P and R lowered by that seed's delta plus a little clip noise
  (some entries NaN, as for a GT that maps nowhere in a wheel)."""
  a, b = {}, {}
  for s, d in enumerate(deltas):
    p, r = rng.uniform(0.3, 0.9, (n, 5)), rng.uniform(0.3, 0.9, (n, 5))
    p[rng.random((n, 5)) < 0.1] = np.nan
    r[np.isnan(p)] = np.nan
    noise = rng.normal(0, 0.02, (2, n, 5))
    a[s], b[s] = (p, r), (np.clip(p - d + noise[0], 0, 1), np.clip(r - d + noise[1], 0, 1))
  return a, b


def test_paired_bootstrap_interval_equals_a_loop_written_here():
  # Pins the interval itself (percentiles, both resampling levels, the draw order), not only its sign.
  a, b = _pr_pair(np.random.default_rng(2), [0.02, 0.08, 0.05])
  got = ablation.paired_bootstrap(a, b, reps=300, seed=7)
  want = _bootstrap_ref(a, b, reps=300, seed=7)
  assert got["ci95"] == pytest.approx(want, abs=1e-9)
  per_seed = [100 * (_f_ref(*a[s]) - _f_ref(*b[s])) for s in sorted(a)]
  assert got["per_seed"] == pytest.approx(per_seed, abs=1e-9)
  assert got["diff"] == pytest.approx(np.mean(per_seed), abs=1e-9)
  assert want[0] < got["diff"] < want[1]


def test_spreading_the_per_seed_values_widens_the_interval():
  # Same mean gap (5 points of P and R), same clips and noise: once spread evenly over the seeds, once unevenly.
  # The clip-level spread is small, so a seed-level resample must widen the interval several times.
  even = ablation.paired_bootstrap(*_pr_pair(np.random.default_rng(3), [0.05] * 4), reps=400)
  spread = ablation.paired_bootstrap(*_pr_pair(np.random.default_rng(3), [0.0, 0.02, 0.08, 0.10]), reps=400)
  width = lambda d: d["ci95"][1] - d["ci95"][0]  # noqa: E731
  assert abs(even["diff"] - spread["diff"]) < 0.5, (even["diff"], spread["diff"])
  assert width(spread) > 3 * width(even), (even["ci95"], spread["ci95"])
  assert spread["ci95"][0] < min(spread["per_seed"]) + 3 and spread["ci95"][1] > max(spread["per_seed"]) - 3


class FakeTrainer:
  """Stands in for `python -m merr1_jax.train` in the grid test: writes the files a finished cell has, with
  results.json consistent with its per-clip samples (what `collect` checks), and records every command."""

  def __init__(self):
    self.commands = []

  def __call__(self, cmd, log):
    self.commands.append(cmd)
    w = pathlib.Path(cmd[cmd.index("--workdir") + 1])
    rng = np.random.default_rng(len(self.commands))
    if "--config.stages=('sft',)" in cmd:
      (w / "checkpoints" / "sft" / "2").mkdir(parents=True)
      (w / "eval_sft.json").write_text("{}")
      (w / "eval_sft_samples.jsonl").write_text("")
      (w / "tokenizer.json").write_text("{}")
      (w / "metrics.jsonl").write_text(json.dumps({"stage": "sft", "step": 1, "loss": 1.0}) + "\n")
      return 0
    assert (w / "checkpoints" / "sft").is_dir() and (w / "eval_sft.json").exists()  # the SFT copied in first
    gt = {f"c{i}": _words(rng, 2) for i in range(12)}
    samples = [{"id": i, "mode": m, "sample": 0, "gt": gt[i], "words": _words(rng, 2)} for i in gt for m in
               ("slow", "fast")]
    res = {"sft": {m: {"precision": 0.5, "recall": 0.5, "f": 0.5} for m in ("slow", "fast")}, "rl": {}}
    for m in ("slow", "fast"):
      ov = metrics.ov_score([s["gt"] for s in samples if s["mode"] == m], [s["words"] for s in samples
                                                                           if s["mode"] == m])
      res["rl"][m] = {k: ov[k] for k in ("precision", "recall", "f")}
    (w / "eval_rl_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    with (w / "metrics.jsonl").open("a") as f:
      f.write(json.dumps({"stage": "rl", "step": 1, "probe/rho": 0.1, "probe/grad_cos": 0.2}) + "\n")
    (w / "results.json").write_text(json.dumps(res))
    return 0


def test_a_half_done_grid_resumes_without_redoing_a_cell(tmp_path):
  fake = FakeTrainer()
  argv = ["--presets", "rd,rd_ad", "--seeds", "0,1", "--out", str(tmp_path), "--no_reasoning_check"]
  first = ablation.main(argv + ["--max_cells", "3"], run=fake)
  assert first == {"ran": ["0/sft", "1/sft", "0/rd"], "complete": False}
  assert not (tmp_path / "ablation.md").exists()
  second = ablation.main(argv, run=fake)
  assert second["complete"] and second["ran"] == ["0/rd_ad", "1/rd", "1/rd_ad"]  # nothing done twice
  assert len(fake.commands) == 6
  for cmd in fake.commands:
    seed = int(cmd[[c.startswith("--config.seed=") for c in cmd].index(True)].split("=")[1])
    assert f"--config.data.data_dir={tmp_path}/seed{seed}/data" in cmd  # one prepared dataset per seed
    assert "--config.rl.probe_every=20" in cmd and "--config.checkpoint.export_hf=False" in cmd
  assert [c[c.index("--config") + 1].split(":ablation=")[1] for c in fake.commands[2:]] == ["rd", "rd_ad", "rd",
                                                                                           "rd_ad"]
  summary = json.loads((tmp_path / "ablation.json").read_text())
  assert set(summary["rows"]) == {"rd", "rd_ad"} and summary["rows"]["rd"]["seeds"] == [0, 1]
  assert set(summary["paired"]) == {"rd_ad_vs_rd_slow", "rd_ad_vs_rd_fast"}
  assert (tmp_path / "ablation.png").exists() and (tmp_path / "interference.png").exists()
  assert "| rd_ad vs rd | slow |" in (tmp_path / "ablation.md").read_text()
  third = ablation.main(argv, run=fake)  # everything done: no command runs, the report is rebuilt
  assert third["ran"] == [] and len(fake.commands) == 6


def test_a_second_grid_writes_its_own_section(tmp_path):
  fake = FakeTrainer()
  doc = tmp_path / "b.md"
  doc.write_text("# Benchmarks\n\n## Other\nkeep\n")
  base = ["--out", str(tmp_path / "grid"), "--no_reasoning_check", "--write", str(doc)]
  ablation.main(["--presets", "rd,rd_ad", "--seeds", "0,1", *base], run=fake)
  ablation.main(["--presets", "mer_r1,sfcc_word", "--seeds", "0", *base, "--section", "## Ablation: SFCC variants"],
                run=fake)
  text = doc.read_text()
  core, variants = text.index("## Ablation\n"), text.index("## Ablation: SFCC variants\n")
  assert "## Other\nkeep\n" in text and core < variants
  assert "| rd_ad vs rd | slow |" in text[core:variants] and "sfcc_word" not in text[core:variants]
  assert "| sfcc_word vs mer_r1 | slow |" in text[variants:] and "--seeds 0 " in text[variants:]
  assert "--section '## Ablation: SFCC variants'" in text[variants:]  # the command as a shell reads it
  assert "MER-Synth version 1, noise 1.0 test split" in text[core:variants]  # the dataset each grid ran on


def test_a_grid_directory_refuses_other_flags_and_names_the_dataset_version(tmp_path):
  fake = FakeTrainer()
  doc = tmp_path / "b.md"
  base = ["--presets", "rd", "--seeds", "0", "--no_reasoning_check", "--write", str(doc)]
  ablation.main([*base, "--out", str(tmp_path / "v1")], run=fake)
  n = len(fake.commands)
  with pytest.raises(SystemExit, match="synth_version=2"):  # would reuse version 1's SFT under version 2
    ablation.main([*base, "--out", str(tmp_path / "v1"), "--config.data.synth_version=2"], run=fake)
  assert len(fake.commands) == n
  ablation.main([*base, "--out", str(tmp_path / "v2"), "--config.data.synth_version=2", "--section", "## V2"],
                run=fake)
  assert all("--config.data.synth_version=2" in c for c in fake.commands[n:]) and len(fake.commands) == n + 2
  text = doc.read_text()
  assert "MER-Synth version 1, noise 1.0 test split" in text[:text.index("## V2")]
  assert "MER-Synth version 2, noise 1.0 test split" in text[text.index("## V2"):]
