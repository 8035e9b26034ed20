r"""Reports: tables in the papers' layouts and learning curves, read back from run workdirs.

  python -m vitreg_jax.report WORKDIR_OR_PARENT... [--out DIR] [--target 0.8]

Every run directory (one holding `config.json`, found recursively under the paths given) is
read back: its saved config (`rundir.load_config`) and `metrics.jsonl` (one line per
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

import numpy as np

from vitreg_jax import rundir

# The poster (papers/diverse-vit-heads-poster.txt), Tables 1-2: (mean, std) in percent.
POSTER = {
    "mnist_cifar": {"ViT+ERM": ((88.80, 0.1), (56.87, 4.3)), "ViT+DIV": ((88.40, 0.1), (62.26, 1.8)),
                    "ViT+ERM+SEL": ((90.33, 0.1), (64.40, 2.8)),
                    "ViT+DIV+SEL": ((89.86, 1.1), (70.08, 3.1))},
    "waterbirds": {"ViT+ERM": ((96.55, 0.2), (83.37, 0.4)), "ViT+DIV": ((96.99, 0.1), (83.87, 0.7)),
                   "ViT+ERM+SEL": ((96.50, 0.5), (85.70, 1.6)),
                   "ViT+DIV+SEL": ((96.99, 0.1), (87.96, 0.1))},
}
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
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path!r} is not a directory: give run workdirs or a folder "
                              "holding them.")
    hits = sorted(root for root, _, files in os.walk(path) if rundir.CONFIG_FILE in files)
    if not hits:
      raise FileNotFoundError(f"No run under {path!r}: a run directory holds {rundir.CONFIG_FILE}"
                              " (written when training starts).")
    found += hits
  return list(dict.fromkeys(found))


def read_metrics(workdir: str) -> tuple[dict, dict]:
  """`(evals, train)` from metrics.jsonl: a later line for a (step, split) supersedes."""
  evals, train = {}, {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return evals, train
  with open(path) as f:
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


def _total_steps(config: dict) -> int | None:
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
  config = rundir.load_config(workdir).to_dict()
  evals, train = read_metrics(workdir)
  run = Run(workdir, config, evals, train, _total_steps(config), [])
  if not evals and not train:
    run.problems.append("no metrics")
  if any(not all(math.isfinite(v) for v in m.values()) for m in train.values()):
    run.problems.append("diverged")
  failed = os.path.join(workdir, "sweep_failed.json")
  if os.path.exists(failed) and "diverged" not in run.problems:
    with open(failed) as f:
      tail = json.load(f).get("log_tail", "")
    run.problems.append("diverged" if "Non-finite" in tail else "failed")
  if run.total_steps is not None and run.last_step() < run.total_steps:
    run.problems.append(f"unfinished ({run.last_step()}/{run.total_steps})")
  expected = config.get("data", {}).get("eval_splits") or []
  missing = [s for s in expected if s not in evals]
  if missing and evals:
    run.problems.append("missing " + ",".join(missing))
  heads = os.path.join(workdir, "heads.json")
  if os.path.exists(heads):
    with open(heads) as f:
      run.heads = json.load(f)
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


def group_runs(runs: list[Run]) -> list[Group]:
  """Groups by config minus seed; labels each group by the fields that differ between groups."""
  flat = [_flatten({k: v for k, v in r.config.items() if k != "seed"}) for r in runs]
  groups: dict[str, Group] = {}
  keys = {}
  for run, f in zip(runs, flat):
    key = json.dumps(f, sort_keys=True)
    groups.setdefault(key, Group([])).runs.append(run)
    keys[key] = f
  all_keys = sorted({k for f in keys.values() for k in f})
  differ = [k for k in all_keys
            if len({f.get(k) for f in keys.values()}) > 1
            # A model field of one family only is implied by model_name.
            and not (k.startswith("model.") and not all(k in f for f in keys.values()))]
  for key, group in groups.items():
    f = keys[key]
    group.label = ", ".join(f"{k}={json.loads(f[k]) if k in f else '-'}" for k in differ) \
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


@dataclasses.dataclass
class Table:
  name: str
  title: str
  header: list
  rows: list      # lists of display strings
  csv_rows: list  # lists of raw values (numbers unformatted)
  runs: list      # the runs the table covers (for the curves)
  note: str = ""

  def markdown(self) -> str:
    lines = [f"### {self.title}", ""]
    if self.note:
      lines += [self.note, ""]
    lines.append("| " + " | ".join(self.header) + " |")
    lines.append("|" + "---|" * len(self.header))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in self.rows]
    return "\n".join(lines) + "\n"

  def write_csv(self, path: str):
    import csv  # pylint: disable=g-import-not-at-top
    with open(path, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(self.csv_header())
      writer.writerows(self.csv_rows)

  def csv_header(self):
    return self.header if not self.csv_rows else self._csv_header

  _csv_header: list = dataclasses.field(default_factory=list)
