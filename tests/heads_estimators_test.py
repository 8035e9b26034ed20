"""The label-free estimators (heads/estimators.py) against slow, obviously correct loops."""

import itertools
import math

import numpy as np
import pytest
from scipy import special

from vitreg_jax.heads import estimators


def _slow_atc(id_conf, id_correct, ood_conf):
  """Garg et al.'s definition read literally: try every ID confidence (and +inf) as the
  threshold, in increasing order, keep the first whose count of ID examples below it is
  closest to the count of ID errors; count the OOD inputs at or above it."""
  errors = sum(1 for c in id_correct if not c)
  best_t, best_gap = None, None
  for t in sorted(set(float(c) for c in id_conf)) + [math.inf]:
    gap = abs(sum(1 for c in id_conf if c < t) - errors)
    if best_gap is None or gap < best_gap:
      best_t, best_gap = t, gap
  return sum(1 for c in ood_conf if c >= best_t) / len(ood_conf)


@pytest.mark.parametrize("seed", range(8))
def test_atc_equals_the_loop(seed):
  rng = np.random.RandomState(seed)
  n = rng.randint(1, 30)
  # Rounded confidences: ties exercise the threshold's first-closest choice.
  id_conf = np.round(rng.uniform(0.5, 1.0, n), 1)
  id_correct = rng.rand(n) < rng.uniform(0, 1)
  ood_conf = np.round(rng.uniform(0.4, 1.0, 17), 1)
  assert estimators.atc(id_conf, id_correct, ood_conf) == pytest.approx(
      _slow_atc(id_conf, id_correct, ood_conf))


def test_atc_recovers_the_accuracy_where_it_is_exact():
  # ID: the 3 least confident examples are the 3 errors; the same confidences OOD give the
  # ID accuracy back, and an OOD split whose confidences all fall below gives 0.
  conf = np.array([0.55, 0.6, 0.65, 0.7, 0.8, 0.9, 0.95, 0.99])
  correct = np.array([0, 0, 0, 1, 1, 1, 1, 1], bool)
  assert estimators.atc_threshold(conf, correct) == 0.7
  assert estimators.atc(conf, correct, conf) == 5 / 8
  # 0.9, 0.95 and 0.99 shifted down by 0.2 stay at or above 0.7.
  assert estimators.atc(conf, correct, conf - 0.2) == 3 / 8
  assert estimators.atc(conf, correct, conf - 0.3) == 0.0
  assert estimators.atc(conf, np.zeros(8, bool), conf) == 0.0  # All wrong: t = +inf.
  np.testing.assert_array_equal(estimators.low_confidence_set(conf, correct), ~correct)


def test_doc_is_id_accuracy_minus_the_confidence_drop():
  id_acc, id_conf, ood_conf = [0.9, 0.8], [0.95, 0.85], [0.7, 0.84]
  want = [a - (c - o) for a, c, o in zip(id_acc, id_conf, ood_conf)]
  np.testing.assert_allclose(estimators.doc(id_acc, id_conf, ood_conf), want)


def _slow_aline(id_acc, id_pred, ood_pred):
  """ALine-S with loops: every pair's agreements, probits (clipped half an example from the
  ends), the ordinary least squares line by its textbook formulas, applied to ID accuracy."""
  def probit(p, n):  # scipy's normal quantile: not the function the package uses.
    return float(special.ndtri(min(max(p, 0.5 / n), 1 - 0.5 / n)))
  xs, ys = [], []
  for i, j in itertools.combinations(range(len(id_pred)), 2):
    agree = lambda pred: sum(a == b for a, b in zip(pred[i], pred[j])) / len(pred[i])
    xs.append(probit(agree(id_pred), len(id_pred[0])))
    ys.append(probit(agree(ood_pred), len(ood_pred[0])))
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
           / sum((x - mx) ** 2 for x in xs))
  bias = my - slope * mx
  return [float(special.ndtr(slope * probit(a, len(id_pred[0])) + bias)) for a in id_acc]


