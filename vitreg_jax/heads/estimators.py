"""Estimates of a model's OOD accuracy without OOD labels, and the scores of the label-free
selection rules: pure NumPy functions of per-example predictions and confidences.

Each is implemented once here (the rules of heads/label_free.py and the k-label curve of
heads/k_labels.py call them) and tested against a slow loop in tests/heads_estimators_test.py.
"Confidence" is the max softmax probability (`steps.predictions`), ID the ID validation
split, OOD the OOD validation split (inputs only, never its labels).

* `atc`: Average Thresholded Confidence (Garg et al., "Leveraging Unlabeled Data to Predict
  Out-of-Distribution Performance", ICLR 2022, Section 3, ATC with the max-confidence score):
  the threshold t below which the fraction of ID examples equals the ID error rate; the
  estimate is the fraction of OOD inputs at or above t.
* `doc`: Difference of Confidences (Guillory et al., "Predicting with Confidence on Unseen
  Distributions", ICCV 2021, Section 3): ID accuracy minus the drop of the mean confidence
  from ID to OOD.
* `aline_s`: agreement-on-the-line (Baek et al., "Agreement-on-the-Line: Predicting the
  Performance of Neural Networks under Distribution Shift", NeurIPS 2022, Section 4, ALine-S):
  over pairs of models, the OOD agreement is linear in the ID agreement after the probit
  transform, with the slope and bias of the OOD-vs-ID accuracy line; fit the line on the
  agreements (least squares) and apply it to each model's ID accuracy.
* `disagreement_gap`: how much more a model disagrees with a reference on OOD inputs than on
  ID inputs (the premise of DivDis, Lee et al., "Diversify and Disambiguate", ICLR 2023,
  Section 3: functions that agree on the source data and differ where the shortcut and the
  robust feature come apart).
* `pseudo_group_accuracy`: the mean accuracy over two pseudo-groups of ID examples (those in
  a set and the rest), the worst-group proxy of JTT (Liu et al., ICML 2021, Section 3: ERM's
  errors concentrate on the minority groups) and AFR (Qiu et al., ICML 2023, Section 4:
  upweighting the examples ERM is least confident on); `low_confidence_set` gives the second
  set.
"""

from __future__ import annotations

import statistics

import numpy as np

_EPS_COUNT = 0.5  # Probits of agreements of 0 or 1: clipped half an example from the ends.
# The standard normal's quantile and CDF (Wichura's AS241, exact to double precision) from the
# standard library: the report imports these rules, and scipy would cost it a quarter second.
_NORMAL = statistics.NormalDist()
_ndtri = np.vectorize(_NORMAL.inv_cdf, otypes=[np.float64])
_ndtr = np.vectorize(_NORMAL.cdf, otypes=[np.float64])


def atc_threshold(id_confidence, id_correct) -> float:
  """The ATC threshold t: the smallest value (one of the ID confidences, or +inf) for which
  the number of ID examples with confidence < t is closest to the number of ID errors."""
  conf = np.sort(np.asarray(id_confidence, np.float64))
  errors = int(np.size(id_correct) - np.count_nonzero(id_correct))
  candidates = np.append(np.unique(conf), np.inf)
  below = np.searchsorted(conf, candidates, side="left")
  return float(candidates[np.argmin(np.abs(below - errors))])


def atc(id_confidence, id_correct, ood_confidence) -> float:
  """ATC's estimate of the OOD accuracy: the fraction of OOD inputs with confidence >= t
  (`atc_threshold`)."""
  t = atc_threshold(id_confidence, id_correct)
  return float(np.mean(np.asarray(ood_confidence, np.float64) >= t))


def doc(id_accuracy, id_mean_confidence, ood_mean_confidence):
  """DoC's estimate: `ID acc - (ID mean confidence - OOD mean confidence)` (arrays or
  scalars)."""
  return (np.asarray(id_accuracy, np.float64)
          - (np.asarray(id_mean_confidence, np.float64)
             - np.asarray(ood_mean_confidence, np.float64)))


def agreement_matrix(pred) -> np.ndarray:
  """`[M, M]`: the fraction of examples on which models i and j predict the same class, from
  predictions `[M, n]`."""
  pred = np.asarray(pred)
  out = np.ones((len(pred), len(pred)))
  for i in range(len(pred)):  # M rows of [M, n] comparisons: M is tens, n thousands.
    out[i] = np.mean(pred[i][None] == pred, axis=1)
  return out


def probit(p, n: int) -> np.ndarray:
  """`Phi^-1(p)` with p clipped half an example (of n) from 0 and 1, so that a perfect
  agreement or accuracy has a finite probit."""
  lo = _EPS_COUNT / max(n, 1)
  return _ndtri(np.clip(np.asarray(p, np.float64), lo, 1.0 - lo))


