#!/usr/bin/env bash
# One prepared GPU check: our RL step breakdown (benchmarks/rl_step.py) for qwen2_0p5b and the 3B-size
# Qwen2.5-Omni thinker preset, bf16, one GPU, random init. Reports per phase times (generation split into
# prefill and decode), update-step MFU (the grouped update's FLOPs / the card's peak dense bf16 FLOP/s), decode-only
# tokens/s against the HBM-bandwidth bound, and peak device memory; every row carries the card's name (jax
# device_kind), and nvidia-smi's line is printed first. The shared variant runs once more with cuDNN's fused
# attention (--attention cudnn) beside the reference einsums; its loss must match the reference row's.
#
# Each (preset, variant) runs in its own process, so that "peak device memory" (jax memory_stats'
# peak_bytes_in_use, a process-wide high-water mark that is never reset) is that variant's own, with no other
# variant's train state alive. The per-run JSON files are merged into $OUT/rl_step_gpu.json at the end.
#
# What the image lacks is installed from wheels carried in .whl/ (git-ignored; no network on the GPU machine). The
# CUDA 13 image has Python 3.12, its own jax (0.11.x) and flax, and no grain, array-record or ml-collections
# (../shared/docs/ecosystem.md); a flax <= 0.12.8 there cannot run on jax >= 0.11.1. Fetch the cp312 builds here,
# in the repository root, at the versions of requirements/lock-py3.12.txt (the tested newest set):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_28_x86_64 -d .whl grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 \
#     flax==0.12.12
# (grain and array-record are cp312 manylinux wheels, ml-collections and flax py3-none-any wheels; add
# `--platform manylinux_2_N_x86_64` for another N if pip finds no match). Only what the image lacks is installed
# (flax only when missing or in a broken pair with the image's jax; merr1_jax/_versions.py decides), into
# /tmp/site, ahead of the image's own packages. Then, on the GPU machine, from the repository root with .whl
# carried:
#   bash benchmarks/gpu.sh   (writes $OUT/rl_step_gpu.{txt,json}, OUT default /tmp; PRESETS, VARIANTS and WHEELS,
#                             the wheel folder, default .whl, override the defaults below)
# The image's own jax runs it; the versions it ran with are printed first. A pair that cannot work stops the
# script with the import guard's message.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
wheels="${WHEELS:-.whl}"
presets="${PRESETS:-qwen2_0p5b qwen2_5_omni_3b_thinker}"
variants="${VARIANTS:-shared repeated}"
log() { tee -a "$out/rl_step_gpu.txt"; }
versions() {  # from the installed metadata, so that a broken pair still prints its versions
  python3 - <<'EOF'
import importlib.metadata as m, sys
def v(n):
  try:
    return m.version(n)
  except m.PackageNotFoundError:
    return "(not installed)"
names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "array-record", "ml-collections")
print("python", sys.version.split()[0], *(f"{n} {v(n)}" for n in names))
EOF
}
: > "$out/rl_step_gpu.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; versions; } 2>&1 | log
why=$(mktemp)
need=$(python3 merr1_jax/_versions.py grain array-record ml-collections 2>"$why")  # a crash here stops the script
log < "$why"
if [[ -n "$need" ]]; then
  site=$(mktemp -d)  # this run's own: nothing left by an earlier run shadows the image
  for name in $need; do
    wheel=$(compgen -G "$wheels/${name//-/_}-*.whl" | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
      echo "gpu.sh: stopped: $name is needed (the line above says why) and $wheels/ holds no ${name//-/_} wheel:" \
        "fetch it as this script's header says" | log >&2
      exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheel"
  done
  export PYTHONPATH="$site:${PYTHONPATH:-}"
  echo "installed from $wheels/: $need; now:" | log
  versions 2>&1 | log
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import jax; print(jax.devices())" 2>&1 | log || true
if ! python3 -c "import merr1_jax" 2>&1 | log; then
  echo "gpu.sh: stopped: merr1_jax cannot run on these versions (the line above names them and the fix)" | log >&2
  exit 1
fi
# Work per step: 8 prompts x G 8 = 64 rows, prompt 256, 128 new tokens; 1 warm-up + 3 timed steps.
for preset in $presets; do
  for variant in $variants; do
    # A failing variant (e.g. out of memory) is reported and the others still run.
    python3 benchmarks/rl_step.py --presets "$preset" --variants "$variant" \
      --dtype bfloat16 --prompts 8 --prompt_len 256 --group 8 --new_tokens 128 --warmup 1 --repeats 3 \
      --json "$out/rl_step_gpu.$preset.$variant.json" 2>&1 | tee -a "$out/rl_step_gpu.txt" \
      || echo "rl_step.py --presets $preset --variants $variant FAILED" | tee -a "$out/rl_step_gpu.txt"
  done
  python3 benchmarks/rl_step.py --presets "$preset" --variants shared --attention cudnn \
    --dtype bfloat16 --prompts 8 --prompt_len 256 --group 8 --new_tokens 128 --warmup 1 --repeats 3 \
    --json "$out/rl_step_gpu.$preset.cudnn.json" 2>&1 | tee -a "$out/rl_step_gpu.txt" \
    || echo "rl_step.py --presets $preset --attention cudnn FAILED" | tee -a "$out/rl_step_gpu.txt"
done
python3 - "$out" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
parts = sorted(glob.glob(os.path.join(out, "rl_step_gpu.*.*.json")))
rows = [row for p in parts for row in json.load(open(p))]
json.dump(rows, open(os.path.join(out, "rl_step_gpu.json"), "w"), indent=1)
for p in parts:
  os.remove(p)  # merged: $OUT returns at most 8 files
print(f"merged {len(rows)} rows into {os.path.join(out, 'rl_step_gpu.json')}")
EOF
