#!/usr/bin/env bash
# Shared by single_node.sbatch and multi_node.sbatch. Inside the container, on the job's nodes:
#   1. a fresh Ray token for this job in its run folder (mode 0600; the run folder is on the shared CKPT_DIR);
#   2. `prorl doctor` on every node (the run's config): a failed check stops the job with its report;
#   3. a Ray head on the first node and a Ray worker on each other node (token authentication on, no
#      dashboard, no usage reporting), each a background srun step;
#   4. `prorl train` on the first node, attached to that cluster (cluster.ray_address); it waits until all
#      nodes have joined (cluster.ray_timeout_s, then an error naming the nodes that did), places one Megatron
#      rank per GPU and the rollout engines by the plan (`prorl plan`), and drives them;
#   5. then the Ray steps are stopped, and a PREEMPTED marker requeues the job (resume=auto).
# SIGTERM reaches the batch shell only (--signal=B:TERM@...): it is passed to the trainer, which checkpoints
# while its Ray actors are still up, writes PREEMPTED and exits 0.
#
# Settings (environment, with defaults):
#   CONTAINER_IMAGE  squashfs image or registry tag for pyxis/enroot (containers/README.md)
#   DATA_DIR, MODEL_DIR, CKPT_DIR   host folders mounted at /data, /models, /checkpoints
#   RUN_NAME         run folder under /checkpoints (default: the job name)
#   GPUS_PER_NODE    GPUs per node (default: SLURM_GPUS_ON_NODE, else 8)
#   DOCTOR_ARGS      flags for `prorl doctor` (e.g. --no-engine-start: skip its vLLM engine start)
#   PRORL_DRY_RUN=1  print every command instead of running it
# Arguments are Hydra overrides, passed to `prorl train` unchanged.
set -euo pipefail

prorl_hosts() {
  # The hosts of a Slurm node list, one per line; scontrol expands ranges (node[01-04]).
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1"
  else
    printf '%s\n' "${1//,/$'\n'}"
  fi
}

prorl_ip() {
  # The address the other nodes reach a host at (its name where it cannot be resolved here). Debian-style
  # /etc/hosts maps a machine's own name to 127.0.1.1: then its first interface address (this script runs
  # on the job's first node, the host asked about).
  local ip
  ip="$(getent hosts "$1" 2>/dev/null | awk '{print $1; exit}')" || true
  if [[ "${ip}" == 127.* ]]; then
    ip="$(hostname -I 2>/dev/null | awk '{print $1}')" || true
  fi
  printf '%s\n' "${ip:-$1}"
}

prorl_print() {
  # One command as it would run: a label, then its arguments shell-quoted.
  local label="$1"
  shift
  printf '%s:' "${label}"
  printf ' %q' "$@"
  printf '\n'
}

