"""evaluation + reports: both modes on MER-Synth records, summaries that equal a recomputation from the samples and
metrics.py / the metrics CLI, determinism, N samples, padding rows, confidence by hand, reports (with an
MME-Emotion section; the MME-Emotion side itself: tests/test_mme.py).

The policy is the tiny random model plus a token-bigram grammar (`Grammar`): the grammar makes every completion
a plausible answer (<think>..</think><answer>w, w</answer>) and the random model, which sees the prompt, breaks
the grammar's ties, so answers differ between clips and some run out of tokens (format failures).
"""

import contextlib
import dataclasses
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import metrics as metrics_cli
from merr1_jax.data import pipeline, synth
from merr1_jax.evaluation import core as evaluation
from merr1_jax.evaluation import mme, mme_judges, reports
from merr1_jax.evaluation import stats as eval_stats
from merr1_jax.models import base, mllm
from merr1_jax.task import metrics, prompts, rewards

N_TEST = 6  # with batch 4: two batches, the second with two padding rows



class Grammar:
  """PolicyModel: logits = 0.5 * tiny-model logits + `bias` * G[previous token], G a 0/1 bigram table.

  embed() appends one_hot(token) to the embedding; hidden() runs the inner decoder on the first D columns and
  carries the one-hot along, so forward == hidden @ unembed_weight holds and the scoring pass sees the same policy
  (through base.hidden_grouped's fallback on hidden(): the inner model's hidden_grouped would skip the one-hot).
  """

  hidden_grouped = None

  def __init__(self, inner, grammar_VxV, bias=30.0):
    self.inner, self.config = inner, inner.config
    self.g = jnp.asarray(grammar_VxV, jnp.float32) * bias
    self.d = inner.config.d_model

  def __getattr__(self, name):  # init_cache, init_params, partition_rules
    return getattr(self.inner, name)

  def embed(self, params, inputs):
    e = self.inner.embed(params, inputs)
    hot = jax.nn.one_hot(inputs.tokens, self.config.vocab_size, dtype=e.x.dtype)
    return e.replace(x=jnp.concatenate([e.x, hot], -1))

  def hidden(self, params, x, cache=None):
    h, cache = self.inner.hidden(params, x.replace(x=x.x[..., :self.d]), cache)
    return jnp.concatenate([h, x.x[..., self.d:].astype(h.dtype)], -1), cache

  def unembed_weight(self, params):
    return jnp.concatenate([0.5 * self.inner.unembed_weight(params), self.g], 0)

  def forward(self, params, x, cache=None):
    h, cache = self.hidden(params, x, cache)
    return base.logits_from_hidden(h, self.unembed_weight(params)), cache


def _grammar(tok, last_prompt_token: int) -> np.ndarray:
  v = tok.vocab_size
  g = np.zeros((v, v), np.float32)
  one = lambda text: tok.encode(text)[0]  # noqa: E731
  think_o, think_c = tok.id_of(prompts.THINK_OPEN), tok.id_of(prompts.THINK_CLOSE)
  ans_o, ans_c, comma = tok.id_of(prompts.ANSWER_OPEN), tok.id_of(prompts.ANSWER_CLOSE), one(",")
  words = ["happy", "sad", "angry", "worried", "calm", "surprised"]
  bare, spaced = [one(w) for w in words], [one(" " + w) for w in words]
  g[last_prompt_token, think_o] = 1
  g[think_o, one("face")] = 1
  g[one("face"), think_c] = 1
  g[think_c, ans_o] = 1
  g[ans_o, bare] = 1
  g[np.ix_(bare + spaced, [comma, ans_c])] = 1
  g[comma, spaced] = 1
  g[ans_c, tok.eos_id] = 1
  return g


def _batches(tok, records, batch_size=4, mode="slow"):
  pcfg = pipeline.PipelineConfig(kind="eval", mode=mode, batch_size=batch_size, shuffle=False, num_epochs=1,
                                 drop_remainder=False, video_dim=32, audio_dim=32, feature_dtype="float32")
  return list(pipeline.build(pipeline.BytesSource(records), tok, pcfg))


@pytest.fixture(scope="module")
def records():
  return list(synth.generate_split(synth.SynthConfig(n_train=1, n_validation=1, n_test=N_TEST), "test"))


@pytest.fixture(scope="module")
def batches(tok, records):
  return _batches(tok, records)


