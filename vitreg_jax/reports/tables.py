"""Every table of the report, and the one poster table.

A `Table` renders as Markdown (for reading) and CSV (a `(mean, std, n)` cell becomes three
columns). `build_tables(groups)` makes the report's tables from `reports/runs.py`'s groups:
`runs_table` (every group), `poster_table` (the head-diversity poster's Tables 1-2),
`arvit_table` (ARViT Table 1) and `how_vits_work_table` (the slides' CIFAR comparisons); each
paper's published figures come from `reports/papers.py`.

The poster's table across head-selection runs, `heads_poster_table(workdirs)` (what
`python -m vitreg_jax.heads --table` prints, from each run's `heads.json`), is the same table
read from the other source: both take a run's method, its ID / OOD figures and the poster's
numbers from `papers`, and format mean ± std with `fmt`.
"""

import csv
import dataclasses
from typing import Callable, Sequence

from etils import epath
import numpy as np

from vitreg_jax.reports import papers
from vitreg_jax.reports import runs as runs_lib
from vitreg_jax.reports.runs import Run


def mean_std(values, scale=100.0) -> tuple[float | None, float | None, int]:
  if not values:
    return None, None, 0
  v = np.asarray(values, np.float64) * scale
  return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None), len(v)


def fmt(mean, std=None, n=None) -> str:
  if mean is None:
    return "-"
  text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
  return text + (f" (n={n})" if n and n > 1 else "")


def diff(ours, paper) -> str:
  return "-" if ours is None or paper is None else f"{ours - paper:+.2f}"


Stat = tuple  # (mean, std, n) in percent; a table cell is a Stat or a plain value.


@dataclasses.dataclass
class Table:
  """A table: Markdown for reading, CSV (a Stat cell becomes mean, std, n columns) for tools."""
  name: str
  title: str
  header: list
  rows: list
  runs: list      # the runs the table covers (for the curves)
  note: str = ""

  def markdown(self) -> str:
    cell = lambda c: fmt(*c) if isinstance(c, tuple) else ("-" if c is None else str(c))
    lines = [f"### {self.title}", ""] + ([self.note, ""] if self.note else [])
    lines.append("| " + " | ".join(self.header) + " |")
    lines.append("|" + "---|" * len(self.header))
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
    return "\n".join(lines) + "\n"

  def write_csv(self, path: str):
    stat_cols = {j for row in self.rows for j, c in enumerate(row) if isinstance(c, tuple)}
    header = []
    for j, h in enumerate(self.header):
      header += [f"{h} mean", f"{h} std", f"{h} n"] if j in stat_cols else [h]
    with epath.Path(path).open("w") as f:
      writer = csv.writer(f, lineterminator="\n")
      writer.writerow(header)
      for row in self.rows:
        out = []
        for j, c in enumerate(row):
          if j in stat_cols:
            out += list(c) if isinstance(c, tuple) else [c, None, None]
          else:
            out.append(c)
        writer.writerow(["" if v is None else v for v in out])


def _metric(split: str, key: str = "accuracy"):
  return lambda run: run.final(split).get(key)


# ---------------------------------------------------------------------------------- tables


def _time_to(run: Run, split: str, target: float) -> tuple[int | None, float | None]:
  """First eval step with accuracy >= target, and the loop's wall time until then.

  `elapsed_s` restarts at 0 when a run resumes, so the sessions' times are summed.
  """
  hit = next((s for s in sorted(run.evals.get(split, {}))
              if run.evals[split][s].get("accuracy", -1) >= target), None)
  if hit is None:
    return None, None
  total, last = 0.0, 0.0
  for step in sorted(run.train):
    e = run.train[step].get("elapsed_s")
    if e is None:
      return hit, None
    if e < last:  # A new session began.
      total += last
    last = e
    if step >= hit:
      return hit, total + e
  return hit, None


