"""Hugging Face safetensors checkpoints <-> the policy's parameter tree (Qwen2, Qwen2.5, Qwen2.5-Omni thinker).

This module is the entry point callers import (`from merr1_jax.models import hf_io; hf_io.load_hf(...)`); the code
lives in four modules by concept, and the names below are re-exported from them:
  * hf_config: config.json <-> ModelConfig (`config_from_hf`, `check_config` and the fields it compares,
    `_CHECKED`, the Qwen2ForCausalLM `hf_config_dict` an export writes, `read_json`).
  * hf_keys: the HF key names and tensor layouts <-> our param paths (`_classify`, `_expected_keys`), shared by
    import and export so that one is the exact inverse of the other.
  * hf_import: `load_hf` and its `LoadReport`: checkpoint file resolution (pickles refused), a header-only plan
    that reports missing / unexpected / mismatched keys before any tensor is read, then shard-by-shard placement
    straight onto the target shardings; `PROJECTOR_FILE`, where the parameters HF has no key for travel.
  * hf_export: `save_hf` (layouts 'qwen2' and 'omni_thinker', the copy-through of a Qwen2.5-Omni checkpoint's
    towers with `copy_from`) and `export_kwargs`, the layout a run that started from a given hf_path exports in.
All of them log to the logger "merr1_jax.models.hf_io".
"""

# _CHECKED and _expected_keys are private, re-exported for the tests (every compared field, every key loaded).
from merr1_jax.models.hf_config import _CHECKED, check_config, config_from_hf, hf_config_dict, read_json  # noqa: F401
from merr1_jax.models.hf_export import export_kwargs, save_hf, save_peft
from merr1_jax.models.hf_import import PROJECTOR_FILE, LoadReport, load_hf
from merr1_jax.models.hf_keys import _expected_keys  # noqa: F401

__all__ = ["LoadReport", "PROJECTOR_FILE", "check_config", "config_from_hf", "export_kwargs", "hf_config_dict",
           "load_hf", "read_json", "save_hf", "save_peft"]