prorl_launch() {
  local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
  local job_id="${SLURM_JOB_ID:-0}"
  local run_name="${RUN_NAME:-${SLURM_JOB_NAME:-prorl}}"
  local image="${CONTAINER_IMAGE:-nemo_prorl.sqsh}"
  local ckpt_dir="${CKPT_DIR:-$PWD/checkpoints}"
  local mounts="${DATA_DIR:-$PWD/data}:/data,${MODEL_DIR:-$PWD/models}:/models,${ckpt_dir}:/checkpoints"
  local run_dir="/checkpoints/${run_name}"
  local token="${run_dir}/ray_token"
  local -a hosts
  mapfile -t hosts < <(prorl_hosts "${SLURM_JOB_NODELIST:-localhost}")
  local head="${hosts[0]}"
  local head_ip
  head_ip="$(prorl_ip "${head}")"
  local port=$((6379 + job_id % 1000))  # the Ray head's GCS port, per job
  local address="${head_ip}:${port}"

  # Hydra overrides, each quoted for the shell that srun starts.
  local overrides="" arg
  for arg in "$@"; do
    overrides+=" $(printf '%q' "$arg")"
  done
  # Ray reads these when it starts; a shell that ignores TERM/USR1 passes that on, so a preemption signal
  # to every process of the job leaves Ray up while the trainer checkpoints.
  # Values go into the shells srun starts: quoted, so that a run name cannot break (or add to) a command.
  local q_token q_address q_run_dir q_head_ip
  q_head_ip="$(printf '%q' "${head_ip}")"
  q_token="$(printf '%q' "${token}")"
  q_address="$(printf '%q' "${address}")"
  q_run_dir="$(printf '%q' "${run_dir}")"
  # Ray's session folder inside a fresh 0700 folder of this node: its Unix sockets carry no token.
  # RAY_worker_niceness=0: Ray would start the ranks and engines at niceness 15, as if they were background work.
  local ray_env="trap '' TERM USR1; export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=${q_token} RAY_USAGE_STATS_ENABLED=0"
  ray_env+=" RAY_worker_niceness=0"
  ray_env+="; unset RAY_AUTH_TOKEN; tmp=\$(mktemp -d /tmp/prorl-ray-XXXXXX)"
  local ray_common="--temp-dir=\${tmp}/ray --num-gpus=${gpus} --disable-usage-stats --block"
  local head_cmd="${ray_env}; exec ray start --head --node-ip-address=${q_head_ip} --port=${port}"
  head_cmd+=" --include-dashboard=false ${ray_common}"
  local worker_cmd="${ray_env}; exec ray start --address=${q_address} ${ray_common}"
  local cluster_args=" cluster.device=cuda cluster.num_nodes=${nodes} cluster.gpus_per_node=${gpus}"
  cluster_args+=" cluster.ray_address=${q_address} cluster.ray_token_file=${q_token}${overrides}"
  local train_cmd="exec python -m nemo_prorl.cli train resume=auto trainer.output_dir=${q_run_dir}${cluster_args}"
  # `prorl doctor` on every node first, with the run's config: a node without GPUs, a broken vLLM
  # environment or an unreadable data file stops the job before hours of allocation are spent.
  local doctor_flags="" flag
  local -a doctor_args=()
  read -r -a doctor_args <<<"${DOCTOR_ARGS:-}"
  for flag in "${doctor_args[@]}"; do
    doctor_flags+=" $(printf '%q' "$flag")"
  done
  local doctor_cmd="exec python -m nemo_prorl.cli doctor${doctor_flags} trainer.output_dir=${q_run_dir}${cluster_args}"

  # shellcheck disable=SC2054  # the commas belong to srun's --container-mounts and --export lists
  local -a container=(--container-image="${image}" --container-mounts="${mounts}" --container-workdir=/workspace
    --container-name="prorl-${job_id}" --export=ALL,PRORL_DATA_DIR=/data)
  local -a doctor_srun=(srun --nodes="${nodes}" --ntasks-per-node=1 --overlap "${container[@]}"
    --output="logs/%x-%j-doctor-%n.out" bash -c "${doctor_cmd}")
  local -a head_srun=(srun --nodes=1 --ntasks=1 --nodelist="${head}" --overlap "${container[@]}"
    --output="logs/%x-%j-ray-head.out" bash -c "${head_cmd}")
  local -a worker_srun=(srun --nodes=$((nodes - 1)) --ntasks-per-node=1 --exclude="${head}" --overlap "${container[@]}"
    --output="logs/%x-%j-ray-worker-%n.out" bash -c "${worker_cmd}")
  local -a train_srun=(srun --nodes=1 --ntasks=1 --nodelist="${head}" --overlap "${container[@]}"
    --output="logs/%x-%j-train.out" bash -c "${train_cmd}")
  local -a stop_srun=(srun --nodes="${nodes}" --ntasks-per-node=1 --overlap "${container[@]}"
    --output="logs/%x-%j-ray-stop-%n.out" bash -c "ray stop --force")
  local host_token="${ckpt_dir}/${run_name}/ray_token"

  if [[ "${PRORL_DRY_RUN:-0}" == "1" ]]; then
    printf 'token: %s (a fresh random token, mode 0600)\n' "${host_token}"
    prorl_print "doctor" "${doctor_srun[@]}"
    prorl_print "ray head" "${head_srun[@]}"
    if ((nodes > 1)); then
      prorl_print "ray workers" "${worker_srun[@]}"
    fi
    prorl_print "train" "${train_srun[@]}"
    prorl_print "ray stop" "${stop_srun[@]}"
    return 0
  fi

  # A signal from here on: passed to the trainer once it runs; before that, the job just requeues.
  local train_pid="" early=0
  trap 'if [[ -n "${train_pid}" ]]; then kill -TERM "${train_pid}" 2>/dev/null || true; else early=1; fi' TERM USR1
  mkdir -p logs
  (umask 077 && mkdir -p "${ckpt_dir}/${run_name}")
  # a fresh token: mktemp makes a new file of mode 0600 (never one somebody left at a known name)
  local tmp_token
  tmp_token="$(mktemp "${ckpt_dir}/${run_name}/.ray_token.XXXXXX")"
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"${tmp_token}"
  mv -f "${tmp_token}" "${host_token}"
  if ! "${doctor_srun[@]}"; then
    echo "prorl doctor failed on a node: the job stops here (no requeue). Its report:" >&2
    cat logs/*-"${job_id}"-doctor-*.out >&2 2>/dev/null || true
    return 1
  fi
  local -a ray_pids=()
  "${head_srun[@]}" &
  ray_pids+=($!)
  if ((nodes > 1)); then
    "${worker_srun[@]}" &
    ray_pids+=($!)
  fi
  local status=0
  if ((early == 0)); then
    "${train_srun[@]}" &
    train_pid=$!
    # Preemption or the time limit: the trainer checkpoints (srun passes SIGTERM on to it) and exits 0. A
    # trapped signal ends `wait` early: wait again until the trainer has really stopped.
    while true; do
      if wait "${train_pid}"; then status=0; else status=$?; fi
      kill -0 "${train_pid}" 2>/dev/null || break
    done
  fi
  # Ray's daemons ignore TERM (above): stop them on every node, then their srun steps.
  "${stop_srun[@]}" || true
  kill -KILL "${ray_pids[@]}" 2>/dev/null || true
  wait "${ray_pids[@]}" 2>/dev/null || true
  local marker="${ckpt_dir}/${run_name}/PREEMPTED"
  if [[ -f "${marker}" ]] || ((early)); then
    rm -f "${marker}"
    scontrol requeue "${job_id}"
  fi
  return "${status}"
}
