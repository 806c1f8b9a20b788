"""The synth byte-level BPE: exact round trips, single-token markers and emotion words, determinism, I/O."""

import hypothesis
import hypothesis.strategies as st
import pytest

from merr1_jax import prompts as P
from merr1_jax.data import synth
from merr1_jax.data import tokenizer as T

_CFG = synth.SynthConfig(n_train=120, n_validation=10, n_test=10)


@pytest.fixture(scope="module")
def tok():
  return synth.build_tokenizer(_CFG, vocab_size=700)


def test_markers_are_single_distinct_tokens_at_fixed_ids(tok):
  markers = P.SPECIAL_TOKENS + P.TAG_TOKENS
  ids = [tok.id_of(m) for m in markers]
  assert ids == list(range(len(markers)))  # reserved first, in a documented order
  for m, i in zip(markers, ids):
    assert tok.encode(m) == [i]
    assert tok.encode("a" + m + "b")[1] == i  # glued to text, still one id
  assert tok.eos_id == tok.id_of(P.IM_END) and tok.pad_id == tok.id_of(P.PAD_TOKEN)


def test_every_emotion_word_is_one_token_bare_and_after_a_space(tok):
  for word in synth.EMOTIONS:
    assert len(tok.encode(word)) == 1, word
    assert len(tok.encode(" " + word)) == 1, word
  # An answer is then one token per word plus separators.
  answer = P.render_completion("", ["sad", "lonely", "worried"], "fast")
  assert len(tok.encode(answer)) == 3 + 2 + 1  # words, ", " x2 (',' then ' word'), </answer>


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(text=st.text(max_size=80) | st.lists(st.sampled_from(
    list(P.TAG_TOKENS + P.SPECIAL_TOKENS) + ["happy", " sad", "é", "日本", "\n", "  "]), max_size=12).map("".join))
def test_decode_inverts_encode_for_any_text(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_prompt_placeholders_survive_tokenisation(tok):
  rec = synth.generate_clip(_CFG, "validation", 3)
  for mode in P.MODES:
    ids = tok.encode(P.render_prompt(rec.subtitle, rec.n_video, rec.n_audio, mode) + rec.demo_slow)
    assert ids.count(tok.id_of(P.VIDEO_TOKEN)) == rec.n_video
    assert ids.count(tok.id_of(P.AUDIO_TOKEN)) == rec.n_audio


def test_skip_special_drops_chat_markers_but_keeps_the_tags(tok):
  text = P.IM_START + "assistant\n<think>x</think><answer>sad</answer>" + P.IM_END
  assert tok.decode(tok.encode(text), skip_special=True) == "assistant\n<think>x</think><answer>sad</answer>"


def test_build_is_deterministic_and_save_load_round_trips(tok, tmp_path):
  again = synth.build_tokenizer(_CFG, vocab_size=700)
  path_a = tok.save(tmp_path / "a")
  path_b = again.save(tmp_path / "b" / "tok.json")
  assert path_a.read_bytes() == path_b.read_bytes()
  loaded = T.load(tmp_path / "a")
  text = P.render_prompt("Late again, seriously?", 5, 6, "fast") + "annoyed</answer>"
  assert loaded.encode(text) == tok.encode(text)
  assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
  hf = T.load_hf(tmp_path / "a")
  assert hf.encode(text) == tok.encode(text)


def test_vocab_size_is_an_upper_bound(tok):
  assert tok.vocab_size <= 700
  small = T.build_synth_tokenizer(["hello world hello world"], vocab_size=300)
  assert small.vocab_size <= 300
  with pytest.raises(ValueError, match="below"):
    T.build_synth_tokenizer(["x"], vocab_size=100)


def test_errors_name_the_problem(tok, tmp_path):
  with pytest.raises(KeyError, match="not a single token"):
    tok.id_of("surprisingly unusual phrase")
  with pytest.raises(FileNotFoundError, match="no tokenizer file"):
    T.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    T.load_hf(tmp_path / "missing")
