"""The model configuration: one frozen dataclass shared by the decoder, the multimodal wrapper and HF I/O.

Everything a model needs to build its parameters and run is here, so a config is data (it can be logged,
compared with a checkpoint's config.json and hashed for jit caches). `validate` runs before anything is
built and names the offending field.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import jax.numpy as jnp

RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
ProjectorKind = Literal["mlp", "identity"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen2-family decoder plus per-modality feature projectors.

  Attributes:
    vocab_size: rows of the token embedding (and columns of the unembedding).
    d_model: residual width D.
    num_layers: decoder blocks.
    num_heads: query heads H.
    num_kv_heads: key/value heads K (GQA: H % K == 0).
    head_dim: per-head width Dh (Qwen2 uses d_model // num_heads, but it is explicit here).
    mlp_dim: SwiGLU hidden width F.
    rope_theta: RoPE base.
    rms_eps: RMSNorm epsilon.
    tie_embeddings: unembed with the token embedding's transpose (no separate lm_head).
    qkv_bias: biases on the q/k/v projections (Qwen2: True).
    mrope_section: None for 1-D RoPE; otherwise the number of rotary frequencies given to the temporal,
      height and width position ids (Qwen2.5-Omni: (16, 24, 24); the sum is head_dim // 2).
    param_dtype: storage dtype of parameters ('float32' | 'bfloat16').
    compute_dtype: matmul dtype ('bfloat16' on accelerators). Norms, softmax and logits stay float32.
    scan_layers: apply the stacked blocks with lax.scan (small HLO, fast compile for deep models) instead
      of a Python-unrolled loop. The parameter tree is the same either way.
    remat: rematerialisation policy per block: 'none', 'full', 'dots' (save matmul outputs),
      'dots_no_batch' (save matmuls without batch dims).
    video_dim / audio_dim: feature widths Dv / Da of the preprocessed frame / audio features; 0 means the
      modality is absent (no projector is built).
    projector: 'mlp' (Linear-GELU-Linear into d_model) or 'identity' (features are already tower outputs in
      the model's embedding space, as with Qwen2.5-Omni; needs Dv == Da == d_model).
    video_token_id / audio_token_id: placeholder token ids replaced by projected features.
    max_seq_len: default cache length and a documentation bound for positions.
    init_std: stddev of the normal initialiser (HF's initializer_range).
    lora_rank: rank r of the LoRA adapters on the decoder's projections (0: no adapters; models/lora.py). Each
      targeted kernel W gets A (its input axes x r, float32, random) and B (r x its output axes, float32,
      zeros), and the projection computes x W + (lora_alpha / r) (x A) B, so at initialisation the model is
      exactly the base model.
    lora_alpha: the LoRA scale's numerator (PEFT's lora_alpha; the scale is lora_alpha / lora_rank).
    lora_targets: regex searched in each decoder kernel's parameter path ('decoder/layers/q_kernel', ...,
      'decoder/layers/down_kernel'); the matching kernels get adapters (default: every attention and MLP
      projection, PEFT's 'all-linear').
    attention: the attention kernel of the prompt-length passes (prefill, scoring, the update; models/layers.py):
      'reference' (einsums, float32 scores; the default), 'blocked' (the same einsums per block of 128 queries,
      skipping the keys the causal mask hides: about half the work at long prompts, the CPU's fastest), 'xla' or
      'cudnn' (jax.nn.dot_product_attention's implementations; cuDNN needs a GPU). The same numbers up to float
      summation order (tests/test_attention_kernels.py). A fused kernel broadcasts the prompt's K/V over a group's
      suffixes in the grouped passes (G copies per layer); decode steps always use the einsum form.
    lora_dropout: probability p of zeroing each input element of an adapter (PEFT's lora_dropout: the adapter
      computes (alpha / r) (dropout(x) A) B, the base path x W sees x), in the training passes that pass a
      `dropout_key` only (SFT and RL loss; never sampling or scoring). Survivors are scaled by 1 / (1 - p).
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 1_000_000.0
  rms_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = True
  mrope_section: tuple[int, ...] | None = None
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  scan_layers: bool = False
  remat: RematPolicy = "none"
  video_dim: int = 0
  audio_dim: int = 0
  projector: ProjectorKind = "mlp"
  video_token_id: int = 151656
  audio_token_id: int = 151646
  max_seq_len: int = 32768
  init_std: float = 0.02
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = r"layers/(q|k|v|o|gate|up|down)_kernel$"
  lora_dropout: float = 0.0
  attention: str = "reference"

  def __post_init__(self):
    # Lists from config files/CLI overrides would make the dataclass unhashable; normalise to tuples.
    if self.mrope_section is not None and not isinstance(self.mrope_section, tuple):
      object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    validate(self)

  @property
  def jnp_param_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  @property
  def jnp_compute_dtype(self) -> Any:
    return _DTYPES[self.compute_dtype]

  def replace(self, **overrides) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)


def validate(cfg: ModelConfig) -> None:
  """Raises ValueError naming the first inconsistent field."""

  def fail(field: str, msg: str):
    raise ValueError(f"ModelConfig.{field}: {msg}")

  for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    if not isinstance(getattr(cfg, f), int) or getattr(cfg, f) <= 0:
      fail(f, f"must be a positive int, got {getattr(cfg, f)!r}")
  if cfg.num_heads % cfg.num_kv_heads:
    fail("num_kv_heads", f"num_heads={cfg.num_heads} is not a multiple of num_kv_heads={cfg.num_kv_heads}")
  if cfg.head_dim % 2:
    fail("head_dim", f"rotary embeddings need an even head_dim, got {cfg.head_dim}")
  if cfg.mrope_section is not None:
    if len(cfg.mrope_section) != 3 or sum(cfg.mrope_section) != cfg.head_dim // 2:
      fail("mrope_section", f"needs 3 entries summing to head_dim//2={cfg.head_dim // 2}, got {cfg.mrope_section}")
  for f in ("param_dtype", "compute_dtype"):
    if getattr(cfg, f) not in _DTYPES:
      fail(f, f"must be one of {sorted(_DTYPES)}, got {getattr(cfg, f)!r}")
  if cfg.remat not in ("none", "full", "dots", "dots_no_batch"):
    fail("remat", f"must be 'none'|'full'|'dots'|'dots_no_batch', got {cfg.remat!r}")
  if cfg.attention not in ATTENTION_KINDS:
    fail("attention", f"must be one of {', '.join(map(repr, ATTENTION_KINDS))}, got {cfg.attention!r}")
  if cfg.projector not in ("mlp", "identity"):
    fail("projector", f"must be 'mlp' or 'identity', got {cfg.projector!r}")
  for f in ("video_dim", "audio_dim"):
    dim = getattr(cfg, f)
    if dim < 0:
      fail(f, f"must be >= 0, got {dim}")
    if cfg.projector == "identity" and dim not in (0, cfg.d_model):
      fail(f, f"projector='identity' needs features already in the embedding space ({cfg.d_model}), got {dim}")
  for f in ("video_token_id", "audio_token_id"):
    if not 0 <= getattr(cfg, f) < cfg.vocab_size and getattr(cfg, f.replace("token_id", "dim")) > 0:
      fail(f, f"placeholder id {getattr(cfg, f)} is outside the vocabulary (vocab_size={cfg.vocab_size})")
  if cfg.video_dim > 0 and cfg.audio_dim > 0 and cfg.video_token_id == cfg.audio_token_id:
    fail("audio_token_id", "video and audio placeholders must be different tokens")
  if not isinstance(cfg.lora_rank, int) or isinstance(cfg.lora_rank, bool) or cfg.lora_rank < 0:
    fail("lora_rank", f"must be an int >= 0 (0: no adapters), got {cfg.lora_rank!r}")
  if not (isinstance(cfg.lora_dropout, (int, float)) and 0.0 <= cfg.lora_dropout < 1.0):
    fail("lora_dropout", f"must be a probability in [0, 1), got {cfg.lora_dropout!r}")
  if cfg.lora_dropout and not cfg.lora_rank:
    fail("lora_dropout", f"is {cfg.lora_dropout} but lora_rank is 0: there are no adapters to drop inputs of")
  if cfg.lora_rank:
    if not cfg.lora_alpha > 0:
      fail("lora_alpha", f"must be > 0, got {cfg.lora_alpha!r}")
    try:
      targets = lora_targets(cfg)
    except (re.error, TypeError) as e:
      fail("lora_targets", f"{cfg.lora_targets!r} is not a regex: {e}")
    if not targets:
      fail("lora_targets", f"{cfg.lora_targets!r} matches none of the decoder kernels "
           f"{[LORA_PATH.format(n) for n in LORA_KERNELS]}")


# ModelConfig.attention's values (models/layers.py, "attention kernels", says what each runs).
ATTENTION_KINDS = ("reference", "blocked", "xla", "cudnn")

# The decoder projections LoRA can adapt ('layers/<name>_kernel') and how many leading axes of each (unstacked)
# kernel are its input: q/k/v [D, H|K, Dh], gate/up [D, F], down [F, D] take 1, o [H, Dh, D] takes 2.
LORA_KERNELS: dict[str, int] = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
LORA_PATH = "decoder/layers/{}_kernel"  # a kernel's path in the policy's parameter tree, what lora_targets searches


def lora_targets(cfg: ModelConfig) -> tuple[str, ...]:
  """The kernel names ('q', ..., 'down') that carry adapters under `cfg` (none when lora_rank is 0)."""
  if not cfg.lora_rank:
    return ()
  return tuple(n for n in LORA_KERNELS if re.search(cfg.lora_targets, LORA_PATH.format(n)))
