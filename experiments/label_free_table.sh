#!/usr/bin/env bash
# Issue 27's runs: head selection without OOD labels, over four spurious-correlation datasets.
# ERM and DIV x 3 seeds each, every run with head_eval on (the full model and each head of the
# last block alone on val_id, val_ood, test_id, test_ood at every evaluation, heads_eval.jsonl),
# then one `heads --table` per dataset (the authors' statistics: choices on validation, figures
# on test; --out also writes the k-label curve where the heads module makes it).
#
#   experiments/label_free_table.sh OUT [STEPS]        # STEPS: the quickstart-recipe runs' (600)
#   EPOCHS=10 experiments/label_free_table.sh OUT      # the authors'-recipe runs' epochs
#   DRY_RUN=1 experiments/label_free_table.sh OUT      # build the data, print the commands only
#
# Datasets and expected wall time per run (2-core CPU; a busy machine takes 3-5x longer):
#   dominoes_quickstart  configs/quickstart.py (embedded dominoes, ViT width 64 depth 4, patch
#                        4, Adam 1e-3, 600 steps, 2000 examples per eval split): ~1 min quiet
#                        (the README's 50 s), ~5 min at a load of 5-7 (28 min for the six).
#   dominoes_authors     configs/mnist_cifar.py:table,epochs=EPOCHS (the authors' depth-6 ViT,
#                        recipe and per-method lr; EPOCHS=10 by default: 1250 steps, ten
#                        evaluations of every head): ERM 6.8, DIV 4.7 steps/s on a quiet CPU.
#   colored_digits       experiments/colored_digits (quickstart recipe, patch 8, 1000 per eval
#                        split): ~1.5 min (300 steps of its textured twin took 45 s shared).
#   textured_digits      experiments/textured_digits (same recipe): ~1.5 min at 600 steps.
# In all, 24 runs: about an hour on a quiet 2-core CPU, several on a busy one. A sweep skips
# finished runs and resumes interrupted ones, so rerunning the script continues it.
set -euo pipefail

OUT=${1:?usage: experiments/label_free_table.sh OUT [STEPS]}
STEPS=${2:-600}
SEEDS=3
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
PY=${PYTHON:-python}
DRY=${DRY_RUN:-}
mkdir -p "$OUT/data" "$OUT/tables"

# The two npz datasets (seconds each; kept when already there).
[ -f "$OUT/data/colored_digits/test_ood.npz" ] ||
  $PY "$HERE/colored_digits/make_colored_digits.py" --out="$OUT/data/colored_digits"
[ -f "$OUT/data/textured_digits/test_ood.npz" ] ||
  $PY "$HERE/textured_digits/make_textured_digits.py" --out="$OUT/data/textured_digits"

sweep() {  # sweep NAME CONFIG_FILE: ERM and DIV x SEEDS seeds of the file's get_sweep
  $PY -m vitreg_jax.sweep "$2:steps=$STEPS,seeds=$SEEDS" --workdir="$OUT/$1" --local \
      ${DRY:+--dry-run}
}
sweep dominoes_quickstart "$ROOT/configs/quickstart.py"
COLORED_DIGITS="$OUT/data/colored_digits" sweep colored_digits \
    "$HERE/colored_digits/colored_digits_config.py"
TEXTURED_DIGITS="$OUT/data/textured_digits" sweep textured_digits \
    "$HERE/textured_digits/textured_digits_config.py"

# The authors' recipe on dominoes (batch 80, per-method lr, MultiStepLR at 70%/80%, 20/80
# val/test, evaluated after every epoch): EPOCHS epochs of 125 steps (default 10).
$PY -m vitreg_jax.sweep "$ROOT/configs/mnist_cifar.py:table,epochs=${EPOCHS:-10},seeds=$SEEDS" \
    --workdir="$OUT/dominoes_authors" --local ${DRY:+--dry-run}

[ -n "$DRY" ] && exit 0
for name in dominoes_quickstart dominoes_authors colored_digits textured_digits; do
  $PY -m vitreg_jax.heads --table "$OUT/$name"/*/ --out "$OUT/tables/$name" \
      | tee "$OUT/tables/$name.txt"
done
