"""Evaluation core: generate answers per mode, parse them, score them with metrics.py (the trainer calls this too).

`evaluate_dataset` runs every eval batch in every mode of `EvalSettings.modes`: rollout.sample -> text -> answer
words (the extractor) -> the dataset metric ('ov', 'hit' or 'waf', computed by metrics.py, so the numbers equal
`python -m merr1_jax.metrics` on the same predictions). It adds per-mode statistics, a confidence read from the
category log-mass (needs `token_sets`), per-sample records, the records the pipeline skipped as bad and, with
num_samples N > 1, `best_of_n`. Details: docs/evaluation.md, "What is measured".

Shape legend: B = P*N rows (P prompts, N samples), T completion tokens, K wheels, C clusters, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from merr1_jax import emotion, rollout
from merr1_jax.evaluation import stats as eval_stats
from merr1_jax.infra import sharding
from merr1_jax.rollout import passes as grouped
from merr1_jax.rollout import sampling
from merr1_jax.task import metrics, prompts, rewards

METRICS = ("ov", "set", "hit", "waf")
HEADLINE = {"ov": "f", "set": "f", "hit": "hit", "waf": "waf"}  # the one number a benchmark table shows per dataset
_REQUIRED_KEYS = ("ids", "example_mask", "prompt_tokens", "prompt_mask", "positions")


@dataclasses.dataclass
class EvalSettings:
  """How a policy is evaluated. The run's limits come from the config (settings.evaluation_settings); the rest
  are the evaluate CLI's choices."""

  max_new_tokens: Mapping[str, int]  # mode -> completion limit (config.eval.max_new_tokens_*)
  format_version: str  # emotion-wheel tables for OV/HIT (config.eval.format_version)
  seed: int  # sampling key when num_samples > 1 (config.seed)
  modes: tuple[str, ...] = ("fast", "slow")
  num_samples: int = 1  # 1 = greedy; N > 1 samples at `temperature` (pass@N-style stats)
  temperature: float = 1.0
  # 'answer' = rewards.parse_answer(assistant_text(...)); or a callable: assistant turn text -> words (the
  # official LLM-extraction protocol plugs in here).
  extractor: str | Callable[[str], Sequence[str]] = "answer"
  # The run's label space (settings.label_space): metric 'set' and the confidence read-out use it. None = the
  # emotion wheels of format_version at level 1, the field's OV space.
  label_space: rewards.LabelSpace | None = None
  sentiment_mapper: Callable[[Sequence[str]], int] | None = None  # None = metrics' VADER default
  chunk_size: int = 8192  # vocabulary chunk of the confidence pass (grouped.score_pass)

  def validate(self) -> None:
    modes = tuple(self.modes)
    if not modes or any(m not in prompts.MODES for m in modes) or len(set(modes)) != len(modes):
      raise ValueError(f"settings.modes={self.modes!r}: expected distinct modes from {prompts.MODES}")
    n = self.num_samples
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
      raise ValueError(f"settings.num_samples must be a positive int, got {n!r}")
    if n > 1 and not self.temperature > 0:
      raise ValueError(f"settings.temperature must be > 0 for num_samples > 1, got {self.temperature!r}")
    for m in modes:
      t = self.max_new_tokens.get(m) if isinstance(self.max_new_tokens, Mapping) else None
      if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < 1:
        raise ValueError(f"settings.max_new_tokens[{m!r}] must be a positive int, got {t!r}")
    if self.format_version not in emotion.FORMAT_VERSIONS:
      raise ValueError(f"settings.format_version={self.format_version!r}; expected one of {emotion.FORMAT_VERSIONS}")
    if isinstance(self.extractor, str) and self.extractor != "answer":
      raise ValueError(f"settings.extractor={self.extractor!r}: 'answer' or a callable text -> words")
    if not isinstance(self.extractor, str) and not callable(self.extractor):
      raise ValueError(f"settings.extractor must be 'answer' or callable, got {self.extractor!r}")

  @property
  def extractor_name(self) -> str:
    if isinstance(self.extractor, str):
      return "answer: the <answer> tag, rewards.parse_answer"
    return f"custom: {_callable_name(self.extractor)}"

  @property
  def sentiment_mapper_name(self) -> str:
    if self.sentiment_mapper is None:
      return "VaderSentimentMapper (offline VADER, a documented deviation from the official LLM)"
    return _callable_name(self.sentiment_mapper)

  def describe(self) -> dict:
    """A JSON-safe echo of the settings (callables by name)."""
    return {"modes": list(self.modes), "num_samples": int(self.num_samples), "temperature": float(self.temperature),
            "decoding": "greedy" if self.num_samples == 1 else f"temperature {self.temperature}",
            "max_new_tokens": {m: int(self.max_new_tokens[m]) for m in self.modes},
            "format_version": self.format_version, "extractor": self.extractor_name,
            "sentiment_mapper": self.sentiment_mapper_name, "seed": int(self.seed),
            "label_space": self.space.name}

  @property
  def space(self) -> rewards.LabelSpace:
    return self.label_space or rewards.LabelSpace.emotion_wheel(self.format_version)


