"""Smoke checks for the benchmark scripts: they import, our side runs one tiny round (and the update breakdown),
and the bookkeeping (aggregation, speed-ups, verdicts, the docs section, the step clock) matches hand
calculations; the FLOP count matches XLA's own cost analysis. No peer is installed here, and nothing here is a
performance figure (no timing is asserted)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.locks import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "peers"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import compare  # noqa: E402
import report_util  # noqa: E402
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
    assert m["seq_len"] == 32 + 8 and m["rows"] == 4
    assert m["loss_positions"] == 8  # loss_start = L - 1: only the completion columns are unembedded
    assert m["decode_steps"] == 8 and m["decode_tokens"] == 4 * 7  # token 0 comes from the prefill logits
    for k in ("gen_s", "ref_s", "reward_s", "update_s", "prefill_s", "decode_s"):
      assert m[k] > 0, k
    assert m["step_s"] >= m["gen_s"] + m["ref_s"] + m["update_s"]
    assert r["update_flops_ungrouped"] == rl_step.update_flops(
        rl_step.build("tiny", "float32", r["variant"] == "mm").config, 4, 40, 8)
    # The grouped update computes each prompt once; the repeated variant has one row per prompt: no saving.
    grouped_less = r["update_flops"] < r["update_flops_ungrouped"]
    assert r["update_flops"] == r["median"]["update_flops_grouped"] and grouped_less == (r["variant"] != "repeated")
    assert "update_mfu" not in r and "decode_vs_bound" not in r  # CPU: no peak FLOP/s or HBM figure
    assert "train states built in this process" in r["peak_device_scope"]  # several variants alive: said so
  assert json.loads(out.read_text())[0]["variant"] == "shared"


def test_rl_step_mer_shape_one_loop_against_the_measured_bounds(monkeypatch):
  import bounds
  real = bounds.measure
  monkeypatch.setattr(bounds, "measure", lambda: real(repeats=1, mib=16))  # small and quick: the plumbing only
  rows = rl_step.main(["--presets", "tiny", "--variants", "shared", "--prompts", "2", "--prompt_len", "32",
                        "--group", "2", "--new_tokens", "6", "--fast_group", "2", "--fast_new_tokens", "3",
                        "--bounds", "--warmup", "0", "--repeats", "1", "--attention", "reference,blocked"])
  assert [r["attention"] for r in rows] == ["reference", "blocked"]  # each kernel its own row, same work
  assert rows[0]["update_flops"] == rows[1]["update_flops"]
  for r in rows:
    m = r["median"]
    assert m["rows"] == 8 and m["gen_tokens"] == 2 * 2 * 6 + 2 * 2 * 3
    assert m["decode_steps"] == 6  # both modes in one loop: the longer budget, not 6 + 3
    assert m["decode_tokens"] == m["gen_tokens"] - 8 and m["prefill_s"] > 0
    assert r["update_flops_s"] > 0 and 0 < r["update_vs_matmul_rate"]
    assert r["decode_binding"] in ("memory", "compute")
    assert r["decode_vs_machine_bound"] == pytest.approx(r["decode_step_s"] / r["decode_step_bound_s"])
  with pytest.raises(ValueError, match="--attention: unknown"):
    rl_step.attention_kinds("reference,splash")


def test_rl_step_breakdown_reports_every_part(tmp_path):
  rows = rl_step.main(["--breakdown", "--presets", "tiny", "--prompts", "2", "--prompt_len", "16", "--group", "2",
                       "--new_tokens", "4", "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "b.json")])
  (row,) = rows
  assert list(row["parts"]) == list(rl_step.BREAKDOWN_PARTS)
  assert all(v > 0 for v in row["parts"].values())
  assert (row["rows"], row["seq_len"], row["loss_positions"]) == (4, 20, 4)
  from merr1_jax.models import layers
  assert rl_step.qwen2.attention is layers.attention  # the identity patch is undone
  assert rl_step.qwen2.attention_grouped is layers.attention_grouped
  with pytest.raises(ValueError, match="unknown"):
    rl_step.main(["--breakdown", "--breakdown_parts", "hidden,nope", "--presets", "tiny"])


def _xla_flops(v: int, b: int, length: int, t: int, loss_start: int) -> tuple[float, float]:
  """(XLA cost-analysis FLOPs of the compiled RL loss value+gradient, update_flops) on the tiny preset."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from merr1_jax import rl
  from merr1_jax.training import batch_loss
  from merr1_jax.training import step as ts
  from tests.oracles import ungrouped
  cfg = rl_step.presets.get("tiny", vocab_size=v, video_dim=0, audio_dim=0)  # no scan, no remat: counts are flat
  model = rl_step.mllm.build(cfg)
  params = model.init_params(jax.random.key(0))
  work = rl_step.Work(prompts=b, prompt_len=length, group=1, new_tokens=t)
  ro = rl_step.synthetic_rollout(cfg, work, np.random.RandomState(2))
  # The library's batch with the prompt ending at column loss_start (the rows cut there: ungrouped.as_grouped).
  batch = ungrouped.assemble([ro], np.ones(b, np.float32), pad_id=0, ref_logp=[np.zeros((b, t), np.float32)])
  batch = ungrouped.as_grouped(jax.tree.map(jnp.asarray, batch.replace(behaviour_logp=None, loss_start=loss_start)))
  loss_fn = batch_loss.make_grouped_loss(model, ts.StepConfig(loss=rl.LossConfig(kl_estimator="k3"), beta=0.04))
  grad = jax.value_and_grad(lambda p: loss_fn(p, batch, 0.04)[0])
  cost = jax.jit(grad).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  s = length + t
  return cost["flops"], rl_step.update_flops(cfg, b, s, s - 1 - loss_start)


