r"""Reports: tables in the papers' layouts and learning curves, read back from run workdirs.

  python -m vitreg_jax.report WORKDIR_OR_PARENT... [--out DIR] [--target 0.8]

Every run directory (one holding `config.json`, found recursively under the paths given) is
read back: its saved config (the JSON `rundir.save_config` writes) and `metrics.jsonl` (one line per
(step, split); after a resume a later line for the same step supersedes the earlier one).
Runs whose configs differ only by `seed` form one group, reported as mean +- std over seeds
(sample std, n-1; "n" says how many seeds). Tables, as Markdown (`report.md`, also printed)
and CSV (`<table>.csv`):

- `runs`: every group, labelled by the config fields that differ between groups: its status,
  the final value of each eval split's accuracy, the final train loss and, with `--target`,
  the steps and wall time until the target accuracy was first reached (the optimizer study
  and the MSA build-up sweeps read this table).
- `poster`: the head-diversity poster's Tables 1-2 (MNIST-CIFAR, Waterbirds; dominoes in the
  same layout): ID and OOD accuracy per method (ViT+ERM, ViT+DIV, and +SEL rows read from the
  `heads.json` that `vitreg_jax.heads` writes), Waterbirds' OOD column is the worst-group
  accuracy; the poster's figure beside ours with the difference.
- `arvit`: ARViT Table 1, model x downstream task top-1, the paper's figure and difference.
- `how_vits_work`: the CIFAR comparisons (ViT / ResNet / AlterNet, CLS vs GAP, local MSA
  windows, accuracy under corruptions); the slides give one figure (GAP +2.7 points over CLS),
  shown as the difference between our GAP and CLS rows.

Curves (`curves_<table>.png`): train loss, each regularizer term `reg/<name>` and each eval
split's accuracy against the step, every run of the table overlaid.

Nothing is dropped silently: a run that is unfinished (last step below the configured total),
diverged (non-finite loss, or a failed sweep point), missing an eval split or without
metrics keeps its row, marked in the `status` column; its figures are still shown.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Any

from etils import epath
import numpy as np

from vitreg_jax import poster

# rundir.CONFIG_FILE, read here with json: importing rundir imports jax, which on a busy
# machine takes longer than the whole report.
CONFIG_FILE = "config.json"

# ARViT Table 1 (papers/arvit-attention-regularization.txt), top-1 in percent.
ARVIT_DATASETS = ("cifar10", "cifar100", "oxford_flowers102", "imagenette", "imagewoof")
ARVIT = {
    "ViT-Tiny": (73.30, 53.55, 73.91, 84.72, 61.77),
    "ARViT-Base": (83.13, 76.27, 81.61, 91.18, 73.01),
    "ARViT-L1": (82.02, 75.89, 80.12, 90.58, 72.92),
    "ARViT-L2": (83.63, 76.20, 81.27, 91.56, 74.81),
    "ARViT-L3": (84.76, 76.63, 83.08, 92.05, 75.90),
    "ARViT-L4": (83.31, 76.52, 81.98, 91.88, 75.24),
    "ARViT-L5": (83.70, 76.01, 81.21, 91.30, 73.46),
    "ARViT-L6": (79.81, 74.84, 79.14, 88.77, 70.44),
    "ARViT-R1-1": (88.29, 88.63, 85.58, 95.48, 82.31),
    "ARViT-R1-2": (86.99, 86.40, 85.15, 94.28, 79.61),
    "ARViT-R1-3": (87.17, 84.91, 85.33, 95.36, 82.20),
    "ARViT-R1-4": (87.54, 86.13, 85.31, 95.48, 82.93),
    "ARViT-R1-5": (88.45, 89.65, 85.82, 95.40, 82.70),
    "ARViT-R1-6": (87.55, 87.31, 85.15, 95.78, 81.15),
}
GAP_OVER_CLS = 2.7  # "GAP classifier improves the accuracy by +2.7%" (slides).


# ------------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Run:
  """One workdir read back: config, metrics by split and step, and what is wrong with it."""
  workdir: str
  config: dict
  evals: dict      # split -> {step: metrics}
  train: dict      # step -> metrics
  total_steps: int | None
  problems: list
  heads: dict | None = None  # heads.json of vitreg_jax.heads, when present

  @property
  def seed(self):
    return self.config.get("seed")

  def final(self, split: str) -> dict:
    steps = self.evals.get(split)
    return steps[max(steps)] if steps else {}

  def last_step(self) -> int:
    steps = list(self.train) + [s for v in self.evals.values() for s in v]
    return max(steps) if steps else 0


def find_runs(paths) -> list[str]:
  """Run directories (holding config.json) given directly or found under `paths`, sorted."""
  found = []
  for path in paths:
    if not epath.Path(path).is_dir():
      raise FileNotFoundError(f"{path!r} is not a directory: give run workdirs or a folder "
                              "holding them.")
    hits = sorted(str(root) for root, _, files in epath.Path(path).walk()
                  if CONFIG_FILE in files)
    if not hits:
      raise FileNotFoundError(f"No run under {path!r}: a run directory holds {CONFIG_FILE}"
                              " (written when training starts).")
    found += hits
  return list(dict.fromkeys(found))


def read_metrics(workdir: str) -> tuple[dict, dict]:
  """`(evals, train)` from metrics.jsonl: a later line for a (step, split) supersedes."""
  evals, train = {}, {}
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return evals, train
  with path.open() as f:
    for line in f:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut short by a crash; the rest of the file is still good.
      step, split = int(record.pop("step")), record.pop("split")
      (train if split == "train" else evals.setdefault(split, {}))[step] = record
  return evals, train


def total_steps(config: dict) -> int | None:
  """The run's length from its saved config (None if epoch-based and the data is not here)."""
  if config.get("total_steps"):
    return int(config["total_steps"])
  try:  # Epoch-based: needs the train split's size (the dataset may not be prepared here).
    from vitreg_jax import data  # pylint: disable=g-import-not-at-top
    info = data.get_info(config["data"])
    n = info.num_examples[config["data"].get("train_split", "train")]
    return int(round(config["total_epochs"] * math.ceil(n / config["batch_size"])))
  except Exception:  # pylint: disable=broad-except
    return None


