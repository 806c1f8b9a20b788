"""Dataset-level metrics (metrics.md §2-§4, §6) against hand calculations, and the CLI."""

import json
import math
import random
import re
import subprocess
import sys

import pytest

from merr1_jax import emotion
from merr1_jax import metrics as metrics_cli

# ---------------------------------------------------------------------------------------------------------------
from merr1_jax.task import metrics

# OV score


def _f(p, r):
  return 2 * p * r / (p + r) if p + r else 0.0


def test_ov_worked_example():
  """metrics.md §1 worked example: per-wheel precision and recall from the doc's table."""
  table = [(1, 0.5), (1, 1), (0.5, 1), (1, 1), (0.5, 0.5)]  # (precision, recall) for W1..W5
  out = metrics.ov_score(["[excited, joyful, happy]"], [["happy", "satisfied"]])
  assert out["n_samples"] == 1 and len(out["per_wheel"]) == 5
  for (p, r), w in zip(table, out["per_wheel"]):
    assert (w["precision"], w["recall"], w["n_scored"], w["n_skipped"]) == (p, r, 1, 0)
    assert math.isclose(w["f"], _f(p, r))
  assert math.isclose(out["precision"], (1 + 1 + 0.5 + 1 + 0.5) / 5)
  assert math.isclose(out["recall"], (0.5 + 1 + 1 + 1 + 0.5) / 5)
  assert math.isclose(out["f"], (2 / 3 + 1 + 2 / 3 + 1 + 0.5) / 5)  # the mean of the per-wheel F (upstream)


def test_ov_is_f_of_averaged_p_and_r_not_mean_sample_f1():
  # "sad" maps to sad in every wheel and "angry" to a different cluster in every wheel (metrics.md §1 table).
  gt = [["sad"], ["sad", "angry"]]
  pred = [["sad", "angry"], ["sad"]]
  # Sample 1: p = 1/2, r = 1; sample 2: p = 1, r = 1/2. P = R = 3/4, so F = 3/4.
  # The mean per-sample F1 would be (2/3 + 2/3) / 2 = 2/3 instead.
  out = metrics.ov_score(gt, pred)
  for w in out["per_wheel"]:
    assert math.isclose(w["precision"], 0.75) and math.isclose(w["recall"], 0.75)
    assert math.isclose(w["f"], 0.75) and not math.isclose(w["f"], 2 / 3)
  assert math.isclose(out["f"], 0.75)


def test_ov_skips_empty_gt_and_scores_empty_pred_as_zero():
  gt = ["[neutral]", "nan", float("nan"), "[sad]", "[sad]", "[surprise]"]
  pred = ["[sad]", "[sad]", "[sad]", "[]", "[xyzzy, sad]", "[surprise]"]
  out = metrics.ov_score(gt, pred)
  # W1-W4: samples 4-6 scored: (0, 0), (1, 1), (1, 1) -> P = R = 2/3.  W5: "surprise" is dropped -> 2 scored.
  for w in out["per_wheel"][:4]:
    assert (w["n_scored"], w["n_skipped"]) == (3, 3)
    assert math.isclose(w["precision"], 2 / 3) and math.isclose(w["recall"], 2 / 3)
  w5 = out["per_wheel"][4]
  assert (w5["n_scored"], w5["n_skipped"]) == (2, 4) and math.isclose(w5["precision"], 0.5)
  # Dropped = words that are no format-table key. The string "nan" is a word (only a float NaN is empty).
  assert out["gt_words_dropped"] == 2 and out["pred_words_dropped"] == 1  # neutral, nan; xyzzy


def test_ov_nothing_scored_is_nan_and_bad_input_raises():
  out = metrics.ov_score(["[neutral]"], ["[happy]"])
  assert all(math.isnan(out[k]) for k in ("f", "precision", "recall"))
  with pytest.raises(ValueError, match="aligned"):
    metrics.ov_score(["[sad]"], [])
  with pytest.raises(ValueError, match=r"pred\[1\]"):
    metrics.ov_score(["a", "b"], ["a", 3])
  with pytest.raises(ValueError, match="level"):
    metrics.ov_score(["a"], ["a"], level=3)
  with pytest.raises(ValueError, match="format_version"):
    metrics.ov_score(["a"], ["a"], format_version="2027")