@pytest.mark.parametrize("seed", range(5))
def test_aline_equals_the_loop(seed):
  rng = np.random.RandomState(seed)
  m, n_id, n_ood = rng.randint(3, 7), 40, 30
  truth_id, truth_ood = rng.randint(0, 3, n_id), rng.randint(0, 3, n_ood)
  # Models that copy the truth with different probabilities: a spread of agreements.
  keep = rng.uniform(0.3, 1.0, (m, 1))
  id_pred = np.where(rng.rand(m, n_id) < keep, truth_id, rng.randint(0, 3, (m, n_id)))
  ood_pred = np.where(rng.rand(m, n_ood) < keep * 0.8, truth_ood, rng.randint(0, 3, (m, n_ood)))
  id_acc = (id_pred == truth_id).mean(1)
  np.testing.assert_allclose(estimators.aline_s(id_acc, id_pred, ood_pred),
                             _slow_aline(id_acc, id_pred, ood_pred), rtol=1e-9)


def test_aline_with_no_spread_of_agreement_gives_nan():
  pred = np.zeros((3, 5), int)
  assert np.isnan(estimators.aline_s([1.0, 1.0, 1.0], pred, pred)).all()


def test_agreement_matrix_and_disagreement_gap_equal_the_loops():
  rng = np.random.RandomState(0)
  pred_id, pred_ood = rng.randint(0, 2, (4, 9)), rng.randint(0, 2, (4, 7))
  agree = estimators.agreement_matrix(pred_id)
  for i, j in itertools.product(range(4), range(4)):
    assert agree[i, j] == sum(a == b for a, b in zip(pred_id[i], pred_id[j])) / 9
  gap = estimators.disagreement_gap(pred_id, pred_id[0], pred_ood, pred_ood[0])
  for i in range(4):
    ood = sum(a != b for a, b in zip(pred_ood[i], pred_ood[0])) / 7
    idd = sum(a != b for a, b in zip(pred_id[i], pred_id[0])) / 9
    assert gap[i] == pytest.approx(ood - idd)
  assert gap[0] == 0.0


def test_pseudo_group_accuracy_equals_the_loop():
  rng = np.random.RandomState(1)
  correct, in_set = rng.rand(3, 11) < 0.6, rng.rand(11) < 0.3
  got = estimators.pseudo_group_accuracy(correct, in_set)
  for m in range(3):
    inside = [correct[m, i] for i in range(11) if in_set[i]]
    rest = [correct[m, i] for i in range(11) if not in_set[i]]
    assert got[m] == pytest.approx((sum(inside) / len(inside) + sum(rest) / len(rest)) / 2)
  # An empty pseudo-group (a full model without errors) leaves the plain accuracy.
  np.testing.assert_allclose(estimators.pseudo_group_accuracy(correct, np.zeros(11, bool)),
                             correct.mean(1))


@pytest.mark.parametrize("grouped", [False, True])
def test_subset_scores_and_first_best_equal_the_loops(grouped):
  rng = np.random.RandomState(2)
  n, k = 13, 5
  correct, groups = rng.rand(4, n) < 0.5, rng.randint(0, 3, n)
  weights = estimators.draw_weights(n, k, 6, seed=3)
  assert weights.shape == (n, 6) and (weights.sum(0) == k).all()
  scores = estimators.subset_scores(correct, weights, groups if grouped else None)
  for d in range(6):
    drawn = [i for i in range(n) if weights[i, d]]
    for m in range(4):
      if grouped:
        accs = [np.mean([correct[m, i] for i in drawn if groups[i] == g])
                for g in sorted(set(groups[drawn]))]
        want = sum(accs) / len(accs)
      else:
        want = sum(correct[m, i] for i in drawn) / k
      assert scores[m, d] == pytest.approx(want)
    best = max(range(4), key=lambda m: (scores[m, d], -m))  # The first of the best.
    assert estimators.first_best(scores)[d] == best
  assert estimators.draw_weights(n, n + 3, 6).shape == (n, 1)  # All: one draw.
  assert estimators.first_best(np.full((2, 1), np.nan))[0] == -1


def test_first_best_breaks_ties_on_the_estimate():
  scores = np.array([[0.5, 1.0], [0.75, 1.0], [0.75, 0.25]])
  np.testing.assert_array_equal(estimators.first_best(scores), [1, 0])
  # Rows 1 and 2 tie in column 0 (row 2's estimate wins), rows 0 and 1 in column 1.
  np.testing.assert_array_equal(estimators.first_best(scores, np.array([0.9, 0.1, 0.3])), [2, 0])
  np.testing.assert_array_equal(estimators.first_best(scores, np.array([0.1, 0.5, 0.5])), [1, 1])
