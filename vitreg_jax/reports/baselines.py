r"""The spurious-correlation table: head selection beside the field's baselines, on one dataset.

  python -m vitreg_jax.reports RUNS... [--out DIR]     (the `baselines` table, among others)

Rows, each at the level of information it uses (README, "Head selection beside GroupDRO, JTT
and DFR"; the runs: configs/baselines.py, `python -m vitreg_jax.heads`, `python -m
vitreg_jax.baselines.dfr`):

| row | trained with | chosen with |
|---|---|---|
| ERM, DIV | labels | nothing: the last checkpoint |
| ERM, DIV (val WG ckpt) | labels | the checkpoint with the best worst-group accuracy on the ID validation split (its group labels) |
| ERM+SEL, DIV+SEL (val WG) | labels | the head (alone) with the best worst-group accuracy on the ID validation split |
| ERM+SEL, DIV+SEL (oracle) | labels | the head with the best OOD validation accuracy (the poster's oracle) |
| DFR, DFR+SEL | labels; the head refit on ID validation group labels | C on half of that split (DFR+SEL: the head mask of `heads.json`) |
| GroupDRO | labels and training group labels | the val-WG checkpoint |
| JTT | labels (+ the identification run's errors) | the val-WG checkpoint |

Figures on the OOD test split (`roles.split_roles`: `test_ood`; Waterbirds `test`):
worst-group accuracy (`worst_group_accuracy`) and the mean accuracy weighted by the training
split's group proportions (`train_weighted_mean_accuracy`: the Waterbirds papers' "mean
accuracy", not the split's own accuracy); and ID accuracy on the ID test split
(`roles.id_metric`: on Waterbirds that same train-weighted mean of `test`). Mean ± sample
std over seeds. The published column gives Waterbirds worst-group accuracies of ResNet-50s
(`papers.SPURIOUS_BASELINES`), for orientation only: another backbone, another recipe.
A JTT identification run (its workdir holds `jtt_error_set.json`) is not a row.
"""

from __future__ import annotations

import functools
import json
import math

from etils import epath

from vitreg_jax import data
from vitreg_jax import metrics as metrics_lib
from vitreg_jax import roles as roles_lib
from vitreg_jax.heads import rules
from vitreg_jax.reports import papers
from vitreg_jax.reports.tables import Table, mean_std

DFR_FILES = {"DFR": "dfr.json", "DFR+SEL": "dfr_sel.json"}
JTT_ERRORS = "jtt_error_set.json"  # jtt.ERROR_SET_FILE (jtt imports JAX; the report does not)


def method(config: dict) -> str:
  """ERM / DIV / GroupDRO / JTT from a run's saved config."""
  if (config.get("loss") or {}).get("name") == "group_dro":
    return "GroupDRO"
  if (config.get("data") or {}).get("sampler") == "upsample":
    return "JTT"
  return papers.method(config).replace("ViT+", "")


@functools.lru_cache(maxsize=16)
def _train_counts(data_json: str):
  try:
    return tuple(data.open(json.loads(data_json)).group_counts())
  except Exception:  # pylint: disable=broad-except  # data not here: the column stays empty
    return None


def figures(by_split: dict, roles, config: dict) -> dict:
  """`{"id", "mean", "worst"}` in percent from per-split metrics (None where unmeasured)."""
  test = by_split.get(roles.test_ood) or {}
  mean = test.get("train_weighted_mean_accuracy")
  if mean is None and test:
    counts = _train_counts(json.dumps(config.get("data", {}), sort_keys=True))
    mean = None if counts is None else metrics_lib.train_weighted_mean_accuracy(test, counts)
  pct = lambda v: None if v is None or not math.isfinite(v) else 100.0 * v
  # ID: `roles.id_metric` (Waterbirds: the train-weighted mean of `test`, roles.py).
  ident = (by_split.get(roles.test_id) or {}).get(roles.id_metric)
  if ident is None and roles.id_metric == roles_lib.GROUPED_ID_METRIC:
    ident = mean if roles.test_id == roles.test_ood else None
  return {"id": pct(ident), "mean": pct(mean), "worst": pct(test.get("worst_group_accuracy"))}


def best_step(run, split: str, metric: str) -> int | None:
  """The eval step with the best `metric` on `split` (ties: the latest)."""
  steps = {s: m.get(metric) for s, m in (run.evals.get(split) or {}).items()}
  steps = {s: v for s, v in steps.items() if v is not None and math.isfinite(v)}
  return max(steps, key=lambda s: (steps[s], s)) if steps else None


def _at(run, step: int | None) -> dict:
  if step is None:
    return {}
  return {split: by_step[step] for split, by_step in run.evals.items() if step in by_step}


