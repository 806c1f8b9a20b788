"""Side-by-side GRPO step times: merr1_jax against TRL and Tunix on the same work (benchmarks/peers/spec.py).

  bash benchmarks/peers/setup.sh            # once: the peers' own virtualenvs under benchmarks/peers/.venvs/
  python benchmarks/compare.py [--workload peer|mer] [--rounds 3] [--warmup 1] [--steps 2] [--impls ours,trl,tunix]
      [--no_docs]

--workload picks one of spec.WORKLOADS: 'peer' (the default; 4 prompts of 128 text tokens, 8 rows of 64 new
tokens, the shape all three support natively) or 'mer' (the shape of a MER-R1 step: 4 prompts of 1024 tokens, 4
slow completions of 128 and 4 fast ones of 16 per prompt; spec.py says what each side runs for it, since neither
peer takes our video/audio features or decodes rows of different lengths in one batch). Each workload has its
own goals (TARGETS) and its own docs section (Workload.section), so running one never replaces the other's.

Prepares the shared checkpoint, tokenizer and prompts (peers/prepare.py), then runs the implementations in turn,
alternating A B C A B C ... for --rounds rounds, each run a fresh process (warm-up steps dropped inside it). For
every figure (end-to-end step, generation, scoring = reference log-probs + rewards + advantages, update,
generated tokens/s) it prints the median over rounds of each run's median and the min-max over rounds, our
speed-up against each peer (median of the per-round ratios of step times, so load drift on a shared machine
moves both sides alike; every round's own ratio is listed too), and each process's peak resident memory
(wait4's ru_maxrss). Step times are wall clock from step end to step end in all three (spec.StepClock).

With docs on, the table, the machine (CPU, cores, load average at the start and at the end of the run), the
date, the peer environments (each venv's pip freeze checked against benchmarks/peers/requirements-*.txt) and the
exact commands replace the workload's section of docs/benchmarks/peers.md ('## Peers', '## Peers: MER workload';
appended if absent); --note adds a line about the run's conditions, printed as given. Everything in the section
comes from this script, so the next run replaces all of it. A peer that fails is reported with the tail of its
log; the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, "benchmarks", "peers")
sys.path.insert(0, PEERS)
import spec  # noqa: E402
import report_util  # noqa: E402 - benchmarks/ is on sys.path when run as a script

FIGURES = (("step_s", "step"), ("gen_s", "generate"), ("score_s", "ref + reward"), ("update_s", "update"))
NAMES = {"ours": "merr1_jax (ours)", "trl": "TRL", "tunix": "Tunix"}
# End-to-end step speed-up goals on the CPU, per workload (issue 10; the MER workload's from its own issue).
TARGETS = {"peer": {"trl": 5.0, "tunix": 1.5}, "mer": {"trl": 5.0, "tunix": 2.0}}


def python_for(impl: str) -> str:
  if impl == "ours":
    return sys.executable
  py = os.path.join(PEERS, ".venvs", impl, "bin", "python")
  if not os.path.exists(py):
    raise FileNotFoundError(f"{py} is missing: run `bash benchmarks/peers/setup.sh {impl}` first")
  return py


def command(impl: str, warmup: int, steps: int, out: str, workload: str = spec.DEFAULT_WORKLOAD) -> list[str]:
  script = os.path.join(PEERS, f"{impl}_grpo.py")
  return [python_for(impl), script, "--workload", workload, "--warmup", str(warmup), "--steps", str(steps),
          "--out", out]


def run_one(cmd: list[str], log_path: str, timeout_s: float) -> tuple[int, float]:
  """Runs cmd with output to log_path; returns (exit status, peak RSS in MiB of that process).

  wait4 reaps the child and returns its own rusage; under `timeout` that rusage covers the benchmark process too
  (a reaped descendant's peak counts towards its parent's ru_maxrss)."""
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # the test suite's fake CPU devices must not leak into a benchmark
  with open(log_path, "w") as log:
    proc = subprocess.Popen(["timeout", str(int(timeout_s))] + cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env)
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
      proc.kill()
      raise
    proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, usage.ru_maxrss / 1024.0


def tail(path: str, n: int = 6) -> str:
  with open(path, errors="replace") as f:
    lines = [l.rstrip() for l in f if l.strip() and "Warning" not in l]
  return "\n".join(lines[-n:])


def aggregate(results: dict[str, list[dict]]) -> dict:
  """Per impl and figure: median and min-max over rounds of each run's median; tokens/s likewise."""
  out = {}
  for impl, runs in results.items():
    ok = [r for r in runs if "median" in r]
    if not ok:
      continue
    fig = {}
    for key, _ in FIGURES:
      vals = [r["median"][key] for r in ok]
      fig[key] = (statistics.median(vals), min(vals), max(vals))
    tps = [r["median"]["gen_tokens"] / r["median"]["gen_s"] for r in ok]
    fig["gen_tok_s"] = (statistics.median(tps), min(tps), max(tps))
    rss = [r["peak_rss_mib"] for r in ok]
    fig["rss_mib"] = (statistics.median(rss), min(rss), max(rss))
    fig["gen_tokens"] = ok[0]["median"]["gen_tokens"]
    out[impl] = dict(fig=fig, runs=len(ok), versions=ok[0].get("versions", {}))
  return out