def load(workdir: str) -> Run:
  """Reads one run and lists its problems (unfinished, diverged, missing splits)."""
  config = json.loads((epath.Path(workdir) / CONFIG_FILE).read_text())
  evals, train = read_metrics(workdir)
  run = Run(workdir, config, evals, train, total_steps(config), [])
  if not evals and not train:
    run.problems.append("no metrics")
  if any(not all(math.isfinite(v) for v in m.values()) for m in train.values()):
    run.problems.append("diverged")
  failed = epath.Path(workdir) / "sweep_failed.json"
  if failed.exists() and "diverged" not in run.problems:
    tail = json.loads(failed.read_text()).get("log_tail", "")
    run.problems.append("diverged" if "Non-finite" in tail else "failed")
  if run.total_steps is not None and run.last_step() < run.total_steps:
    run.problems.append(f"unfinished ({run.last_step()}/{run.total_steps})")
  expected = config.get("data", {}).get("eval_splits") or []
  missing = [s for s in expected if s not in evals]
  if missing and evals:
    run.problems.append("missing " + ",".join(missing))
  heads = epath.Path(workdir) / "heads.json"
  if heads.exists():
    run.heads = json.loads(heads.read_text())
  return run


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = json.dumps(value, sort_keys=True)
  return out


@dataclasses.dataclass
class Group:
  """Runs whose configs differ only by seed."""
  runs: list
  label: str = ""

  @property
  def config(self):
    return self.runs[0].config

  def problems(self) -> str:
    seen = [f"seed {r.seed}: {p}" if len(self.runs) > 1 else p
            for r in self.runs for p in r.problems]
    return "; ".join(seen) or "ok"

  def values(self, fn) -> list:
    vals = [fn(r) for r in self.runs]
    return [v for v in vals if v is not None and math.isfinite(v)]


# Bookkeeping fields: runs differing only in these (and the seed) are the same experiment.
IGNORED = ("seed", "keep_checkpoints", "checkpoint_every_steps", "log_every_steps",
           "eval_every_steps", "eval_batch_size", "profile", "head_eval", "sharding")


def _short(key: str, value):
  if key == "regularizers":  # e.g. div(100)+distance(0.01)
    return "+".join(f"{r.get('name')}({r.get('weight')})" for r in value) or "none"
  return value


