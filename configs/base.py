"""The MER-R1 config: `get_config(arg)` returns an ml_collections ConfigDict with every field documented.

The default is the embedded CPU run: the tiny model on MER-Synth, cold-start SFT, MER-R1 RL, evaluation in both
modes, in under 10 minutes on 2 CPU cores. Presets are chosen with `arg`, a comma list of key=value:

    python -m merr1_jax.train --config configs/base.py --workdir W
    python -m merr1_jax.train --config configs/base.py:model=qwen2_5_omni_7b_thinker,data=mer_features \\
        --config.data.records_dir=/data/records --workdir W

and any field can be overridden on the command line (`--config.rl.beta=0.0`). ConfigDicts reject unknown keys,
so a typo fails loudly. `merr1_jax.config.validate(config)` checks the whole config before anything is built.

Symbols refer to docs/method.md. "Precursor" means the first author's earlier public GRPO trainer.
"""

import ml_collections

from merr1_jax.models import presets

# Model fields the command line can override (the preset fills them; see merr1_jax/models/config.py).
_MODEL_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                 "rope_theta", "rms_eps", "tie_embeddings", "qkv_bias", "param_dtype", "compute_dtype",
                 "scan_layers", "remat", "video_dim", "audio_dim", "projector", "video_token_id", "audio_token_id",
                 "max_seq_len", "init_std")


def _parse_arg(arg):
  out = {"model": "tiny", "data": "mer_synth"}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ValueError(f"config arg {item!r}: expected model=PRESET or data=NAME, comma separated")
    out[key] = value
  return out


