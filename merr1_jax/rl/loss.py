"""The clipped policy-gradient loss with a KL penalty: token log-probs, ratio/clip, KL estimators, aggregation.

docs/method.md, "Policy loss (E4)" (its bullets: token log-probs, ratio and clip, KL, aggregation, total). Every
function is pure and model-free and cites the bullet it implements; ``train_step`` wires them to a model.

Shape legend:
  B: completions (rows)     T: completion positions     D: model width     V: vocabulary     N: vocabulary chunk

Conventions:
  * Log-probs, ratios and the loss are float32 whatever the compute dtype: exp() of a bf16 log-ratio loses the
    precision the clip test needs.
  * ``mask_BxT`` marks generated tokens that carry loss (the fast-mode prefix and padding carry none).
  * Aggregation takes explicit global normalisers (token count, sequence count), so a step split into micro-batches
    gives the same loss and gradient as one big batch.
  * ``policy_loss`` returns *summed* statistics; ``combine_stats`` adds those of micro-batches (max / min for
    ``*_max`` / ``*_min``) and ``finalize_stats`` divides once. Keys ``name/group`` are the same statistic over
    the rows of one group (a thinking mode), e.g. ``kl_sum/slow`` -> ``kl/slow``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from merr1_jax.rl import vocab

Array = jax.Array
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")


def token_logprobs(
    h_BxTxD: Array,
    w_DxV: Array,
    tokens_BxT: Array,
    *,
    chunk_size: int = 8192,
    with_entropy: bool = False,
) -> Array | tuple[Array, Array]:
  """log softmax(h @ w)[token] (and optionally the entropy), streaming over vocabulary chunks (method.md E4,
  "Token log-probs"; the pass is ``rl.vocab.vocab_stream``).

  A vocabulary that fits one chunk takes the direct log-softmax path: the same math without the streaming
  bookkeeping, which XLA's CPU backend otherwise materialises at [B, T, V] in the backward pass
  (docs/benchmarks/rl_step.md, RL step).

  Returns:
    logp_BxT float32, and entropy_BxT float32 when ``with_entropy``.
  """
  if w_DxV.shape[-1] <= chunk_size:
    logits = h_BxTxD.astype(jnp.float32) @ w_DxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, tokens_BxT[..., None], axis=-1)[..., 0] - lse
    if not with_entropy:
      return logp
    return logp, lse - (jax.nn.softmax(logits, axis=-1) * logits).sum(-1)
  chunk_logits, n, chunk = vocab.hidden_chunks(h_BxTxD, w_DxV, chunk_size)
  st = vocab.vocab_stream(chunk_logits, n, chunk, tokens_BxT.shape, targets=tokens_BxT, with_entropy=with_entropy)
  logp = st.target - st.lse
  return (logp, st.entropy) if with_entropy else logp


def logprobs_from_logits(logits_BxTxV: Array, tokens_BxT: Array) -> Array:
  """Unchunked reference path: log softmax(logits)[token] in float32 (for small vocabularies and tests)."""
  logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens_BxT[..., None], axis=-1)[..., 0]


def kl_estimate(logp_BxT: Array, logp_ref_BxT: Array, kind: str = "k3") -> Array:
  """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3; method.md E4, "KL").

  k1 = log r', k2 = (log r')^2 / 2, k3 = exp(-log r') - 1 + log r', with log r' = logp - logp_ref.
  k3 is unbiased and non-negative, the GRPO default.
  """
  log_ratio = logp_BxT.astype(jnp.float32) - logp_ref_BxT.astype(jnp.float32)
  if kind == "k1":
    return log_ratio
  if kind == "k2":
    return 0.5 * log_ratio**2
  if kind == "k3":
    return jnp.exp(-log_ratio) - 1.0 + log_ratio
  raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def beta_at(step: Array | int, beta: float, *, decay_steps: int = 0, final_beta: float = 0.0) -> Array:
  """KL coefficient at ``step``: constant, or linear from ``beta`` to ``final_beta`` over ``decay_steps``
  (method.md E4, "KL")."""
  if decay_steps <= 0:
    return jnp.asarray(beta, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0.0, 1.0)
  return jnp.asarray(beta + (final_beta - beta) * frac, jnp.float32)


def clipped_objective(
    logp_BxT: Array,
    logp_old_BxT: Array,
    adv_B: Array,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Array, dict[str, Array]]:
  """Per-token PPO-clip loss  -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)  (method.md E4, "Ratio and
  clip").

  With ``dual_clip = c > 1``, the loss of a negative-advantage token is capped at  -c A  (dual-clip PPO), which
  bounds the update when rho is very large.

  Returns:
    loss_BxT and per-token indicators: ratio, clipped_low (the lower clip is active), clipped_high, dual.
  """
  if dual_clip is not None and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
  a = adv_B.astype(jnp.float32)[:, None]
  ratio = jnp.exp(logp_BxT.astype(jnp.float32) - logp_old_BxT.astype(jnp.float32))
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  obj = jnp.minimum(ratio * a, clipped * a)
  dual = jnp.zeros_like(obj, bool)
  if dual_clip is not None:
    dual = (a < 0) & (obj < dual_clip * a)
    obj = jnp.where(dual, dual_clip * a, obj)
  stats = {
      "ratio": ratio,
      "clipped_low": (ratio < 1.0 - eps_low) & (a < 0),
      "clipped_high": (ratio > 1.0 + eps_high) & (a > 0),
      "dual": dual,
  }
  return -obj, stats


def aggregate(
    x_BxT: Array,
    mask_BxT: Array,
    kind: str = "token_mean",
    *,
    num_tokens: Array | None = None,
    num_seqs: Array | None = None,
    max_len: int | None = None,
) -> Array:
  """Reduces a per-token quantity to a scalar (method.md E4, "Aggregation").

  * token_mean: sum over all tokens / num_tokens (the whole step's token count).
  * seq_mean_token_mean: sum over rows of (row token mean) / num_seqs.
  * seq_mean_token_sum_norm (Dr.GRPO): sum over all tokens / (max_len * num_seqs), a constant normaliser.

  ``num_tokens`` and ``num_seqs`` default to this batch's counts; pass the step's global counts when this batch
  is one micro-batch of a step, so that the micro-batch split does not change the result.
  """
  m = mask_BxT.astype(jnp.float32)
  x = x_BxT.astype(jnp.float32) * m
  if num_seqs is None:
    num_seqs = (m.sum(-1) > 0).sum()
  if kind == "token_mean":
    if num_tokens is None:
      num_tokens = m.sum()
    return x.sum() / jnp.maximum(num_tokens, 1.0)
  if kind == "seq_mean_token_mean":
    per_row = x.sum(-1) / jnp.maximum(m.sum(-1), 1.0)
    return per_row.sum() / jnp.maximum(num_seqs, 1.0)
  if kind == "seq_mean_token_sum_norm":
    norm = max_len if max_len is not None else x_BxT.shape[1]
    return x.sum() / (norm * jnp.maximum(num_seqs, 1.0))
  raise ValueError(f"unknown aggregation {kind!r}; expected one of {AGGREGATIONS}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Hyper-parameters of ``policy_loss`` (defaults: method.md E4)."""

  eps_low: float = 0.2
  eps_high: float = 0.2
  dual_clip: float | None = None
  kl_estimator: str = "k3"
  aggregation: str = "token_mean"
  entropy_coef: float = 0.0
  max_len: int | None = None  # Dr.GRPO normaliser; defaults to the padded completion length

  def __post_init__(self):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"unknown aggregation {self.aggregation!r}; expected one of {AGGREGATIONS}")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"unknown KL estimator {self.kl_estimator!r}; expected one of {KL_ESTIMATORS}")
    if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
      raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")