def speedups(results: dict[str, list[dict]], key: str = "step_s") -> dict[str, tuple[float, float, float]]:
  """ours vs each peer: per-round ratio peer / ours of `key`, median and min-max."""
  ours = results.get("ours", [])
  out = {}
  for impl, runs in results.items():
    if impl == "ours":
      continue
    ratios = [p["median"][key] / o["median"][key] for o, p in zip(ours, runs) if "median" in o and "median" in p]
    if ratios:
      out[impl] = (statistics.median(ratios), min(ratios), max(ratios))
  return out


def round_ratios(results: dict[str, list[dict]], impl: str, key: str = "step_s") -> list[float | None]:
  """Round by round, peer / ours of `key` (None for a round in which either side failed)."""
  return [p["median"][key] / o["median"][key] if "median" in o and "median" in p else None
          for o, p in zip(results.get("ours", []), results.get(impl, []))]


def pins_file(impl: str) -> str:
  return os.path.join(PEERS, f"requirements-{impl}.txt")


def _pin_set(lines) -> set[str]:
  """'name==version' lines -> a set with PEP 503 names; comments, blanks and pip/setuptools/wheel dropped."""
  out = set()
  for line in lines:
    line = line.split("#", 1)[0].strip()
    if "==" not in line:
      continue
    name, version = line.split("==", 1)
    name = re.sub(r"[-_.]+", "-", name.strip()).lower()
    if name not in ("pip", "setuptools", "wheel"):
      out.add(f"{name}=={version.strip()}")
  return out


def peer_env(impl: str) -> dict:
  """The peer venv's pip freeze (written by setup.sh) and whether it equals the committed pins exactly."""
  freeze = os.path.join(PEERS, ".venvs", f"{impl}.freeze.txt")
  if not os.path.exists(freeze):
    return {"freeze": None, "pins": os.path.relpath(pins_file(impl), ROOT), "matches_pins": None}
  with open(freeze) as f:
    lines = [l.strip() for l in f if l.strip()]
  with open(pins_file(impl)) as f:
    want = _pin_set(f)
  got = _pin_set(lines)
  return {"freeze": lines, "pins": os.path.relpath(pins_file(impl), ROOT), "matches_pins": got == want,
          "differences": sorted(got ^ want)}


def _mm(t, scale=1.0, fmt="{:.1f}") -> str:
  med, lo, hi = (x * scale for x in t)
  return f"{fmt.format(med)} ({fmt.format(lo)}-{fmt.format(hi)})"


