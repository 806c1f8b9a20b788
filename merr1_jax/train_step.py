"""The train state and the jitted RL and SFT steps: the only place where gradients meet optax.

``make_rl_step`` and ``make_sft_step`` return ``step(state, batch) -> (state, metrics)``, jit-compiled with the
state donated and, when shardings are given, explicit in/out shardings. Both share one machinery:
  * the batch is split into ``micro_batches`` inside the step (a lax.scan accumulating float32 gradients);
  * the loss is normalised by the whole step's token / sequence counts, so the update does not depend on the
    micro-batch split (docs/method.md, E4 aggregation);
  * a non-finite loss or gradient skips the update and is counted in ``state.nonfinite``; the trainer stops
    after a configurable number of such steps.

Shape legend: B rows in the step, M micro-batches, L sequence positions (prompt + completion), D width.

Sequence convention: ``inputs.tokens`` is the whole sequence, prompt left-padded and completion right-padded.
Position t's hidden state predicts token t + 1, so per-token arrays aligned with ``tokens`` (masks, old and
reference log-probs) are shifted by one inside the loss.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from merr1_jax import rl
from merr1_jax.models import base

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. ``ref`` holds the frozen reference copy of the *trainable* leaves only
  (keyed by parameter path, in the compute dtype); frozen subtrees are shared with ``params`` instead of copied
  (``reference_params``)."""

  step: Array  # int32 scalar
  params: Any
  opt_state: Any
  ref: dict[str, Array] | None
  nonfinite: Array  # int32 scalar: steps skipped for a non-finite loss or gradient


def init_state(params: Any, optimizer: optax.GradientTransformation, *, with_reference: bool,
               freeze: Sequence[str] = (), ref_dtype: Any = None) -> TrainState:
  """A fresh state. The reference copies only trainable leaves, cast to ``ref_dtype`` (the compute dtype)."""
  ref = None
  if with_reference:
    pats = [re.compile(p) for p in freeze]
    ref = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      name = base.path_str(path)
      if not any(p.search(name) for p in pats):
        ref[name] = jnp.array(leaf, dtype=ref_dtype or leaf.dtype, copy=True)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), ref=ref,
                    nonfinite=jnp.zeros((), jnp.int32))


def reference_params(state: TrainState) -> Any:
  """The reference policy: ``state.ref`` for trainable leaves, the policy's own (frozen) arrays elsewhere."""
  if state.ref is None:
    raise ValueError("this state has no reference policy (beta = 0 when it was built)")
  return jax.tree_util.tree_map_with_path(
      lambda path, x: state.ref.get(base.path_str(path), x).astype(x.dtype), state.params)