def test_ov_level2_and_format_version():
  ew = emotion.load("2025")
  # A level-2 score of a word against itself is perfect wherever the word maps.
  out = metrics.ov_score([["lonely"]], [["lonely"]], level=2)
  assert out["level"] == 2 and all(w["f"] == 1.0 for w in out["per_wheel"] if w["n_scored"])
  # GT "fear" vs pred "worried": through the 2025 "fearless" entry, fear maps to happy / joyful / genius / joyful in
  # W2-W5 (positive clusters, none of them worried's), so only W1 (scared) agrees; 2026 agrees in every wheel.
  old = metrics.ov_score([["fear"]], [["worried"]], format_version="2025")
  new = metrics.ov_score([["fear"]], [["worried"]], format_version="2026")
  assert [w["recall"] for w in new["per_wheel"]] == [1.0] * 5
  expected_old = [float(ew.map_word("fear", k) == ew.map_word("worried", k)) for k in range(1, 6)]
  assert [w["recall"] for w in old["per_wheel"]] == expected_old == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_m_avg():
  out = metrics.m_avg([["happy"]], [["happy"]])
  assert out["metrics"][:2] == ["case1", "case2"] and len(out["values"]) == 12
  assert out["metrics"][2:] == [f"case3_wheel{k}_level{l}" for k in range(1, 6) for l in (1, 2)]
  assert out["values"] == [1.0] * 12 and out["m_avg"] == 1.0
  # "joyful" vs "happy": each of the 12 mappings scores 1 exactly when it sends both words to the same label.
  out = metrics.m_avg([["joyful"]], [["happy"]])
  ew = emotion.load()
  expected = [float(ew.case1("joyful") == ew.case1("happy")), float(ew.case2("joyful") == ew.case2("happy"))]
  expected += [float(ew.map_word("joyful", k, l) == ew.map_word("happy", k, l)) for k in range(1, 6) for l in (1, 2)]
  assert out["values"] == expected
  # By hand: case1 differs (raw words joy < joyful vs happiness < happy), case2 agrees (joy). Level 1 agrees in
  # every wheel. At level 2, "joyful"'s first known candidate in W1/W2 is the level-1 word "happy", which stands
  # for its alphabetically first level-2 word "accepted", while "happy" reaches "content" first (a level-3
  # word under "joyful" in W1, a level-2 word in W2).
  assert expected == [0, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1]
  assert math.isclose(out["m_avg"], 9 / 12)
  ov1 = metrics.ov_score([["joyful"]], [["happy"]])
  assert [out["per_metric"][f"case3_wheel{k}_level1"]["f"] for k in range(1, 6)] == [w["f"] for w in ov1["per_wheel"]]


# ---------------------------------------------------------------------------------------------------------------
# HIT


def test_hit_rate_by_hand():
  gt = ["happy", "neutral", "surprise"]
  pred = [["joy", "sad"], ["happy"], ["angry"]]
  out = metrics.hit_rate(gt, pred)
  # W1-W4: sample 1 hits, sample 2 (neutral) skipped, sample 3 misses -> 1/2. W5: "surprise" is dropped there,
  # so only sample 1 is scored -> 1.
  assert [w["hit"] for w in out["per_wheel"]] == [0.5, 0.5, 0.5, 0.5, 1.0]
  assert [w["n_scored"] for w in out["per_wheel"]] == [2, 2, 2, 2, 1]
  assert [w["n_skipped"] for w in out["per_wheel"]] == [1, 1, 1, 1, 2]
  assert math.isclose(out["hit"], (4 * 0.5 + 1.0) / 5)
  assert out["gt_words_dropped"] == 1 and out["pred_words_dropped"] == 0  # "neutral"


# ---------------------------------------------------------------------------------------------------------------
# WAF


def _reference_weighted_f1(y_true, y_pred):
  """Independent weighted F1 from a confusion matrix (rows: true, columns: predicted)."""
  labels = sorted(set(y_true) | set(y_pred))
  idx = {l: i for i, l in enumerate(labels)}
  cm = [[0] * len(labels) for _ in labels]
  for t, p in zip(y_true, y_pred):
    cm[idx[t]][idx[p]] += 1
  total = 0.0
  for i in range(len(labels)):
    support = sum(cm[i])
    predicted = sum(row[i] for row in cm)
    tp = cm[i][i]
    f1 = 2 * tp / (support + predicted) if support + predicted else 0.0  # = 2PR/(P+R), 0 when tp = 0
    total += support * f1
  return total / len(y_true)


