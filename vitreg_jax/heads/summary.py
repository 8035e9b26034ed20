"""The authors' statistics of a run, from its per-eval head figures (`heads_eval.jsonl`).

The head-diversity authors report, per run (ArmandNM/diverse-vit, scripts/reporting.py,
`get_experiment_summary`, over the per-epoch figures of diverse_vit/training.py,
`evaluate_epoch_head_combinations`):
* the ERM / DIV rows ("ALL HEADS"): the full model's test OOD accuracy at the epoch with the
  best OOD-validation accuracy of the full model (`results[...valOOD].idxmax()`);
* the +SEL rows ("BEST HEAD"): the (epoch, head) pair with the best OOD-validation accuracy of
  the head alone (`np.unravel_index(argmax)` over epochs x heads), tested at that pair.
Ties go to the earliest epoch, then the lowest head, as their `idxmax` / `argmax` do.

Here an "epoch" is an evaluation step (the poster configs evaluate once per epoch, as the
authors' `run_training` does; the quickstart three times per run). `STATISTICS`: `authors` (above, the default) or
`final` (every figure at the last evaluation: the final checkpoint, one flag away).

Selection rules (`RULES`) differ in what they read to choose among the same candidates (the
full model and each logged head alone, at each evaluation step):
* `oracle`: OOD validation labels. The authors' BEST HEAD: heads alone, scored on `val_ood`
  (Waterbirds: its OOD metric, `roles.py`). The ceiling: it reads the distribution it is
  tested on.
* `id_conflict`: attribute (group) labels of ID validation examples: the candidate with the
  best accuracy on the ID validation examples whose spurious attribute disagrees with the
  label (`conflict_accuracy`), the full model included (so a head is kept only when it beats
  the full model there). Worst-group-style selection with group labels on validation data
  (Sagawa et al. 2020; Idrissi et al. 2022, "Simple data balancing...", choose on
  worst-group validation accuracy). On Waterbirds the ID validation split is `val`, which is
  group-balanced.
* `id_val`: ID validation images and labels only: the candidate with the best `val_id`
  accuracy. The "training-domain validation" of Gulrajani & Lopez-Paz 2021 ("In search of
  lost domain generalization"), the model selection available without OOD data or
  attributes; the poster's take-away "we still need OOD information to select the heads" is
  what it tests.
The ERM / DIV rows themselves (the full model) are chosen on OOD validation labels by the
authors' statistic, as in their table.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

from etils import epath

from vitreg_jax import errors
from vitreg_jax.roles import Roles

HEAD_EVAL_FILE = "heads_eval.jsonl"

STATISTICS = ("authors", "final")
RULES = ("oracle", "id_conflict", "id_val")
# What each choice reads, for the tables and docs.
READS = {"full": "OOD validation labels (the step)", "oracle": "OOD validation labels",
         "id_conflict": "ID validation attribute (group) labels",
         "id_val": "ID validation labels only"}


def read_head_eval(workdir: str) -> list[dict]:
  """The lines of `WORKDIR/heads_eval.jsonl` (`heads/training.py` writes them; empty if the
  run did not log them); a line repeated by a resumed run replaces the earlier one."""
  path = epath.Path(workdir) / HEAD_EVAL_FILE
  if not path.exists():
    return []
  latest = {}
  with path.open() as f:
    for line in f:
      r = json.loads(line)
      latest[(r["step"], r["split"], r["kind"], r["layer"], r["head"])] = r
  return list(latest.values())


def _score(record: dict | None, key: str) -> float:
  value = None if record is None else record.get(key)
  return -math.inf if value is None or not math.isfinite(value) else float(value)


def _index(records: Sequence[dict]) -> dict:
  """`{(step, split, kind, layer, head): record}`."""
  return {(r["step"], r["split"], r["kind"], r["layer"], r["head"]): r for r in records}


def candidates(records: Sequence[dict]) -> list[tuple]:
  """Every logged (step, kind, layer, head), in the authors' tie order: step, then full
  model before heads, then layer and head."""
  keys = {(r["step"], r["kind"], r["layer"], r["head"]) for r in records}
  return sorted(keys, key=lambda k: (k[0], k[1] != "full", k[2] or 0, k[3] or 0))


def _choose(keys: list[tuple], index: dict, split: str, metric: str):
  """The first key with the best `metric` on `split` (None when no key has it)."""
  best, best_score = None, -math.inf
  for key in keys:
    step, kind, layer, head = key
    score = _score(index.get((step, split, kind, layer, head)), metric)
    if score > best_score:
      best, best_score = key, score
  return best, best_score


def choose(records: Sequence[dict], roles: Roles, rule: str, statistic: str = "authors"):
  """The (step, kind, layer, head) a row reports, and its score.

  Args:
    records: a run's `heads_eval.jsonl` lines (`read_head_eval`).
    rule: 'full' (the ERM / DIV row: the full model) or one of `RULES`.
    statistic: 'authors' (choose the step too) or 'final' (the last evaluation only).
  Returns:
    `(key, score)`; `key` None when nothing was logged for the rule's split.
  """
  if statistic not in STATISTICS:
    raise errors.UserError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
  keys = candidates(records)
  if statistic == "final" and keys:
    last = max(k[0] for k in keys)
    keys = [k for k in keys if k[0] == last]
  index = _index(records)
  if rule == "full":
    keys = [k for k in keys if k[1] == "full"]
    if statistic == "final":
      return (keys[0] if keys else None), math.nan
    return _choose(keys, index, roles.val_ood, roles.ood_metric)
  if rule == "oracle":
    return _choose([k for k in keys if k[1] == "alone"], index, roles.val_ood,
                   roles.ood_metric)
  if rule == "id_conflict":
    return _choose(keys, index, roles.val_id, "conflict_accuracy")
  if rule == "id_val":
    return _choose(keys, index, roles.val_id, roles.id_metric)
  raise errors.UserError(f"Unknown selection rule {rule!r}; valid rules: {list(RULES)} (and "
                   "'full').")


def summarize(records: Sequence[dict], roles: Roles, rules: Sequence[str] = RULES,
              statistic: str = "authors") -> dict:
  """Per row (`full` and each rule): the chosen `step`, `kind`, `layer`, `head`, `score` and
  the metrics of that choice on every logged split (`metrics`: {split: {...}})."""
  if not records:
    raise errors.UserError("No per-eval head figures: train with config.head_eval='-1' (the "
                     "poster configs and the quickstart do) to get the authors' statistics.")
  index = _index(records)
  splits = sorted({r["split"] for r in records})
  out = {}
  for rule in ("full", *rules):
    key, score = choose(records, roles, rule, statistic)
    if key is None:
      out[rule] = None
      continue
    step, kind, layer, head = key
    out[rule] = {"step": step, "kind": kind, "layer": layer, "head": head, "score": score,
                 "metrics": {s: strip(index[(step, s, kind, layer, head)]) for s in splits
                             if (step, s, kind, layer, head) in index}}
  return out


def strip(record: dict) -> dict:
  """A record's metrics, without its (step, split, kind, layer, head) key."""
  return {k: v for k, v in record.items()
          if k not in ("step", "split", "kind", "layer", "head")}
