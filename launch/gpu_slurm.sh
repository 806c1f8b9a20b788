#!/usr/bin/env bash
# Multi-node GPU training under SLURM. Submit from the repository root (its .venv installed with JAX's CUDA
# extra on a filesystem every node sees):
#
#   sbatch --nodes=1 launch/gpu_slurm.sh \
#       --config configs/base.py:model=qwen2_5_omni_7b_thinker,data=mer_features,mesh=gpu8 \
#       --config.model.hf_path=/shared/Qwen2.5-Omni-7B --config.data.records_dir=/shared/records \
#       --workdir /shared/runs/merr1
#   sbatch --nodes=2 launch/gpu_slurm.sh \
#       --config configs/base.py:model=qwen2_5_omni_7b_thinker,data=mer_features,mesh=fsdp \
#       --config.model.hf_path=/shared/Qwen2.5-Omni-7B --config.data.records_dir=/shared/records \
#       --config.rl.prompts_per_step=16 --workdir /shared/runs/merr1
#
# mesh=gpu8 is (1, 8, 1) for one node of 8 GPUs; mesh=fsdp, (1, -1, 1), shards over every GPU of the job, and
# the prompts of a step must divide over them (16 on 2 nodes). The tokenizer is read from model.hf_path.
# Expected memory per GPU for the 7B thinker: docs/running_at_scale.md.
#
# PER=gpu (default): one process per GPU. jax.distributed auto-detects SLURM (merr1_jax.infra.sharding.init_distributed
#   calls it when SLURM_NTASKS > 1): coordinator = the first node of the step, rank = SLURM_PROCID, and each
#   process takes GPU number SLURM_LOCALID. So the tasks must all see every GPU of their node: no
#   --gpus-per-task binding.
# PER=node: one process per node driving all its GPUs. Here the script passes MERR1_COORDINATOR /
#   MERR1_NUM_PROCESSES / MERR1_PROCESS_ID itself, because JAX's SLURM detection would pin each process to
#   the single GPU SLURM_LOCALID (= 0).
# The workdir, data and model paths must be on a shared filesystem (all processes write the checkpoints).
# DRY_RUN=1 bash launch/gpu_slurm.sh ARGS prints the srun command (outside a job it assumes 2 nodes x 8 GPUs).
#
#SBATCH --job-name=merr1
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

PER=${PER:-gpu}
GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NODES=${SLURM_JOB_NUM_NODES:-2}
# sbatch runs a copy of this script from a spool directory: the repository is where the job was submitted.
ROOT=${MERR1_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PORT=${COORD_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

case "$PER" in
  gpu) TASKS=$GPUS CPUS=${SLURM_CPUS_PER_TASK:-8} ;;
  node) TASKS=1 CPUS=${SLURM_CPUS_ON_NODE:-64} ;;
  *) echo "gpu_slurm: PER must be 'gpu' or 'node', got '$PER'" >&2; exit 2 ;;
esac
[[ $# -ge 1 ]] || { echo "usage: sbatch [--nodes=N] $0 [train args...]" >&2; exit 2; }

SRUN=(srun --nodes="$NODES" --ntasks-per-node="$TASKS" --cpus-per-task="$CPUS" --kill-on-bad-exit=1
      --chdir="$ROOT")
TRAIN=("$PYTHON" -m merr1_jax.train "$@")
if [[ "$PER" == node ]]; then
  if [[ "${DRY_RUN:-0}" == 1 && -z "${SLURM_JOB_NODELIST:-}" ]]; then
    head_node=NODE0
  else
    head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  # SLURM_PROCID is only known inside each task: it is escaped so that the task's shell expands it.
  CMD=(bash -c "export MERR1_COORDINATOR=$head_node:$PORT MERR1_NUM_PROCESSES=$((NODES * TASKS)) \
MERR1_PROCESS_ID=\$SLURM_PROCID && exec \"\$@\"" merr1 "${TRAIN[@]}")
else
  CMD=("${TRAIN[@]}")
fi

quote() {  # one word as the shell reads it: bare when safe, else in single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  line=""
  for w in "${SRUN[@]}" "${CMD[@]}"; do line+="$(quote "$w") "; done
  echo "${line% }"
  exit 0
fi
echo "gpu_slurm: $NODES node(s) x $TASKS process(es), PER=$PER, job ${SLURM_JOB_ID:-?}"
exec "${SRUN[@]}" "${CMD[@]}"
