#!/usr/bin/env bash
# One task of a sweep's SLURM job array (submitted by `python -m vitreg_jax.sweep --slurm`):
#
#   sbatch --array=0,1,5 [--partition=... --gpus=1] launch/slurm_array.sh SWEEP ROOT
#
# Task i trains point i of SWEEP (a config file with get_sweep, optionally FILE.py:ARG) into
# ROOT/<point name>; a finished point is skipped, an interrupted one resumes. Time limit: as
# in launch/slurm.sh, USR1 120 s before it makes the point save and this task requeue itself.
#SBATCH --job-name=vitreg_sweep
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
SWEEP=${1:?usage: slurm_array.sh SWEEP ROOT}
ROOT=${2:?usage: slurm_array.sh SWEEP ROOT}
: "${SLURM_ARRAY_TASK_ID:?run through sbatch --array=... (SLURM_ARRAY_TASK_ID is unset)}"

time_limit=0
on_time_limit() {
  time_limit=1
  echo "slurm_array.sh: time limit near: the point saves a checkpoint, then task ${SLURM_JOB_ID} is requeued." >&2
  kill -TERM "${srun_pid}" 2>/dev/null || true
}
trap on_time_limit USR1
srun python -m vitreg_jax.sweep "${SWEEP}" --workdir="${ROOT}" --local \
    --index="${SLURM_ARRAY_TASK_ID}" &
srun_pid=$!
status=0
wait "${srun_pid}" || status=$?
if (( time_limit )); then  # The trap cut the first wait short: wait for the save to finish.
  status=0
  wait "${srun_pid}" || status=$?
  scontrol requeue "${SLURM_JOB_ID}"  # An array task's own job id: only this task.
fi
exit "${status}"
