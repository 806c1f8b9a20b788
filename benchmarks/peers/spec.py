"""The one GRPO configuration all three implementations run, and the helpers their scripts share.

Standard library only: this module is imported by our script (project venv) and by the TRL and Tunix scripts
(each in its own venv under .venvs/), so nothing here may import jax, torch or merr1_jax.

The work (issue 10): P = 4 prompts of exactly 128 tokens, G = 8 samples each (B = 32 rows), 64 new tokens at
temperature 1.0 with EOS ignored (every row decodes exactly 64 tokens in all three, so no one is flattered by an
early stop), beta 0.04 with a frozen reference model and the k3 KL estimator, one optimizer update per batch
(the behaviour policy is the current one: no separate old-log-prob pass), AdamW, float32 on the CPU, the same
reward (`reward`), the same tokenizer and the same random-init weights (exported once by prepare.py as a HF Qwen2
checkpoint that every side loads).

A script prints one JSON line prefixed with RESULT_TAG and also writes it to --out: per timed step the wall
time of the whole step, from the end of the previous step to the end of this one (StepClock: the same
measurement in all three, not a sum of phases), and separately the generation, the scoring (reference log-probs
+ rewards + advantages) and the update, the generated token count, plus the library versions. Warm-up steps
(compilation, caches) are run and dropped.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time

NUM_PROMPTS = 4
PROMPT_LEN = 128
GROUP = 8
NEW_TOKENS = 64
TEMPERATURE = 1.0
BETA = 0.04
LEARNING_RATE = 1e-6
EPSILON = 0.2  # PPO clip (inactive with one update per batch: the ratio is 1, kept for parity)
SEED = 0
WARMUP_STEPS = 1
TIMED_STEPS = 3
RESULT_TAG = "PEER_RESULT "

# Model: the small_20m preset's decoder, text only (no projectors), vocab padded to 8192 by the tokenizer.
MODEL = dict(vocab_size=8192, d_model=384, num_layers=10, num_heads=6, num_kv_heads=2, head_dim=64, mlp_dim=1024,
             rope_theta=10_000.0, rms_eps=1e-6, tie_embeddings=True, max_seq_len=512)

HERE = os.path.dirname(os.path.abspath(__file__))
WORK_DIR = os.path.join(HERE, ".work")
CKPT_DIR = os.path.join(WORK_DIR, "model")  # model.safetensors + config.json + tokenizer.json
PROMPTS_FILE = os.path.join(WORK_DIR, "prompts.json")  # {"texts": [...], "ids": [[...128 ids], ...]}


def reward(text: str) -> float:
  """A cheap string check that still spreads within a group: the fraction of the five vowels the text uses."""
  return len(set(text.lower()) & set("aeiou")) / 5.0


def load_prompts(path: str = PROMPTS_FILE) -> dict:
  with open(path) as f:
    prompts = json.load(f)
  if len(prompts["ids"]) != NUM_PROMPTS or any(len(p) != PROMPT_LEN for p in prompts["ids"]):
    raise ValueError(f"{path}: expected {NUM_PROMPTS} prompts of {PROMPT_LEN} ids; rerun benchmarks/peers/prepare.py")
  return prompts


def check_prompt_ids(ids_per_prompt, prompts: dict, who: str) -> None:
  """The peer's own tokenisation of the prompt texts must give the ids our side uses, or the work differs."""
  got = [list(map(int, ids)) for ids in ids_per_prompt]
  if got != prompts["ids"]:
    lens = [len(i) for i in got]
    raise ValueError(f"{who}: tokenising the prompt texts gave different ids (lengths {lens}) than prompts.json")


def peak_rss_mib() -> float:
  """This process's peak resident set (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StepClock:
  """Per-step wall clock, measured the same way in all three scripts.

  A step's `step_s` is the wall time from the end of the previous step (or `begin()`, for the first step) to its
  own end (`lap()`): everything the training loop does, end to end, whatever overlaps inside it. Named phases
  (`add`: generation, scoring, update) accumulate between two laps and are reported beside it; they are not
  summed into step_s."""

  def __init__(self):
    self.steps: list[dict] = []
    self._cur: dict = {}
    self._last: float | None = None

  def begin(self):
    """Starts the clock right before the training loop (the first step then includes the loop's own setup,
    which the warm-up drops)."""
    self._cur, self._last = {}, time.perf_counter()

  def add(self, name: str, seconds: float):
    self._cur[name] = self._cur.get(name, 0.0) + seconds

  def lap(self, **extra):
    if self._last is None:
      raise RuntimeError("StepClock.lap before begin()")
    now = time.perf_counter()
    self._cur["step_s"] = now - self._last
    self._last = now
    self._cur.update(extra)
    self.steps.append(self._cur)
    self._cur = {}


def summarise(steps: list[dict], warmup: int) -> dict:
  """Medians of each phase over the timed steps (warm-up dropped)."""
  timed = steps[warmup:]
  if not timed:
    raise ValueError(f"no timed steps: {len(steps)} steps run, {warmup} warm-up")
  keys = sorted({k for s in timed for k in s})
  return {k: statistics.median(s[k] for s in timed if k in s) for k in keys}


def emit(who: str, steps: list[dict], warmup: int, out: str | None, **info) -> dict:
  med = summarise(steps, warmup)
  result = dict(impl=who, median=med, steps=steps, warmup=warmup, peak_rss_mib=peak_rss_mib(),
                python=sys.version.split()[0], machine=platform.machine(), pid=os.getpid(), **info)
  line = json.dumps(result)
  print(RESULT_TAG + line, flush=True)
  if out:
    with open(out, "w") as f:
      f.write(line + "\n")
  return result


def arg_parser(description: str):
  import argparse
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--warmup", type=int, default=WARMUP_STEPS)
  ap.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps after the warm-up")
  ap.add_argument("--out", default=None, help="write the result JSON here too")
  ap.add_argument("--ckpt", default=CKPT_DIR)
  ap.add_argument("--prompts", default=PROMPTS_FILE)
  return ap
