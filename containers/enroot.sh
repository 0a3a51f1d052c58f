#!/usr/bin/env bash
# Turn the Docker image into a squashfs file that pyxis/enroot start on every node
# (srun --container-image=nemo_prorl.sqsh, see launchers/slurm/). Run where Docker and enroot are installed:
#   containers/enroot.sh nemo_prorl:0.1.0 /shared/images/nemo_prorl.sqsh
# Without a local Docker daemon, build on another machine, push to a registry, and import from there:
#   enroot import -o nemo_prorl.sqsh docker://registry.example.com#team/nemo_prorl:0.1.0
set -euo pipefail
image="${1:?usage: enroot.sh IMAGE[:TAG] OUTPUT.sqsh}"
output="${2:?usage: enroot.sh IMAGE[:TAG] OUTPUT.sqsh}"
if [[ -e "${output}" ]]; then
  echo "enroot.sh: ${output} exists; remove it first" >&2
  exit 1
fi
enroot import --output "${output}" "dockerd://${image}"
echo "wrote ${output}; use it with: CONTAINER_IMAGE=${output} sbatch launchers/slurm/multi_node.sbatch ..."
