"""Random weights for tiny transformers reference models built in the parity tests."""


def randomise(module, std=0.2, seed=0):
  """Every parameter drawn from N(0, std^2), in eval mode. HF's init gives (near-)zero biases and unit norms,
  which would hide a wrong bias or norm mapping; random values make each weight matter in the logits."""
  import torch
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0.0, std)
  return module.eval()
