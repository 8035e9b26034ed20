"""Many head masks at forward speed: `MaskEvaluator`, `SplitPool`, `RunEval`.

Every head alone (the other heads of its layer masked, the layer rescaled by `heads / kept`,
as the models do) and every head removed, scored on the dataset's held-out splits
(`Dataset.held_out_splits`: every split but the training one) with `Dataset.metrics`, i.e.
`metrics.classification_metrics` (accuracy, NLL and ECE, spurious and conflict accuracies,
group accuracies). What makes it cost about one forward pass per mask and image, and one
compilation for a whole analysis (greedy search included):

* The eval splits are read once (`SplitPool`, through `Dataset.read_split`, the reading
  training's evaluation and DFR share) and kept on the device as one uint8 array; a
  pass gathers its images by index, so every call, whatever its splits, has the same shapes.
* A pass scores `C` masks on `B` images in one call of the model with `expand_masks_at`
  (models/attention.py, `Encoder`): the blocks before the first one where the masks differ (all
  of them but the evaluated layers: the last block by default) run once on the B images, the
  rest on the `C * B` (mask, image) pairs. Masks of several layers (`--layer=all`) are sorted by
  the first block they change (`first_changes`), so that a pass of masks of the later layers
  runs the blocks before them once (one compilation per block a pass starts at). Models without
  that argument get their images tiled `C` times and per-example masks (the same result, without
  the shared blocks).
* All passes of a call are dispatched before any result is read back (one host transfer per
  pass, no host sync between passes); masks already scored on a split with the same weights
  are not scored again (`RunEval`'s cache: the selected mask of `oracle`, greedy's start and
  the mask it just left).
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import auto as tqdm

from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.training import steps


def first_difference(masks: np.ndarray) -> int:
  """The first block where masks `[M, depth, heads]` differ from each other (depth if none):
  the earliest of their `first_changes`."""
  return int(first_changes(masks).min(initial=masks.shape[1]))


def first_changes(masks: np.ndarray) -> np.ndarray:
  """`[M]`: the first block where each mask leaves the masks' most common row (depth if none).

  Masks whose values are >= d agree with each other on every block before d. The most common
  row of a block is all ones for `--layer=all`'s masks, greedy's mask for its candidates."""
  common = np.stack([_most_common_row(masks[:, b]) for b in range(masks.shape[1])])
  changed = np.any(masks != common, axis=2)
  return np.where(changed.any(axis=1), np.argmax(changed, axis=1), masks.shape[1])


def _most_common_row(rows: np.ndarray) -> np.ndarray:
  values, counts = np.unique(rows, axis=0, return_counts=True)
  return values[np.argmax(counts)]


def _even_block(total: int, most: int) -> int:
  """The block size <= `most` that splits `total` into as few, equal-as-can-be blocks."""
  return max(1, math.ceil(total / math.ceil(total / max(1, most)))) if total else max(1, most)


class MaskEvaluator:
  """Predictions of one model under many head masks, with one compilation per image pool.

  A pass scores `masks_per_pass` (C) masks on `images_per_pass` (B) images of a pool; both
  are fixed by the first call (C * B <= `examples_per_pass`), and masks and images are padded
  to multiples of them, so later calls reuse the compiled function: `traces` counts
  compilations. `layers` (the blocks whose heads the masks change) fixes the block from which
  (mask, image) pairs are expanded; without it the first call's masks decide, and a later
  call whose masks differ earlier compiles once more. With several layers a pass starts at
  the first block its masks change (`mask_passes`): at most one compilation per layer.
  """

  def __init__(self, model, *, layers=None, masks_per_pass: int | None = None,
               images_per_pass: int = 512, examples_per_pass: int = 8192):
    self.model = model
    self.depth, self.num_heads = masks_lib.model_shape(model)
    self.masks_per_pass, self.images_per_pass = masks_per_pass, images_per_pass
    self.examples_per_pass = examples_per_pass
    self.expand_at = min(layers) if layers else None
    self.layers = tuple(sorted(layers)) if layers else ()
    self._expands = "expand_masks_at" in inspect.signature(model.__call__).parameters
    self.traces, self._planned = 0, False
    self._fn = jax.jit(self._predict, static_argnums=(5, 6))

  def _predict(self, variables, pool, labels, index, masks, normalize, expand_at):
    self.traces += 1  # Runs only while tracing: counts compilations.
    images = steps.model_images(pool[index], normalize)  # uint8 pools: normalized here.
    c, b = masks.shape[0], images.shape[0]
    if self._expands:
      logits, _ = self.model.apply(variables, images, head_mask=masks,
                                   expand_masks_at=expand_at, train=False)
    else:  # Mask-major tiling: row c * b + i is image i under mask c.
      tiled = jnp.tile(images, (c,) + (1,) * (images.ndim - 1))
      logits, _ = self.model.apply(variables, tiled, head_mask=jnp.repeat(masks, b, axis=0),
                                   train=False)
    out = steps.predictions(logits.reshape(c, b, -1), jnp.broadcast_to(labels[index], (c, b)))
    return out["pred"], out["loss"], out["confidence"]

  def plan(self, num_images: int, masks) -> int:
    """Fixes the pass shapes at the first call; returns the passes this call takes."""
    masks = np.asarray(masks, np.float32)
    if not self._planned:  # Even blocks: the first call pads as little as possible.
      self._planned = True
      self.images_per_pass = _even_block(num_images, self.images_per_pass)
      self.masks_per_pass = self.masks_per_pass or _even_block(
          len(masks), max(1, self.examples_per_pass // self.images_per_pass))
    differs_at = first_difference(masks)
    if self.expand_at is None or differs_at < self.expand_at:
      self.expand_at = differs_at  # Earlier than before: one more compilation.
    return (math.ceil(len(masks) / self.masks_per_pass)
            * math.ceil(num_images / self.images_per_pass))

  def mask_passes(self, masks: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The order masks are scored in and each pass's `expand_masks_at` (after `plan`).

    One evaluated layer: the call's order, every pass expanded at `expand_at`. Several: masks
    sorted by their first changed block (`first_changes`, at most the last evaluated layer),
    each pass expanded at its first mask's, the earliest of its masks: masks that agree
    before it."""
    c = self.masks_per_pass
    if len(self.layers) < 2:
      return np.arange(len(masks)), [self.expand_at] * math.ceil(len(masks) / c)
    starts = np.minimum(np.maximum(first_changes(masks), self.expand_at), self.layers[-1])
    order = np.argsort(starts, kind="stable")
    return order, [int(starts[order[j]]) for j in range(0, len(masks), c)]

  def predict(self, variables, pool, labels, index, masks, normalize=None, progress=None):
    """`(pred int [M, n], loss float [M, n], confidence float [M, n])` (`steps.predictions`)
    of masks `[M, depth, heads]` on `pool[index]`.

    `pool` `[N, ...]` and `labels` `[N]` are device arrays (read once, see `SplitPool`);
    `index` `[n]` the pool rows to score.
    """
    masks, index = np.asarray(masks, np.float32), np.asarray(index, np.int32)
    self.plan(len(index), masks)
    c, b, m, n = self.masks_per_pass, self.images_per_pass, len(masks), len(index)
    order, starts = self.mask_passes(masks)
    # Padding: copies of the last mask (they agree with the others of its pass before its
    # expansion block) and of the first image; both are dropped below.
    masks = masks[order]
    masks = np.concatenate([masks, np.repeat(masks[-1:], -m % c, axis=0)])
    index = np.concatenate([index, np.repeat(index[:1], -n % b)])
    pending = [self._fn(variables, pool, labels, index[i:i + b], masks[j:j + c], normalize,
                        start)
               for j, start in zip(range(0, len(masks), c), starts)
               for i in range(0, len(index), b)]
    per_chunk = len(index) // b
    fetched = []
    for out in pending:  # All dispatched: read back in order.
      fetched.append([np.asarray(x) for x in out])
      if progress is not None:
        progress.update(1)
    join = lambda xs: np.concatenate(
        [np.concatenate(xs[j:j + per_chunk], axis=1) for j in range(0, len(xs), per_chunk)])
    unsort = np.argsort(order)
    return tuple(join([f[i] for f in fetched])[:m, :n][unsort] for i in range(3))

  def __call__(self, variables, images, labels, masks, normalize=None):
    """`(pred, loss, confidence)`, each `[M, B]`, for masks `[M, depth, heads]` on a batch.

    `normalize` (`Dataset.normalization`) maps uint8 images to the model's input on the
    device; float images are used as given."""
    pool, labels = jax.device_put((images, np.asarray(labels, np.int32)))
    return self.predict(variables, pool, labels, np.arange(len(labels)), masks, normalize)


