"""The MER-R1 config: `get_config(arg)` returns an ml_collections ConfigDict with every field documented.

The default is the embedded CPU run: the tiny model on MER-Synth, cold-start SFT, MER-R1 RL, evaluation in both
modes, in under 10 minutes on 2 CPU cores. Presets are chosen with `arg`, a comma list of key=value with the keys
`model` (a name in merr1_jax/models/presets.py), `data` (mer_synth | mer_features), `mesh` (see _MESHES) and
`ablation` (a row of the paper's ablation, see _ABLATIONS; benchmarks/ablation.py runs the grid):

    python -m merr1_jax.train --config configs/base.py --workdir W
    python -m merr1_jax.train --config configs/base.py:model=qwen2_5_omni_7b_thinker,data=mer_features,mesh=gpu8 \\
        --config.model.hf_path=/ckpt/Qwen2.5-Omni-7B --config.data.records_dir=/data/records --workdir W
    python -m merr1_jax.train --config configs/base.py:ablation=grpo_f1 --workdir W

and any field can be overridden on the command line (`--config.rl.beta=0.0`). ConfigDicts reject unknown keys,
so a typo fails loudly. `merr1_jax.config.validate(config)` checks every field before anything is built.

Symbols refer to docs/method.md. "Precursor" means the first author's earlier public GRPO trainer.
"""

import ml_collections

from merr1_jax.config import EMBEDDED_PRESETS, ConfigError
from merr1_jax.models import presets

# Model fields (merr1_jax/models/config.py documents each): the preset fills them, the command line may
# override any. Symbols as in docs/architecture.md.
_MODEL_FIELDS = {
    "vocab_size": "V, embedding rows; -1 = the embedded tokenizer's size",
    "d_model": "D, residual width",
    "num_layers": "decoder blocks",
    "num_heads": "H, query heads",
    "num_kv_heads": "K, key/value heads (GQA: H % K == 0)",
    "head_dim": "Dh, per-head width",
    "mlp_dim": "F, SwiGLU hidden width",
    "rope_theta": "RoPE base (Qwen2: 1e6)",
    "rms_eps": "RMSNorm epsilon",
    "tie_embeddings": "unembed with the embedding's transpose (the 7B thinker has its own lm_head: False)",
    "qkv_bias": "biases on q/k/v (Qwen2: True)",
    "param_dtype": "storage dtype of parameters and AdamW moments: 'float32' | 'bfloat16'",
    "compute_dtype": "matmul dtype; norms, softmax and logits stay float32",
    "scan_layers": "lax.scan over the stacked blocks: one compiled block, fast compiles for deep models",
    "remat": "rematerialisation per block: 'none' | 'full' | 'dots' | 'dots_no_batch' (memory vs. recompute)",
    "video_dim": "Dv, width of the preprocessed video features (0 = no video)",
    "audio_dim": "Da, width of the preprocessed audio features (0 = no audio)",
    "projector": "'mlp' (Linear-GELU-Linear into D) | 'identity' (features are tower outputs already D wide)",
    "video_token_id": "the <|VIDEO|> placeholder id; -1 = from the embedded tokenizer",
    "audio_token_id": "the <|AUDIO|> placeholder id; -1 = from the embedded tokenizer",
    "max_seq_len": "default KV-cache length and a bound on positions",
    "init_std": "stddev of the random init (HF initializer_range)",
    "lora_rank": "r of the LoRA adapters (0 = none; docs/lora.md): the stages in lora.stages train only them",
    "lora_alpha": "LoRA scale numerator: the adapters add (lora_alpha / r) (x A) B (PEFT's lora_alpha)",
    "lora_targets": "regex over the decoder kernels ('layers/q_kernel' ...) that get adapters; default all seven",
    "lora_dropout": "p of PEFT's lora_dropout: the adapters' inputs are dropped in a LoRA stage's loss passes",
    "attention": "attention kernel: 'reference' (einsums) | 'blocked' (the same per causal block of 128 queries; the "
                 "CPU's fastest at long prompts) | 'xla' | 'cudnn' (jax.nn.dot_product_attention; GPU)",
}

