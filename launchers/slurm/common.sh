#!/usr/bin/env bash
# Shared by single_node.sbatch and multi_node.sbatch: one task per node (srun), and on each node torchrun
# starting one process per GPU. Rank 0 is the trainer (the single controller); the other ranks are the
# Megatron workers it drives. Rendezvous comes from Slurm: MASTER_ADDR is the job's first node.
#
# Settings (environment, with defaults):
#   CONTAINER_IMAGE  squashfs image or registry tag for pyxis/enroot (containers/README.md)
#   DATA_DIR, MODEL_DIR, CKPT_DIR   host folders mounted at /data, /models, /checkpoints
#   RUN_NAME         run folder under /checkpoints (default: the job name)
#   GPUS_PER_NODE    processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   PRORL_DRY_RUN=1  print the srun and torchrun commands instead of running them
# Arguments are Hydra overrides, passed to `prorl train` unchanged.
set -euo pipefail

prorl_first_host() {
  # The first host of a Slurm node list; scontrol expands ranges (node[01-04]), the fallback takes plain lists.
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
  else
    printf '%s\n' "${1%%,*}"
  fi
}

prorl_launch() {
  local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
  local job_id="${SLURM_JOB_ID:-0}"
  local run_name="${RUN_NAME:-${SLURM_JOB_NAME:-prorl}}"
  local image="${CONTAINER_IMAGE:-nemo_prorl.sqsh}"
  local mounts="${DATA_DIR:-$PWD/data}:/data,${MODEL_DIR:-$PWD/models}:/models,${CKPT_DIR:-$PWD/checkpoints}:/checkpoints"
  local run_dir="/checkpoints/${run_name}"
  local master_addr
  master_addr="$(prorl_first_host "${SLURM_JOB_NODELIST:-localhost}")"
  local master_port=$((29500 + job_id % 1000))

  # Hydra overrides, each quoted for the shell that srun starts on every node.
  local overrides="" arg
  for arg in "$@"; do
    overrides+=" $(printf '%q' "$arg")"
  done
  # Each node fills in its own rank: \${SLURM_NODEID} is expanded by the shell srun starts there.
  local torchrun="torchrun --nnodes=${nodes} --nproc_per_node=${gpus} --node_rank=\${SLURM_NODEID}"
  torchrun+=" --master_addr=${master_addr} --master_port=${master_port}"
  torchrun+=" -m nemo_prorl.cli train resume=auto trainer.output_dir=${run_dir}${overrides}"
  # shellcheck disable=SC2054  # the commas belong to srun's --container-mounts and --export lists
  local -a srun=(srun --nodes="${nodes}" --ntasks-per-node=1 --kill-on-bad-exit=1
    --container-image="${image}" --container-mounts="${mounts}" --container-workdir=/workspace
    --export=ALL,PRORL_DATA_DIR=/data,MASTER_ADDR="${master_addr}",MASTER_PORT="${master_port}"
    --output="logs/%x-%j-node%n.out" bash -c "${torchrun}")

  if [[ "${PRORL_DRY_RUN:-0}" == "1" ]]; then
    printf 'srun:'
    printf ' %q' "${srun[@]}"
    printf '\n'
    local rank
    for ((rank = 0; rank < nodes; rank++)); do
      printf 'torchrun[node %d]: %s\n' "${rank}" "${torchrun//\$\{SLURM_NODEID\}/${rank}}"
    done
    return 0
  fi

  mkdir -p logs
  "${srun[@]}"
  # SIGTERM (preemption, or --signal before the time limit) made the trainer checkpoint and write
  # PREEMPTED; requeue the job, which resumes from that checkpoint (resume=auto).
  local marker="${CKPT_DIR:-$PWD/checkpoints}/${run_name}/PREEMPTED"
  if [[ -f "${marker}" ]]; then
    rm -f "${marker}"
    scontrol requeue "${job_id}"
  fi
}