@pytest.fixture(scope="module")
def policy(tok, batches):
  inner = mllm.build("tiny", vocab_size=tok.vocab_size, video_dim=32, audio_dim=32, d_model=64, num_heads=2,
                     num_kv_heads=1, head_dim=32, mlp_dim=128, init_std=0.3, max_seq_len=512,
                     video_token_id=tok.id_of(prompts.VIDEO_TOKEN), audio_token_id=tok.id_of(prompts.AUDIO_TOKEN))
  last = int(batches[0]["prompt_tokens"][0, -1])
  return Grammar(inner, _grammar(tok, last)), inner.init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def token_sets(tok):
  return rewards.category_token_sets(rewards.LabelSpace.emotion_wheel("2025"), tok.encode, tok.vocab_size)


SETTINGS = dict(max_new_tokens={"slow": 12, "fast": 5}, format_version="2025", seed=0)


@pytest.fixture(scope="module")
def result(tok, policy, batches, token_sets):
  model, params = policy
  return evaluation.evaluate_dataset(model, params, tok, batches, dataset="mer_synth", metric="ov",
                                     settings=evaluation.EvalSettings(**SETTINGS), token_sets=token_sets,
                                     progress=False)


# ------------------------------------------------------------------------------------------ evaluate


def test_both_modes_and_padding_rows_skipped(result, records):
  assert set(result.summary) == {"fast", "slow"} and result.n_examples == N_TEST
  for mode in ("fast", "slow"):
    rows = [s for s in result.samples if s["mode"] == mode]
    assert sorted(s["id"] for s in rows) == sorted(r.id for r in records)  # no padding row, none missing
    by_id = {r.id: list(r.openset) for r in records}
    assert all(s["gt"] == by_id[s["id"]] for s in rows)
  # The grammar makes the test meaningful: some answers are well formed and score, some run out of tokens.
  ok = [s for s in result.samples if s["format_ok"]]
  assert ok and len(ok) < len(result.samples)
  assert any(s["precision"] > 0 for s in ok)
  assert any(s["think_tokens"] == 1 for s in result.samples if s["mode"] == "slow")  # <think>face</think>


def test_summary_equals_recomputation_from_samples(result):
  space = rewards.LabelSpace.emotion_wheel("2025")
  for mode, s in result.summary.items():
    rows = [r for r in result.samples if r["mode"] == mode]
    ov = metrics.ov_score([r["gt"] for r in rows], [r["words"] for r in rows])
    for k in ("f", "precision", "recall"):
      assert s[k] == pytest.approx(ov[k], abs=1e-12)
    # Format failures by rewards.format_ok on the raw completion, words by parse_answer on the assistant turn.
    assert s["format_failure_rate"] == pytest.approx(np.mean([not rewards.format_ok(r["completion"], mode)
                                                              for r in rows]))
    for r in rows:
      assert r["words"] == list(rewards.parse_answer(rewards.assistant_text(r["completion"], mode)))
    assert s["mean_num_emotions"] == pytest.approx(np.mean([len(r["words"]) for r in rows]))
    lens = [r["answer_tokens"] for r in rows if r["answer_tokens"] is not None]
    if lens:
      assert s["answer_tokens"]["mean"] == pytest.approx(np.mean(lens))
      assert s["answer_tokens"]["p90"] == pytest.approx(np.percentile(lens, 90))
    conf = [r["confidence"] for r in rows if r["confidence"] is not None]
    assert conf and s["confidence_mean"] == pytest.approx(np.mean(conf))
    # Per-sample P/R against an independent implementation: rewards.set_rewards on multi-hot cluster arrays.
    pred, _ = space.encode_batch([r["words"] for r in rows])
    gt, _ = space.encode_batch([r["gt"] for r in rows])
    rec, prec, _ = (np.asarray(x) for x in rewards.set_rewards(jnp.asarray(pred), jnp.asarray(gt)))
    np.testing.assert_allclose([r["precision"] for r in rows], prec, atol=1e-6)
    np.testing.assert_allclose([r["recall"] for r in rows], rec, atol=1e-6)