def test_update_flops_match_xla_cost_analysis():
  # An independent count: XLA's HloCostAnalysis of the compiled loss gradient (2 FLOPs per multiply-add). It also
  # counts elementwise work (norms, softmax, the optimizer-free loss) and computes attention over the full S x S
  # rather than the causal half, so it sits a few percent above the model-FLOP count, never below.
  v, b, length, t = 2048, 2, 16, 8
  full, want_full = _xla_flops(v, b, length, t, loss_start=0)  # every position unembedded: S - 1 = 23
  cut, want_cut = _xla_flops(v, b, length, t, loss_start=length - 1)  # the trainer: T = 8 loss positions
  for got, want in ((full, want_full), (cut, want_cut)):
    assert 1.0 <= got / want < 1.08, (got, want)
  # The LM head term alone: moving loss_start by 15 columns removes 15 x B positions x 6 x D x V FLOPs, in XLA's
  # count and in ours. The old formula (head on all S positions) would predict no change at all.
  head = 6 * 128 * v * b * 15
  assert want_full - want_cut == head
  assert (full - cut) / head == pytest.approx(1.0, abs=0.03)


def test_update_flops_by_hand():
  cfg = rl_step.presets.get("tiny", vocab_size=100)
  # tiny: d 128, H 4, K 2, Dh 32, F 384, 2 layers. Per layer: q,o 2*128*4*32 = 32768; k,v 2*128*2*32 = 16384;
  # mlp 3*128*384 = 147456 -> 196608 per layer, 393216 for 2. B = 3, S = 10, loss on the last 4 positions.
  decoder = 6 * 393_216 * 10  # per sequence
  attention = 6 * 2 * 4 * 32 * 10 * 10
  head = 6 * 128 * 100 * 4
  assert rl_step.update_flops(cfg, 3, 10, 4) == 3 * (decoder + attention + head)
  assert rl_step.update_flops(cfg, 3, 10) == 3 * (decoder + attention + 6 * 128 * 100 * 9)  # loss_start 0
  with pytest.raises(ValueError, match="loss_positions"):
    rl_step.update_flops(cfg, 3, 10, 10)


def test_decode_bound_by_hand():
  # 4 rows, each step reading 4000 bytes of weights + 20480 of KV: 4 tokens per 24480 bytes at 1 GB/s.
  assert rl_step.decode_bound_tok_s(4, 4000 + 20480, 1e9) == pytest.approx(4 * 1e9 / (4000 + 20480))


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
  doc.write_text("# Benchmarks\n\n## Rollout\nkeep me\n\n## Peers\nold\n\n## Peers: MER workload\nmer\n\n"
                 "## Other\nkeep too\n")
  report_util.write_section(str(doc), "## Peers", "## Peers\nnew\n")
  text = doc.read_text()
  assert "old" not in text and "## Peers\nnew\n" in text
  assert text.index("## Rollout") < text.index("## Peers") < text.index("## Other")
  assert "keep me" in text and "keep too" in text
  assert "## Peers: MER workload\nmer\n" in text  # a heading that starts like '## Peers' is another section
  report_util.write_section(str(doc), "## Peers: MER workload", "## Peers: MER workload\nnew mer\n")
  text = doc.read_text()
  assert "## Peers\nnew\n" in text and "## Peers: MER workload\nnew mer\n" in text and "\nmer\n" not in text
  report_util.write_section(str(doc), "## RL step", "## RL step\nrows\n")
  assert doc.read_text().endswith("## RL step\nrows\n")


