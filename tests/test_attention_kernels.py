"""The attention switch (ModelConfig.attention): the kernels this CPU can run ('blocked', the reference einsums per
causal query block; 'xla', jax.nn.dot_product_attention) give the reference einsums' numbers on the prompt-length
paths they serve: the padded forward pass (1-D RoPE), a video prompt (M-RoPE), the grouped teacher-forced pass and
its gradient; and each is the kernel that runs there. 'blocked' is also checked on its own against a float64
softmax written here. 'cudnn' needs a GPU: here it is refused with a clear error, which is all this machine can
show of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax import rollout
from merr1_jax.models import base, config, layers, mllm

V = 256


@pytest.fixture(params=["xla", "blocked"])
def kernel(request, monkeypatch):
  # Blocks of 4 positions, so that the tiny prompts below span several blocks, the last one ragged.
  monkeypatch.setattr(layers, "CAUSAL_BLOCK", 4)
  return request.param


def _pair(kernel="xla", **kw):
  ref = mllm.build("tiny", vocab_size=V, video_token_id=V - 2, audio_token_id=V - 1, init_std=0.3, **kw)
  fused = mllm.build("tiny", vocab_size=V, video_token_id=V - 2, audio_token_id=V - 1, init_std=0.3,
                     attention=kernel, **kw)
  return ref, fused, jax.jit(ref.init_params)(jax.random.key(0))  # the same parameter tree for both


def _left_padded(lens, length, seed=0, mrope=False, video=None):
  rs = np.random.RandomState(seed)
  toks, mask = np.zeros((len(lens), length), np.int32), np.zeros((len(lens), length), bool)
  for i, n in enumerate(lens):
    toks[i, length - n:] = rs.randint(4, V - 4, n)
    mask[i, length - n:] = True
    if video is not None:
      toks[i, length - n + 1:length - n + 1 + video[i]] = V - 2
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  if mrope:
    pos = np.stack([pos, pos // 2, pos % 3], -1).astype(np.int32)
  inputs = base.ModelInputs(tokens=toks, positions=pos, mask=mask)
  if video is not None:
    t = max(video)
    vmask = np.arange(t)[None] < np.asarray(video)[:, None]
    inputs = inputs.replace(video=rs.randn(len(lens), t, 32).astype(np.float32) * vmask[..., None],
                            video_mask=vmask)
  return jax.tree.map(jnp.asarray, inputs)


@pytest.mark.parametrize("kind", ["text_1d", "video_mrope"])
def test_kernel_forward_equals_the_reference(kind, kernel):
  if kind == "text_1d":
    ref, fused, params = _pair(kernel)
    inputs = _left_padded([7, 3, 10], 10)
  else:
    ref, fused, params = _pair(kernel, mrope_section=(4, 6, 6))
    inputs = _left_padded([9, 5, 12], 12, mrope=True, video=[3, 1, 4])
  real = np.asarray(inputs.mask)
  want = np.asarray(jax.jit(lambda p: ref.forward(p, ref.embed(p, inputs))[0])(params))
  got = np.asarray(jax.jit(lambda p: fused.forward(p, fused.embed(p, inputs))[0])(params))
  np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=1e-5)  # padding rows carry nothing
  assert np.abs(want[real]).max() > 1.0
  # The shared-prefix prefill (the prompt in a cache of its own length): the first token's logits and the
  # prompt's K/V where they are real.
  length = real.shape[1]
  (c_w, l_w, _), (c_g, l_g, _) = (rollout.prefill(m, 2, length + 3, None, params, inputs, True) for m in (ref, fused))
  np.testing.assert_allclose(np.asarray(l_g), np.asarray(l_w), atol=5e-5, rtol=1e-5)
  slots = lambda a: np.asarray(a).transpose(0, 2, 1, 3, 4)[real]  # noqa: E731 ([B, N, S, K, Dh] -> real slots)
  for a, b in ((c_g.prefix.k, c_w.prefix.k), (c_g.prefix.v, c_w.prefix.v)):
    np.testing.assert_allclose(slots(a), slots(b), atol=2e-5, rtol=1e-5)


def test_kernel_grouped_pass_and_its_gradient_equal_the_reference(kernel):
  ref, fused, params = _pair(kernel)
  p, g, t = 2, 3, 4
  prefix = _left_padded([6, 9], 9, seed=1)
  rs = np.random.RandomState(2)
  nxt = np.asarray(prefix.positions).max(1) + 1
  s_pos = nxt[:, None, None] + np.arange(t)[None, None, :] + np.zeros((p, g, 1), np.int32)
  s_mask = np.ones((p, g, t), bool)
  s_mask[0, 1, 3] = False  # a shorter suffix
  s_tok = rs.randint(4, V - 4, (p, g, t)).astype(np.int32)

  def loss(model, q):
    pre = model.embed(q, prefix)
    x = jnp.take(q["decoder"]["embed"]["embedding"][...], jnp.asarray(s_tok), axis=0)
    suf = base.Embedded(x=x, positions=jnp.asarray(s_pos, jnp.int32), mask=jnp.asarray(s_mask))
    h_p, (h_s,) = base.hidden_grouped(model, q, pre, [suf])
    return jnp.sum(h_s * jnp.asarray(s_mask)[..., None] * 0.1) + jnp.sum(h_p * prefix.mask[..., None] * 0.1), h_s

  (lw, hw), gw = jax.jit(jax.value_and_grad(lambda q: loss(ref, q), has_aux=True))(params)
  (lg, hg), gg = jax.jit(jax.value_and_grad(lambda q: loss(fused, q), has_aux=True))(params)
  np.testing.assert_allclose(np.asarray(hg)[s_mask], np.asarray(hw)[s_mask], atol=2e-5)
  assert abs(float(lg) - float(lw)) <= 1e-4 * max(1.0, abs(float(lw)))
  for a, b in zip(jax.tree.leaves(gg), jax.tree.leaves(gw)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def test_the_switch_reaches_the_kernel_on_every_prompt_length_path(monkeypatch):
  """The fused kernel really runs where the switch says (a switch that fell back to the reference would pass the
  equality tests above): one call per layer for the prompt, one per layer and segment for the suffixes; the
  decode steps stay on the einsum form."""
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw["implementation"]) or
                      real(*a, **kw))
  _, fused, params = _pair()
  inputs = _left_padded([5, 7], 7, seed=5)
  # Each pass jitted (the calls are recorded while it traces): one program, not an eager compile per operation.
  jax.jit(lambda p, i: fused.forward(p, fused.embed(p, i)))(params, inputs)
  assert calls == ["xla"] * fused.config.num_layers
  calls.clear()
  suf = base.Embedded(x=jnp.zeros((2, 2, 3, fused.config.d_model)), positions=jnp.full((2, 2, 3), 7, jnp.int32),
                      mask=jnp.ones((2, 2, 3), bool))
  jax.jit(lambda p, i, s: base.hidden_grouped(fused, p, fused.embed(p, i), [s, s]))(params, inputs, suf)
  assert calls == ["xla"] * fused.config.num_layers * 3  # the prompt and two segments, per layer
  calls.clear()
  cache, logits, next_pos = rollout.prefill(fused, 2, 7 + 2, None, params, inputs, True)
  calls.clear()  # the prefill's own calls
  step = base.ModelInputs(tokens=jnp.ones((4, 1), jnp.int32), positions=next_pos[:, None], mask=jnp.ones((4, 1), bool))
  jax.jit(lambda p, i, c: fused.forward(p, fused.embed(p, i), c))(params, step, cache)
  assert calls == []


def test_blocked_runs_on_the_causal_passes_only(monkeypatch):
  """'blocked' skips key blocks on the passes whose mask is causal: the forward pass, the grouped prompt pass and
  the shared-prefix prefill (a fresh cache of exactly L slots); a prefill into a longer cache, the grouped
  suffixes and the decode steps take the full einsums."""
  calls = []
  real = layers.attend_causal_blocks
  monkeypatch.setattr(layers, "attend_causal_blocks", lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw))
  monkeypatch.setattr(layers, "CAUSAL_BLOCK", 4)
  _, blocked, params = _pair("blocked")
  inputs = _left_padded([5, 7], 7, seed=5)
  jax.jit(lambda p, i: blocked.forward(p, blocked.embed(p, i)))(params, inputs)  # jitted: see the test above
  assert calls == [7] * blocked.config.num_layers
  calls.clear()
  suf = base.Embedded(x=jnp.zeros((2, 2, 3, blocked.config.d_model)), positions=jnp.full((2, 2, 3), 7, jnp.int32),
                      mask=jnp.ones((2, 2, 3), bool))
  jax.jit(lambda p, i, s: base.hidden_grouped(blocked, p, blocked.embed(p, i), [s, s]))(params, inputs, suf)
  assert calls == [7] * blocked.config.num_layers  # the prompt only
  calls.clear()
  rollout.prefill(blocked, 2, 7 + 2, None, params, inputs, True)
  assert calls == [7] * blocked.config.num_layers
  calls.clear()
  rollout.prefill(blocked, 2, 7 + 2, None, params, inputs, False)
  assert calls == []


def _attention_float64(q, k, v, mask):
  """Softmax attention in float64 numpy, grouped-query heads (head h reads KV head h // (H / K))."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  s = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
  s = np.where(np.asarray(mask)[:, None], s, -np.inf)
  s = s - s.max(-1, keepdims=True)
  w = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
  return np.einsum("bhls,bshd->blhd", w, v)


@pytest.mark.parametrize("length,block", [(10, 4), (12, 4), (9, 3), (5, 8)])
def test_causal_blocks_equal_a_float64_softmax_and_attend_gradient(length, block):
  """Each block of queries sees the keys up to its end and no further: the softmax equals a float64 one over the
  whole row (a block that read one key too few, or a ragged last block cut short, would not), the gradient equals
  `attend`'s, and each block reads exactly the keys up to its end (reading more would still be exact, and lose
  what the kernel is for). Left padding: rows without a key are left out (nothing reads them)."""
  rs = np.random.RandomState(length + block)
  b, h, kh, dh = 3, 4, 2, 8
  q, k, v = (jnp.asarray(rs.randn(b, length, n, dh), jnp.float32) for n in (h, kh, kh))
  starts = np.array([0, 2, length - 3])
  valid = np.arange(length)[None] >= starts[:, None]
  mask = jnp.asarray(np.tril(np.ones((length, length), bool))[None] & valid[:, None, :])
  # Jitted: one program per pass rather than an eager compile per operation of every block.
  got = np.asarray(jax.jit(lambda *a: layers.attend_causal_blocks(*a, mask, block))(q, k, v))
  want = _attention_float64(q, k, v, np.asarray(mask) | ~valid[:, :, None])  # padded query rows: any finite row
  np.testing.assert_allclose(got[valid], want[valid], atol=2e-6, rtol=1e-5)
  w = jnp.asarray(rs.randn(b, length, h, dh), jnp.float32) * jnp.asarray(valid)[..., None, None]
  grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * w), (0, 1, 2)))(q, k, v)  # noqa: E731
  g_blocked = grad(lambda *a: layers.attend_causal_blocks(*a, mask, block))
  g_full = grad(lambda *a: layers.attend(*a, mask))
  for a, c in zip(g_blocked, g_full):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="needs a self-attention pass"):
    layers.attend_causal_blocks(q[:, :2], k, v, mask[:, :2], block)


