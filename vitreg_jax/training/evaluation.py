"""Evaluation of a train state on the dataset's eval splits.

`evaluate` runs the jitted `eval_step` over one split through `Dataset.read_split` (the one
reading of a split for evaluation: every example counted exactly once, across processes,
padding dropped) and scores it with `Dataset.metrics`, i.e. `metrics.classification_metrics`
(the one metric function of the package; head evaluation and DFR use it too): accuracy, loss,
NLL and ECE, plus the spurious-attribute, conflict and group metrics when the dataset has
those attributes (with the training split's group proportions,
`train_weighted_mean_accuracy`).
"""

import functools

from jax.experimental import multihost_utils

from vitreg_jax import sharding as shd


def evaluate(state, split: str, config, dataset, *, mesh, eval_fn, head_mask=None) -> dict:
  """Evaluates `state` on one split; every example counted exactly once.

  Args:
    state: the train state.
    split: a split of `dataset`.
    config: the resolved run config (reads `eval_batch_size`, `batch_size`).
    dataset: the run's `data.Dataset`.
    mesh: the device mesh.
    eval_fn: the jitted `steps.eval_step`, `(state, batch, head_mask) -> {'pred', 'loss',
      'confidence'}`.
    head_mask: `[depth, heads]` mask (None for models without heads).
  Returns:
    `metrics.classification_metrics` of the whole split.
  """
  def predict(batch):  # Results stay on the device: read back once, after the loop.
    gbatch = shd.to_global({"image": batch["image"], "label": batch["label"]}, mesh)
    return eval_fn(state, gbatch, head_mask)

  out = dataset.read_split(split, batch_size=config.eval_batch_size or config.batch_size,
                           predict=predict,
                           gather=functools.partial(multihost_utils.process_allgather,
                                                    tiled=True))
  return dataset.metrics(out["pred"], out["loss"], out, confidence=out["confidence"])


def evaluate_splits(state, config, dataset, *, mesh, eval_fn, head_mask=None) -> dict:
  """`{split: metrics}` over the dataset's eval splits (`Dataset.eval_splits`)."""
  return {split: evaluate(state, split, config, dataset, mesh=mesh, eval_fn=eval_fn,
                          head_mask=head_mask)
          for split in dataset.eval_splits}
