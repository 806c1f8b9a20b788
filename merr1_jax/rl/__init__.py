"""Pure, model-free policy-gradient math for MER-R1 (no model, no I/O).

``rl.dod_advantages``, ``rl.category_logmass`` and ``rl.calibration_gain`` are the public names; the
submodules group them by concept: advantages (E2), calibration (E3, with the ``CALIBRATIONS`` registry of
``rl.calibration`` kinds) and loss (E4). See docs/method.md for every equation.
"""

from merr1_jax.rl.advantages import dod_advantages, group_zscore, mode_weights
from merr1_jax.rl.loss import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LossConfig,
    advantage_stats,
    aggregate,
    beta_at,
    clipped_objective,
    finalize_stats,
    kl_estimate,
    logprobs_from_logits,
    policy_loss,
    token_logprobs,
)
from merr1_jax.rl.calibration import (
    CALIBRATIONS,
    LOGMASS_FLOOR,
    answer_anchors,
    calibration_gain,
    calibration_reward,
    category_logmass,
    category_logmass_from_hidden,
    fast_prior_kl,
    register_calibration,
)

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LossConfig",
    "advantage_stats",
    "aggregate",
    "beta_at",
    "clipped_objective",
    "finalize_stats",
    "kl_estimate",
    "logprobs_from_logits",
    "policy_loss",
    "token_logprobs",
    "CALIBRATIONS",
    "LOGMASS_FLOOR",
    "answer_anchors",
    "calibration_gain",
    "calibration_reward",
    "category_logmass",
    "category_logmass_from_hidden",
    "fast_prior_kl",
    "register_calibration",
    "dod_advantages",
    "group_zscore",
    "mode_weights",
]
