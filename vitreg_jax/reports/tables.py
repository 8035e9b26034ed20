"""Every table of the report, and the one poster table.

A `Table` renders as Markdown (for reading) and CSV (a `(mean, std, n)` cell becomes three
columns). `build_tables(groups)` makes the report's tables from `reports/runs.py`'s groups:
`runs_table` (every group), the head-diversity poster's Tables 1-2 (`report_poster_table`),
`arvit_table` (ARViT Table 1) and `how_vits_work_table` (the slides' CIFAR comparisons); each
paper's published figures come from `reports/papers.py`.

`poster_table(workdirs)` is the one poster table: `python -m vitreg_jax.reports` (through
`report_poster_table`) and `python -m vitreg_jax.heads --table` both print it. It reads each
run's per-eval head figures (heads_eval.jsonl) and reports the authors' statistics
(heads/summary.py) by default, the final checkpoint with `statistic='final'`.
"""

import csv
import dataclasses
from typing import Sequence

from etils import epath
import numpy as np

from vitreg_jax import metrics
from vitreg_jax.heads import rules as rules_lib
from vitreg_jax.heads import summary
from vitreg_jax.reports import papers
from vitreg_jax.reports import runs as runs_lib
from vitreg_jax.reports.runs import Run


def mean_std(values, scale=100.0, ddof: int = 1) -> tuple[float | None, float | None, int]:
  """`(mean, std with ddof (None below two values), n)` of `values * scale`."""
  if not values:
    return None, None, 0
  v = np.asarray(values, np.float64) * scale
  return float(v.mean()), (float(v.std(ddof=ddof)) if len(v) > 1 else None), len(v)


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


def _eval_split(run: Run) -> str | None:
  splits = sorted(run.evals)
  return "test" if "test" in splits else (splits[0] if splits else None)


def final_accuracy(run: Run):
  """A run's final accuracy on `test` (or its first eval split); None without one."""
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
      vals = [v for g in gs for v in g.values(final_accuracy)]
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


def _final_test(key: str):
  """A run's final `key` on `test` (or its first eval split); None without one."""
  return lambda run: run.final(_eval_split(run)).get(key) if _eval_split(run) else None


def _corruption_mean(key: str):
  """A run's final `key` averaged over its corrupted eval splits (all but test / train)."""
  def mean(run: Run):
    values = [run.final(s).get(key) for s in run.evals if s not in ("test", "train")]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
  return mean


# "How do ViTs work?" predictive performance beside accuracy: (metric, column, scale); NLL
# in nats, accuracy and ECE in percent. Runs logged before NLL / ECE existed show "-".
PREDICTIVE = (("accuracy", "acc.", 100.0), ("nll", "NLL", 1.0), ("ece", "ECE", 100.0))


def how_vits_work_table(groups) -> Table | None:
  """The slides' CIFAR comparisons: accuracy, NLL and ECE, clean and under corruption."""
  groups = [g for g in groups if g.config.get("model_name") in ("vit", "resnet", "preresnet", "alternet")
            and g.config.get("data", {}).get("name", "").startswith("cifar")
            and papers.arvit_row(g.config) is None]
  if not groups:
    return None
  header = ["dataset", "model", "seeds", "status"]
  header += [f"{where} {name}" for where in ("test", "corruption") for _, name, _ in PREDICTIVE]
  header += ["slides", "ours", "diff"]
  rows, by_label = [], {}
  for g in groups:
    dataset = g.config["data"]["name"].replace("_corrupted", "")
    label = papers.how_vits_work_row(g.config)
    acc = mean_std(g.values(final_accuracy))
    by_label.setdefault((dataset, label), acc[0])
    rows.append([dataset, label, len(g.runs), g.problems()]
                + [mean_std(g.values(read(key)), scale) for read in (_final_test,
                                                                     _corruption_mean)
                   for key, _, scale in PREDICTIVE] + [None, None, None])
  for row in rows:  # The one figure the slides give: GAP over CLS, +2.7 points.
    if "GAP" in row[1]:
      cls = by_label.get((row[0], row[1].replace("GAP", "CLS")))
      ours = None if cls is None or row[4][0] is None else row[4][0] - cls
      row[-3:] = ["GAP - CLS: +2.70", None if ours is None else f"{ours:+.2f}",
                  diff(ours, papers.GAP_OVER_CLS)]
  note = ("\"How do ViTs work?\" comparisons: final `test` accuracy, NLL (nats) and ECE "
          f"({metrics.ECE_BINS} equal-width confidence bins, percent), and their means over "
          "the corrupted splits (CIFAR-C, `robustness` runs); accuracy in percent. The slides "
          "give one number (GAP improves accuracy by +2.7 over CLS); the local-window and "
          "AlterNet claims are orderings (5x5 > 3x3 > 8x8; AlterNet > ResNet > ViT).")
  return Table("how_vits_work", "How do ViTs work? (CIFAR)", header, rows,
               [r for g in groups for r in g.runs], note)


