#!/usr/bin/env bash
# Starts a multi-host `python -m longctx.train` run: one process per GPU (SLURM), per TPU VM worker (pod slice) or per
# host (manual), every one with --config.parallel.distributed=True, so that longctx.parallel.distributed.initialize
# joins them through jax.distributed.initialize and the mesh of config.parallel spans the devices of all of them.
#
# The processes must see the same code, config and data, and share the --workdir: process 0 writes config.json and
# metrics.jsonl, every process writes its part of each orbax checkpoint (and its data_iter/process_<i>-of-<n>.json),
# so the workdir must be on a file system every host mounts. A run resumes (--resume) with the same number of
# processes; the coordinator address may change between jobs.
#
# Run `scripts/launch_multihost.sh --help` for the modes.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/launch_multihost.sh MODE [MODE ARGUMENTS] -- [longctx.train FLAGS]

Everything after `--` goes to `python -m longctx.train` (--config, --workdir, --resume, --config.<field>=...);
the launcher adds --config.parallel.distributed=True (and, where it knows them, the coordinator address, process
count and process id). $PYTHON is the interpreter on every host (default: python3, or .venv/bin/python in local mode).

Modes:

  slurm [SRUN OPTIONS] -- FLAGS
      From a SLURM allocation (sbatch/salloc) or a login node: `srun` starts one process per GPU, all GPUs of a
      node visible to each (--ntasks-per-node=G --gpus-per-node=G, G=$GPUS_PER_NODE, default $SLURM_GPUS_ON_NODE
      or 8). jax reads the coordinator (first node of the step, a port derived from the job id, or
      $JAX_COORDINATOR_PORT), the process count and id from SLURM, and gives process SLURM_LOCALID its GPU of that
      index. Extra srun options (--nodes=4, --partition=..., --time=...) go before `--`.
        scripts/launch_multihost.sh slurm --nodes=2 -- --config configs/llama_1b_32k.py --workdir /shared/runs/1b

  tpu TPU_NAME ZONE REMOTE_DIR -- FLAGS
      A Cloud TPU pod slice: `gcloud compute tpus tpu-vm ssh --worker=all` runs the command on every TPU VM worker,
      in REMOTE_DIR (this repository, installed at the same path on every worker); jax reads the slice's layout
      from the TPU metadata. $GCLOUD_FLAGS adds flags to gcloud (e.g. "--project=my-project").
        scripts/launch_multihost.sh tpu my-v5p-64 us-east5-a '~/longctx' -- \
            --config configs/llama_1b_32k.py --workdir /mnt/shared/runs/1b

  manual COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID -- FLAGS
      Any other cluster: run this on every host, PROCESS_ID 0..NUM_PROCESSES-1; process 0's host is the coordinator
      (PORT free there and reachable from the others). Each process uses every device it sees (restrict GPUs with
      CUDA_VISIBLE_DEVICES to run several processes on one host).
        host0$ scripts/launch_multihost.sh manual host0:12345 2 0 -- --config configs/tiny.py --workdir /shared/runs/x
        host1$ scripts/launch_multihost.sh manual host0:12345 2 1 -- --config configs/tiny.py --workdir /shared/runs/x

  local NUM_PROCESSES DEVICES_PER_PROCESS -- FLAGS
      A rehearsal on this machine's CPU: NUM_PROCESSES processes of DEVICES_PER_PROCESS CPU devices each (gloo
      collectives, a free localhost port), as tests/parallel/test_multihost.py runs them. Process 0 prints to this
      terminal, the others to $LOG_DIR/process_<i>.log (default: a new temporary directory).
        scripts/launch_multihost.sh local 2 2 -- --config configs/tiny.py --workdir runs/multihost \
            --config.parallel.data=2 --config.parallel.sequence=2 --config.train.steps=20
EOF
}

die() {
  echo "error: $*" >&2
  echo "run '$0 --help' for usage" >&2
  exit 2
}

is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

