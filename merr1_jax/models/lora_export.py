"""A LoRA policy's parameters as a base policy's: `merged` (the adapters folded into their kernels: HF export)
and `base_only` (the adapters dropped: the base a PEFT adapter applies to). Both return the tree of the config
without adapters, which only the policy (models/mllm.py) builds: hence a module above both lora.py and mllm.py
(mllm imports lora)."""

from __future__ import annotations

from typing import Any

import jax

from merr1_jax.models import base, lora, mllm
from merr1_jax.models.config import ModelConfig


def _base_tree(leaves: dict[str, Any], cfg: ModelConfig) -> tuple[Any, ModelConfig]:
  base_cfg = cfg.replace(lora_rank=0, lora_dropout=0.0)
  abstract = mllm.MultimodalPolicy(base_cfg).abstract_params()
  return jax.tree_util.tree_map_with_path(lambda p, _: leaves[base.path_str(p)], abstract), base_cfg


def merged(params, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
  """(parameters of the base model with W + (alpha / r) A B in each adapted kernel, the base's ModelConfig): it
  exports, loads and runs like any base policy. The sum is formed in float32 and cast to the kernel's dtype."""
  return _base_tree(lora.merged_leaves(params, cfg), cfg)


def base_only(params, cfg: ModelConfig) -> tuple[Any, ModelConfig]:
  """(the parameters without their adapters, the base's ModelConfig): the base model, as it was loaded."""
  return _base_tree(lora.flat_leaves(params), cfg)
