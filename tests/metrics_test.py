"""Tests of metrics.classification_metrics against a plain Python loop."""

import numpy as np

from vitreg_jax import metrics


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