@flax.struct.dataclass
class RLBatch:
  """One RL step's rollouts. Arrays aligned with ``inputs.tokens`` are [B, L]."""

  inputs: base.ModelInputs
  completion_mask: Array  # bool: generated tokens, which carry loss (the fast prefix is prompt: no loss)
  advantages: Array  # [B] float32
  old_logp: Array | None = None  # behaviour log-probs; None means mu = 1: stop_gradient(current log-probs)
  ref_logp: Array | None = None  # reference log-probs; None when beta = 0
  # Static: the first column whose next token can carry loss (the shortest prompt bucket - 1). Positions before
  # it are never unembedded: with long multimodal prompts most of the sequence is prompt.
  loss_start: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class SFTBatch:
  inputs: base.ModelInputs
  loss_mask: Array  # bool [B, L]: assistant tokens (the targets), aligned with tokens


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a step (the trainer builds it from the ml_collections config)."""

  loss: rl.LossConfig = rl.LossConfig()
  beta: float = 0.04  # KL coefficient; 0 skips the reference entirely
  beta_decay_steps: int = 0
  beta_final: float = 0.0
  micro_batches: int = 1
  vocab_chunk: int = 8192  # vocabulary chunk of the streaming log-softmax


def _micro_split(tree: Any, m: int) -> Any:
  """[B, ...] -> [M, B/M, ...] with micro-batch i holding rows i, i + M, ... (each device's contiguous rows
  then feed every micro-batch, so no micro-batch sits on a subset of the devices). Positions [3, B, L] split
  on axis 1."""

  def split(path, x):
    if x is None:
      return None
    axis = 1 if base.path_str(path).endswith("positions") and x.ndim == 3 else 0
    b = x.shape[axis]
    if b % m:
      raise ValueError(f"batch of {b} rows is not divisible into {m} micro-batches")
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(b // m, m, *x.shape[1:]).swapaxes(0, 1)
    return jnp.moveaxis(x, 1, axis + 1)

  return jax.tree_util.tree_map_with_path(split, tree)


def _shifted_logp(model, params, inputs: base.ModelInputs, chunk: int, with_entropy: bool, start: int = 0):
  """log p(token_{t+1} | tokens_<=t) for t = start .. L-2 (and the entropy), float32 [B, L-1-start]."""
  h, _ = model.hidden(params, model.embed(params, inputs))
  return rl.token_logprobs(h[:, start:-1], model.unembed_weight(params), inputs.tokens[:, start + 1:],
                           chunk_size=chunk, with_entropy=with_entropy)


def _apply(optimizer, state: TrainState, loss: Array, grads: Any, stats: dict[str, Array]):
  """Optimizer update, skipped (and counted) when the loss or the gradient is not finite."""
  gnorm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
      nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
  metrics = {**stats, "loss": loss, "grad_norm": gnorm, "skipped": (~ok).astype(jnp.int32),
             "nonfinite_total": new_state.nonfinite}
  return new_state, metrics


def _accumulate(loss_fn: Callable, params: Any, batch: Any, m: int):
  """Sums loss, gradients and statistics over M micro-batches (one lax.scan, float32 accumulators)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if m == 1:
    (loss, stats), grads = grad_fn(params, batch)
    return loss, grads, stats
  micro = _micro_split(batch, m)
  first = jax.tree.map(lambda x: x[0], micro)
  (_, stats0), _ = jax.eval_shape(grad_fn, params, first)
  zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)
  init = (jnp.zeros((), jnp.float32), zeros(jax.eval_shape(lambda p: p, params)), zeros(stats0))

  def body(carry, mb):
    loss_acc, g_acc, s_acc = carry
    (loss, stats), grads = grad_fn(params, mb)
    g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
    s_acc = {k: (jnp.maximum(s_acc[k], v) if k.endswith("_max") else jnp.minimum(s_acc[k], v)
                 if k.endswith("_min") else s_acc[k] + v) for k, v in stats.items()}
    return (loss_acc + loss, g_acc, s_acc), None

  init_s = {k: (jnp.full((), -jnp.inf) if k.endswith("_max") else jnp.full((), jnp.inf) if k.endswith("_min")
                else v) for k, v in init[2].items()}
  (loss, grads, stats), _ = jax.lax.scan(body, (init[0], init[1], init_s), micro)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, grads, stats


def _jit(step_fn, state_shardings, batch_shardings):
  if state_shardings is None:
    return jax.jit(step_fn, donate_argnums=0)
  rep = jax.tree.map(lambda s: s, state_shardings.step)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, rep), donate_argnums=0)


