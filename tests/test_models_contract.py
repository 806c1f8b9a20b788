"""Every PolicyModel adapter passes the same contract (merr1_jax.models.contract).

The second adapter here is deliberately different from the bundled NNX Qwen2 one (docs/porting.md's worked
example): a Linen model with LayerNorm, fused QKV, full multi-head attention, sinusoidal absolute position
embeddings added at the input, a separate unembedding matrix, params as a plain Linen variables dict and a
dict KV cache laid out [B, S, N, H, Dh]. It is text-only, so its `validate_inputs` (a PolicyModel member) only refuses
feature arrays (it has nowhere to put them) and out-of-vocabulary ids.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from merr1_jax.models import base, contract, mllm


class _LinenConfig:
  vocab_size, d_model, num_layers, num_heads = 96, 32, 2, 4
  mrope_section = None


def _sinusoid(pos_BxL, d):
  freq = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = pos_BxL.astype(jnp.float32)[..., None] * freq[None, None, :]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


class _LinenLM(nn.Module):
  cfg: type = _LinenConfig

  @nn.compact
  def __call__(self, x_BxLxD, pos_BxL, mask_BxL, cache):
    c = self.cfg
    dh = c.d_model // c.num_heads
    self.param("unembed", nn.initializers.normal(0.05), (c.d_model, c.vocab_size))
    x = x_BxLxD + _sinusoid(pos_BxL, c.d_model)
    b, l, _ = x.shape
    if cache is None:
      allowed_BxLxS = mask_BxL[:, None, :] & jnp.tril(jnp.ones((l, l), bool))[None]
      new_cache = None
    else:
      idx = cache["index"][0]
      valid = jax.lax.dynamic_update_slice(cache["valid"], mask_BxL, (0, idx))
      s = cache["k"].shape[1]
      allowed_BxLxS = valid[:, None, :] & (jnp.arange(s)[None, None, :] <= (idx + jnp.arange(l))[None, :, None])
      new_cache = dict(cache, valid=valid, index=cache["index"] + l)
    for i in range(c.num_layers):
      h = nn.LayerNorm(name=f"ln_attn_{i}")(x)
      q, k, v = jnp.moveaxis(nn.DenseGeneral((3, c.num_heads, dh), name=f"qkv_{i}")(h), 2, 0)
      if cache is not None:
        for name, new in (("k", k), ("v", v)):
          new_cache[name] = jax.lax.dynamic_update_slice(new_cache[name], new[:, :, None], (0, idx, i, 0, 0))
        k, v = new_cache["k"][:, :, i], new_cache["v"][:, :, i]
      scores = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(dh)
      probs = jax.nn.softmax(jnp.where(allowed_BxLxS[:, None], scores, -1e9), axis=-1)
      o = jnp.einsum("bhls,bshd->blhd", probs, v)
      x = x + nn.DenseGeneral(c.d_model, axis=(-2, -1), name=f"attn_out_{i}")(o)
      h = nn.LayerNorm(name=f"ln_mlp_{i}")(x)
      x = x + nn.Dense(c.d_model, name=f"mlp_out_{i}")(nn.gelu(nn.Dense(4 * c.d_model, name=f"mlp_in_{i}")(h)))
    return nn.LayerNorm(name="ln_final")(x), new_cache


class LinenPolicy:
  """A Linen model wrapped to the PolicyModel protocol (params: the Linen variables dict)."""

  def __init__(self):
    self.config = _LinenConfig()
    self.net = _LinenLM()

  def init_params(self, rng):
    k_emb, k_net = jax.random.split(rng)
    x = jnp.zeros((1, 1, self.config.d_model))
    variables = self.net.init(k_net, x, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool), None)
    emb = 0.05 * jax.random.normal(k_emb, (self.config.vocab_size, self.config.d_model))
    return {"embedding": emb, "net": variables["params"]}

  def validate_inputs(self, inputs):
    """Host-side check before jit (the optional base.PolicyModel hook): a text-only model takes no features,
    and under jit an out-of-range id would silently gather a clipped row."""
    for name in ("video", "audio"):
      if getattr(inputs, name) is not None:
        raise ValueError(f"{name}: features given, but this text-only model has no {name} projector")
    toks = np.asarray(inputs.tokens)
    bad = np.argwhere((toks < 0) | (toks >= self.config.vocab_size))
    if bad.size:
      raise ValueError(f"token ids outside [0, {self.config.vocab_size}) at (row, col) {bad[:4].tolist()}")

  def embed(self, params, inputs):
    return base.Embedded(x=params["embedding"][inputs.tokens], positions=inputs.positions, mask=inputs.mask)

  def hidden(self, params, x, cache=None):
    return self.net.apply({"params": params["net"]}, x.x, x.positions, x.mask, cache)

  def unembed_weight(self, params):
    return params["net"]["unembed"]

  def forward(self, params, x, cache=None):
    h, cache = self.hidden(params, x, cache)
    return base.logits_from_hidden(h, self.unembed_weight(params)), cache

  def init_cache(self, batch, max_len, dtype=jnp.float32):
    c = self.config
    shape = (batch, max_len, c.num_layers, c.num_heads, c.d_model // c.num_heads)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((batch,), jnp.int32)}

  def partition_rules(self):
    return [
        (r"^embedding$", ("vocab", "embed")),
        (r"unembed$", ("embed", "vocab")),
        (r"qkv_\d+/kernel$", ("embed", None, "heads", "head_dim")),
        (r"qkv_\d+/bias$", (None, "heads", "head_dim")),
        (r"attn_out_\d+/kernel$", ("heads", "head_dim", "embed")),
        (r"mlp_in_\d+/kernel$", ("embed", "mlp")),
        (r"mlp_out_\d+/kernel$", ("mlp", "embed")),
        (r"mlp_in_\d+/bias$", ("mlp",)),
        (r"(attn_out|mlp_out)_\d+/bias$", ("embed",)),
        (r"ln_\w+/(scale|bias)$", ("norm",)),
    ]


ADAPTERS = {
    "qwen2_tiny": lambda: mllm.build("tiny", vocab_size=160),
    "qwen2_tiny_mrope_scan_untied": lambda: mllm.build(
        "tiny", vocab_size=160, mrope_section=(4, 6, 6), scan_layers=True, remat="dots", tie_embeddings=False),
    "linen": LinenPolicy,
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_passes_contract(name):
  contract.check_policy_contract(ADAPTERS[name]())


def test_contract_catches_a_cache_that_ignores_validity():
  """The contract has teeth: an adapter whose cached path attends to padding slots fails it."""

  class Leaky(LinenPolicy):
    def hidden(self, params, x, cache=None):
      if cache is not None:
        cache = dict(cache, valid=jnp.ones_like(cache["valid"]))  # forgets which slots are padding
        x = base.Embedded(x=x.x, positions=x.positions, mask=jnp.ones_like(x.mask))
      return super().hidden(params, x, cache)

  model = Leaky()
  params = model.init_params(jax.random.key(0))
  with pytest.raises(AssertionError, match="prefill row|decode row"):
    contract.check_cached_decode(model, params, left=True)


def test_contract_catches_missing_partition_rule():
  model = LinenPolicy()
  model.partition_rules = lambda: LinenPolicy.partition_rules(model)[1:]  # drop the embedding rule
  with pytest.raises(ValueError, match="embedding: no partition rule matches"):
    contract.check_params_and_rules(model, model.init_params(jax.random.key(0)))


def test_validate_inputs_hook_refuses_what_embed_cannot_check_under_jit():
  toks = np.full((2, 3), 5, np.int32)
  pos, mask = np.tile(np.arange(3, dtype=np.int32), (2, 1)), np.ones((2, 3), bool)
  linen = LinenPolicy()
  with pytest.raises(ValueError, match="video: features given, but this text-only model"):
    linen.validate_inputs(base.ModelInputs(tokens=toks, positions=pos, mask=mask, video=np.zeros((2, 1, 4)),
                                           video_mask=np.ones((2, 1), bool)))
  with pytest.raises(ValueError, match=r"token ids outside \[0, 96\) at \(row, col\) \[\[1, 2\]\]"):
    linen.validate_inputs(base.ModelInputs(tokens=np.where(np.arange(6).reshape(2, 3) == 5, 96, toks),
                                           positions=pos, mask=mask))

  mm = mllm.build("tiny", vocab_size=160)  # video_dim 32; the video placeholder is id 158
  ph = toks.copy()
  ph[0, 1] = mm.config.video_token_id
  feats, fmask = np.zeros((2, 2, 32), np.float32), np.array([[True, True], [False, False]])
  with pytest.raises(ValueError, match="video placeholder/feature count mismatch .*row 0: 1 placeholders vs 2"):
    mm.validate_inputs(base.ModelInputs(tokens=ph, positions=pos, mask=mask, video=feats, video_mask=fmask))
  fmask[0, 1] = False
  assert mm.validate_inputs(base.ModelInputs(tokens=ph, positions=pos, mask=mask, video=feats,
                                             video_mask=fmask)) is None