def _model(preset: str) -> ml_collections.ConfigDict:
  if preset not in presets.names():
    raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(presets.names())}")
  embedded = preset in ("tiny", "small_20m")
  base = presets.get(preset, **({"vocab_size": 1024} if embedded else {}))
  m = ml_collections.ConfigDict()
  m.preset = preset  # a name from merr1_jax/models/presets.py
  for f in _MODEL_FIELDS:
    setattr(m, f, getattr(base, f))
  # M-RoPE sections (t, h, w) for 3-D positions; () means plain 1-D RoPE.
  m.mrope_section = tuple(base.mrope_section or ())
  if embedded:
    # The embedded tokenizer is built from MER-Synth: vocab size and placeholder ids come from it (-1 = auto).
    m.vocab_size, m.video_token_id, m.audio_token_id = -1, -1, -1
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 96, 2, 4, 2, 24, 256
    m.video_dim = m.audio_dim = 32  # MER-Synth feature widths
    m.max_seq_len = 256
  m.hf_path = ""  # a local HF directory (safetensors) to start from; "" = random init (embedded default)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  choice = _parse_arg(arg)
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
  c.data.tokenizer_dir = ""  # a local HF tokenizer directory (real models); "" = build the MER-Synth one
  c.data.synth_train = 640  # MER-Synth sizes: small enough for the 10-minute CPU budget
  c.data.synth_validation = 64
  c.data.synth_test = 128
  c.data.synth_noise = 1.0  # MER-Synth difficulty (docs/data.md)
  c.data.on_bad_record = "raise"  # 'raise' | 'skip' (counted and reported)
  c.data.worker_count = 0  # Grain multiprocess prefetch workers
  c.data.eval_split = "test"
  # Prompt length buckets: every prompt is left-padded to the smallest bucket that holds it, so jit compiles one
  # program per bucket. MER-Synth prompts (53-68 tokens with the fast prefix) all land in 96.
  c.data.prompt_buckets = (96, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192)

  # ----------------------------------------------------------------------------------------------- sft
  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 300  # cold-start SFT steps on demonstrations of both modes
  c.sft.batch_size = 32
  c.sft.learning_rate = 3e-3  # tiny random model: a large rate (the 7B recipe uses ~1e-5)
  c.sft.warmup_steps = 20
  c.sft.micro_batches = 1

  # ------------------------------------------------------------------------------------------------ rl
  c.rl = ml_collections.ConfigDict()
  c.rl.steps = 400  # 3,200 prompts x 8 rollouts; about 5 minutes for the whole run on 2 idle CPU cores
  c.rl.prompts_per_step = 8  # P; the batch is P * (n_slow + n_fast) completions
  c.rl.n_slow = 4  # slow samples per prompt (method.md defaults 4 + 4)
  c.rl.n_fast = 4  # fast samples per prompt
  c.rl.temperature = 1.0  # T (method.md; R1-Omni uses 1.0)
  c.rl.top_p = 1.0
  c.rl.max_new_tokens_slow = 40  # the precursor uses 1024 for real models; MER-Synth reasoning is short
  c.rl.max_new_tokens_fast = 12
  c.rl.beta = 0.04  # KL coefficient (precursor / R1-Omni); 0 skips the reference pass
  c.rl.beta_decay_steps = 0  # linear decay of beta to beta_final over these steps; 0 = constant
  c.rl.beta_final = 0.0
  c.rl.kl_estimator = "k3"  # 'k1' | 'k2' | 'k3'
  c.rl.eps_low = 0.2  # PPO clip range [1 - eps_low, 1 + eps_high]
  c.rl.eps_high = 0.2
  c.rl.dual_clip = 0.0  # > 1 enables dual-clip PPO; 0 = off
  c.rl.aggregation = "token_mean"  # 'token_mean' | 'seq_mean_token_mean' | 'seq_mean_token_sum_norm'
  c.rl.entropy_coef = 0.0
  c.rl.learning_rate = 3e-4  # tiny model; 1e-3 made the KL spike past 2 (docs/benchmarks.md, tuning)
  c.rl.warmup_steps = 0
  c.rl.micro_batches = 1
  c.rl.disentangle = True  # DOD (method.md E2); False = the coupled R1-Omni baseline
  c.rl.scale = True  # divide by the group std; False = Dr.GRPO centring only
  c.rl.adv_eps = 1e-4  # eps in (x - mean) / (std + eps)
  c.rl.adv_ddof = 1  # unbiased std, as R1-Omni and TRL
  c.rl.group = "prompt"  # 'prompt': a group is all completions of a prompt (both modes); 'mode': per mode
  # Advantage weights (method.md E2). Per mode: fast is where recall comes from, slow where precision does.
  c.rl.w_rec_slow = 1.0
  c.rl.w_rec_fast = 1.0
  c.rl.w_prec_slow = 1.0
  c.rl.w_prec_fast = 1.0
  c.rl.w_fmt = 0.1
  c.rl.w_cal = 0.5
  c.rl.calibration = "contrastive_gain"  # 'contrastive_gain' | 'none' (method.md E3)
  c.rl.cal_tau = 1.0  # r_cal = tanh(gain / tau)
  c.rl.num_anchors = 6  # answer anchors read per completion
  c.rl.max_nonfinite_steps = 3  # stop with a diagnostic after this many skipped (NaN/Inf) steps
  c.rl.freeze = ()  # regexes over parameter paths that RL leaves untouched, e.g. (r"video_proj/",)

  # ----------------------------------------------------------------------------------------- optimizer
  c.optim = ml_collections.ConfigDict()
  c.optim.schedule = "constant"  # 'constant' | 'cosine' (after the linear warmup)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0

  # ---------------------------------------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 takes the remaining devices
  c.mesh.axis_rules = ml_collections.ConfigDict(
      {"embed": "fsdp", "vocab": "tensor", "mlp": "tensor", "q_heads": "tensor", "kv_heads": "tensor"})
  c.mesh.coordinator = ""  # multi-host: host:port of process 0 ("" = auto-detect TPU pods / SLURM)

  # ---------------------------------------------------------------------------------------- checkpoint
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 20  # steps between saves, per stage
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  c.checkpoint.export_hf = True  # write the final policy as HF safetensors to WORKDIR/export
  c.checkpoint.export_dtype = "bfloat16"  # 'bfloat16' (serving) | 'float32' (bit-exact copies)

  # ------------------------------------------------------------------------------------------- logging
  c.log = ml_collections.ConfigDict()
  c.log.every = 1  # JSONL / TensorBoard cadence in steps
  c.log.tensorboard = True
  c.log.progress = True  # tqdm bar with ETA
  c.log.plots = True  # PNG training curves at the end

  # ---------------------------------------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # RL steps between evaluations during training (0 = only after each stage)
  c.eval.batch_size = 32
  c.eval.max_new_tokens_slow = 40
  c.eval.max_new_tokens_fast = 12
  c.eval.format_version = "2025"  # emotion-wheel tables (metrics.md §1; 2025 reproduces MER-UniBench)

  if choice["data"] == "mer_features":
    c.data.tokenizer_dir = "/path/to/hf/tokenizer"
  if choice["model"] not in ("tiny", "small_20m"):
    # Real-model recipe (precursor values): bf16, small learning rates, long completions.
    c.sft.learning_rate, c.rl.learning_rate = 1e-5, 2e-6
    c.sft.batch_size, c.rl.prompts_per_step = 64, 8
    c.rl.max_new_tokens_slow, c.rl.max_new_tokens_fast = 1024, 64
    c.eval.max_new_tokens_slow, c.eval.max_new_tokens_fast = 1024, 64
    c.rl.micro_batches = 8
  return c