def test_round_ratios_and_the_rendered_verdicts():
  results = {"ours": [_run(2.0, 1.0, 0.5, 0.5), _run(4.0, 2.0, 1.0, 1.0)],
             "trl": [_run(12.0, 8.0, 2.0, 2.0), _run(24.0, 16.0, 4.0, 4.0)],  # 6x both rounds: goal 5x met
             "tunix": [_run(2.4, 1.0, 0.5, 0.9), {"error": 1}]}  # 1.2x in round 0, round 1 failed
  assert compare.round_ratios(results, "trl") == [6.0, 6.0]
  assert compare.round_ratios(results, "tunix") == [pytest.approx(1.2), None]
  md = compare.report(results, _meta(note="quiet box"), None)["markdown"]
  assert "against TRL: **6.00x** (median of the per-round ratios; rounds 6.00x, 6.00x)" in md
  assert "Goal >= 5.0x: met." in md
  # Tunix: 1.2x against the 1.5x goal, missed by 1.5 / 1.2 = 1.25; the failed round is shown as failed.
  assert "against Tunix: **1.20x** (median of the per-round ratios; rounds 1.20x, failed)" in md
  assert "Goal >= 1.5x: **missed**, by a factor of 1.25." in md
  assert "Where the time goes" in md  # a missed goal points at the breakdown
  assert "load average 1.5 at the start, 2.5 at the end" in md and "(shared)" not in md
  assert "Note: quiet box" in md
  assert "TRL: pip freeze (2 packages) equals `benchmarks/peers/requirements-trl.txt`" in md
  assert "Tunix: pip freeze (1 packages) **differs** from" in md and "jax==0.1" in md
  assert "Tunix failed (1 of 2 runs)" in md


def _meta(**kw):
  model = dict(params=18.9e6, vocab=8192, d_model=384, layers=10, heads=6, kv_heads=2, mlp=1024)
  envs = {"trl": {"freeze": ["trl==1.16.0", "torch==2.13.0+cpu"], "pins": "benchmarks/peers/requirements-trl.txt",
                  "matches_pins": True, "differences": []},
          "tunix": {"freeze": ["jax==0.1"], "pins": "benchmarks/peers/requirements-tunix.txt", "matches_pins": False,
                    "differences": ["jax==0.1", "jax==0.10.2"]}}
  meta = dict(cpu="Test CPU", cores=2, load=1.5, load_end=2.5, date="2026-01-01", rounds=2, warmup=1, steps=2,
              impls=["ours", "trl", "tunix"], commands=["python benchmarks/compare.py"], model=model, envs=envs,
              errors={"tunix": {"runs": 1, "tail": "boom"}})
  return {**meta, **kw}


def test_from_json_rerenders_the_same_section(tmp_path):
  results = {"ours": [_run(2.0, 1.0, 0.5, 0.5)], "trl": [_run(3.0, 2.0, 0.5, 0.5)]}
  meta = _meta(impls=["ours", "trl"], errors={}, envs={}, load_end=None)
  saved = tmp_path / "run.json"
  saved.write_text(json.dumps(dict(results=results, meta=meta)))
  doc = tmp_path / "b.md"
  doc.write_text("# Benchmarks\n\n## Peers\nold\n\n## RL step\nkeep\n")
  out = compare.main(["--from_json", str(saved), "--docs", str(doc)])
  text = doc.read_text()
  assert out["markdown"] in text and "old" not in text and "## RL step\nkeep\n" in text
  assert "against TRL: **1.50x**" in text and "**missed**, by a factor of 3.33" in text  # 5 / 1.5
  assert "load average 1.5 at the start;" in text  # an older run without the end load still renders
  assert compare.main(["--from_json", str(saved), "--no_docs"])["markdown"] == out["markdown"]


def test_peer_env_compares_the_freeze_with_the_pins(tmp_path, monkeypatch):
  monkeypatch.setattr(compare, "PEERS", str(tmp_path))
  (tmp_path / ".venvs").mkdir()
  (tmp_path / "requirements-trl.txt").write_text("# pins\nArray_Record==0.8.6\ntorch==2.13.0+cpu  # cpu\n")
  assert compare.peer_env("trl")["freeze"] is None
  (tmp_path / ".venvs" / "trl.freeze.txt").write_text("array-record==0.8.6\ntorch==2.13.0+cpu\nsetuptools==1\n")
  assert compare.peer_env("trl")["matches_pins"] is True  # names normalised, setuptools ignored
  (tmp_path / ".venvs" / "trl.freeze.txt").write_text("array-record==0.8.6\ntorch==2.13.0\n")
  env = compare.peer_env("trl")
  assert env["matches_pins"] is False and env["differences"] == ["torch==2.13.0", "torch==2.13.0+cpu"]