def runs_table(groups, target: float | None = None, target_split: str | None = None) -> Table:
  """Every group: status, final accuracy per split, final train loss, steps/time to target."""
  splits = sorted({s for g in groups for r in g.runs for s in r.evals})
  header = ["run", "seeds", "status"] + [f"{s} acc." for s in splits] + ["train loss"]
  tsplit = target_split or (splits[0] if splits else None)
  if target is not None:
    header += [f"steps to {target:.0%} {tsplit}", f"time to {target:.0%} (s)"]
  rows = []
  for g in groups:
    row = [g.label, len(g.runs), g.problems()]
    row += [mean_std(g.values(_metric(s))) for s in splits]
    loss = g.values(lambda r: r.train[max(r.train)].get("loss") if r.train else None)
    row.append(f"{np.mean(loss):.4f}" if loss else None)
    if target is not None:
      hits = [_time_to(r, tsplit, target) for r in g.runs]
      steps = [h[0] for h in hits if h[0] is not None]
      secs = [h[1] for h in hits if h[1] is not None]
      reached = f"{len(steps)}/{len(hits)} reached"
      row.append(f"{np.mean(steps):.0f}" + ("" if len(steps) == len(hits) else f" ({reached})")
                 if steps else "not reached")
      row.append(f"{np.mean(secs):.1f}" if secs else None)
    rows.append(row)
  note = ("Final evaluation of each run, mean ± std over seeds in percent; `status` lists "
          "what is wrong with a run (its figures are still shown).")
  if target is not None:
    note += (f" Steps to target: the first evaluation at which {tsplit} accuracy >= "
             f"{target:.0%} (resolution: the eval interval); time: the training loop's wall "
             "time until then (compilation and evaluations included).")
  return Table("runs", "All runs", header, rows, [r for g in groups for r in g.runs], note)


def _poster_figures(run: Run, which: str, roles: dict):
  """A run's poster figures (`papers.figures`, percent): 'full' from its final evaluations in
  metrics.jsonl at `roles` (the group's), 'selected' (the +SEL rows) from its heads.json,
  None without one."""
  if which == "selected":
    return (papers.result_figures(run.heads, "selected", run.config["data"]["name"])
            if run.heads else None)
  return papers.figures({s: run.final(s) for s in run.evals}, roles)


def poster_table(groups) -> Table | None:
  """The poster's Tables 1-2: ID / OOD accuracy per method, +SEL rows from heads.json."""
  groups = [g for g in groups if g.config.get("model_name") == "vit"
            and g.config.get("data", {}).get("name") in ("mnist_cifar", "waterbirds", "dominoes")]
  if not groups:
    return None
  header = ["dataset", "method", "seeds", "status", "ID acc.", "paper ID", "diff",
            "OOD acc.", "paper OOD", "diff"]
  rows = []
  methods = {(x.config["data"]["name"], papers.method(x.config)) for x in groups}
  for g in groups:
    name = g.config["data"]["name"]
    ood_key = "worst_group" if name == "waterbirds" else "ood"   # Waterbirds: worst group
    # Splits chosen per group: a seed that lost a split shows as missing, not as another split.
    roles = papers.reading_roles(name, {s for r in g.runs for s in r.evals})
    method = papers.method(g.config)
    label = method if len(groups) == len(methods) else f"{method} [{g.label}]"
    variants = [(label, method, "full", g.problems())]
    if any(r.heads for r in g.runs):
      have = sum(bool(r.heads) for r in g.runs)
      variants.append((label.replace(method, method + "+SEL"), method + "+SEL", "selected",
                       "ok" if have == len(g.runs) else f"heads.json in {have}/{len(g.runs)}"))
    for row_label, key, which, status in variants:
      per_run = [_poster_figures(r, which, roles) for r in g.runs]
      ours_id = mean_std([f["id"] for f in per_run if f and f["id"] is not None], scale=1.0)
      ours_ood = mean_std([f[ood_key] for f in per_run if f and f[ood_key] is not None],
                          scale=1.0)
      paper = papers.POSTER.get(name, {}).get(key)
      pid, pood = (paper[0], paper[1]) if paper else ((None, None), (None, None))
      rows.append([name, row_label, len(g.runs), status, ours_id, fmt(*pid), diff(ours_id[0], pid[0]),
                   ours_ood, fmt(*pood), diff(ours_ood[0], pood[0])])
  note = ("Poster Tables 1-2 layout. ID = in-distribution split, OOD = digit/background "
          "uncorrelated with the label (MNIST-CIFAR, dominoes: `*_ood` accuracy; Waterbirds: "
          "worst-group accuracy of `test`). +SEL rows: the head selection of "
          "`python -m vitreg_jax.heads` (heads.json `selected`). The poster has no dominoes "
          "figures.")
  return Table("poster", "Head diversity (poster Tables 1-2)", header, rows,
               [r for g in groups for r in g.runs], note)


