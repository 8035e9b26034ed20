"""Many head masks in one compiled pass: `MaskEvaluator` and `evaluate_masks`.

Every head alone (the other heads of its layer masked, the layer rescaled by `heads / kept`,
as the models do) and every head removed, scored on every eval split with
`metrics.classification_metrics` (accuracy, spurious and conflict accuracies, group
accuracies). The batch is tiled over a chunk of masks and each copy gets its own per-example
`[depth, heads]` mask, so scoring all heads of a layer costs about `(1 + 2 H)` evaluations and
one compilation.
"""

from __future__ import annotations

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import auto as tqdm

from vitreg_jax import metrics
from vitreg_jax import steps
from vitreg_jax.heads import masks as masks_lib


class MaskEvaluator:
  """Predictions of one model under many head masks, with one compilation per batch shape.

  The batch `[B, ...]` is tiled over a chunk of `C` masks into `[C * B, ...]` and example
  `c * B + b` gets mask `c` (the models take per-example `[B, depth, heads]` masks), so one
  call scores C masks. Masks are padded to a multiple of C (with all-ones masks, discarded)
  so every call has the same shapes: `traces` counts compilations.
  """

  def __init__(self, model, *, masks_per_pass: int | None = None,
               examples_per_pass: int = 8192):
    self.model = model
    self.depth, self.num_heads = masks_lib.model_shape(model)
    self.masks_per_pass = masks_per_pass
    self.examples_per_pass = examples_per_pass
    self.traces = 0
    self._fn = jax.jit(self._predict, static_argnums=4)

  def _predict(self, variables, images, labels, masks, normalize):
    self.traces += 1  # Runs only while tracing: counts compilations.
    images = steps.model_images(images, normalize)  # uint8 batches: normalized here.
    c, b = masks.shape[0], images.shape[0]
    tiled = jnp.tile(images, (c,) + (1,) * (images.ndim - 1))  # Mask-major: [c * b, ...].
    per_example = jnp.repeat(masks, b, axis=0)
    logits, _ = self.model.apply(variables, tiled, head_mask=per_example, train=False)
    logits = logits.astype(jnp.float32).reshape(c, b, -1)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(labels, (c, b)))
    return jnp.argmax(logits, -1), loss

  def chunk_size(self, batch_size: int, num_masks: int) -> int:
    """Masks per call: `masks_per_pass` when set (fixed shapes), else what fits."""
    if self.masks_per_pass:
      return self.masks_per_pass
    return max(1, min(self.examples_per_pass // max(batch_size, 1), num_masks))

  def num_chunks(self, batch_size: int, num_masks: int) -> int:
    return math.ceil(num_masks / self.chunk_size(batch_size, num_masks))

  def __call__(self, variables, images, labels, masks, chunk: int | None = None,
               normalize=None):
    """Returns `(pred int [M, B], loss float [M, B])` for masks `[M, depth, heads]`.

    `normalize` (`data.normalization(...)`) maps uint8 images to the model's input on the
    device; float images are used as given."""
    masks = np.asarray(masks, np.float32)
    m = masks.shape[0]
    chunk = chunk or self.chunk_size(images.shape[0], m)
    padded = math.ceil(m / chunk) * chunk
    masks = np.concatenate([masks, np.ones((padded - m,) + masks.shape[1:], np.float32)])
    preds, losses = [], []
    for start in range(0, padded, chunk):
      p, l = self._fn(variables, images, labels, masks[start:start + chunk], normalize)
      preds.append(np.asarray(p))
      losses.append(np.asarray(l))
    return np.concatenate(preds)[:m], np.concatenate(losses)[:m]


def evaluate_masks(evaluator: MaskEvaluator, variables, data_config, split: str, masks, *,
                   batch_size: int, progress=None) -> list[dict]:
  """Metrics of every mask `[M, depth, heads]` on `split` (one dict per mask)."""
  from vitreg_jax import data  # pylint: disable=g-import-not-at-top
  masks = np.asarray(masks, np.float32)
  preds, losses, arrays = [], [], {}
  normalize = data.normalization(data_config)
  for batch in data.make_eval_iterator(data_config, split, global_batch_size=batch_size):
    p, l = evaluator(variables, batch["image"], batch["label"], masks, normalize=normalize)
    preds.append(p)
    losses.append(l)
    for k, v in batch.items():
      if k != "image":
        arrays.setdefault(k, []).append(np.asarray(v))
    if progress is not None:
      progress.update(evaluator.num_chunks(len(batch["label"]), len(masks)))
  if not preds:
    raise ValueError(f"Eval split {split!r} is empty.")
  pred, loss = np.concatenate(preds, axis=1), np.concatenate(losses, axis=1)
  arrays = {k: np.concatenate(v) for k, v in arrays.items()}
  from vitreg_jax.data import groups  # pylint: disable=g-import-not-at-top
  counts = groups.train_group_counts(data_config) if "group" in arrays else None
  return [metrics.classification_metrics(pred[i], loss[i], arrays, train_group_counts=counts)
          for i in range(len(masks))]


def progress_bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  return tqdm.tqdm(total=total, desc=desc, unit="pass", file=sys.stderr)


def eval_splits_of(config, info) -> tuple[str, ...]:
  """Every split but the training one: ID and OOD, validation and test."""
  train_split = config.data.get("train_split", "train")
  return tuple(s for s in info.splits if s != train_split)


class RunEval:
  """Scores masks on a run's splits; holds the compiled evaluator and the data config."""

  def __init__(self, model, variables, config, splits, *, progress: bool = False):
    from vitreg_jax import data  # pylint: disable=g-import-not-at-top
    self.evaluator = MaskEvaluator(model)
    self.variables = jax.device_put(variables)
    self.config, self.splits, self.show = config, tuple(splits), progress
    self.batch_size = int(config.get("eval_batch_size") or config.batch_size)
    self.batches = {s: math.ceil(data.num_examples(config.data, s) / self.batch_size)
                    for s in self.splits}

  def __call__(self, masks, splits=None, desc="masks") -> dict[str, list[dict]]:
    splits = tuple(splits or self.splits)
    if not self.evaluator.masks_per_pass:  # The first call fixes the shapes: one compilation.
      self.evaluator.masks_per_pass = self.evaluator.chunk_size(self.batch_size, len(masks))
    per_batch = self.evaluator.num_chunks(self.batch_size, len(masks))
    bar = progress_bar(sum(self.batches[s] for s in splits) * per_batch, desc, self.show)
    try:
      return {s: evaluate_masks(self.evaluator, self.variables, self.config.data, s, masks,
                                batch_size=self.batch_size, progress=bar) for s in splits}
    finally:
      if bar is not None:
        bar.close()