# Sets TRAIN_FLAGS to the arguments after the first `--` of "$@" and MODE_ARGS to those before it.
split_args() {
  MODE_ARGS=()
  TRAIN_FLAGS=()
  local seen=0 arg
  for arg in "$@"; do
    if [[ $seen == 0 && $arg == "--" ]]; then
      seen=1
    elif [[ $seen == 0 ]]; then
      MODE_ARGS+=("$arg")
    else
      TRAIN_FLAGS+=("$arg")
    fi
  done
  [[ $seen == 1 ]] || die "put the longctx.train flags after '--'"
  [[ ${#TRAIN_FLAGS[@]} -gt 0 ]] || die "no longctx.train flags after '--' (at least --workdir)"
}

launch_slurm() {
  command -v srun >/dev/null || die "srun not found: the slurm mode runs on a SLURM cluster"
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
  is_int "$gpus" || die "GPUS_PER_NODE must be a number, got '$gpus'"
  # One process per GPU: jax gives process SLURM_LOCALID the GPU of that index, so every task must see all the
  # node's GPUs (no --gpus-per-task, which would leave each task one GPU numbered 0). --kill-on-bad-exit: a failed
  # process ends the step instead of leaving the others waiting at a collective.
  exec srun --ntasks-per-node="$gpus" --gpus-per-node="$gpus" --kill-on-bad-exit=1 "${MODE_ARGS[@]}" \
    "${PYTHON:-python3}" -m longctx.train "${TRAIN_FLAGS[@]}" --config.parallel.distributed=True
}

launch_tpu() {
  [[ ${#MODE_ARGS[@]} == 3 ]] || die "tpu needs TPU_NAME ZONE REMOTE_DIR before '--'"
  command -v gcloud >/dev/null || die "gcloud not found: the tpu mode starts the run from a machine with the gcloud CLI"
  local tpu=${MODE_ARGS[0]} zone=${MODE_ARGS[1]} dir=${MODE_ARGS[2]} remote
  # The remote shell gets every flag quoted; REMOTE_DIR stays unquoted there so that '~/longctx' expands on the worker.
  printf -v remote '%q ' "${PYTHON:-python3}" -m longctx.train "${TRAIN_FLAGS[@]}" --config.parallel.distributed=True
  # shellcheck disable=SC2086  # GCLOUD_FLAGS is a list of flags
  exec gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all ${GCLOUD_FLAGS:-} \
    --command="cd $dir && $remote"
}

launch_manual() {
  [[ ${#MODE_ARGS[@]} == 3 ]] || die "manual needs COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID before '--'"
  local coordinator=${MODE_ARGS[0]} count=${MODE_ARGS[1]} id=${MODE_ARGS[2]}
  [[ $coordinator == *:* ]] || die "the coordinator address must be HOST:PORT, got '$coordinator'"
  is_int "$count" && ((count >= 1)) || die "NUM_PROCESSES must be a positive number, got '$count'"
  is_int "$id" && ((id < count)) || die "PROCESS_ID must be in [0, $count), got '$id'"
  exec "${PYTHON:-python3}" -m longctx.train "${TRAIN_FLAGS[@]}" --config.parallel.distributed=True \
    --config.parallel.coordinator_address="$coordinator" --config.parallel.num_processes="$count" \
    --config.parallel.process_id="$id"
}

launch_local() {
  [[ ${#MODE_ARGS[@]} == 2 ]] || die "local needs NUM_PROCESSES DEVICES_PER_PROCESS before '--'"
  local count=${MODE_ARGS[0]} devices=${MODE_ARGS[1]} python port log_dir i
  is_int "$count" && ((count >= 1)) || die "NUM_PROCESSES must be a positive number, got '$count'"
  is_int "$devices" && ((devices >= 1)) || die "DEVICES_PER_PROCESS must be a positive number, got '$devices'"
  python=${PYTHON:-}
  if [[ -z $python ]]; then
    python=python3
    [[ -x .venv/bin/python ]] && python=.venv/bin/python
  fi
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
  log_dir=${LOG_DIR:-$(mktemp -d)}
  mkdir -p "$log_dir"
  echo "$count processes of $devices CPU devices, coordinator localhost:$port; logs of processes 1.. in $log_dir" >&2
  PIDS=()
  trap 'for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done' EXIT
  for ((i = 0; i < count; i++)); do
    (
      export XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
        JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
      args=(-m longctx.train "${TRAIN_FLAGS[@]}" --config.parallel.distributed=True
            --config.parallel.coordinator_address="localhost:$port" --config.parallel.num_processes="$count"
            --config.parallel.process_id="$i")
      if ((i == 0)); then
        exec "$python" "${args[@]}"
      else
        exec "$python" "${args[@]}" >"$log_dir/process_$i.log" 2>&1
      fi
    ) &
    PIDS+=("$!")
  done
  # The first process to fail ends the others (they would wait for it at their next collective).
  for ((i = 0; i < count; i++)); do
    if ! wait -n; then
      echo "error: a process failed; stopping the others (logs of processes 1.. in $log_dir)" >&2
      exit 1
    fi
  done
  trap - EXIT
}

[[ $# -gt 0 ]] || { usage >&2; exit 2; }
mode=$1
shift
case $mode in
  -h | --help | help) usage ;;
  slurm | tpu | manual | local)
    split_args "$@"
    "launch_$mode"
    ;;
  *) die "unknown mode '$mode' (slurm, tpu, manual or local)" ;;
esac
