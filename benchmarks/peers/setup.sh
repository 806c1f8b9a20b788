#!/usr/bin/env bash
# Builds one virtualenv per peer under benchmarks/peers/.venvs/ (git-ignored). Neither peer is a dependency of
# merr1_jax: the project venv never sees them.
#   bash benchmarks/peers/setup.sh [trl|tunix|all]
# TRL: trl 1.16.0 on torch 2.13.0 (CPU build; pip takes the wheel from the local find-links when present).
# Tunix: google-tunix 0.1.7 with the jax/flax it resolves to in its own venv.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3.11}"
which="${1:-all}"
mk() {  # name, pip args...
  local name="$1"; shift
  local venv="$here/.venvs/$name"
  if [[ ! -x "$venv/bin/python" ]]; then "$py" -m venv "$venv"; fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$@"
  "$venv/bin/python" -m pip freeze > "$here/.venvs/$name.freeze.txt"
  echo "$name: $(grep -iE '^(trl|torch|transformers|google-tunix|jax|jaxlib|flax)==' "$here/.venvs/$name.freeze.txt" | tr '\n' ' ')"
}
if [[ "$which" == trl || "$which" == all ]]; then
  mk trl "torch==2.13.0" "trl==1.16.0" safetensors tokenizers
fi
if [[ "$which" == tunix || "$which" == all ]]; then
  mk tunix "google-tunix==0.1.7" safetensors tokenizers
fi
