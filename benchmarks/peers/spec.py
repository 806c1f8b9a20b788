"""The GRPO configurations all three implementations run (one per workload), and the helpers their scripts share.

Standard library only: this module is imported by our script (project venv) and by the TRL and Tunix scripts
(each in its own venv under .venvs/), so nothing here may import jax, torch or merr1_jax.

Common to every workload (issue 10): temperature 1.0 with EOS ignored (every row decodes exactly its length in
all three, so no one is flattered by an early stop), beta 0.04 with a frozen reference model and the k3 KL
estimator, one optimizer update per batch (the behaviour policy is the current one: no separate old-log-prob
pass), AdamW, float32 on the CPU, the same reward (`reward`), the same tokenizer and the same random-init weights
(exported once by prepare.py as a HF Qwen2 checkpoint that every side loads).

The workloads (`WORKLOADS`, chosen with --workload in every script and in compare.py):
  peer  P = 4 prompts of exactly 128 text tokens, G = 8 samples each (B = 32 rows), 64 new tokens per row: the
        shape all three support natively.
  mer   the shape of a MER-R1 step: P = 4 prompts of 1024 tokens, G = 8 = 4 slow completions of 128 new tokens +
        4 fast completions of 16 (576 generated tokens per prompt). Our side gives 768 of the 1024 prompt
        positions to video (512) and audio (256) feature rows merged at placeholders (the library's multimodal
        path) and runs the fast rows in the library's fast mode (prompt + FAST_PREFIX); neither peer takes our
        features, so they get all 1024 prompt tokens as text. Neither peer can decode rows of different lengths
        in one batch either, so both decode every row to `peer_new_tokens` = 72, the mean of 128 and 16: the same
        generated tokens per group (8 x 72 = 4 x 128 + 4 x 16), in fewer sequential decode steps (72 rather than
        128 + 16) and with shorter sequences in their update than padding to 128 would give.

A script prints one JSON line prefixed with RESULT_TAG and also writes it to --out: per timed step the wall
time of the whole step, from the end of the previous step to the end of this one (StepClock: the same
measurement in all three, not a sum of phases), and separately the generation, the scoring (reference log-probs
+ rewards + advantages) and the update, the generated token count, plus the library versions. Warm-up steps
(compilation, caches) are run and dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

TEMPERATURE = 1.0
BETA = 0.04
LEARNING_RATE = 1e-6
EPSILON = 0.2  # PPO clip (inactive with one update per batch: the ratio is 1, kept for parity)
SEED = 0
WARMUP_STEPS = 1
TIMED_STEPS = 3
RESULT_TAG = "PEER_RESULT "

# Model: the small_20m preset's decoder, text only (no projectors), vocab padded to 8192 by the tokenizer.
# max_seq_len is a bound, not a weight: the cache-length check and HF's max_position_embeddings (unused by
# default RoPE); 2048 holds the mer workload's 1024 + 128 (the weights are the same as with the earlier 512).
MODEL = dict(vocab_size=8192, d_model=384, num_layers=10, num_heads=6, num_kv_heads=2, head_dim=64, mlp_dim=1024,
             rope_theta=10_000.0, rms_eps=1e-6, tie_embeddings=True, max_seq_len=2048)

HERE = os.path.dirname(os.path.abspath(__file__))
WORK_DIR = os.path.join(HERE, ".work")
CKPT_DIR = os.path.join(WORK_DIR, "model")  # model.safetensors + config.json + tokenizer.json


@dataclasses.dataclass(frozen=True)
class Workload:
  """One GRPO step's work. `modes` are (mode, completions per prompt, new tokens each) in rollout order: what our
  side samples, one rollout per mode; the peers decode all `group` rows of a prompt to `peer_new_tokens`."""

  name: str
  num_prompts: int
  prompt_len: int
  modes: tuple[tuple[str, int, int], ...]
  video_rows: int = 0  # of the prompt_len positions, video feature rows on our side (the peers get text there)
  audio_rows: int = 0
  section: str = "## Peers"  # the docs/benchmarks/peers.md section compare.py writes
  # Tunix's update in prompts per micro-batch (gradient accumulation to one optimizer update per step, so the
  # same rows and the same single update: equal work in less memory). None: all prompts at once.
  tunix_micro_prompts: int | None = None
  tunix_micro_why: str = ""  # why, for the docs section compare.py writes

  def __post_init__(self):
    if not self.modes or self.modes[0][0] != "slow" or any(m not in ("slow", "fast") for m, _, _ in self.modes):
      raise ValueError(f"{self.name}: modes must start with 'slow' and be 'slow'/'fast', got {self.modes}")
    if self.video_rows + self.audio_rows >= self.prompt_len:
      raise ValueError(f"{self.name}: feature rows must leave text in a {self.prompt_len}-token prompt")
    if self.tunix_micro_prompts is not None and (
        self.tunix_micro_prompts < 1 or self.num_prompts % self.tunix_micro_prompts):
      raise ValueError(f"{self.name}: tunix_micro_prompts {self.tunix_micro_prompts} must divide "
                       f"num_prompts {self.num_prompts}")
    if self.gen_tokens % self.rows:
      raise ValueError(f"{self.name}: {self.gen_tokens} generated tokens do not split evenly over {self.rows} rows")

  @property
  def group(self) -> int:
    """G: completions per prompt, over all modes."""
    return sum(n for _, n, _ in self.modes)

  @property
  def rows(self) -> int:
    return self.num_prompts * self.group

  @property
  def gen_tokens(self) -> int:
    """Tokens generated per step (every row decodes exactly its length)."""
    return self.num_prompts * sum(n * t for _, n, t in self.modes)

  @property
  def peer_new_tokens(self) -> int:
    """The one completion length of a peer's batch with the same generated tokens: the mean over the rows."""
    return self.gen_tokens // self.rows

  @property
  def mixed_lengths(self) -> bool:
    return len({t for _, _, t in self.modes}) > 1

  @property
  def prompts_file(self) -> str:
    """prepare.py's prompts for this workload: {"texts": [...], "ids": [[...prompt_len ids], ...]}."""
    return os.path.join(WORK_DIR, "prompts.json" if self.name == "peer" else f"prompts_{self.name}.json")