def _work_text(wl: spec.Workload, model: dict) -> str:
  """The section's first paragraph: what the workload is on each side."""
  m = model
  common = (f"a Qwen2-style decoder of {m['params'] / 1e6:.1f}M parameters (vocab {m['vocab']}, d_model "
            f"{m['d_model']}, {m['layers']} layers, {m['heads']} heads, {m['kv_heads']} KV heads, MLP {m['mlp']}), "
            "the same random-init weights (exported once as a HF checkpoint) and tokenizer")
  tail = (f"at temperature {spec.TEMPERATURE}, beta {spec.BETA} with a reference model (k3 KL), one update per "
          "batch, AdamW, float32 on the CPU.")
  if not wl.mixed_lengths and not (wl.video_rows or wl.audio_rows):
    (_, n, t), = wl.modes
    return (f"One GRPO step on the same work in merr1_jax, TRL and Tunix (benchmarks/peers/spec.py): {common}; "
            f"{wl.num_prompts} prompts of {wl.prompt_len} tokens, G = {n}, exactly {t} new tokens per row (EOS "
            f"ignored) {tail} Text only on our side.")
  modes = " + ".join(f"{n} {mode} completions of {t} new tokens" for mode, n, t in wl.modes)
  feats = wl.video_rows + wl.audio_rows
  return (f"One GRPO step of the {wl.name.upper()} workload in merr1_jax, TRL and Tunix (benchmarks/peers/spec.py, "
          f"`--workload {wl.name}`): {common}; {wl.num_prompts} prompts of {wl.prompt_len} tokens, G = {wl.group} = "
          f"{modes} per prompt (EOS ignored: {wl.gen_tokens} generated tokens per step) {tail} On our side "
          f"{feats} of each prompt's {wl.prompt_len} positions are video ({wl.video_rows}) and audio "
          f"({wl.audio_rows}) feature rows merged at placeholders (the library's multimodal path; random features, "
          "projectors freshly initialised, as they are not in the HF checkpoint), the fast rows are sampled in the "
          "library's fast mode (their own rollout, prompt + FAST_PREFIX) and the reference pass and the update are "
          "prefix-grouped with one segment per mode (the library default). TRL and Tunix take no such features: "
          f"they get all {wl.prompt_len} prompt tokens as text. Neither decodes rows of different lengths in one "
          f"batch: both decode every row to {wl.peer_new_tokens} new tokens, the mean, so the generated tokens are "
          f"the same ({wl.gen_tokens}) in fewer sequential decode steps ({wl.peer_new_tokens} where ours runs "
          f"{' + '.join(str(t) for _, _, t in wl.modes)}) and with shorter update sequences than padding every row "
          f"to {max(t for _, _, t in wl.modes)} would give.{tunix_micro_text(wl)}")


def tunix_micro_text(wl) -> str:
  """How Tunix's update is split, where the workload splits it (spec.Workload.tunix_micro_prompts)."""
  m = wl.tunix_micro_prompts
  if m is None or m == wl.num_prompts:
    return ""
  why = f" ({wl.tunix_micro_why})" if wl.tunix_micro_why else ""
  return (f" Tunix trains each step's {wl.rows} rows in micro-batches of {m} prompt{'s' * (m > 1)} "
          f"({m * wl.group} rows) with its gradient accumulation (train_micro_batch_size): the same rows and the "
          f"same single optimizer update, so the same work in less memory{why}; its generation and reference pass "
          "still take all rows at once.")


