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
authors' `run_training` does; the quickstart three times per run). `STATISTICS`: `authors`
(above, the default) or `final` (every figure at the last evaluation: the final checkpoint,
one flag away). The spread over runs (`STDS`): `sample` (ddof 1, the default) or `authors`
(ddof 0, the `np.std` of their `compute_overview_all_runs`); tables name theirs.

The +SEL rows' rules are those of heads/rules.py (`TABLE_RULES` by default: `oracle`, the
authors' BEST HEAD and the ceiling; `id_conflict`; `id_val`), each choosing among the full
model and every logged head alone at every evaluation step, in the authors' tie order. The
ERM / DIV rows themselves (the full model) are chosen on OOD validation labels by the
authors' statistic, as in their table.
"""

from __future__ import annotations

import json
import math
from typing import Mapping, Sequence

from etils import epath

from vitreg_jax import errors
from vitreg_jax.heads import examples as examples_lib
from vitreg_jax.heads import rules as rules_lib
from vitreg_jax import roles as roles_lib
from vitreg_jax.roles import Roles

HEAD_EVAL_FILE = "heads_eval.jsonl"

STATISTICS = ("authors", "final")
# The spread over runs (`--std`): name -> (numpy's ddof, how a table's note names it). The
# authors' scripts/reporting.py (`compute_overview_all_runs`) calls `np.std`: ddof=0.
STDS = {"sample": (1, "sample std over runs (ddof=1)"),
        "authors": (0, "population std over runs (ddof=0, the authors' np.std)")}
# The +SEL rows of the poster table, by default (any rule that needs no mask evaluation can
# be named instead: `rules.names(records=True)`).
TABLE_RULES = ("oracle", "id_conflict", "id_val")


def spread(std: str) -> tuple[int, str]:
  """`STDS[std]`, or a UserError naming the valid names."""
  if std not in STDS:
    raise errors.UserError(f"--std must be one of {sorted(STDS)}, got {std!r}.")
  return STDS[std]


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


def run_roles(records: Sequence[dict], config: Mapping) -> Roles:
  """The roles of the splits a run meant to evaluate (its records' and its config's
  `data.eval_splits`): a lost split shows as missing, never as an error."""
  splits = {r["split"] for r in records} | set(config["data"].get("eval_splits") or [])
  return roles_lib.split_roles(sorted(splits), dataset=config["data"]["name"],
                               missing_ok=True)


def choose(records: Sequence[dict], roles: Roles, rule: str, statistic: str = "authors",
           examples: Mapping | None = None) -> rules_lib.Choice | None:
  """The candidate a row reports (`rules.Choice`), None when nothing was logged for it.

  Args:
    records: a run's `heads_eval.jsonl` lines (`read_head_eval`).
    rule: 'full' (the ERM / DIV row: the full model at the step best on OOD validation) or a
      registered selection rule (`rules.names(records=True)`).
    statistic: 'authors' (choose the step too) or 'final' (the last evaluation only).
    examples: the run's per-example validation outputs by step (`examples.read` or
      `examples.Lazy`; `Context.data["examples"]`), what the label-free rules read.
  """
  if statistic not in STATISTICS:
    raise errors.UserError(f"--statistic must be one of {STATISTICS}, got {statistic!r}.")
  table = rules_lib.Table.from_records(records)
  if statistic == "final" and table.steps:
    table = table.where(step=table.steps[-1])
  if rule != "full":
    return rules_lib.choose(rule, rules_lib.Context(table, roles,
                                                    data={"examples": examples or {}}))
  full = table.where(kinds=("full",))
  if statistic == "final":  # No choice to make: the last evaluation's full model.
    return rules_lib.Choice(full.candidates[0], math.nan) if len(full) else None
  return rules_lib.best_of(full, roles.val_ood, roles.ood_metric)


def summarize(records: Sequence[dict], roles: Roles, rules: Sequence[str] = TABLE_RULES,
              statistic: str = "authors", workdir: str | None = None) -> dict:
  """Per row (`full` and each rule): the chosen `step`, `kind`, `layer`, `head`, `score` and
  the metrics of that choice on every logged split (`metrics`: {split: {...}}).

  `workdir`: the run, whose `heads_examples/` files the label-free rules read (loaded on
  first use; without it, or without the files, those rules choose nothing: an empty row)."""
  if not records:
    raise errors.UserError("No per-eval head figures: train with config.head_eval='-1' (the "
                           "poster configs and the quickstart do) to get the authors' "
                           "statistics.")
  out = {}
  examples = examples_lib.Lazy(workdir) if workdir else None
  for rule in ("full", *rules):
    choice = choose(records, roles, rule, statistic, examples)
    c = choice and choice.candidate
    out[rule] = c and {"step": c.step, "kind": c.kind, "layer": c.layer, "head": c.head,
                       "score": choice.score, "metrics": {s: dict(m) for s, m in
                                                          sorted(c.metrics.items())}}
  return out


def strip(record: dict) -> dict:
  """A record's metrics, without its (step, split, kind, layer, head) key."""
  return {k: v for k, v in record.items()
          if k not in ("step", "split", "kind", "layer", "head")}


def add_arguments(parser, where: str) -> None:
  """The poster table's `--statistic` and `--std` flags on an argparse `parser` (`heads
  --table` and `reports` both print that table); `where` starts each help text."""
  parser.add_argument("--statistic", default="authors", choices=STATISTICS,
                      help=f"{where}: 'authors' (step and head chosen on validation, as the "
                           "authors' get_experiment_summary) or 'final' (the final checkpoint)")
  parser.add_argument("--std", default="sample", choices=sorted(STDS),
                      help=f"{where}: the spread over runs, 'sample' (ddof=1) or 'authors' "
                           "(ddof=0, the np.std of their scripts/reporting.py); the table's "
                           "note names it")