def _eval_split(run: Run) -> str | None:
  splits = sorted(run.evals)
  return "test" if "test" in splits else (splits[0] if splits else None)


def _final_accuracy(run: Run):
  split = _eval_split(run)
  return run.final(split).get("accuracy") if split else None


def arvit_table(groups) -> Table | None:
  """ARViT Table 1: one row per model, one column per downstream task (top-1, final eval)."""
  cells = {}
  for g in groups:
    row, name = papers.arvit_row(g.config), g.config.get("data", {}).get("name")
    if row and name in papers.ARVIT_DATASETS:
      cells.setdefault(row, {}).setdefault(name, []).append(g)
  if not cells:
    return None
  header = ["model", "status"]
  for d in papers.ARVIT_DATASETS:
    header += [d, "paper", "diff"]
  rows, runs = [], []
  order = list(papers.ARVIT) + sorted(set(cells) - set(papers.ARVIT))
  for model in [m for m in order if m in cells]:
    status = []
    row = [model, None]
    for j, d in enumerate(papers.ARVIT_DATASETS):
      gs = cells[model].get(d, [])
      vals = [v for g in gs for v in g.values(_final_accuracy)]
      ours = mean_std(vals)
      status += [f"{d}: {g.problems()}" for g in gs if g.problems() != "ok"]
      if len(gs) > 1:
        status.append(f"{d}: {len(gs)} configs pooled")
      paper = papers.ARVIT.get(model, (None,) * 5)[j]
      row += [ours, paper, diff(ours[0], paper)]
      runs += [r for g in gs for r in g.runs]
    row[1] = "; ".join(status) or "ok"
    rows.append(row)
  note = ("ARViT Table 1 layout: top-1 accuracy (%) of the final evaluation on `test` (or the "
          "run's first eval split), mean ± std over seeds; `paper` is the paper's figure.")
  return Table("arvit", "ARViT (Table 1)", header, rows, runs, note)


def _corruption_accuracy(run: Run):
  accs = [run.final(s).get("accuracy") for s in run.evals if s not in ("test", "train")]
  accs = [a for a in accs if a is not None]
  return float(np.mean(accs)) if accs else None


def how_vits_work_table(groups) -> Table | None:
  """The slides' CIFAR comparisons: accuracy and accuracy under corruption per model."""
  groups = [g for g in groups if g.config.get("model_name") in ("vit", "resnet", "alternet")
            and g.config.get("data", {}).get("name", "").startswith("cifar")
            and papers.arvit_row(g.config) is None]
  if not groups:
    return None
  header = ["dataset", "model", "seeds", "status", "test acc.", "corruption acc.",
            "slides", "ours", "diff"]
  rows, by_label = [], {}
  for g in groups:
    dataset = g.config["data"]["name"].replace("_corrupted", "")
    label = papers.how_vits_work_row(g.config)
    acc = mean_std(g.values(_final_accuracy))
    by_label.setdefault((dataset, label), acc[0])
    rows.append([dataset, label, len(g.runs), g.problems(), acc,
                 mean_std(g.values(_corruption_accuracy)), None, None, None])
  for row in rows:  # The one figure the slides give: GAP over CLS, +2.7 points.
    if "GAP" in row[1]:
      cls = by_label.get((row[0], row[1].replace("GAP", "CLS")))
      ours = None if cls is None or row[4][0] is None else row[4][0] - cls
      row[6:] = ["GAP - CLS: +2.70", None if ours is None else f"{ours:+.2f}",
                 diff(ours, papers.GAP_OVER_CLS)]
  note = ("\"How do ViTs work?\" comparisons: final `test` accuracy and the mean accuracy "
          "over the corrupted splits (CIFAR-C, `robustness` runs), in percent. The slides "
          "give one number (GAP improves accuracy by +2.7 over CLS); the local-window and "
          "AlterNet claims are orderings (5x5 > 3x3 > 8x8; AlterNet > ResNet > ViT).")
  return Table("how_vits_work", "How do ViTs work? (CIFAR)", header, rows,
               [r for g in groups for r in g.runs], note)


