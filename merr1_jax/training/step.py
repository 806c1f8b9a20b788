"""The train state and the jitted RL and SFT steps: the only place where gradients meet optax.

``make_rl_step`` and ``make_sft_step`` return ``step(state, batch) -> (state, metrics)``, jit-compiled with the
state donated and, when shardings are given, explicit in/out shardings. Only the trainable leaves are
differentiated; each update's batch is split into ``micro_batches`` inside the step, and the loss is normalised so
that the update does not depend on that split; a non-finite loss or gradient skips the update. The RL step runs
``ppo_epochs x mini_batches`` updates over its batch. Details: docs/method.md, "The train step".

Shape legend: P prompts (groups) in the step, M micro-batches, K mini-batches, L positions, D width. The RL batch
is a ``grouped.GroupedRLBatch``; the SFT batch's per-token arrays are aligned with ``tokens`` and shifted by one
inside the loss (position t predicts token t + 1).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from merr1_jax import rl
from merr1_jax.models import base, lora
from merr1_jax.rl import loss as rl_loss
from merr1_jax.rollout import passes as grouped
from merr1_jax.training import batch_loss
from merr1_jax.training import optimizer as optim

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  ``opt_state`` covers the trainable leaves only (``optim.split_trainable(params, freeze)[0]``; MaskedNode, no
  arrays, where a leaf is frozen). ``ref`` holds the frozen reference copy of the *trainable* leaves only (keyed
  by parameter path, in the compute dtype); frozen subtrees are shared with ``params`` instead of copied
  (``reference_params``). ``freeze`` (static) is the tuple of regexes the step splits the parameters by.
  """

  step: Array  # int32 scalar
  params: Any
  opt_state: Any
  ref: dict[str, Array] | None
  nonfinite: Array  # int32 scalar: steps skipped for a non-finite loss or gradient
  freeze: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


def init_state(params: Any, optimizer: optax.GradientTransformation, *, with_reference: bool,
               freeze: Sequence[str] = (), ref_dtype: Any = None) -> TrainState:
  """A fresh state. The optimizer is initialised on the trainable leaves; the reference copies only trainable
  leaves, cast to ``ref_dtype`` (the compute dtype), keeping each leaf's sharding."""
  freeze = tuple(freeze)
  optim.check_freeze_patterns(params, freeze)
  trainable, _ = optim.split_trainable(params, freeze)
  ref = None
  if with_reference:  # LoRA adapters are not copied: the reference has them off (reference_params)
    ref = {base.path_str(path): jnp.array(leaf, dtype=ref_dtype or leaf.dtype, copy=True)
           for path, leaf in jax.tree_util.tree_flatten_with_path(trainable)[0]
           if not lora.is_adapter(base.path_str(path))}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable), ref=ref,
                     nonfinite=jnp.zeros((), jnp.int32), freeze=freeze)
  return _commit_like_params(state, params)


def _commit_like_params(state: TrainState, params: Any) -> TrainState:
  """The state's uncommitted leaves (the step counters, optax's `count`s) committed, replicated, to the devices
  of committed parameters (hf_io.load_hf's, or any placed ones).

  A jitted step's cache key includes whether each argument is committed. A state mixing committed parameters
  with uncommitted counters is one signature; the step's outputs are all committed, another; so the second step
  compiled the whole update again (about 1.9x the time of later steps, in benchmarks/peers/ours_grpo.py). The
  trainer places the whole state (run_setup.Run.place) and never saw it; this makes a state built straight
  from loaded parameters as stable. Parameters that are all uncommitted (a fresh init) or abstract (eval_shape)
  leave the state as it is."""
  committed = [a.sharding for a in jax.tree.leaves(params) if _committed(a)]
  if not committed:
    return state
  s = committed[0]
  if not s.is_fully_addressable:
    return state  # a mesh over several processes: the caller places the state (run_setup.Run.place)
  if isinstance(s, jax.sharding.NamedSharding):
    rep = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  elif len(s.device_set) == 1:
    rep = jax.sharding.SingleDeviceSharding(next(iter(s.device_set)))
  else:
    return state  # another multi-device sharding: the caller places the state (run_setup.Run.place)
  return jax.tree.map(lambda a: jax.device_put(a, rep) if _committed(a) is False else a, state)


def _committed(a) -> bool | None:
  """Whether a concrete jax array is committed; None for tracers (inside jit / eval_shape) and non-arrays."""
  if not isinstance(a, jax.Array) or isinstance(a, jax.core.Tracer):
    return None
  return a.committed


