#!/usr/bin/env bash
# ARViT's Table 1 at small scale on the embedded data (issue 28; docs/embedded.md).
#
#   scripts/arvit_table.sh ROOT            # runs what is not done yet, then the report
#   DRY_RUN=1 scripts/arvit_table.sh ROOT  # prints the commands, runs nothing
#
# For every row and seed, three runs of configs/arvit.py, in this order (a fine-tuning run
# starts from its own seed's pretraining checkpoint, so the pretraining comes first):
#   ROOT/<row>_rot_s<seed>      rotation pretraining on embedded_rotation
#   ROOT/<row>_ft_s<seed>       fine-tuning on embedded from it (init=...)
#   ROOT/<row>_scratch_s<seed>  the same fine-tuning from scratch
# then `python -m vitreg_jax.reports ROOT` (its arvit_embedded table: mean and spread over
# seeds, pretrained vs scratch, the thesis' figure beside) and the attention-distance analysis
# of the seed-0 fine-tuned rows. `python -m vitreg_jax.sweep` cannot say that one point starts
# from another's checkpoint, hence this script.
#
# Knobs (environment):
#   ROWS            Table 1 rows (configs/arvit.py variants); default the issue's subset and
#                   both baselines: "base vit_tiny L3 L6 R1-1 R1-5"
#   SEEDS           default "0 1 2"
#   PRETRAIN_STEPS  steps of each pretraining run; 0 (default) = the config's (EMBEDDED_STEPS);
#                   else more than its 100 warmup steps (EMBEDDED_PRETRAIN_WARMUP)
#   FINETUNE_STEPS  steps of each fine-tuning run; 0 (default) = the config's
#   PYTHON          default python
# A run that finished leaves ROOT/<run>/table_done and is skipped next time; an interrupted
# one resumes from its newest checkpoint (the trainer does that by itself). Changing the steps
# of a run already started is refused by the trainer's resume check: use a new ROOT.
set -euo pipefail

USAGE="usage: scripts/arvit_table.sh ROOT (env: ROWS SEEDS PRETRAIN_STEPS FINETUNE_STEPS DRY_RUN)"
ROOT=${1:?$USAGE}
ROWS=${ROWS:-"base vit_tiny L3 L6 R1-1 R1-5"}
SEEDS=${SEEDS:-"0 1 2"}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-0}
FINETUNE_STEPS=${FINETUNE_STEPS:-0}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-}
cd "$(dirname "$0")/.."
if [[ "$PRETRAIN_STEPS" != 0 && "$PRETRAIN_STEPS" -le 100 ]]; then
  echo "PRETRAIN_STEPS must be 0 (the config's) or above the 100 warmup steps," \
       "got $PRETRAIN_STEPS" >&2
  exit 2
fi

steps_flag() {  # --config.total_steps=N, or nothing for the config's own
  if [[ "$1" != 0 ]]; then echo "--config.total_steps=$1"; fi
}

train() {  # train WORKDIR CONFIG_ARG STEPS
  local workdir=$1 arg=$2 steps=$3
  local cmd=("$PYTHON" -m vitreg_jax.main "--config=configs/arvit.py:$arg" "--workdir=$workdir")
  local flag; flag=$(steps_flag "$steps")
  if [[ -n "$flag" ]]; then cmd+=("$flag"); fi
  if [[ -n "$DRY_RUN" ]]; then echo "${cmd[*]}"; return; fi
  if [[ -e "$workdir/table_done" ]]; then echo "done: $workdir"; return; fi
  echo "running: ${cmd[*]}"
  "${cmd[@]}"
  touch "$workdir/table_done"
}

for seed in $SEEDS; do
  for row in $ROWS; do
    rot=$ROOT/${row}_rot_s$seed
    train "$rot" "variant=$row,dataset=embedded_rotation,seed=$seed" "$PRETRAIN_STEPS"
    train "$ROOT/${row}_ft_s$seed" "variant=$row,dataset=embedded,seed=$seed,init=$rot" \
        "$FINETUNE_STEPS"
    train "$ROOT/${row}_scratch_s$seed" "variant=$row,dataset=embedded,seed=$seed" \
        "$FINETUNE_STEPS"
  done
done

report=("$PYTHON" -m vitreg_jax.reports "$ROOT" "--out=$ROOT/report")
first_seed=${SEEDS%% *}
analysis=("$PYTHON" -m vitreg_jax.analysis.attention_distance)
for row in $ROWS; do analysis+=("--workdir=$ROOT/${row}_ft_s$first_seed"); done
analysis+=("--out=$ROOT/attention_distance" --split=test)
if [[ -n "$DRY_RUN" ]]; then echo "${report[*]}"; echo "${analysis[*]}"; exit 0; fi
"${report[@]}"
"${analysis[@]}"
