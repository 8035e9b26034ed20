"""ImageNet rotation prediction, the self-supervised pre-training task of ARViT (Sec. 4).

From TFDS `imagenet2012` (ILSVRC-2012, manual download). Each image is rotated
counter-clockwise by `k * 90` degrees and the model predicts `k` in {0, 1, 2, 3}
(Gidaris et al. 2018; the task's transform and eval source are `data/rotation.py`'s).
Train: random-resized crop to `image_size` + flip, then a rotation `k` drawn from the
example's generator (seeded by (seed, epoch, index)), so every epoch sees fresh rotations.
Eval: resize + centre crop, and every image appears four times, once per rotation
(`eval_all_rotations=True`), so the accuracy is over all four (example `4 i + k` is image i
rotated by k); with `eval_all_rotations=False` image i is shown once with rotation `i mod 4`.
The ImageNet class is kept as the attribute `object_label`.

Prepare: put `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in the manual directory,
then `python -m vitreg_jax.data.prepare imagenet_rotation --manual_dir=DIR --data_dir=DIR2`.
"""

from __future__ import annotations

import os

from vitreg_jax import errors
from vitreg_jax.data import preprocess
from vitreg_jax.data.base import DatasetNotPreparedError, TfdsDataset
from vitreg_jax.data.rotation import NUM_ROTATIONS, RotatedSource, RotationTransform

MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')

class ImageNetRotationDataset(TfdsDataset):
  """Registry entry 'imagenet_rotation'."""
  options = {**preprocess.imagenet_options(), 'eval_all_rotations': True}
  tfds_name = 'imagenet2012'
  split_map = {'train': 'train', 'validation': 'validation'}
  num_classes = NUM_ROTATIONS
  attributes = ('object_label',)
  attribute_classes = {'object_label': 1000}
  default_eval_splits = ('validation',)
  description = 'ImageNet-1k, 4-way rotation prediction (0/90/180/270 degrees)'
  downloads = False  # ILSVRC-2012 is a manual download
  prepare_hint = ('Put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from '
                  'image-net.org) in {manual_dir}/.')

  def prepare(self, config: dict) -> None:
    missing = [f for f in MANUAL_FILES
               if not os.path.isfile(os.path.join(config['manual_dir'], f))]
    if missing:
      raise DatasetNotPreparedError(
          f'imagenet_rotation needs {missing} in manual_dir={config["manual_dir"]} (download '
          'them from image-net.org after registering), then re-run this command.')
    super().prepare(config)

  def eval_source(self, config: dict, split: str):
    return RotatedSource(self.source(config, split), all_rotations=config['eval_all_rotations'])

  def transform(self, config: dict, split: str, train: bool):
    if int(config['image_size']) <= 0:
      raise errors.UserError('image_size must be positive.')
    return RotationTransform(preprocess.ImageTransform(
        size=int(config['image_size']), train=train, augment=config['augment'],
        crop_fraction=config['crop_fraction'], scale=config['crop_scale'],
        mean=config['mean'], std=config['std'], name_key='file_name'))
