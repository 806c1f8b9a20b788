#!/usr/bin/env bash
# Runs the trainer on every worker of a Cloud TPU VM (single host or pod slice) over `gcloud ... ssh --worker=all`.
#
#   TPU_NAME=merr1-v5p ZONE=us-east5-a launch/tpu_pod.sh setup
#   TPU_NAME=merr1-v5p ZONE=us-east5-a launch/tpu_pod.sh train \
#       --config configs/base.py:model=qwen2_5_omni_7b_thinker,data=mer_features,mesh=v5p8 \
#       --config.model.hf_path=/mnt/shared/Qwen2.5-Omni-7B --config.data.records_dir=/mnt/shared/records \
#       --workdir /mnt/shared/runs/merr1
#   (a v4-32 pod slice, 4 workers: mesh=v4_32, the same command otherwise; the tokenizer is read from hf_path)
#   TPU_NAME=... ZONE=... launch/tpu_pod.sh stop     # SIGTERM the trainers: checkpoint and exit 0
#
# setup: copies this checkout to REMOTE_DIR on every worker and installs it with JAX's TPU extra.
# train: the same command on every worker. On a pod slice (more than one worker) the script gives every process
#   MERR1_COORDINATOR (worker 0's internal IP), MERR1_NUM_PROCESSES (the worker count) and MERR1_PROCESS_ID
#   (the worker's number from the GCE metadata server, the same source jax.distributed's own TPU detection uses);
#   merr1_jax.infra.sharding.init_distributed starts jax.distributed from them. A single-host slice needs nothing.
# The workdir (checkpoints are written by all workers together) and any data/model paths must be the same
# shared filesystem on every worker: a Filestore/NFS or gcsfuse mount.
#
# Environment: TPU_NAME, ZONE (required), PROJECT (optional), REMOTE_DIR (default ~/merr1_jax),
#   COORD_PORT (default 8476), DRY_RUN=1 (print the gcloud commands instead of running them; the worker list
#   is then taken from NUM_WORKERS / COORDINATOR_IP or shown as placeholders).
set -euo pipefail

usage() {
  echo "usage: TPU_NAME=NAME ZONE=ZONE $0 {setup | train [train args...] | stop}" >&2
  exit 2
}
[[ $# -ge 1 ]] || usage
ACTION=$1
shift
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REMOTE_DIR=${REMOTE_DIR:-'~/merr1_jax'}
COORD_PORT=${COORD_PORT:-8476}
PID_FILE=/tmp/merr1_train.pid
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone "$ZONE")
[[ -n "${PROJECT:-}" ]] && LOC+=(--project "$PROJECT")

quote() {  # one word as the shell reads it: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # prints (DRY_RUN=1) or runs a command given as words
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local w line=""
    for w in "$@"; do line+="$(quote "$w") "; done
    echo "${line% }"
  else
    "$@"
  fi
}

on_all_workers() {  # $1: the remote shell command
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${LOC[@]}" --worker=all --command "$1"
}

worker_ips() {  # internal IPs of the workers, one per line, worker 0 first
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local n=${NUM_WORKERS:-2} i
    echo "${COORDINATOR_IP:-WORKER0_IP}"
    for ((i = 1; i < n; i++)); do echo "WORKER${i}_IP"; done
    return
  fi
  "${GCLOUD[@]}" describe "$TPU_NAME" "${LOC[@]}" --format='value(networkEndpoints[].ipAddress)' | tr ';,' '\n\n' |
    sed '/^$/d'
}

case "$ACTION" in
  setup)
    # The checkout without its virtual environment, caches and outputs.
    if [[ "${DRY_RUN:-0}" == 1 ]]; then tarball=/tmp/merr1_src.tar.gz; else tarball=$(mktemp -d)/merr1_src.tar.gz; fi
    run tar -C "$ROOT" --exclude=.venv --exclude=.jax_cache --exclude=.git --exclude=workdir -czf "$tarball" .
    run "${GCLOUD[@]}" scp "$tarball" "$TPU_NAME:/tmp/merr1_src.tar.gz" "${LOC[@]}" --worker=all
    on_all_workers "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/merr1_src.tar.gz && cd $REMOTE_DIR && \
python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]>=0.10.2,<0.13'"
    [[ "${DRY_RUN:-0}" == 1 ]] || rm -r "$(dirname "$tarball")"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    mapfile -t ips < <(worker_ips)
    [[ ${#ips[@]} -ge 1 ]] || { echo "tpu_pod: no workers found for $TPU_NAME in $ZONE" >&2; exit 1; }
    env_cmd=""
    if ((${#ips[@]} > 1)); then
      # The worker number comes from the metadata server on each worker; the rest is the same everywhere.
      env_cmd="export MERR1_COORDINATOR=${ips[0]}:$COORD_PORT MERR1_NUM_PROCESSES=${#ips[@]} \
MERR1_PROCESS_ID=\$(curl -sf -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number) && "
    fi
    args=$(printf '%q ' "$@")
    # The shell records its pid and becomes the trainer (exec), so that `stop` can signal exactly that process.
    on_all_workers "cd $REMOTE_DIR && ${env_cmd}echo \$\$ > $PID_FILE && exec .venv/bin/python -m merr1_jax.train ${args% }"
    ;;
  stop)
    # SIGTERM: the trainer saves a checkpoint at the next step boundary and exits 0 (rerun `train` to resume).
    on_all_workers "test -f $PID_FILE && kill -TERM \$(cat $PID_FILE) || echo 'no trainer pid file'"
    ;;
  *)
    usage
    ;;
esac