def test_set_metric_under_the_identity_and_the_wheel_spaces(result):
  """Metric 'set' (a label space other than the wheels at level 1): by hand under MER-Synth's identity space, and
  equal to the OV score when the space is the level-1 wheels themselves (same arithmetic, metrics.set_score)."""
  settings = evaluation.EvalSettings(**SETTINGS)
  for mode in ("fast", "slow"):
    recs = [s for s in result.samples if s["mode"] == mode]
    ov = evaluation.dataset_metric("ov", recs, settings)
    wheels = evaluation.dataset_metric("set", recs, settings)  # label_space None: the level-1 wheels
    for k in ("f", "precision", "recall"):
      assert wheels[k] == pytest.approx(ov[k], abs=1e-12)
    identity = evaluation.EvalSettings(**SETTINGS, label_space=rewards.LabelSpace.closed(synth.EMOTIONS))
    got = evaluation.dataset_metric("set", recs, identity)
    ps, rs = [], []
    for r in recs:  # exact words: the GT words are all MER-Synth labels, predictions count only in-list words
      g, p = set(r["gt"]), {w for w in r["words"] if w in synth.EMOTIONS}
      ps.append(len(g & p) / len(p) if p else 0.0)
      rs.append(len(g & p) / len(g))
    p, rec = np.mean(ps), np.mean(rs)
    assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(rec)
    assert got["f"] == pytest.approx(2 * p * rec / (p + rec) if p + rec else 0.0)
    assert got["label_space"] == "closed" and wheels["label_space"].startswith("emotion_wheel_2025_level1")


def test_answer_lengths_by_hand(tok, result):
  for r in result.samples:
    if r["format_ok"]:  # "<answer>w, w</answer>": the tokens between the tags
      body = rewards.extract_answer(rewards.assistant_text(r["completion"], r["mode"]))
      assert r["answer_tokens"] == len(tok.encode(body))


def test_confidence_by_hand(tok, policy, batches, token_sets, result):
  """Fast row: the first anchor is the prompt's <answer>; recompute its next-token softmax with one uncached
  forward pass over the unpadded prompt and sum the probabilities of the predicted clusters' token sets."""
  model, params = policy
  b = batches[0]
  row = next(r for r in result.samples if r["mode"] == "fast" and r["id"] == b["ids"][0] and r["words"])
  m = b["prompt_mask"][0]
  ids = evaluation.special_ids(tok)
  toks = np.concatenate([b["prompt_tokens"][0][m], ids.fast_prefix]).astype(np.int32)
  pos = np.arange(len(toks), dtype=np.int32)
  n_v, n_a = int(b["video_mask"][0].sum()), int(b["audio_mask"][0].sum())
  x = base.ModelInputs(tokens=jnp.asarray(toks[None]), positions=jnp.asarray(pos[None]),
                       mask=jnp.ones((1, len(toks)), bool), video=jnp.asarray(b["video"][:1, :n_v]),
                       video_mask=jnp.ones((1, n_v), bool), audio=jnp.asarray(b["audio"][:1, :n_a]),
                       audio_mask=jnp.ones((1, n_a), bool))
  fwd = jax.jit(lambda p, x: model.forward(p, model.embed(p, x))[0])
  logits = np.asarray(fwd(params, x))[0, -1].astype(np.float64)
  p_V = np.exp(logits - logits.max())
  p_V /= p_V.sum()
  space = rewards.LabelSpace.emotion_wheel("2025")
  pred, _ = space.encode(row["words"])
  gt, _ = space.encode(row["gt"])
  wheels = gt.any(-1)
  mass_KxC = np.einsum("kcv,v->kc", token_sets.astype(np.float64), p_V)
  assert row["confidence"] == pytest.approx((mass_KxC * pred).sum(-1)[wheels].mean(), abs=1e-4)
  assert row["gt_mass"] == pytest.approx((mass_KxC * gt).sum(-1)[wheels].mean(), abs=1e-4)
  assert row["correct"] == row["precision"]


def _metrics_cli(*argv) -> dict:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert metrics_cli.main([*argv, "--json"]) == 0
  return json.loads(out.getvalue())


def test_ov_equals_metrics_cli_on_the_written_csvs(tmp_path, result):
  """The report's labels/predictions CSVs (name,openset) scored by the metrics CLI give the report's numbers;
  the subprocess version of this check runs in test_evaluate_cli.py."""
  reports.write_reports({"mer_synth": result}, tmp_path / "eval", meta={})
  out = tmp_path / "eval"
  info = json.loads((out / "report.json").read_text())["datasets"]["mer_synth"]["csv"]
  assert info == {"labels": "labels_mer_synth.csv", "n_cells_not_representable": 0,
                  "predictions": {"fast": ["predictions_mer_synth_fast.csv"],
                                  "slow": ["predictions_mer_synth_slow.csv"]}}
  assert any(r["words"] for r in result.samples) and any(not r["words"] for r in result.samples)  # both kinds
  for mode in ("fast", "slow"):
    cli = _metrics_cli("ov", "--gt", str(out / info["labels"]), "--pred", str(out / info["predictions"][mode][0]))
    for k in ("f", "precision", "recall"):
      assert result.summary[mode][k] == pytest.approx(cli[k], abs=1e-12)
    assert cli["n_pred_unmatched"] == 0 and cli["pred_words_dropped"] == result.summary[mode]["pred_words_dropped"]


