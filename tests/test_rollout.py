"""rollout: cached sampling equals the uncached forward pass, shared-prefix equals repeated prompts, behaviour
log-probs equal score(), fast mode, stop semantics, bucketing, bad input before compilation, sharding.

Every reference is computed here independently: the adapter's own uncached forward pass over one unpadded row
(no cache, no bucketing, no vocabulary chunking), numpy log-softmax, or a hand-built position script.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rollout
from merr1_jax.data import pipeline, synth
from merr1_jax.infra import sharding
from merr1_jax.models import base, mllm
from merr1_jax.rollout import passes as grouped
from merr1_jax.rollout import sampling
from merr1_jax.task import prompts, rewards

REF_LEN = 64
STD = 0.3  # a wider init than the default so a random model's greedy path varies (0.02 repeats one token)



@pytest.fixture(scope="module")
def ids(tok):
  return rollout.SpecialIds.from_tokenizer(tok)


def _build(tok, **kw):
  m = mllm.build("tiny", vocab_size=tok.vocab_size, video_token_id=tok.id_of(prompts.VIDEO_TOKEN),
                 audio_token_id=tok.id_of(prompts.AUDIO_TOKEN), init_std=STD, **kw)
  return m, m.init_params(jax.random.key(0))


@pytest.fixture(scope="module")
def text_model(tok):
  return _build(tok)


@pytest.fixture(scope="module")
def mrope_model(tok):
  return _build(tok, mrope_section=(4, 6, 6))


# ------------------------------------------------------------------------------------------- helpers


def _rows(tok, lens, seed=0, video=None):
  """Random text rows (ids above the markers); `video[i]` placeholders at the start of row i."""
  rng = np.random.RandomState(seed)
  out = []
  for i, n in enumerate(lens):
    row = rng.randint(len(prompts.SPECIAL_TOKENS) + len(prompts.TAG_TOKENS), tok.vocab_size, n)
    if video is not None:
      row[1:1 + video[i]] = tok.id_of(prompts.VIDEO_TOKEN)
    out.append(row.astype(np.int32))
  return out


def _left_pad(rows, length, mrope=False, pad=0):
  b = len(rows)
  toks, mask = np.full((b, length), pad, np.int32), np.zeros((b, length), bool)
  for i, r in enumerate(rows):
    toks[i, length - len(r):], mask[i, length - len(r):] = r, True
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  if mrope:  # three different id streams, so a mixed-up axis shows
    pos = np.stack([pos, pos // 2, pos % 3], axis=-1).astype(np.int32)
  return base.ModelInputs(tokens=toks, positions=pos, mask=mask)


def _with_video(inputs, n_video, dim, seed=0):
  t = max(n_video)
  feats = np.random.RandomState(seed).randn(len(n_video), t, dim).astype(np.float32)
  vmask = np.arange(t)[None] < np.asarray(n_video)[:, None]
  return inputs.replace(video=feats * vmask[..., None], video_mask=vmask)


def _ref_logits(model, params, inputs, p, completion):
  """Uncached, unpadded forward of prompt row p (its real columns) followed by `completion`."""
  m = np.asarray(inputs.mask[p])
  toks = np.concatenate([np.asarray(inputs.tokens[p])[m], completion]).astype(np.int32)
  pos = np.asarray(inputs.positions)[p][m]  # [n] or [n, 3]
  nxt = int(pos.max()) + 1
  new = np.arange(nxt, nxt + len(completion), dtype=np.int32)
  pos = np.concatenate([pos, np.broadcast_to(new.reshape(-1, *([1] * (pos.ndim - 1))), new.shape + pos.shape[1:])])
  feats = {}
  if inputs.video is not None:
    feats = dict(video=jnp.asarray(inputs.video[p:p + 1]), video_mask=jnp.asarray(inputs.video_mask[p:p + 1]))
  # Right-padded to a fixed width so one compiled forward serves every row: causal attention keeps the trailing
  # filler from touching the real positions.
  n = len(toks)
  toks, pos = np.pad(toks, (0, REF_LEN - n)), np.pad(pos, [(0, REF_LEN - n)] + [(0, 0)] * (pos.ndim - 1))
  x = base.ModelInputs(tokens=jnp.asarray(toks[None]), positions=jnp.asarray(pos[None]),
                       mask=jnp.ones((1, REF_LEN), bool), **feats)
  logits = _full_forward(model, params, x)[0]
  return np.asarray(logits)[m.sum() - 1:n]  # row j predicts completion[j]


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(model, params, x):
  return model.forward(params, model.embed(params, x), None)[0]


def _log_softmax(x):
  x = x.astype(np.float64)
  return x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True))


def _score(model, params, ro, **kw) -> np.ndarray:
  """[B, T] teacher-forced log-probs of a rollout's completions in its own prompt (grouped.score_pass)."""
  seg = grouped.segment(ro, ro.prompt, fast_prefix_ids=(), mode_id=0)
  (out,) = grouped.score_pass(model, params, ro.prompt, [seg], **kw)
  return np.asarray(out["logp"]).reshape(ro.completion.shape)


def _sample(model, params, inputs, **kw):
  base_kw = dict(mode="slow", num_samples=1, max_new_tokens=6, method=sampling.Greedy(), stop_ids=(),
                 rng=jax.random.key(7))
  return rollout.sample(model, params, inputs, **(base_kw | kw))


