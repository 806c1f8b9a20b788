"""MME-Emotion: judge the policy's reasoning and answers, and turn the judge's step scores into Rec-S / Rea-S / CoT-S.

MME-Emotion (../shared/docs/metrics.md §6) has 8 tasks (TASKS). A judge scores every reasoning step of a completion
0 or 1, then the answer; metrics.mme_emotion_scores turns those into the scores (0-100, as the benchmark reports
them). An item goes through `JudgeItem.from_completion` (`extract_steps` splits the reasoning into steps), a
`Judge` (the protocol), `CachedJudge` (a JSONL cache: a rerun never asks again) and `run_mme`, which writes the
judge JSONL that `mme_report` reads back. Only the slow mode's first sample is judged. The judges live in
mme_judges.py; nothing in this module opens a network connection. Details: docs/evaluation.md, "MME-Emotion".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import warnings
from typing import Any, Iterable, Mapping, Protocol, Sequence

from merr1_jax.data import labels
from merr1_jax.infra import artifacts
from merr1_jax.task import metrics, prompts, rewards

TASKS = ("ER-Lab", "ER-Wild", "Noise-ER", "FG-ER", "ML-ER", "SA", "FG-SA", "IR")
DEFAULT_TASK = "all"  # an item without a `task` field (metrics.mme_emotion_scores' name for untagged items)


class CacheWarning(UserWarning):
  """A judge cache line was ignored (a torn last line from an interrupted run); its item is judged again."""


@dataclasses.dataclass(frozen=True)
class JudgeItem:
  """One benchmark item as the judge sees it. `gt`: the ground-truth label words; `steps` and `answer` are
  extract_steps(completion) (from_completion builds them, so they always agree with the completion)."""
  id: str
  task: str
  gt: tuple[str, ...]
  completion: str  # the whole assistant turn: <think>...</think><answer>...</answer>
  steps: tuple[str, ...]
  answer: tuple[str, ...]
  label_set: tuple[str, ...] = ()  # the item's candidate labels, when its JSON has them
  question: str = prompts.DEFAULT_QUESTION

  @classmethod
  def from_completion(cls, id: str, task: str, gt: Sequence[str], completion: str, **kw) -> "JudgeItem":
    steps, answer = extract_steps(completion)
    return cls(id=str(id), task=task, gt=tuple(gt), completion=completion, steps=steps, answer=answer, **kw)


@dataclasses.dataclass(frozen=True)
class JudgeScore:
  """The judge's verdict on one item: one 0/1 per reasoning step, then the answer's 0/1 (always last)."""
  step_scores: tuple[int, ...]

  def __post_init__(self):
    scores = tuple(self.step_scores)
    if not scores or any(isinstance(s, bool) or s not in (0, 1) for s in scores):
      raise ValueError(f"step_scores must be a non-empty sequence of 0/1 (the last scores the answer), got {scores}")
    object.__setattr__(self, "step_scores", tuple(int(s) for s in scores))

  @property
  def answer_score(self) -> int:
    return self.step_scores[-1]


class Judge(Protocol):
  """Scores recognition (the answer) and reasoning (each step) of one item."""
  name: str  # judge and version, e.g. "rule-v1:2025": a new name re-asks every item (the cache key holds it)

  def __call__(self, item: JudgeItem) -> JudgeScore: ...


def judge_name(judge: Any) -> str:
  return str(getattr(judge, "name", None) or type(judge).__qualname__)


def checked(item: JudgeItem, score: Any, name: str) -> JudgeScore:
  """`score` as a JudgeScore with one entry per step plus the answer's; ValueError naming judge and item."""
  if not isinstance(score, JudgeScore):
    raise ValueError(f"judge {name!r} returned {type(score).__name__} for item {item.id!r}, expected a JudgeScore")
  if len(score.step_scores) != len(item.steps) + 1:
    raise ValueError(f"judge {name!r} gave {len(score.step_scores)} scores for item {item.id!r}, which has "
                     f"{len(item.steps)} reasoning steps: expected {len(item.steps) + 1} (the answer's last)")
  return score