def _fake_result(dataset, metric, samples, summary=None, num_samples=1):
  return evaluation.DatasetResult(dataset=dataset, metric=metric, summary=summary or {}, samples=samples,
                                  settings={"num_samples": num_samples}, n_examples=len(samples))


def _row(i, mode, words, gt, sample=0):
  return {"id": i, "mode": mode, "sample": sample, "words": words, "gt": gt}


def test_prediction_csvs_by_hand():
  rows = [_row("a", "fast", ["happy", "sad"], ["happy"]), _row("b", "fast", [], ["sad", "calm"]),
          _row("c", "fast", ["it's fine"], ["calm"])]
  texts, info = reports.prediction_csvs(_fake_result("d/x", "ov", rows))
  assert texts == {"labels_d_x.csv": 'name,openset\na,[happy]\nb,"[sad, calm]"\nc,[calm]\n',
                   "predictions_d_x_fast.csv": 'name,openset\na,"[happy, sad]"\nb,[]\nc,[it\'s fine]\n'}
  assert info["n_cells_not_representable"] == 1  # "it's fine": upstream splits on the quote
  # N samples: one predictions file per mode and sample index; the labels once.
  rows = [_row(i, m, ["happy"], ["sad"], sample=k) for m in ("fast", "slow") for i in ("a", "b") for k in (0, 1)]
  texts, info = reports.prediction_csvs(_fake_result("x", "hit", rows, num_samples=2))
  assert sorted(texts) == ["labels_x.csv", "predictions_x_fast_sample0.csv", "predictions_x_fast_sample1.csv",
                           "predictions_x_slow_sample0.csv", "predictions_x_slow_sample1.csv"]
  assert texts["labels_x.csv"] == "name,openset\na,[sad]\nb,[sad]\n"
  assert reports.prediction_csvs(_fake_result("x", "waf", rows))[0] == {}  # valence GT: no word list
  dup = [_row("a", "fast", [], []), _row("a", "fast", [], [])]
  texts, info = reports.prediction_csvs(_fake_result("x", "ov", dup))
  assert texts == {} and "duplicate id 'a'" in info["skipped"]


def _gap_result(like, name, fast, slow, metric="ov"):
  """`like` (a real result) with its headline numbers replaced: (fast, slow)."""
  key = evaluation.HEADLINE[metric]
  summary = {"fast": dict(like.summary["fast"], **{key: fast}), "slow": dict(like.summary["slow"], **{key: slow})}
  return dataclasses.replace(like, dataset=name, metric=metric, summary=summary)


@pytest.mark.parametrize("before, after, verdict", [
    ((0.50, 0.40), (0.50, 0.55), "closed"),  # gap -0.10 -> +0.05
    ((0.50, 0.40), (0.50, 0.50), "closed"),  # -> 0: not behind any more
    ((0.50, 0.40), (0.50, 0.45), "narrowed, not closed"),
    ((0.50, 0.40), (0.60, 0.45), "not closed"),  # -0.10 -> -0.15
    ((0.40, 0.50), (0.50, 0.60), "no gap to close"),  # slow was ahead before, and still is
    ((0.40, 0.40), (0.50, 0.30), "opened"),  # level before, slow behind after
])
def test_gap_change_by_hand(tmp_path, result, before, after, verdict):
  base = {"source": "sft/report.json",
          "datasets": {"d": {"metric": "ov", "summary": _gap_result(result, "d", *before).summary}}}
  results = {"d": _gap_result(result, "d", *after), "other": _gap_result(result, "other", 0.1, 0.2, metric="hit")}
  g = reports.gap_change(results, base)
  want_before, want_after = before[1] - before[0], after[1] - after[0]
  assert g["d"]["before"] == pytest.approx(want_before) and g["d"]["after"] == pytest.approx(want_after)
  assert g["d"]["verdict"] == verdict
  assert g["d"]["statement"] == (f"d: slow-fast OV f gap {100 * want_before:+.2f} -> {100 * want_after:+.2f} "
                                 f"points ({verdict})")
  assert "not in the baseline" in g["other"]["reason"] and "verdict" not in g["other"]
  reports.write_reports(results, tmp_path / "eval", meta={}, baseline=base)
  assert json.loads((tmp_path / "eval" / "report.json").read_text())["gap_change"]["d"]["verdict"] == verdict
  md = (tmp_path / "eval" / "report.md").read_text()
  assert "baseline: sft/report.json" in md and f"- {g['d']['statement']}" in md
  # Another metric in the baseline for the same name is not compared.
  base["datasets"]["d"]["metric"] = "hit"
  assert "'hit'" in reports.gap_change(results, base)["d"]["reason"]