# ------------------------------------------------------------------------- the poster table
POSTER_DATASETS = ("mnist_cifar", "waterbirds", "dominoes")
_NONE = {"id": None, "ood": None, "worst_group": None}


def run_records(workdir: str) -> tuple[list[dict], bool]:
  """A run's per-eval figures: its heads_eval.jsonl, or else (`False`) the full model's
  evaluations from metrics.jsonl (the ERM / DIV rows still get the authors' statistic)."""
  records = summary.read_head_eval(workdir)
  if records:
    return records, True
  evals, _ = runs_lib.read_metrics(workdir)
  return [{"step": step, "split": split, "kind": "full", "layer": None, "head": None, **m}
          for split, by_step in evals.items() for step, m in by_step.items()], False


def poster_rows(workdirs: Sequence[str], *, statistic: str = "authors",
                rules: Sequence[str] = summary.TABLE_RULES, labels: dict | None = None) -> dict:
  """The figures (percent) of every run for every poster row, by the statistic's choice.

  Rows `(label, rule)`: `rule` 'full' (ViT+ERM / ViT+DIV) or a selection rule (+SEL);
  `label` the run's method (`papers.method`), or `labels[workdir]` where given.
  Returns `{"datasets", "rows": {(label, rule): {"id", "ood", "worst_group", "steps",
  "workdirs", "method"}}, "missing": [workdirs without heads_eval.jsonl]}`.
  """
  for rule in rules:  # Before any run is read: an unknown rule, or one needing a checkpoint.
    rules_lib.check(rule, can_score_masks=False)
  rows, datasets, missing = {}, set(), []
  for workdir in workdirs:
    config = runs_lib.read_config(workdir)
    records, has_heads = run_records(workdir)
    if not has_heads:
      missing.append(workdir)
    if not records:
      continue
    dataset = config["data"]["name"]
    datasets.add(dataset)
    roles = summary.run_roles(records, config)
    chosen = summary.summarize(records, roles, rules if has_heads else (), statistic,
                               workdir=workdir)
    method = papers.method(config)
    label = (labels or {}).get(workdir, method)
    for rule in ("full", *(rules if has_heads else ())):
      row = rows.setdefault((label, rule), {"id": [], "ood": [], "worst_group": [],
                                            "steps": [], "workdirs": [], "dataset": dataset,
                                            "method": method + ("" if rule == "full" else
                                                                "+SEL")})
      c = chosen.get(rule)
      figs = papers.figures(c["metrics"], dataclasses.asdict(roles)) if c else _NONE
      for key in ("id", "ood", "worst_group"):
        row[key].append(np.nan if figs[key] is None else figs[key])
      row["steps"].append(c["step"] if c else None)
      row["workdirs"].append(workdir)
  return {"datasets": sorted(datasets), "rows": rows, "missing": missing}


