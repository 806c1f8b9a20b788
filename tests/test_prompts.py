"""The chat template: exact placeholder counts, the slow/fast prefixes and the completion formats."""

import re

import hypothesis
import hypothesis.strategies as st
import pytest

from merr1_jax.task import prompts as P

# Free text without template markers (markers are rejected, tested separately).
_TEXT = st.text(max_size=60).filter(lambda s: not any(m in s for m in P.TAG_TOKENS + P.SPECIAL_TOKENS))


@hypothesis.settings(max_examples=80, deadline=None)
@hypothesis.given(subtitle=_TEXT, n_video=st.integers(0, 40), n_audio=st.integers(0, 40),
                  mode=st.sampled_from(P.MODES))
def test_prompt_holds_exactly_one_placeholder_per_feature_row(subtitle, n_video, n_audio, mode):
  text = P.render_prompt(subtitle, n_video, n_audio, mode)
  assert text.count(P.VIDEO_TOKEN) == n_video
  assert text.count(P.AUDIO_TOKEN) == n_audio
  # The placeholders of one modality are contiguous and bracketed, so the model can merge rows in order.
  if n_video:
    assert P.VISION_BOS + P.VIDEO_TOKEN * n_video + P.VISION_EOS in text
  if n_audio:
    assert P.AUDIO_BOS + P.AUDIO_TOKEN * n_audio + P.AUDIO_EOS in text
  assert text.count(P.IM_START) == 3 and text.count(P.IM_END) == 2


def test_prompt_layout_written_out_by_hand():
  expected = ("<|im_start|>system\n" + P.DEFAULT_SYSTEM + "<|im_end|>\n"
              "<|im_start|>user\n<|vision_bos|><|VIDEO|><|VIDEO|><|vision_eos|>"
              "<|audio_bos|><|AUDIO|><|AUDIO|><|AUDIO|><|audio_eos|>\n"
              "Subtitle: Wait, you are here?\n" + P.DEFAULT_QUESTION + "<|im_end|>\n"
              "<|im_start|>assistant\n")
  assert P.render_prompt("Wait, you are here?", 2, 3, "slow") == expected
  assert P.render_prompt("Wait, you are here?", 2, 3, "fast") == expected + "<think></think><answer>"


def test_modes_differ_only_by_the_fast_prefix():
  slow = P.render_prompt("hi", 4, 5, "slow", question="Q?")
  fast = P.render_prompt("hi", 4, 5, "fast", question="Q?")
  assert slow.endswith("<|im_start|>assistant\n") and fast == slow + P.FAST_PREFIX
  assert P.FAST_PREFIX == P.THINK_OPEN + P.THINK_CLOSE + P.ANSWER_OPEN


def test_no_media_rows_gives_no_media_brackets():
  text = P.render_prompt("hello", 0, 0, "slow")
  assert P.VISION_BOS not in text and P.AUDIO_BOS not in text


def test_subtitle_newlines_are_flattened():
  text = P.render_prompt("line one\n  line two", 1, 1, "slow")
  assert "Subtitle: line one line two\n" in text


def test_completions():
  assert P.render_completion("face sad.", ["sad", "lonely"], "slow") == (
      "<think>face sad.</think><answer>sad, lonely</answer>")
  assert P.render_completion("", ["happy"], "fast") == "happy</answer>"
  # The fast prompt suffix plus the fast completion is the full answer format of method.md.
  assert P.FAST_PREFIX + P.render_completion("", ["a", "b"], "fast") == "<think></think><answer>a, b</answer>"


