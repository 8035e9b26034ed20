"""How much of the oracle's gain each selection rule recovers, and the k-label curve: the
second table of `python -m vitreg_jax.heads --table` (issue 27).

Per group of runs (dataset and method, `papers.method`) and rule, from the authors'
statistics (`tables.poster_rows`: each rule's (step, candidate) choice on validation splits,
tested on the OOD test figure of the roles, roles.py):
* `OOD acc.`: mean ± std over runs of the chosen candidate's OOD test figure (%);
* `gain recovered`: per run `(rule - full) / (oracle - full)`, with `full` the ERM / DIV row
  (the full model at the step best on OOD validation, the authors' statistic) and `oracle`
  the authors' BEST HEAD; mean ± std over the runs where it is defined. A run where the
  oracle equals the full model has no gain to recover: it is left out and counted
  (`undefined`); a run where a rule chose nothing (it lacks what the rule reads) is counted
  in `n/a`. `pooled`: `sum(rule - full) / sum(oracle - full)` over the runs, the fraction of
  the group's mean gain (stable where one run's oracle gains almost nothing). Where the
  oracle tests below the full model the fraction's sign flips (the per-run figures are in
  `table.json`).
`--out DIR` writes `table.md` (both tables), `table.json` (these rows and the k-label
curves, heads/k_labels.py) and `k_labels.png`.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

from etils import epath
import numpy as np

from vitreg_jax.heads import examples as examples_lib
from vitreg_jax.heads import k_labels
from vitreg_jax.heads import rules as rules_lib
from vitreg_jax.heads import summary
from vitreg_jax.reports import papers
from vitreg_jax.reports import runs as runs_lib
from vitreg_jax.reports import tables
from vitreg_jax.training import rundir

HEADER = ["dataset", "method", "selection", "reads", "runs", "OOD acc.",
          "oracle - full (points)", "gain recovered (%)", "pooled (%)", "undefined", "n/a"]


def _finite(v) -> bool:
  return v is not None and math.isfinite(v)


def _or_none(v):
  return float(v) if _finite(v) else None


def gain_fractions(rule: dict, full: dict, oracle: dict) -> tuple[list[float], int, int]:
  """`(fractions, undefined, missing)`: `(rule - full) / (oracle - full)` per run (dicts
  workdir -> OOD figure), the runs where oracle == full, and those the rule (or a
  reference) has no figure for."""
  out, undefined, missing = [], 0, 0
  for workdir, value in rule.items():
    f, o = full.get(workdir), oracle.get(workdir)
    if not (_finite(value) and _finite(f) and _finite(o)):
      missing += 1
    elif o == f:
      undefined += 1
    else:
      out.append((value - f) / (o - f))
  return out, undefined, missing


def pooled_fraction(rule: dict, full: dict, oracle: dict) -> float | None:
  """`sum(rule - full) / sum(oracle - full)` over the runs with all three figures: the
  fraction of the group's mean gain, stable where a run's own oracle gain is near zero
  (there the per-run fraction can be any size); None without runs or without a gain."""
  runs = [w for w, v in rule.items()
          if _finite(v) and _finite(full.get(w)) and _finite(oracle.get(w))]
  gain = sum(oracle[w] - full[w] for w in runs)
  if not runs or gain == 0:
    return None
  return sum(rule[w] - full[w] for w in runs) / gain


def _labels(workdirs: Sequence[str]) -> dict[str, str]:
  """Each run's group: 'dataset / method' (one method on several datasets: several rows)."""
  out = {}
  for w in workdirs:
    config = runs_lib.read_config(w)
    out[w] = f"{dataset_label(config['data'])} / {papers.method(config)}"
  return out


def dataset_label(data: dict) -> str:
  """The data's registered name; for the generic file datasets (`npz`, `image_folder`) the
  folder they read too (`npz:colored_digits`), so two such datasets are two groups."""
  path = data.get("path")
  if data["name"] not in ("npz", "image_folder") or not path:
    return data["name"]
  folder = str(path).split("{split}")[0].rstrip("/")
  return data["name"] + ":" + folder.rsplit("/", 1)[-1]


