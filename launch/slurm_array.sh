#!/usr/bin/env bash
# One task of a sweep's SLURM job array (submitted by `python -m vitreg_jax.sweep --slurm`):
#
#   sbatch --array=0,1,5 [--partition=... --gpus=1] launch/slurm_array.sh SWEEP ROOT
#
# Task i trains point i of SWEEP (a config file with get_sweep, optionally FILE.py:ARG) into
# ROOT/<point name>; a finished point is skipped, an interrupted one resumes. SLURM sends
# SIGTERM before preempting; the trainer saves, and with --requeue the task resumes.
#SBATCH --job-name=vitreg_sweep
#SBATCH --signal=TERM@120
set -euo pipefail
SWEEP=${1:?usage: slurm_array.sh SWEEP ROOT}
ROOT=${2:?usage: slurm_array.sh SWEEP ROOT}
: "${SLURM_ARRAY_TASK_ID:?run through sbatch --array=... (SLURM_ARRAY_TASK_ID is unset)}"
srun python -m vitreg_jax.sweep "${SWEEP}" --workdir="${ROOT}" --local \
    --index="${SLURM_ARRAY_TASK_ID}"
