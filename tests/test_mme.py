"""MME-Emotion (evaluation/mme.py, mme_judges.py, the evaluate CLI's --mme_items): step extraction and the offline
RuleJudge by hand; the judge cache (a rerun asks nothing, a torn last line is dropped with a warning, a corrupt
line is an error naming file:line); run_mme equals mme_report of its own JSONL; mme_report's line checks; the
served-judge example with a fake send(); the CLI's items/judge checks and its judging step on fake samples.

No model runs here: the CLI is exercised up to its input checks, and its judging step on hand-written samples.
"""

import argparse
import json
import pathlib
import types

import pytest

from merr1_jax import evaluate
from merr1_jax.evaluation import mme, mme_judges
from merr1_jax.training.policy_io import EvalError

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "base.py")

SLOW_A = ("<think>1. She smiles and sounds joyful. Her voice is calm.\n- The scene is a party!\n"
          "Step 4: He looks angry.</think><answer>happy, excited</answer>")
SLOW_B = "<think>He is crying and sad.\nHe looks angry.</think><answer>angry</answer>"


def _item(id, completion, gt, task="ER-Lab"):
  return mme.JudgeItem.from_completion(id, task, gt, completion)


class Counting:
  """A judge that counts its calls (RuleJudge's verdicts)."""

  def __init__(self, name="counting-v1"):
    self.inner, self.name, self.calls = mme_judges.RuleJudge(), name, 0

  def __call__(self, item):
    self.calls += 1
    return self.inner(item)


def test_extract_steps_rule():
  steps, answer = mme.extract_steps(SLOW_A)
  assert steps == ("She smiles and sounds joyful.", "Her voice is calm.", "The scene is a party!", "He looks angry.")
  assert answer == ("happy", "excited")
  cjk = mme.extract_steps("<think>他很开心。她哭了！</think><answer>happy</answer>")
  assert cjk == (("他很开心。", "她哭了！"), ("happy",))
  assert mme.extract_steps("<think>cut off mid thought") == (("cut off mid thought",), ())  # truncated run
  assert mme.extract_steps("<think>\n...\n</think><answer>sad</answer>") == ((), ("sad",))  # no letters: no step
  assert mme.extract_steps("<think></think><answer>sad</answer>") == ((), ("sad",))  # fast mode


def test_rule_judge_by_hand():
  judge = mme_judges.RuleJudge()
  # joyful ~ happy (same clusters); calm ~ happy on 3 of 5 wheels; no cue word; angry !~ happy; answer hits.
  assert judge(_item("a", SLOW_A, ("happy",))).step_scores == (1, 1, 0, 0, 1)
  assert judge(_item("b", SLOW_B, ("sad",))).step_scores == (1, 0, 0)  # sad named; angry; answer angry misses
  assert judge(_item("c", "<think></think><answer>joy</answer>", ("happy",))).step_scores == (1,)  # via wheels
  assert judge(_item("d", "<think></think><answer>neutral</answer>", ("neutral",))).step_scores == (1,)  # exact
  assert not judge.agrees(["let down"], ["angry"])  # 2 of 5 wheels: no majority
  assert judge.name == "rule-v1:2025"


def test_run_mme_by_hand_and_equal_to_mme_report_of_its_jsonl(tmp_path):
  items = [_item("a", SLOW_A, ("happy",)), _item("b", SLOW_B, ("sad",)),
           _item("c", "<think></think><answer>joy</answer>", ("happy",), task="SA")]
  out = mme.run_mme(items, mme_judges.RuleJudge(), tmp_path / "judge.jsonl")
  lab = out["per_task"]["ER-Lab"]  # a: rec 1, rea 2/4; b: rec 0, rea 1/2
  assert lab["rec_s"] == pytest.approx(50.0) and lab["rea_s"] == pytest.approx(50.0) and lab["n"] == 2
  assert out["per_task"]["SA"] == {"rec_s": 100.0, "rea_s": 0.0, "cot_s": 50.0, "n": 1}  # no steps: rea 0
  assert out["overall"]["rec_s"] == pytest.approx(200 / 3) and out["overall"]["cot_s"] == pytest.approx(50.0)
  assert [r["step_scores"] for r in out["items"]] == [[1, 1, 0, 0, 1], [1, 0, 0], [1]]
  report = mme.mme_report(tmp_path / "judge.jsonl")
  for key in ("per_task", "overall", "task_mean", "n_items"):
    assert report[key] == out[key]
  with pytest.raises(ValueError, match="duplicate item id 'a'"):
    mme.run_mme(items + items[:1], mme_judges.RuleJudge())


def _items():
  return [_item(f"clip{i}", SLOW_A if i % 2 else SLOW_B, ("happy",)) for i in range(3)]


def test_cache_second_run_asks_nothing(tmp_path):
  path, judge = tmp_path / "cache.jsonl", Counting()
  first = mme.run_mme(_items(), mme.CachedJudge(judge, path))
  assert judge.calls == 3 and first["judge_calls"]["asked"] == 3 and len(path.read_text().splitlines()) == 3
  second = mme.run_mme(_items(), mme.CachedJudge(judge, path))
  assert judge.calls == 3 and second["judge_calls"] == {"cache": str(path), "asked": 0, "cached": 3}
  assert second["overall"] == first["overall"] and second["items"] == first["items"]
  other = Counting(name="counting-v2")  # another judge (or version): its own keys, asked again
  mme.run_mme(_items(), mme.CachedJudge(other, path))
  assert other.calls == 3 and len(path.read_text().splitlines()) == 6