def make_rl_loss(model: base.PolicyModel, cfg: StepConfig) -> Callable:
  """``loss(params, batch, beta, num_tokens=None, num_seqs=None) -> (loss, summed stats)``.

  Normalisers default to the batch's own counts; the step passes the whole step's counts to each micro-batch.
  """
  lc = cfg.loss

  def loss_fn(params, batch: RLBatch, beta, num_tokens=None, num_seqs=None):
    k = batch.loss_start
    logp, ent = _shifted_logp(model, params, batch.inputs, cfg.vocab_chunk, with_entropy=True, start=k)
    if not lc.entropy_coef:
      ent = jax.lax.stop_gradient(ent)  # logged only: build no gradient for it
    mask = batch.completion_mask[:, k + 1:]
    old = jax.lax.stop_gradient(logp) if batch.old_logp is None else batch.old_logp[:, k + 1:]
    ref = None if batch.ref_logp is None or cfg.beta == 0 else batch.ref_logp[:, k + 1:]
    lcfg = lc if lc.max_len is not None else dataclasses.replace(lc, max_len=mask.shape[1])
    return rl.policy_loss(logp, old, ref, batch.advantages, mask, lcfg, beta=beta, entropy_BxT=ent,
                          num_tokens=num_tokens, num_seqs=num_seqs)

  return loss_fn


def make_rl_step(model: base.PolicyModel, optimizer: optax.GradientTransformation, cfg: StepConfig, *,
                 state_shardings: Any = None, batch_shardings: Any = None) -> Callable:
  """The MER-R1 policy-gradient step (docs/method.md E4): PPO-clip + beta * KL - entropy bonus."""
  loss_fn = make_rl_loss(model, cfg)

  def step(state: TrainState, batch: RLBatch):
    mask = batch.completion_mask[:, 1:].astype(jnp.float32)
    num_tokens, num_seqs = mask.sum(), (mask.sum(-1) > 0).sum()
    beta = rl.beta_at(state.step, cfg.beta, decay_steps=cfg.beta_decay_steps, final_beta=cfg.beta_final)
    fn = lambda p, mb: loss_fn(p, mb, beta, num_tokens, num_seqs)
    loss, grads, stats = _accumulate(fn, state.params, batch, cfg.micro_batches)
    stats = {**rl.finalize_stats(stats), **rl.advantage_stats(batch.advantages), "beta": beta}
    return _apply(optimizer, state, loss, grads, stats)

  return _jit(step, state_shardings, batch_shardings)


def make_sft_step(model: base.PolicyModel, optimizer: optax.GradientTransformation, cfg: StepConfig, *,
                  state_shardings: Any = None, batch_shardings: Any = None) -> Callable:
  """Cold-start SFT: token-mean cross-entropy on the assistant tokens, same accumulation and skipping."""

  def loss_fn(params, mb: SFTBatch, num_tokens):
    logp = _shifted_logp(model, params, mb.inputs, cfg.vocab_chunk, with_entropy=False)
    mask = mb.loss_mask[:, 1:].astype(jnp.float32)
    nll = -(logp * mask).sum()
    return nll / jnp.maximum(num_tokens, 1.0), {"tokens": mask.sum(), "nll_sum": nll}

  def step(state: TrainState, batch: SFTBatch):
    num_tokens = batch.loss_mask[:, 1:].astype(jnp.float32).sum()
    loss, grads, stats = _accumulate(lambda p, mb: loss_fn(p, mb, num_tokens), state.params, batch,
                                     cfg.micro_batches)
    return _apply(optimizer, state, loss, grads, {"tokens": stats["tokens"]})

  return _jit(step, state_shardings, batch_shardings)


class NonFiniteError(RuntimeError):
  """Raised by ``check_nonfinite`` when too many steps had a non-finite loss or gradient."""


def check_nonfinite(metrics: dict[str, Any], limit: int, *, where: str = "") -> None:
  """Stops the run with a diagnostic once more than ``limit`` steps were skipped as non-finite."""
  total = int(metrics["nonfinite_total"])
  if total > limit:
    shown = {k: float(v) for k, v in metrics.items() if k in ("loss", "grad_norm", "kl", "ratio_max", "adv_max",
                                                               "adv_min", "entropy")}
    raise NonFiniteError(
        f"{total} steps had a non-finite loss or gradient (limit {limit}){where}. Last step: {shown}. Lower "
        "the learning rate, check the rewards/advantages for NaN, or raise train.max_nonfinite_steps.")