class Scripted:
  """A PolicyModel whose state at absolute position p adds `bias` to the logit of script[p].

  hidden() appends a one-hot of the position to h and unembed_weight() appends one bias row per position, so
  forward == hidden @ unembed still holds and the scoring pass sees the same policy as the sampler.
  """

  def __init__(self, inner, script, bias=60.0, span=128):
    self.inner, self.config, self.span = inner, inner.config, span
    rows = np.zeros((span, inner.config.vocab_size), np.float32)
    for p, t in script.items():
      rows[p, t] = bias
    self.rows = jnp.asarray(rows)

  hidden_grouped = None  # not the inner model's: the scoring pass runs base.hidden_grouped's fallback on hidden()

  def __getattr__(self, name):  # embed, init_cache, init_params, partition_rules
    return getattr(self.inner, name)

  def hidden(self, params, x, cache=None):
    h, cache = self.inner.hidden(params, x, cache)
    pos = x.positions if x.positions.ndim == 2 else x.positions[..., 0]
    return jnp.concatenate([h, jax.nn.one_hot(pos, self.span, dtype=h.dtype)], -1), cache

  def unembed_weight(self, params):
    return jnp.concatenate([self.inner.unembed_weight(params), self.rows.astype(jnp.float32)], 0)

  def forward(self, params, x, cache=None):
    h, cache = self.hidden(params, x, cache)
    return base.logits_from_hidden(h, self.unembed_weight(params)), cache


class NoSharedDecode(Scripted):
  shared_prefix_decode = False  # a port whose `hidden` only takes the plain KVCache


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["text_1d", "video_mrope"])
def test_greedy_equals_argmax_of_the_uncached_forward(tok, text_model, mrope_model, kind):
  lens = [23, 6, 15]
  if kind == "text_1d":
    (model, params), inputs = text_model, _left_pad(_rows(tok, lens), 30)
  else:
    n_video = [5, 2, 3]
    model, params = mrope_model
    inputs = _with_video(_left_pad(_rows(tok, lens, video=n_video), 30, mrope=True), n_video,
                         model.config.video_dim)
  r = _sample(model, params, inputs, max_new_tokens=8)
  assert r.prompt.tokens.shape[1] == 32  # bucketed from 30
  comp, logp = np.asarray(r.completion), np.asarray(r.logp)
  assert np.asarray(r.completion_mask).all() and (np.asarray(r.stop_reason) == rollout.StopReason.LENGTH).all()
  for p in range(len(lens)):
    ref = _ref_logits(model, params, inputs, p, comp[p])[:8]
    # Token by token: the cached choice is the argmax of the full forward pass (up to float ties).
    picked = np.take_along_axis(ref, comp[p][:, None], 1)[:, 0]
    np.testing.assert_array_less(ref.max(-1) - picked, 1e-4)
    np.testing.assert_allclose(logp[p], np.take_along_axis(_log_softmax(ref), comp[p][:, None], 1)[:, 0],
                               atol=1e-4)
  assert len(set(comp.ravel().tolist())) > 4  # the random model's path is not one repeated token


def test_shared_prefix_equals_repeated_prompts(tok, mrope_model):
  model, params = mrope_model
  n_video, g = [4, 1], 3
  inputs = _with_video(_left_pad(_rows(tok, [12, 20], video=n_video, seed=1), 20, mrope=True), n_video,
                       model.config.video_dim)
  method = sampling.TopP(temperature=1.0, p=0.9)
  shared = _sample(model, params, inputs, num_samples=g, method=method, max_new_tokens=10)
  rep = lambda a, axis=0: np.repeat(a, g, axis=axis)  # noqa: E731
  repeated_inputs = base.ModelInputs(tokens=rep(inputs.tokens), positions=rep(inputs.positions),
                                     mask=rep(inputs.mask), video=rep(inputs.video), video_mask=rep(inputs.video_mask))
  repeated = _sample(model, params, repeated_inputs, num_samples=1, method=method, max_new_tokens=10)
  np.testing.assert_array_equal(shared.completion, repeated.completion)
  # The two decode against differently shaped caches (2 prompts x 3 rows, 6 prompts x 1), so their sums run in
  # another order: 1.5e-5 apart on the newest XLA.
  np.testing.assert_allclose(shared.logp, repeated.logp, atol=5e-5)
  np.testing.assert_allclose(shared.logp_sampled, repeated.logp_sampled, atol=5e-5)
  assert shared.prompt.tokens.shape[0] == 2 and shared.completion.shape[0] == 2 * g
  # The G samples of a prompt differ (different row keys): they are real samples, not copies.
  c = np.asarray(shared.completion)
  assert not (c[0] == c[1]).all() and not (c[1] == c[2]).all()