def markdown(agg: dict, sp: dict, sp_parts: dict, errors: dict, meta: dict) -> str:
  wl = spec.WORKLOADS[meta.get("workload", spec.DEFAULT_WORKLOAD)]
  targets = TARGETS[wl.name]
  lines = [wl.section, "", _work_text(wl, meta["model"]), "",
           f"Machine: {meta['cpu']}, {meta['cores']} cores, load average {_load(meta)}; {meta['date']}. "
           f"{meta['rounds']} rounds, implementations alternated in each round, each run a fresh process with "
           f"{meta['warmup']} warm-up step(s) dropped and {meta['steps']} timed; the step is wall clock from step "
           f"end to step end in all three, the phases are timed inside it; a cell is the median over rounds of each "
           f"run's median, with the min-max over rounds in brackets." + (f" Note: {meta['note']}" if
                                                                           meta.get("note") else ""), "",
           "| implementation | step s | generate s | ref + reward s | update s | generated tok/s | peak RSS MiB |",
           "|---|---|---|---|---|---|---|"]
  for impl in meta["impls"]:
    if impl not in agg:
      lines.append(f"| {NAMES[impl]} | failed: see below | | | | | |")
      continue
    f = agg[impl]["fig"]
    lines.append(f"| {NAMES[impl]} | {_mm(f['step_s'])} | {_mm(f['gen_s'])} | {_mm(f['score_s'])} | "
                 f"{_mm(f['update_s'])} | {_mm(f['gen_tok_s'], fmt='{:.0f}')} | {_mm(f['rss_mib'], fmt='{:.0f}')} |")
  lines.append("")
  for impl, t in sp.items():
    parts = ", ".join(f"{label} {sp_parts[impl][k][0]:.2f}x" for k, label in FIGURES[1:] if k in sp_parts.get(impl, {}))
    goal = targets.get(impl)
    verdict = ("" if goal is None else f" Goal >= {goal:.1f}x: " +
               ("met." if t[0] >= goal else f"**missed**, by a factor of {goal / t[0]:.2f}."))
    ratios = meta.get("round_ratios", {}).get(impl)
    rounds = (", ".join("failed" if r is None else f"{r:.2f}x" for r in ratios) if ratios else
              f"{t[1]:.2f}-{t[2]:.2f}x")
    lines.append(f"- Speed-up of the end-to-end step against {NAMES[impl]}: **{t[0]:.2f}x** (median of the "
                 f"per-round ratios; rounds {rounds}); by phase: {parts}.{verdict}")
  if any(t[0] < targets.get(i, 0) for i, t in sp.items()):
    lines.append("- Where the time goes, phase by phase, and what would close the gap: the '## RL step' section.")
  versions = "; ".join(f"{NAMES[i]}: " + ", ".join(f"{k} {v}" for k, v in a["versions"].items())
                       for i, a in agg.items())
  lines += ["", f"Versions: {versions}."]
  envs = meta.get("envs", {})
  if envs:
    lines += ["", "Peer environments: " + "; ".join(_env_line(i, e) for i, e in envs.items()) + "."]
  lines += ["", "Commands:", "", "```bash"] + meta["commands"] + ["```"]
  for impl, err in errors.items():
    lines += ["", f"{NAMES[impl]} failed ({err['runs']} of {meta['rounds']} runs):", "", "```", err["tail"], "```"]
  return "\n".join(lines) + "\n"


def _load(meta: dict) -> str:
  end = meta.get("load_end")
  return f"{meta['load']:.1f} at the start" + ("" if end is None else f", {end:.1f} at the end")