# Mesh presets, (data, fsdp, tensor) and the GB of memory one device has (0 = ask the runtime; CPU reports none),
# following docs/scaling.md: parameters, moments, gradients and the reference are sharded over `fsdp` (ZeRO-3),
# batch rows over data x fsdp; tensor parallelism is not needed for the 3B/7B thinkers. Memory per device for
# the 7B thinker on each: docs/scaling.md.
_MESHES = {
    "replicated": ((-1, 1, 1), 0.0),  # pure data parallelism, parameters on every device: the embedded default
    "fsdp": ((1, -1, 1), 0.0),  # parameters sharded over every device: the default for real models
    "gpu8": ((1, 8, 1), 80.0),  # one node of 8 x H100 / A100 80 GB
    "v5p8": ((1, 4, 1), 95.0),  # TPU v5p-8: 4 chips of 95 GB HBM, one host
    "v4_32": ((1, 16, 1), 32.0),  # TPU v4-32: 16 chips of 32 GB HBM over 4 hosts; 16 prompts per step (below)
    "gpu1": ((1, 1, 1), 80.0),  # one 80 GB GPU (H100 / A100); with LoRA (docs/lora.md); 141 GB H200: override
    #                             --config.mesh.device_memory_gb=141
    "v5e8": ((1, 8, 1), 16.0),  # TPU v5e-8: 8 chips of 16 GB HBM, one host; with LoRA (docs/lora.md)
}
_DATA = ("mer_synth", "mer_features")

# The paper's ablation (docs/method.md "The ablation"), each row a set of config.rl overrides on top of one
# common layout: 4 slow responses per prompt (the reported group size) and no fast rollouts, the fast intuition
# coming only from the calibration's teacher-forced fast pass (the reported ~20% extra compute). Each row adds
# one switch to the row above it; the SFCC variants each change one switch of mer_r1.
_ABLATION_LAYOUT = {"n_slow": 4, "n_fast": 0, "calibration": "none", "disentangle": True, "w_f1": 0.0}
_SFCC = {"calibration": "one_sided", "cal_reading": "first", "cal_std_floor": 0.05}
_ABLATIONS = {
    "grpo_f1": {"disentangle": False, "w_f1": 1.0, "w_rec_slow": 0.0, "w_rec_fast": 0.0, "w_prec_slow": 0.0,
                "w_prec_fast": 0.0},  # GRPO with one F1 reward (+ the format reward every row has)
    "rd": {"disentangle": False},  # recall and precision as two rewards, normalised together (coupled)
    "rd_ad": {},  # ... normalised separately, in advantage space: DOD
    "mer_r1": _SFCC,  # + SFCC (the one-sided, category-level form): the full method
    "mer_r1_cg": {"calibration": "contrastive_gain", "cal_std_floor": 0.0},  # + SFCC, the contrastive form (wave 2)
    "sfcc_max": _SFCC | {"cal_reading": "max"},  # confidence read as the maximum over the answer's anchors
    "sfcc_word": _SFCC | {"cal_level": "word"},  # word-level confidence: each label word its own category
    # word level as the emitted word's own probability at its slot (method.md E3 "Word level")
    "sfcc_emitted": _SFCC | {"cal_level": "word", "cal_reading": "emitted"},
    "sfcc_no_prec": _SFCC | {"cal_precision_side": False},  # no precision side
    "sfcc_reward": _SFCC | {"cal_space": "reward"},  # calibration in reward space
    "sfcc_mixed": _SFCC | {"cal_space": "mixed"},  # half in each space
}


def _parse_arg(arg):
  out = {"model": "tiny", "data": "mer_synth", "mesh": None, "ablation": None}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ConfigError(f"config arg {item!r}: expected model=PRESET, data=NAME, mesh=NAME or ablation=ROW, "
                        "comma separated")
    out[key] = value
  if out["ablation"] is not None and out["ablation"] not in _ABLATIONS:
    raise ConfigError(f"config arg ablation={out['ablation']}: unknown ablation row; known: {', '.join(_ABLATIONS)}")
  if out["model"] not in presets.names():
    raise ConfigError(f"config arg model={out['model']}: unknown model preset {out['model']!r}; known presets: "
                      f"{', '.join(presets.names())}")
  if out["data"] not in _DATA:
    raise ConfigError(f"config arg data={out['data']}: unknown dataset; known: {', '.join(_DATA)}")
  if out["mesh"] is None:
    out["mesh"] = "replicated" if out["model"] in EMBEDDED_PRESETS else "fsdp"
  if out["mesh"] not in _MESHES:
    raise ConfigError(f"config arg mesh={out['mesh']}: unknown mesh preset; known: {', '.join(_MESHES)}")
  return out