def group_runs(runs: list[Run]) -> list[Group]:
  """Groups by config minus seed; labels each group by the fields that differ between groups."""
  flat = [_flatten({k: v for k, v in r.config.items() if k not in IGNORED}) for r in runs]
  groups: dict[str, Group] = {}
  keys = {}
  for run, f in zip(runs, flat):
    key = json.dumps(f, sort_keys=True)
    groups.setdefault(key, Group([])).runs.append(run)
    keys[key] = f
  all_keys = sorted({k for f in keys.values() for k in f})
  differ = [k for k in all_keys
            if len({f.get(k) for f in keys.values()}) > 1
            # A nested field some runs lack (one model family's, or a default saved by a
            # newer version) is implied by the fields that do differ.
            and not ("." in k and not all(k in f for f in keys.values()))]
  for key, group in groups.items():
    f = keys[key]
    group.label = ", ".join(f"{k}={_short(k, json.loads(f[k])) if k in f else '-'}"
                            for k in differ) \
        or os.path.basename(group.runs[0].workdir.rstrip("/"))
    group.runs.sort(key=lambda r: (r.seed is None, r.seed))
  return sorted(groups.values(), key=lambda g: g.label)


# ---------------------------------------------------------------------------- formatting


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
    import csv  # pylint: disable=g-import-not-at-top
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
  """A run's poster figures (`poster.figures`, percent): 'full' from its final evaluations in
  metrics.jsonl at `roles` (the group's), 'selected' (the +SEL rows) from its heads.json,
  None without one."""
  if which == "selected":
    return (poster.result_figures(run.heads, "selected", run.config["data"]["name"])
            if run.heads else None)
  return poster.figures({s: run.final(s) for s in run.evals}, roles)


def poster_table(groups) -> Table | None:
  """The poster's Tables 1-2: ID / OOD accuracy per method, +SEL rows from heads.json."""
  groups = [g for g in groups if g.config.get("model_name") == "vit"
            and g.config.get("data", {}).get("name") in ("mnist_cifar", "waterbirds", "dominoes")]
  if not groups:
    return None
  header = ["dataset", "method", "seeds", "status", "ID acc.", "paper ID", "diff",
            "OOD acc.", "paper OOD", "diff"]
  rows = []
  methods = {(x.config["data"]["name"], poster.method(x.config)) for x in groups}
  for g in groups:
    name = g.config["data"]["name"]
    ood_key = "worst_group" if name == "waterbirds" else "ood"   # Waterbirds: worst group
    # Splits chosen per group: a seed that lost a split shows as missing, not as another split.
    roles = poster.roles_from_splits(name, {s for r in g.runs for s in r.evals})
    method = poster.method(g.config)
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
      paper = poster.POSTER.get(name, {}).get(key)
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


def arvit_row(config: dict) -> str | None:
  """ARViT Table 1's row name of a config (None if the config is not one of its models)."""
  model = config.get("model", {})
  if config.get("model_name") == "vit":
    return "ViT-Tiny" if model.get("variant") == "Ti6x12/16" else None
  if config.get("model_name") != "arvit":
    return None
  regs = config.get("regularizers") or []
  if not regs:
    return "ARViT-Base"
  reg = regs[0]
  layer = int(list(reg.get("layers", [0]))[0]) + 1
  return {"distance": f"ARViT-L{layer}", "similarity": f"ARViT-R1-{layer}"}.get(reg["name"])


