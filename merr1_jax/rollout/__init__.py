"""Rollouts: prompt batches (prompt_batch), the shared-prefix prefill (shared_prefix), the KV-cache sampler
(sampler) and both thinking modes in one loop (modes). The names below are the public surface: ``rollout.sample``,
``rollout.sample_modes``, ``rollout.SpecialIds``, ...
Teacher-forced scoring of given completions is merr1_jax/rollout/passes.py's ``score_pass``.

The RL step and evaluation only call these through the `models.base.PolicyModel` protocol; no concrete model is
imported here.
"""

from merr1_jax.rollout.modes import sample_modes
from merr1_jax.rollout.prompt_batch import (
    COMPLETION_BUCKETS,
    PROMPT_BUCKETS,
    AnchorSpec,
    SpecialIds,
    append_fast_prefix,
    batch_inputs,
    bucket,
    next_positions,
    prepare_prompts,
    text_positions,
)
from merr1_jax.rollout.sampler import (
    DecodeSpec,
    DecodeState,
    Rollout,
    StopReason,
    completion_texts,
    decode,
    decode_step,
    init_decode_state,
    prefill,
    sample,
)

__all__ = [
    "COMPLETION_BUCKETS", "PROMPT_BUCKETS", "AnchorSpec", "SpecialIds", "append_fast_prefix", "batch_inputs",
    "bucket", "next_positions", "prepare_prompts", "text_positions", "DecodeSpec", "DecodeState", "Rollout",
    "StopReason", "completion_texts", "decode", "decode_step", "init_decode_state", "prefill", "sample",
    "sample_modes",
]
