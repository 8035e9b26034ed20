"""Reading run workdirs back: their saved config, metrics.jsonl and heads.json, grouped by seed.

Every run directory (one holding `config.json`, found recursively under the paths given:
`find_runs`) is read back (`load`): its saved config (the JSON `rundir.save_config` writes),
`metrics.jsonl` (one line per (step, split); after a resume a later line for the same step
supersedes the earlier one: `read_metrics`) and the `heads.json` of `vitreg_jax.heads`
(`read_heads`). Runs whose configs differ only by `seed` (and bookkeeping fields) form one
`Group` (`group_runs`), labelled by the config fields that differ between groups.

Nothing is dropped silently: a run that is unfinished (last step below the configured
total), diverged (non-finite loss, or a failed sweep point), missing an eval split or without
metrics lists it in `Run.problems`.
"""

import dataclasses
import json
import math
import os

from etils import epath

from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax.training.run_files import CONFIG_FILE

HEADS_FILE = "heads.json"  # Written by `python -m vitreg_jax.heads`.


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
      raise errors.PathNotFoundError(f"{path!r} is not a directory: give run workdirs or a folder "
                                     "holding them.")
    hits = sorted(str(root) for root, _, files in epath.Path(path).walk()
                  if CONFIG_FILE in files)
    if not hits:
      raise errors.PathNotFoundError(f"No run under {path!r}: a run directory holds {CONFIG_FILE}"
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
    dataset = data.open(config["data"])
    n = dataset.info.num_examples[dataset.train_split]
    return int(round(config["total_epochs"] * math.ceil(n / config["batch_size"])))
  except Exception:  # pylint: disable=broad-except
    return None


def read_config(workdir: str) -> dict:
  """The config a run saved (`rundir.save_config`), as a plain dict.

  Raises:
    FileNotFoundError: naming the file, when `workdir` is not a run directory.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise errors.PathNotFoundError(
        f"{path} not found: {workdir!r} is not a vitreg_jax run directory "
        "(runs write their config there at start).")
  return json.loads(path.read_text())


def load(workdir: str) -> Run:
  """Reads one run and lists its problems (unfinished, diverged, missing splits)."""
  config = read_config(workdir)
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
  run.heads = read_heads(workdir, required=False)
  return run


def read_heads(workdir: str, *, required: bool = True) -> dict | None:
  """A run's `heads.json` (the head selection); None when missing and not `required`.

  Raises:
    FileNotFoundError: naming the command that writes it, when missing and `required`.
  """
  path = epath.Path(workdir) / HEADS_FILE
  if path.exists():
    return json.loads(path.read_text())
  if required:
    raise errors.PathNotFoundError(f"{path} not found: run `python -m vitreg_jax.heads "
                                   f"--workdir={workdir}` first.")
  return None


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