def build(workdirs: Sequence[str], rules: Sequence[str], statistic: str = "authors",
          std: str = "sample") -> dict:
  """`{"rows": [...], "k_labels": {group: curve}, "note"}` (JSON-ready) over `workdirs`."""
  ddof = summary.spread(std)[0]
  names = ("oracle", *[r for r in rules if r != "oracle"])
  labels = _labels(workdirs)
  data = tables.poster_rows(workdirs, statistic=statistic, rules=names, labels=labels)
  per_run = lambda key: dict(zip(data["rows"][key]["workdirs"], data["rows"][key]["ood"]))
  rows = []
  for label in sorted({label for label, _ in data["rows"]}):
    if (label, "oracle") not in data["rows"]:
      continue  # No run of the group logged heads: nothing to select.
    full, oracle = per_run((label, "full")), per_run((label, "oracle"))
    for rule in ("full", *names):
      values = per_run((label, rule))
      fractions, undefined, missing = gain_fractions(values, full, oracle)
      dataset, method = label.split(" / ", 1)
      finite = [v / 100.0 for v in values.values() if _finite(v)]
      rows.append({"dataset": dataset, "method": method, "rule": rule,
                   "reads": "OOD validation labels (the authors' ERM / DIV row)"
                   if rule == "full" else rules_lib.get(rule).reads,
                   "runs": len(values), "ood": tables.mean_std(finite, 100.0, ddof),
                   "gain_recovered": tables.mean_std(fractions, 100.0, ddof),
                   "pooled_gain": pooled_fraction(values, full, oracle),
                   "oracle_gain": _mean_gain(full, oracle),
                   "undefined": undefined, "missing": missing,
                   "per_run": {w: {"ood": _or_none(v), "full": _or_none(full.get(w)),
                                   "oracle": _or_none(oracle.get(w))}
                               for w, v in values.items()}})
  return {"rows": rows, "k_labels": curves(workdirs, labels, rows, statistic),
          "statistic": statistic, "std": summary.spread(std)[1], "note": note(statistic)}


def _mean_gain(full: dict, oracle: dict) -> float | None:
  """Mean over runs of the oracle's OOD test gain over the full model (points)."""
  gains = [oracle[w] - f for w, f in full.items() if _finite(f) and _finite(oracle.get(w))]
  return float(np.mean(gains)) if gains else None


def curves(workdirs, labels, rows, statistic) -> dict:
  """The k-label curve of every group (`k_labels.group_curve`) whose runs have per-example
  outputs (`heads_examples/`)."""
  by_group = {}
  for w in workdirs:
    records = summary.read_head_eval(w)
    if not records or not examples_lib.steps(w):
      continue
    roles = summary.run_roles(records, runs_lib.read_config(w))
    curve = k_labels.run_curve(records, roles, examples_lib.Lazy(w), statistic)
    if curve is not None:
      by_group.setdefault(labels[w], {})[w] = curve
  out = {}
  for label, runs in sorted(by_group.items()):
    ref = lambda rule: [r["per_run"][w][rule] for r in rows
                        if f"{r['dataset']} / {r['method']}" == label and r["rule"] == "full"
                        for w in runs]
    out[label] = k_labels.group_curve(list(runs.values()), ref("full"), ref("oracle"))
  return out


def note(statistic: str) -> str:
  return ("OOD test figure of each rule's choice (validation splits only), mean ± std over "
          "runs (%), the authors' statistic" if statistic == "authors" else
          "the FINAL checkpoint") + (
      ". Gain recovered: (rule - full) / (oracle - full) per run, full = the ERM / DIV row, "
      "oracle = the authors' BEST HEAD, mean ± std over runs; pooled: sum(rule - full) / "
      "sum(oracle - full) over the runs, the fraction of the mean gain (a run whose oracle "
      "gains almost nothing makes its own fraction any size); 'undefined' counts runs where "
      "oracle == full (left out), 'n/a' runs where the rule chose nothing (it lacks what it "
      "reads, e.g. heads_examples/ of runs trained before it existed, or separate OOD "
      "inputs).")


def markdown(result: dict) -> str:
  cell = lambda stat: tables.fmt(*stat)
  lines = ["### Head selection by what it reads: OOD accuracy and the oracle's gain recovered",
           "", result["note"], "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in result["rows"]:
    ref = r["rule"] in ("full", "oracle")
    gain = "-" if ref else cell(r["gain_recovered"])
    pooled = "-" if ref or r["pooled_gain"] is None else f"{100 * r['pooled_gain']:.0f}"
    oracle_gain = "-" if r["oracle_gain"] is None else f"{r['oracle_gain']:+.2f}"
    lines.append("| " + " | ".join(str(c) for c in (
        r["dataset"], r["method"], r["rule"], r["reads"], r["runs"], cell(r["ood"]),
        oracle_gain, gain, pooled, r["undefined"], r["missing"])) + " |")
  return "\n".join(lines) + "\n"


def write(result: dict, out: str) -> dict[str, str]:
  """`table.json` (rows and k-label curves) and `k_labels.png` into `out`."""
  paths = {"json": str(epath.Path(out) / "table.json"),
           "png": str(epath.Path(out) / "k_labels.png")}
  rundir.write_text(paths["json"], json.dumps(result, indent=1, default=_json))
  k_labels.plot(result["k_labels"], paths["png"])
  return paths


def _json(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON-serializable: {type(value)}")