def test_behaviour_logprobs_equal_score(tok, ids, text_model):
  model, params = text_model
  inputs = _left_pad(_rows(tok, [9, 17, 4], seed=2), 17)
  # EOS := a token this model emits often enough that some rows stop early and some run to the end.
  r = _sample(model, params, inputs, num_samples=2, max_new_tokens=12, method=sampling.Temperature(1.5),
              stop_ids=(), eos_id=None)
  first = np.asarray(r.completion)[:, 3]
  r = _sample(model, params, inputs, num_samples=2, max_new_tokens=12, method=sampling.Temperature(1.5),
              stop_ids=(int(first[0]),), eos_id=None)
  mask, lengths = np.asarray(r.completion_mask), np.asarray(r.length)
  assert lengths.min() < 12, "no row stopped: the test lost its early-stop case"
  s = _score(model, params, r, chunk_size=300)  # 836 = 2 full chunks + a ragged one
  np.testing.assert_allclose(s[mask], np.asarray(r.logp)[mask], atol=1e-4)
  assert not s[~mask].any() and not np.asarray(r.logp)[~mask].any()
  # The scoring pass and the loss's entropy (grouped.grouped_logprobs) against the independent reference.
  seg = grouped.segment(r, r.prompt, fast_prefix_ids=(), mode_id=0)
  ((_, ent),) = grouped.grouped_logprobs(model, params, jax.tree.map(jnp.asarray, r.prompt),
                                         [jax.tree.map(jnp.asarray, seg)], chunk_size=300, with_entropy=True)
  ent = np.asarray(ent).reshape(mask.shape)
  comp = np.asarray(r.completion)
  for row in (0, 3, 5):
    lp = _log_softmax(_ref_logits(model, params, inputs, row // 2, comp[row][:lengths[row]]))[:lengths[row]]
    np.testing.assert_allclose(s[row, :lengths[row]],
                               np.take_along_axis(lp, comp[row, :lengths[row], None], 1)[:, 0], atol=1e-4)
    np.testing.assert_allclose(ent[row, :lengths[row]], -(np.exp(lp) * lp).sum(-1), atol=1e-4)


def test_stop_reasons_lengths_and_early_exit(tok, ids, text_model):
  model, params = text_model
  # Rows of real length n continue at position n; the state at position q predicts the token at q + 1.
  script = {10: ids.answer_close, 12: ids.eos}
  scripted = Scripted(model, script)
  kw = dict(stop_ids=(ids.answer_close,), eos_id=ids.eos, max_new_tokens=8, pad_id=ids.pad)
  r = _sample(scripted, params, _left_pad(_rows(tok, [5, 9, 12, 14]), 14), **kw)
  # By hand: n=5 states at 4,5,..: position 10 is step 6 -> stop string, length 7. n=9: state 10 is step 2 ->
  # length 3. n=12: state 11 is step 0, state 12 is step 1 -> EOS, length 2. n=14: never scripted -> length 8.
  np.testing.assert_array_equal(r.length, [7, 3, 2, 8])
  S = rollout.StopReason
  np.testing.assert_array_equal(r.stop_reason, [S.STOP, S.STOP, S.EOS, S.LENGTH])
  comp = np.asarray(r.completion)
  assert comp[0, 6] == comp[1, 2] == ids.answer_close and comp[2, 1] == ids.eos
  assert (comp[0, 7:] == ids.pad).all() and (comp[1, 3:] == ids.pad).all() and (comp[2, 2:] == ids.pad).all()
  np.testing.assert_array_equal(r.completion_mask, np.arange(8)[None] < np.array([7, 3, 2, 8])[:, None])
  assert int(r.steps) == 8
  early = _sample(scripted, params, _left_pad(_rows(tok, [5, 9, 12]), 12), **kw)
  np.testing.assert_array_equal(early.length, [7, 3, 2])
  assert int(early.steps) == 7  # the loop stopped when the last row did, before max_new_tokens
  texts = rollout.completion_texts(tok, early)
  assert texts[2] == tok.decode(comp[2, :1])  # EOS dropped
  assert texts[1].endswith(prompts.ANSWER_CLOSE)  # the stop string kept (the answer format needs it)


def _scripted_answer(model, start, tokens):
  return Scripted(model, {start - 1 + i: t for i, t in enumerate(tokens)})


def test_fast_mode_appends_the_prefix_and_parses_like_slow(tok, ids, text_model):
  model, params = text_model
  rows = _rows(tok, [11], seed=3)
  slow_inputs = _left_pad(rows, 11)
  n = 11
  enc = tok.encode
  answer = enc("happy") + enc(", sad") + [ids.answer_close]
  slow_script = [ids.think[0]] + enc("calm voice") + [ids.think[1], ids.answer_open] + answer + [ids.eos]
  slow = _sample(_scripted_answer(model, n, slow_script), params, slow_inputs, max_new_tokens=16,
                 **ids.sample_kwargs("slow"))
  fast_model = _scripted_answer(model, n + len(ids.fast_prefix), answer + [ids.eos])
  fast = _sample(fast_model, params, slow_inputs, mode="fast", max_new_tokens=16, **ids.sample_kwargs("fast"))
  # The prefix went into the prompt, positions continuing the row.
  np.testing.assert_array_equal(np.asarray(fast.prompt.tokens)[0, -3:], ids.fast_prefix)
  np.testing.assert_array_equal(np.asarray(fast.prompt.positions)[0, -4:], [n - 1, n, n + 1, n + 2])
  assert int(fast.prompt_length[0]) == n + 3 and int(fast.stop_reason[0]) == rollout.StopReason.STOP
  # The pipeline's fast rendering (prefix already there) gives the same rollout.
  # An empty row (eval-batch padding) rides along without breaking the mode check or the real row.
  fast_rendered = _left_pad([np.concatenate([rows[0], ids.fast_prefix]), np.zeros(0, np.int32)], 14)
  again = _sample(fast_model, params, fast_rendered, mode="fast", max_new_tokens=16, **ids.sample_kwargs("fast"))
  np.testing.assert_array_equal(again.completion[:1], fast.completion)
  assert np.isfinite(np.asarray(again.logp)).all()
  (slow_text,), (fast_text,) = rollout.completion_texts(tok, slow), rollout.completion_texts(tok, fast)
  assert fast_text == "happy, sad</answer>" and slow_text == "<think>calm voice</think><answer>happy, sad</answer>"
  for text, mode in ((slow_text, "slow"), (fast_text, "fast")):
    assert rewards.format_ok(text, mode)
    assert rewards.parse_answer(rewards.assistant_text(text, mode)) == ("happy", "sad")


def test_fast_mode_never_writes_a_think_block(tok, ids, text_model):
  model, params = text_model
  inputs = _left_pad(_rows(tok, [6, 10], seed=4), 10)
  # A policy that wants to open a think block at every position.
  thinker = Scripted(model, {q: ids.think[0] for q in range(40)})
  slow = _sample(thinker, params, inputs, max_new_tokens=10, **ids.sample_kwargs("slow"))
  assert (np.asarray(slow.completion)[:, 0] == ids.think[0]).all()  # it would, if allowed
  for method in (sampling.Greedy(), sampling.Temperature(2.0)):
    fast = _sample(thinker, params, inputs, mode="fast", num_samples=4, max_new_tokens=10, method=method,
                   **ids.sample_kwargs("fast"))
    comp = np.asarray(fast.completion)[np.asarray(fast.completion_mask)]
    assert not np.isin(comp, ids.think).any()
    for text in rollout.completion_texts(tok, fast):
      assert prompts.THINK_OPEN not in text and prompts.THINK_CLOSE not in text
  # The ban is a sampler device: the behaviour log-prob stays that of the plain policy (tiny for a row that
  # the ban pushed off its argmax), so it still equals score().
  s = _score(thinker, params, fast)
  m = np.asarray(fast.completion_mask)
  np.testing.assert_allclose(s[m], np.asarray(fast.logp)[m], atol=1e-4)


def test_append_fast_prefix_positions_1d_and_3d():
  toks = np.array([[0, 0, 7, 8], [5, 6, 7, 8], [0, 0, 0, 0]], np.int32)
  mask = toks > 0
  pos1 = np.array([[0, 0, 0, 1], [0, 1, 2, 3], [0, 0, 0, 0]], np.int32)
  pos3 = np.stack([pos1, np.array([[0, 0, 0, 4], [0, 1, 1, 1], [0, 0, 0, 0]]), pos1 // 2], axis=-1).astype(np.int32)
  for pos, nxt in ((pos1, [2, 4, 0]), (pos3, [5, 4, 0])):  # by hand: max real position + 1 over all axes
    inp = base.ModelInputs(tokens=toks, positions=pos, mask=mask)
    for out in (rollout.append_fast_prefix(inp, [9, 10]),
                jax.tree.map(np.asarray, rollout.append_fast_prefix(jax.tree.map(jnp.asarray, inp), [9, 10]))):
      np.testing.assert_array_equal(out.tokens[:, 4:], [[9, 10]] * 3)
      assert out.mask[:, 4:].all() and (out.mask[:, :4] == mask).all()
      want = np.asarray(nxt)[:, None] + np.arange(2)
      got = out.positions[:, 4:]
      np.testing.assert_array_equal(got if pos.ndim == 2 else got[..., 0], want)
      if pos.ndim == 3:
        assert (got == got[..., :1]).all()


def test_same_bucket_reuses_the_compiled_programs(tok, text_model):
  model, params = text_model
  _sample(model, params, _left_pad(_rows(tok, [20, 3]), 20))
  n_prefill, n_decode = rollout.prefill._cache_size(), rollout.decode._cache_size()
  r = _sample(model, params, _left_pad(_rows(tok, [25, 31], seed=5), 40))  # 40 columns cut to bucket 32
  assert r.prompt.tokens.shape[1] == 32
  assert (rollout.prefill._cache_size(), rollout.decode._cache_size()) == (n_prefill, n_decode)


def test_bad_input_is_refused_before_compilation(tok, ids, text_model, monkeypatch):
  model, params = text_model
  def boom(*a, **k):
    raise AssertionError("compiled")
  monkeypatch.setattr(rollout, "prefill", boom)
  monkeypatch.setattr(rollout, "decode", boom)
  ok = _left_pad(_rows(tok, [5, 7]), 7)
  cases = [
      (dict(inputs=_left_pad(_rows(tok, [40]), 40), buckets=(16, 32)), "largest bucket"),
      (dict(max_new_tokens=2048 - 31), "exceeds the cache length"),
      (dict(max_new_tokens=100, max_cache_len=64), "exceeds the cache length"),
      (dict(stop_ids=(tok.vocab_size,)), "outside the vocabulary"),
      (dict(eos_id=-1), "outside the vocabulary"),
      (dict(ban_ids=(ids.eos,), eos_id=ids.eos), "both stop and banned"),
      (dict(max_new_tokens=0), "positive int"),
      (dict(inputs=ok.replace(mask=ok.mask[:, ::-1].copy())), "not left-padded"),
      (dict(inputs=ok.replace(tokens=ok.tokens + tok.vocab_size)), "outside the vocabulary"),
      (dict(mode="fast"), "needs fast_prefix_ids"),
      (dict(mode="medium"), "mode="),
  ]
  for kw, msg in cases:
    inputs = kw.pop("inputs", ok)
    with pytest.raises(ValueError, match=msg):
      _sample(model, params, inputs, **kw)
  # A batch mixing slow- and fast-rendered rows, and fast rows sent as slow.
  mixed = _left_pad([_rows(tok, [5])[0], np.concatenate([_rows(tok, [5])[0], ids.fast_prefix])], 8)
  with pytest.raises(ValueError, match="render the batch in one mode"):
    _sample(model, params, mixed, mode="fast", fast_prefix_ids=ids.fast_prefix)
  with pytest.raises(ValueError, match="end with the fast prefix"):
    _sample(model, params, mixed, mode="slow", fast_prefix_ids=ids.fast_prefix)
  # Placeholder/feature mismatch (one video placeholder, no features).
  with pytest.raises(ValueError, match="placeholder"):
    _sample(model, params, _left_pad(_rows(tok, [6], video=[1]), 6))


def test_score_category_logmass_at_fast_anchors(tok, ids, text_model):
  """grouped.score_pass on answers teacher-forced in the fast context (the slow-rendered prompt, then FAST_PREFIX
  and the answer as the suffix): log-probs and the category log-mass at the anchors against uncached logits."""
  model, params = text_model
  rows = _rows(tok, [8, 13], seed=6)
  enc = tok.encode
  completions = [enc("happy") + enc(", sad") + [ids.answer_close], enc("calm") + [ids.answer_close]]
  prompt = rollout.prepare_prompts(_left_pad(rows, 13), mode="slow", vocab_size=tok.vocab_size, pad_id=ids.pad)
  seg = grouped.token_segment(completions, prompt, num_samples=1, prefix_ids=ids.fast_prefix, mode_id=1,
                              pad_id=ids.pad)
  sets = (np.random.RandomState(0).rand(1, 3, tok.vocab_size) < 0.1).astype(np.float32)
  (s,) = grouped.score_pass(model, params, prompt, [seg], token_sets=jnp.asarray(sets), anchors=ids.anchors(4),
                            chunk_size=256)
  # By hand: anchor 0 is the state on the prefix's <answer> (it predicts completion index 0); in row 0 the ','
  # sits at completion index 1, so the state on it predicts completion index 2.
  np.testing.assert_array_equal(np.asarray(s["anchor_mask"])[:, 0], [[1, 1, 0, 0], [1, 0, 0, 0]])
  predicts = [[0, 2], [0]]
  n = len(ids.fast_prefix)
  fast_prompt = rollout.prepare_prompts(_left_pad(rows, 13), mode="fast", vocab_size=tok.vocab_size,
                                        fast_prefix_ids=ids.fast_prefix, pad_id=ids.pad)
  for b, c in enumerate(completions):
    lp = _log_softmax(_ref_logits(model, params, fast_prompt, b, np.asarray(c)))
    for a, j in enumerate(predicts[b]):
      want = np.log((np.exp(lp[j])[None] * sets[0]).sum(-1))
      np.testing.assert_allclose(np.asarray(s["logmass"])[b, 0, a, 0], want, atol=1e-4)
    np.testing.assert_allclose(np.asarray(s["logp"])[b, 0, n:n + len(c)],
                               np.take_along_axis(lp[:len(c)], np.asarray(c)[:, None], 1)[:, 0], atol=1e-4)


def test_pipeline_batch_fast_prompts_match_appended_prefix(tok, ids):
  cfg = synth.SynthConfig(n_train=4, n_validation=1, n_test=1)
  model, params = _build(tok, video_dim=cfg.video_dim, audio_dim=cfg.audio_dim)
  recs = list(synth.generate_split(cfg, "train"))
  pcfg = pipeline.PipelineConfig(kind="rl", batch_size=2, shuffle=False, video_dim=cfg.video_dim,
                                 audio_dim=cfg.audio_dim, feature_dtype="float32")
  batch = next(iter(pipeline.build(pipeline.BytesSource(recs), tok, pcfg)))
  kw = dict(mode="fast", num_samples=2, method=sampling.Temperature(1.0), **ids.sample_kwargs("fast"))
  rendered = _sample(model, params, rollout.batch_inputs(batch, "fast"), **kw)
  appended = _sample(model, params, rollout.batch_inputs(batch, "slow"), **kw)
  np.testing.assert_array_equal(rendered.prompt.tokens, appended.prompt.tokens)
  np.testing.assert_array_equal(rendered.completion, appended.completion)
  np.testing.assert_allclose(rendered.logp, appended.logp, atol=1e-5)


def test_sharded_equals_unsharded(tok, text_model):
  model, params = text_model
  devices = np.asarray(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs the 8 fake CPU devices from conftest.py")
  mesh = jax.sharding.Mesh(devices.reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "q_heads": "tensor", "kv_heads": "tensor",
           "vocab": "tensor"}
  specs = base.param_partition_specs(params, model.partition_rules(), rules)
  sharded = jax.device_put(params, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs))
  assert tuple(sharded["decoder"]["layers"]["gate_kernel"][...].sharding.spec) == (None, "fsdp", "tensor")
  inputs = _left_pad(_rows(tok, [9, 3, 14, 7], seed=8), 14)
  kw = dict(num_samples=2, method=sampling.Temperature(1.0), max_new_tokens=6)
  ref = _sample(model, params, inputs, **kw)
  got = _sample(model, sharded, inputs, mesh=mesh, axis_rules=rules, **kw)
  np.testing.assert_array_equal(got.completion, ref.completion)
  np.testing.assert_allclose(got.logp, ref.logp, atol=1e-4)  # sharded reductions sum in another order
  spec = lambda a: tuple(a.sharding.spec) + (None,) * (a.ndim - len(a.sharding.spec))  # noqa: E731
  assert spec(got.completion)[0] == ("data", "fsdp")  # the batch stayed split, nothing went to one device
  layout = sharding.BatchLayout.make(mesh, rules)
  cache, logits, _ = rollout.prefill(model, 2, 40, layout, sharded, got.prompt)
  assert spec(cache.k) == (("data", "fsdp"), None, None, "tensor", None) and spec(logits)[0] == ("data", "fsdp")
  s_ref, s_got = _score(model, params, ref), _score(model, sharded, got, mesh=mesh, axis_rules=rules)
  np.testing.assert_allclose(s_got, s_ref, atol=1e-4)


@functools.partial(jax.jit, static_argnames=("model", "g", "cache_len", "layout", "shared"))
def _teacher_forced_decode(model, params, prompt, tokens_BxT, *, g, cache_len, layout, shared):
  """[T+1, B, V] next-token logits: the prefill's, then one per decode step fed `tokens_BxT` (the sampler's step
  without the sampling), through either decode cache."""
  cache, logits, next_pos = rollout.prefill(model, g, cache_len, layout, params, prompt, shared)

  def step(cache, xs):
    t, tok_B = xs
    pos = (next_pos + t)[:, None]
    pos = jnp.broadcast_to(pos[..., None], (*pos.shape, 3)) if prompt.positions.ndim == 3 else pos
    x = model.embed(params, base.ModelInputs(tokens=tok_B[:, None], positions=pos,
                                             mask=jnp.ones_like(tok_B[:, None], bool)))
    out, cache = model.forward(params, x, cache)
    return cache, out[:, 0]

  t = tokens_BxT.shape[1]
  _, rest = jax.lax.scan(step, cache, (jnp.arange(t), tokens_BxT.T))
  return jnp.concatenate([logits[None], rest], 0)


@pytest.mark.parametrize("kind,mesh_shape", [("text_1d", (8, 1, 1)), ("text_1d", (2, 2, 2)),
                                             ("video_mrope", (8, 1, 1)), ("video_mrope", (2, 2, 2))])
def test_shared_prefix_decode_equals_the_repeated_cache(tok, text_model, mrope_model, kind, mesh_shape):
  """Decoding against the prompt's cache stored once per prompt (base.SharedPrefixCache: prefix and suffix parts
  merged in one softmax) gives the next-token logits of decoding against the prompt's cache repeated per row, at
  every step, on a mesh that splits the batch 8 ways and on one that also splits the KV heads."""
  devices = np.asarray(jax.devices()[:8])
  if devices.size < 8:
    pytest.skip("needs the 8 fake CPU devices from conftest.py")
  g, t = 3, 5
  lens = [9, 3, 14, 7, 12, 5, 10, 2]
  if kind == "text_1d":
    (model, params), inputs = text_model, _left_pad(_rows(tok, lens, seed=3), 14)
  else:
    n_video = [4, 1, 5, 3, 2, 1, 6, 1]
    model, params = mrope_model
    inputs = _with_video(_left_pad(_rows(tok, lens, seed=3, video=n_video), 14, mrope=True), n_video,
                         model.config.video_dim)
  mesh = jax.sharding.Mesh(devices.reshape(mesh_shape), ("data", "fsdp", "tensor"))
  rules = {"embed": "fsdp", "mlp": "tensor", "q_heads": "tensor", "kv_heads": "tensor", "vocab": "tensor"}
  specs = base.param_partition_specs(params, model.partition_rules(), rules)
  sharded = jax.device_put(params, jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs))
  prompt = rollout.prepare_prompts(inputs, mode="slow", vocab_size=tok.vocab_size)
  prompt, layout = rollout.shared_prefix.place_prompt(model, prompt, mesh, rules)
  length = prompt.tokens.shape[1]
  fed = jax.random.randint(jax.random.key(1), (len(lens) * g, t), 40, tok.vocab_size - 2)
  kw = dict(g=g, cache_len=length + t, layout=layout)
  got = np.asarray(_teacher_forced_decode(model, sharded, prompt, fed, shared=True, **kw))
  want = np.asarray(_teacher_forced_decode(model, sharded, prompt, fed, shared=False, **kw))
  assert got.shape == (t + 1, len(lens) * g, tok.vocab_size)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)  # sharded sums in another order (as above)
  assert np.abs(got[1:] - got[1:].mean()).max() > 0.1  # the logits vary: a constant output would pass trivially
  # The cache it decodes against: the prompt's slots once per prompt, sharded like the repeated cache.
  cache = jax.eval_shape(lambda: rollout.prefill(model, g, length + t, layout, sharded, prompt, True)[0])
  assert cache.prefix.k.shape[0] == len(lens) and cache.prefix.k.shape[2] == length
  assert cache.suffix.k.shape[0] == len(lens) * g and cache.suffix.k.shape[2] == t and cache.group == g


def test_shared_decode_needs_a_model_that_accepts_it(tok, text_model):
  model, params = text_model
  inputs = _left_pad(_rows(tok, [4, 6]), 6)
  with pytest.raises(ValueError, match="shared_prefix_decode"):
    _sample(NoSharedDecode(model, {}), params, inputs, shared_decode=True)
  # Without the capability, the default (None) decodes against the repeated cache: the same greedy tokens.
  np.testing.assert_array_equal(_sample(NoSharedDecode(model, {}), params, inputs).completion,
                                _sample(model, params, inputs).completion)
  a = _sample(model, params, inputs, num_samples=2, shared_decode=True)
  b = _sample(model, params, inputs, num_samples=2, shared_decode=False)
  np.testing.assert_array_equal(a.completion, b.completion)
  np.testing.assert_allclose(a.logp, b.logp, atol=1e-5)


def _rollouts_equal(got, ref):
  for f in ("completion", "completion_mask", "stop_reason", "length", "prompt_length"):
    np.testing.assert_array_equal(getattr(got, f), getattr(ref, f), err_msg=f)
  for f in ("tokens", "positions", "mask"):
    np.testing.assert_array_equal(getattr(got.prompt, f), getattr(ref.prompt, f), err_msg=f"prompt.{f}")
  np.testing.assert_allclose(got.logp, ref.logp, atol=2e-5)
  np.testing.assert_allclose(got.logp_sampled, ref.logp_sampled, atol=2e-5)
  assert (got.num_samples, got.mode) == (ref.num_samples, ref.mode)


def test_both_modes_in_one_loop_equal_sampling_each_mode(tok, ids, mrope_model):
  """sample_modes (one prefill, the fast prefix fed into the fast rows' own caches, one decode loop) draws what
  `sample` draws per mode with the same keys: video features, M-RoPE, temperature sampling, and a fast prompt
  whose bucket (64) differs from the slow one (32)."""
  model, params = mrope_model
  n_video = [3, 1, 2, 4]
  inputs = _with_video(_left_pad(_rows(tok, [28, 4, 31, 15], video=n_video, seed=5), 31, mrope=True), n_video,
                       model.config.video_dim)
  modes = {"slow": dict(num_samples=3, max_new_tokens=9, rng=jax.random.key(1), **ids.sample_kwargs("slow")),
           "fast": dict(num_samples=2, max_new_tokens=4, rng=jax.random.key(2), **ids.sample_kwargs("fast"))}
  method = sampling.Temperature(1.0)
  joint = rollout.sample_modes(model, params, inputs, modes=modes, method=method)
  assert list(joint) == ["slow", "fast"]
  for m, kw in modes.items():
    ref = rollout.sample(model, params, inputs, mode=m, method=method, **kw)
    _rollouts_equal(joint[m], ref)
  assert joint["slow"].prompt.tokens.shape[1] == 32 and joint["fast"].prompt.tokens.shape[1] == 64
  assert int(joint["slow"].steps) == int(joint["fast"].steps) == 9  # one loop, as long as the longest budget
  # The loop over the stacked layer weights (no split before it) draws the same, bit for bit.
  stacked = rollout.sample_modes(model, params, inputs, modes=modes, method=method, layer_slices=False)
  for m in modes:
    for f in ("completion", "logp", "logp_sampled", "length"):
      np.testing.assert_array_equal(getattr(stacked[m], f), getattr(joint[m], f), err_msg=f"{m} {f}")


def test_both_modes_in_one_loop_keep_each_modes_stop_ban_and_budget(tok, ids, text_model):
  """Per-row rules in the joint loop: at the same step a fast row may not open a think block and stops at
  </answer>, while a slow row writes both and runs on to EOS; each mode's budget is its own."""
  model, params = text_model
  n, k = 8, len(ids.fast_prefix)
  inputs = _left_pad(_rows(tok, [n, n], seed=6), n)
  # Generated token i is predicted at position n - 1 + i in a slow row and n - 1 + k + i in a fast row.
  assert k + 2 < 8
  script = {n - 1 + k: ids.think[0], n - 1 + k + 2: ids.answer_close, n - 1 + 8: ids.eos}
  scripted = Scripted(model, script)
  modes = {"slow": dict(num_samples=2, max_new_tokens=12, rng=jax.random.key(3), **ids.sample_kwargs("slow")),
           "fast": dict(num_samples=3, max_new_tokens=6, rng=jax.random.key(4), **ids.sample_kwargs("fast"))}
  joint = rollout.sample_modes(scripted, params, inputs, modes=modes, method=sampling.Greedy())
  slow, fast = (np.asarray(joint[m].completion) for m in ("slow", "fast"))
  assert (slow[:, k] == ids.think[0]).all() and (slow[:, k + 2] == ids.answer_close).all()
  assert (slow[:, 8] == ids.eos).all()
  np.testing.assert_array_equal(joint["slow"].stop_reason, rollout.StopReason.EOS)
  np.testing.assert_array_equal(joint["slow"].length, 9)
  assert (fast[:, 0] != ids.think[0]).all() and (fast[:, 2] == ids.answer_close).all()
  np.testing.assert_array_equal(joint["fast"].stop_reason, rollout.StopReason.STOP)
  np.testing.assert_array_equal(joint["fast"].length, 3)
  assert slow.shape == (4, 12) and fast.shape == (6, 6)
  for m, kw in modes.items():
    _rollouts_equal(joint[m], rollout.sample(scripted, params, inputs, mode=m, method=sampling.Greedy(), **kw))
  # A budget ends a row: fast rows without a stop run to their own 6 tokens while slow rows go on.
  joint = rollout.sample_modes(model, params, inputs, method=sampling.Greedy(),
                               modes={"slow": dict(modes["slow"], stop_ids=()) | {"eos_id": None},
                                      "fast": dict(modes["fast"], stop_ids=()) | {"eos_id": None}})
  np.testing.assert_array_equal(joint["fast"].length, 6)
  np.testing.assert_array_equal(joint["slow"].length, 12)
  np.testing.assert_array_equal(joint["fast"].stop_reason, rollout.StopReason.LENGTH)


def test_both_modes_refuse_mismatched_shared_arguments(tok, ids, text_model):
  model, params = text_model
  inputs = _left_pad(_rows(tok, [5]), 5)
  kw = dict(num_samples=1, max_new_tokens=2, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="pad_id differs"):
    rollout.sample_modes(model, params, inputs, method=sampling.Greedy(),
                         modes={"slow": kw | ids.sample_kwargs("slow"),
                                "fast": kw | ids.sample_kwargs("fast") | {"pad_id": ids.pad + 1}})
  with pytest.raises(ValueError, match="'slow' and/or 'fast'"):
    rollout.sample_modes(model, params, inputs, method=sampling.Greedy(), modes={"medium": kw})
  with pytest.raises(ValueError, match="eos_id differs"):  # an absent eos_id means no EOS: not the same
    rollout.sample_modes(model, params, inputs, method=sampling.Greedy(),
                         modes={"slow": kw | {"eos_id": ids.eos}, "fast": kw | {"fast_prefix_ids": ids.fast_prefix}})
  with pytest.raises(TypeError, match="unknown arguments"):
    rollout.sample_modes(model, params, inputs, method=sampling.Greedy(),
                         modes={"slow": kw | {"temperature": 0.7}, "fast": kw | ids.sample_kwargs("fast")})
  # A fast prompt beyond the largest bucket is refused before anything compiles, as `sample` refuses it.
  long = _left_pad(_rows(tok, [30]), 30)
  with pytest.raises(ValueError, match="longer than the largest bucket"):
    rollout.sample_modes(model, params, long, method=sampling.Greedy(), buckets=(32,),
                         modes={"slow": kw | ids.sample_kwargs("slow"), "fast": kw | ids.sample_kwargs("fast")})


def test_decode_donates_the_prefill_cache(tok, text_model):
  """decode() donates the cache: after the loop the prefill cache buffers are gone (updated in place), while the
  other inputs survive."""
  model, params = text_model
  prompt = rollout.prepare_prompts(_left_pad(_rows(tok, [5, 7]), 7), mode="slow", vocab_size=tok.vocab_size)
  prompt = jax.tree.map(jnp.asarray, prompt)
  cache, logits, next_pos = rollout.prefill(model, 2, prompt.tokens.shape[1] + 6, None, params, prompt)
  spec = rollout.DecodeSpec(sampling.Greedy(), 6, (), None, (), 0, False)
  buffers = jax.tree.leaves(cache)
  assert buffers and not any(b.is_deleted() for b in buffers)
  out = jax.block_until_ready(rollout.decode(model, spec, params, cache, logits, next_pos, jax.random.key(0)))
  assert all(b.is_deleted() for b in buffers)
  assert not logits.is_deleted() and not next_pos.is_deleted()
  assert not any(b.is_deleted() for b in jax.tree.leaves(out.cache))


def test_layer_weights_split_before_the_decode_loop_draw_the_same_samples(tok, text_model):
  """sampler.hoist_layer_slices: each stacked layer leaf split into its layers, rebuilt unchanged; the loop that
  reads the pieces samples what the loop over the stacked weights samples (same keys), bit for bit."""
  model, params = text_model
  n = model.config.num_layers
  pieces, rebuild = rollout.sampler.hoist_layer_slices(model, params)
  flat = jax.tree.leaves(params)
  split = [p for p in pieces if isinstance(p, tuple)]
  assert split and all(len(p) == n for p in split) and len(pieces) == len(flat)
  assert all(a.shape == x.shape[1:] for x, p in zip(flat, pieces) if isinstance(p, tuple) for a in p)
  rebuilt = rebuild(pieces)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rebuilt), flat))
  prompt = rollout.prepare_prompts(_left_pad(_rows(tok, [5, 7]), 7), mode="slow", vocab_size=tok.vocab_size)
  prompt = jax.tree.map(jnp.asarray, prompt)
  outs = {}
  for split_layers in (False, True):
    cache, logits, next_pos = rollout.prefill(model, 3, prompt.tokens.shape[1] + 8, None, params, prompt)
    spec = rollout.DecodeSpec(sampling.Temperature(1.0), 8, (), None, (), 0, False, layer_slices=split_layers)
    outs[split_layers] = rollout.decode(model, spec, params, cache, logits, next_pos, jax.random.key(3))
  np.testing.assert_array_equal(outs[True].tokens, outs[False].tokens)
  np.testing.assert_array_equal(outs[True].logp, outs[False].logp)
  assert len(set(np.asarray(outs[True].tokens).ravel().tolist())) > 3  # a sampled, varied path
  # What the loop is given: with the split, no stacked weight enters the while loop, only its layers' pieces.
  stacked_shapes = {x.shape for x, p in zip(flat, pieces) if isinstance(p, tuple)}
  for split_layers in (False, True):
    cache, logits, next_pos = rollout.prefill(model, 3, prompt.tokens.shape[1] + 8, None, params, prompt)
    spec = rollout.DecodeSpec(sampling.Temperature(1.0), 8, (), None, (), 0, False, layer_slices=split_layers)
    jaxpr = jax.make_jaxpr(rollout.sampler._decode, static_argnums=(0, 1))(
        model, spec, params, cache, logits, next_pos, jax.random.key(3))
    (loop,) = [e for e in jaxpr.eqns if e.primitive.name == "while"]
    shapes = [v.aval.shape for v in loop.invars]
    assert (stacked_shapes <= set(shapes)) == (not split_layers), split_layers
    assert (sum(s in stacked_shapes for s in shapes) == 0) == split_layers
  # The default (None): split on the CPU for unrolled layers; a scanned model keeps its stack.
  pays = rollout.sampler.layer_slices_pay
  auto = rollout.DecodeSpec(sampling.Greedy(), 4, (), None, (), 0, False)
  scanned, _ = _build(tok, scan_layers=True)
  assert pays(model, auto) == (jax.default_backend() == "cpu") and not pays(scanned, auto)
  assert not pays(model, rollout.DecodeSpec(sampling.Greedy(), 4, (), None, (), 0, False, layer_slices=False))
  assert pays(scanned, rollout.DecodeSpec(sampling.Greedy(), 4, (), None, (), 0, False, layer_slices=True))