def test_greedy_is_deterministic_and_n_samples(tok, policy, batches, result):
  model, params = policy
  again = evaluation.evaluate_dataset(model, params, tok, batches, dataset="mer_synth", metric="ov",
                                      settings=evaluation.EvalSettings(**SETTINGS), progress=False)
  assert [r["completion"] for r in again.samples] == [r["completion"] for r in result.samples]
  assert all(r["confidence"] is None for r in again.samples)  # no token_sets, no confidence
  n = 3
  multi = evaluation.evaluate_dataset(model, params, tok, batches[:1], dataset="mer_synth", metric="ov",
                                      settings=evaluation.EvalSettings(modes=("fast",), num_samples=n,
                                                                       temperature=2.0, **SETTINGS),
                                      progress=False)
  ids = [i for i in batches[0]["ids"] if i]
  for i in ids:
    rows = [r for r in multi.samples if r["id"] == i]
    assert sorted(r["sample"] for r in rows) == list(range(n))
  assert len({r["completion"] for r in multi.samples}) > len(ids)  # real samples, not N copies
  s = multi.summary["fast"]
  assert s["n_samples"] == n * len(ids) and s["n_prompts"] == len(ids)
  # best_of_n by hand: per prompt the sample with the highest per-sample F1 (first on ties), then ov_score.
  best = []
  for i in ids:
    rows = [r for r in multi.samples if r["id"] == i]
    f1 = [2 * r["precision"] * r["recall"] / (r["precision"] + r["recall"]) if r["precision"] + r["recall"] else 0
          for r in rows]
    best.append(rows[int(np.argmax(f1))])
  ov = metrics.ov_score([r["gt"] for r in best], [r["words"] for r in best])
  assert s["best_of_n"]["f"] == pytest.approx(ov["f"]) and s["best_of_n"]["f"] >= s["f"] - 1e-12


def test_custom_extractor_is_used_and_named(tmp_path, tok, policy, batches):
  model, params = policy
  seen = []

  def always_calm(text):
    seen.append(text)
    return ["Calm", "calm", " happy "]

  r = evaluation.evaluate_dataset(model, params, tok, batches[:1], dataset="mer_synth", metric="ov",
                                  settings=evaluation.EvalSettings(modes=("fast",), extractor=always_calm,
                                                                   **SETTINGS), progress=False)
  assert all(s["words"] == ["calm", "happy"] for s in r.samples)  # lowercased, stripped, de-duplicated
  assert seen and all(t.startswith(prompts.FAST_PREFIX) for t in seen)  # it gets the whole assistant turn
  reports.write_reports({"mer_synth": r}, tmp_path / "eval", meta={"checkpoint": "test"})
  rep = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert "always_calm" in rep["meta"]["extractor"]
  assert "always_calm" in (tmp_path / "eval" / "report.md").read_text()


def test_hit_and_waf_datasets(tok, policy, records):
  model, params = policy
  # A basic-emotion set (one-hot labels) and a sentiment set (valence), from the same clips.
  batches = _batches(tok, records[:4])
  settings = evaluation.EvalSettings(modes=("fast",), **SETTINGS)
  hit = evaluation.evaluate_dataset(model, params, tok, batches, dataset="basic", metric="hit", settings=settings,
                                    progress=False)
  rows = hit.samples
  assert [r["gt"] for r in rows] == [[rec.onehot] for rec in records[:4]]
  assert hit.summary["fast"]["hit"] == pytest.approx(
      metrics.hit_rate([r["gt"] for r in rows], [r["words"] for r in rows])["hit"])

  def sign_of_happy(words):
    return 1 if "happy" in words else -1

  waf = evaluation.evaluate_dataset(model, params, tok, batches, dataset="senti", metric="waf",
                                    settings=evaluation.EvalSettings(modes=("fast",), sentiment_mapper=sign_of_happy,
                                                                     **SETTINGS), progress=False)
  rows = waf.samples
  y = [r["gt"] > 0 for r in rows]
  yhat = [sign_of_happy(r["words"]) > 0 for r in rows]
  assert waf.summary["fast"]["acc"] == pytest.approx(np.mean([a == b for a, b in zip(y, yhat)]))
  assert waf.summary["fast"]["waf"] == pytest.approx(metrics.weighted_f1(y, yhat))
  assert [r["sentiment_correct"] for r in rows] == [a == b for a, b in zip(y, yhat)]


