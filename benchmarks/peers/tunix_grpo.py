"""Tunix's side of the peer comparison: a spec.py workload's GRPO step with tunix 0.1.7 GRPOLearner (CPU, float32).

Runs in benchmarks/peers/.venvs/tunix (setup.sh): google-tunix 0.1.7 and the jax/flax it resolves to. Policy and
reference are tunix.models.qwen2 models loaded from the prepare.py safetensors (params.create_model_from_safe_tensors)
on a 1x1 (fsdp, tp) mesh; the tokenizer is the same tokenizer.json through transformers. GRPOConfig:
num_generations 8, num_iterations 1 (no old-log-prob pass), beta 0.04, kl_loss_mode 'low_var_kl' (the k3
estimator), epsilon 0.2, loss_agg_mode 'token-mean'. The vanilla rollout engine samples the workload's
peer_new_tokens at temperature 1.0 with eos_tokens=[-1], an id no row can emit, so every row decodes exactly that
many tokens. AdamW lr 1e-6 behind global-norm clipping at 1.0; one mini-batch of all 32 rows = one update per step.
Where the workload names `tunix_micro_prompts` (mer: 1, as all 32 rows of 1096 positions in one update ask for a
44 GB buffer), that mini-batch is trained in micro-batches of that many prompts with Tunix's gradient accumulation
(train_micro_batch_size): the same rows, the same single optimizer update, less memory. Generation and the
reference pass still take all 32 rows at once (rollout_micro_batch_size = compute_logps_micro_batch_size = all
prompts), as on the other two sides.

Workloads (--workload): 'peer', 4 prompts of 128 tokens x 8 rows of 64 new tokens. 'mer', 4 prompts of 1024
text tokens (Tunix's Qwen2 takes no video/audio features: our side's 768 feature rows are text here) x 8 rows of
72 new tokens. The rollout config has one max_tokens_to_generate per batch, so the mer workload's 4 slow rows of
128 + 4 fast rows of 16 per prompt become 8 rows of their mean, 72: the same 576 generated tokens per prompt, one
generate call and one group of 8 per prompt as in ours, in 72 decode steps where ours runs 128 + 16, and update
sequences of 1024 + 72 where padding every row to the slow 128 would give 1024 + 128.

Timing: the step time is spec.StepClock's wall clock from the end of one `update_actor` to the end of the next
(the clock starts right before learner.train()), the same measurement as ours and TRL's, not a sum of phases.
The phases come from wrappers on the learner's `_generate_and_compute_advantage` (generation + reference
log-probs + rewards + advantages) and on the cluster's `generate` and `update_actor`; each blocks on its outputs
(update_actor on the actor's parameters), so JAX's asynchronous dispatch cannot move work from one phase into
the next. With micro-batches `update_actor` runs once per micro-batch: its times add up, and the step ends when
the trainer's optimizer-update count moves (`actor_trainer.train_steps`), not at every call.

  .venvs/tunix/bin/python benchmarks/peers/tunix_grpo.py [--workload peer|mer] [--warmup 1] [--steps 3] [--out X]
      [--micro_prompts N]  (overrides the workload's tunix_micro_prompts)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec  # noqa: E402


def end_update_call(clock: spec.StepClock, updates_made: int) -> None:
  """After one `update_actor` call: the step ends with the call that made the optimizer update (with
  micro-batches, the last of them; the others only accumulate gradients)."""
  if updates_made not in (0, 1):
    raise RuntimeError(f"tunix: one update_actor call made {updates_made} optimizer updates, expected 0 or 1")
  if updates_made:
    clock.lap()


def check_whole_batch(who: str, rows: int, micro_batch_size: int | None, want_rows: int) -> None:
  """A generation or reference call must take the step's `want_rows` rows at once, as ours and TRL's do."""
  if rows != want_rows or (micro_batch_size is not None and micro_batch_size < want_rows):
    raise RuntimeError(f"tunix: {who} got {rows} rows in micro-batches of {micro_batch_size}; expected all "
                       f"{want_rows} rows in one batch")


def finish_steps(steps: list[dict], calls_per_step: int) -> None:
  """Checks each step saw one scoring call (with one generation and one reference call inside) and
  `calls_per_step` update calls, then splits the scoring time into generation and the rest. A mismatch means the
  wrappers no longer follow Tunix's call pattern."""
  for i, s in enumerate(steps):
    calls = {k: s.get(f"{k}_calls", 0.0) for k in ("score", "gen", "ref", "update")}
    want = {"score": 1, "gen": 1, "ref": 1, "update": calls_per_step}
    if calls != want:
      raise RuntimeError(f"tunix: step {i} made calls {calls}, expected {want}: the timing wrappers no longer "
                         "match Tunix's call pattern")
    s["score_s"] = s.pop("score_total_s") - s["gen_s"]
    s["phases_s"] = s["gen_s"] + s["score_s"] + s["update_s"]  # kept for reference; step_s is the wall clock