def policy_loss(
    logp_BxT: Array,
    logp_old_BxT: Array,
    logp_ref_BxT: Array | None,
    adv_B: Array,
    mask_BxT: Array,
    cfg: LossConfig,
    *,
    beta: Array | float = 0.0,
    entropy_BxT: Array | None = None,
    num_tokens: Array | None = None,
    num_seqs: Array | None = None,
    group_B: Array | None = None,
    group_names: Sequence[str] = (),
    behaviour_BxT: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """loss = agg(PPO-clip) + beta * agg(KL) - entropy_coef * agg(entropy)   (method.md E4, "Total").

  Returns the scalar loss and *sums* of per-token statistics (plus their token count), so that statistics of
  micro-batches can be combined (``combine_stats``) before ``finalize_stats`` divides once. With ``group_B``
  (int [B], an index into ``group_names``: the thinking mode of each row), the same sums are also returned per
  group under ``<stat>/<name>`` keys; rows whose id is outside the names count only in the totals. With
  ``behaviour_BxT`` (the sampler's log-probs of the same tokens), also the summed gap |logp - behaviour|: a check
  that the rollouts came from the weights being trained (logged only; it does not enter the loss).
  """
  pg_BxT, st = clipped_objective(
      logp_BxT, logp_old_BxT, adv_B, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip
  )
  agg = lambda x: aggregate(
      x, mask_BxT, cfg.aggregation, num_tokens=num_tokens, num_seqs=num_seqs, max_len=cfg.max_len
  )
  pg = agg(pg_BxT)
  loss = pg
  kl_BxT = None
  if logp_ref_BxT is not None:
    kl_BxT = kl_estimate(logp_BxT, logp_ref_BxT, cfg.kl_estimator)
    loss = loss + beta * agg(kl_BxT)
  if entropy_BxT is not None and cfg.entropy_coef:
    loss = loss - cfg.entropy_coef * agg(entropy_BxT)

  def sums(m):  # m: float32 [B, T] token weights (the mask, or the mask of one group)
    out = {
        "tokens": m.sum(),
        "ratio_sum": (st["ratio"] * m).sum(),
        "ratio_max": jnp.where(m > 0, st["ratio"], -jnp.inf).max(),
        "ratio_min": jnp.where(m > 0, st["ratio"], jnp.inf).min(),
        "clip_low_sum": (st["clipped_low"] * m).sum(),
        "clip_high_sum": (st["clipped_high"] * m).sum(),
        "dual_clip_sum": (st["dual"] * m).sum(),
    }
    if kl_BxT is not None:
      out["kl_sum"] = (kl_BxT * m).sum()
    if entropy_BxT is not None:
      out["entropy_sum"] = (entropy_BxT.astype(jnp.float32) * m).sum()
    if behaviour_BxT is not None:
      gap = jnp.abs(jax.lax.stop_gradient(logp_BxT).astype(jnp.float32) - behaviour_BxT.astype(jnp.float32))
      out["behaviour_gap_sum"] = (gap * m).sum()
    return out

  m = mask_BxT.astype(jnp.float32)
  stats = {"pg_loss": pg, **sums(m)}
  if group_B is not None:
    for gi, name in enumerate(group_names):
      in_group = (group_B == gi).astype(jnp.float32)[:, None]
      stats.update({f"{k}/{name}": v for k, v in sums(m * in_group).items()})
  return loss, stats


def _reduction(key: str) -> str:
  base = key.split("/", 1)[0]
  return "max" if base.endswith("_max") else "min" if base.endswith("_min") else "sum"


def stats_identity(stats: dict[str, Array]) -> dict[str, Array]:
  """The neutral element of ``combine_stats`` for statistics shaped like ``stats`` (-inf / +inf / 0)."""
  fill = {"max": -jnp.inf, "min": jnp.inf, "sum": 0.0}
  return {k: jnp.full(jnp.shape(v), fill[_reduction(k)], jnp.float32) for k, v in stats.items()}


def combine_stats(a: dict[str, Array], b: dict[str, Array]) -> dict[str, Array]:
  """Statistics of two disjoint sets of rows (micro-batches): ``*_max`` keys take the max, ``*_min`` the min,
  everything else (sums, counts, globally normalised losses) adds up."""
  op = {"max": jnp.maximum, "min": jnp.minimum, "sum": jnp.add}
  return {k: op[_reduction(k)](a[k], b[k]) for k in a}


def finalize_stats(stats: dict[str, Array]) -> dict[str, Array]:
  """Turns summed statistics (possibly combined over micro-batches) into means and fractions.

  Totals: tokens, ratio_mean / ratio_max / ratio_min, clip_frac_low / clip_frac_high, dual_clip_frac, and
  kl, entropy and behaviour_logp_gap when present. Per group (``tokens/<name>`` present): the same names with
  ``/<name>``.
  A group without tokens reports 0 for the means and the +-inf identities for ratio_max / ratio_min.
  """
  names = {"ratio": "ratio_mean", "clip_low": "clip_frac_low", "clip_high": "clip_frac_high",
           "dual_clip": "dual_clip_frac", "kl": "kl", "entropy": "entropy", "behaviour_gap": "behaviour_logp_gap"}
  groups = [""] + ["/" + k.split("/", 1)[1] for k in stats if k.startswith("tokens/")]
  out = {}
  for g in groups:
    n = jnp.maximum(stats["tokens" + g], 1.0)
    out.update({"tokens" + g: stats["tokens" + g], "ratio_max" + g: stats["ratio_max" + g],
                "ratio_min" + g: stats["ratio_min" + g]})
    for key, name in names.items():
      if f"{key}_sum{g}" in stats:
        out[name + g] = stats[f"{key}_sum{g}"] / n
  return out


def advantage_stats(adv_B: Array, valid_B: Array | None = None) -> dict[str, Array]:
  """Mean, std, min, max of the advantages and the fraction that are exactly 0 (zero-std groups)."""
  valid = jnp.ones_like(adv_B, bool) if valid_B is None else valid_B.astype(bool)
  n = jnp.maximum(valid.sum(), 1)
  mean = jnp.where(valid, adv_B, 0.0).sum() / n
  var = jnp.where(valid, (adv_B - mean) ** 2, 0.0).sum() / n
  return {
      "adv_mean": mean,
      "adv_std": jnp.sqrt(var),
      "adv_min": jnp.where(valid, adv_B, jnp.inf).min(),
      "adv_max": jnp.where(valid, adv_B, -jnp.inf).max(),
      "adv_zero_frac": jnp.where(valid, adv_B == 0, False).sum() / n,
  }
