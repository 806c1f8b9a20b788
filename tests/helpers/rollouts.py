"""Hand-written host rollouts for the experience-step tests: given completion texts, the Rollout the sampler would
have returned."""

import numpy as np

from merr1_jax import rollout


def hand_rollout(tok, ids, inputs, texts, mode, n):
  """A host Rollout of given completion texts (EOS after slow answers), as the sampler would return them."""
  prompt = rollout.prepare_prompts(inputs, mode=mode, vocab_size=tok.vocab_size, fast_prefix_ids=ids.fast_prefix,
                                   pad_id=ids.pad)
  seqs = [tok.encode(t) + ([tok.eos_id] if mode == "slow" else []) for t in texts]
  t = max(map(len, seqs))
  comp = np.full((len(seqs), t), ids.pad, np.int32)
  for i, q in enumerate(seqs):
    comp[i, :len(q)] = q
  length = np.asarray([len(q) for q in seqs], np.int32)
  reason = np.full(len(seqs), rollout.StopReason.EOS if mode == "slow" else rollout.StopReason.STOP, np.int32)
  zeros = np.zeros(comp.shape, np.float32)
  return rollout.Rollout(prompt=prompt, completion=comp, completion_mask=np.arange(t)[None] < length[:, None],
                         logp=zeros, logp_sampled=zeros, stop_reason=reason, length=length,
                         prompt_length=np.repeat(prompt.mask.sum(1), n), steps=np.asarray(t), num_samples=n, mode=mode)