def main(argv=None) -> dict:
  args, wl = spec.parse(__doc__, argv, extra=lambda ap: ap.add_argument(
      "--micro_prompts", type=int, default=None,
      help="prompts per update micro-batch (default: the workload's tunix_micro_prompts)"))
  if args.micro_prompts is not None:
    wl = dataclasses.replace(wl, tunix_micro_prompts=args.micro_prompts)  # validated there
  micro = wl.tunix_micro_prompts or wl.num_prompts
  import jax
  import numpy as np
  import optax
  import transformers
  from flax import nnx
  from tunix.models.qwen2 import model as qwen2_model
  from tunix.models.qwen2 import params as qwen2_params
  from tunix.rl import rl_cluster as rl_cluster_lib
  from tunix.rl.grpo import grpo_learner
  from tunix.rl.rollout import base_rollout

  prompts = spec.load_prompts(wl, args.prompts)
  tok = transformers.AutoTokenizer.from_pretrained(args.ckpt, local_files_only=True)
  spec.check_prompt_ids(tok(prompts["texts"], add_special_tokens=False)["input_ids"], prompts, "tunix")
  with open(os.path.join(args.ckpt, "config.json")) as f:
    hf = json.load(f)
  cfg = qwen2_model.ModelConfig(
      num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], embed_dim=hf["hidden_size"],
      hidden_dim=hf["intermediate_size"], num_heads=hf["num_attention_heads"], head_dim=hf["head_dim"],
      num_kv_heads=hf["num_key_value_heads"], rope_theta=int(hf["rope_theta"]), norm_eps=hf["rms_norm_eps"],
      use_tied_embedding=hf["tie_word_embeddings"])
  mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  actor = qwen2_params.create_model_from_safe_tensors(args.ckpt, cfg, mesh)
  reference = qwen2_params.create_model_from_safe_tensors(args.ckpt, cfg, mesh)

  n_steps = args.warmup + args.steps
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(spec.LEARNING_RATE, weight_decay=0.0))
  clock = spec.StepClock()
  with tempfile.TemporaryDirectory():
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=tx, eval_every_n_steps=10**9, max_steps=n_steps,
        mini_batch_size=wl.num_prompts, train_micro_batch_size=micro,
        rollout_micro_batch_size=wl.num_prompts, compute_logps_micro_batch_size=wl.num_prompts,
        checkpoint_root_directory=None, metrics_logging_options=None, pbar_description=None)
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=wl.peer_new_tokens, max_prompt_length=wl.prompt_len,
        kv_cache_size=wl.prompt_len + wl.peer_new_tokens + 8, temperature=spec.TEMPERATURE, top_p=1.0, top_k=None,
        eos_tokens=[-1], seed=spec.SEED)  # an int: the sampler makes a fresh key per call (a key array is donated)
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference, tokenizer=tok,
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={rl_cluster_lib.Role.ACTOR: mesh, rl_cluster_lib.Role.REFERENCE: mesh,
                          rl_cluster_lib.Role.ROLLOUT: mesh},
            rollout_engine="vanilla", offload_to_cpu=False, training_config=training, rollout_config=rollout))
    algo = grpo_learner.GRPOConfig(num_generations=wl.group, num_iterations=1, beta=spec.BETA,
                                   kl_loss_mode="low_var_kl", epsilon=spec.EPSILON, loss_agg_mode="token-mean")

    def reward(prompts, completions, **_):
      return [spec.reward(c) for c in completions]

    learner = grpo_learner.GRPOLearner(rl_cluster=cluster, reward_fns=reward, algo_config=algo)

    gen = cluster.generate

    @functools.wraps(gen)
    def generate(*a, **kw):
      t = time.perf_counter()
      out = jax.block_until_ready(gen(*a, **kw))
      clock.add("gen_s", time.perf_counter() - t)
      clock.add("gen_calls", 1.0)
      check_whole_batch("generate", len(out.tokens), kw.get("micro_batch_size"), wl.rows)
      clock.add("gen_tokens", float(sum(len(x) for x in out.tokens)))
      lens = sorted({int((row != cluster.rollout.pad_id()).sum()) for row in out.left_padded_prompt_tokens})
      if lens != [wl.prompt_len]:
        raise ValueError(f"tunix: generated from prompts of {lens} tokens, expected {wl.prompt_len}")
      return out

    cluster.generate = generate
    ref = cluster.get_ref_per_token_logps

    @functools.wraps(ref)
    def ref_logps(*a, **kw):
      clock.add("ref_calls", 1.0)
      check_whole_batch("the reference pass", int(kw["prompt_tokens"].shape[0]), kw.get("micro_batch_size"), wl.rows)
      return ref(*a, **kw)

    cluster.get_ref_per_token_logps = ref_logps
    adv = learner._generate_and_compute_advantage

    @functools.wraps(adv)
    def generate_and_score(*a, **kw):
      t = time.perf_counter()
      out = jax.block_until_ready(adv(*a, **kw))
      clock.add("score_total_s", time.perf_counter() - t)
      clock.add("score_calls", 1.0)
      return out

    learner._generate_and_compute_advantage = generate_and_score
    update = cluster.update_actor

    @functools.wraps(update)
    def update_actor(*a, **kw):
      t = time.perf_counter()
      updates = cluster.actor_trainer.train_steps
      out = update(*a, **kw)
      jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
      clock.add("update_s", time.perf_counter() - t)
      clock.add("update_calls", 1.0)
      end_update_call(clock, cluster.actor_trainer.train_steps - updates)
      return out

    cluster.update_actor = update_actor
    # One numpy leaf per batch: the learner tree-maps np.repeat over it (a list would be split into leaves).
    data = [{"prompts": np.asarray(prompts["texts"])} for _ in range(n_steps)]
    clock.begin()
    learner.train(data)
  if clock.pending():
    raise RuntimeError(f"tunix: calls after the last optimizer update were not timed: {clock.pending()}")
  finish_steps(clock.steps, wl.num_prompts // micro)
  import tunix  # noqa: F401
  from importlib import metadata
  spec.check_gen_tokens(clock.steps, wl, "tunix")
  return spec.emit("tunix", clock.steps, args.warmup, args.out, device=jax.devices()[0].device_kind,
                   threads=os.cpu_count(),
                   versions={k: metadata.version(k) for k in ("google-tunix", "jax", "flax", "transformers")},
                   workload=wl.name, new_tokens_per_row=wl.peer_new_tokens, micro_prompts=micro)


if __name__ == "__main__":
  main()