def test_cache_torn_last_line_is_dropped_with_a_warning(tmp_path):
  path = tmp_path / "cache.jsonl"
  mme.run_mme(_items(), mme.CachedJudge(Counting(), path))
  text = path.read_text()
  path.write_text(text[:-20])  # the run died while writing line 3
  judge = Counting()
  with pytest.warns(mme.CacheWarning, match=r"cache.jsonl:3: torn last line"):
    cached = mme.CachedJudge(judge, path)
  mme.run_mme(_items(), cached)
  assert judge.calls == 1 and path.read_text() == text  # only the torn item asked again; the file is whole again


def test_cache_bad_middle_line_names_file_and_line(tmp_path):
  path = tmp_path / "cache.jsonl"
  mme.run_mme(_items(), mme.CachedJudge(Counting(), path))
  lines = path.read_text().splitlines(keepends=True)
  path.write_text(lines[0] + "{oops\n" + lines[2])
  with pytest.raises(ValueError, match=rf"{path}:2: not a JSON line"):
    mme.CachedJudge(Counting(), path)
  path.write_text(lines[0] + json.dumps({"key": "k", "step_scores": [1, 2]}) + "\n")
  with pytest.raises(ValueError, match=rf"{path}:2: bad 'step_scores'"):
    mme.CachedJudge(Counting(), path)


def test_judge_score_checks():
  with pytest.raises(ValueError, match="non-empty sequence of 0/1"):
    mme.JudgeScore((1, 2))
  with pytest.raises(ValueError, match="gave 1 scores for item 'a', which has 4 reasoning steps: expected 5"):
    mme.run_mme([_item("a", SLOW_A, ("happy",))], lambda item: mme.JudgeScore((1,)))


def test_mme_report_by_hand(tmp_path):
  path = tmp_path / "judge.jsonl"
  lines = [{"id": "a", "task": "ER-Lab", "step_scores": [1, 0, 1]},  # rea 0.5, rec 1
           {"id": "b", "task": "ER-Lab", "step_scores": [0]},  # rea 0 (no steps), rec 0
           {"id": "c", "task": "SA", "step_scores": [1, 1, 1, 0]}]  # rea 1, rec 0
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  out = mme.mme_report(path)
  lab = out["per_task"]["ER-Lab"]
  assert lab["rec_s"] == pytest.approx(50.0) and lab["rea_s"] == pytest.approx(25.0)
  assert lab["cot_s"] == pytest.approx(37.5)
  assert out["per_task"]["SA"]["rec_s"] == 0 and out["per_task"]["SA"]["rea_s"] == pytest.approx(100.0)
  assert out["overall"]["rec_s"] == pytest.approx(100 / 3) and out["overall"]["rea_s"] == pytest.approx(50.0)
  assert out["overall"]["cot_s"] == pytest.approx((100 / 3 + 50) / 2) and out["n_items"] == 3


@pytest.mark.parametrize("line, match", [
    ("{not json", "line 2: not JSON"),
    ('{"id": "x", "task": "SA"}', "line 2: missing field 'step_scores'"),
    ('{"id": "x", "task": "SA", "step_scores": [1, 2]}', "line 2: .*only 0 and 1"),
    ('{"id": "x", "task": "SA", "step_scores": []}', "line 2: .*non-empty list"),
    ('{"id": "a", "task": "SA", "step_scores": [1]}', "line 2: duplicate id 'a' \\(first on line 1\\)"),
])
def test_mme_report_bad_line(tmp_path, line, match):
  path = tmp_path / "judge.jsonl"
  path.write_text('{"id": "a", "task": "SA", "step_scores": [1]}\n' + line + "\n")
  with pytest.raises(ValueError, match=f"judge.jsonl, {match}"):
    mme.mme_report(path)


def test_served_judge_with_a_fake_send(tmp_path):
  prompts, replies = [], ['Sure.\n```json\n{"step_scores": [1, 0], "answer_score": 1}\n```']

  def send(prompt):
    prompts.append(prompt)
    return replies[-1]

  judge = mme_judges.OpenAICompatibleJudge(send, model="qwen2.5-72b")
  item = mme.JudgeItem.from_completion("b", "ER-Wild", ("sad",), SLOW_B, label_set=("sad", "angry"))
  assert judge(item) == mme.JudgeScore((1, 0, 1)) and judge.name == "openai-compatible:qwen2.5-72b:v1"
  assert "1. He is crying and sad.\n2. He looks angry." in prompts[0] and "Ground-truth label: sad" in prompts[0]
  assert "Candidate labels: sad, angry" in prompts[0] and "[2 values" in prompts[0]
  for reply, match in (("I think the answer is right.", "item 'b': the reply is not a JSON object"),
                       ('{"step_scores": [1], "answer_score": 1}', "must be a list of 2 scores"),
                       ('{"step_scores": [1, 0], "answer_score": 2}', "scores must be 0 or 1")):
    replies.append(reply)
    with pytest.raises(mme_judges.JudgeReplyError, match=match):
      judge(item)
  replies.append('{"step_scores": [0, 0], "answer_score": 0}')
  cached = mme.CachedJudge(judge, tmp_path / "cache.jsonl")
  assert cached(item).step_scores == (0, 0, 0) and cached(item).step_scores == (0, 0, 0)
  assert len(prompts) == 5 and cached.n_asked == 1  # the second call came from the cache