def reference_params(state: TrainState) -> Any:
  """The reference policy: ``state.ref`` for trainable leaves, the policy's own (frozen) arrays elsewhere, and
  LoRA adapters off (B = 0, ``lora.disabled``): with LoRA the reference is the frozen base itself, no copy."""
  if state.ref is None:
    raise ValueError("this state has no reference policy (beta = 0 when it was built)")
  return lora.disabled(jax.tree_util.tree_map_with_path(
      lambda path, x: state.ref.get(base.path_str(path), x).astype(x.dtype), state.params))


def trainable_view(state: TrainState) -> TrainState:
  """The state with only its trainable parameter leaves (frozen ones are MaskedNodes: no arrays), what a LoRA
  stage's checkpoint holds; ``with_frozen`` puts the frozen base back."""
  return state.replace(params=optim.split_trainable(state.params, state.freeze)[0])


def with_frozen(view: TrainState, params: Any) -> TrainState:
  """Inverse of ``trainable_view``: the view's trainable leaves merged with the frozen leaves of ``params``."""
  return view.replace(params=optim.merge(view.params, optim.split_trainable(params, view.freeze)[1]))


@flax.struct.dataclass
class SFTBatch:
  inputs: base.ModelInputs
  loss_mask: Array  # bool [B, L]: assistant tokens (the targets), aligned with tokens


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a step (the trainer builds it from the ml_collections config)."""

  loss: rl.LossConfig
  beta: float  # KL coefficient; 0 skips the reference entirely
  beta_decay_steps: int = 0
  beta_final: float = 0.0
  micro_batches: int = 1  # gradient accumulation splits of each update
  ppo_epochs: int = 1  # mu: passes over the step's rollouts
  mini_batches: int = 1  # optimizer updates per pass (each on 1/mini_batches of the rows)
  vocab_chunk: int = 8192  # vocabulary chunk of the streaming log-softmax
  mode_names: tuple[str, ...] = ("slow", "fast")  # Segment.mode_id -> metric suffix (prompts.MODES order)
  # LoRA input dropout (ModelConfig.lora_dropout) in the loss passes: None = off. The key of update u of step s,
  # micro-batch m is fold_in(fold_in(fold_in(key(dropout_seed), s), u), m), so a resumed run draws the same masks.
  dropout_seed: int | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage ('sft' or 'rl'), resolved once from the config (settings.stage) and passed to state
  creation, restore, the step, export and evaluation's policy loading: nothing re-reads the stage's name."""

  name: str
  steps: int
  lora: bool  # trains LoRA adapters only, the base frozen (its checkpoints hold the trainable leaves)
  freeze: tuple[str, ...]  # regexes of the frozen parameter leaves
  with_reference: bool  # holds a frozen reference copy (RL with beta > 0)
  step: StepConfig  # the jitted step's settings, the dropout seed among them
  optim: optim.OptimConfig
  seed: int  # the run's seed: the stage's LoRA key derives from it and the stage's index

  @property
  def index(self) -> int:
    return ("sft", "rl").index(self.name)

  def optimizer(self, params: Any) -> optax.GradientTransformation:
    """AdamW (OptimConfig) on the trainable leaves of `params` (arrays or ShapeDtypeStructs)."""
    return optim.make_optimizer(self.optim, params, freeze=self.freeze)

  def init_state(self, params: Any, ref_dtype: Any = None) -> tuple[TrainState, optax.GradientTransformation]:
    """(state, optimizer): the optimizer on the trainable leaves and, with a reference, its frozen copy."""
    tx = self.optimizer(params)
    return init_state(params, tx, with_reference=self.with_reference, freeze=self.freeze, ref_dtype=ref_dtype), tx

  def abstract_state(self, template: Any, ref_dtype: Any = None) -> TrainState:
    """The ShapeDtypeStruct layout of `init_state` for parameters shaped like `template` (nothing allocated)."""
    return jax.eval_shape(lambda p: self.init_state(p, ref_dtype)[0], template)

  def checkpoint_view(self, state: TrainState) -> TrainState:
    """What the stage's checkpoint holds: the whole state, or in a LoRA stage its trainable leaves only."""
    return trainable_view(state) if self.lora else state


