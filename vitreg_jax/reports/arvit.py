"""ARViT's Table 1 at small scale, on the embedded data (docs/embedded.md): `arvit_embedded`.

  python -m vitreg_jax.reports RUNS... [--out DIR]   (the `arvit_embedded` table, among others)

The thesis (papers/arvit-attention-regularization.txt, Table 1) fine-tunes every model after
rotation pretraining on ImageNet. On the embedded chain (`configs/arvit.py:dataset=embedded`)
the question is also whether that pretraining helps at all, so each Table 1 row
(`papers.arvit_row`: ViT-Tiny, ARViT-Base, -L<k>, -R1-<k>) is split in two: fine-tuned from a
rotation-pretraining checkpoint (`config.init_from` set) and trained from scratch. Each cell is
the final top-1 on `test`, mean ± sample std over seeds (every run of the row and
initialization pooled: the seeds of a fine-tuned row start from different checkpoints, so
their configs differ in `init_from.path` only). `pretraining gain` is the pretrained mean
minus the scratch mean of the same row. The thesis' CIFAR-10 figure of the row stands beside
it for orientation only: another dataset (ImageNet -> CIFAR-10 at 224 px), another scale.
"""

from __future__ import annotations

import json

from vitreg_jax.reports import papers
from vitreg_jax.reports import runs as runs_lib
from vitreg_jax.reports import tables

DATASET = "embedded"
INITS = ("rotation", "scratch")  # fine-tuned from a rotation-pretraining checkpoint, or not
THESIS_DATASET = "cifar10"


def initialization(config: dict) -> str:
  """'rotation' when the run starts from a checkpoint (`init_from`), else 'scratch'."""
  return "rotation" if (config.get("init_from") or {}).get("path") else "scratch"


def _experiment(config: dict) -> str:
  """A config minus its bookkeeping, seed and checkpoint path: the pooled runs share it."""
  kept = {k: v for k, v in config.items() if k not in (*runs_lib.IGNORED, "init_from")}
  return json.dumps(kept, sort_keys=True, default=str)


def _cells(groups) -> dict:
  """`{(row, init): [group, ...]}` of the groups trained on the embedded downstream task."""
  cells = {}
  for g in groups:
    row = papers.arvit_row(g.config)
    if row and g.config.get("data", {}).get("name") == DATASET:
      cells.setdefault((row, initialization(g.config)), []).append(g)
  return cells


def _status(gs) -> str:
  notes = [g.problems() for g in gs if g.problems() != "ok"]
  if len({_experiment(r.config) for g in gs for r in g.runs}) > 1:
    notes.append(f"{len(gs)} configs pooled (they differ beyond seed and init_from)")
  return "; ".join(notes) or "ok"


def arvit_embedded_table(groups) -> tables.Table | None:
  """One row per (Table 1 row, initialization) on `embedded`; None without such runs."""
  cells = _cells(groups)
  if not cells:
    return None
  header = ["model", "initialization", "status", "steps", "embedded top-1 (%)",
            "pretraining gain", f"thesis {THESIS_DATASET} (a different dataset)"]
  thesis_column = papers.ARVIT_DATASETS.index(THESIS_DATASET)
  rows, runs = [], []
  models = {row for row, _ in cells}
  order = [m for m in papers.ARVIT if m in models] + sorted(models - set(papers.ARVIT))
  for model in order:
    means = {}
    for init in INITS:
      gs = cells.get((model, init))
      if not gs:
        continue
      stat = tables.mean_std([v for g in gs for v in g.values(tables.final_accuracy)])
      means[init] = stat[0]
      steps = sorted({runs_lib.total_steps(r.config) or 0 for g in gs for r in g.runs})
      thesis = papers.ARVIT.get(model, (None,) * 5)[thesis_column] if init == "rotation" else None
      rows.append([model, init, _status(gs), ",".join(map(str, steps)), stat, None, thesis])
      runs += [r for g in gs for r in g.runs]
    if len(means) == 2:
      gain = tables.diff(means["rotation"], means["scratch"])
      for row in rows[-2:]:
        row[5] = gain if row[1] == "rotation" else None
  note = ("ARViT Table 1 at small scale on `embedded` (docs/embedded.md): final top-1 on "
          "`test`, mean ± sample std over seeds (n), fine-tuned from rotation pretraining on "
          "`embedded_rotation` or trained from scratch; `pretraining gain` = pretrained - "
          "scratch. The thesis column is ImageNet -> CIFAR-10 at 224 px (Table 1), a different "
          "dataset and scale: compare orderings, not values.")
  return tables.Table("arvit_embedded", "ARViT (Table 1) on embedded data", header, rows, runs,
                      note)
