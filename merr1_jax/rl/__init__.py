"""Pure, model-free policy-gradient math for MER-R1 (no model, no I/O).

``rl.dod_advantages``, ``rl.category_logmass`` and ``rl.calibration_gain`` are the public names; the
submodules group them by concept: advantages (E2), calibration (E3, with ``CALIBRATIONS``, the mapping of
``rl.calibration`` kinds), loss (E4), and vocab, the one streaming pass over the vocabulary that the log-probs
and the calibration log-mass share. See docs/method.md for every equation.
"""

from merr1_jax.rl.advantages import contiguous_groups, dod_advantages, group_zscore, mode_weights
from merr1_jax.rl.calibration import (
    CALIBRATIONS,
    LOGMASS_FLOOR,
    READINGS,
    CalibrationConfig,
    anchor_gains,
    answer_anchors,
    calibration_gain,
    category_logmass,
    category_logmass_from_hidden,
    fast_prior_kl,
    one_sided_calibration,
    set_confidence,
)
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
from merr1_jax.rl.vocab import VocabStats, vocab_stream

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
    "READINGS",
    "CalibrationConfig",
    "anchor_gains",
    "answer_anchors",
    "calibration_gain",
    "category_logmass",
    "category_logmass_from_hidden",
    "fast_prior_kl",
    "one_sided_calibration",
    "set_confidence",
    "contiguous_groups",
    "dod_advantages",
    "group_zscore",
    "mode_weights",
    "VocabStats",
    "vocab_stream",
]