def _micro_split(tree: Any, m: int) -> Any:
  """[B, ...] -> [M, B/M, ...] with part i holding rows i, i + M, ... (each device's contiguous rows then feed
  every part, so no part sits on a subset of the devices). Every leaf is batch-major (positions too)."""

  def split(x):
    b = x.shape[0]
    if b % m:
      raise ValueError(f"batch of {b} rows is not divisible into {m} micro-batches")
    return x.reshape(b // m, m, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, tree)


def shifted_logprobs(model, params, inputs: base.ModelInputs, chunk: int, with_entropy: bool, start: int = 0,
                  dropout_key: Array | None = None):
  """log p(token_{t+1} | tokens_<=t) for t = start .. L-2 (and the entropy), float32 [B, L-1-start]."""
  h, _ = model.hidden(params, model.embed(params, inputs), **base.dropout_kwargs(dropout_key))
  return rl.token_logprobs(h[:, start:-1], model.unembed_weight(params), inputs.tokens[:, start + 1:],
                           chunk_size=chunk, with_entropy=with_entropy)


def _apply(optimizer, state: TrainState, trainable: Any, frozen: Any, loss: Array, grads: Any,
           stats: dict[str, Array]):
  """Optimizer update of the trainable leaves, skipped (and counted) when the loss or the gradient is not
  finite. ``grads`` has the structure of ``trainable`` (no frozen leaf), so ``grad_norm`` and the non-finite
  test see only what is trained; frozen leaves are passed through untouched."""
  gnorm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1, params=optim.merge(keep(new_trainable, trainable), frozen),
      opt_state=keep(opt_state, state.opt_state), nonfinite=state.nonfinite + (~ok).astype(jnp.int32))
  metrics = {**stats, "loss": loss, "grad_norm": gnorm, "skipped": (~ok).astype(jnp.int32),
             "nonfinite_total": new_state.nonfinite}
  return new_state, metrics


def _accumulate(loss_fn: Callable, trainable: Any, frozen: Any, batch: Any, m: int, key: Array | None = None):
  """Sums loss, gradients and statistics over M micro-batches (one lax.scan, float32 accumulators).

  ``loss_fn(params, micro_batch, dropout_key) -> (loss, stats)`` sees the merged parameters and, when ``key`` is
  given, micro-batch i's key fold_in(key, i) (else None); the gradient is taken with respect to ``trainable``
  only, so accumulators exist only for trainable leaves. Statistics are combined with
  ``rl.loss.combine_stats`` (sums add, ``*_max`` / ``*_min`` take the max / min).
  """
  grad_fn = jax.value_and_grad(lambda t, f, mb, k: loss_fn(optim.merge(t, f), mb, k), has_aux=True)
  if m == 1:
    (loss, stats), grads = grad_fn(trainable, frozen, batch, base.fold_key(key, 0))
    return loss, grads, stats
  # A nested jit: the eval_shape below and the scan body then share one trace of the forward and backward pass
  # (jit caches it by argument shapes), where two plain calls would trace the model twice. XLA inlines it.
  grad_fn = jax.jit(grad_fn)
  micro = _micro_split(batch, m)
  first = jax.tree.map(lambda x: x[0], micro)
  (_, stats0), _ = jax.eval_shape(grad_fn, trainable, frozen, first, base.fold_key(key, 0))
  g0 = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)

  def body(carry, xs):
    mb, i = xs
    loss_acc, g_acc, s_acc = carry
    (loss, stats), grads = grad_fn(trainable, frozen, mb, base.fold_key(key, i))
    g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
    return (loss_acc + loss, g_acc, rl_loss.combine_stats(s_acc, stats)), None

  init = (jnp.zeros((), jnp.float32), g0, rl_loss.stats_identity(stats0))
  (loss, grads, stats), _ = jax.lax.scan(body, init, (micro, jnp.arange(m)))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
  return loss, grads, stats


def _dropout_key(cfg: StepConfig, step: Array) -> Array | None:
  """The step's dropout key (StepConfig.dropout_seed), or None when dropout is off."""
  return None if cfg.dropout_seed is None else jax.random.fold_in(jax.random.key(cfg.dropout_seed), step)


def _jit(step_fn, state_shardings, batch_shardings):
  if state_shardings is None:
    return jax.jit(step_fn, donate_argnums=0)
  rep = jax.tree.map(lambda s: s, state_shardings.step)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, rep), donate_argnums=0)


