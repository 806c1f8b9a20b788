#!/usr/bin/env bash
# Builds one virtualenv per peer under benchmarks/peers/.venvs/ (git-ignored). Neither peer is a dependency of
# merr1_jax: the project venv never sees them.
#   bash benchmarks/peers/setup.sh [trl|tunix|all]
#
# Every package is pinned exactly, in requirements-trl.txt and requirements-tunix.txt beside this script (the
# whole resolved set, CPython 3.11 on Linux x86_64), and installed with --no-deps, so nothing unpinned can slip
# in. After installing, the script checks `pip check` and that `pip freeze` equals the pin file, and fails
# otherwise; the freeze is kept in .venvs/NAME.freeze.txt (compare.py prints it and records the check).
#   TRL: trl 1.16.0, transformers 5.24.0 (the project's), torch 2.13.0 CPU build.
#   Tunix: google-tunix 0.1.7 with jax 0.10.2 / flax 0.12.8; transformers 5.12.1, because tunix 0.1.7 needs
#   safetensors<0.8 and transformers 5.24.0 needs safetensors>=0.8.
#
# torch: `torch==2.13.0+cpu` is installed first, on its own, and the script stops unless
# `torch.version.cuda is None` afterwards. PyPI has no +cpu build, so on a machine without a local CPU wheel
# (pip's find-links) pip fails at once instead of downloading a multi-GB CUDA build; point PIP_EXTRA_INDEX_URL
# at PyTorch's CPU wheel index there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3.11}"
which="${1:-all}"

fail() { echo "setup.sh: $*" >&2; exit 1; }

normalise() {  # pip freeze / pin lines -> sorted 'name==version' with PEP 503 names, comments dropped
  grep -vE '^\s*(#|$)' | sed -E 's/[[:space:]]+#.*$//' \
    | awk -F'==' '{n = tolower($1); gsub(/[-_.]+/, "-", n); print n "==" $2}' \
    | grep -vE '^(pip|setuptools|wheel)==' | sort
}

check_torch_cpu() {  # venv python, "early" (torch installed alone: read torch/version.py) | "final" (import it)
  "$1" - "$2" <<'EOF' || fail "torch in $1 is not the CPU build (see this script's header); remove the venv, retry"
import importlib.util, os, runpy, sys
spec = importlib.util.find_spec("torch")
if spec is None:
  sys.exit(0)  # no torch at all (Tunix): fine
if sys.argv[1] == "early":  # its own dependencies are not installed yet: read the build's version file only
  v = runpy.run_path(os.path.join(os.path.dirname(spec.origin), "version.py"))
  version, cuda = v["__version__"], v["cuda"]
else:
  import torch
  version, cuda = torch.__version__, torch.version.cuda
if cuda is not None:
  print(f"torch {version} is a CUDA {cuda} build", file=sys.stderr)
  sys.exit(1)
print(f"torch {version}: CPU build (torch.version.cuda is None)")
EOF
}

mk() {  # name
  local name="$1"
  local venv="$here/.venvs/$name" pins="$here/requirements-$name.txt" freeze="$here/.venvs/$name.freeze.txt"
  [[ -f "$pins" ]] || fail "$pins is missing"
  "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || fail "$py is not CPython 3.11 (set PYTHON=...)"
  if [[ ! -x "$venv/bin/python" ]]; then "$py" -m venv "$venv"; fi
  local torch_pin
  torch_pin="$(grep -E '^torch==' "$pins" || true)"
  if [[ -n "$torch_pin" ]]; then
    "$venv/bin/python" -m pip install -q --no-deps "$torch_pin"
    check_torch_cpu "$venv/bin/python" early
  fi
  "$venv/bin/python" -m pip install -q --no-deps -r "$pins"
  check_torch_cpu "$venv/bin/python" final  # imported now: nothing replaced it (no torch at all is fine: Tunix)
  "$venv/bin/python" -m pip check || fail "$name: pip check failed (the pins in $pins do not fit together)"
  "$venv/bin/python" -m pip freeze > "$freeze"
  if ! diff <(normalise < "$pins") <(normalise < "$freeze") > "$freeze.diff"; then
    cat "$freeze.diff" >&2
    fail "$name: the venv's pip freeze differs from $pins (< pins, > venv): remove $venv and rerun"
  fi
  rm -f "$freeze.diff"
  local main
  main="$(grep -iE '^(trl|torch|transformers|google-tunix|jax|flax)==' "$freeze" | tr '\n' ' ')"
  echo "$name: $(grep -ciE '==' "$freeze") packages, exactly $(basename "$pins"); $main"
}

case "$which" in
  trl|tunix) mk "$which" ;;
  all) mk trl; mk tunix ;;
  *) fail "unknown peer '$which': expected trl, tunix or all" ;;
esac
