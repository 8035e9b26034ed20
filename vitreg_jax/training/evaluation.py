"""Evaluation of a train state on the config's eval splits.

`evaluate` runs the jitted `eval_step` over one split (every example counted exactly once,
across processes) and summarizes it with `metrics.classification_metrics`, the one metric
function of the package (head evaluation uses it too): accuracy, loss, NLL and ECE, plus the
spurious-attribute, conflict and group metrics when the dataset has those attributes
(with the training split's group proportions, `train_weighted_mean_accuracy`).
"""

from jax.experimental import multihost_utils
import numpy as np

from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax import metrics
from vitreg_jax import sharding as shd
from vitreg_jax.data import groups


def evaluate(state, split: str, config, *, mesh, eval_fn, head_mask=None) -> dict:
  """Evaluates `state` on one split; every example counted exactly once.

  Args:
    state: the train state.
    split: a split of `config.data`.
    config: the resolved run config (reads `data`, `eval_batch_size`, `batch_size`).
    mesh: the device mesh.
    eval_fn: the jitted `steps.eval_step`, `(state, batch, head_mask) -> {'pred', 'loss',
      'confidence'}`.
    head_mask: `[depth, heads]` mask (None for models without heads).
  Returns:
    `metrics.classification_metrics` of the whole split.
  """
  results, arrays = [], {}
  it = data.make_eval_iterator(config.data, split,
                               global_batch_size=config.eval_batch_size or config.batch_size)
  for batch in it:
    gbatch = shd.to_global({"image": batch["image"], "label": batch["label"]}, mesh)
    # Results stay on the device (no per-batch host sync); fetched once after the loop.
    results.append(eval_fn(state, gbatch, head_mask))
    host = multihost_utils.process_allgather(
        {k: np.asarray(v) for k, v in batch.items() if k != "image"}, tiled=True)
    for k, v in host.items():
      arrays.setdefault(k, []).append(np.asarray(v))
  if not results:
    raise errors.UserError(f"Eval split {split!r} of dataset {config.data.name!r} is empty.")
  arrays = {k: np.concatenate(v) for k, v in arrays.items()}
  results = multihost_utils.process_allgather(results, tiled=True)
  per_example = {k: np.concatenate([np.asarray(r[k]) for r in results]) for k in results[0]}
  return metrics.classification_metrics(
      per_example["pred"], per_example["loss"], arrays, confidence=per_example["confidence"],
      train_group_counts=groups.train_group_counts(config.data) if "group" in arrays else None)


def evaluate_splits(state, config, info, *, mesh, eval_fn, head_mask=None) -> dict:
  """`{split: metrics}` over the config's eval splits (`data.eval_splits`)."""
  return {split: evaluate(state, split, config, mesh=mesh, eval_fn=eval_fn,
                          head_mask=head_mask)
          for split in data.eval_splits(config.data, info)}
