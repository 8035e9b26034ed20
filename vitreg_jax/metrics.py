"""Metrics of per-example predictions: the one `classification_metrics` (training's eval and
head evaluation alike), group accuracies (Waterbirds, MNIST-CIFAR) and the mean accuracy over
corruptions (CIFAR-10-C / CIFAR-100-C).

`classification_metrics(pred, loss, arrays)` turns the predictions and losses of a whole split
(with the batch's other arrays: `label`, `mask` and any attributes) into accuracy and loss,
plus, where the dataset has them, the spurious-attribute figures (`spurious_accuracy`, and
on the examples whose attribute disagrees with the label `conflict_accuracy` /
`conflict_spurious_accuracy`) and the group figures. Given each example's confidence (the
predicted class's probability), it adds the predictive-performance figures "How do ViTs work?"
reports beside accuracy: `nll` (the mean negative log-likelihood of the true label) and `ece`
(expected calibration error over `ECE_BINS` equal-width confidence bins; `calibration_counts`
adds over batches, `reliability` gives the reliability diagram).

Group accuracy (Sagawa et al. 2020, "Distributionally Robust Neural Networks", Sec. 3):
for group g, `acc_g = sum_i m_i [pred_i = y_i] [g_i = g] / sum_i m_i [g_i = g]`;
worst-group accuracy is `min_g acc_g` over groups with at least one example; the
"adjusted average" is the unweighted mean of `acc_g`. Counts add over batches and processes,
so a caller can accumulate `group_counts` per eval batch and call `group_metrics_from_counts`
once (`group_metrics` does both for whole arrays). `Dataset.metrics` (vitreg_jax/data/dataset.py)
calls `classification_metrics` with the train split's group counts.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import numpy as np


def group_counts(correct, group, mask=None, num_groups: int = 4) -> tuple:
  """Per-group (number correct, number of examples) of one batch.

  Args:
    correct: [b] bool/0-1, whether the prediction equals the label.
    group: [b] int in [0, num_groups).
    mask: optional [b] float, 1 for real examples, 0 for padding.
    num_groups: number of groups (Waterbirds: 4, group = 2 * label + place).
  Returns:
    (correct_per_group, count_per_group), float64 arrays of shape [num_groups].
  """
  correct = np.asarray(correct, np.float64).reshape(-1)
  group = np.asarray(group).reshape(-1).astype(np.int64)
  mask = np.ones_like(correct) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  if group.size and (group.min() < 0 or group.max() >= num_groups):
    raise ValueError(f'group ids must lie in [0, {num_groups}), got {group.min()}..{group.max()}.')
  return (np.bincount(group, weights=correct * mask, minlength=num_groups),
          np.bincount(group, weights=mask, minlength=num_groups))


def group_metrics_from_counts(correct_per_group, count_per_group, prefix: str = '') -> dict:
  """Accuracies from summed `group_counts`.

  Returns:
    dict with `{prefix}accuracy` (example-weighted), `{prefix}group{g}_accuracy` (NaN for an
    empty group), `{prefix}worst_group_accuracy` and `{prefix}mean_group_accuracy` (over
    non-empty groups).
  """
  correct_per_group = np.asarray(correct_per_group, np.float64)
  count_per_group = np.asarray(count_per_group, np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    acc = np.where(count_per_group > 0, correct_per_group / count_per_group, np.nan)
  present = count_per_group > 0
  out = {f'{prefix}accuracy': float(correct_per_group.sum() / max(count_per_group.sum(), 1))}
  for g, a in enumerate(acc):
    out[f'{prefix}group{g}_accuracy'] = float(a)
  out[f'{prefix}worst_group_accuracy'] = float(acc[present].min()) if present.any() else np.nan
  out[f'{prefix}mean_group_accuracy'] = float(acc[present].mean()) if present.any() else np.nan
  return out


def group_metrics(predictions, labels, group, mask=None, num_groups: int = 4,
                  prefix: str = '') -> dict:
  """Per-group, worst-group and mean-group accuracy of whole arrays (see module docstring).

  Args:
    predictions: [n] predicted class ids (or [n, classes] logits: argmax is taken).
    labels: [n] true class ids.
    group: [n] group ids (e.g. `batch['group']`).
    mask: optional [n] 1/0 padding mask (`batch['mask']`).
    num_groups: number of groups.
    prefix: prepended to every key (e.g. 'test_').
  Returns:
    the dict of `group_metrics_from_counts`.
  """
  predictions = np.asarray(predictions)
  if predictions.ndim == 2:
    predictions = predictions.argmax(-1)
  correct = predictions.reshape(-1) == np.asarray(labels).reshape(-1)
  return group_metrics_from_counts(*group_counts(correct, group, mask, num_groups), prefix)


# Equal-width confidence bins of the ECE. The authors' `ops/tests.py` (`test`) bins with
# `np.linspace(0, 1, 11)`, i.e. 10 bins; Guo et al. (2017) used 15 (`calibration_counts`
# and `python -m vitreg_jax.analysis.calibration --bins` take any number).
ECE_BINS = 10


def calibration_counts(confidence, correct, mask=None, num_bins: int = ECE_BINS) -> np.ndarray:
  """Per confidence bin: (examples, summed confidence, number correct) of one batch.

  Bin b of B holds the confidences in `(b / B, (b + 1) / B]` (a confidence of 0 goes to bin
  0). The counts add over batches and processes: sum them, then call `reliability` once.

  Args:
    confidence: [n] the predicted class's probability (`max softmax`), in [0, 1].
    correct: [n] bool/0-1, whether the prediction equals the label.
    mask: optional [n] float, 1 for real examples, 0 for padding.
    num_bins: B.
  Returns:
    float64 `[3, B]`: example count, confidence sum and correct count per bin.
  """
  confidence = np.asarray(confidence, np.float64).reshape(-1)
  correct = np.asarray(correct, np.float64).reshape(-1)
  mask = np.ones_like(confidence) if mask is None else np.asarray(mask, np.float64).reshape(-1)
  if num_bins < 1:
    raise ValueError(f'Need at least one confidence bin, got num_bins={num_bins}.')
  if np.any(confidence < -1e-5) or np.any(confidence > 1 + 1e-5):  # NaN passes: ECE is NaN.
    raise ValueError('Confidences must be probabilities in [0, 1] (the max softmax), got '
                     f'{np.nanmin(confidence)}..{np.nanmax(confidence)}: logits passed?')
  index = np.clip(np.ceil(np.nan_to_num(confidence) * num_bins) - 1, 0, num_bins - 1)
  index = index.astype(np.int64)
  return np.stack([np.bincount(index, weights=w * mask, minlength=num_bins)
                   for w in (np.ones_like(confidence), confidence, correct)])


def reliability(counts) -> dict:
  """The reliability diagram and the ECE of summed `calibration_counts`.

  ECE (Naeini et al. 2015; Guo et al. 2017, Eq. 3) `= sum_b (n_b / N) |acc_b - conf_b|`,
  with `acc_b` / `conf_b` the accuracy / mean confidence of the `n_b` examples of bin b.

  Returns:
    `edges` (B + 1), per bin `count`, `confidence` and `accuracy` (None for an empty bin),
    and `ece`.
  """
  count, confidence, hits = np.asarray(counts, np.float64)
  mean = lambda x: [None if n == 0 else float(v / n) for v, n in zip(x, count)]
  # n_b |acc_b - conf_b| = |hits_b - confidence sum_b|: no division by an empty bin.
  ece = float(np.abs(hits - confidence).sum() / max(count.sum(), 1.0))
  return {'edges': np.linspace(0.0, 1.0, count.size + 1).tolist(), 'count': count.tolist(),
          'confidence': mean(confidence), 'accuracy': mean(hits), 'ece': ece}


def calibration_metrics(loss, confidence, correct, num_bins: int = ECE_BINS) -> dict:
  """Predictive performance beside accuracy ("How do ViTs work?" reports NLL and ECE).

  Args:
    loss: [n] per-example negative log-likelihood of the true label (the unsmoothed
      cross-entropy).
    confidence: [n] the predicted class's probability.
    correct: [n] whether the prediction is right.
  Returns:
    `nll` (mean of `loss`), `ece` (`reliability`, `num_bins` equal-width bins) and
    `mean_confidence` (what Difference of Confidences reads, heads/estimators.py).
  """
  counts = calibration_counts(confidence, correct, num_bins=num_bins)
  return {'nll': float(np.mean(loss)), 'ece': reliability(counts)['ece'],
          'mean_confidence': float(np.mean(confidence))}


def mean_corruption_accuracy(accuracy_by_split: Mapping[str, float],
                             corruptions: Optional[tuple] = None,
                             metric: str = 'accuracy') -> dict:
  """Mean accuracy (or another metric) over corruption splits named `<corruption>_<severity>`.

  Hendrycks & Dietterich (2019) report the mean over corruptions and severities 1-5; "How do
  ViTs work?" (Park & Kim 2022, Fig. 12) uses it as the robustness score on CIFAR-100-C, and
  the authors' `robustness.ipynb` averages NLL and ECE over the same 75 splits.

  Args:
    accuracy_by_split: split name -> accuracy (or `metric`); splits not of the form
      `<corruption>_<1..5>` (e.g. 'train', 'test') are ignored.
    corruptions: restrict to these corruption names (default: every one present).
    metric: the name the keys carry ('accuracy', 'nll', 'ece').
  Returns:
    dict with `mean_corruption_{metric}`, `corruption_{name}_{metric}` (mean over
    severities) and `severity{s}_{metric}` (mean over corruptions).
  """
  by_corruption, by_severity = {}, {}
  for split, acc in accuracy_by_split.items():
    name, _, severity = split.rpartition('_')
    if not name or severity not in ('1', '2', '3', '4', '5'):
      continue
    if corruptions is not None and name not in corruptions:
      continue
    by_corruption.setdefault(name, []).append(float(acc))
    by_severity.setdefault(int(severity), []).append(float(acc))
  if not by_corruption:
    raise ValueError('No `<corruption>_<severity>` splits among '
                     f'{sorted(accuracy_by_split)}.')
  out = {f'mean_corruption_{metric}': float(np.mean([a for v in by_corruption.values()
                                                     for a in v]))}
  out.update({f'corruption_{k}_{metric}': float(np.mean(v)) for k, v in by_corruption.items()})
  out.update({f'severity{k}_{metric}': float(np.mean(v)) for k, v in by_severity.items()})
  return out


# The batch attributes a spurious accuracy is scored on, in order of preference: `spurious`
# (MNIST-CIFAR, dominoes), else Waterbirds' `place` (the background).
SPURIOUS_ATTRIBUTES = ('spurious', 'place')


def spurious_key(attributes: Iterable[str]) -> str | None:
  """The batch attribute the spurious accuracy is scored on (`spurious`, else `place`)."""
  attributes = tuple(attributes)
  return next((key for key in SPURIOUS_ATTRIBUTES if key in attributes), None)


def train_weighted_mean_accuracy(metrics: Mapping, train_group_counts) -> float | None:
  """`sum_g p_g acc_g` with `p_g` the training split's group proportions.

  The "mean accuracy" of the Waterbirds papers (GroupDRO, JTT, DFR): a test set's group
  accuracies weighted as the groups occur in training, not the split's own example-weighted
  `accuracy` nor the unweighted `mean_group_accuracy`. Groups without a `group{g}_accuracy`
  in `metrics` (absent from the split) are left out and the weights renormalized; None when
  no group is present.
  """
  counts = np.asarray(train_group_counts, np.float64)
  acc = np.array([metrics.get(f'group{g}_accuracy', np.nan) for g in range(len(counts))],
                 np.float64)
  present = np.isfinite(acc) & (counts > 0)
  if not present.any():
    return None
  return float((counts[present] * acc[present]).sum() / counts[present].sum())


def classification_metrics(pred, loss, arrays: Mapping,
                           confidence=None, train_group_counts=None) -> dict[str, float]:
  """Accuracy and loss over the real examples (`mask > 0`), plus attribute-aware metrics.

  Args:
    pred: `[n]` predicted classes.
    loss: `[n]` per-example losses.
    arrays: the split's other arrays `[n]`: `label`, `mask` and any attributes.
    confidence: optional `[n]` probability of the predicted class (`steps.predictions`).
    train_group_counts: the training split's examples per group
      (`Dataset.train_group_counts`); with a `group` attribute it adds
      `train_weighted_mean_accuracy`.
  Returns:
    `accuracy`, `loss`, `num_examples`; with `confidence`: `nll` and `ece`
    (`calibration_metrics`; `loss` must then be the unsmoothed cross-entropy); with a spurious attribute (`spurious_key`):
    `spurious_accuracy` (how often the prediction equals the attribute: 1.0 = the model
    follows the shortcut) and, on the examples whose attribute differs from the label,
    `conflict_accuracy` and `conflict_spurious_accuracy`; with a `group` attribute:
    `group{g}_accuracy` for every group present, `worst_group_accuracy`,
    `mean_group_accuracy` (`group_metrics`: the unweighted mean over groups) and, given
    `train_group_counts`, `train_weighted_mean_accuracy`.
  """
  real = np.asarray(arrays['mask']) > 0
  pred, loss = np.asarray(pred)[real], np.asarray(loss)[real]
  label = np.asarray(arrays['label'])[real]
  out = {'accuracy': float(np.mean(pred == label)), 'loss': float(np.mean(loss)),
         'num_examples': int(real.sum())}
  if confidence is not None:
    out.update(calibration_metrics(loss, np.asarray(confidence)[real], pred == label))
  spurious = spurious_key(arrays)
  if spurious is not None:
    attr = np.asarray(arrays[spurious])[real]
    out['spurious_accuracy'] = float(np.mean(pred == attr))
    conflict = attr != label
    if conflict.any():
      out['conflict_accuracy'] = float(np.mean(pred[conflict] == label[conflict]))
      out['conflict_spurious_accuracy'] = float(np.mean(pred[conflict] == attr[conflict]))
  if 'group' in arrays:
    group = np.asarray(arrays['group'])[real]
    by_group = group_metrics(pred, label, group, num_groups=int(group.max(initial=0)) + 1)
    del by_group['accuracy']  # The same figure as above.
    # Groups absent from this split have no accuracy (NaN): leave them out.
    out.update({k: v for k, v in by_group.items() if not np.isnan(v)})
    if train_group_counts is not None:
      weighted = train_weighted_mean_accuracy(out, train_group_counts)
      if weighted is not None:
        out['train_weighted_mean_accuracy'] = weighted
  return out
