r"""DFR, Deep Feature Reweighting (Kirichenko, Izmailov & Wilson 2022, "Last Layer Re-Training is
Sufficient for Robustness to Spurious Correlations", Sec. 4, "DFR^Tr_Val"): keep the trained
network, refit only its last linear layer on the frozen features of a group-balanced held-out
split.

  python -m vitreg_jax.dfr --workdir=RUN                          # DFR
  python -m vitreg_jax.dfr --workdir=RUN --head_mask=RUN/head_mask.json   # DFR + SEL

The recipe, as in the authors' code (PolinaKirichenko/deep_feature_reweighting,
`dfr_evaluate_spurious.py`, `dfr_on_validation_tune` / `dfr_on_validation_eval`):
1. Features: the head's input (`out['pre_logits']`) of the held-out split (the ID validation
   split: `val_id` on dominoes / MNIST-CIFAR, `val` on Waterbirds), with evaluation
   preprocessing; with `--head_mask`, of the head-selected model (DFR + SEL).
2. Tuning: the held-out split is halved at random; the first half is subsampled to equal groups
   (every group cut to the smallest), standardized, and an L1-penalized logistic regression
   (`liblinear`) is fit for each C in `C_GRID`; C is the one with the best worst-group accuracy
   on the second half.
3. Final fit: `num_retrains` (20) regressions at that C, each on a fresh group-balanced subsample
   of the whole held-out split, standardized with the train split's feature statistics; their
   coefficients and intercepts are averaged.
The refit classifier is mapped back to raw features (`kernel = W^T / sigma`,
`bias = b - W (mu / sigma)`; binary: logits `[0, w.x + b]`), so it replaces the model's `head`
exactly. Group labels of the held-out split are used (for balancing and for choosing C); the
train split contributes only its feature statistics (no labels).

Writes to `--out` (default the workdir): `dfr.json` (or `dfr_sel.json` with a head mask: the
chosen C, the tuning curve, every split's metrics for the original head and for DFR),
`dfr.md` / `dfr_sel.md`, and `dfr_classifier.json` / `dfr_sel_classifier.json`: the refit head
(`kernel` [D, K], `bias` [K]) and the head mask it was fit under, which `load_classifier` /
`apply_classifier` put in place of the model's head for any later evaluation.
"""

from __future__ import annotations

import json
import os

from etils import epath
import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from vitreg_jax import errors
from vitreg_jax import roles
from vitreg_jax.heads import masks
from vitreg_jax.training import features
from vitreg_jax.training import rundir

C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)  # the authors' Waterbirds grid
NUM_RETRAINS = 20


def balanced_subsample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Indices of a random subsample with every present group cut to the smallest group."""
  members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
  smallest = min(len(m) for m in members)
  return np.sort(np.concatenate([rng.permutation(m)[:smallest] for m in members]))


def _logreg(x, y, c: float):
  """L1-penalized logistic regression (liblinear), spelled for the installed scikit-learn:
  1.8 deprecated `penalty='l1'` for `l1_ratio=1`, which older versions ignore."""
  version = tuple(int(p) for p in sklearn.__version__.split(".")[:2])
  l1 = {"l1_ratio": 1.0} if version >= (1, 8) else {"penalty": "l1"}
  model = LogisticRegression(C=c, solver="liblinear", **l1)
  model.fit(x, y)
  return model


def worst_group(pred, label, groups) -> float:
  return float(min(np.mean(pred[groups == g] == label[groups == g]) for g in np.unique(groups)))


def tune_c(x, y, g, rng, grid=C_GRID) -> tuple[float, dict]:
  """Step 2: `(best C, {C: worst-group accuracy on the second half})`."""
  order = rng.permutation(len(y))
  half = len(y) // 2
  fit_idx, score_idx = order[half:], order[:half]
  fit_idx = fit_idx[balanced_subsample(g[fit_idx], rng)]
  scaler = StandardScaler().fit(x[fit_idx])
  scores = {}
  for c in grid:
    model = _logreg(scaler.transform(x[fit_idx]), y[fit_idx], c)
    scores[float(c)] = worst_group(model.predict(scaler.transform(x[score_idx])), y[score_idx],
                                   g[score_idx])
  best = max(scores, key=lambda c: (scores[c], -list(scores).index(c)))  # ties: first in grid
  return best, scores


def fit(heldout: dict, train_features: np.ndarray, *, c: float,
        num_retrains: int = NUM_RETRAINS, rng: np.random.Generator,
        num_classes: int) -> dict:
  """Step 3: the averaged refit head in raw feature space, `{kernel [D, K], bias [K]}`."""
  x, y, g = heldout["features"], heldout["label"], heldout["group"]
  mu = train_features.mean(0)
  sigma = train_features.std(0)
  sigma = np.where(sigma > 0, sigma, 1.0)  # StandardScaler's rule for constant features
  coefs, intercepts = [], []
  for _ in range(num_retrains):
    idx = balanced_subsample(g, rng)
    model = _logreg((x[idx] - mu) / sigma, y[idx], c)
    coefs.append(model.coef_)
    intercepts.append(model.intercept_)
  w, b = np.mean(coefs, 0), np.mean(intercepts, 0)  # [K' , D], [K']
  w_raw, b_raw = w / sigma, b - (w / sigma) @ mu
  if num_classes == 2 and w.shape[0] == 1:  # one decision function: logits [0, w.x + b]
    w_raw = np.concatenate([np.zeros_like(w_raw), w_raw])
    b_raw = np.concatenate([np.zeros_like(b_raw), b_raw])
  return {"kernel": w_raw.T.astype(np.float32), "bias": b_raw.astype(np.float32)}


def apply_classifier(variables: dict, classifier: dict) -> dict:
  """`variables` with the model's `head` replaced by `classifier` (`kernel`, `bias`)."""
  head = variables["params"]["head"]
  kernel = np.asarray(classifier["kernel"], np.float32)
  if tuple(np.shape(head["kernel"])) != kernel.shape:
    raise errors.UserError(
        f"The classifier's kernel has shape {kernel.shape}; the model's head has "
        f"{tuple(np.shape(head['kernel']))}: it was fit on another model.")
  params = {**variables["params"], "head": {"kernel": kernel,
                                            "bias": np.asarray(classifier["bias"], np.float32)}}
  return {**variables, "params": params}


