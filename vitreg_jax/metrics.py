"""Metrics of per-example predictions: the one `classification_metrics` (training's eval and
head evaluation alike), group accuracies (Waterbirds, MNIST-CIFAR) and the mean accuracy over
corruptions (CIFAR-10-C / CIFAR-100-C).

`classification_metrics(pred, loss, arrays)` turns the predictions and losses of a whole split
(with the batch's other arrays: `label`, `mask` and any attributes) into accuracy and loss,
plus, where the dataset has them, the spurious-attribute figures (`spurious_accuracy`, and
on the examples whose attribute disagrees with the label `conflict_accuracy` /
`conflict_spurious_accuracy`) and the group figures.

Group accuracy (Sagawa et al. 2020, "Distributionally Robust Neural Networks", Sec. 3):
for group g, `acc_g = sum_i m_i [pred_i = y_i] [g_i = g] / sum_i m_i [g_i = g]`;
worst-group accuracy is `min_g acc_g` over groups with at least one example; the
"adjusted average" is the unweighted mean of `acc_g`. Counts add over batches and processes,
so a caller can accumulate `group_counts` per eval batch and call `group_metrics_from_counts`
once (`group_metrics` does both for whole arrays). `vitreg_jax.data` re-exports the group
functions under their historical names (`data.group_metrics`, ...).
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


def mean_corruption_accuracy(accuracy_by_split: Mapping[str, float],
                             corruptions: Optional[tuple] = None) -> dict:
  """Mean accuracy over corruption splits named `<corruption>_<severity>`.

  Hendrycks & Dietterich (2019) report the mean over corruptions and severities 1-5; "How do
  ViTs work?" (Park & Kim 2022, Fig. 12) uses it as the robustness score on CIFAR-100-C.

  Args:
    accuracy_by_split: split name -> accuracy; splits not of the form
      `<corruption>_<1..5>` (e.g. 'train', 'test') are ignored.
    corruptions: restrict to these corruption names (default: every one present).
  Returns:
    dict with `mean_corruption_accuracy`, `corruption_{name}_accuracy` (mean over
    severities) and `severity{s}_accuracy` (mean over corruptions).
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
  out = {'mean_corruption_accuracy': float(np.mean([a for v in by_corruption.values()
                                                    for a in v]))}
  out.update({f'corruption_{k}_accuracy': float(np.mean(v)) for k, v in by_corruption.items()})
  out.update({f'severity{k}_accuracy': float(np.mean(v)) for k, v in by_severity.items()})
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
                           train_group_counts=None) -> dict[str, float]:
  """Accuracy and loss over the real examples (`mask > 0`), plus attribute-aware metrics.

  Args:
    pred: `[n]` predicted classes.
    loss: `[n]` per-example losses.
    arrays: the split's other arrays `[n]`: `label`, `mask` and any attributes.
    train_group_counts: the training split's examples per group
      (`data.groups.train_group_counts`); with a `group` attribute it adds
      `train_weighted_mean_accuracy`.
  Returns:
    `accuracy`, `loss`, `num_examples`; with a spurious attribute (`spurious_key`):
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