@pytest.mark.parametrize("length,block,keys", [(10, 4, [4, 8, 10]), (12, 4, [4, 8, 12]), (5, 8, [5])])
def test_causal_blocks_read_only_the_keys_up_to_each_block_end(monkeypatch, length, block, keys):
  seen = []
  real = layers.attend
  monkeypatch.setattr(layers, "attend", lambda q, k, *a: seen.append((q.shape[1], k.shape[1])) or real(q, k, *a))
  x = jnp.ones((1, length, 2, 4), jnp.float32)
  layers.attend_causal_blocks(x, x[:, :, :1], x[:, :, :1], jnp.tril(jnp.ones((1, length, length), bool)), block)
  assert [k for _, k in seen] == keys
  assert [q for q, _ in seen] == [min(block, length - i) for i in range(0, length, block)]


def test_cudnn_is_refused_off_a_gpu_and_unknown_kinds_by_the_config():
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU the cuDNN kernel runs: benchmarks/gpu.sh compares it with the reference")
  model = mllm.build("tiny", vocab_size=V, attention="cudnn")
  params = jax.jit(model.init_params)(jax.random.key(0))
  inputs = _left_padded([4], 4)
  with pytest.raises(ValueError, match="attention='cudnn' needs a GPU"):
    model.forward(params, model.embed(params, inputs))
  with pytest.raises(ValueError, match="ModelConfig.attention"):
    config.ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=8,
                       attention="splash")