def _callable_name(fn) -> str:
  name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
  return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{name}"


@dataclasses.dataclass
class DatasetResult:
  dataset: str
  metric: str
  summary: dict  # mode -> {metric numbers, statistics}
  samples: list  # one dict per (example, mode, sample)
  settings: dict  # EvalSettings.describe()
  n_examples: int
  analysis: dict = dataclasses.field(default_factory=dict)  # fast_vs_slow(...) when both modes ran
  # {split: {'count', 'ids'}}: the split's records that the data pipeline skipped as bad (`skipped_records`)
  skipped: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------- host helpers

_SPECIAL_IDS: "weakref.WeakKeyDictionary[Any, rollout.SpecialIds]" = weakref.WeakKeyDictionary()


def special_ids(tokenizer) -> rollout.SpecialIds:
  """SpecialIds.from_tokenizer decodes the whole vocabulary once; keep it per tokenizer object."""
  try:
    return _SPECIAL_IDS[tokenizer]
  except (KeyError, TypeError):
    ids = rollout.SpecialIds.from_tokenizer(tokenizer)
    try:
      _SPECIAL_IDS[tokenizer] = ids
    except TypeError:  # not weak-referenceable: just do not cache
      pass
    return ids


# -------------------------------------------------------------------------------------------- metrics


def _gt(metric: str, batch: Mapping[str, np.ndarray], row: int):
  """The dataset metric's ground truth of one row, and the words the per-sample P/R use."""
  openset = list(batch["openset"][row]) if "openset" in batch else []
  if metric in ("ov", "set"):
    return openset, openset
  if metric == "hit":
    onehot = str(batch["onehot"][row]) if "onehot" in batch else ""
    words = [onehot] if onehot else openset
    return words, words
  valence = float(batch["valence"][row]) if "valence" in batch else math.nan
  return valence, openset


def dataset_metric(metric: str, records: Sequence[dict], settings: EvalSettings) -> dict:
  """The dataset metric over `records` (their `gt` and `words`), by metrics.py."""
  gt, pred = [r["gt"] for r in records], [list(r["words"]) for r in records]
  if metric == "ov":
    out = metrics.ov_score(gt, pred, level=1, format_version=settings.format_version)
    return {k: out[k] for k in ("f", "precision", "recall", "per_wheel", "pred_words_dropped")}
  if metric == "set":
    space = settings.space
    dropped = sum(all(c < 0 for c in space.lookup(w)) for words in pred for w in words)
    return metrics.set_score(gt, pred, space.mappings()) | {"label_space": space.name, "pred_words_dropped": dropped}
  if metric == "hit":
    out = metrics.hit_rate(gt, pred, format_version=settings.format_version)
    return {k: out[k] for k in ("hit", "per_wheel", "pred_words_dropped")}
  keep = [i for i, g in enumerate(gt) if not math.isnan(g)]
  mapper = settings.sentiment_mapper or _vader(settings.format_version)
  out = metrics.waf([gt[i] for i in keep], [pred[i] for i in keep], mapper=mapper)
  return out | {"n_no_valence": len(gt) - len(keep)}


def _sample_score(metric: str, r: dict) -> float:
  """What best-of-N maximises per sample."""
  if metric == "waf":
    return float(r.get("sentiment_correct") or 0.0)
  p, rec = r["precision"] or 0.0, r["recall"] or 0.0
  if metric == "hit":
    return rec  # one-hot GT: recall is the wheel-averaged hit
  return 2 * p * rec / (p + rec) if p + rec else 0.0


def summarize(metric: str, records: Sequence[dict], settings: EvalSettings) -> dict:
  """One mode's summary from its per-sample records (so a report can always be recomputed from samples.jsonl)."""
  out = dataset_metric(metric, records, settings)
  out["n_samples"] = len(records)
  out["n_prompts"] = len({r["id"] for r in records})
  out["mean_num_emotions"] = float(np.mean([len(r["words"]) for r in records]))
  out["format_failure_rate"] = float(np.mean([not r["format_ok"] for r in records]))
  out["truncated_rate"] = float(np.mean([r["stop_reason"] == "length" for r in records]))
  out["answer_tokens"] = eval_stats.dist([r["answer_tokens"] for r in records])
  out["think_tokens"] = eval_stats.dist([r["think_tokens"] for r in records])
  conf = [(r["confidence"], r["correct"]) for r in records if r["confidence"] is not None]
  out["confidence_mean"] = float(np.mean([c for c, _ in conf])) if conf else None
  gt_mass = [r["gt_mass"] for r in records if r["gt_mass"] is not None]
  out["gt_mass_mean"] = float(np.mean(gt_mass)) if gt_mass else None
  cal = eval_stats.calibration_bins([c for c, _ in conf], [k for _, k in conf])
  out["ece"], out["calibration"] = cal["ece"], cal["bins"]
  if settings.num_samples > 1:
    best: dict[str, dict] = {}
    for r in records:  # first sample wins ties: deterministic
      if r["id"] not in best or _sample_score(metric, r) > _sample_score(metric, best[r["id"]]):
        best[r["id"]] = r
    out["best_of_n"] = dataset_metric(metric, list(best.values()), settings)
  return out