def _model(preset: str) -> ml_collections.ConfigDict:
  embedded = preset in EMBEDDED_PRESETS
  base = presets.get(preset, **({"vocab_size": 1024} if embedded else {}))
  m = ml_collections.ConfigDict()
  m.preset = preset  # a name from merr1_jax/models/presets.py; the fields below start from it
  for f in _MODEL_FIELDS:
    setattr(m, f, getattr(base, f))
  # M-RoPE sections (t, h, w) of the rotary frequencies for 3-D positions; () means plain 1-D RoPE.
  m.mrope_section = tuple(base.mrope_section or ())
  if embedded:
    # The embedded tokenizer is built from MER-Synth: vocab size and placeholder ids come from it (-1 = auto).
    m.vocab_size, m.video_token_id, m.audio_token_id = -1, -1, -1
    # Small enough that SFT + 400 RL steps fit the 10-minute budget on 2 CPU cores (docs/benchmarks/default_run.md).
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 96, 2, 4, 2, 24, 256
    m.video_dim = m.audio_dim = 32  # MER-Synth feature widths
    m.max_seq_len = 256  # MER-Synth prompt (<= 96) + the longest completion (40)
  # A local HF directory (safetensors) to start from, read offline; "" = random init (the embedded default).
  # For a real model it is also where the tokenizer is read from unless data.tokenizer_dir is set.
  m.hf_path = ""
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  choice = _parse_arg(arg)
  real = choice["model"] not in EMBEDDED_PRESETS
  c = ml_collections.ConfigDict()
  c.seed = 0  # drives init, data order and sampling; the acceptance check runs seeds 0, 1, 2
  c.workdir = ""  # set with --workdir; checkpoints, logs, plots and results go here
  c.resume = "auto"  # 'auto': continue from the workdir's latest checkpoint; 'force': even if the config
  #                    differs; 'never': refuse a workdir that holds checkpoints
  c.stages = ("sft", "rl")  # the recipe (method.md "Training recipe"); ("rl",) starts RL from hf_path

  c.model = _model(choice["model"])

  # ---------------------------------------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  c.data.name = choice["data"]  # 'mer_synth' (embedded, generated offline) | 'mer_features' (preprocessed)
  c.data.data_dir = ""  # TFDS data_dir; "" = WORKDIR/data
  c.data.records_dir = ""  # mer_features: the directory of records written by merr1_jax.data.preprocess
  # A local HF tokenizer directory; "" = model.hf_path for a real model, the MER-Synth tokenizer for the
  # embedded ones (validate refuses a real model or mer_features data with neither).
  c.data.tokenizer_dir = ""
  c.data.synth_train = 640  # MER-Synth sizes: small enough for the 10-minute CPU budget
  c.data.synth_validation = 64  # read only with data.eval_split='validation' (for tuning off the test split)
  c.data.synth_test = 128  # the held-out split behind the results table
  c.data.synth_noise = 1.0  # MER-Synth difficulty (docs/data.md)
  c.data.synth_version = 1  # 1: the original world; 2: corroboration, where the reasoning integrates (docs/data.md)
  c.data.on_bad_record = "raise"  # 'raise' | 'skip' (counted and reported)
  c.data.worker_count = 0  # Grain multiprocess prefetch workers; 0 = in-process (enough for small records)
  c.data.eval_split = "test"  # 'train' | 'validation' | 'test': the split behind results.md
  # The label space of the rewards, the calibration's category token sets and the own dataset's evaluation
  # (method.md "Label space"): 'wheels' maps words through the five MER-UniBench emotion wheels at wheel_level
  # (eval.format_version's tables); 'identity' uses the dataset's own closed label list (MER-Synth's 16 words).
  # MER-Synth keeps 'wheels' (docs/data.md, "Label space"): categories that group several words are what the
  # category-level calibration and its word-level ablation act on, and the results stay the field's metric.
  c.data.label_space = "wheels"
  c.data.wheel_level = 1  # 1 | 2 (the finer level-2 clusters)
  # Prompt length buckets: every prompt is left-padded to the smallest bucket that holds it, so jit compiles one
  # program per bucket. MER-Synth prompts (53-68 tokens with the fast prefix) all land in 96.
  c.data.prompt_buckets = (96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192)

  # ----------------------------------------------------------------------------------------------- sft
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 300  # cold-start SFT steps on demonstrations of both modes
  c.sft.batch_size = 32  # rows per step; each clip gives a slow and a fast demonstration: 7.5 epochs of 1,280
  c.sft.learning_rate = 3e-3  # tiny random model: a large rate (the 7B recipe uses ~1e-5)
  c.sft.warmup_steps = 20  # linear warmup: keeps the first updates of a random model from overshooting
  c.sft.micro_batches = 1  # gradient accumulation splits; raise it when a step does not fit in memory

  # ------------------------------------------------------------------------------------------------ rl
  c.rl = ml_collections.ConfigDict()
  c.rl.steps = 400  # 3,200 prompts x 8 rollouts; 3-5 minutes for the whole run on 2 idle CPU cores
  c.rl.prompts_per_step = 8  # P; the batch is P * (n_slow + n_fast) completions
  c.rl.n_slow = 4  # slow samples per prompt (method.md defaults 4 + 4)
  c.rl.n_fast = 4  # fast samples per prompt; a group G = n_slow + n_fast completions share one prompt
  c.rl.temperature = 1.0  # T (method.md; R1-Omni uses 1.0)
  c.rl.top_p = 1.0  # nucleus sampling; 1.0 = off, so rollouts sample the policy itself (as the ratio assumes)
  c.rl.max_new_tokens_slow = 40  # the precursor uses 1024 for real models; MER-Synth reasoning is short
  c.rl.max_new_tokens_fast = 12  # the fast answer: '<think></think><answer>...</answer>' only
  c.rl.beta = 0.04  # β, KL coefficient (precursor / R1-Omni); 0 skips the reference pass
  c.rl.beta_decay_steps = 0  # linear decay of beta to beta_final over these steps; 0 = constant
  c.rl.beta_final = 0.0  # β at the end of the decay (used only when beta_decay_steps > 0)
  c.rl.kl_estimator = "k3"  # 'k1' | 'k2' | 'k3' (method.md E4; k3 is unbiased and non-negative)
  c.rl.eps_low = 0.2  # ε_low, ε_high: PPO clip range [1 - eps_low, 1 + eps_high]
  c.rl.eps_high = 0.2  # symmetric by default (PPO / the precursor); DAPO-style clip-higher raises it
  c.rl.dual_clip = 0.0  # c > 1 enables dual-clip PPO; 0 = off
  c.rl.aggregation = "token_mean"  # 'token_mean' | 'seq_mean_token_mean' | 'seq_mean_token_sum_norm'
  c.rl.entropy_coef = 0.0  # c_ent, entropy bonus; 0 as in the precursor (temperature 1 keeps exploring)
  c.rl.learning_rate = 3e-4  # tiny model; 1e-3 made the KL spike past 2 (docs/benchmarks/default_run.md, tuning)
  c.rl.warmup_steps = 0  # the policy is warm after SFT; the first RL steps need no ramp
  c.rl.micro_batches = 1  # gradient accumulation splits of each update; must divide a mini-batch's prompts
  # PPO iterations (method.md E4, mu): passes over each step's rollouts, and optimizer updates per pass (verl's
  # ppo_epochs / ppo_mini_batch_size, TRL's num_iterations). With 1 x 1 the ratio is exactly 1, so eps_low,
  # eps_high and dual_clip cannot act; with more, the old log-probs come from a scoring pass at the rollout weights.
  c.rl.ppo_epochs = 1
  c.rl.mini_batches = 1  # must divide prompts_per_step (updates split whole groups)
  c.rl.disentangle = True  # DOD (method.md E2); False = the coupled R1-Omni baseline
  c.rl.scale = True  # divide by the group std; False = Dr.GRPO centring only
  c.rl.adv_eps = 1e-4  # eps in (x - mean) / (std + eps)
  c.rl.adv_ddof = 1  # unbiased std, as R1-Omni and TRL
  c.rl.group = "prompt"  # 'prompt': a group is all completions of a prompt (both modes); 'mode': per mode
  # Advantage weights (method.md E2). Per mode: fast is where recall comes from, slow where precision does.
  c.rl.w_rec_slow = 1.0  # w_rec[slow]
  c.rl.w_rec_fast = 1.0  # w_rec[fast]
  c.rl.w_prec_slow = 1.0  # w_prec[slow]
  c.rl.w_prec_fast = 1.0  # w_prec[fast]
  c.rl.w_f1 = 0.0  # w_f1 (both modes): the single F1 reward of the GRPO baseline (ablation=grpo_f1)
  c.rl.w_fmt = 0.1  # w_fmt: format matters only until the model has learned it
  c.rl.w_cal = 0.5  # w_cal (slow rows only)
  # 'one_sided' | 'contrastive_gain' | 'fast_prior_kl' | 'none' (method.md E3). one_sided is the form the paper's
  # body is reported to describe; contrastive_gain (the precursor's, the default until wave 3) pays for short
  # answers (docs/benchmarks/ablation.md "Ablation on MER-Synth v2: the one-sided calibration, 8 seeds").
  c.rl.calibration = "one_sided"
  # one_sided's confidence: 'first' (the first answer position) | 'max' (over the anchors) | 'emitted' (each said
  # word's own probability; word level as the paper may mean it)
  c.rl.cal_reading = "first"
  # The calibration objective's std floor in its group normalisation: a spread below it gives sub-unit advantages
  # (method.md E3 "Two defects fixed"); 0 = plain z-score.
  c.rl.cal_std_floor = 0.05
  c.rl.cal_tau = 1.0  # contrastive_gain: r_cal = tanh(gain / tau)
  c.rl.cal_alpha = 1.0  # fast_prior_kl: r_cal = -KL(q || p_slow), q ∝ p_fast exp(+alpha on GT, -alpha elsewhere)
  # SFCC variants (method.md E3 "Variants"): 'category' confidence (the log-mass of a category's words) or
  # 'word' (each label word its own category; needs a closed label list); with or without the precision side
  # (the term on the wrong categories); r_cal as its own normalised objective ('advantage'), folded into the
  # task rewards before normalisation ('reward'), or cal_mix of it there and the rest as its own ('mixed').
  c.rl.cal_level = "category"
  c.rl.cal_precision_side = True
  c.rl.cal_space = "advantage"
  c.rl.cal_mix = 0.5  # mixed: the share of w_cal in reward space
  # The variance-interference probe (method.md "Why disentangle"): every probe_every RL steps,
  # per-objective advantage and gradient statistics on a fixed probe batch (probe/* metrics); 0 = off.
  c.rl.probe_every = 0
  c.rl.num_anchors = 6  # answer anchors read per completion
  c.rl.max_nonfinite_steps = 3  # stop with a diagnostic after this many skipped (NaN/Inf) steps
  c.rl.freeze = ()  # regexes over parameter paths that RL leaves untouched, e.g. (r"video_proj/",)

  # ---------------------------------------------------------------------------------------------- lora
  # LoRA (docs/lora.md), on when model.lora_rank > 0. A LoRA stage trains the adapters (and the leaves
  # train_full names) with the base frozen; its KL reference is the base with the adapters off (no copy); its
  # checkpoints hold the trainable leaves and the base's fingerprint. Every stage starts from the previous one's
  # policy with the adapters merged in and fresh (B = 0), so the RL reference is the SFT policy as in method.md.
  c.lora = ml_collections.ConfigDict()
  c.lora.stages = ("rl",)  # the stages that train adapters; the others fine-tune in full (adapters off)
  c.lora.train_full = ""  # regex of base leaves a LoRA stage trains in full too, e.g. r"(video|audio)_proj/"

  # ----------------------------------------------------------------------------------------- optimizer
  c.optim = ml_collections.ConfigDict()  # AdamW for both stages (learning rates and warmup per stage above)
  c.optim.schedule = "constant"  # 'constant' | 'cosine' (after the linear warmup)
  c.optim.b1 = 0.9  # β1, first-moment decay (the AdamW / precursor default)
  c.optim.b2 = 0.999  # β2, second-moment decay (the AdamW / precursor default)
  c.optim.weight_decay = 0.0  # decoupled; 0 as in the precursor: RL stays close to the reference anyway
  c.optim.clip_norm = 1.0  # global gradient-norm clip (precursor / TRL); 0 = off

  # ---------------------------------------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  mesh_shape, device_gb = _MESHES[choice["mesh"]]
  c.mesh.shape = mesh_shape  # (data, fsdp, tensor); one -1 takes the remaining devices (presets: _MESHES)
  # Logical parameter axis -> mesh axis (docs/scaling.md): embed over fsdp (ZeRO-3), heads, MLP and vocabulary
  # over tensor (Megatron); names not listed are replicated.
  c.mesh.axis_rules = ml_collections.ConfigDict(
      {"embed": "fsdp", "vocab": "tensor", "mlp": "tensor", "q_heads": "tensor", "kv_heads": "tensor"})
  c.mesh.coordinator = ""  # multi-host: host:port of process 0 ("" = auto-detect TPU pods / SLURM)
  # GB of memory per device; validate refuses a mesh whose train state needs more than 75% of it. 0 = ask the
  # runtime (GPU / TPU report it; CPU does not, and the check is skipped).
  c.mesh.device_memory_gb = device_gb

  # ---------------------------------------------------------------------------------------- checkpoint
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 20  # steps between saves, per stage (and always the last step and on SIGTERM)
  c.checkpoint.keep = 2  # checkpoints kept per stage: the latest plus one in case it is damaged
  c.checkpoint.async_save = True  # write in the background; the next step starts once arrays are copied
  c.checkpoint.export_hf = True  # write the final policy as HF safetensors to WORKDIR/export
  c.checkpoint.export_dtype = "bfloat16"  # 'bfloat16' (serving) | 'float16' | 'float32' (bit-exact copies)

  # ------------------------------------------------------------------------------------------- logging
  c.log = ml_collections.ConfigDict()
  c.log.every = 1  # JSONL / TensorBoard cadence in steps
  c.log.tensorboard = True  # event files in WORKDIR/tb (tensorboardX; no TensorFlow needed)
  c.log.progress = True  # tqdm bar with ETA
  c.log.plots = True  # PNG training curves at the end
  # Per-device peaks for throughput/update_mfu and throughput/rollout_roofline_frac (merr1_jax/infra/throughput.py):
  # 0 = the device's datasheet figures where known (GPUs, TPUs); a CPU has none (benchmarks/bounds.py measures them).
  c.log.peak_flops = 0.0  # FLOP/s
  c.log.peak_bandwidth = 0.0  # bytes/s

  # ---------------------------------------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # RL steps between evaluations during training (0 = only after each stage)
  c.eval.batch_size = 32  # prompts per generation batch; must divide over the mesh's batch shards
  c.eval.max_new_tokens_slow = 40  # like rl.max_new_tokens_*: evaluation decodes greedily to the same limits
  c.eval.max_new_tokens_fast = 12  # the fast answer alone
  # Emotion-wheel format table (metrics.md §1): '2025' (AffectGPT / MER2025's format.csv) reproduces the
  # published MER-UniBench numbers; '2026' (the MER2026 table) fixes 17 antonym and base-form entries.
  c.eval.format_version = "2025"

  if choice["ablation"] is not None:
    for key, value in (_ABLATION_LAYOUT | _ABLATIONS[choice["ablation"]]).items():
      c.rl[key] = value

  if real:
    # Real-model recipe (precursor values): bf16, small learning rates, long completions.
    c.sft.learning_rate, c.rl.learning_rate = 1e-5, 2e-6
    c.sft.batch_size, c.rl.prompts_per_step = 64, 8
    c.rl.max_new_tokens_slow, c.rl.max_new_tokens_fast = 1024, 64
    c.eval.max_new_tokens_slow, c.eval.max_new_tokens_fast = 1024, 64
    # Updates split whole groups: each device takes its prompts' groups in one pass (docs/scaling.md,
    # "Prefix grouping").
    c.rl.micro_batches = 1
  if choice["mesh"] == "v4_32":
    c.rl.prompts_per_step = 16  # the prompts must divide over the 16 batch shards (data x fsdp)
  if choice["mesh"] == "gpu1":  # one device holds every row: docs/scaling.md "Memory plan with LoRA"
    c.rl.prompts_per_step, c.rl.micro_batches = 4, 4  # one prompt group per update micro-batch
    c.sft.micro_batches = 8
  if choice["mesh"] == "v5e8":  # 16 GB chips: one prompt per chip, 512-token completions (docs/scaling.md)
    c.rl.max_new_tokens_slow = c.eval.max_new_tokens_slow = 512
    c.sft.micro_batches = 8
  return c
