"""MME-Emotion judges (the mme.Judge protocol): the offline default, the served-model example, and `--judge` specs.

  RuleJudge              deterministic, offline, instant: the default of `python -m merr1_jax.evaluate
                         --mme_items ...`. A crude stand-in for the benchmark's LLM judge, so that the pipeline
                         runs end to end without one; its numbers are NOT comparable with published MME-Emotion
                         numbers (report.md says so next to them).
  OpenAICompatibleJudge  how to plug in a served judge model (vLLM, TGI, an OpenAI-style API): it builds the
                         prompt and parses the reply; the HTTP call is an injected `send(prompt) -> str`, so this
                         package never opens a network connection itself (docs/evaluation.md has a `send`).
  load_judge(spec)       `--judge rule` or `--judge module:Attr` (Attr is called with no arguments and must
                         return a judge).

Both give one 0/1 per reasoning step (mme.JudgeItem.steps), then the answer's 0/1 (mme.JudgeScore).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Callable

from merr1_jax import emotion
from merr1_jax.evaluation.mme import JudgeItem, JudgeScore
from merr1_jax.task import metrics

_WORD = re.compile(r"[a-z']+")
_MAX_PHRASE = 5  # the longest format-table surface form has 5 words ("at a loss for words")


class RuleJudge:
  """Scores through the emotion wheels, as the HIT metric maps words (metrics.hit_rate, emotion.load).

  Two word sets *agree* when they share a word (lowercased), or when, on more than half of the wheels that map
  the GT to something, their clusters meet (a binary form of the item's HIT). The answer scores 1 when its
  words agree with the GT. A step scores 1 when its cue words (every 1-5 word phrase of it that the format table
  knows, emotion.EmotionWheel.is_known) agree with the GT; a step without one scores 0.

  Limits, on purpose: no negation ("not happy" names happy), no judgement of whether a step is true of the clip
  or follows from the previous ones, English words only, and a long list of emotions hits easily. It tells a
  working pipeline from a broken one and ranks gross differences; it is not the benchmark.
  """

  def __init__(self, format_version: str = "2025"):
    self.wheel = emotion.load(format_version)
    self.name = f"rule-v1:{format_version}"  # bump the version when the rule changes: the cache keys hold it

  def agrees(self, words, gt) -> bool:
    words, gt = {w.lower().strip() for w in words}, {w.lower().strip() for w in gt}
    if words & gt:
      return True
    scored = hits = 0
    for k in metrics.WHEELS:
      g = self.wheel.map_words(gt, k)
      if g:  # as HIT, a wheel that maps the GT to nothing does not count
        scored += 1
        hits += bool(g & self.wheel.map_words(words, k))
    return 2 * hits > scored

  def cue_words(self, step: str) -> list[str]:
    tokens = _WORD.findall(step.lower())
    phrases = (" ".join(tokens[i:i + n]) for n in range(1, _MAX_PHRASE + 1) for i in range(len(tokens) - n + 1))
    return [p for p in phrases if self.wheel.is_known(p)]

  def __call__(self, item: JudgeItem) -> JudgeScore:
    steps = tuple(int(self.agrees(self.cue_words(s), item.gt)) for s in item.steps)
    return JudgeScore(steps + (int(self.agrees(item.answer, item.gt)),))


PROMPT = """You are the judge of the MME-Emotion benchmark.
Task: {task}
Question asked of the model: {question}
Candidate labels: {label_set}
Ground-truth label: {gt}

The model's reasoning, one numbered step per line:
{steps}

The model's final answer: {answer}

For each reasoning step, output 1 if it is correct and supports recognising the ground-truth label, else 0.
Then output 1 if the final answer matches the ground-truth label, else 0.
Reply with one JSON object and nothing else:
{{"step_scores": [{n} values, each 0 or 1], "answer_score": 0 or 1}}"""


class JudgeReplyError(ValueError):
  """A judge model's reply that cannot be read as its verdict."""


class OpenAICompatibleJudge:
  """A served judge model behind `send(prompt) -> reply text` (for example one chat-completions call).

  `model` names the judge and `prompt_version` the prompt: both are in `name`, so the cache asks again when
  either changes. The prompt (PROMPT) is ours: the benchmark's official judge prompt is not reproduced. A reply
  must hold one JSON object {"step_scores": [0/1 per step], "answer_score": 0/1} (code fences and text around
  it are tolerated); anything else raises JudgeReplyError naming the item and quoting the reply.
  """

  def __init__(self, send: Callable[[str], str], *, model: str, prompt_version: str = "v1"):
    self.send = send
    self.name = f"openai-compatible:{model}:{prompt_version}"

  def prompt(self, item: JudgeItem) -> str:
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(item.steps, 1)) or "(no reasoning steps)"
    return PROMPT.format(task=item.task, question=item.question, label_set=", ".join(item.label_set) or "(open)",
                         gt=", ".join(item.gt), steps=steps, answer=", ".join(item.answer) or "(no answer)",
                         n=len(item.steps))

  def parse(self, item: JudgeItem, reply: str) -> JudgeScore:
    where = f"judge {self.name}, item {item.id!r}"
    start, end = reply.find("{"), reply.rfind("}")
    try:
      obj = json.loads(reply[start:end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
      obj = None
    if not isinstance(obj, dict) or "step_scores" not in obj or "answer_score" not in obj:
      raise JudgeReplyError(f"{where}: the reply is not a JSON object with 'step_scores' and 'answer_score': "
                            f"{reply[:300]!r}")
    steps, answer = obj["step_scores"], obj["answer_score"]
    if not isinstance(steps, list) or len(steps) != len(item.steps):
      raise JudgeReplyError(f"{where}: 'step_scores' must be a list of {len(item.steps)} scores, one per step, "
                            f"got {steps!r}")
    if any(isinstance(s, bool) or s not in (0, 1) for s in [*steps, answer]):
      raise JudgeReplyError(f"{where}: scores must be 0 or 1, got step_scores={steps!r}, answer_score={answer!r}")
    return JudgeScore((*steps, answer))

  def __call__(self, item: JudgeItem) -> JudgeScore:
    return self.parse(item, self.send(self.prompt(item)))


def load_judge(spec: str, format_version: str = "2025"):
  """`rule` -> RuleJudge(format_version) (the run's emotion-wheel tables); `module:Attr` -> Attr() from that
  importable module (a class, or a factory with no
  arguments) that must be callable. ValueError naming the spec otherwise."""
  if spec == "rule":
    return RuleJudge(format_version)
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(f"--judge {spec!r}: expected 'rule' or 'module:Class' (e.g. my_judges:ServedJudge)")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"--judge {spec!r}: cannot import module {module_name!r} ({e})") from None
  factory = getattr(module, attr, None)
  if not callable(factory):
    raise ValueError(f"--judge {spec!r}: module {module_name!r} has no callable {attr!r}")
  try:
    judge = factory()
  except Exception as e:  # noqa: BLE001 (the user's constructor: report it as one line)
    raise ValueError(f"--judge {spec!r}: {attr}() failed: {type(e).__name__}: {e}") from None
  if not callable(judge):
    raise ValueError(f"--judge {spec!r}: {attr}() returned {type(judge).__name__}, which is not a judge (callable)")
  return judge
