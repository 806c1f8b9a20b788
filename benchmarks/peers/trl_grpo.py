"""TRL's side of the peer comparison: a spec.py workload's GRPO step with trl.GRPOTrainer (CPU, float32).

Runs in benchmarks/peers/.venvs/trl (setup.sh): trl 1.16.0, torch 2.13.0 CPU. Loads the prepare.py checkpoint
with transformers (Qwen2ForCausalLM, SDPA attention) for both the policy and the reference model, and the same
tokenizer.json. GRPOConfig: 32 completions per step = 4 prompts x num_generations 8, gradient accumulation 1,
steps_per_generation 1 and num_iterations 1 (so TRL skips the old-log-prob pass, as we do), beta 0.04 (TRL's KL
is k3), loss_type 'dapo' (token mean over the batch, our token_mean), scale_rewards 'group', max_grad_norm 1.0,
AdamW lr 1e-6, max_completion_length = min_new_tokens (generation_kwargs) = the workload's peer_new_tokens, so
EOS cannot end a row early and every row decodes exactly that many tokens. TRL's other defaults stay as they are
(gradient_checkpointing among them, on by default in GRPOConfig).

Workloads (--workload): 'peer', 4 prompts of 128 tokens x 8 rows of 64 new tokens. 'mer', 4 prompts of 1024
text tokens (TRL takes no video/audio features: our side's 768 feature rows are text here) x 8 rows of 72 new
tokens. GRPOTrainer decodes one length per batch, so the mer workload's 4 slow rows of 128 + 4 fast rows of 16
per prompt become 8 rows of their mean, 72: the same 576 generated tokens per prompt, one generate call and one
group of 8 per prompt as in ours, in 72 decode steps where ours runs 128 + 16 (two rollouts), and update
sequences of 1024 + 72 where padding every row to the slow 128 would give 1024 + 128.

Timing: the trainer's own loop runs warm-up + timed steps. The step time is spec.StepClock's wall clock from
one optimizer step's end to the next (an on_step_end callback; the clock starts right before trainer.train()),
the same measurement as ours and Tunix's. The instance's `_generate_and_score_completions` (generation +
reference log-probs + rewards + advantages) and `_generate_single_turn` (transformers generate) are wrapped
with timers. Update = step - generate-and-score: the forward/backward, the optimizer step and the trainer
loop's own work between steps.

  .venvs/trl/bin/python benchmarks/peers/trl_grpo.py [--workload peer|mer] [--warmup 1] [--steps 3] [--out X]
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec  # noqa: E402


def _timed(clock: spec.StepClock, name: str, fn):
  @functools.wraps(fn)
  def wrapper(*a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    clock.add(name, time.perf_counter() - t)
    return out
  return wrapper


def main(argv=None) -> dict:
  args, wl = spec.parse(__doc__, argv)
  import datasets
  import torch
  import transformers
  import trl

  prompts = spec.load_prompts(wl, args.prompts)
  tok = transformers.AutoTokenizer.from_pretrained(args.ckpt, local_files_only=True)
  spec.check_prompt_ids(tok(prompts["texts"], add_special_tokens=False)["input_ids"], prompts, "trl")
  n_steps = args.warmup + args.steps
  # One row per prompt and step: TRL's sampler draws 4 distinct prompts per step and repeats each G times.
  data = datasets.Dataset.from_dict({"prompt": prompts["texts"] * n_steps})

  clock = spec.StepClock()
  tokens = []

  def reward(completions, **_):
    return [spec.reward(c) for c in completions]

  class Clock(transformers.TrainerCallback):
    def on_step_end(self, *_, **__):
      clock.lap(gen_tokens=tokens[-1] if tokens else float("nan"))

  torch.manual_seed(spec.SEED)
  with tempfile.TemporaryDirectory() as out_dir:
    cfg = trl.GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=spec.SEED,
        per_device_train_batch_size=wl.rows, num_generations=wl.group,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=wl.peer_new_tokens, generation_kwargs={"min_new_tokens": wl.peer_new_tokens},
        temperature=spec.TEMPERATURE, top_p=1.0, top_k=0, beta=spec.BETA, epsilon=spec.EPSILON,
        loss_type="dapo", scale_rewards="group", learning_rate=spec.LEARNING_RATE, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_steps=n_steps, logging_steps=10_000,
        save_strategy="no", report_to="none", disable_dropout=True, shuffle_dataset=False,
        dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32})
    trainer = trl.GRPOTrainer(model=args.ckpt, reward_funcs=reward, args=cfg, train_dataset=data,
                              processing_class=tok, callbacks=[Clock()])
    trainer._generate_and_score_completions = _timed(clock, "score_total_s", trainer._generate_and_score_completions)
    gen = trainer._generate_single_turn

    def generate(prompt_ids, *a, **kw):
      lens = sorted({len(p) for p in prompt_ids})
      if lens != [wl.prompt_len]:
        raise ValueError(f"trl: generating from prompts of {lens} tokens, expected {wl.prompt_len}")
      t = time.perf_counter()
      completion_ids, logprobs = gen(prompt_ids, *a, **kw)
      clock.add("gen_s", time.perf_counter() - t)
      tokens.append(float(sum(len(c) for c in completion_ids)))  # after TRL's cut at the first EOS
      return completion_ids, logprobs

    trainer._generate_single_turn = generate
    clock.begin()
    trainer.train()
  for s in clock.steps:
    s["score_s"] = s.pop("score_total_s") - s["gen_s"]
    s["update_s"] = s["step_s"] - s["gen_s"] - s["score_s"]
  spec.check_gen_tokens(clock.steps, wl, "trl")
  return spec.emit("trl", clock.steps, args.warmup, args.out, device="cpu", threads=torch.get_num_threads(),
                   versions={"trl": trl.__version__, "torch": torch.__version__,
                             "transformers": transformers.__version__},
                   attn=trainer.model.config._attn_implementation, workload=wl.name,
                   new_tokens_per_row=wl.peer_new_tokens,
                   gradient_checkpointing=bool(cfg.gradient_checkpointing))


if __name__ == "__main__":
  main()