def test_bad_input(tok, policy, records, batches):
  model, params = policy
  s = evaluation.EvalSettings(modes=("fast",), **SETTINGS)
  with pytest.raises(ValueError, match="unknown metric 'f1'"):
    evaluation.evaluate_dataset(model, params, tok, batches, dataset="x", metric="f1", settings=s)
  with pytest.raises(ValueError, match="'x'.*no examples"):
    evaluation.evaluate_dataset(model, params, tok, [], dataset="x", metric="ov", settings=s, progress=False)
  with pytest.raises(ValueError, match="fast mode"):
    evaluation.evaluate_dataset(model, params, tok, _batches(tok, records[:2], mode="fast"), dataset="x",
                                metric="ov", settings=s, progress=False)
  with pytest.raises(ValueError, match="max_new_tokens\\['slow'\\]"):
    evaluation.EvalSettings(**(SETTINGS | {"max_new_tokens": {"fast": 4}})).validate()
  with pytest.raises(ValueError, match="token_sets shape"):
    evaluation.evaluate_dataset(model, params, tok, batches, dataset="x", metric="ov", settings=s,
                                token_sets=np.zeros((5, 3, 7), bool))


def test_segment_lengths_and_calibration_bins_by_hand(tok):
  ids = evaluation.special_ids(tok)
  t = lambda text: tok.encode(text)  # noqa: E731
  slow = t("<think>face sad</think><answer>sad, calm</answer>")
  think, answer = eval_stats.segment_lengths(slow, "slow", ids)
  assert think == len(t("face sad")) and answer == len(t("sad, calm"))
  assert eval_stats.segment_lengths(t("sad, calm</answer>"), "fast", ids) == (0, len(t("sad, calm")))
  assert eval_stats.segment_lengths(t("<think>face"), "slow", ids) == (None, None)
  cal = eval_stats.calibration_bins([0.05, 0.15, 0.95, 1.0], [0.0, 1.0, 1.0, 0.5], n_bins=10)
  # bins 0, 1, 9: |0.05-0| * 1/4 + |0.15-1| * 1/4 + |0.975-0.75| * 2/4
  assert cal["ece"] == pytest.approx(0.05 / 4 + 0.85 / 4 + 0.225 / 2)
  assert [b["n"] for b in cal["bins"]] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]


# ----------------------------------------------------------------------------------------------- reports


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_reports_files(tmp_path, result):
  other = evaluation.DatasetResult(dataset="ovmerd", metric="ov", summary=result.summary, samples=result.samples,
                                   settings=result.settings, n_examples=result.n_examples)
  files = reports.write_reports({"mer_synth": result, "ovmerd": other}, tmp_path / "eval",
                                meta={"checkpoint": "ckpt/7"})
  out = tmp_path / "eval"
  assert sorted(p.name for p in out.iterdir()) == sorted(files) and all(p.exists() for p in files.values())
  rep = json.loads((out / "report.json").read_text())
  assert rep["meta"]["checkpoint"] == "ckpt/7" and "parse_answer" in rep["meta"]["extractor"]
  assert "VADER" in rep["meta"]["sentiment_mapper"]
  assert rep["datasets"]["mer_synth"]["summary"]["slow"]["f"] == pytest.approx(result.summary["slow"]["f"])
  assert rep["mean"]["fast"] == pytest.approx(result.summary["fast"]["f"])  # both columns hold the same run
  md = (out / "report.md").read_text()
  header = next(line for line in md.splitlines() if line.startswith("| mode |"))
  assert "mer_synth (OV)" in header and "ovmerd (OV)" in header and header.rstrip().endswith("Mean |")
  fast_row = next(line for line in md.splitlines() if line.startswith("| fast |"))
  assert f"{100 * result.summary['fast']['f']:.2f}" in fast_row
  lines = (out / "samples.jsonl").read_text().splitlines()
  assert len(lines) == 2 * len(result.samples)
  first = json.loads(lines[0])
  assert {"id", "mode", "completion", "words", "precision", "recall"} <= set(first)
  for name in ("pr_mer_synth.png", "pr_ovmerd.png", "set_sizes.png", "calibration_fast.png",
               "calibration_slow.png"):
    data = (out / name).read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w > 100 and h > 100