def test_sample_and_sample_modes_pass_layer_slices_to_the_loop(tok, ids, text_model, monkeypatch):
  model, params = text_model
  seen, real = [], rollout.sampler.decode
  monkeypatch.setattr(rollout.sampler, "decode", lambda m, spec, *a, **k: seen.append(spec.layer_slices) or real(
      m, spec, *a, **k))
  inputs = _left_pad(_rows(tok, [5, 7]), 7)
  kw = dict(num_samples=2, max_new_tokens=3, rng=jax.random.key(0))
  for flag in (None, False, True):
    rollout.sample(model, params, inputs, mode="slow", method=sampling.Greedy(), layer_slices=flag, **kw,
                   **ids.sample_kwargs("slow"))
    rollout.sample_modes(model, params, inputs, method=sampling.Greedy(), layer_slices=flag,
                         modes={m: kw | ids.sample_kwargs(m) for m in ("slow", "fast")})
  assert seen == [None, None, False, False, True, True]
  # Anything else is refused by name before a loop is traced (a truthy string would otherwise mean True).
  for bad in ("no", 1, 0.0):
    with pytest.raises(ValueError, match=f"layer_slices must be None, True or False, got {bad!r}"):
      rollout.sample(model, params, inputs, mode="slow", method=sampling.Greedy(), layer_slices=bad, **kw,
                     **ids.sample_kwargs("slow"))


def test_score_pass_refuses_ids_outside_the_vocabulary_before_compiling(tok, ids, text_model, monkeypatch):
  model, params = text_model

  def boom(*a, **k):
    raise AssertionError("compiled")

  monkeypatch.setattr(grouped, "_score_jit", boom)
  prompt = rollout.prepare_prompts(_left_pad(_rows(tok, [5, 7]), 7), mode="slow", vocab_size=tok.vocab_size)
  vocab = tok.vocab_size
  for bad, shown in ((vocab, vocab), (-1, -1)):
    seg = grouped.token_segment([[5, 6, bad], [8]], prompt, num_samples=1, prefix_ids=(), mode_id=0)
    with pytest.raises(ValueError, match=rf"segment 0 holds token ids outside the vocabulary \[0, {vocab}\): "
                                         rf"\[{shown}\] in suffix rows \[\[0, 0\]\]"):
      grouped.score_pass(model, params, prompt, [seg])
  good = grouped.token_segment([[5, 6, 7], [8]], prompt, num_samples=1, prefix_ids=(), mode_id=0)
  with pytest.raises(AssertionError, match="compiled"):  # a valid segment passes the check
    grouped.score_pass(model, params, prompt, [good])
