"""Smoke checks for the benchmark scripts: they import, our side runs one tiny round, and the bookkeeping
(aggregation, speed-ups, the docs section, the FLOP count) matches hand calculations. No peer is installed here."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "peers"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare  # noqa: E402
import rl_step  # noqa: E402
import spec  # noqa: E402


def test_peer_scripts_import_without_their_libraries():
  # trl_grpo / tunix_grpo import torch / tunix inside main() only: importable in the project venv.
  for name in ("prepare", "ours_grpo", "trl_grpo", "tunix_grpo"):
    mod = importlib.import_module(name)
    assert callable(mod.main), name


def test_reward_is_the_vowel_fraction():
  assert spec.reward("") == 0.0
  assert spec.reward("xyz") == 0.0
  assert spec.reward("Apple") == pytest.approx(2 / 5)  # a, e
  assert spec.reward("education") == pytest.approx(1.0)


def test_rl_step_one_tiny_round_all_variants(tmp_path):
  out = tmp_path / "rows.json"
  rows = rl_step.main(["--presets", "tiny", "--variants", "shared,repeated,mm", "--prompts", "2", "--prompt_len",
                       "32", "--group", "2", "--new_tokens", "8", "--mm_frames", "3", "--mm_audio", "2",
                       "--warmup", "0", "--repeats", "1", "--json", str(out)])
  assert [r["variant"] for r in rows] == ["shared", "repeated", "mm"]
  for r in rows:
    m = r["median"]
    assert m["gen_tokens"] == 2 * 2 * 8  # no stop id: every row decodes exactly new_tokens
    assert m["seq_len"] == 32 + 8
    for k in ("gen_s", "ref_s", "reward_s", "update_s"):
      assert m[k] > 0, k
    assert m["step_s"] >= m["gen_s"] + m["ref_s"] + m["update_s"]
    assert "update_mfu" not in r and "gen_vs_bound" not in r  # CPU: no peak FLOP/s or HBM figure
  assert out.exists()


def test_update_flops_hand_count():
  cfg = rl_step.presets.get("tiny", vocab_size=100)
  # tiny: d 128, H 4, K 2, Dh 32, F 384, 2 layers. Per layer: q,o 2*128*4*32 = 32768; k,v 2*128*2*32 = 16384;
  # mlp 3*128*384 = 147456 -> 196608; x2 layers = 393216, + head 128*100 = 406_016 matmul params.
  b, s = 3, 10
  want = b * s * (6 * 406_016 + 6 * 2 * 4 * 32 * s)
  assert rl_step.update_flops(cfg, b, s) == want


def _run(step, gen, score, update, tokens=64.0, rss=100.0):
  return {"median": {"step_s": step, "gen_s": gen, "score_s": score, "update_s": update, "gen_tokens": tokens},
          "peak_rss_mib": rss, "versions": {}}


def test_aggregate_and_speedups():
  results = {"ours": [_run(2.0, 1.0, 0.5, 0.5), _run(4.0, 2.0, 1.0, 1.0), _run(3.0, 1.0, 1.0, 1.0)],
             "trl": [_run(10.0, 8.0, 1.0, 1.0), _run(12.0, 8.0, 2.0, 2.0), {"error": 1}]}
  agg = compare.aggregate(results)
  assert agg["ours"]["fig"]["step_s"] == (3.0, 2.0, 4.0)
  assert agg["ours"]["fig"]["gen_tok_s"] == (64.0, 32.0, 64.0)  # 64/1, 64/2, 64/1
  assert agg["trl"]["runs"] == 2 and agg["trl"]["fig"]["step_s"] == (11.0, 10.0, 12.0)
  sp = compare.speedups(results)
  assert sp["trl"] == (4.0, 3.0, 5.0)  # per-round ratios 10/2 = 5 and 12/4 = 3; the failed round is dropped


def test_write_section_replaces_only_its_own(tmp_path):
  doc = tmp_path / "b.md"
  doc.write_text("# Benchmarks\n\n## Rollout\nkeep me\n\n## Peers\nold\n\n## Other\nkeep too\n")
  compare.write_section(str(doc), "## Peers", "## Peers\nnew\n")
  text = doc.read_text()
  assert "old" not in text and "## Peers\nnew\n" in text
  assert text.index("## Rollout") < text.index("## Peers") < text.index("## Other")
  assert "keep me" in text and "keep too" in text
  compare.write_section(str(doc), "## RL step", "## RL step\nrows\n")
  assert doc.read_text().endswith("## RL step\nrows\n")


def test_gpu_script_is_valid_bash():
  subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu.sh")], check=True)