@pytest.mark.parametrize("call, match", [
    (lambda: P.render_prompt("look <|VIDEO|>", 1, 1, "slow"), "template marker"),
    (lambda: P.render_prompt("x", 1, 1, "slow", question="<answer>"), "template marker"),
    (lambda: P.render_prompt("x", -1, 1, "slow"), "n_video"),
    (lambda: P.render_prompt("x", 1, 2.0, "slow"), "n_audio"),
    (lambda: P.render_prompt("x", 1, 1, "medium"), "mode"),
    (lambda: P.render_completion("", ["a"], "medium"), "mode"),
    (lambda: P.render_completion("   ", ["sad"], "slow"), "non-empty reasoning"),
    (lambda: P.render_completion("a</think>b", ["sad"], "slow"), "template marker"),
    (lambda: P.render_completion("thinking", ["sad"], "fast"), "empty think"),
    (lambda: P.render_completion("t", ["sad, happy"], "slow"), "separator"),
    (lambda: P.render_completion("t", [""], "slow"), "separator"),
])
def test_bad_input_is_rejected(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_answer_words_must_be_a_sequence_not_a_string():
  with pytest.raises(TypeError):
    P.render_completion("t", "sad", "slow")


# ------------------------------------------------------------------ interleaved media block (media_runs)


def test_interleaved_prompt_written_out_by_hand():
  v, a = "<|VIDEO|>", "<|AUDIO|>"
  expected = ("<|im_start|>system\n" + P.DEFAULT_SYSTEM + "<|im_end|>\n"
              "<|im_start|>user\n<|vision_bos|><|audio_bos|>" + v + v + a + a + a + v + a + a +
              "<|audio_eos|><|vision_eos|>\n"
              "Subtitle: Wait, you are here?\n" + P.DEFAULT_QUESTION + "<|im_end|>\n"
              "<|im_start|>assistant\n")
  assert P.render_prompt("Wait, you are here?", 3, 5, "slow", media_runs="V2A3V1A2") == expected
  assert P.render_prompt("Wait, you are here?", 3, 5, "fast", media_runs="V2A3V1A2") == (
      expected + "<think></think><answer>")
  assert P.interleaved_media_block("V2A3V1A2") == expected[expected.index("<|vision_bos|>"):expected.index("\nSub")]


_RUNS = st.lists(st.tuples(st.sampled_from("VA"), st.integers(0, 12)), min_size=1, max_size=8)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(runs=_RUNS, subtitle=_TEXT, mode=st.sampled_from(P.MODES))
def test_interleaved_placeholders_follow_the_runs_and_the_rest_is_unchanged(runs, subtitle, mode):
  runs_str = "".join(f"{k}{n}" for k, n in runs)
  n_v, n_a = sum(n for k, n in runs if k == "V"), sum(n for k, n in runs if k == "A")
  text = P.render_prompt(subtitle, n_v, n_a, mode, media_runs=runs_str)
  # Reference: read the placeholders back in text order and compare with the runs expanded by hand.
  found = [("V" if m == P.VIDEO_TOKEN else "A") for m in re.findall(r"<\|VIDEO\|>|<\|AUDIO\|>", text)]
  assert found == [k for k, n in runs for _ in range(n)]
  # Only the media block differs from the separate layout: cut each block out and the rest is identical.
  separate = P.render_prompt(subtitle, n_v, n_a, mode)
  head = f"{P.IM_START}user\n"
  cut = lambda t: t[:t.index(head) + len(head)] + t[t.index("\nSubtitle: "):]  # noqa: E731
  assert cut(text) == cut(separate)
  block = text[text.index(head) + len(head):text.index("\nSubtitle: ")]
  assert block.startswith(P.VISION_BOS + P.AUDIO_BOS) and block.endswith(P.AUDIO_EOS + P.VISION_EOS)
  assert block.count(P.VISION_BOS) == block.count(P.AUDIO_BOS) == 1


@pytest.mark.parametrize("runs, n_video, n_audio, match", [
    ("V2A3", 3, 3, "holds 2 video and 3 audio"),
    ("V2A3", 2, 4, "holds 2 video and 3 audio"),
    ("", 0, 0, "not a placeholder runs string"),
    ("V2A3\n", 2, 3, "not a placeholder runs string"),
    ("V2 A3", 2, 3, "not a placeholder runs string"),
    ("v2a3", 2, 3, "not a placeholder runs string"),
    ("V2I3", 2, 3, "not a placeholder runs string"),
    ("V-2A3", 2, 3, "not a placeholder runs string"),
])
def test_bad_media_runs_are_rejected(runs, n_video, n_audio, match):
  with pytest.raises(ValueError, match=match):
    P.render_prompt("x", n_video, n_audio, "slow", media_runs=runs)