def _env_line(impl: str, env: dict) -> str:
  if env.get("freeze") is None:
    return f"{NAMES[impl]}: no .venvs/{impl}.freeze.txt (venv not built by setup.sh)"
  n = len(env["freeze"])
  if env["matches_pins"]:
    return f"{NAMES[impl]}: pip freeze ({n} packages) equals `{env['pins']}`"
  return f"{NAMES[impl]}: pip freeze ({n} packages) **differs** from `{env['pins']}`: {', '.join(env['differences'])}"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workload", default=spec.DEFAULT_WORKLOAD, choices=sorted(spec.WORKLOADS))
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=spec.WARMUP_STEPS)
  ap.add_argument("--steps", type=int, default=2, help="timed steps per run")
  ap.add_argument("--impls", default="ours,trl,tunix")
  ap.add_argument("--timeout_s", type=float, default=3600)
  ap.add_argument("--docs", default=os.path.join(ROOT, "docs", "benchmarks", "peers.md"))
  ap.add_argument("--no_docs", action="store_true")
  ap.add_argument("--skip_prepare", action="store_true", help="reuse benchmarks/peers/.work")
  ap.add_argument("--json", default=None, help="also write every run's result here")
  ap.add_argument("--from_json", default=None, help="re-render the report from a --json file; runs nothing")
  ap.add_argument("--note", default="", help="a line about the run's conditions, printed in the section as given")
  args = ap.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    return report(saved["results"], saved["meta"], None if args.no_docs else args.docs)
  impls = args.impls.split(",")
  for impl in impls:
    if impl not in NAMES:
      raise ValueError(f"--impls: unknown {impl!r}; expected some of {','.join(NAMES)}")
    python_for(impl)
  load = os.getloadavg()[0]
  logs = os.path.join(spec.WORK_DIR, "logs")
  os.makedirs(logs, exist_ok=True)
  prep_cmd = [sys.executable, os.path.join(PEERS, "prepare.py")]
  if not args.skip_prepare:
    subprocess.run(prep_cmd, check=True, cwd=ROOT)
  with open(os.path.join(spec.WORK_DIR, "model_info.json")) as f:
    model_info = json.load(f)
  results = {i: [] for i in impls}
  errors = {}
  for rnd in range(args.rounds):
    for impl in impls:
      out = os.path.join(logs, f"{args.workload}_{impl}_{rnd}.json")
      log = os.path.join(logs, f"{args.workload}_{impl}_{rnd}.log")
      if os.path.exists(out):
        os.remove(out)
      rc, rss = run_one(command(impl, args.warmup, args.steps, out, args.workload), log, args.timeout_s)
      if rc == 0 and os.path.exists(out):
        with open(out) as f:
          res = json.load(f)
        res["peak_rss_mib"] = rss  # from wait4: the whole process, as the OS saw it
        results[impl].append(res)
        print(f"round {rnd} {impl}: step {res['median']['step_s']:.2f}s gen {res['median']['gen_s']:.2f}s "
              f"score {res['median']['score_s']:.2f}s update {res['median']['update_s']:.2f}s rss {rss:.0f}MiB",
              flush=True)
      else:
        results[impl].append({"error": rc})
        err = errors.setdefault(impl, {"runs": 0})
        err["runs"] += 1
        err["tail"] = tail(log)
        print(f"round {rnd} {impl}: FAILED (exit {rc}), log {log}:\n{err['tail']}", flush=True)
  rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
  cmds = [f"bash {rel(os.path.join(PEERS, 'setup.sh'))}",
          f"python {rel(os.path.abspath(__file__))} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
          "# which runs, per round and implementation:"]
  cmds += [" ".join(rel(c) if c.startswith(ROOT) else c
                    for c in command(i, args.warmup, args.steps, "X.json", args.workload)) for i in impls]
  cmds = [c.replace(rel(sys.executable), "python") for c in cmds]
  meta = dict(cpu=report_util.cpu_name(), cores=os.cpu_count(), load=load, load_end=os.getloadavg()[0],
              date=datetime.date.today().isoformat(), rounds=args.rounds, warmup=args.warmup, steps=args.steps,
              impls=impls, commands=cmds, model=model_info, note=args.note, workload=args.workload,
              envs={i: peer_env(i) for i in impls if i != "ours"})
  meta["errors"] = errors
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(results=results, meta=meta), f, indent=1)
  return report(results, meta, None if args.no_docs else args.docs)


def report(results: dict[str, list[dict]], meta: dict, docs: str | None) -> dict:
  """Aggregates, prints the markdown and, with `docs`, writes it as the workload's section ('## Peers' for
  'peer', also for a --json saved before there were workloads)."""
  agg = aggregate(results)
  sp = speedups(results)
  meta = {**meta, "round_ratios": {i: round_ratios(results, i) for i in results if i != "ours"}}
  for impl, env in meta.get("envs", {}).items():
    if env.get("freeze"):
      print(f"# {impl} venv, pip freeze ({'equals' if env['matches_pins'] else 'DIFFERS from'} {env['pins']}):\n  "
            + "\n  ".join(env["freeze"]))
  sp_parts = {i: {k: speedups(results, k)[i] for k, _ in FIGURES if i in speedups(results, k)} for i in sp}
  md = markdown(agg, sp, sp_parts, meta.get("errors", {}), meta)
  print("\n" + md)
  if docs:
    report_util.write_section(docs, spec.WORKLOADS[meta.get("workload", spec.DEFAULT_WORKLOAD)].section, md)
  return dict(results=results, aggregate=agg, speedups=sp, markdown=md)


if __name__ == "__main__":
  main()