def test_reports_with_mme(tmp_path, result):
  items = [mme.JudgeItem.from_completion(s["id"], "ER-Lab", s["gt"], s["completion"])
           for s in result.samples if s["mode"] == "slow"]
  scores = mme.run_mme(items, mme_judges.RuleJudge())
  reports.write_reports({"mer_synth": result}, tmp_path / "eval", meta={}, mme=scores)
  out = tmp_path / "eval"
  assert json.loads((out / "mme.json").read_text()) == json.loads((out / "report.json").read_text())["mme"]
  assert "items" not in json.loads((out / "mme.json").read_text())
  assert mme.mme_report(out / "mme_judge.jsonl")["overall"] == pytest.approx(scores["overall"])
  assert "## MME-Emotion (judge: rule-v1:2025)" in (out / "report.md").read_text()


def test_reports_are_atomic(tmp_path, result, monkeypatch):
  out = tmp_path / "eval"

  def boom(*a, **k):
    raise KeyboardInterrupt("Ctrl-C while plotting")

  monkeypatch.setattr(reports.report_plots, "sizes_plot", boom)
  with pytest.raises(KeyboardInterrupt):
    reports.write_reports({"mer_synth": result}, out, meta={})
  assert not (out / "report.json").exists() and list(tmp_path.iterdir()) == []  # no temp dir left either
  monkeypatch.undo()
  reports.write_reports({"mer_synth": result}, out, meta={"checkpoint": "first"})
  monkeypatch.setattr(reports.report_plots, "calibration_plot", boom)
  with pytest.raises(KeyboardInterrupt):
    reports.write_reports({"mer_synth": result}, out, meta={"checkpoint": "second"})
  # The complete earlier report is still there, untouched.
  assert json.loads((out / "report.json").read_text())["meta"]["checkpoint"] == "first"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]


def test_json_safe():
  assert reports.json_safe({"a": float("nan"), "b": (np.float32(0.5), math.inf)}) == {"a": None, "b": [0.5, None]}


# ------------------------------------------------------------------ skipped records and report folders (issue 23)


def test_skipped_records_are_counted_and_named_in_the_result_and_report(tmp_path, tok, policy, records):
  """Records the eval pipeline skips as bad are part of the result (count and ids per split) and of
  report.json/report.md: one unreadable record (named by its index in the source), one whose video features
  have the wrong width (named by its id)."""
  model, params = policy
  bad = dataclasses.replace(records[0], id="clip_narrow", video=records[0].video[:, :16])
  source = pipeline.BytesSource([records[0], b"not a record", records[1], bad, records[2], records[3]])
  pcfg = pipeline.PipelineConfig(kind="eval", mode="slow", batch_size=4, shuffle=False, num_epochs=1,
                                 drop_remainder=False, video_dim=32, audio_dim=32, feature_dtype="float32",
                                 on_bad_record="skip")
  batches = pipeline.build(source, tok, pcfg)
  r = evaluation.evaluate_dataset(model, params, tok, batches, dataset="mer_synth", metric="ov",
                                  settings=evaluation.EvalSettings(modes=("fast",), **SETTINGS), progress=False,
                                  split="test")
  want = {"test": {"count": 2, "ids": [1, "clip_narrow"]}}
  assert r.n_examples == 4 and r.skipped == want
  reports.write_reports({"mer_synth": r}, tmp_path / "eval", meta={})
  assert json.loads((tmp_path / "eval" / "report.json").read_text())["datasets"]["mer_synth"]["skipped"] == want
  assert "- **skipped as bad records**: mer_synth test: 2 (ids 1, clip_narrow)" in (
      tmp_path / "eval" / "report.md").read_text()
  # Batches without a pipeline's log (a list) skipped nothing here.
  listed = evaluation.evaluate_dataset(model, params, tok, list(batches), dataset="mer_synth", metric="ov",
                                       settings=evaluation.EvalSettings(modes=("fast",), **SETTINGS),
                                       progress=False, split="test")
  assert listed.skipped == {"test": {"count": 0, "ids": []}}


