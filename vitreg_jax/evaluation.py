"""Evaluation of a train state on the config's eval splits.

`evaluate` runs the jitted `eval_step` over one split (every example counted exactly once,
across processes) and summarizes it with `classification_metrics`: accuracy and loss, plus
the spurious-attribute and group metrics when the dataset has those attributes. The group and
worst-group accuracies are `vitreg_jax.data.metrics`' (Sagawa et al. 2020), the one
implementation in the package.
"""

import numpy as np

from vitreg_jax import sharding as shd
from vitreg_jax.data import metrics as data_metrics


def classification_metrics(pred, loss, batch_arrays: dict) -> dict[str, float]:
  """Accuracy and loss over real examples, plus attribute-aware metrics.

  With a `spurious` attribute: `spurious_accuracy`, how often the prediction equals the
  spurious label (1.0 = the model follows the shortcut). With a `group` attribute:
  `group{g}_accuracy` for every group present, `worst_group_accuracy` and
  `mean_group_accuracy` (`data.metrics.group_metrics`).
  """
  mask = batch_arrays["mask"] > 0
  pred, loss, label = pred[mask], loss[mask], batch_arrays["label"][mask]
  metrics = {"accuracy": float(np.mean(pred == label)), "loss": float(np.mean(loss)),
             "num_examples": int(mask.sum())}
  if "spurious" in batch_arrays:
    metrics["spurious_accuracy"] = float(np.mean(pred == batch_arrays["spurious"][mask]))
  if "group" in batch_arrays:
    groups = batch_arrays["group"][mask]
    by_group = data_metrics.group_metrics(pred, label, groups,
                                          num_groups=int(groups.max(initial=0)) + 1)
    del by_group["accuracy"]  # The same figure as above.
    # Groups absent from this split have no accuracy (NaN): leave them out.
    metrics.update({k: v for k, v in by_group.items() if not np.isnan(v)})
  return metrics


def evaluate(state, split: str, config, *, mesh, eval_fn, head_mask=None) -> dict:
  """Evaluates `state` on one split; every example counted exactly once.

  Args:
    state: the train state.
    split: a split of `config.data`.
    config: the resolved run config (reads `data`, `eval_batch_size`, `batch_size`).
    mesh: the device mesh.
    eval_fn: the jitted `steps.eval_step`, `(state, batch, head_mask) -> {'pred', 'loss'}`.
    head_mask: `[depth, heads]` mask (None for models without heads).
  Returns:
    `classification_metrics` of the whole split.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  preds, losses, arrays = [], [], {}
  it = data.make_eval_iterator(config.data, split,
                               global_batch_size=config.eval_batch_size or config.batch_size)
  for batch in it:
    gbatch = shd.to_global({"image": batch["image"], "label": batch["label"]}, mesh)
    # Results stay on the device (no per-batch host sync); fetched once after the loop.
    res = eval_fn(state, gbatch, head_mask)
    preds.append(res["pred"])
    losses.append(res["loss"])
    host = multihost_utils.process_allgather(
        {k: np.asarray(v) for k, v in batch.items() if k != "image"}, tiled=True)
    for k, v in host.items():
      arrays.setdefault(k, []).append(np.asarray(v))
  if not preds:
    raise ValueError(f"Eval split {split!r} of dataset {config.data.name!r} is empty.")
  arrays = {k: np.concatenate(v) for k, v in arrays.items()}
  preds, losses = multihost_utils.process_allgather((preds, losses), tiled=True)
  return classification_metrics(np.concatenate([np.asarray(p) for p in preds]),
                                np.concatenate([np.asarray(l) for l in losses]), arrays)


def evaluate_splits(state, config, info, *, mesh, eval_fn, head_mask=None) -> dict:
  """`{split: metrics}` over the config's eval splits (`data.eval_splits`)."""
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  return {split: evaluate(state, split, config, mesh=mesh, eval_fn=eval_fn,
                          head_mask=head_mask)
          for split in data.eval_splits(config.data, info)}
