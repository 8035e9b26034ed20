"""Why a label-free rule does or does not find the oracle's head: each OOD-accuracy
estimator's error against the spread it must resolve (issue 27).

For every run and every logged evaluation step, over the candidates of `heads --table` (the
full model and each head alone), from `heads_examples/` (validation splits only):
* `spread`: the standard deviation over candidates of the true OOD validation accuracy;
* `best_gap`: the best candidate's true OOD validation accuracy minus the full model's;
* per estimator (ATC, DoC, ALine-S): `mae`, the mean absolute error of its estimate of each
  candidate's OOD validation accuracy, and `rank_corr`, Spearman's correlation of estimate
  and truth over candidates.
A rule can pick the best candidate only where its estimator's error is small against the
spread, and its ranking agrees with the truth. Averaged over steps, then over a group's
runs (`dataset / method`); printed as JSON.

  python experiments/estimator_error.py RUN [RUN ...]
"""

import json
import sys

import numpy as np
from scipy import stats

from vitreg_jax.heads import estimators
from vitreg_jax.heads import examples
from vitreg_jax.reports import papers
from vitreg_jax.reports import runs as runs_lib


def step_figures(data: dict, id_split: str, ood_split: str) -> dict:
  """One step's truths and estimates over its candidates."""
  ids, ood = data[id_split], data[ood_split]
  id_correct = ids["pred"] == ids["label"][None]
  truth = np.mean(ood["pred"] == ood["label"][None], axis=1)
  id_acc = id_correct.mean(axis=1)
  est = {
      "atc": np.array([estimators.atc(c, k, o) for c, k, o in
                       zip(ids["confidence"], id_correct, ood["confidence"])]),
      "doc": estimators.doc(id_acc, ids["confidence"].mean(axis=1),
                            ood["confidence"].mean(axis=1)),
      "aline": estimators.aline_s(id_acc, ids["pred"], ood["pred"]),
  }
  out = {"spread": float(np.std(truth)), "best_gap": float(truth.max() - truth[0])}
  for name, e in est.items():
    out[f"{name}_mae"] = float(np.mean(np.abs(e - truth)))
    rho = stats.spearmanr(e, truth).statistic if np.ptp(truth) > 0 else np.nan
    out[f"{name}_rank_corr"] = float(rho)
  return out


def run_figures(workdir: str) -> dict:
  per_step = [step_figures(d, "val_id", "val_ood") for d in examples.read(workdir).values()]
  return {k: float(np.nanmean([s[k] for s in per_step])) for k in per_step[0]}


def main(argv) -> None:
  groups = {}
  for workdir in argv[1:]:
    config = runs_lib.read_config(workdir)
    label = f"{config['data']['name']} / {papers.method(config)}"
    groups.setdefault(label, []).append(run_figures(workdir))
  out = {label: {k: round(float(np.nanmean([r[k] for r in rs])), 4) for k in rs[0]}
         for label, rs in sorted(groups.items())}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main(sys.argv)