WORKLOADS = {
    "peer": Workload("peer", num_prompts=4, prompt_len=128, modes=(("slow", 8, 64),)),
    "mer": Workload("mer", num_prompts=4, prompt_len=1024, modes=(("slow", 4, 128), ("fast", 4, 16)),
                    video_rows=512, audio_rows=256, section="## Peers: MER workload",
                    tunix_micro_prompts=1,
                    tunix_micro_why="all rows at once asked XLA for a 44 GB buffer, more than the 23 GB of the "
                                    "2-core boxes measured here; one prompt at a time peaked at 12.9 GiB"),
}
DEFAULT_WORKLOAD = "peer"
PROMPTS_FILE = WORKLOADS[DEFAULT_WORKLOAD].prompts_file


def reward(text: str) -> float:
  """A cheap string check that still spreads within a group: the fraction of the five vowels the text uses."""
  return len(set(text.lower()) & set("aeiou")) / 5.0


def load_prompts(workload: Workload, path: str | None = None) -> dict:
  path = path or workload.prompts_file
  with open(path) as f:
    prompts = json.load(f)
  n, length = workload.num_prompts, workload.prompt_len
  if len(prompts["ids"]) != n or any(len(p) != length for p in prompts["ids"]):
    raise ValueError(f"{path}: expected {n} prompts of {length} ids ({workload.name} workload); rerun "
                     "benchmarks/peers/prepare.py")
  return prompts


def check_prompt_ids(ids_per_prompt, prompts: dict, who: str) -> None:
  """The peer's own tokenisation of the prompt texts must give the ids our side uses, or the work differs."""
  got = [list(map(int, ids)) for ids in ids_per_prompt]
  if got != prompts["ids"]:
    lens = [len(i) for i in got]
    raise ValueError(f"{who}: tokenising the prompt texts gave different ids (lengths {lens}) than prompts.json")


def check_gen_tokens(steps: list[dict], workload: Workload, who: str) -> None:
  """Every step generated the workload's tokens (EOS ignored in all three), or the work differs."""
  got = [s.get("gen_tokens") for s in steps]
  if any(g != workload.gen_tokens for g in got):
    raise ValueError(f"{who}: generated {got} tokens per step, expected {workload.gen_tokens} ({workload.name})")


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

  def pending(self) -> dict:
    """What was added since the last lap (empty once the last step has ended)."""
    return dict(self._cur)

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
  ap.add_argument("--workload", default=DEFAULT_WORKLOAD, choices=sorted(WORKLOADS))
  ap.add_argument("--prompts", default=None, help="default: the workload's file from prepare.py")
  return ap


def parse(description: str, argv=None, extra=None):
  """(args, Workload) of a peer script's command line; `extra(parser)` adds a script's own arguments."""
  ap = arg_parser(description)
  if extra is not None:
    extra(ap)
  args = ap.parse_args(argv)
  return args, WORKLOADS[args.workload]
