#!/usr/bin/env bash
# Launch vitreg_jax on a SLURM GPU cluster: one process per GPU, all nodes in one job.
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-task=1 --time=24:00:00 \
#       launch/slurm.sh configs/quickstart.py /shared/workdirs/run1 [--config.seed=1 ...]
#
# jax.distributed.initialize() reads the SLURM variables itself (vitreg_jax.main calls it
# when SLURM_NTASKS > 1).
#
# Time limit: 120 s before it, SLURM sends USR1 to this script (--signal=B:USR1@120). The
# script forwards SIGTERM to the tasks (srun passes signals on); they agree on a step, save
# it and exit, then the script requeues the job (`scontrol requeue`), which restarts later
# and resumes from that checkpoint. Raise the 120 s if a save takes longer.
# scancel and SLURM's own preemption send SIGTERM to the tasks directly: they save and stop;
# this script does not requeue them (SLURM does, for a preemption with PreemptMode=REQUEUE).
#SBATCH --job-name=vitreg_jax
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail
CONFIG=${1:?usage: slurm.sh CONFIG WORKDIR [overrides...]}
WORKDIR=${2:?usage: slurm.sh CONFIG WORKDIR [overrides...]}
shift 2

time_limit=0
on_time_limit() {
  time_limit=1
  echo "slurm.sh: time limit near: the tasks save a checkpoint, then job ${SLURM_JOB_ID} is requeued." >&2
  kill -TERM "${srun_pid}" 2>/dev/null || true
}
trap on_time_limit USR1
srun python -m vitreg_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" "$@" &
srun_pid=$!
status=0
wait "${srun_pid}" || status=$?
if (( time_limit )); then  # The trap cut the first wait short: wait for the save to finish.
  status=0
  wait "${srun_pid}" || status=$?
  scontrol requeue "${SLURM_JOB_ID}"
fi
exit "${status}"
