#!/usr/bin/env bash
# One prepared GPU check: our RL step breakdown (benchmarks/rl_step.py) for qwen2_0p5b and the 3B-size
# Qwen2.5-Omni thinker preset, bf16, one GPU, random init. Reports per phase times, update-step MFU (model FLOPs /
# the card's peak dense bf16 FLOP/s), generation tokens/s against the HBM-bandwidth bound, and peak device memory;
# every row carries the card's name (jax device_kind), and nvidia-smi's line is printed first.
#
# The GPU image lacks grain, array-record and ml-collections: carry them as wheels in .whl/ (see the device
# README: pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION), e.g.
#   grain==0.2.18 array-record==<pinned> ml-collections==<pinned>
# and run, from the repository root on the GPU machine:
#   bash benchmarks/gpu.sh            (writes $OUT/rl_step_gpu.{txt,json} when OUT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
# Work per step: 8 prompts x G 8 = 64 rows, prompt 256, 128 new tokens; 1 warm-up + 3 timed steps.
python3 benchmarks/rl_step.py --presets qwen2_0p5b,qwen2_5_omni_3b_thinker --variants shared,repeated \
  --dtype bfloat16 --prompts 8 --prompt_len 256 --group 8 --new_tokens 128 --warmup 1 --repeats 3 \
  --json "$out/rl_step_gpu.json" 2>&1 | tee "$out/rl_step_gpu.txt"
