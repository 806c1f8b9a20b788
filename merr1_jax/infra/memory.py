"""The memory plan: how many GB of a device the train state takes, from the model config alone.

The trainer uses it to refuse, before anything is built, a mesh whose per-device share of the state would not
fit (config.validate); docs/scaling.md derives every figure it quotes from the same functions.

Conventions: sizes in GB (1e9 bytes); "model shards" = the fsdp x tensor devices that split the parameters.
"""

from __future__ import annotations

from merr1_jax.models.config import ModelConfig

# Share of a device's memory that the train state (parameters, AdamW moments, gradients, reference) may take:
# the rest is for the KV cache, activations and XLA temporaries (docs/scaling.md budgets 20-30% on top).
STATE_MEMORY_FRACTION = 0.75


def param_count(mc: ModelConfig) -> int:
  """Parameters of `models.mllm.MultimodalLM(mc)`, counted from the shapes (tests check it against the
  model's abstract parameters): embedding, optional untied head, per-layer attention, SwiGLU and norms, and an
  'mlp' projector per present modality ('identity' projectors have none)."""
  d, h, k, dh, f = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim
  layer = d * h * dh + 2 * d * k * dh + h * dh * d + 3 * d * f + 2 * d
  if mc.qkv_bias:
    layer += h * dh + 2 * k * dh
  total = mc.vocab_size * d * (1 if mc.tie_embeddings else 2) + mc.num_layers * layer + d
  if mc.projector == "mlp":
    total += sum(dim * d + d + d * d + d for dim in (mc.video_dim, mc.audio_dim) if dim > 0)
  return total


def state_gb_per_device(mc: ModelConfig, *, with_reference: bool, micro_batches: int, model_shards: int,
                        lora_stage: bool = False, train_full_params: int = 0) -> float:
  """GB per device of the train state at its peak, the update (docs/scaling.md, "The pieces"): parameters and
  the two AdamW moments in param_dtype (optax keeps moments in the parameter dtype), the KL reference in
  compute_dtype, and the gradients: one gradient in param_dtype, plus the float32 accumulators of
  `train_step._accumulate` when micro_batches > 1. Split over the `model_shards` = fsdp x tensor devices that
  shard parameters. Activations and the KV cache come on top (they scale with rows, not parameters).

  A model with LoRA adapters (mc.lora_rank > 0) holds them in float32 beside the base. In a `lora_stage` only the
  adapters and the `train_full_params` leaves lora.train_full names are trained: the frozen base costs its
  weights alone, the adapters weights, moments, gradient (and accumulator) in float32, and the reference is the
  base with the adapters off (nothing) plus a copy of the train-full leaves. Outside a LoRA stage the adapters are
  frozen and cost their weights."""
  itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}
  p, c = itemsize[mc.param_dtype], itemsize[mc.compute_dtype]
  acc = 4 if micro_batches > 1 else 0
  base_n, adapters = param_count(mc), lora_param_count(mc)
  if not lora_stage:
    total = base_n * (3 * p + (c if with_reference else 0) + p + acc) + adapters * 4
  else:
    full = train_full_params * (3 * p + (c if with_reference else 0) + p + acc)
    total = (base_n - train_full_params) * p + full + adapters * (4 * 4 + acc)
  return total / model_shards / 1e9


def train_full_count(mc: ModelConfig, train_full: str) -> int:
  """Parameters of the leaves whose path the regex `train_full` (lora.train_full) matches, adapters excluded."""
  if not train_full:
    return 0
  import re  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from merr1_jax.models import base, lora, mllm  # noqa: PLC0415

  abstract = mllm.MultimodalPolicy(mc).abstract_params()
  return sum(int(x.size) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
             if re.search(train_full, base.path_str(p)) and not lora.is_adapter(base.path_str(p)))


def lora_param_count(mc: ModelConfig) -> int:
  """Adapter parameters (A and B of every targeted kernel in every layer; 0 without LoRA)."""
  from merr1_jax.models import lora  # noqa: PLC0415

  return lora.count(mc)


def local_device_memory_gb() -> float | None:
  """The first local device's memory as the runtime reports it (TPU: its HBM; GPU: the part XLA preallocates,
  75% by default); None where it reports none (CPU)."""
  import jax  # noqa: PLC0415 - keeps device queries out of import time

  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - a backend without memory stats
    return None
  limit = stats.get("bytes_limit")
  return limit / 1e9 if limit else None