def test_waf_by_hand():
  gt = [1.2, -0.5, 0.0, 2.0, -1.0]
  pred = [1, 0, 1, -1, -1]  # numbers are taken as already-mapped sentiment
  out = metrics.waf(gt, pred)
  # Kept: y = [T, F, T, F]; y_hat = [T, F (neutral -> negative), F, F].
  # T: P = 1/1, R = 1/2, F1 = 2/3 (support 2); F: P = 2/3, R = 2/2, F1 = 4/5 (support 2).
  assert math.isclose(out["waf"], (2 * 2 / 3 + 2 * 4 / 5) / 4)
  assert math.isclose(out["acc"], 3 / 4)
  assert (out["n_scored"], out["n_skipped"], out["n_pred_neutral"]) == (4, 1, 1)


def test_weighted_f1_matches_independent_reference():
  rng = random.Random(0)
  for _ in range(200):
    n = rng.randint(1, 30)
    y_true = [rng.random() < 0.4 for _ in range(n)]
    y_pred = [rng.random() < 0.6 for _ in range(n)]
    assert math.isclose(metrics.weighted_f1(y_true, y_pred), _reference_weighted_f1(y_true, y_pred), abs_tol=1e-12)
  # A label that is only predicted has support 0 and weight 0; all-wrong gives 0.
  assert metrics.weighted_f1([True, True], [False, False]) == 0.0
  assert metrics.weighted_f1([True, False, True], [True, False, True]) == 1.0


def test_waf_with_default_vader_and_custom_mapper():
  out = metrics.waf([2.0, -1.5, 0.5], ["[happy, relieved]", ["sad"], "[xyzzy]"])
  # happy -> +1, sad -> -1, unknown -> 0 (counts as negative against a positive GT).
  assert math.isclose(out["acc"], 2 / 3)
  assert math.isclose(out["waf"], _reference_weighted_f1([True, False, True], [True, False, False]))
  calls = []
  always_positive = lambda words: calls.append(words) or 1
  out = metrics.waf([1.0, -1.0, 0.0], ["[A, b]", "[c]", "[d]"], mapper=always_positive)
  assert calls == [["a", "b"], ["c"]]  # parsed and lowercased; GT 0 is skipped before mapping
  assert out["acc"] == 0.5 and out["n_skipped"] == 1
  with pytest.raises(ValueError, match=r"gt_valence\[1\]"):
    metrics.waf([1.0, float("nan")], [1, 1])
  with pytest.raises(ValueError, match="aligned"):
    metrics.waf([1.0], [])
  assert math.isnan(metrics.waf([0.0], [1])["waf"])


# ---------------------------------------------------------------------------------------------------------------
# MME-Emotion


def test_mme_emotion_by_hand():
  items = [
      {"task": "ER-Lab", "scores": [1, 0, 1]},  # rec 1, rea 1/2
      {"task": "ER-Lab", "scores": [0]},        # rec 0, rea 0 (no reasoning steps)
      {"task": "SA", "scores": [1, 1, 0]},      # rec 0, rea 1
  ]
  out = metrics.mme_emotion_scores(items)
  lab, sa = out["per_task"]["ER-Lab"], out["per_task"]["SA"]
  assert (lab["rec_s"], lab["rea_s"], lab["cot_s"], lab["n"]) == (50.0, 25.0, 37.5, 2)
  assert (sa["rec_s"], sa["rea_s"], sa["cot_s"], sa["n"]) == (0.0, 100.0, 50.0, 1)
  o = out["overall"]
  assert math.isclose(o["rec_s"], 100 / 3) and math.isclose(o["rea_s"], 50.0)
  assert math.isclose(o["cot_s"], (100 / 3 + 50) / 2) and o["n"] == 3
  assert out["task_mean"] == {"rec_s": 25.0, "rea_s": 62.5, "cot_s": 43.75}
  bare = metrics.mme_emotion_scores([[1, 1], [0, 1]])  # plain lists: one task "all"
  assert bare["overall"] == {"rec_s": 100.0, "rea_s": 50.0, "cot_s": 75.0, "n": 2}


@pytest.mark.parametrize("items, match", [
    ([[]], r"items\[0\]: no step scores"),
    ([[1], [1, 2]], r"items\[1\]: step scores must be 0 or 1"),
    ([{"task": "SA"}], r"items\[0\]: a mapping item needs"),
    (["101"], r"items\[0\]: scores must be a list"),
    ([], "at least one item"),
])
def test_mme_emotion_bad_input(items, match):
  with pytest.raises(ValueError, match=match):
    metrics.mme_emotion_scores(items)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


GT_CSV = 'name,openset\ns1,"[excited, joyful, happy]"\ns2,[sad]\ns3,nan\ns4,"[Angry, let down]"\n'
PRED_CSV = ('name,openset,reason\ns4,"[mad]",x\ns2,"[sad, worried]",y\ns1,"[happy, satisfied]",z\ns3,[],w\n'
            'extra,[joy],v\n')