class SplitPool:
  """Eval splits read once: images and labels of every real example on the device (one
  array for all splits, so every pass has the same shapes), the other arrays on the host.

  Attributes:
    images, labels: device arrays `[N, ...]`, `[N]` over the splits, in order.
    rows: split -> its row indices in them; arrays: split -> host arrays (`label`, `mask`,
      attributes) for `Dataset.metrics`; normalize: the data's normalization.
  """

  def __init__(self, dataset, splits, batch_size: int):
    self.normalize = dataset.normalization
    images, self.arrays, self.rows, start = [], {}, {}, 0
    for split in splits:
      arrays = dataset.read_split(split, batch_size=batch_size, images=True)
      images.append(arrays.pop("image"))
      self.arrays[split] = arrays
      self.rows[split] = np.arange(start, start + len(arrays["label"]))
      start += len(arrays["label"])
    labels = np.concatenate([a["label"] for a in self.arrays.values()]).astype(np.int32)
    self.images, self.labels = jax.device_put((np.concatenate(images), labels))


def progress_bar(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  return tqdm.tqdm(total=total, desc=desc, unit="pass", file=sys.stderr)


class RunEval:
  """Scores masks on a run's splits: the compiled evaluator, the splits read once (on the
  first call) and the metrics of every mask already scored with the current `variables`.

  Args:
    model, variables: the model and its weights (None: set `variables` before a call).
    config: the run's config (reads `eval_batch_size`, `batch_size`).
    dataset: the run's `data.Dataset`.
    splits: the splits scored (default `dataset.held_out_splits`: every split but the
      training one).
    keep_examples: splits whose per-example `pred` and `confidence` are kept beside the
      metrics (`examples`: what heads/examples.py writes during training).
  """

  def __init__(self, model, variables, config, dataset, splits=None, *, layers=None,
               progress: bool = False, keep_examples: Sequence[str] = ()):
    self.evaluator = MaskEvaluator(model, layers=layers)
    self.dataset, self.show = dataset, progress
    self.splits = tuple(dataset.held_out_splits if splits is None else splits)
    self.keep_examples = tuple(keep_examples)
    self.batch_size = int(config.get("eval_batch_size") or config.batch_size)
    self.variables = variables
    self._pool = None

  @property
  def variables(self):
    return self._variables

  @variables.setter
  def variables(self, value):  # New weights (the training hook's evaluations): a new cache.
    self._variables = None if value is None else jax.device_put(value)
    self._cache, self._examples = {}, {}

  @property
  def pool(self) -> SplitPool:
    if self._pool is None:
      self._pool = SplitPool(self.dataset, self.splits, self.batch_size)
      # Image blocks that divide the smallest split evenly: one-split calls (greedy's
      # rounds on the OOD validation split) pad as little as calls on every split.
      smallest = min(len(r) for r in self._pool.rows.values())
      evaluator = self.evaluator
      if not evaluator._planned:  # pylint: disable=protected-access
        evaluator.images_per_pass = _even_block(smallest, evaluator.images_per_pass)
    return self._pool

  def __call__(self, masks, splits=None, desc="masks") -> dict[str, list[dict]]:
    """`{split: [metrics of mask i]}` for masks `[M, depth, heads]` on `splits` (default all)."""
    splits, masks = tuple(splits or self.splits), np.asarray(masks, np.float32)
    keys = [m.tobytes() for m in masks]
    todo = list({k: i for i, k in enumerate(keys)
                 if any((s, k) not in self._cache for s in splits)}.values())
    if todo:
      self._score(masks[todo], [keys[i] for i in todo], splits, desc)
    return {s: [dict(self._cache[(s, k)]) for k in keys] for s in splits}

  def examples(self, masks, split: str) -> dict[str, np.ndarray]:
    """`{pred [M, n], confidence [M, n], label [n], <attributes> [n]}` of masks already scored
    on `split` (one of `keep_examples`) with the current `variables`."""
    keys = [m.tobytes() for m in np.asarray(masks, np.float32)]
    pred, conf = zip(*[self._examples[(split, k)] for k in keys])
    arrays = {k: v for k, v in self.pool.arrays[split].items() if k != "mask"}
    return {"pred": np.stack(pred), "confidence": np.stack(conf), **arrays}

  def _score(self, masks, keys, splits, desc) -> None:
    pool = self.pool
    index = np.concatenate([pool.rows[s] for s in splits])
    bar = progress_bar(self.evaluator.plan(len(index), masks), desc, self.show)
    try:
      pred, loss, conf = self.evaluator.predict(self.variables, pool.images, pool.labels,
                                                index, masks, pool.normalize, progress=bar)
    finally:
      if bar is not None:
        bar.close()
    start = 0
    for s in splits:
      end = start + len(pool.rows[s])
      for key, p, l, c in zip(keys, pred[:, start:end], loss[:, start:end],
                              conf[:, start:end]):
        self._cache[(s, key)] = self.dataset.metrics(p, l, pool.arrays[s], confidence=c)
        if s in self.keep_examples:
          self._examples[(s, key)] = (p, c)
      start = end
