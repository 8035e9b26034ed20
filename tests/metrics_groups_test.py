"""Worst-group and train-proportion-weighted mean accuracy (vitreg_jax/metrics.py) against
values computed by hand."""

import numpy as np
import pytest

from vitreg_jax import metrics


def test_both_accuracies_against_hand_computed_values():
  # Four groups (2 * label + spurious); 10 test examples, predictions chosen by hand:
  #   group 0: 3 examples, 3 right  -> 1.0
  #   group 1: 2 examples, 1 right  -> 0.5
  #   group 2: 2 examples, 0 right  -> 0.0
  #   group 3: 3 examples, 2 right  -> 2/3
  label = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
  spurious = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1])
  pred = np.array([0, 0, 0, 0, 1, 0, 0, 1, 1, 0])
  arrays = {"label": label, "spurious": spurious, "group": 2 * label + spurious,
            "mask": np.ones(10)}
  train_counts = [450, 50, 50, 450]  # training proportions .45 / .05 / .05 / .45
  out = metrics.classification_metrics(pred, np.zeros(10), arrays,
                                       train_group_counts=train_counts)
  assert out["accuracy"] == pytest.approx(6 / 10)
  assert out["worst_group_accuracy"] == pytest.approx(0.0)
  assert out["mean_group_accuracy"] == pytest.approx((1 + 0.5 + 0 + 2 / 3) / 4)
  # .45 * 1 + .05 * .5 + .05 * 0 + .45 * 2/3 = .45 + .025 + .3 = .775
  assert out["train_weighted_mean_accuracy"] == pytest.approx(0.775)
  assert "train_weighted_mean_accuracy" not in metrics.classification_metrics(
      pred, np.zeros(10), arrays)


def test_train_weighted_mean_leaves_out_groups_absent_from_the_split():
  by_group = {"group0_accuracy": 0.8, "group3_accuracy": 0.4}
  # Only groups 0 and 3 present: weights 450 / 900 each -> (0.8 + 0.4) / 2.
  assert metrics.train_weighted_mean_accuracy(by_group, [450, 50, 50, 450]) == \
      pytest.approx(0.6)
  assert metrics.train_weighted_mean_accuracy({}, [1, 1]) is None