# ------------------------------------------------------------------------------------------ generation


def _check_batch(batch: Mapping[str, np.ndarray], dataset: str, index: int) -> None:
  missing = [k for k in _REQUIRED_KEYS if k not in batch]
  if missing:
    raise ValueError(f"dataset {dataset!r}, batch {index}: missing keys {missing} (an eval pipeline batch, "
                     "data/pipeline.py kind='eval', is expected)")
  if "mode" in batch and np.any(np.asarray(batch["mode"]) == "fast"):
    raise ValueError(f"dataset {dataset!r}, batch {index}: prompts rendered in fast mode; build the eval pipeline "
                     "with mode='slow' (fast mode appends the prefix to slow prompts itself)")


def skipped_records(batches) -> dict:
  """{'count', 'ids'} of the records that the pipeline of `batches` skipped as bad (data.on_bad_record='skip'),
  from its `bad` log (data/schema.BadRecordLog): an id is the clip's, or the record's index in its source where no
  id could be read; ids None where the log does not keep them. Batches without a log (a list) skipped none."""
  log = getattr(batches, "bad", None)
  if log is None:
    return {"count": 0, "ids": []}
  ids = getattr(log, "records", None)
  if ids is None:
    return {"count": int(log.count), "ids": None if log.count else []}
  return {"count": int(log.count), "ids": [int(r) if isinstance(r, (int, np.integer)) else str(r) for r in ids]}


def _method(settings: EvalSettings):
  return sampling.Greedy() if settings.num_samples == 1 else sampling.Temperature(float(settings.temperature))


