"""The variance-interference probe: does normalising recall and precision together drown one of them?

docs/method.md, "Why disentangle: variance-induced interference": as the precision reward's in-group spread grows
past the recall reward's, the coupled advantage's correlation with the recall reward tends to their correlation
rho, while the disentangled advantage keeps sqrt((1 + rho) / 2) with each. This module measures those quantities
on real rollouts during training (`rl.probe_every`) and logs them as `probe/*` (the keys are listed there), so the
claim is shown or refuted on our data. Each objective's part of the advantage: disentangled, c_o = w_o z_g(r_o);
coupled, z_g(R) splits linearly into c_o = w_o (r_o - mean_g r_o) / (std_g R + eps). The gradient of a part is the
RL loss's gradient with that part as the advantage (ratio 1, no KL).

Shape legend: B rows (prompt-major groups), P groups, O objectives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from merr1_jax import rl
from merr1_jax.rollout import passes as grouped
from merr1_jax.task import prompts
from merr1_jax.training import assembly, batch_loss, experience
from merr1_jax.training import optimizer as optim
from merr1_jax.training import step as ts

_REC, _PREC = experience.OBJECTIVES.index("recall"), experience.OBJECTIVES.index("precision")


def contributions(rewards_BxO: np.ndarray, valid_B: np.ndarray, weights_BxO: np.ndarray, groups_B: np.ndarray,
                  adv: experience.AdvantageSettings) -> tuple[np.ndarray, np.ndarray]:
  """(c_rec_B, c_prec_B): the recall and precision parts of the advantage (module docstring), float64."""
  r = np.asarray(rewards_BxO, np.float64)
  w = np.asarray(weights_BxO, np.float64)
  out = np.zeros((2, len(r)))
  total = (w * r)[:, :-1].sum(1) + w[:, -1] * r[:, -1]  # the coupled R (calibration valid on its rows only)
  for g in np.unique(groups_B):
    rows = (groups_B == g) & valid_B
    if rows.sum() <= adv.ddof:
      continue
    for i, o in enumerate((_REC, _PREC)):
      x = r[rows, o]
      # The normaliser: the objective's own spread (DOD) or the coupled reward's (its linear share of z(R)).
      norm = x if adv.disentangle else total[rows]
      if norm.max() > norm.min():
        scale = (norm.std(ddof=adv.ddof) + adv.eps) if adv.scale else 1.0
        out[i, rows] = w[rows, o] * (x - x.mean()) / scale
  return out[0], out[1]


def reward_statistics(rewards_BxO: np.ndarray, valid_B: np.ndarray, groups_B: np.ndarray, adv_B: np.ndarray
                      ) -> dict[str, float]:
  """s_rec, s_prec, rho, the advantage's correlation with each reward, and the formulas' predictions."""
  r = np.asarray(rewards_BxO, np.float64)
  s_r, s_p, rhos, cen_r, cen_p, a = [], [], [], [], [], []
  for g in np.unique(groups_B):
    rows = (groups_B == g) & valid_B
    if rows.sum() < 2:
      continue
    x, y = r[rows, _REC], r[rows, _PREC]
    s_r.append(x.std(ddof=1))
    s_p.append(y.std(ddof=1))
    if x.std() > 0 and y.std() > 0:
      rhos.append(float(np.corrcoef(x, y)[0, 1]))
    cen_r.append(x - x.mean())
    cen_p.append(y - y.mean())
    a.append(np.asarray(adv_B, np.float64)[rows])
  sr, sp = float(np.mean(s_r)) if s_r else 0.0, float(np.mean(s_p)) if s_p else 0.0
  rho = float(np.mean(rhos)) if rhos else 0.0
  corr = lambda u, v: float(np.corrcoef(u, v)[0, 1]) if u.std() > 0 and v.std() > 0 else 0.0  # noqa: E731
  a_all = np.concatenate(a) if a else np.zeros(0)
  denom = math.sqrt(max(sr ** 2 + sp ** 2 + 2 * rho * sr * sp, 1e-30))
  return {"s_rec": sr, "s_prec": sp, "rho": rho,
          "corr_adv_rec": corr(a_all, np.concatenate(cen_r)) if a else 0.0,
          "corr_adv_prec": corr(a_all, np.concatenate(cen_p)) if a else 0.0,
          "pred_corr_coupled_rec": (sr + rho * sp) / denom, "pred_corr_coupled_prec": (sp + rho * sr) / denom,
          "pred_corr_disentangled": math.sqrt(max((1 + rho) / 2, 0.0))}


def gradient_cosine(model, params, batch: grouped.GroupedRLBatch, c_rec: np.ndarray, c_prec: np.ndarray, freeze=()
                    ) -> dict[str, float]:
  """cos(g_rec, g_prec) and the norms of the policy gradients with each part as the advantage (ratio 1, no KL),
  over the trainable leaves; the parts are per row in the batch's rollout order (GroupedRLBatch.advantages)."""
  loss_fn = batch_loss.make_grouped_loss(model, ts.StepConfig(loss=rl.LossConfig(), beta=0.0))
  trainable, frozen = optim.split_trainable(params, tuple(freeze))
  base = batch.replace(segments=tuple(s.replace(old_logp=None, ref_logp=None, behaviour_logp=None)
                                      for s in batch.segments))

  @jax.jit
  def flat_grad(trainable, frozen, batch, adv_B):
    g = jax.grad(lambda t: loss_fn(optim.merge(t, frozen), batch.with_advantages(adv_B), 0.0)[0])(trainable)
    return jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree.leaves(g)])

  g_rec, g_prec = (np.asarray(flat_grad(trainable, frozen, base, jnp.asarray(c, jnp.float32)), np.float64)
                   for c in (c_rec, c_prec))
  n_rec, n_prec = float(np.linalg.norm(g_rec)), float(np.linalg.norm(g_prec))
  cos = float(np.dot(g_rec, g_prec) / (n_rec * n_prec)) if n_rec > 0 and n_prec > 0 else 0.0
  return {"grad_cos": cos, "grad_norm_rec": n_rec, "grad_norm_prec": n_prec}


