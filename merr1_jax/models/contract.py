"""Contract checks every `PolicyModel` adapter must pass (used by tests/test_models_contract.py).

Each `check_*` function builds its own small text-only batch, runs the adapter and raises AssertionError
with the measured difference when the adapter breaks the protocol in base.py. `check_policy_contract`
runs them all. References are the adapter's own unpadded, uncached, single-row forward pass, so the checks
need no golden numbers: they test the protocol's invariants (padding, caching, causality, unembedding).

Shape legend: B batch, L tokens, P prompt length, G group size, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax.models import base


def _assert_close(got, want, atol: float, what: str) -> None:
  err = float(np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))))
  assert err <= atol, f"{what}: max abs diff {err:.3g} > {atol:.1g}"


def _positions(model, pos_BxL) -> jnp.ndarray:
  """[B, L] positions, or [B, L, 3] M-RoPE ids that differ per axis (so a mixed-up axis shows)."""
  if getattr(model.config, "mrope_section", None) is None:
    return jnp.asarray(pos_BxL, jnp.int32)
  return jnp.stack([pos_BxL, pos_BxL // 2, pos_BxL % 3], axis=-1).astype(jnp.int32)


def _text_tokens(model, rng: np.random.RandomState, shape) -> np.ndarray:
  vocab = model.config.vocab_size
  toks = rng.randint(0, vocab, size=shape)
  for name in ("video_token_id", "audio_token_id"):  # text-only: no placeholder may appear
    ph = getattr(model.config, name, None)
    if ph is not None:
      toks = np.where(toks == ph, (ph + 1) % vocab, toks)
  return toks.astype(np.int32)


@functools.lru_cache(maxsize=32)
def _fwd(model):
  """forward(embed(inputs)) under jit: eager dispatch of a whole decoder is needlessly slow on CPU."""
  return jax.jit(lambda params, inputs, cache: model.forward(params, model.embed(params, inputs), cache))


def _inputs(model, toks_BxL, pos_BxL, mask_BxL) -> base.ModelInputs:
  return base.ModelInputs(tokens=jnp.asarray(toks_BxL), positions=_positions(model, pos_BxL),
                          mask=jnp.asarray(mask_BxL, bool))


def _row_logits(model, params, toks_L: np.ndarray) -> np.ndarray:
  """Reference: one unpadded row, no cache."""
  n = len(toks_L)
  inp = _inputs(model, toks_L[None], np.arange(n)[None], np.ones((1, n), bool))
  return np.asarray(_fwd(model)(params, inp, None)[0][0])


def _pad(seqs: list[np.ndarray], length: int, left: bool):
  b = len(seqs)
  toks, pos, mask = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32), np.zeros((b, length), bool)
  for i, s in enumerate(seqs):
    sl = slice(length - len(s), length) if left else slice(0, len(s))
    toks[i, sl], pos[i, sl], mask[i, sl] = s, np.arange(len(s)), True
  return toks, pos, mask


def check_params_and_rules(model, params) -> None:
  leaves = jax.tree.leaves(params)
  assert leaves, "init_params returned no arrays"
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves), "init_params produced non-finite values"
  base.logical_axes(params, model.partition_rules())  # raises listing uncovered / wrong-rank params


def check_forward_is_hidden_times_unembed(model, params, seed: int = 0, atol: float = 1e-5) -> None:
  rng = np.random.RandomState(seed)
  toks = _text_tokens(model, rng, (2, 5))

  @jax.jit
  def run(params, inputs):
    x = model.embed(params, inputs)
    return model.forward(params, x, None), model.hidden(params, x, None)[0], model.unembed_weight(params)

  (logits, cache), h, w = run(params, _inputs(model, toks, np.tile(np.arange(5), (2, 1)), np.ones((2, 5), bool)))
  assert cache is None, "forward without a cache must return None for the cache"
  assert logits.dtype == jnp.float32, f"logits must be float32, got {logits.dtype}"
  assert w.shape == (h.shape[-1], model.config.vocab_size), f"unembed_weight shape {w.shape}"
  _assert_close(logits, base.logits_from_hidden(h, w), atol, "forward vs hidden @ unembed_weight")


def check_padding_invariance(model, params, seed: int = 0, atol: float = 1e-5) -> None:
  """Left- and right-padded batches give each row the logits of the row alone (no cache)."""
  rng = np.random.RandomState(seed)
  seqs = [_text_tokens(model, rng, (n,)) for n in (6, 3, 5)]
  refs = [_row_logits(model, params, s) for s in seqs]
  for left in (True, False):
    toks, pos, mask = _pad(seqs, 7, left)
    logits = np.asarray(_fwd(model)(params, _inputs(model, toks, pos, mask), None)[0])
    for i, s in enumerate(seqs):
      got = logits[i, 7 - len(s):] if left else logits[i, :len(s)]
      _assert_close(got, refs[i], atol, f"{'left' if left else 'right'}-padded row {i} vs unpadded")


def check_causality(model, params, seed: int = 0) -> None:
  """d logits[t] / d x[s] == 0 for s > t, and != 0 for some s <= t."""
  rng = np.random.RandomState(seed)
  n, t = 6, 2
  toks = _text_tokens(model, rng, (1, n))
  x = jax.jit(model.embed)(params, _inputs(model, toks, np.arange(n)[None], np.ones((1, n), bool)))
  probe = jnp.asarray(rng.randn(model.config.vocab_size), jnp.float32)

  def f(x_BxLxD):
    logits, _ = model.forward(params, base.Embedded(x=x_BxLxD, positions=x.positions, mask=x.mask), None)
    return logits[0, t] @ probe

  g = np.asarray(jax.jit(jax.grad(f))(x.x.astype(jnp.float32)))
  assert np.all(g[0, t + 1:] == 0), f"logits at {t} depend on later positions: {np.abs(g[0, t + 1:]).max()}"
  assert np.abs(g[0, :t + 1]).max() > 0, "logits do not depend on earlier positions at all"


def check_cached_decode(model, params, *, group: int = 2, decode_len: int = 3, seed: int = 0,
                        atol: float = 1e-5, left: bool = True) -> None:
  """Prefill a padded batch, broadcast the cache G times with tree.map(repeat), decode token by token
  inside a jitted fori_loop with the cache donated; every logit equals the unpadded full forward."""
  rng = np.random.RandomState(seed)
  prompts = [_text_tokens(model, rng, (n,)) for n in (5, 2, 4)]
  conts = [_text_tokens(model, rng, (decode_len,)) for _ in prompts]
  refs = [_row_logits(model, params, np.concatenate([p, c])) for p, c in zip(prompts, conts)]
  plen = 6
  toks, pos, mask = _pad(prompts, plen, left)
  cache = model.init_cache(len(prompts), plen + decode_len)
  logits, cache = _fwd(model)(params, _inputs(model, toks, pos, mask), cache)
  for i, p in enumerate(prompts):
    got = np.asarray(logits[i, plen - len(p):] if left else logits[i, :len(p)])
    _assert_close(got, refs[i][:len(p)], atol, f"prefill row {i} vs full forward")

  cache = jax.tree.map(lambda a: jnp.repeat(a, group, axis=0), cache)
  lens = np.repeat([len(p) for p in prompts], group)
  cont = np.repeat(np.stack(conts), group, axis=0)  # [B*G, decode_len]

  def decode(params, cache, cont_BxT, lens_B):
    def body(j, carry):
      cache, out = carry
      tok = jax.lax.dynamic_slice_in_dim(cont_BxT, j, 1, axis=1)
      pos = (lens_B + j)[:, None]
      inp = base.ModelInputs(tokens=tok, positions=_positions(model, pos), mask=jnp.ones_like(tok, bool))
      logits, cache = model.forward(params, model.embed(params, inp), cache)
      return cache, jax.lax.dynamic_update_slice_in_dim(out, logits, j, axis=1)

    out = jnp.zeros((cont_BxT.shape[0], cont_BxT.shape[1], model.config.vocab_size), jnp.float32)
    return jax.lax.fori_loop(0, cont_BxT.shape[1], body, (cache, out))

  cache, out = jax.jit(decode, donate_argnums=1)(params, cache, jnp.asarray(cont), jnp.asarray(lens, jnp.int32))
  out = np.asarray(out)
  for r in range(out.shape[0]):
    i = r // group
    _assert_close(out[r], refs[i][len(prompts[i]):], atol,
                  f"{'left' if left else 'right'}-padded decode row {r} (prompt {i}) vs full forward")


def check_validate_inputs(model, seed: int = 0) -> None:
  """The host-side check (base.PolicyModel.validate_inputs) accepts a valid text-only batch, returns None and
  leaves the batch unchanged."""
  check = model.validate_inputs
  rng = np.random.RandomState(seed)
  toks, pos, mask = _pad([_text_tokens(model, rng, (n,)) for n in (4, 2)], 4, left=True)
  inp = base.ModelInputs(tokens=toks, positions=np.asarray(_positions(model, pos)), mask=mask)
  before = [np.array(a) for a in jax.tree.leaves(inp)]
  assert check(inp) is None, "validate_inputs must return None"
  assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves(inp))), "validate_inputs changed inputs"


def check_grad_finite(model, params, seed: int = 0) -> None:
  rng = np.random.RandomState(seed)
  toks, pos, mask = _pad([_text_tokens(model, rng, (n,)) for n in (4, 2)], 4, left=True)
  inp = _inputs(model, toks, pos, mask)

  def loss(p):
    logits, _ = model.forward(p, model.embed(p, inp), None)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.where(inp.mask, jnp.take_along_axis(logp, inp.tokens[..., None], -1)[..., 0], 0.0))

  grads = jax.jit(jax.grad(loss))(params)
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves), "non-finite gradients"
  assert any(float(jnp.abs(g).max()) > 0 for g in leaves), "all gradients are zero"


def check_policy_contract(model: Any, *, seed: int = 0, atol: float = 1e-5) -> None:
  """Runs every check on a float32 adapter (use looser atol for bf16 compute)."""
  assert isinstance(model, base.PolicyModel), f"{type(model).__name__} lacks PolicyModel methods"
  params = jax.jit(model.init_params)(jax.random.key(seed))
  check_params_and_rules(model, params)
  check_validate_inputs(model, seed)
  check_forward_is_hidden_times_unembed(model, params, seed, atol)
  check_padding_invariance(model, params, seed, atol)
  check_causality(model, params, seed)
  check_cached_decode(model, params, seed=seed, atol=atol, left=True)
  check_cached_decode(model, params, seed=seed, atol=atol, left=False)
  check_grad_finite(model, params, seed)
