#!/usr/bin/env bash
# Launch vitreg_jax on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/quickstart.py gs://bucket/workdir [overrides...]
#   DRY_RUN=1 launch/tpu_vm.sh ...   # print the gcloud commands instead of running them
#
# Installs the package on each host from the current checkout (copied with scp), then runs
# the same command on all workers; jax finds the pod's other hosts by itself. The workdir
# must be shared storage (a GCS bucket) so that every host sees the same checkpoints.
# The remote command is one string that the workers' shell splits again, so every argument
# is quoted for it: an override holding a space or a `;` stays one argument.
set -euo pipefail
TPU=${1:?usage: tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [overrides...]}
ZONE=${2:?}
CONFIG=${3:?}
WORKDIR=${4:?}
shift 4

# Each argument in single quotes (a ' inside becomes '\''), joined by spaces: POSIX shell
# quoting that the remote shell undoes exactly, and that shlex.split reads back.
quote() {
  local arg out=()
  for arg in "$@"; do
    out+=("'${arg//\'/\'\\\'\'}'")
  done
  printf '%s' "${out[*]}"
}

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    quote "$@"
    echo
  else
    "$@"
  fi
}

TRAIN=$(quote python -m vitreg_jax.main "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
run gcloud compute tpus tpu-vm scp --recurse --zone="${ZONE}" --worker=all . "${TPU}:~/vitreg_jax"
run gcloud compute tpus tpu-vm ssh "${TPU}" --zone="${ZONE}" --worker=all \
  --command="cd ~/vitreg_jax && pip install -q -e '.[tpu]' && ${TRAIN}"