def probe(ctx: experience.Context, settings: experience.ExperienceSettings, params, ref_params, batch, rng,
          freeze=()) -> dict[str, float]:
  """The probe's statistics (module docstring) on one fresh experience step over `batch` (a fixed probe batch of
  prompts, new rollouts from the current policy): {'probe/<name>': value}. Pass `params` and `ref_params` of the
  same, live state: after a step, the reference read from the state before it points at donated buffers."""
  rl_batch, _, rows = experience.collect(ctx, settings, params, ref_params, batch, rng)
  # Rows prompt-major, as `rows` holds them: `order` takes the batch's rollout order there.
  segs = rl_batch.segments
  order = assembly.prompt_major_order(np.concatenate([np.repeat(np.arange(s.tokens.shape[0]), s.tokens.shape[1])
                                                      for s in segs]))
  r_BxO = np.asarray(rows["reward"])
  mode = np.asarray([prompts.MODES.index(m) for m in rows["mode"]])
  n_prompts = len(batch["openset"])
  prompt_ids = np.repeat(np.arange(n_prompts), settings.n_slow + settings.n_fast)
  groups = experience.group_ids(mode, prompt_ids, n_prompts, settings.advantage.group)
  valid = np.concatenate([np.asarray(s.loss_mask).any(-1).reshape(-1) for s in segs])[order]
  weights = np.asarray(settings.advantage.weights, np.float64)[mode]
  c_rec, c_prec = contributions(r_BxO, valid, weights, groups, settings.advantage)
  out = reward_statistics(r_BxO, valid, groups, np.asarray(rl_batch.advantages)[order])
  if weights[:, [_REC, _PREC]].any():  # a row without the two objectives (grpo_f1's one F1 reward) has no parts
    out |= {"var_adv_rec": float(c_rec[valid].var()), "var_adv_prec": float(c_prec[valid].var())}
    back = lambda c: np.asarray(c)[np.argsort(order)]  # noqa: E731 (prompt-major -> rollout order)
    out |= gradient_cosine(ctx.model, params, jax.tree.map(jnp.asarray, rl_batch), back(c_rec), back(c_prec),
                           freeze)
  return {f"probe/{k}": v for k, v in out.items()}
