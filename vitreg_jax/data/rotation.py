"""Rotation prediction, the self-supervised pretraining task of ARViT (Section 4), for any source.

Each image is rotated counter-clockwise by `k * 90` degrees and the model predicts `k` in
{0, 1, 2, 3} (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image
Rotations"). Training draws `k` from the example's generator (seeded by (seed, epoch,
index)), so every epoch sees fresh rotations; evaluation shows every image four times, once
per rotation (`RotatedSource`), so the accuracy is over all four. The source's own label is
kept as the attribute `object_label`.

Used by `imagenet_rotation` (ImageNet, `data/imagenet.py`) and `embedded_rotation` (crops of
the photos that ship with scikit-image and scikit-learn, `data/embedded.py`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vitreg_jax.data import custom
from vitreg_jax.data import preprocess

NUM_ROTATIONS = 4


class RotatedSource:
  """Each example of `source` repeated `NUM_ROTATIONS` times with key `rotation`."""

  def __init__(self, source, all_rotations: bool = True):
    self._source, self._all = source, all_rotations

  def __len__(self) -> int:
    return len(self._source) * (NUM_ROTATIONS if self._all else 1)

  def __getitem__(self, index: int) -> dict:
    if self._all:
      image_index, k = divmod(int(index), NUM_ROTATIONS)
    else:
      image_index, k = int(index), int(index) % NUM_ROTATIONS
    return {**self._source[image_index], 'rotation': k}


class RotationTransform:
  """Crop/resize with `image_transform`, rotate by k (from the example or drawn); uint8 out
  (normalized on the device with `image_transform`'s mean / std)."""

  def __init__(self, image_transform: preprocess.ImageTransform):
    self.image_transform = image_transform

  def __call__(self, example, rng=None) -> dict:
    t = self.image_transform
    img = t.image(example, rng)
    k = example['rotation'] if 'rotation' in example else int(rng.integers(NUM_ROTATIONS))
    img = preprocess.rotate90(img, k)
    return {'image': np.ascontiguousarray(img, np.uint8), 'label': np.int32(k),
            'object_label': np.int32(example['label'])}


class EmbeddedRotationDataset(custom.EmbeddedDataset):
  """Rotation prediction over an embedded module's images (`custom.EmbeddedDataset`).

  The module's `load` returns square images labelled by what they show (kept as
  `object_label`, `NUM_OBJECTS` values); the label of the task is the rotation. Images are
  used as generated (no crop or resize: the module's crops are the augmentation), evaluation
  covers all four rotations of every image.
  """

  def info(self, config: dict):
    info = super().info(config)
    return dataclasses.replace(info, num_classes=NUM_ROTATIONS, attributes=('object_label',),
                               attribute_classes={'object_label': int(self.module.NUM_OBJECTS)})

  def eval_source(self, config: dict, split: str):
    return RotatedSource(self.source(config, split), all_rotations=True)

  def transform(self, config: dict, split: str, train: bool):
    return RotationTransform(preprocess.ImageTransform(size=None, train=train, augment=False,
                                                       mean=config['mean'], std=config['std']))