# ------------------------------------------------------------------------------------------ step extraction

_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.):]|step\s*\d+\s*[:.)-]?)\s*", re.IGNORECASE)
# A sentence ends at . ! ? followed by whitespace, or right after a full-width 。！？ (CJK text has no spaces).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])")


def think_text(completion: str) -> str:
  """The text inside the first <think>...</think>; an unclosed think runs to <answer> or to the end."""
  start = completion.find(prompts.THINK_OPEN)
  if start < 0:
    return ""
  start += len(prompts.THINK_OPEN)
  end = completion.find(prompts.THINK_CLOSE, start)
  if end < 0:  # truncated before </think>: judge the reasoning that was written
    end = completion.find(prompts.ANSWER_OPEN, start)
  return completion[start:] if end < 0 else completion[start:end]


def extract_steps(completion: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(reasoning steps, answer words) of a completion (the whole assistant turn).

  The rule: the reasoning (think_text) is split into lines; each line loses a leading bullet or number ("-",
  "*", "1.", "(2)", "Step 3:") and is split into sentences (after . ! ? and whitespace, or after 。！？); a step is
  a stripped piece that holds a letter or digit. The answer is rewards.parse_answer (the words of the last
  <answer> block; () without one). A fast-mode turn has no steps. Crude on purpose, and deterministic: "e.g. x"
  splits after "e.g.". MME-Emotion's own step extraction is not reproduced here.
  """
  steps = []
  for line in think_text(completion).splitlines():
    for piece in _SENTENCE_END.split(_BULLET.sub("", line).strip()):
      piece = piece.strip()
      if any(c.isalnum() for c in piece):
        steps.append(piece)
  return tuple(steps), rewards.parse_answer(completion)


# ------------------------------------------------------------------------------------------------ the cache


def item_key(item: JudgeItem, name: str) -> str:
  """A stable hash of everything the judge sees plus the judge's name: equal keys mean the same question."""
  blob = json.dumps({"judge": name, **dataclasses.asdict(item)}, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CachedJudge:
  """`judge` behind a JSONL cache at `path`: an item already scored (same item_key) is never asked again.

  One line per scored item, {"key", "judge", "id", "task", "step_scores"}, appended with one write, flushed and
  fsynced before the score is returned, so a crash loses at most the line being written. On opening, a torn
  last line (no newline) is ignored with a CacheWarning and cut off (so the next append starts a clean line);
  any other bad line is a ValueError naming `path:line`, never skipped. `n_asked` / `n_cached` count the calls.
  """

  def __init__(self, judge: Judge, path: str | os.PathLike):
    self.judge, self.path, self.name = judge, os.fspath(path), judge_name(judge)
    self.n_asked = self.n_cached = 0
    self._scores = self._load()

  def _load(self) -> dict[str, tuple[int, ...]]:
    try:
      data = pathlib.Path(self.path).read_bytes()
    except FileNotFoundError:
      return {}
    lines = data.split(b"\n")
    tail = lines.pop()  # what follows the last newline: empty unless the last write was torn
    if tail:
      warnings.warn(f"{self.path}:{len(lines) + 1}: torn last line (an interrupted write) ignored and removed; "
                    "its item is judged again", CacheWarning, stacklevel=3)
      os.truncate(self.path, len(data) - len(tail))
    out: dict[str, tuple[int, ...]] = {}
    for n, raw in enumerate(lines, 1):
      if raw.strip():
        key, scores = _cache_line(raw, f"{self.path}:{n}")
        if out.setdefault(key, scores) != scores:
          raise ValueError(f"{self.path}:{n}: key {key[:12]}... was cached before with other scores "
                           f"({list(out[key])} vs {list(scores)}); delete the stale lines")
    return out

  def __call__(self, item: JudgeItem) -> JudgeScore:
    key = item_key(item, self.name)
    if key in self._scores:
      self.n_cached += 1
      return JudgeScore(self._scores[key])
    score = checked(item, self.judge(item), self.name)
    line = json.dumps({"key": key, "judge": self.name, "id": item.id, "task": item.task,
                       "step_scores": list(score.step_scores)}, ensure_ascii=False) + "\n"
    pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    self._scores[key] = score.step_scores
    self.n_asked += 1
    return score

  def stats(self) -> dict:
    return {"cache": self.path, "asked": self.n_asked, "cached": self.n_cached}


def _cache_line(raw: bytes, where: str) -> tuple[str, tuple[int, ...]]:
  hint = "delete that line (its item is then judged again) or the whole cache"
  try:
    obj = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{where}: not a JSON line ({e}); {hint}") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
    raise ValueError(f"{where}: expected an object with a string 'key'; {hint}")
  try:
    return obj["key"], JudgeScore(tuple(obj.get("step_scores") or ())).step_scores
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: bad 'step_scores' ({e}); {hint}") from None


# ------------------------------------------------------------------------------------------ scoring, reading


def judge_jsonl(rows: Iterable[Mapping]) -> str:
  """The judge JSONL that mme_report reads: one {"id", "task", "step_scores"} line per item."""
  return "".join(json.dumps({k: r[k] for k in ("id", "task", "step_scores")}, ensure_ascii=False) + "\n"
                 for r in rows)


def run_mme(items: Iterable[JudgeItem], judge: Judge, path: str | os.PathLike | None = None) -> dict:
  """Scores every item through `judge`: metrics.mme_emotion_scores' result (per_task, overall, task_mean) plus
  n_items, judge (its name), items (per item: id, task, step_scores) and, for a CachedJudge, judge_calls.
  With `path`, also writes the judge JSONL there atomically (mme_report(path) gives the same scores)."""
  rows, seen, name = [], set(), judge_name(judge)
  for item in items:
    if item.id in seen:
      raise ValueError(f"run_mme: duplicate item id {item.id!r}")
    seen.add(item.id)
    score = checked(item, judge(item), name)
    rows.append({"id": item.id, "task": item.task, "step_scores": list(score.step_scores)})
  if not rows:
    raise ValueError("run_mme needs at least one item")
  out = metrics.mme_emotion_scores([{"task": r["task"], "scores": r["step_scores"]} for r in rows])
  out |= {"n_items": len(rows), "judge": name, "items": rows}
  if hasattr(judge, "stats"):
    out["judge_calls"] = judge.stats()
  if path is not None:
    artifacts.write_text_atomic(path, judge_jsonl(rows))
    out["path"] = os.fspath(path)
  return out


def mme_report(judge_jsonl_path: str | os.PathLike) -> dict:
  """Rec-S / Rea-S / CoT-S per task and overall from a judge JSONL file (judge_jsonl's format).

  Each non-blank line is a JSON object {"id": str, "task": str, "step_scores": [0/1, ..., answer_score]}.
  Raises ValueError naming the file and line on unreadable JSON, a missing or bad field, or a duplicate id;
  FileNotFoundError when the file is missing.
  """
  path = os.fspath(judge_jsonl_path)
  items, seen = [], {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}, line {n}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      for key in ("id", "task", "step_scores"):
        if key not in obj:
          raise ValueError(f"{where}: missing field {key!r} (have {sorted(obj)})")
      if not isinstance(obj["task"], str) or not obj["task"]:
        raise ValueError(f"{where}: field 'task' must be a non-empty string, got {obj['task']!r}")
      scores = obj["step_scores"]
      if not isinstance(scores, list) or not scores:
        raise ValueError(f"{where}: field 'step_scores' must be a non-empty list (the last entry is the answer), "
                         f"got {scores!r}")
      if any(isinstance(s, bool) or s not in (0, 1) for s in scores):
        raise ValueError(f"{where}: field 'step_scores' must hold only 0 and 1, got {scores!r}")
      key = str(obj["id"])
      if key in seen:
        raise ValueError(f"{where}: duplicate id {key!r} (first on line {seen[key]})")
      seen[key] = n
      items.append({"task": obj["task"], "scores": scores})
  if not items:
    raise ValueError(f"{path}: no judge lines")
  return metrics.mme_emotion_scores(items) | {"n_items": len(items), "path": path}


def read_items(path: str | os.PathLike) -> list[dict]:
  """The MME-Emotion items file (labels.read_mme_json: ids and GT words) as [{id, task, gt, label_set,
  question}]; `task` and `question` are optional fields of each item (default DEFAULT_TASK and the prompt's
  question). FileNotFoundError / labels.BadRecordError (a ValueError naming file, item and field) otherwise."""
  anns = labels.read_mme_json(path)
  raw = {str(x["video_id"]).strip(): x for x in json.loads(pathlib.Path(path).read_text(encoding="utf-8-sig"))}
  out = []
  for ann in anns:
    item = raw[ann.id]
    task = item.get("task", DEFAULT_TASK)
    if not isinstance(task, str) or not task.strip():
      raise labels.BadRecordError(f"task must be a non-empty string, got {task!r}", source=os.fspath(path),
                                  record=ann.id, field="task")
    out.append({"id": ann.id, "task": task.strip(), "gt": ann.openset,
                "label_set": tuple(labels.parse_label_list(item.get("label_set"))),
                "question": str(item.get("question") or prompts.DEFAULT_QUESTION)})
  if not out:
    raise ValueError(f"{path}: no MME-Emotion items")
  return out


def items_from_samples(specs: Sequence[Mapping], samples: Iterable[Mapping], *, source: str) -> list[JudgeItem]:
  """One JudgeItem per item spec (read_items) from the evaluation's per-sample records: the slow mode's first
  sample with the same id. Every item needs one (a partial benchmark is not the benchmark's number); an id
  found in two evaluated datasets is ambiguous. ValueError naming `source` otherwise."""
  by_id: dict[str, Mapping] = {}
  for s in samples:
    if s["mode"] != "slow" or int(s.get("sample", 0)) != 0:
      continue
    first = by_id.setdefault(str(s["id"]), s)
    if first is not s:
      raise ValueError(f"{source}: id {s['id']!r} is a sample of datasets {first.get('dataset')!r} and "
                       f"{s.get('dataset')!r}; evaluate one of them (--datasets)")
  if not by_id:
    raise ValueError(f"{source}: there are no slow-mode samples to judge (add slow to --modes)")
  missing = [sp["id"] for sp in specs if sp["id"] not in by_id]
  if missing:
    raise ValueError(f"{source}: {len(missing)} of {len(specs)} items (field video_id) match no slow-mode sample "
                     f"of the evaluated datasets, e.g. {missing[:5]} (sample ids e.g. {sorted(by_id)[:5]})")
  return [JudgeItem.from_completion(sp["id"], sp["task"], sp["gt"],
                                    rewards.assistant_text(by_id[sp["id"]]["completion"], "slow"),
                                    label_set=tuple(sp["label_set"]), question=sp["question"]) for sp in specs]


def summary(result: Mapping) -> dict:
  """run_mme's result without the per-item rows: what report.json and mme.json hold."""
  return {k: v for k, v in result.items() if k != "items"}


def markdown(result: Mapping) -> str:
  """report.md's MME-Emotion section: Rec-S / Rea-S / CoT-S per task, overall and the task mean."""
  lines = [f"## MME-Emotion (judge: {result['judge']})", ""]
  if str(result["judge"]).startswith("rule-"):
    lines += ["Offline rule judge (mme_judges.RuleJudge): a crude stand-in for the benchmark's LLM judge; these "
              "numbers are not comparable with published MME-Emotion numbers.", ""]
  lines += ["| task | items | Rec-S | Rea-S | CoT-S |", "|---|---|---|---|---|"]
  rows = [*result["per_task"].items(), ("overall", result["overall"]), ("task mean", result["task_mean"])]
  for name, s in rows:
    lines.append(f"| {name} | {s.get('n', '')} | {s['rec_s']:.2f} | {s['rea_s']:.2f} | {s['cot_s']:.2f} |")
  return "\n".join(lines) + "\n"
