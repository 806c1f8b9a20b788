#!/usr/bin/env bash
# N trainer processes on this machine, joined by jax.distributed over 127.0.0.1 (CPU testing of the
# multi-host code path: per-process data shards, global arrays, collective checkpoints).
#
#   launch/local_multiprocess.sh N [train args...]
#   launch/local_multiprocess.sh 2 --config configs/smoke.py --workdir /tmp/mp
#
# Each process gets MERR1_COORDINATOR=127.0.0.1:PORT, MERR1_NUM_PROCESSES=N and MERR1_PROCESS_ID=i, which
# merr1_jax.infra.sharding.init_distributed reads. Process i's output is prefixed with "[p<i>] ".
# The script waits for all of them and exits with the first non-zero status; when one process fails the
# others are stopped (they would otherwise wait forever in a collective).
#
# Environment:
#   PYTHON       interpreter (default: .venv/bin/python of this repository if present, else python3)
#   MERR1_PORT   coordinator port (default: a free port)
#   DEVICES_PER_PROCESS  CPU devices per process (default 1; sets --xla_force_host_platform_device_count)
#   DRY_RUN=1    print the commands instead of running them
set -euo pipefail

usage() { echo "usage: $0 N [train args...]   (N >= 1 processes)" >&2; exit 2; }
[[ $# -ge 1 && "$1" =~ ^[0-9]+$ && "$1" -ge 1 ]] || usage
N=$1
shift

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${MERR1_PORT:-}" ]]; then
  # Bind port 0 to let the kernel pick a free port (a tiny race with other programs is acceptable here).
  MERR1_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
DEVICES=${DEVICES_PER_PROCESS:-1}
# Replace any device-count flag inherited from the caller (pytest sets 8 fake devices) by ours.
XLA=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
XLA="$XLA --xla_force_host_platform_device_count=$DEVICES"

cmd_for() {  # the environment and command of process $1, one shell-quoted line
  printf 'MERR1_COORDINATOR=127.0.0.1:%s MERR1_NUM_PROCESSES=%s MERR1_PROCESS_ID=%s JAX_PLATFORMS=cpu ' \
    "$MERR1_PORT" "$N" "$1"
  printf 'XLA_FLAGS=%q ' "${XLA# }"
  printf '%q ' "$PYTHON" -m merr1_jax.train "${@:2}"
  echo
}

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  for ((i = 0; i < N; i++)); do echo "cd $(printf '%q' "$ROOT") && $(cmd_for "$i" "$@")"; done
  exit 0
fi

cd "$ROOT"
pids=()
cleanup() {  # stop the processes this script started, by pid: TERM, then KILL after a grace period
  local p t
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for ((t = 0; t < 20; t++)); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.5
  done
  # Still running: most likely blocked in a collective waiting for the failed process.
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < N; i++)); do
  MERR1_COORDINATOR="127.0.0.1:$MERR1_PORT" MERR1_NUM_PROCESSES="$N" MERR1_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="${XLA# }" \
    "$PYTHON" -m merr1_jax.train "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=""
  set +e
  wait -n -p finished "${running[@]}"  # bash >= 5.1
  rc=$?
  set -e
  [[ -n "$finished" ]] || break  # nothing left that bash can wait for
  still=()
  for p in "${running[@]}"; do [[ "$p" == "$finished" ]] || still+=("$p"); done
  running=("${still[@]+"${still[@]}"}")
  if ((rc != 0)); then
    status=$rc
    echo "local_multiprocess: process pid $finished exited with status $rc; stopping the others" >&2
    cleanup
    break
  fi
done
wait 2>/dev/null || true  # reap the rest and let the output prefixers flush
if ((status != 0)); then
  echo "local_multiprocess: FAILED (status $status)" >&2
else
  echo "local_multiprocess: all $N processes exited 0"
fi
exit "$status"