def test_load_judge_specs():
  assert isinstance(mme_judges.load_judge("rule"), mme_judges.RuleJudge)
  assert isinstance(mme_judges.load_judge("merr1_jax.evaluation.mme_judges:RuleJudge"), mme_judges.RuleJudge)
  for spec, match in (("gpt", "expected 'rule' or 'module:Class'"), ("no_such_mod:J", "cannot import module"),
                      ("merr1_jax.evaluation.mme:Nope", "module 'merr1_jax.evaluation.mme' has no callable 'Nope'"),
                      ("merr1_jax.evaluation.mme_judges:OpenAICompatibleJudge", "OpenAICompatibleJudge\\(\\) failed")):
    with pytest.raises(ValueError, match=f"--judge {spec!r}: {match}"):
      mme_judges.load_judge(spec)


# ----------------------------------------------------------------------------------------------- the CLI


def _items_file(tmp_path, items=None) -> pathlib.Path:
  path = tmp_path / "mme.json"
  path.write_text(json.dumps(items or [
      {"video_id": "a", "label": "happy", "label_set": "[happy, sad]", "task": "ER-Lab"},
      {"video_id": "b", "label": "[sad]", "label_set": "[happy, sad]"}]))
  return path


def _sample(id, completion, mode="slow", dataset="d"):
  return {"dataset": dataset, "id": id, "mode": mode, "sample": 0, "completion": completion}


def test_cli_judges_the_slow_samples_through_the_cache(tmp_path):
  args = argparse.Namespace(mme_items=str(_items_file(tmp_path)), judge="rule", judge_cache=None)
  setup = evaluate.mme_setup(args, tmp_path, ("fast", "slow"))
  assert setup["cache"] == tmp_path / "mme_judge_cache.jsonl"
  results = {"d": types.SimpleNamespace(samples=[_sample("a", SLOW_A), _sample("a", "happy</answer>", "fast"),
                                                 _sample("b", SLOW_B), _sample("zz", SLOW_B)])}
  out = evaluate.judge_mme(setup, results)
  assert [(r["id"], r["task"], r["step_scores"]) for r in out["items"]] == [
      ("a", "ER-Lab", [1, 1, 0, 0, 1]), ("b", "all", [1, 0, 0])]  # no task field: "all"
  assert out["judge"] == "rule-v1:2025" and out["judge_calls"]["asked"] == 2
  assert evaluate.judge_mme(setup, results)["judge_calls"]["cached"] == 2
  assert "| ER-Lab | 1 | 100.00 | 50.00 | 75.00 |" in mme.markdown(out) and "not comparable" in mme.markdown(out)
  missing = {"d": types.SimpleNamespace(samples=[_sample("a", SLOW_A), _sample("x", SLOW_B)])}
  with pytest.raises(EvalError, match=r"--mme_items .*mme.json: 1 of 2 items \(field video_id\) match no slow"):
    evaluate.judge_mme(setup, missing)
  twice = dict(results, e=types.SimpleNamespace(samples=[_sample("a", SLOW_A, dataset="e")]))
  with pytest.raises(EvalError, match="id 'a' is a sample of datasets 'd' and 'e'"):
    evaluate.judge_mme(setup, twice)
  setup["cache"].write_text("{corrupt\n" + setup["cache"].read_text())
  with pytest.raises(EvalError, match=rf"{setup['cache']}:1: not a JSON line"):
    evaluate.judge_mme(setup, results)


def _cli(capsys, tmp_path, *args):
  code = evaluate.main(["--config", CONFIG, "--workdir", str(tmp_path), "--no_progress", *args])
  return code, capsys.readouterr().err


def test_cli_bad_mme_input_exits_2(tmp_path, capsys):
  items = _items_file(tmp_path)
  (tmp_path / "bad").mkdir()
  bad = _items_file(tmp_path / "bad", [{"video_id": "a"}])  # no label
  for args, want in (
      (["--mme_items", str(tmp_path / "none.json")], f"--mme_items {tmp_path / 'none.json'}: no such file"),
      (["--mme_items", str(bad)], f"--mme_items {bad}: bad record 0"),
      (["--mme_items", str(items), "--modes", "fast"], "judges the slow mode's reasoning; add slow to --modes"),
      (["--mme_items", str(items), "--judge", "nope:Judge"], "--judge 'nope:Judge': cannot import module 'nope'")):
    code, err = _cli(capsys, tmp_path, *args)
    assert code == 2 and err.startswith("error: ") and want in err and err.count("\n") == 1, err