def aline_line(id_pred, ood_pred) -> tuple[float, float]:
  """ALine-S's line `(slope, bias)`: least squares of `probit(OOD agreement)` on
  `probit(ID agreement)` over every pair i < j of the models' predictions `[M, n_id]`,
  `[M, n_ood]`; `(nan, nan)` with fewer than two pairs or no spread of ID agreement."""
  m = len(id_pred)
  iu = np.triu_indices(m, k=1)
  x = probit(agreement_matrix(id_pred)[iu], np.shape(id_pred)[1])
  y = probit(agreement_matrix(ood_pred)[iu], np.shape(ood_pred)[1])
  if len(x) < 2 or np.ptp(x) == 0:
    return float("nan"), float("nan")
  slope, bias = np.polyfit(x, y, 1)
  return float(slope), float(bias)


def aline_s(id_accuracy, id_pred, ood_pred, n_id: int | None = None) -> np.ndarray:
  """ALine-S's estimates `[M]` of the models' OOD accuracies:
  `Phi(slope * probit(ID acc) + bias)` with the line of `aline_line`."""
  slope, bias = aline_line(id_pred, ood_pred)
  n_id = np.shape(id_pred)[1] if n_id is None else n_id
  return _ndtr(slope * probit(id_accuracy, n_id) + bias)


def disagreement_gap(id_pred, id_reference, ood_pred, ood_reference) -> np.ndarray:
  """`[M]`: each model's disagreement with a reference model on the OOD inputs minus that on
  the ID inputs (predictions `[M, n]` against the reference's `[n]` on each split)."""
  differs = lambda pred, ref: np.mean(np.asarray(pred) != np.asarray(ref)[None], axis=1)
  return differs(ood_pred, ood_reference) - differs(id_pred, id_reference)


def draw_weights(n: int, k: int, draws: int, seed: int = 0) -> np.ndarray:
  """`[n, draws]` float32: column d is 1 on the k examples of draw d (uniform, without
  replacement; k >= n: every example, one column), 0 elsewhere."""
  if k >= n:
    return np.ones((n, 1), np.float32)
  rng = np.random.default_rng(seed)
  out = np.zeros((n, draws), np.float32)
  for d in range(draws):
    out[rng.choice(n, size=k, replace=False), d] = 1.0
  return out


def subset_scores(correct, weights, groups=None) -> np.ndarray:
  """`[M, D]`: each model's accuracy on each draw's examples (`weights` `[n, D]`,
  `draw_weights`), from `correct` `[M, n]`; with `groups` `[n]`, the mean over the groups
  present in the draw of the accuracy within each group (`mean_group_accuracy`)."""
  correct = np.asarray(correct, np.float32)
  if groups is None:
    return (correct @ weights) / weights.sum(axis=0)
  groups = np.asarray(groups)
  per_group = []
  for g in np.unique(groups):
    w = weights * (groups == g)[:, None]
    count = w.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
      per_group.append(np.where(count > 0, (correct @ w) / count, np.nan))
  return np.nanmean(np.stack(per_group), axis=0)


def first_best(scores, tiebreak=None) -> np.ndarray:
  """`[D]`: per column of `scores` `[M, D]`, the first row with the highest score (nan never
  wins; a column of nans gives -1); with `tiebreak` `[M]`, the rows tied at the highest
  score are compared on it first (estimate, then confirm: the k labels decide, an estimate
  breaks their ties)."""
  scores = np.where(np.isnan(scores), -np.inf, np.asarray(scores, np.float64))
  top = scores.max(axis=0)
  if tiebreak is None:
    best = np.argmax(scores, axis=0)
  else:
    tiebreak = np.where(np.isnan(tiebreak), -np.inf, np.asarray(tiebreak, np.float64))
    best = np.argmax(np.where(scores == top, tiebreak[:, None], -np.inf), axis=0)
  return np.where(np.isneginf(top), -1, best)


def low_confidence_set(confidence, correct) -> np.ndarray:
  """`[n]` bool: the examples a model is least confident on, as many as it gets wrong (the
  examples below its ATC threshold)."""
  return np.asarray(confidence, np.float64) < atc_threshold(confidence, correct)


def pseudo_group_accuracy(correct, in_set) -> np.ndarray:
  """`[M]`: the mean of each model's accuracy on the examples in `in_set` and on the rest
  (`correct` `[M, n]` bool); a pseudo-group without examples is left out of the mean (both
  empty: nan)."""
  correct, in_set = np.asarray(correct, bool), np.asarray(in_set, bool)
  parts = [correct[:, s].mean(axis=1) for s in (in_set, ~in_set) if s.any()]
  return np.mean(parts, axis=0) if parts else np.full(len(correct), np.nan)