def evaluate_dataset(model, params, tokenizer, batches: Iterable[Mapping[str, np.ndarray]], *, dataset: str,
                     metric: str, settings: EvalSettings, token_sets: np.ndarray | None = None, mesh=None,
                     progress: bool = True, split: str = "eval") -> DatasetResult:
  """Generates, parses and scores one dataset in every mode of `settings` (see the module docstring); `split`
  names the split that `batches` read, for the record of its skipped records (DatasetResult.skipped).

  With a mesh over several processes every process must pass the same batches (the whole split, not a shard):
  the device work is split over the mesh, the outputs are gathered, and every process gets the same result.
  Raises ValueError naming the dataset on a bad metric/settings/batch, or when the split has no examples.
  """
  if metric not in METRICS:
    raise ValueError(f"dataset {dataset!r}: unknown metric {metric!r}; expected one of {METRICS}")
  settings.validate()
  ids = special_ids(tokenizer)
  ew = emotion.load(settings.format_version)
  space, sets = settings.space, None
  if token_sets is not None:
    want = (space.num_wheels, space.num_clusters, model.config.vocab_size)
    if tuple(np.shape(token_sets)) != want:
      raise ValueError(f"token_sets shape {tuple(np.shape(token_sets))} != {want}: build them with "
                       f"rewards.category_token_sets(settings.space ({space.name}), ...)")
    sets = jnp.asarray(token_sets, jnp.float32)
  extract = ((lambda text: rewards.parse_answer(text)) if isinstance(settings.extractor, str)
             else settings.extractor)
  method, key = _method(settings), jax.random.key(settings.seed)
  records: dict[str, list[dict]] = {m: [] for m in settings.modes}
  n_examples = 0
  for b, batch in enumerate(tqdm.tqdm(batches, desc=f"eval {dataset}", unit="batch", disable=not progress)):
    _check_batch(batch, dataset, b)
    real = np.asarray(batch["example_mask"], bool)
    if not real.any():
      continue
    n_examples += int(real.sum())
    inputs = rollout.batch_inputs(batch, "slow")
    for mode in settings.modes:
      # The key depends on the batch and on the mode's name, not on the order of settings.modes.
      rng = jax.random.fold_in(jax.random.fold_in(key, b), prompts.MODES.index(mode))
      roll = rollout.sample(model, params, inputs, mode=mode, num_samples=int(settings.num_samples),
                            max_new_tokens=int(settings.max_new_tokens[mode]), method=method, rng=rng, mesh=mesh,
                            **ids.sample_kwargs(mode))
      roll = sharding.to_host(roll)  # every row on every process: the same records everywhere
      texts = rollout.completion_texts(tokenizer, roll)
      logmass = anchor_ok = None
      if sets is not None:
        logmass, anchor_ok = _first_anchor_logmass(model, params, inputs, roll, ids, sets, mesh, settings.chunk_size)
      toks, lengths = np.asarray(roll.completion), np.asarray(roll.length)
      reasons = np.asarray(roll.stop_reason)
      for row, text in enumerate(texts):
        p = row // roll.num_samples
        if not real[p]:
          continue
        full = rewards.assistant_text(text, mode)
        words = [str(w).strip().lower() for w in extract(full)]
        words = [w for w in dict.fromkeys(words) if w]
        gt, gt_words = _gt(metric, batch, p)
        precision, recall = (eval_stats.space_pr(space, gt_words, words) if metric == "set"
                             else eval_stats.sample_pr(ew, gt_words, words))
        think, answer = eval_stats.segment_lengths(toks[row, :lengths[row]], mode, ids)
        rec = {"dataset": dataset, "id": str(batch["ids"][p]), "mode": mode, "sample": row % roll.num_samples,
               "completion": text, "words": words, "format_ok": rewards.format_ok(text, mode),
               "precision": precision, "recall": recall, "gt": gt, "think_tokens": think, "answer_tokens": answer,
               "stop_reason": rollout.StopReason(int(reasons[row])).name.lower(),
               "confidence": None, "gt_mass": None, "correct": None}
        if logmass is not None and anchor_ok[row]:
          rec["confidence"], rec["gt_mass"] = eval_stats.masses(space, logmass[row], gt_words, words)
          rec["correct"] = precision if rec["confidence"] is not None else None
        if metric == "waf" and not math.isnan(gt):
          s = (settings.sentiment_mapper or _vader(settings.format_version))(words)
          rec["sentiment"], rec["sentiment_correct"] = int(s), bool((gt > 0) == (s > 0))
        records[mode].append(rec)
  if not n_examples:
    raise ValueError(f"dataset {dataset!r}: the eval split has no examples (every batch was empty or padding)")
  summary = {m: summarize(metric, records[m], settings) for m in settings.modes}
  samples = [r for m in settings.modes for r in records[m]]
  analysis = {"fast_vs_slow": eval_stats.fast_vs_slow(samples)} if set(settings.modes) >= {"fast", "slow"} else {}
  return DatasetResult(dataset=dataset, metric=metric, summary=summary, samples=samples,
                       settings=settings.describe(), n_examples=n_examples, analysis=analysis,
                       skipped={split: skipped_records(batches)})


_VADER: dict[str, emotion.VaderSentimentMapper] = {}


def _vader(format_version: str) -> emotion.VaderSentimentMapper:
  if format_version not in _VADER:
    _VADER[format_version] = emotion.VaderSentimentMapper(format_version)
  return _VADER[format_version]


def evaluate(model, params, tokenizer, datasets: Mapping[str, tuple[Iterable[Mapping[str, np.ndarray]], str]], *,
             settings: EvalSettings, token_sets: np.ndarray | None = None, mesh=None,
             progress: bool = True, split: str = "eval") -> dict[str, DatasetResult]:
  """`evaluate_dataset` over `datasets`: name -> (batches, metric), in order; `split` names their split."""
  if not datasets:
    raise ValueError("evaluate needs at least one dataset")
  return {name: evaluate_dataset(model, params, tokenizer, batches, dataset=name, metric=metric, settings=settings,
                                 token_sets=token_sets, mesh=mesh, progress=progress, split=split)
          for name, (batches, metric) in datasets.items()}


def _first_anchor_logmass(model, params, inputs, roll, ids, token_sets, mesh, chunk_size):
  """(S [B, K, C], anchor_ok [B]) at each completion's first answer anchor: one grouped pass over the rollout's
  rows against the slow-rendered prompts (a fast row's suffix carries FAST_PREFIX, whose <answer> is the anchor)."""
  prompt = grouped.slow_prompt({roll.mode: roll}, inputs, vocab_size=model.config.vocab_size, pad_id=ids.pad,
                                buckets=rollout.PROMPT_BUCKETS)
  seg = grouped.segment(roll, prompt, fast_prefix_ids=ids.fast_prefix, mode_id=prompts.MODES.index(roll.mode))
  out = sharding.to_host(grouped.score_pass(model, params, prompt, [seg], chunk_size=chunk_size,
                                            token_sets=token_sets, anchors=ids.anchors(1), mesh=mesh))[0]
  b = roll.completion.shape[0]
  return out["logmass"].reshape(b, *out["logmass"].shape[2:])[:, 0], out["anchor_mask"].reshape(b, -1)[:, 0]
