"""How many OOD labels head selection needs: the k-label curve (`heads --table --out`'s
`k_labels.png` and the `k_labels` figures of `table.json`).

For each k (`ks`: 4, 8, 16, ... below the OOD validation split's size, then all of it) the
oracle (the authors' BEST HEAD: the (step, head alone) with the best OOD validation score)
runs on a random draw of k labelled OOD validation examples instead of all of them
(`label_free`'s `ood_k` rule, the same candidates, score and tie order), and the chosen
candidate's OOD test figure (the role's `ood_metric` on `test_ood`, read from
`heads_eval.jsonl`) is averaged over `DRAWS` draws (seed `SEED`, the same draws for every
candidate). With all examples it is the oracle. Every draw scores every candidate at once
(`estimators.subset_scores`: one matrix product per k).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from vitreg_jax import plotting
from vitreg_jax.heads import estimators
from vitreg_jax.heads import label_free
from vitreg_jax.heads import rules as rules_lib
from vitreg_jax.roles import Roles

DRAWS = 100
SEED = 0
FIRST_K = 4
# The curves: the oracle on k labels, and the same with ties broken by ATC (`ood_k_atc`).
CURVES = {"ood": ("o-", "oracle on k labels"),
          "ood_atc": ("s-.", "k labels, ties broken by ATC")}


def ks(n: int) -> list[int]:
  """4, 8, 16, ... (powers of two below n), then n (all)."""
  out, k = [], FIRST_K
  while k < n:
    out.append(k)
    k *= 2
  return out + [n]


def run_curve(records: Sequence[dict], roles: Roles, examples: Mapping,
              statistic: str = "authors", draws: int = DRAWS, seed: int = SEED
              ) -> dict | None:
  """One run's curves: `{"k": [...], "ood": [mean OOD test figure of the choice, in %],
  "ood_atc": [the same, ties broken by ATC], "num_ood_val": n}`; None without per-example
  outputs (or heads alone) on the OOD validation split. `statistic='final'`: the last
  evaluation's heads only."""
  table = rules_lib.Table.from_records(records)
  if statistic == "final" and table.steps:
    table = table.where(step=table.steps[-1])
  ctx = rules_lib.Context(table, roles, data={"examples": examples})
  found = label_free.KLabelCandidates.of(ctx)
  if found is None:
    return None
  test = np.array([rules_lib.value(c.metrics.get(roles.test_ood), roles.ood_metric)
                   for c in found.candidates])
  n = found.num_examples
  out = {"k": ks(n), "ood": [], "ood_atc": [], "num_ood_val": n}
  for k in out["k"]:
    weights = estimators.draw_weights(n, k, draws, seed)
    for key, confirm in (("ood", False), ("ood_atc", True)):
      chosen = found.choose(weights, confirm)[0]
      values = test[chosen[chosen >= 0]]
      values = values[np.isfinite(values)]
      out[key].append(100.0 * float(values.mean()) if len(values) else math.nan)
  return out


def group_curve(curves: Sequence[dict], full: Sequence[float], oracle: Sequence[float]
                ) -> dict:
  """The mean over a group's runs of their curves at each k (`k`: the first run's k, its
  last entry "all"; runs of other sizes contribute at the k they share, and all at "all",
  drawn at the largest run's `num_ood_val`), with the full model's and the oracle's mean
  OOD test figures as references."""
  shared = [k for k in curves[0]["k"][:-1] if all(k in c["k"][:-1] for c in curves)]
  at = lambda c, key, k: c[key][c["k"].index(k)] if k != "all" else c[key][-1]
  out = {"k": shared + ["all"], "runs": len(curves),
         "num_ood_val": max(c["num_ood_val"] for c in curves)}
  for key in CURVES:
    out[key], out[key + "_std"] = [], []
    for k in out["k"]:
      values = np.array([at(c, key, k) for c in curves], np.float64)
      values = values[np.isfinite(values)]
      out[key].append(float(values.mean()) if len(values) else None)
      out[key + "_std"].append(float(values.std(ddof=1)) if len(values) > 1 else None)
  finite = lambda xs: [x for x in xs if x is not None and math.isfinite(x)]
  out["full"] = float(np.mean(finite(full))) if finite(full) else None
  out["oracle"] = float(np.mean(finite(oracle))) if finite(oracle) else None
  return out


def plot(groups: Mapping[str, dict], path: str) -> str:
  """OOD test accuracy against k, one colour per group: the oracle on k labels (solid), with
  ATC's tie-break (dash-dot), the oracle on all labels (dotted) and the full model
  (dashed)."""
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  cmap = plt.get_cmap("tab10")
  for i, (label, g) in enumerate(sorted(groups.items())):
    xs = [g["num_ood_val"] if k == "all" else k for k in g["k"]]
    for key, (style, _) in CURVES.items():
      pts = [(x, y) for x, y in zip(xs, g[key]) if y is not None]
      if pts:
        ax.plot(*zip(*pts), style, color=cmap(i % 10), markersize=4,
                label=f"{label} (n={g['runs']})" if key == "ood" else None)
    for key, style in (("oracle", ":"), ("full", "--")):
      if g.get(key) is not None:
        ax.axhline(g[key], color=cmap(i % 10), linestyle=style, linewidth=1)
  for style, name in CURVES.values():
    ax.plot([], [], "k" + style, markersize=4, label=name)
  ax.plot([], [], "k:", label="oracle (all OOD validation labels)")
  ax.plot([], [], "k--", label="full model")
  ax.set_xscale("log", base=2)
  ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
  ax.set(xlabel="labelled OOD validation examples k (last point: all)",
         ylabel="OOD test accuracy (%)",
         title=f"Oracle on k OOD labels (mean over {DRAWS} draws)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  return plotting.save_figure(fig, path, dpi=120)