def _run(capsys, argv):
  code = metrics_cli.main(argv)
  out = capsys.readouterr()
  return code, out.out, out.err


def test_cli_ov_json_equals_ov_score(tmp_path, capsys):
  gt, pred = _write(tmp_path / "gt.csv", GT_CSV), _write(tmp_path / "pred.csv", PRED_CSV)
  for level in (1, 2):
    code, out, _ = _run(capsys, ["ov", "--gt", gt, "--pred", pred, "--json", "--level", str(level)])
    assert code == 0
    got = json.loads(out)
    expected = metrics.ov_score(
        ["[excited, joyful, happy]", "[sad]", "", "[Angry, let down]"],
        ["[happy, satisfied]", "[sad, worried]", "[]", "[mad]"], level=level)
    for key, value in expected.items():
      assert got[key] == value, key
    assert (got["n_gt_empty_labels"], got["n_pred_empty_labels"], got["n_pred_unmatched"]) == (1, 0, 1)
    assert all(w["n_skipped"] == 1 for w in got["per_wheel"])  # the NaN GT row is a counted skip
  code, out, _ = _run(capsys, ["ov", "--gt", gt, "--pred", pred])
  assert code == 0 and "W5" in out and "mean" in out


def test_cli_hit_json(tmp_path, capsys):
  gt = _write(tmp_path / "gt.csv", "name,emotion\na,happy\nb,neutral\nc,surprise\n")
  pred = _write(tmp_path / "pred.csv", 'name,openset\na,"[joy, sad]"\nb,[happy]\nc,[angry]\n')
  code, out, _ = _run(capsys, ["hit", "--gt", gt, "--pred", pred, "--json"])
  assert code == 0
  got = json.loads(out)
  expected = metrics.hit_rate(["happy", "neutral", "surprise"], [["joy", "sad"], ["happy"], ["angry"]])
  assert got["hit"] == expected["hit"] and got["per_wheel"] == expected["per_wheel"]


def test_cli_labels_column_gt(tmp_path, capsys):
  """A one-hot GT in a ``labels`` column scores like the same words in ``openset`` (ov and hit)."""
  gt = _write(tmp_path / "gt.csv", "name,labels\na,happy\nb,neutral\nc,surprise\nd,sad\n")
  pred = _write(tmp_path / "pred.csv", 'name,openset\na,"[joy, sad]"\nb,[happy]\nc,[angry]\nd,[sad]\n')
  gt_words, pred_words = ["happy", "neutral", "surprise", "sad"], [["joy", "sad"], ["happy"], ["angry"], ["sad"]]
  code, out, _ = _run(capsys, ["hit", "--gt", gt, "--pred", pred, "--json"])
  assert code == 0
  got = json.loads(out)
  expected = metrics.hit_rate(gt_words, pred_words)
  assert got["hit"] == expected["hit"] and got["per_wheel"] == expected["per_wheel"]
  # By hand, W1: a hits, b (neutral) skipped, c misses, d hits -> 2/3 over 3 scored samples.
  assert got["per_wheel"][0] == {"hit": 2 / 3, "n_scored": 3, "n_skipped": 1}
  code, out, _ = _run(capsys, ["ov", "--gt", gt, "--pred", pred, "--json"])
  assert code == 0
  got = json.loads(out)
  expected = metrics.ov_score(gt_words, pred_words)
  assert (got["f"], got["per_wheel"]) == (expected["f"], expected["per_wheel"])
  assert got["n_samples"] == 4 and got["gt_words_dropped"] == 1  # neutral


def test_cli_map_json(capsys):
  code, out, _ = _run(capsys, ["map", "--words", "happy, let down,neutral", "--json"])
  assert code == 0
  got = json.loads(out)
  ew = emotion.load()
  assert list(got) == ["happy", "let down", "neutral"]
  for word, clusters in got.items():
    assert len(clusters) == 5 and clusters == [ew.map_word(word, k) for k in range(1, 6)]
  assert got["neutral"] == [None] * 5 and got["happy"][0] == "happy"
  code, out, _ = _run(capsys, ["map", "--words", "fear", "--json", "--format-version", "2026"])
  assert json.loads(out) == {"fear": ["scared", "fearful", "scared", "fear", "scared"]}


