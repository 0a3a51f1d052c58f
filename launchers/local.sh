#!/usr/bin/env bash
# ProRL on this machine with torchrun: NPROC processes (one per GPU; rank 0 trains, the rest are Megatron
# workers). NPROC=1 is a plain `prorl train`. Overrides are Hydra's:
#   NPROC=2 launchers/local.sh policy=megatron policy.megatron.tensor_parallel_size=2
# PRORL_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
nproc="${NPROC:-1}"
python="${PYTHON:-python}"
if [[ "${nproc}" == "1" ]]; then
  cmd=("${python}" -m nemo_prorl.cli train "$@")
else
  cmd=("${python}" -m torch.distributed.run --standalone --nproc_per_node="${nproc}" -m nemo_prorl.cli train "$@")
fi
if [[ "${PRORL_DRY_RUN:-0}" == "1" ]]; then
  printf 'run:'
  printf ' %q' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
