"""Answer parsing, format checks, label spaces and the reward values (method.md)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from merr1_jax.task import rewards
from merr1_jax.task.rewards import LabelSpace

# --- parsing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,words",
    [
        ("<think>x</think><answer>Happy, sad</answer>", ("happy", "sad")),
        ("<answer>[happy; Sad\nangry，worried；calm]</answer>", ("happy", "sad", "angry", "worried", "calm")),
        ("<answer>happy, happy , HAPPY,, </answer>", ("happy",)),
        ("<answer>old</answer> text <answer>new, words</answer> tail", ("new", "words")),
        ("<answer>never closed", ()),
        ("no tags at all", ()),
        ("</answer><answer>", ()),
        ("<answer></answer>", ()),
        ("<answer>'joyful', \"calm\"</answer>", ("joyful", "calm")),
        # Brackets nested in any Unicode whitespace are stripped until none remain (the adversarial cases).
        ("<answer>;(\xa0(\xa0fearful</answer>", ("fearful",)),
        ("<answer>\u3000[\u2009happy\u2009]\u3000,\x85(sad)</answer>", ("happy", "sad")),
        ("<think>t</think><answer>,(\xa0)\xa0(,</answer>", ()),
    ],
)
def test_parse_answer(text, words):
  assert rewards.parse_answer(text) == words


def test_format_needs_a_real_word_whatever_the_spaces():
  assert not rewards.format_ok("<think>t</think><answer>,(\xa0)\xa0(,</answer>", "slow")
  assert rewards.format_ok("<think>t</think><answer>\xa0(\xa0fearful)</answer>", "slow")


_UNICODE_SPACE = st.sampled_from([" ", "\t", "\n", "\r", "\x85", "\xa0", "\u1680", "\u2000", "\u2009", "\u200a",
                                  "\u2028", "\u2029", "\u202f", "\u205f", "\u3000"])
_WRAP = st.lists(st.one_of(_UNICODE_SPACE, st.sampled_from(list("[](){}\"'"))), max_size=6).map("".join)


@given(word=st.sampled_from(["fearful", "happy", "sad", "worried"]), left=_WRAP, right=_WRAP)
@settings(max_examples=300, deadline=None)
def test_any_unicode_whitespace_and_brackets_around_an_item_are_stripped(word, left, right):
  """Property: however an item is wrapped in Unicode whitespace, brackets and quotes, the parsed word is the word
  itself, and an item made of wrapping alone gives no word."""
  assert all(c.isspace() or c in "[](){}\"'" for c in left + right)
  assert rewards.parse_answer(f"<answer>{left}{word}{right}, {left}{right}</answer>") == (word,)


@pytest.mark.parametrize(
    "completion,mode,ok",
    [
        ("<think>the voice shakes</think><answer>sad</answer>", "slow", True),
        ("<think>a</think>\n<answer>sad, worried</answer>\n", "slow", True),
        ("<think> </think><answer>sad</answer>", "slow", False),  # slow needs a non-empty think
        ("<think>a</think><answer></answer>", "slow", False),  # no word
        ("<think>a</think>x<answer>sad</answer>", "slow", False),  # text between the blocks
        ("<think>a</think><answer>sad</answer> trailing", "slow", False),
        ("<think>a<think>b</think></think><answer>sad</answer>", "slow", False),  # nested
        ("<answer>sad</answer>", "slow", False),
        ("sad, happy</answer>", "fast", True),
        ("sad</answer>", "fast", True),
        ("sad", "fast", False),  # no closing tag
        ("<think>x</think><answer>sad</answer>", "fast", False),  # fast never writes a think block
        ("sad</answer><answer>happy</answer>", "fast", False),
    ],
)
def test_format_ok(completion, mode, ok):
  assert rewards.format_ok(completion, mode) is ok


def test_unknown_mode_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown mode 'medium'"):
    rewards.format_ok("x", "medium")


# --- an independent reference for r_fmt, written from method.md "Output format and modes" ------------------
# The whole assistant turn (fast: the prefilled "<think></think><answer>" + the completion) must be one think
# block then one answer block, whitespace allowed before, between and after; no tag may appear anywhere else;
# slow needs a think with a non-space character, fast an empty one; the answer must hold at least one word, i.e.
# one character that is not a separator (, ; newline ， ；), whitespace, a bracket or a quote.
_TURN = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)
_ANY_TAG = re.compile(r"</?(?:think|answer)>")
_WORD_CHAR = re.compile(r"[^,;\n\uff0c\uff1b\s\[\](){}\"']")


def _reference_format_ok(completion: str, mode: str) -> bool:
  turn = ("<think></think><answer>" + completion) if mode == "fast" else completion
  m = _TURN.fullmatch(turn)
  if m is None or _ANY_TAG.search(m["think"]) or _ANY_TAG.search(m["answer"]):
    return False
  if (mode == "slow") != bool(m["think"].strip()):
    return False
  return _WORD_CHAR.search(m["answer"]) is not None


_TAG = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", ",", ";", "\n", "，", " ", "[", "]"])
_PIECE = st.one_of(_TAG, st.text(max_size=30), st.sampled_from(["happy", "sad", "angry", "calm", "x" * 5000]))


_FUZZ_SPACE = LabelSpace.closed(["happy", "sad", "angry"])
# Compiled once for the fixed [1, 1, 3] shapes (eager dispatch per example would dominate the fuzz runtime).
_fuzz_rewards = jax.jit(lambda x: rewards.compute_rewards(["recall", "precision", "f1", "format"], x))


@settings(max_examples=2500, deadline=None)
@given(pieces=st.lists(_PIECE, max_size=40), mode=st.sampled_from(["slow", "fast"]))
def test_parser_fuzz_never_raises_and_rewards_are_bounded(pieces, mode):
  text = "".join(pieces)
  words = rewards.parse_answer(text)
  assert all(w == w.strip().lower() and w for w in words)
  assert len(set(words)) == len(words)
  ok = rewards.format_ok(text, mode)
  assert ok == _reference_format_ok(text, mode)
  if ok:  # a well-formed completion has exactly one answer block and one think block
    full = rewards.assistant_text(text, mode)
    assert full.count("<answer>") == 1 and full.count("<think>") == 1
  s = rewards.score_completions([text], [mode], [["happy", "sad"]], _FUZZ_SPACE)
  r = np.asarray(_fuzz_rewards(rewards.RewardInputs.from_scored(s)))
  assert np.all((r >= 0) & (r <= 1))
  if not ok:
    assert np.all(r == 0)


# Structured completions: a well-formed turn, then 0-3 edits that break it (or not): swapped blocks, duplicated
# or dropped tags, nested tags, text before, between or after the blocks, unicode, and answers of thousands of words.
_UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_SPACE = st.sampled_from(["", "", " ", "\n", " \t\n", "\u3000", "\r\n"])
_WORD = st.sampled_from(["happy", "Sad", "let down", "喜悦", "ängstlich", "[calm]", "'joy'", "a]b", "x" * 300])
_ANSWER = st.one_of(
    st.lists(_WORD, min_size=1, max_size=6).map(", ".join),
    st.sampled_from(["", " ", " , ; ", "[]", "['', \"\"]", "，；\n", "[ ]"]),
    _UNICODE,
    st.integers(1000, 4000).map(lambda n: ", ".join(f"w{i}" for i in range(n))),  # thousands of words
)
_THINK = st.one_of(st.sampled_from(["", " ", "\n\t", "the voice shakes", "<think>inner</think>", "a <answer>b"]),
                   _UNICODE, st.integers(1000, 3000).map(lambda n: " ".join(["word"] * n)))
_NOISE = st.one_of(st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "x", " tail", "\n"]), _UNICODE)


@st.composite
def _completions(draw):
  mode = draw(st.sampled_from(["slow", "fast"]))
  parts = [draw(_SPACE), "<think>", draw(_THINK), "</think>", draw(_SPACE), "<answer>", draw(_ANSWER), "</answer>",
           draw(_SPACE)]
  if mode == "fast":
    parts = parts[6:]  # the completion after the prefilled "<think></think><answer>"
  for _ in range(draw(st.integers(0, 3))):
    op = draw(st.sampled_from(["swap", "duplicate", "drop", "insert", "prepend", "append"]))
    i = draw(st.integers(0, len(parts) - 1))
    j = draw(st.integers(0, len(parts) - 1))
    if op == "swap":
      parts[i], parts[j] = parts[j], parts[i]
    elif op == "duplicate":
      parts.insert(j, parts[i])
    elif op == "drop" and len(parts) > 1:
      parts.pop(i)
    elif op == "insert":
      parts.insert(i, draw(_NOISE))
    elif op == "prepend":
      parts.insert(0, draw(_NOISE))
    else:
      parts.append(draw(_NOISE))
  if draw(st.booleans()) and mode == "slow":  # a fast-style completion in slow mode, and vice versa below
    parts = parts[6:]
  elif draw(st.integers(0, 9)) == 0 and mode == "fast":
    parts = ["<think>t</think><answer>", *parts]
  return "".join(parts), mode


@settings(max_examples=1500, deadline=None)
@given(case=_completions())
def test_format_ok_equals_reference_on_structured_completions(case):
  text, mode = case
  ok = rewards.format_ok(text, mode)
  assert ok == _reference_format_ok(text, mode), (text[:300], mode)
  words = rewards.parse_answer(rewards.assistant_text(text, mode))
  if ok:
    assert words and all(w and w == w.strip().lower() for w in words)


def test_reference_format_checker_by_hand():
  """The reference itself on the hand cases of test_format_ok (it must not be vacuous)."""
  cases = [("<think>a</think>\n<answer>sad</answer>\n", "slow", True), ("<answer>sad</answer>", "slow", False),
           ("<think>a</think><answer>sad</answer> x", "slow", False), ("sad</answer>", "fast", True),
           ("<think>a<think>b</think></think><answer>sad</answer>", "slow", False), ("[ ]</answer>", "fast", False),
           ("<answer>sad</answer><think>a</think>", "slow", False), ("sad</answer></answer>", "fast", False)]
  for text, mode, ok in cases:
    assert _reference_format_ok(text, mode) is ok and rewards.format_ok(text, mode) is ok, (text, mode)


def test_parser_handles_huge_answers():
  words = [f"w{i}" for i in range(20000)]
  text = "<think>t</think><answer>" + ", ".join(words) + "</answer>"
  assert rewards.parse_answer(text) == tuple(words)
  assert rewards.format_ok(text, "slow")
  assert rewards.parse_answer("<answer>" * 10000 + "a</answer>" * 10000) == ("a",)


# --- label spaces and multi-hot arrays -----------------------------------------------------------------------


def test_closed_space_identity_mapping():
  space = LabelSpace.closed(["Sad", "happy", "angry"])
  assert space.cluster_names == (("angry", "happy", "sad"),)
  hot, dropped = space.encode(["happy", "SAD", "bored", "happy"])
  np.testing.assert_array_equal(hot, [[False, True, True]])
  assert dropped == 1


def test_emotion_wheel_space_worked_example():
  """metrics.md §1 worked example, through the reward path: per-wheel P/R averaged over the 5 wheels."""
  space = LabelSpace.emotion_wheel("2025", level=1)
  assert space.num_wheels == 5
  gt, _ = space.encode_batch([["excited", "joyful", "happy"]])
  pred, _ = space.encode_batch([["happy", "satisfied"]])
  rec, prec, f1 = rewards.set_rewards(jnp.asarray(pred), jnp.asarray(gt))
  # Table rows W1..W5: precision 1, 1, .5, 1, .5; recall .5, 1, 1, 1, .5.
  p_k = np.array([1, 1, 0.5, 1, 0.5])
  r_k = np.array([0.5, 1, 1, 1, 0.5])
  f_k = 2 * p_k * r_k / (p_k + r_k)
  np.testing.assert_allclose(prec, [p_k.mean()], rtol=1e-6)
  np.testing.assert_allclose(rec, [r_k.mean()], rtol=1e-6)
  np.testing.assert_allclose(f1, [f_k.mean()], rtol=1e-6)


def test_set_rewards_skip_empty_gt_wheels_and_empty_predictions():
  # K = 2 wheels, C = 3. Row 0: wheel 1 has no GT and is skipped. Row 1: empty prediction. Row 2: no GT at all.
  gt = np.zeros((3, 2, 3), bool)
  pred = np.zeros((3, 2, 3), bool)
  gt[0, 0, [0, 1]] = True
  pred[0, 0, [1, 2]] = True
  pred[0, 1, 0] = True  # a prediction in a skipped wheel changes nothing
  gt[1, :, 0] = True
  rec, prec, f1 = map(np.asarray, rewards.set_rewards(jnp.asarray(pred), jnp.asarray(gt)))
  np.testing.assert_allclose(rec, [0.5, 0.0, 0.0])
  np.testing.assert_allclose(prec, [0.5, 0.0, 0.0])
  np.testing.assert_allclose(f1, [0.5, 0.0, 0.0])


def test_score_completions_and_format_gating():
  space = LabelSpace.closed(["happy", "sad", "angry", "calm"])
  s = rewards.score_completions(
      ["<think>t</think><answer>happy, bored</answer>", "happy, sad</answer>", "<think></think><answer>sad</answer>"],
      ["slow", "fast", "slow"],
      [["happy", "sad"], ["happy", "sad"], ["sad"]],
      space,
  )
  np.testing.assert_array_equal(s.format_ok_B, [True, True, False])
  np.testing.assert_array_equal(s.dropped_B, [1, 0, 0])
  np.testing.assert_array_equal(s.num_words_B, [2, 2, 1])
  r = np.asarray(rewards.compute_rewards(["recall", "precision", "f1", "format"], rewards.RewardInputs.from_scored(s)))
  # Row 0: P = {happy} (bored dropped), G = {happy, sad}: recall .5, precision 1, F1 2/3.
  np.testing.assert_allclose(r[0], [0.5, 1.0, 2 / 3, 1.0], rtol=1e-6)
  np.testing.assert_allclose(r[1], [1.0, 1.0, 1.0, 1.0])
  np.testing.assert_allclose(r[2], [0.0, 0.0, 0.0, 0.0])  # malformed: 0 everywhere, though "sad" is right


def test_reward_registry():
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.compute_rewards(["recall", "nope"], None)
  with pytest.raises(ValueError, match="already registered"):
    rewards.register_reward("recall")(lambda x: x)


def test_rewards_jit_equals_eager():
  rng = np.random.default_rng(0)
  inputs = rewards.RewardInputs(
      jnp.asarray(rng.random((8, 5, 6)) < 0.3), jnp.asarray(rng.random((8, 5, 6)) < 0.3),
      jnp.asarray(rng.random(8) < 0.8))
  names = ["recall", "precision", "f1", "format"]
  f = lambda x: rewards.compute_rewards(names, x)
  np.testing.assert_allclose(jax.jit(f)(inputs), f(inputs), rtol=1e-6)
  for fn in (rewards.set_rewards,):
    for a, b in zip(jax.jit(fn)(inputs.pred_BxKxC, inputs.gt_BxKxC), fn(inputs.pred_BxKxC, inputs.gt_BxKxC)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_category_token_sets_remove_shared_tokens():
  space = LabelSpace.closed(["happy", "sad", "sadness"])
  vocab = {"happy": [1], " happy": [2], "sad": [3], " sad": [4], "sadness": [3, 9], " sadness": [5]}
  sets = rewards.category_token_sets(space, lambda w: vocab[w], vocab_size=10)
  # Clusters are sorted: happy, sad, sadness. Token 3 starts both "sad" and "sadness": it is removed.
  assert np.flatnonzero(sets[0, 0]).tolist() == [1, 2]
  assert np.flatnonzero(sets[0, 1]).tolist() == [4]
  assert np.flatnonzero(sets[0, 2]).tolist() == [5]
  with pytest.raises(ValueError, match="outside the vocabulary"):
    rewards.category_token_sets(space, lambda w: [42], vocab_size=10)