def make_rl_step(model: base.PolicyModel, optimizer: optax.GradientTransformation, cfg: StepConfig, *,
                 state_shardings: Any = None, batch_shardings: Any = None) -> Callable:
  """The MER-R1 policy-gradient step (docs/method.md, Policy loss (E4)): PPO-clip + beta * KL - entropy bonus.

  One step is ``cfg.ppo_epochs`` passes over the batch, each split into ``cfg.mini_batches`` optimizer updates
  (mini-batch j holds rows j, j + K, ...), each update accumulated over ``cfg.micro_batches``. With more than one
  update the old-policy log-probs come from a scoring pass of the trainer's own forward at the rollout weights
  (``grouped.old_logprobs``), so the first update's ratio is exactly 1 and clipping acts from the second update on;
  with one update the ratio is 1 and clipping cannot act. ``state.step`` counts RL steps (one per call), the
  optimizer's schedule counts updates. ``optimizer`` must be the one ``init_state`` initialised.

  The batch is a ``grouped.GroupedRLBatch`` (each prompt once, its completions as per-mode suffixes); micro- and
  mini-batches split prompts, each with its whole group.
  """
  loss_fn = batch_loss.make_grouped_loss(model, cfg)
  updates = cfg.ppo_epochs * cfg.mini_batches

  def one_update(state: TrainState, batch: grouped.GroupedRLBatch, beta, key):
    num_tokens, num_seqs = batch_loss.token_counts(batch)
    fn = lambda p, mb, k: loss_fn(p, mb, beta, num_tokens, num_seqs, k)  # noqa: E731
    trainable, frozen = optim.split_trainable(state.params, state.freeze)
    loss, grads, stats = _accumulate(fn, trainable, frozen, batch, cfg.micro_batches, key)
    return _apply(optimizer, state, trainable, frozen, loss, grads, stats)

  def step(state: TrainState, batch: grouped.GroupedRLBatch):
    beta = rl.beta_at(state.step, cfg.beta, decay_steps=cfg.beta_decay_steps, final_beta=cfg.beta_final)
    extra = {"beta": beta, **rl.advantage_stats(batch.advantages)}
    key = _dropout_key(cfg, state.step)
    if updates == 1:
      state, m = one_update(state, batch, beta, base.fold_key(key, 0))
      return state, {**{k: m[k] for k in _UPDATE_KEYS}, **rl.finalize_stats(_loss_stats(m)), **extra}
    with_old, gap = batch_loss.old_logprobs(model, cfg, state.params, batch)
    parts = _micro_split(with_old, cfg.mini_batches)
    start_step = state.step

    def body(state, i):
      mb = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i % cfg.mini_batches, keepdims=False), parts)
      return one_update(state, mb, beta, base.fold_key(key, i))

    state, ms = jax.lax.scan(body, state, jnp.arange(updates))
    stats = functools.reduce(rl_loss.combine_stats, [jax.tree.map(lambda x, j=j: x[j], _loss_stats(ms))
                                                     for j in range(updates)])
    metrics = {**rl.finalize_stats(stats), **gap, **extra,
               "loss": ms["loss"].mean(), "grad_norm": ms["grad_norm"].mean(), "skipped": ms["skipped"].sum(),
               "nonfinite_total": state.nonfinite, "updates": jnp.asarray(updates, jnp.int32)}
    return state.replace(step=start_step + 1), metrics

  return _jit(step, state_shardings, batch_shardings)


_UPDATE_KEYS = ("loss", "grad_norm", "skipped", "nonfinite_total")


def _loss_stats(metrics: dict[str, Array]) -> dict[str, Array]:
  """The summed policy_loss statistics of an update's metrics (``_apply`` passes them through)."""
  return {k: v for k, v in metrics.items() if k not in _UPDATE_KEYS}


def make_sft_step(model: base.PolicyModel, optimizer: optax.GradientTransformation, cfg: StepConfig, *,
                  state_shardings: Any = None, batch_shardings: Any = None) -> Callable:
  """Cold-start SFT: token-mean cross-entropy on the assistant tokens, same accumulation, freezing and skipping."""

  def loss_fn(params, mb: SFTBatch, num_tokens, key):
    logp = shifted_logprobs(model, params, mb.inputs, cfg.vocab_chunk, with_entropy=False, dropout_key=key)
    mask = mb.loss_mask[:, 1:].astype(jnp.float32)
    nll = -(logp * mask).sum()
    return nll / jnp.maximum(num_tokens, 1.0), {"tokens": mask.sum(), "nll_sum": nll}

  def step(state: TrainState, batch: SFTBatch):
    num_tokens = batch.loss_mask[:, 1:].astype(jnp.float32).sum()
    trainable, frozen = optim.split_trainable(state.params, state.freeze)
    key = base.fold_key(_dropout_key(cfg, state.step), 0)  # update 0: the same key layout as the RL step
    loss, grads, stats = _accumulate(lambda p, mb, k: loss_fn(p, mb, num_tokens, k), trainable, frozen, batch,
                                     cfg.micro_batches, key)
    return _apply(optimizer, state, trainable, frozen, loss, grads, {"tokens": stats["tokens"]})

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
        "the learning rate, check the rewards/advantages for NaN, or raise rl.max_nonfinite_steps.")
