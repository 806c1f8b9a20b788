"""The multimodal policy: feature projectors, the placeholder merge, and the `PolicyModel` adapter.

Frame features [Tv, Dv] and audio features [Ta, Da] (preprocessed once, outside the train step) go through
a per-modality projector into the decoder's embedding space: 'mlp' (Linear-GELU-Linear) or 'identity'
(features that already are tower outputs in the LM's space, as with Qwen2.5-Omni). The projected rows
replace the placeholder tokens (`video_token_id`, `audio_token_id`) in order with one vectorised gather:
in row b the k-th placeholder takes the k-th valid feature row.

`validate_placeholders` is the host-side check of that convention (numpy, before jit); `embed` runs it
automatically when its inputs are concrete arrays, and cannot inside jit, where a mismatch would silently
reuse rows, so callers that jit `embed` should call it on the host batch first (`MultimodalPolicy.validate_inputs`,
the base.PolicyModel member that the rollout sampler calls).

Shape legend: B batch, L tokens, T feature rows, F feature width, D d_model, V vocab.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from merr1_jax.models import base, layers, lora, qwen2
from merr1_jax.models.config import ModelConfig
from merr1_jax.models.layers import make_param


class Projector(nnx.Module):
  """Linear(F->D) - GELU - Linear(D->D), the Qwen2-VL merger shape, with biases."""

  def __init__(self, cfg: ModelConfig, in_dim: int, *, rngs: nnx.Rngs):
    pdt, d = cfg.jnp_param_dtype, cfg.d_model
    self.in_kernel = make_param(rngs, (in_dim, d), ("feature", "embed"), pdt, std=cfg.init_std)
    self.in_bias = make_param(rngs, (d,), ("embed",), pdt, init="zeros")
    self.out_kernel = make_param(rngs, (d, d), ("embed_in", "embed"), pdt, std=cfg.init_std)
    self.out_bias = make_param(rngs, (d,), ("embed",), pdt, init="zeros")
    self.cdt = cfg.jnp_compute_dtype

  def __call__(self, f_BxTxF: jax.Array) -> jax.Array:
    w = lambda p: p[...].astype(self.cdt)
    h = jax.nn.gelu(f_BxTxF.astype(self.cdt) @ w(self.in_kernel) + layers.lead(w(self.in_bias), 3))
    return h @ w(self.out_kernel) + layers.lead(w(self.out_bias), 3)


class MultimodalLM(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = qwen2.Decoder(cfg, rngs=rngs)
    if cfg.projector == "mlp":
      if cfg.video_dim:
        self.video_proj = Projector(cfg, cfg.video_dim, rngs=rngs)
      if cfg.audio_dim:
        self.audio_proj = Projector(cfg, cfg.audio_dim, rngs=rngs)

  def project(self, modality: str, f_BxTxF: jax.Array) -> jax.Array:
    if self.cfg.projector == "identity":
      return f_BxTxF.astype(self.cfg.jnp_compute_dtype)
    return getattr(self, f"{modality}_proj")(f_BxTxF)


def merge_placeholders(x_BxLxD: jax.Array, tokens_BxL: jax.Array, token_id: int,
                       feats_BxTxD: jax.Array, feat_mask_BxT: jax.Array) -> jax.Array:
  """Replaces each `token_id` position with the next valid feature row of its batch row, in order."""
  t = feats_BxTxD.shape[1]
  is_ph_BxL = tokens_BxL == token_id
  rank_BxL = jnp.cumsum(is_ph_BxL, axis=1) - 1  # k for the k-th placeholder
  # Indices of the valid rows first, in their original order (a stable sort of "not valid").
  valid_first_BxT = jnp.argsort(~feat_mask_BxT.astype(bool), axis=1, stable=True)
  src_BxL = jnp.take_along_axis(valid_first_BxT, jnp.clip(rank_BxL, 0, t - 1), axis=1)
  rows_BxLxD = jnp.take_along_axis(feats_BxTxD, src_BxL[..., None], axis=1)
  return jnp.where(is_ph_BxL[..., None], rows_BxLxD.astype(x_BxLxD.dtype), x_BxLxD)


def validate_placeholders(cfg: ModelConfig, inputs: base.ModelInputs) -> None:
  """Host-side check: per row, placeholder count == valid feature count, for each modality.

  Raises ValueError naming the modality, the rows and both counts.
  """
  tokens = np.asarray(inputs.tokens)
  for name, tok_id, feats, mask, dim in (
      ("video", cfg.video_token_id, inputs.video, inputs.video_mask, cfg.video_dim),
      ("audio", cfg.audio_token_id, inputs.audio, inputs.audio_mask, cfg.audio_dim)):
    n_ph = (tokens == tok_id).sum(axis=1) if dim else np.zeros(tokens.shape[0], int)
    if feats is None:
      if dim and n_ph.any():
        raise ValueError(f"{name}: rows {np.nonzero(n_ph)[0].tolist()} hold {name} placeholders "
                         f"(id {tok_id}) but inputs.{name} is None")
      continue
    if not dim:
      raise ValueError(f"{name}: features given but the model has no {name} projector ({name}_dim=0)")
    if feats.ndim != 3 or feats.shape[-1] != dim:
      raise ValueError(f"{name}: features must be [B, T, {dim}], got {tuple(feats.shape)}")
    if mask is None:
      raise ValueError(f"{name}: inputs.{name}_mask is required with inputs.{name}")
    n_feat = np.asarray(mask).astype(bool).sum(axis=1)
    bad = np.nonzero(n_ph != n_feat)[0]
    if bad.size:
      detail = ", ".join(f"row {b}: {n_ph[b]} placeholders vs {n_feat[b]} valid rows" for b in bad[:8])
      raise ValueError(f"{name} placeholder/feature count mismatch (token id {tok_id}): {detail}")


def _concrete(tree: Any) -> bool:
  return not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))


class MultimodalPolicy:
  """`PolicyModel` for the Qwen2-family decoder with video/audio projectors. Params are an nnx.State."""

  shared_prefix_decode = True  # `hidden` accepts a base.SharedPrefixCache (the sampler's default decode cache)

  def __init__(self, config: ModelConfig):
    self.config = config
    abstract = nnx.eval_shape(lambda: MultimodalLM(config, rngs=nnx.Rngs(0)))
    self.graphdef, _ = nnx.split(abstract)

  def _module(self, params) -> MultimodalLM:
    return nnx.merge(self.graphdef, params)

  def init_params(self, rng: jax.Array) -> nnx.State:
    _, params = nnx.split(MultimodalLM(self.config, rngs=nnx.Rngs(params=rng)))
    if self.config.lora_rank:  # A from its own key: the base's values do not depend on LoRA (models/lora.py)
      params = lora.init_adapters(params, self.config, rng)
    return params

  def abstract_params(self) -> nnx.State:
    """ShapeDtypeStruct leaves, with no allocation (for eval_shape-style planning and HF import)."""
    return jax.eval_shape(self.init_params, jax.random.key(0))

  def validate_inputs(self, inputs: base.ModelInputs) -> None:
    """base.PolicyModel.validate_inputs: `validate_placeholders` on a concrete batch."""
    validate_placeholders(self.config, inputs)

  def embed(self, params, inputs: base.ModelInputs) -> base.Embedded:
    if _concrete(inputs):
      validate_placeholders(self.config, inputs)
    m = self._module(params)
    x = m.decoder.embed_tokens(inputs.tokens)
    for name, tok_id in (("video", self.config.video_token_id), ("audio", self.config.audio_token_id)):
      feats = getattr(inputs, name)
      if feats is None:
        continue
      x = merge_placeholders(x, inputs.tokens, tok_id, m.project(name, feats), getattr(inputs, f"{name}_mask"))
    return base.Embedded(x=x, positions=inputs.positions, mask=inputs.mask.astype(bool))

  def hidden(self, params, x: base.Embedded, cache: base.KVCache | None = None,
             dropout_key: jax.Array | None = None):
    return self._module(params).decoder.hidden(x.x, x.positions, x.mask, cache, dropout_key)

  def hidden_grouped(self, params, prefix: base.Embedded, suffixes, dropout_key: jax.Array | None = None):
    """Prefix grouping (base.PolicyModel, optional): qwen2.Decoder.hidden_grouped on embedded inputs; each suffix
    is an Embedded of [P, G, T, D] (text: its tokens embedded, no features)."""
    return self._module(params).decoder.hidden_grouped(prefix.x, prefix.positions, prefix.mask,
                                                       [(s.x, s.positions, s.mask) for s in suffixes], dropout_key)

  def unembed_weight(self, params) -> jax.Array:
    return self._module(params).decoder.unembed_weight()

  def forward(self, params, x: base.Embedded, cache: base.KVCache | None = None):
    h, cache = self.hidden(params, x, cache)
    return base.logits_from_hidden(h, self.unembed_weight(params)), cache

  def init_cache(self, batch: int, max_len: int, dtype: Any | None = None) -> base.KVCache:
    return qwen2.init_cache(self.config, batch, max_len, dtype)

  def partition_rules(self) -> list[tuple[str, tuple[str | None, ...]]]:
    return qwen2.partition_rules("decoder/") + [
        (r"(video|audio)_proj/in_kernel$", ("feature", "embed")),
        (r"(video|audio)_proj/out_kernel$", ("embed_in", "embed")),
        (r"(video|audio)_proj/(in|out)_bias$", ("embed",)),
    ]


def build(config_or_name: ModelConfig | str, **overrides: Any) -> MultimodalPolicy:
  """A policy from a ModelConfig or a preset name (models.presets.get(name, **overrides))."""
  if isinstance(config_or_name, str):
    from merr1_jax.models import presets
    config_or_name = presets.get(config_or_name, **overrides)
  elif overrides:
    config_or_name = config_or_name.replace(**overrides)
  return MultimodalPolicy(config_or_name)