def arvit_table(groups) -> Table | None:
  """ARViT Table 1: one row per model, one column per downstream task (top-1, final eval)."""
  cells = {}
  for g in groups:
    row, name = arvit_row(g.config), g.config.get("data", {}).get("name")
    if row and name in ARVIT_DATASETS:
      cells.setdefault(row, {}).setdefault(name, []).append(g)
  if not cells:
    return None
  header = ["model", "status"]
  for d in ARVIT_DATASETS:
    header += [d, "paper", "diff"]
  rows, runs = [], []
  order = list(ARVIT) + sorted(set(cells) - set(ARVIT))
  for model in [m for m in order if m in cells]:
    status = []
    row = [model, None]
    for j, d in enumerate(ARVIT_DATASETS):
      gs = cells[model].get(d, [])
      vals = [v for g in gs for v in g.values(_final_accuracy)]
      ours = mean_std(vals)
      status += [f"{d}: {g.problems()}" for g in gs if g.problems() != "ok"]
      if len(gs) > 1:
        status.append(f"{d}: {len(gs)} configs pooled")
      paper = ARVIT.get(model, (None,) * 5)[j]
      row += [ours, paper, diff(ours[0], paper)]
      runs += [r for g in gs for r in g.runs]
    row[1] = "; ".join(status) or "ok"
    rows.append(row)
  note = ("ARViT Table 1 layout: top-1 accuracy (%) of the final evaluation on `test` (or the "
          "run's first eval split), mean ± std over seeds; `paper` is the paper's figure.")
  return Table("arvit", "ARViT (Table 1)", header, rows, runs, note)


def _hvw_row(config: dict) -> str:
  model, name = config.get("model", {}), config.get("model_name")
  if name == "vit":
    label = f"ViT ({'GAP' if model.get('classifier') == 'gap' else 'CLS'})"
    k = model.get("local_window")
    return label + (f", local {k}x{k}" if k else "")
  if name == "resnet":
    return f"ResNet-{model.get('depth', 18)}"
  msa = model.get("msa_per_stage")
  return "AlterNet" + (f" (MSAs per stage {','.join(map(str, msa))})" if msa else "")


def _corruption_accuracy(run: Run):
  accs = [run.final(s).get("accuracy") for s in run.evals if s not in ("test", "train")]
  accs = [a for a in accs if a is not None]
  return float(np.mean(accs)) if accs else None


def how_vits_work_table(groups) -> Table | None:
  """The slides' CIFAR comparisons: accuracy and accuracy under corruption per model."""
  groups = [g for g in groups if g.config.get("model_name") in ("vit", "resnet", "alternet")
            and g.config.get("data", {}).get("name", "").startswith("cifar")
            and arvit_row(g.config) is None]
  if not groups:
    return None
  header = ["dataset", "model", "seeds", "status", "test acc.", "corruption acc.",
            "slides", "ours", "diff"]
  rows, by_label = [], {}
  for g in groups:
    dataset = g.config["data"]["name"].replace("_corrupted", "")
    label = _hvw_row(g.config)
    acc = mean_std(g.values(_final_accuracy))
    by_label.setdefault((dataset, label), acc[0])
    rows.append([dataset, label, len(g.runs), g.problems(), acc,
                 mean_std(g.values(_corruption_accuracy)), None, None, None])
  for row in rows:  # The one figure the slides give: GAP over CLS, +2.7 points.
    if "GAP" in row[1]:
      cls = by_label.get((row[0], row[1].replace("GAP", "CLS")))
      ours = None if cls is None or row[4][0] is None else row[4][0] - cls
      row[6:] = ["GAP - CLS: +2.70", None if ours is None else f"{ours:+.2f}",
                 diff(ours, GAP_OVER_CLS)]
  note = ("\"How do ViTs work?\" comparisons: final `test` accuracy and the mean accuracy "
          "over the corrupted splits (CIFAR-C, `robustness` runs), in percent. The slides "
          "give one number (GAP improves accuracy by +2.7 over CLS); the local-window and "
          "AlterNet claims are orderings (5x5 > 3x3 > 8x8; AlterNet > ResNet > ViT).")
  return Table("how_vits_work", "How do ViTs work? (CIFAR)", header, rows,
               [r for g in groups for r in g.runs], note)


# ---------------------------------------------------------------------------------- curves


