"""Which split and metric play the ID and the OOD role: the one `split_roles`.

Head selection chooses on the validation roles and reports the test roles; the report and
the poster's table read a run's ID / OOD figures at the test roles. One rule for all of
them, from the split names (and the attributes, or the dataset name):

* `{val,test}_{id,ood}` splits (dominoes, MNIST-CIFAR): accuracy on each; without test splits
  the validation splits stand in for them.
* `val` / `test` with groups (Waterbirds): both roles on the same split, ID =
  `train_weighted_mean_accuracy` (the group accuracies weighted by the training split's
  group proportions: the accuracy on the training distribution), OOD =
  `mean_group_accuracy` (the unweighted mean of the group accuracies: the accuracy with the
  background independent of the label).

Why those two on Waterbirds. The poster (Table 2) does not define its "ID Acc." / "OOD Acc.",
and the authors' code (ArmandNM/diverse-vit) holds no Waterbirds experiment; its MNIST-CIFAR
figures (diverse_vit/training.py, `evaluate_epoch_head_combinations`, read by
scripts/reporting.py, `get_experiment_summary`) are the accuracy on an ID split drawn like
training (`testID`) and on an OOD split whose spurious attribute is independent of the label
(`testOOD`, `spurious_ratio: 0.5` in config/vision_diverse_mnist_cifar.yaml). Waterbirds'
`test` is neither: each background is equally frequent *within* each class, while training
is 95% correlated. Its plain `accuracy` is therefore not an ID figure; reweighting its groups
to the training proportions is (the "average accuracy" of Sagawa et al. 2020, Liu et al. 2021
and Kirichenko et al. 2022), and the mean of its group accuracies is the OOD analogue. Both
are our reading; the worst-group accuracy (the field's headline) is reported beside them in
its own column. The `id_val` selection rule still reads plain `accuracy` on `val_id` (it uses
no group labels; heads/rules.py).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from vitreg_jax import errors

# The grouped layout's (Waterbirds') ID and OOD metrics (module docstring).
GROUPED_ID_METRIC = "train_weighted_mean_accuracy"
GROUPED_OOD_METRIC = "mean_group_accuracy"


@dataclasses.dataclass(frozen=True)
class Roles:
  """Which split and metric are ID / OOD, for validation (selection) and test (reporting);
  `id_metric` / `ood_metric` are the keys of the figures every table reports as "ID acc." /
  "OOD acc." (and the oracle selects on)."""
  val_id: str
  val_ood: str
  test_id: str
  test_ood: str
  id_metric: str = "accuracy"
  ood_metric: str = "accuracy"


def split_roles(splits: Sequence[str], attributes: Sequence[str] = (), *,
                dataset: str | None = None, missing_ok: bool = False) -> Roles:
  """The roles from the split names.

  Args:
    splits: the run's split names (its dataset's, or those it evaluated).
    attributes: the dataset's example attributes; a `group` attribute (or `dataset=
      'waterbirds'`) selects the group layout for `val` / `test` splits.
    dataset: the dataset's name, where the attributes are not at hand (a workdir's
      metrics.jsonl).
    missing_ok: for reading figures back: a grouped run with only a `test` split uses it for
      both roles, and splits that fit no layout get the standard `{val,test}_{id,ood}` names
      (their figures then show as missing) instead of an error.
  Raises:
    ValueError: naming the splits, when no layout fits (and not `missing_ok`).
  """
  splits = tuple(splits)
  has = lambda *names: all(n in splits for n in names)
  grouped = "group" in attributes or dataset == "waterbirds"
  if grouped and (has("val") or (missing_ok and has("test"))):
    val = "val" if has("val") else "test"
    test = "test" if has("test") else val
    return Roles(val, val, test, test, id_metric=GROUPED_ID_METRIC,
                 ood_metric=GROUPED_OOD_METRIC)
  if has("val_id", "val_ood") or missing_ok:
    test = "test" if has("test_id", "test_ood") or not has("val_id", "val_ood") else "val"
    return Roles("val_id", "val_ood", f"{test}_id", f"{test}_ood")
  raise errors.UserError(f"Cannot tell the ID and OOD validation splits apart in {list(splits)}: "
                         "head selection needs val_id/val_ood(/test_id/test_ood) splits, or "
                         "val/test with a `group` attribute.")