def poster_table(workdirs: Sequence[str], *, statistic: str = "authors",
                 rules: Sequence[str] = summary.TABLE_RULES, labels: dict | None = None,
                 std: str = "sample") -> Table | None:
  """The head-diversity poster's Tables 1-2, ours beside theirs: the one implementation that
  `python -m vitreg_jax.heads --table` and `python -m vitreg_jax.reports` print.

  `statistic='authors'` (default): ERM / DIV rows at the evaluation with the best OOD
  validation accuracy of the full model, +SEL rows at each rule's (evaluation, head) choice,
  tested there (heads/summary.py; the authors' scripts/reporting.py, `get_experiment_summary`).
  `'final'`: every row at the last evaluation (the final checkpoint). ID / OOD = accuracy on
  the ID / OOD test split; Waterbirds: the train-weighted mean and the mean of the group
  accuracies of `test` (`roles.split_roles`), with the worst group in its own column. Mean ±
  std over runs, in percent: `std='sample'` (ddof 1, default) or `'authors'` (ddof 0, their
  `np.std`); the note says which.
  """
  ddof = summary.spread(std)[0]
  data = poster_rows(workdirs, statistic=statistic, rules=rules, labels=labels)
  if not data["rows"]:
    return None
  waterbirds = "waterbirds" in data["datasets"]
  header = (["dataset", "method", "selection (reads)", "runs", "ID acc.", "paper ID", "diff",
             "OOD acc.", "paper OOD", "diff"] + (["worst-group acc."] if waterbirds else [])
            + ["chosen steps"])
  order = {r: i for i, r in enumerate(("full", *rules))}
  keys = sorted(data["rows"], key=lambda k: (order[k[1]], "+ERM" not in k[0], k[0]))
  rows = []
  for label, rule in keys:
    row = data["rows"][(label, rule)]
    method, dataset = row["method"], row["dataset"]
    paper = papers.POSTER.get(dataset, {}).get(method) if rule in ("full", "oracle") else None
    (pid, pood) = paper if paper else ((None, None), (None, None))
    ours_id, ours_ood = _stat(row["id"], ddof), _stat(row["ood"], ddof)
    name = label if rule == "full" else label + "+SEL"
    rows.append([dataset, name, f"{rule}: {rules_lib.get(rule).reads}" if rule != "full" else "-",
                 len(row["workdirs"]), ours_id, fmt(*pid), diff(ours_id[0], pid[0]),
                 ours_ood, fmt(*pood), diff(ours_ood[0], pood[0])]
                + ([_stat(row["worst_group"], ddof)] if waterbirds else [])
                + [",".join("-" if s is None else str(s) for s in row["steps"])])
  return Table("poster", "Head diversity (poster Tables 1-2)", header, rows,
               [runs_lib.load(w) for w in dict.fromkeys(w for r in data["rows"].values()
                                                         for w in r["workdirs"])],
               _poster_note(statistic, data["missing"], waterbirds, std))


def _stat(values, ddof: int = 1):
  return mean_std([v for v in values if v is not None and np.isfinite(v)], 1.0, ddof)


def _poster_note(statistic: str, missing: list, waterbirds: bool, std: str = "sample") -> str:
  chosen = ("the authors' statistic (scripts/reporting.py, `get_experiment_summary`): ERM / "
            "DIV rows at the evaluation with the best OOD-validation accuracy of the full "
            "model; +SEL rows at each rule's (evaluation, head) choice, tested there (the "
            "oracle row is the authors' BEST HEAD, the ceiling)"
            if statistic == "authors" else
            "FINAL CHECKPOINT (not the authors' statistic): every row at the last evaluation")
  note = (f"Test splits, mean ± {summary.spread(std)[1]}; {chosen}. Poster figures beside the ERM / "
          "DIV and oracle rows only (the poster has no other rules; its ± is undefined).")
  if waterbirds:
    note += (" Waterbirds (roles.py): ID = `test`'s group accuracies weighted as the training "
             "groups (the training distribution, as the authors' ID test split), OOD = their "
             "plain mean (the background independent of the label, as their OOD test split);"
             " worst-group in its own column.")
  if missing:
    note += (f" {len(missing)} run(s) without heads_eval.jsonl (train with "
             "config.head_eval='-1'): full-model rows only, from metrics.jsonl.")
  return note


def report_poster_table(groups, statistic: str = "authors", std: str = "sample"
                        ) -> Table | None:
  """`poster_table` over the report's ViT groups on the poster's datasets (dominoes too); a
  method with several groups (e.g. a lambda sweep) gets one row per group."""
  groups = [g for g in groups if g.config.get("model_name") == "vit"
            and g.config.get("data", {}).get("name") in POSTER_DATASETS]
  if not groups:
    return None
  per_method = {}
  for g in groups:
    per_method.setdefault(papers.method(g.config), []).append(g)
  labels = {r.workdir: (papers.method(g.config) if len(per_method[papers.method(g.config)]) == 1
                        else f"{papers.method(g.config)} [{g.label}]")
            for g in groups for r in g.runs}
  return poster_table(list(labels), statistic=statistic, labels=labels, std=std)


def build_tables(groups, target=None, target_split=None, statistic: str = "authors",
                 std: str = "sample") -> list[Table]:
  """The report's tables of `groups` (those that apply), the runs table last; `std`: the
  poster table's spread (`summary.STDS`)."""
  tables = [report_poster_table(groups, statistic, std), arvit_table(groups),
            how_vits_work_table(groups),
            runs_table(groups, target, target_split)]
  return [t for t in tables if t is not None]
