#!/usr/bin/env bash
# ProRL on this machine. `prorl train` is the only process to start: when the run needs more than one
# process (policy=megatron ranks, rollout=vllm engines) it starts a private Ray cluster of this machine
# (loopback only, a fresh token, stopped with the run) and places them by the plan (`prorl plan`).
#   launchers/local.sh policy=megatron policy.megatron.tensor_parallel_size=2 rollout=vllm
# A GPU machine: cluster.device=cuda cluster.gpus_per_node=N. PRORL_DRY_RUN=1 prints the command.
set -euo pipefail
python="${PYTHON:-python}"
cmd=("${python}" -m nemo_prorl.cli train "$@")
if [[ "${PRORL_DRY_RUN:-0}" == "1" ]]; then
  printf 'run:'
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