def best_head(heads_json: dict, rule: str, roles) -> dict | None:
  """The per-split `alone` figures of the head that selection rule `rule` (`worst_group`,
  `oracle`: heads/rules.py, its meaning, missing-value score and tie order) chooses among the
  heads of a `heads.json`; None when no head has what the rule reads."""
  table = rules.Table(rules.Candidate(heads_json.get("step"), "alone", h["layer"], h["head"],
                                      h["alone"]) for h in heads_json.get("heads", []))
  choice = rules.choose(rule, rules.Context(table, roles))
  return None if choice is None else dict(choice.candidate.metrics)


def _read(workdir: str, name: str) -> dict | None:
  path = epath.Path(workdir) / name
  return json.loads(path.read_text()) if path.exists() else None


def run_rows(run, roles) -> dict:
  """`{(row, information): per-split metrics}` of one run, every level it supports."""
  base, val = method(run.config), roles.val_id
  last = {s: run.final(s) for s in run.evals}
  wg = _at(run, best_step(run, val, "worst_group_accuracy"))
  if base in ("GroupDRO", "JTT"):
    info = "train groups; val-WG ckpt" if base == "GroupDRO" else "val-WG ckpt (lambda, T fixed)"
    return {(base, info): wg}
  rows = {(base, "none (last ckpt)"): last, (base, "val groups (WG ckpt)"): wg}
  heads = run.heads or _read(run.workdir, "heads.json")
  if heads:
    rows[(base + "+SEL", "val groups (WG head)")] = best_head(heads, "worst_group", roles)
    rows[(base + "+SEL", "OOD val (oracle head)")] = best_head(heads, "oracle", roles)
  for name, file in DFR_FILES.items():
    result = _read(run.workdir, file)
    if result and base == "ERM":
      info = f"val groups (refit on {result['heldout_split']})"
      if name == "DFR+SEL":  # the mask came from the run's heads.json selection
        rule = (heads or {}).get("rule", "?")
        info = f"val groups (refit on {result['heldout_split']}; {rule} head)"
      rows[(name, info)] = result["dfr"]
  return rows


def baselines_table(groups) -> Table | None:
  """The one table of ERM, DIV, +SEL, DFR, DFR+SEL, GroupDRO and JTT (module docstring)."""
  runs = [r for g in groups for r in g.runs
          if {"val_id", "val_ood"} <= set(r.evals) or "val" in r.evals]
  runs = [r for r in runs if not (epath.Path(r.workdir) / JTT_ERRORS).exists()]
  if not runs or not any(method(r.config) in ("GroupDRO", "JTT") or
                         _read(r.workdir, "dfr.json") for r in runs):
    return None  # Only the poster's runs: the poster table covers them.
  datasets = sorted({r.config["data"]["name"] for r in runs})
  collected: dict = {}
  for run in runs:
    dataset = run.config["data"]["name"]
    roles = roles_lib.split_roles(sorted(run.evals), dataset=dataset, missing_ok=True)
    for (row, info), by_split in run_rows(run, roles).items():
      if by_split:
        collected.setdefault((dataset, row, info), []).append(
            (figures(by_split, roles, run.config), run.problems))
  order = {m: i for i, m in enumerate(papers.SPURIOUS_METHODS)}
  header = ["dataset", "method", "information used", "seeds", "status", "ID acc.",
            "mean acc. (train-weighted)", "worst-group acc.", "published worst-group"]
  rows = []
  for (dataset, row, info) in sorted(collected, key=lambda k: (k[0], order.get(k[1], 99), k[2])):
    figs = [f for f, _ in collected[(dataset, row, info)]]
    status = "; ".join(p for _, problems in collected[(dataset, row, info)]
                       for p in problems) or "ok"
    stat = lambda key: mean_std([f[key] for f in figs if f[key] is not None], scale=1.0)
    rows.append([dataset, row, info, len(figs), status, stat("id"), stat("mean"),
                 stat("worst"), papers.spurious_published(dataset, row)])
  note = ("Test figures (%), mean ± std over seeds: ID acc. on the ID test split (Waterbirds: "
          "the train-weighted mean of `test`); mean and "
          "worst-group accuracy on the OOD test split (`test_ood`; Waterbirds `test`), the "
          "mean weighted by the training groups' proportions. 'val groups': group labels of "
          "the ID validation split; 'OOD val': the OOD validation split. Published: Waterbirds,"
          " ResNet-50 (another backbone and recipe).")
  return Table("baselines", f"Head selection beside the baselines ({', '.join(datasets)})",
               header, rows, runs, note)