def test_step_clock_is_wall_clock_from_step_end_to_step_end(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(spec.time, "perf_counter", lambda: now[0])
  clock = spec.StepClock()
  with pytest.raises(RuntimeError, match="begin"):
    clock.lap()
  clock.begin()
  now[0] += 1.0  # loop overhead before the first phase: part of the step
  clock.add("gen_s", 2.0)
  now[0] += 4.0  # phases that took 2 s of a 4 s stretch (e.g. overlapping work)
  clock.lap(gen_tokens=8)
  now[0] += 3.0
  clock.add("gen_s", 1.0)
  clock.add("gen_s", 0.5)
  clock.lap()
  assert clock.steps == [{"gen_s": 2.0, "step_s": 5.0, "gen_tokens": 8}, {"gen_s": 1.5, "step_s": 3.0}]


def test_tunix_steps_end_at_the_optimizer_update_and_add_up_micro_batches(monkeypatch):
  import tunix_grpo
  now = [0.0]
  monkeypatch.setattr(spec.time, "perf_counter", lambda: now[0])
  clock = spec.StepClock()
  clock.begin()
  for step in range(2):  # Tunix's order per step: one scoring call (generation inside), then 2 micro-batches
    now[0] += 5.0 * (step == 0)  # time outside the phases (the loop's setup before step 0) stays in step_s
    for k, v in (("score_total_s", 5.0), ("score_calls", 1.0), ("gen_s", 3.0), ("gen_calls", 1.0),
                 ("ref_calls", 1.0), ("gen_tokens", 64.0)):
      clock.add(k, v)
    for micro, made in enumerate((0, 1)):  # only the last micro-batch makes the optimizer update
      now[0] += 2.0 + micro
      clock.add("update_s", 2.0 + micro)
      clock.add("update_calls", 1.0)
      tunix_grpo.end_update_call(clock, made)
  assert clock.pending() == {}  # nothing after the last update
  steps = [dict(s) for s in clock.steps]
  assert [s["step_s"] for s in steps] == [5.0 + 5.0, 5.0]  # updates 2 + 3 s, and the setup in step 0
  tunix_grpo.finish_steps(steps, calls_per_step=2)
  assert steps[1] == {"gen_s": 3.0, "gen_tokens": 64.0, "update_s": 5.0, "update_calls": 2.0, "step_s": 5.0,
                      "score_s": 2.0, "phases_s": 10.0, "score_calls": 1.0, "gen_calls": 1.0, "ref_calls": 1.0}
  with pytest.raises(RuntimeError, match="expected 0 or 1"):
    tunix_grpo.end_update_call(clock, 2)
  with pytest.raises(RuntimeError, match="step 0 made calls .*'update': 2.0}, expected .*'update': 4}"):
    tunix_grpo.finish_steps([dict(s) for s in clock.steps], calls_per_step=4)
  # Scoring split into micro-batches (one call per prompt): the counts differ though the times still add up.
  bad = [dict(s) for s in clock.steps]
  bad[1]["score_calls"] = bad[1]["gen_calls"] = 2.0
  with pytest.raises(RuntimeError, match="step 1 made calls {'score': 2.0, 'gen': 2.0"):
    tunix_grpo.finish_steps(bad, calls_per_step=2)
  bad = [dict(s) for s in clock.steps]
  del bad[1]["score_calls"]  # a step with updates but no scoring call
  with pytest.raises(RuntimeError, match="step 1 made calls {'score': 0.0"):
    tunix_grpo.finish_steps(bad, calls_per_step=2)
  # Generation and the reference pass take the step's rows in one batch, or the run stops.
  tunix_grpo.check_whole_batch("generate", 32, 32, 32)
  tunix_grpo.check_whole_batch("generate", 32, None, 32)
  with pytest.raises(RuntimeError, match="generate got 32 rows in micro-batches of 8; expected all 32"):
    tunix_grpo.check_whole_batch("generate", 32, 8, 32)
  with pytest.raises(RuntimeError, match="the reference pass got 8 rows"):
    tunix_grpo.check_whole_batch("the reference pass", 8, 8, 32)


def test_peer_pins_are_exact_and_torch_is_the_cpu_build():
  pins = {}
  for impl in ("trl", "tunix"):
    with open(os.path.join(ROOT, "benchmarks", "peers", f"requirements-{impl}.txt")) as f:
      lines = [l.split("#")[0].strip() for l in f if l.split("#")[0].strip()]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", l) for l in lines), impl
    pins[impl] = dict(l.split("==") for l in lines)
  assert pins["trl"]["trl"] == "1.16.0" and pins["trl"]["torch"] == "2.13.0+cpu"
  assert pins["trl"]["transformers"] == "5.24.0"  # the project's own
  assert pins["tunix"]["google-tunix"] == "0.1.7" and "torch" not in pins["tunix"]
  project = lock("3.11")
  assert pins["tunix"]["jax"] == project["jax"] and pins["tunix"]["flax"] == project["flax"]
  script = os.path.join(ROOT, "benchmarks", "peers", "setup.sh")
  subprocess.run(["bash", "-n", script], check=True)
  with open(script) as f:
    text = f.read()
  assert "--no-deps" in text and "torch.version.cuda" in text and "check_torch_cpu" in text


def test_gpu_script_is_valid_bash_and_pins_the_tested_newest_versions():
  path = os.path.join(ROOT, "benchmarks", "gpu.sh")
  subprocess.run(["bash", "-n", path], check=True)
  with open(path) as f:
    text = f.read()
  assert "<pinned>" not in text
  project = lock("3.12")  # the image's Python is 3.12
  for name in ("grain", "array-record", "ml-collections", "flax"):
    assert f"{name}=={project[name]}" in text, name
  assert "--python-version 3.12" in text and "cp312" in text


def _gpu_sh(tmp_path, fake: dict[str, str] = (), wheels: dict[str, str] = ()):
  """Runs benchmarks/gpu.sh on this lane's interpreter, with a preset that does not exist (it fails in the benchmark
  loop, is reported, and the script goes on). `fake`: {distribution: version} dist-info folders put ahead on
  PYTHONPATH (an image's versions, as the metadata reports them); `wheels`: {distribution: version} wheels
  holding only their metadata, in the folder the script installs from."""
  shim, site, whl = tmp_path / "bin", tmp_path / "image", tmp_path / "whl"
  for d in (shim, site, whl):
    d.mkdir()
  (shim / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
  (shim / "python3").chmod(0o755)
  for name, version in dict(fake).items():
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  for name, version in dict(wheels).items():
    import zipfile
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(whl / f"{stem}-py3-none-any.whl", "w") as z:
      z.writestr(f"{stem}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
      z.writestr(f"{stem}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                 "Tag: py3-none-any\n")
      z.writestr(f"{stem}.dist-info/RECORD", "")
  env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "OUT": str(tmp_path), "PRESETS": "no_such_preset",
         "VARIANTS": "shared", "JAX_PLATFORMS": "cpu", "WHEELS": str(whl),
         "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"}
  r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh")], env=env, capture_output=True,
                     text=True, timeout=300)
  return r, (tmp_path / "rl_step_gpu.txt").read_text()


def test_gpu_script_prologue_runs_here_and_reports_the_versions(tmp_path):
  """On this lane's own set nothing is missing: the versions are printed, the guard passes, the loop runs."""
  r, report = _gpu_sh(tmp_path)
  assert r.returncode == 0, r.stderr
  import jax
  assert f"jax {jax.__version__}" in report and "flax " in report and "installed from" not in report, report
  assert "rl_step.py --presets no_such_preset --variants shared FAILED" in report, report
  assert json.loads((tmp_path / "rl_step_gpu.json").read_text()) == []


def test_gpu_script_stops_on_a_broken_pair_it_has_no_wheel_for(tmp_path):
  r, report = _gpu_sh(tmp_path, fake={"jax": "0.11.2", "flax": "0.12.3"})
  assert r.returncode == 1
  assert "jax 0.11.2" in report and "flax 0.12.3" in report  # the versions, printed before anything else
  assert "flax 0.12.3 cannot run on jax 0.11.2" in report  # why flax is needed
  assert "gpu.sh: stopped: flax is needed" in report and "no flax wheel" in r.stderr
  assert "no_such_preset" not in report


def test_gpu_script_installs_the_carried_flax_over_the_images(tmp_path):
  """The image's flax 0.12.3 on jax 0.11.2 is replaced, for this run, by the carried 0.12.12: the guard passes."""
  r, report = _gpu_sh(tmp_path, fake={"jax": "0.11.2", "flax": "0.12.3"}, wheels={"flax": "0.12.12"})
  assert r.returncode == 0, r.stderr + report
  assert "installed from" in report and ": flax; now:" in report
  before, after = report.split(": flax; now:")
  assert "flax 0.12.3 optax" in before and "jax 0.11.2 jaxlib" in after and "flax 0.12.12 optax" in after
  assert "rl_step.py --presets no_such_preset --variants shared FAILED" in report, report


# ------------------------------------------------------------------------------------------ workloads


def test_workload_table():
  peer, mer = spec.WORKLOADS["peer"], spec.WORKLOADS["mer"]
  assert spec.DEFAULT_WORKLOAD == "peer"
  # peer: the original work, its prompts where they always were.
  assert (peer.num_prompts, peer.prompt_len, peer.modes, peer.group) == (4, 128, (("slow", 8, 64),), 8)
  assert peer.gen_tokens == 4 * 8 * 64 and peer.peer_new_tokens == 64 and not peer.mixed_lengths
  assert peer.section == "## Peers" and peer.prompts_file == spec.PROMPTS_FILE
  assert peer.prompts_file.endswith(os.path.join(".work", "prompts.json"))
  # mer: 4 x (4 slow of 128 + 4 fast of 16); the peers' equal-work length is the mean, 72.
  assert (mer.num_prompts, mer.prompt_len, mer.group, mer.rows) == (4, 1024, 8, 32)
  assert mer.modes == (("slow", 4, 128), ("fast", 4, 16)) and mer.mixed_lengths
  assert mer.gen_tokens == 4 * (4 * 128 + 4 * 16) == mer.rows * mer.peer_new_tokens and mer.peer_new_tokens == 72
  assert (mer.video_rows, mer.audio_rows) == (512, 256)  # 768 of the 1024 prompt positions are feature rows
  assert mer.section == "## Peers: MER workload" and mer.prompts_file.endswith("prompts_mer.json")
  assert spec.MODEL["max_seq_len"] >= mer.prompt_len + max(t for _, _, t in mer.modes) + 3  # + FAST_PREFIX
  # Tunix trains the mer batch one prompt per micro-batch (one update per step either way); peer all at once.
  assert (peer.tunix_micro_prompts, mer.tunix_micro_prompts) == (None, 1)
  with pytest.raises(ValueError, match="tunix_micro_prompts 3 must divide num_prompts 4"):
    spec.Workload("m", num_prompts=4, prompt_len=8, modes=(("slow", 2, 4),), tunix_micro_prompts=3)
  with pytest.raises(ValueError, match="split evenly"):
    spec.Workload("odd", num_prompts=1, prompt_len=8, modes=(("slow", 2, 3), ("fast", 1, 2)))
  with pytest.raises(ValueError, match="start with 'slow'"):
    spec.Workload("bad", num_prompts=1, prompt_len=8, modes=(("fast", 2, 4),))
  assert set(compare.TARGETS) == set(spec.WORKLOADS)
  assert compare.TARGETS["peer"] == {"trl": 5.0, "tunix": 1.5} and compare.TARGETS["mer"] == {"trl": 5.0, "tunix": 2.0}


def test_every_script_parses_workload_before_importing_its_library(monkeypatch):
  # Each script's main() goes through spec.parse first; a fake one stops it there (no torch / tunix needed).
  class Parsed(Exception):
    pass

  real = spec.parse

  def fake(description, argv=None, extra=None):
    args, wl = real(description, argv, extra)
    raise Parsed(args, wl)

  monkeypatch.setattr(spec, "parse", fake)
  for name in ("ours_grpo", "trl_grpo", "tunix_grpo"):
    mod = importlib.import_module(name)
    for argv, want in (([], "peer"), (["--workload", "mer", "--steps", "1"], "mer")):
      with pytest.raises(Parsed) as e:
        mod.main(argv)
      args, wl = e.value.args
      assert wl is spec.WORKLOADS[want] and args.prompts is None, name
    with pytest.raises(SystemExit):
      mod.main(["--workload", "nope"])
  with pytest.raises(Parsed) as e:
    importlib.import_module("tunix_grpo").main(["--workload", "mer", "--micro_prompts", "2"])
  assert e.value.args[0].micro_prompts == 2


def test_tunix_refuses_micro_batches_that_do_not_divide_the_prompts():
  import tunix_grpo  # the check runs before tunix or jax is imported
  with pytest.raises(ValueError, match="tunix_micro_prompts 3 must divide num_prompts 4"):
    tunix_grpo.main(["--workload", "mer", "--micro_prompts", "3"])


def test_ours_builds_the_mer_step_from_the_workload():
  import numpy as np
  import ours_grpo
  mer = spec.WORKLOADS["mer"]
  work = ours_grpo.make_work(mer, pad_id=0, fast_prefix_ids=[9, 10, 11], fast_ban_ids=(4, 5))
  assert work.modes == mer.modes and work.total_group == mer.group and work.shared_prefix
  assert (work.fast_prefix_ids, work.fast_ban_ids) == ((9, 10, 11), (4, 5))
  assert ours_grpo.make_work(spec.WORKLOADS["peer"], pad_id=0).modes == (("slow", 8, 64),)
  cfg = ours_grpo.model_config(mer)
  assert (cfg.video_dim, cfg.audio_dim) == (64, 64) and cfg.max_seq_len == spec.MODEL["max_seq_len"]
  assert cfg.attention == "blocked"  # our fastest exact CPU kernel (TRL runs SDPA)
  assert ours_grpo.model_config(spec.WORKLOADS["peer"]).video_dim == 0  # text only: the checkpoint's own model
  ids = np.random.RandomState(0).randint(16, 1000, (mer.num_prompts, mer.prompt_len))
  inputs = ours_grpo.prompt_inputs(mer, ids, cfg)
  assert ((inputs.tokens == cfg.video_token_id).sum(1) == 512).all()
  assert ((inputs.tokens == cfg.audio_token_id).sum(1) == 256).all()
  assert (inputs.tokens[:, 768:] == ids[:, 768:]).all() and inputs.video.shape == (4, 512, 64)
  assert inputs.audio.shape == (4, 256, 64) and inputs.tokens.shape == (4, 1024)
  text = ours_grpo.prompt_inputs(spec.WORKLOADS["peer"], ids[:, :128], ours_grpo.model_config(spec.WORKLOADS["peer"]))
  assert text.video is None and (text.tokens == ids[:, :128]).all()


def test_compare_runs_every_impl_on_the_chosen_workload(tmp_path, monkeypatch):
  work = tmp_path / "work"
  work.mkdir()
  (work / "model_info.json").write_text(json.dumps(_meta()["model"]))
  monkeypatch.setattr(spec, "WORK_DIR", str(work))
  monkeypatch.setattr(compare, "python_for", lambda impl: f"py-{impl}")
  monkeypatch.setattr(compare, "peer_env", lambda impl: {"freeze": None, "pins": "p", "matches_pins": None})
  seen = []

  def fake_run(cmd, log_path, timeout_s):
    seen.append(cmd)
    impl = os.path.basename(cmd[1]).split("_")[0]
    step = {"ours": 2.0, "trl": 12.0, "tunix": 3.0}[impl]
    out = cmd[cmd.index("--out") + 1]
    with open(out, "w") as f:
      json.dump(_run(step, 1.0, 0.5, 0.5), f)
    return 0, 100.0

  monkeypatch.setattr(compare, "run_one", fake_run)
  doc = tmp_path / "b.md"
  doc.write_text("# Benchmarks\n\n## Peers\nthe peer workload\n\n## RL step\nkeep\n")
  out = compare.main(["--workload", "mer", "--rounds", "1", "--warmup", "0", "--steps", "1", "--skip_prepare",
                      "--docs", str(doc)])
  assert [c[1].endswith(f"{i}_grpo.py") for c, i in zip(seen, ("ours", "trl", "tunix"))] == [True] * 3
  for cmd in seen:
    assert cmd[cmd.index("--workload") + 1] == "mer" and cmd[cmd.index("--steps") + 1] == "1"
    assert os.path.basename(cmd[cmd.index("--out") + 1]).startswith("mer_")  # its own logs: no clash with peer's
  md = out["markdown"]
  assert md.startswith("## Peers: MER workload\n") and "`--workload mer`" in md
  assert "every row to 72 new tokens" in md and "768 of each prompt's 1024 positions" in md
  assert "Tunix trains each step's 32 rows in micro-batches of 1 prompt (8 rows)" in md
  assert "against TRL: **6.00x**" in md and "Goal >= 5.0x: met." in md
  assert "against Tunix: **1.50x**" in md and "Goal >= 2.0x: **missed**, by a factor of 1.33." in md
  assert any("--workload mer" in c for c in out["markdown"].splitlines())  # the commands name the workload
  text = doc.read_text()
  assert "## Peers\nthe peer workload\n" in text and "## RL step\nkeep\n" in text and md in text
  # The default is still the peer workload, its own section and goals.
  seen.clear()
  out = compare.main(["--rounds", "1", "--warmup", "0", "--steps", "1", "--skip_prepare", "--no_docs"])
  assert all(c[c.index("--workload") + 1] == "peer" for c in seen)
  assert out["markdown"].startswith("## Peers\n\nOne GRPO step on the same work") and "Goal >= 1.5x" in out["markdown"]
  assert "micro-batches" not in out["markdown"]  # the peer workload trains all rows at once on every side


def test_rollout_benchmark_parts_run_and_sample_the_same_tokens_on_every_path():
  # benchmarks/rollout.py's (c) and (d) on a tiny model: every part runs, and the paths the docs compare (shared
  # and repeated cache; split and stacked layer weights; joint and per-mode generation) draw the same tokens.
  import jax

  from merr1_jax.models import mllm
  bench = importlib.import_module("rollout")
  model = mllm.build("tiny")
  params = model.init_params(jax.random.key(0))
  c = bench.bench_decode_cache(model, params, p=2, group=2, length=8, new_tokens=3, repeats=1, bounds=None)
  assert c["same_tokens"] and c["rows"] == 4
  for k in ("shared", "repeated"):
    assert set(c["steps"][k]) == {"loop", "loop_stacked", "decoder", "head_sampling", "dots", "stacked_ratio",
                                  "loop_over_dots"}
  m = bench.bench_modes(model, params, p=2, length=8, slow=(2, 3), fast=(2, 2), repeats=1)
  assert m["same_tokens"] and {"joint_s", "joint_stacked_s", "speedup_vs_stacked"} <= set(m)


def test_dot_inventory_counts_every_matmul_with_its_multiplicity():
  # bounds.dot_inventory on a hand-built function: a scan of length 3 runs its matmul 3 times, a cond counts
  # its costlier branch, an einsum with a batch axis is one dot_general with 2 b m k n FLOPs.
  import jax
  import jax.numpy as jnp

  import bounds
  x, w, v = jnp.ones((4, 5)), jnp.ones((5, 6)), jnp.ones((6, 7))
  bat, bat2 = jnp.ones((2, 3, 5)), jnp.ones((2, 5, 4))

  def fn(x, w, v, bat, bat2):
    h = x @ w
    h, _ = jax.lax.scan(lambda c, _: (c @ jnp.eye(6), None), h, None, length=3)
    y = jax.lax.cond(h[0, 0] > 0, lambda h: (h @ v) @ jnp.ones((7, 2)), lambda h: h @ jnp.ones((6, 2)), h)
    return y, jnp.einsum("bmk,bkn->bmn", bat, bat2)

  inv = bounds.dot_inventory(fn, x, w, v, bat, bat2)
  by_shape = {(k[0], k[1]): c for k, c in inv.items()}
  assert by_shape == {((4, 5), (5, 6)): 1, ((4, 6), (6, 6)): 3, ((4, 6), (6, 7)): 1, ((4, 7), (7, 2)): 1,
                      ((2, 3, 5), (2, 5, 4)): 1}
  batched = next(k for k in inv if k[0] == (2, 3, 5))
  assert bounds.dot_flops(*batched[:3]) == 2 * 2 * 3 * 5 * 4
  assert bounds.dot_flops((4, 5), (5, 6), (((1,), (0,)), ((), ()))) == 2 * 4 * 5 * 6
  with pytest.raises(ValueError, match="while loop"):
    bounds.dot_inventory(lambda y: jax.lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ jnp.eye(5), y),
                         jnp.ones((5, 5)))


@pytest.mark.parametrize("shared", [True, False])
def test_decode_steps_dots_do_the_flops_the_cost_model_counts(shared):
  # The decode bound the rollout benchmark states rests on throughput.decode_step_cost; the dots the traced
  # decode step really runs (every projection, both attention parts, the LM head) must add up to it exactly.
  import jax

  import bounds
  from merr1_jax import rollout as rollout_lib
  from merr1_jax.infra import throughput
  from merr1_jax.models import mllm
  from merr1_jax.rollout import sampling
  bench = importlib.import_module("rollout")
  model = mllm.build("tiny")
  params = model.init_params(jax.random.key(0))
  p, group, length, new = 2, 3, 8, 4
  spec_ = rollout_lib.DecodeSpec(sampling.Temperature(1.0), new, stop_ids=(), eos_id=None, ban_ids=(), pad_id=0,
                                 mrope=False)
  prefilled = rollout_lib.prefill(model, group, length + new, None, params, bench._prompts(
      model.config.vocab_size, p, length, seed=0), shared)
  s = rollout_lib.init_decode_state(spec_, *prefilled, jax.random.key(0))
  w = model.unembed_weight(params)
  inv = bounds.dot_inventory(lambda params, w, s: rollout_lib.decode_step(model, spec_, params, w, s), params, w, s)
  flops = sum(bounds.dot_flops(*k[:3]) * c for k, c in inv.items())
  assert flops == throughput.decode_step_cost(model.config, 0, p * group, length + new, 0, 4)[0]
  # The timing sums count x seconds per dot (plumbing only: no speed is asserted).
  b = bench.step_dot_bound(model, spec_, params, w, prefilled, jax.random.key(0), iters=2, repeats=1)
  assert b["flops"] == flops and len(b["dots"]) == len(inv)
  assert b["seconds"] == pytest.approx(sum(d["seconds"] for d in b["dots"])) and b["seconds"] > 0
  # The dots as one program: every occurrence with its own operands, `steps` times over, each output summed.
  fn, operands = bounds.dots_alone(inv, 2)
  assert len(operands) == sum(inv.values())
  expect = sum(float(jax.numpy.sum(jax.lax.dot_general(a + i, b, k[2]) if a.size <= b.size else
                                   jax.lax.dot_general(a, b + i, k[2])))
               for (a, b), k in zip(operands, [k for k, c in inv.items() for _ in range(c)]) for i in range(2))
  assert float(fn(operands)) == pytest.approx(expect, rel=1e-4, abs=1e-2)