class _Writer:
  def __init__(self):
    self.rows = []

  def write(self, stage, step, metrics):
    self.rows.append((stage, step))


def test_trainer_eval_and_results_record_skipped_records(tmp_path, tok, policy, records, token_sets):
  """The trainer's eval_<stage>.json, results.json and results.md carry the eval split's skipped records."""
  import types  # noqa: PLC0415

  from merr1_jax.training import trainer as train  # noqa: PLC0415

  model, params = policy
  source = pipeline.BytesSource([records[0], b"not a record", records[1]])
  pcfg = pipeline.PipelineConfig(kind="eval", mode="slow", batch_size=4, shuffle=False, num_epochs=1,
                                 drop_remainder=False, video_dim=32, audio_dim=32, feature_dtype="float32",
                                 on_bad_record="skip")
  ns = types.SimpleNamespace
  config = ns(data=ns(name="mer_synth", eval_split="test"), log=ns(progress=False))
  data = ns(eval_datasets=lambda: {"mer_synth": (pipeline.build(source, tok, pcfg), "ov")})
  run = ns(model=model, tokenizer=tok, data=data, eval_settings=evaluation.EvalSettings(**SETTINGS),
           eval_token_sets=token_sets, mesh=None, config=config, writer=_Writer(), workdir=tmp_path)
  ev = train._eval(run, params, "sft", 3)
  want = {"test": {"count": 1, "ids": [1]}}
  assert json.loads((tmp_path / "eval_sft.json").read_text())["skipped"] == {"mer_synth": want}
  train._write_results(run, {"sft": ev})
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["sft"]["skipped"] == want and set(results["sft"]) == {"fast", "slow", "skipped"}
  assert "Skipped as bad records:\n- sft: mer_synth test: 1 (ids 1)\n" in (tmp_path / "results.md").read_text()


def _tree(root) -> dict:
  return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def test_reports_never_replace_a_folder_that_is_not_a_report(tmp_path, result, monkeypatch):
  """write_reports replaces only an absent or empty folder or an earlier report (its marker file); it refuses
  the workdir, a folder around it or in its checkpoints, a file and someone else's folder, changing nothing."""
  w = tmp_path / "w"
  (w / "checkpoints" / "sft").mkdir(parents=True)
  (w / "results.json").write_text("{}")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  cases = [(w, "is the workdir"), (tmp_path, "contains the workdir"), (w / "checkpoints" / "sft" / "r",
           "is inside the workdir's checkpoints"), (tmp_path / "mine", "not a report of merr1_jax.evaluate"),
           (tmp_path / "mine" / "notes.txt", "is not a folder"), (w / "eval" / "..", "is the workdir")]
  before = _tree(tmp_path)
  for out, why in cases:
    with pytest.raises(reports.ReportDirError, match=why) as e:
      reports.write_reports({"mer_synth": result}, out, meta={}, workdir=w)
    assert str(e.value).startswith(f"report folder {out}: ")
    assert _tree(tmp_path) == before, out
  # A file that appears in an empty folder while the report is written: refused at the swap, the file kept.
  (tmp_path / "empty").mkdir()
  real = reports.report_plots.sizes_plot

  def meanwhile(*a, **k):
    (tmp_path / "empty" / "theirs.txt").write_text("theirs")
    return real(*a, **k)

  monkeypatch.setattr(reports.report_plots, "sizes_plot", meanwhile)
  with pytest.raises(reports.ReportDirError, match="not a report"):
    reports.write_reports({"mer_synth": result}, tmp_path / "empty", meta={})
  assert [p.name for p in (tmp_path / "empty").iterdir()] == ["theirs.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "w"]  # no temp folder left
  monkeypatch.undo()
  # An earlier report of ours is replaced whole; so is a folder marked by hand.
  files = reports.write_reports({"mer_synth": result}, w / "eval", meta={"checkpoint": "first"}, workdir=w)
  assert files[reports.MARKER].is_file()
  (w / "eval" / "stale.txt").write_text("from the first report")
  reports.write_reports({"mer_synth": result}, w / "eval", meta={"checkpoint": "second"}, workdir=w)
  assert json.loads((w / "eval" / "report.json").read_text())["meta"]["checkpoint"] == "second"
  assert not (w / "eval" / "stale.txt").exists() and (w / "eval" / reports.MARKER).is_file()