def plot_curves(runs: list[Run], labels: dict, path: str, title: str = "") -> str | None:
  """Train loss, each `reg/<name>` term and each split's eval accuracy vs step; runs overlaid."""
  if not any(r.train or r.evals for r in runs):
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  regs = sorted({k for r in runs for m in r.train.values() for k in m if k.startswith("reg/")})
  splits = sorted({s for r in runs for s in r.evals})
  panels = [("train", "loss", "train loss")] + [("train", k, k) for k in regs] + \
      [(s, "accuracy", f"{s} accuracy") for s in splits]
  cols = min(3, len(panels))
  nrows = math.ceil(len(panels) / cols)
  width = 4.2 * cols
  # The legend goes below the panels, in as many columns as its longest label allows, so
  # long labels (a sweep's overrides) and many runs stay readable.
  longest = max(len(labels[r.workdir]) for r in runs)
  ncol = max(1, min(len(runs), int(width // (0.055 * longest + 0.6))))
  legend_h = 0.17 * math.ceil(len(runs) / ncol) + 0.2
  fig, axes = plt.subplots(nrows, cols, figsize=(width, 3.2 * nrows + legend_h),
                           squeeze=False)
  colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
  for ax, (split, key, name) in zip(axes.flat, panels):
    for i, run in enumerate(runs):
      series = run.train if split == "train" else run.evals.get(split, {})
      steps = sorted(s for s in series if key in series[s])
      if steps:  # Past the palette, the colours repeat with a dashed line.
        ax.plot(steps, [series[s][key] for s in steps], color=colors(i % colors.N),
                ls="-" if i < colors.N else "--", marker="." if split != "train" else None,
                lw=1.2, label=labels[run.workdir])
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    if key == "loss" or key.startswith("reg/"):
      ax.set_yscale("log")
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  handles, names = axes.flat[0].get_legend_handles_labels()
  for ax in axes.flat:
    h, n = ax.get_legend_handles_labels()
    if len(n) > len(names):
      handles, names = h, n
  fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
  fig.suptitle(title, fontsize=11)
  fig.tight_layout(rect=(0, legend_h / (3.2 * nrows + legend_h), 1, 0.97))
  save_figure(fig, path, dpi=110)
  return path


def save_figure(fig, path, **kwargs) -> None:
  """Saves and closes a matplotlib figure at any `etils.epath` path (PNG by its suffix)."""
  import io  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()  # matplotlib writes local files or file objects; epath's may not seek.
  fig.savefig(buffer, format=os.path.splitext(str(path))[1][1:] or "png", **kwargs)
  plt.close(fig)
  epath.Path(path).write_bytes(buffer.getvalue())


# ------------------------------------------------------------------------------------ main


def build_tables(groups, target=None, target_split=None) -> list[Table]:
  tables = [poster_table(groups), arvit_table(groups), how_vits_work_table(groups),
            runs_table(groups, target, target_split)]
  return [t for t in tables if t is not None]


def write_report(paths, out: str, target=None, target_split=None) -> tuple[str, list[Table]]:
  """Reads every run under `paths`, writes report.md, <table>.csv and curves_<table>.png."""
  runs = [load(w) for w in find_runs(paths)]
  groups = group_runs(runs)
  tables = build_tables(groups, target, target_split)
  out = epath.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  labels = {r.workdir: g.label + (f" s{r.seed}" if len(g.runs) > 1 else "")
            for g in groups for r in g.runs}
  parts = [f"# Report: {len(runs)} runs in {len(groups)} groups\n",
           "Runs: " + ", ".join(f"`{_shown(r.workdir)}`" for r in runs) + "\n"]
  for table in tables:
    table.write_csv(out / f"{table.name}.csv")
    parts.append(table.markdown())
    png = plot_curves(table.runs, labels, out / f"curves_{table.name}.png", table.title)
    if png:
      parts.append(f"![{table.title} curves]({png.name})\n")
  text = "\n".join(parts)
  (out / "report.md").write_text(text)
  return text, tables


def _shown(workdir: str) -> str:
  return workdir if "://" in workdir else os.path.relpath(workdir)


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m vitreg_jax.report", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run workdirs or folders holding them")
  parser.add_argument("--out", default="report", help="output folder (default ./report)")
  parser.add_argument("--target", type=float, default=None,
                      help="target accuracy (0-1) for steps / wall time to target")
  parser.add_argument("--target_split", default=None,
                      help="eval split of the target (default: the first, alphabetically)")
  args = parser.parse_args(argv)
  if args.target is not None and not 0 < args.target <= 1:
    parser.error(f"--target is an accuracy in (0, 1], got {args.target}.")
  try:
    text, _ = write_report(args.workdirs, args.out, args.target, args.target_split)
  except FileNotFoundError as e:
    parser.error(str(e))
  print(text)
  print(f"Written to {args.out}/ (report.md, *.csv, curves_*.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