@pytest.mark.parametrize("gt_text, pred_text, match", [
    ("", PRED_CSV, r"gt\.csv: empty file"),
    ("id,openset\na,[sad]\n", PRED_CSV, r"gt\.csv: no 'name' column"),
    ("name,words\na,[sad]\n", PRED_CSV, r"gt\.csv: no label column"),
    ("name,openset,labels\na,[sad],sad\n", PRED_CSV, r"gt\.csv: several label columns"),
    ("name,openset\ns1,[sad]\ns2,[sad],extra\n", PRED_CSV, r"gt\.csv, line 3: expected 2 fields"),
    ("name,openset\ns1,[sad]\ns1,[joy]\n", PRED_CSV, r"gt\.csv, line 3: duplicate name 's1' \(first on line 2\)"),
    ("name,openset\n,[sad]\n", PRED_CSV, r"gt\.csv, line 2: empty name"),
    ("name,openset\n", PRED_CSV, r"gt\.csv: no data rows"),
    ("name,openset\ns1,[sad]\nnew,[joy]\n", PRED_CSV, r"pred\.csv: no prediction for 'new' \(.*gt\.csv, line 3\)"),
    (GT_CSV, "name,openset\ns1,[sad]\ns1,[sad]\n", r"pred\.csv, line 3: duplicate name"),
    # An unterminated quote: a lenient reader would merge s2 into s1's label and score one sample, exit 0.
    ('name,openset\ns1,"[sad]\ns2,[joy]\n', PRED_CSV, r"gt\.csv, line 2: malformed CSV: unterminated quote"),
    (GT_CSV, 'name,openset\ns1,[sad]\ns2,"[joy]\ns3,[]\ns4,[]\n', r"pred\.csv, line 3: malformed CSV: unterminated"),
    ('name,openset\ns1,"[sad]"x\ns2,[joy]\n', PRED_CSV, r"gt\.csv, line 2: malformed CSV: .*expected after"),
    ('name,"openset"x\ns1,[sad]\n', PRED_CSV, r"gt\.csv, line 1: malformed CSV"),  # in the header
])
def test_cli_bad_input_exits_2(tmp_path, capsys, gt_text, pred_text, match):
  gt, pred = _write(tmp_path / "gt.csv", gt_text), _write(tmp_path / "pred.csv", pred_text)
  for cmd in ("ov", "hit"):
    code, out, err = _run(capsys, [cmd, "--gt", gt, "--pred", pred, "--json"])
    assert code == 2 and out == ""
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(match, err), err


def test_cli_missing_file_and_bad_flags(tmp_path, capsys):
  pred = _write(tmp_path / "pred.csv", PRED_CSV)
  code, _, err = _run(capsys, ["ov", "--gt", str(tmp_path / "nope.csv"), "--pred", pred])
  assert code == 2 and "nope.csv: cannot read" in err
  (tmp_path / "latin.csv").write_bytes(b"name,openset\na,[caf\xe9]\n")
  code, _, err = _run(capsys, ["ov", "--gt", str(tmp_path / "latin.csv"), "--pred", pred])
  assert code == 2 and "latin.csv: not UTF-8" in err
  code, _, err = _run(capsys, ["map", "--words", " , "])
  assert code == 2 and "error: --words" in err
  for argv in (["ov", "--gt", pred, "--pred", pred, "--format-version", "2024"], ["ov", "--level", "3"], ["nope"]):
    with pytest.raises(SystemExit) as e:
      metrics_cli.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path):
  gt, pred = _write(tmp_path / "gt.csv", GT_CSV), _write(tmp_path / "pred.csv", "name,openset\ns1,[sad]\n")
  ok = subprocess.run([sys.executable, "-m", "merr1_jax.metrics", "map", "--words", "sad", "--json"],
                      capture_output=True, text=True, timeout=60)
  assert ok.returncode == 0 and json.loads(ok.stdout) == {"sad": ["sad"] * 5}
  bad = subprocess.run([sys.executable, "-m", "merr1_jax.metrics", "ov", "--gt", gt, "--pred", pred],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
  assert "no prediction for 's2'" in bad.stderr and "3 of 4 GT names are missing" in bad.stderr


def test_cli_unterminated_quote_exits_2_from_the_shell(tmp_path):
  """The audit's case end to end: 2 GT rows, the first with an unterminated quote, is an error, not 1 sample."""
  gt = _write(tmp_path / "gt.csv", 'name,openset\ns1,"[sad]\ns2,[joy]\n')
  pred = _write(tmp_path / "pred.csv", "name,openset\ns1,[sad]\ns2,[joy]\n")
  bad = subprocess.run([sys.executable, "-m", "merr1_jax.metrics", "ov", "--gt", gt, "--pred", pred, "--json"],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.startswith(f"error: {gt}, line 2: malformed CSV: unterminated quote")
  assert "Traceback" not in bad.stderr