def load_classifier(path: str) -> dict:
  """A `dfr_classifier.json`: `{kernel, bias, head_mask (None or [depth, heads]), ...}`."""
  record = json.loads(epath.Path(path).read_text())
  for key in ("kernel", "bias"):
    if key not in record:
      raise errors.UserError(f"{path} is not a classifier file (no {key!r}); write one with "
                             "`python -m vitreg_jax.dfr --workdir=RUN`.")
  return record


def _metrics(dataset, logits, arrays: dict) -> dict:
  """`Dataset.metrics` of a split's logits (the original head's or the refit one's)."""
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  loss = logz - logits[np.arange(len(logits)), arrays["label"]]
  arrays = {k: v for k, v in arrays.items() if k not in ("features", "logits", "pred")}
  return dataset.metrics(logits.argmax(-1), loss, {**arrays, "mask": np.ones(len(loss))})


def _heldout_split(dataset) -> str:
  """The ID validation split of the held-out splits (`roles.split_roles`)."""
  return roles.split_roles(dataset.held_out_splits, dataset.info.attributes).val_id


def run_dfr(workdir: str, *, head_mask=None, heldout: str | None = None, step=None,
            grid=C_GRID, num_retrains: int = NUM_RETRAINS, seed: int = 0) -> tuple[dict, dict]:
  """DFR on a run: `(result dict for dfr.json, classifier dict)`."""
  run = rundir.load_run(workdir, step)
  dataset = run.dataset
  info = dataset.info
  mask = None
  if head_mask is not None:
    mask = masks.load_head_mask(head_mask, masks.model_shape(run.model))
  heldout = heldout or _heldout_split(dataset)
  feats = {s: features.extract(run, s, head_mask=mask) for s in dataset.held_out_splits}
  if "group" not in feats[heldout]:
    raise errors.UserError(f"DFR needs group labels on the held-out split {heldout!r}; "
                           f"dataset {info.name!r} has attributes {list(info.attributes)}.")
  train = features.extract(run, dataset.train_split, head_mask=mask)
  rng = np.random.default_rng(seed)
  h = feats[heldout]
  c, tuning = tune_c(h["features"], h["label"], h["group"], rng, grid)
  classifier = fit(h, train["features"], c=c, num_retrains=num_retrains, rng=rng,
                   num_classes=run.num_classes)
  result = {
      "workdir": os.path.abspath(workdir), "step": run.step, "dataset": info.name,
      "method": "DFR+SEL" if mask is not None else "DFR", "heldout_split": heldout, "c": c,
      "tuning_worst_group_accuracy": {str(k): v for k, v in tuning.items()},
      "num_retrains": num_retrains, "seed": seed,
      "head_mask": None if mask is None else np.asarray(mask).tolist(),
      "original": {s: _metrics(dataset, f["logits"], f) for s, f in feats.items()},
      "dfr": {s: _metrics(dataset, f["features"] @ classifier["kernel"] + classifier["bias"], f)
              for s, f in feats.items()},
  }
  classifier = {**{k: v.tolist() for k, v in classifier.items()}, "c": c,
                "head_mask": result["head_mask"], "workdir": result["workdir"],
                "step": run.step}
  return result, classifier


def markdown(result: dict) -> str:
  keys = ("accuracy", "worst_group_accuracy", "mean_group_accuracy",
          "train_weighted_mean_accuracy")
  lines = [f"# {result['method']} on {result['workdir']} (step {result['step']})", "",
           f"Refit on `{result['heldout_split']}` (group-balanced, L1 logistic regression, "
           f"C = {result['c']}, {result['num_retrains']} subsamples averaged).", "",
           "| split | head | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
  for split in result["dfr"]:
    for which in ("original", "dfr"):
      m = result[which][split]
      lines.append(f"| {split} | {which} | " + " | ".join(
          f"{100 * m[k]:.2f}" if k in m else "-" for k in keys) + " |")
  return "\n".join(lines) + "\n"


def write(workdir: str, out: str | None = None, **kwargs) -> dict:
  """Runs DFR and writes dfr[_sel].json / .md / _classifier.json; returns the paths."""
  result, classifier = run_dfr(workdir, **kwargs)
  stem = "dfr_sel" if result["head_mask"] is not None else "dfr"
  out = out or workdir
  paths = {k: os.path.join(out, f"{stem}{suffix}") for k, suffix in
           (("json", ".json"), ("md", ".md"), ("classifier", "_classifier.json"))}
  rundir.write_text(paths["json"], json.dumps(result, indent=1))
  rundir.write_text(paths["md"], markdown(result))
  rundir.write_text(paths["classifier"], json.dumps(classifier))
  return paths