def poster_table_data(workdirs: Sequence[str], load: Callable[[str], dict] | None = None
                      ) -> dict:
  """Per method the test figures (in %) of each run: `{"dataset", "rules", "rows":
  {method: {"id": [...], "ood": [...], "worst_group": [...], "workdirs": [...]}}}`.

  `load(workdir)` returns a run's heads.json dict (default: `runs.read_heads`, which needs
  the file; `python -m vitreg_jax.heads --table` passes one that computes it when missing).
  """
  load = load or runs_lib.read_heads
  if not workdirs:
    raise ValueError("The poster table needs at least one workdir.")
  new_row = lambda: {"id": [], "ood": [], "worst_group": [], "workdirs": []}
  rows = {m: new_row() for m in papers.METHODS}
  datasets, rules = set(), set()
  for workdir in workdirs:
    result = load(workdir)
    base = papers.method(runs_lib.read_config(workdir))
    datasets.add(result["dataset"])
    rules.add(result["rule"])
    for method, which in ((base, "full"), (base + "+SEL", "selected")):
      row = rows.setdefault(method, new_row())
      for key, value in papers.result_figures(result, which).items():
        row[key].append(float("nan") if value is None else value)
      row["workdirs"].append(workdir)
  if len(datasets) > 1:
    raise ValueError(f"The runs use different datasets {sorted(datasets)}; one table per "
                     "dataset.")
  return {"dataset": datasets.pop(), "rules": sorted(rules), "rows": rows}


def _mean_std(values) -> str:
  """`mean ± sample std` of values already in percent (`-` when none is finite)."""
  values = np.asarray(values, np.float64)
  if not len(values) or np.isnan(values).all():
    return "-"
  return fmt(*mean_std(list(values), scale=1.0)[:2])


def heads_poster_table(workdirs: Sequence[str], load: Callable[[str], dict] | None = None
                       ) -> str:
  """The poster's table, `Method | ID Acc. | OOD Acc.`, over several runs (seeds x methods).

  ERM / DIV is read from each run's config; `+SEL` rows use each run's selected mask (its
  `heads.json`). Figures are on the test splits, in %, mean ± sample std (ddof=1) over runs;
  Waterbirds adds worst-group accuracy; MNIST-CIFAR and Waterbirds add the poster's numbers.
  `load`: see `poster_table_data`.
  """
  data = poster_table_data(workdirs, load)
  dataset, rows = data["dataset"], data["rows"]
  waterbirds, poster = dataset == "waterbirds", dataset in papers.POSTER
  header = ["Method", "ID Acc.", "OOD Acc."] + (["Worst-group Acc."] if waterbirds else []) \
      + ["Runs"] + (["Poster ID / OOD"] if poster else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, row in rows.items():
    cells = [method, _mean_std(row["id"]), _mean_std(row["ood"])]
    cells += [_mean_std(row["worst_group"])] if waterbirds else []
    paper = papers.paper_text(dataset, method)
    cells += [str(len(row["id"]))] + ([" / ".join(paper) if paper else "-"] if poster else [])
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines.append(f"{dataset}, test splits, mean ± std over runs; SEL: rule "
               f"{', '.join(data['rules'])} chosen on the OOD validation split.")
  return "\n".join(lines) + "\n"


def build_tables(groups, target=None, target_split=None) -> list[Table]:
  """The report's tables of `groups` (those that apply to them), the runs table last."""
  tables = [poster_table(groups), arvit_table(groups), how_vits_work_table(groups),
            runs_table(groups, target, target_split)]
  return [t for t in tables if t is not None]
