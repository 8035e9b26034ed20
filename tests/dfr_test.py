"""DFR (vitreg_jax/baselines/dfr.py): on a linearly separable toy where a head fit on the spuriously
correlated training data leans on the spurious feature, the refit head recovers the robust one."""

import numpy as np

from vitreg_jax.baselines import dfr


def toy(n, agreement, rng, dims=6):
  """Feature 0 robust (separates y with margin 0.5), feature 1 spurious (margin 3, equal to y
  with probability `agreement`), the rest noise. Groups 2 * y + s."""
  y = rng.integers(0, 2, n)
  s = np.where(rng.random(n) < agreement, y, 1 - y)
  x = rng.normal(0.0, 1.0, (n, dims))
  x[:, 0] = (2 * y - 1) * rng.uniform(0.5, 1.5, n)
  x[:, 1] = (2 * s - 1) * rng.uniform(3.0, 4.0, n)
  return {"features": x.astype(np.float32), "label": y, "group": 2 * y + s}


def test_balanced_subsample_cuts_every_group_to_the_smallest():
  groups = np.array([0] * 50 + [1] * 7 + [2] * 20 + [3] * 9)
  idx = dfr.balanced_subsample(groups, np.random.default_rng(0))
  assert np.bincount(groups[idx]).tolist() == [7, 7, 7, 7]
  assert len(set(idx)) == len(idx)


def test_dfr_recovers_the_robust_direction_where_the_erm_head_does_not():
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(0)
  train, heldout, test = toy(4000, 1.0, rng), toy(2000, 0.9, rng), toy(4000, 0.5, rng)
  # "ERM's head": a logistic regression on the training features, where the spurious feature
  # always agrees with the label and has the larger margin.
  erm = LogisticRegression(C=100.0, max_iter=2000).fit(train["features"], train["label"])
  erm_worst = dfr.worst_group(erm.predict(test["features"]), test["label"], test["group"])
  assert abs(erm.coef_[0, 1]) > abs(erm.coef_[0, 0])
  assert erm_worst < 0.3

  c, scores = dfr.tune_c(heldout["features"], heldout["label"], heldout["group"], rng)
  assert set(scores) == set(dfr.C_GRID) and scores[c] == max(scores.values())
  head = dfr.fit(heldout, train["features"], c=c, rng=rng, num_classes=2)
  assert head["kernel"].shape == (6, 2) and head["bias"].shape == (2,)
  w = head["kernel"][:, 1] - head["kernel"][:, 0]  # the decision direction in raw features
  assert abs(w[0]) > 5 * abs(w[1])  # robust feature dominates
  logits = test["features"] @ head["kernel"] + head["bias"]
  assert dfr.worst_group(logits.argmax(-1), test["label"], test["group"]) > 0.95


def test_apply_classifier_replaces_the_head_and_checks_its_shape():
  variables = {"params": {"head": {"kernel": np.zeros((6, 2)), "bias": np.zeros(2)},
                          "body": {"w": np.ones(3)}}, "batch_stats": {}}
  head = {"kernel": np.ones((6, 2)), "bias": np.arange(2.0)}
  out = dfr.apply_classifier(variables, head)
  np.testing.assert_array_equal(out["params"]["head"]["bias"], [0, 1])
  assert out["params"]["body"] is variables["params"]["body"] and "batch_stats" in out
  import pytest
  with pytest.raises(ValueError, match="another model"):
    dfr.apply_classifier(variables, {"kernel": np.ones((5, 2)), "bias": np.zeros(2)})
