"""Tests of metrics.classification_metrics against a plain Python loop, and of NLL / ECE
against NumPy and a hand-computed case."""

import jax.numpy as jnp
import numpy as np
import pytest

from vitreg_jax import metrics
from vitreg_jax.training import steps


def test_classification_metrics_matches_loop_reference():
  rng = np.random.default_rng(0)
  n = 200
  label = rng.integers(0, 2, n)
  pred = np.where(rng.random(n) < 0.7, label, 1 - label)
  group = rng.choice([0, 1, 3], n)  # Group 2 absent: it gets no accuracy.
  mask = (rng.random(n) < 0.9).astype(np.float32)
  spurious = rng.integers(0, 2, n)
  m = metrics.classification_metrics(
      pred, np.arange(n, dtype=np.float64), dict(label=label, mask=mask, group=group,
                                                 spurious=spurious))
  real = [i for i in range(n) if mask[i] > 0]
  assert m["num_examples"] == len(real)
  assert m["accuracy"] == sum(pred[i] == label[i] for i in real) / len(real)
  assert m["loss"] == np.mean([float(i) for i in real])
  assert m["spurious_accuracy"] == sum(pred[i] == spurious[i] for i in real) / len(real)
  accs = {}
  for g in (0, 1, 3):
    members = [i for i in real if group[i] == g]
    accs[g] = sum(pred[i] == label[i] for i in members) / len(members)
    np.testing.assert_allclose(m[f"group{g}_accuracy"], accs[g])
  assert "group2_accuracy" not in m
  np.testing.assert_allclose(m["worst_group_accuracy"], min(accs.values()))
  np.testing.assert_allclose(m["mean_group_accuracy"], np.mean(list(accs.values())))


def test_ece_of_a_hand_computed_case():
  # 4 bins of width 0.25. Bin 1 (0.25, 0.5]: confidences 0.3, 0.4, one right -> acc 0.5,
  # conf 0.35; bin 3 (0.75, 1]: 0.8, 0.9, 1.0, all right -> acc 1, conf 0.9. Bin edges:
  # 0.5 belongs to bin 1, 0.75 to bin 2 (right-closed bins).
  conf = np.array([0.3, 0.4, 0.8, 0.9, 1.0, 0.5, 0.75])
  correct = np.array([1, 0, 1, 1, 1, 0, 1])
  counts = metrics.calibration_counts(conf, correct, num_bins=4)
  np.testing.assert_allclose(counts[0], [0, 3, 1, 3])
  np.testing.assert_allclose(counts[1], [0, 1.2, 0.75, 2.7])
  np.testing.assert_allclose(counts[2], [0, 1, 1, 3])
  diagram = metrics.reliability(counts)
  assert diagram['accuracy'][0] is None and diagram['count'] == [0, 3, 1, 3]
  np.testing.assert_allclose(diagram['accuracy'][1:], [1 / 3, 1, 1])
  np.testing.assert_allclose(diagram['confidence'][1:], [0.4, 0.75, 0.9])
  # (3 |1/3 - 0.4| + 1 |1 - 0.75| + 3 |1 - 0.9|) / 7
  np.testing.assert_allclose(diagram['ece'], (0.2 + 0.25 + 0.3) / 7)
  np.testing.assert_allclose(diagram['edges'], [0, 0.25, 0.5, 0.75, 1])


def test_ece_is_zero_when_confidence_equals_accuracy_and_rejects_logits():
  conf = np.full(10, 0.7)
  correct = np.arange(10) < 7
  assert metrics.calibration_metrics(np.zeros(10), conf, correct)['ece'] < 1e-12
  with pytest.raises(ValueError, match='logits passed'):
    metrics.calibration_counts(np.array([2.5, -1.0]), np.array([1, 0]))


def test_nll_and_ece_of_classification_metrics_match_numpy():
  rng = np.random.default_rng(1)
  n, k = 300, 5
  logits = rng.normal(size=(n, k)) * 3
  label = rng.integers(0, k, n)
  mask = (rng.random(n) < 0.8).astype(np.float32)
  preds = steps.predictions(jnp.asarray(logits), jnp.asarray(label))
  m = metrics.classification_metrics(preds['pred'], preds['loss'], dict(label=label, mask=mask),
                                     confidence=preds['confidence'])
  # NumPy reference: log-softmax, the true label's NLL, a loop over 10 bins.
  log_probs = logits - logits.max(1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
  real = mask > 0
  np.testing.assert_allclose(m['nll'], -log_probs[np.arange(n), label][real].mean(), rtol=1e-5)
  np.testing.assert_allclose(m['nll'], m['loss'])
  conf, pred = np.exp(log_probs.max(1))[real], log_probs.argmax(1)[real]
  right = pred == label[real]
  ece = 0.0
  for b in range(10):
    members = [i for i in range(len(conf)) if b / 10 < conf[i] <= (b + 1) / 10]
    if members:
      ece += len(members) / len(conf) * abs(right[members].mean() - conf[members].mean())
  np.testing.assert_allclose(m['ece'], ece, rtol=1e-5)


def test_calibration_counts_add_over_batches():
  rng = np.random.default_rng(2)
  conf, correct = rng.random(100), rng.random(100) < 0.6
  mask = (rng.random(100) < 0.9).astype(np.float32)
  whole = metrics.calibration_counts(conf, correct, mask, num_bins=15)
  parts = sum(metrics.calibration_counts(conf[i:i + 32], correct[i:i + 32], mask[i:i + 32],
                                         num_bins=15) for i in range(0, 100, 32))
  np.testing.assert_allclose(parts, whole)
  real = mask > 0
  np.testing.assert_allclose(
      metrics.reliability(parts)['ece'],
      metrics.calibration_metrics(np.zeros(real.sum()), conf[real], correct[real],
                                  num_bins=15)['ece'])


def test_mean_corruption_of_another_metric():
  m = metrics.mean_corruption_accuracy({'fog_1': 1.0, 'fog_2': 3.0, 'snow_1': 2.0, 'test': 9.0},
                                       metric='nll')
  assert m == {'mean_corruption_nll': 2.0, 'corruption_fog_nll': 2.0,
               'corruption_snow_nll': 2.0, 'severity1_nll': 1.5, 'severity2_nll': 3.0}
