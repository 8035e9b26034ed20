"""Fine-tuning datasets of the ARViT table: CIFAR-10, CIFAR-100, Oxford Flowers-102,
Imagenette (all TFDS) and Imagewoof (fast.ai folder read in place; TFDS has no builder).

Preprocessing (per config, see `preprocess`): train = random-resized crop to `image_size`
(area fraction in `crop_scale`) + horizontal flip; eval = resize the shorter side to
`image_size / crop_fraction` + centre crop `image_size`. Defaults: CIFAR at its native 32 px
with `crop_fraction = 1` (no crop at eval) and `crop_scale = (0.35, 1)` (milder than
ImageNet's 0.08 on 32-px images); the others at 224 px with `crop_fraction = 0.875`.
Normalization: ImageNet mean/std (the models are pre-trained on ImageNet rotations).
Options `crop_padding` (CIFAR pad-and-crop instead of the random-resized crop) and
`randaugment` (a timm RandAugment string) give the "How do ViTs work?" authors' recipe;
`CIFAR10_MEAN` ... `CIFAR100_STD` are the statistics their configs normalize with.

Prepare: `python -m vitreg_jax.data.prepare cifar10 --data_dir=...` runs TFDS's own
download (needs network once) and writes array_record files.
"""

from __future__ import annotations

import os
import tarfile

from vitreg_jax import errors
from vitreg_jax.data import custom
from vitreg_jax.data import preprocess
from vitreg_jax.data.base import (CorruptDataError, DatasetInfo, DatasetNotPreparedError,
                                  TfdsDataset)


def image_options(size: int, crop_fraction: float, crop_scale=(0.08, 1.0)) -> dict:
  """`preprocess.imagenet_options` plus the train-augmentation options."""
  return {**preprocess.imagenet_options(size, crop_scale, crop_fraction),
          **preprocess.AUGMENT_OPTIONS}


# Per-channel statistics of the CIFAR training sets, as the "How do ViTs work?" authors'
# configs give them (xxxnell/how-do-vits-work, configs/cifar10_vit.yaml, cifar100_vit.yaml).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


class FinetuneDataset(TfdsDataset):
  """An image classification dataset from TFDS with the standard fine-tuning preprocessing."""

  def __init__(self, tfds_name: str, num_classes: int, split_map: dict, eval_splits: tuple,
               options: dict, description: str, variants: tuple = ()):
    self.tfds_name = tfds_name
    self.num_classes = num_classes
    self.split_map = dict(split_map)
    self.default_eval_splits = tuple(eval_splits)
    self.options = dict(options, **({'variant': variants[0]} if variants else {}))
    self.variants = tuple(variants)
    self.description = description
    self.prepare_hint = 'TFDS downloads it itself (network needed once).'

  def full_name(self, config: dict) -> str:
    if not self.variants:
      return self.tfds_name
    if config['variant'] not in self.variants:
      raise errors.UserError(f'Unknown {config["name"]} variant {config["variant"]!r}; valid: '
                             f'{list(self.variants)}.')
    return f'{self.tfds_name}/{config["variant"]}'

  def builder(self, config: dict):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(self.full_name(config), data_dir=config['data_dir'])

  def source(self, config: dict, split: str):
    if split not in self.split_map:
      raise errors.UserError(
          f'Unknown split {split!r} for dataset {config["name"]!r}; valid splits: '
          f'{list(self.split_map)}.')
    return self._open(config, self.full_name(config), self.split_map[split])

  def builder_for(self, config: dict, tfds_name: str):
    return self.builder(config)

  def transform(self, config: dict, split: str, train: bool):
    return preprocess.ImageTransform(
        size=int(config['image_size']), train=train, augment=config['augment'],
        crop_fraction=config['crop_fraction'], scale=config['crop_scale'],
        mean=config['mean'], std=config['std'], label_key=self.label_key,
        name_key='file_name', **preprocess.augmentation_kwargs(config))


_CIFAR_SPLITS = {'train': 'train', 'test': 'test'}
_FAST_AI_VARIANTS = ('320px-v2', '160px-v2', 'full-size-v2', '320px', '160px', 'full-size')

DATASETS = {
    'cifar10': FinetuneDataset(
        'cifar10', 10, _CIFAR_SPLITS, ('test',), image_options(32, 1.0, (0.35, 1.0)),
        'CIFAR-10 (TFDS cifar10)'),
    'cifar100': FinetuneDataset(
        'cifar100', 100, _CIFAR_SPLITS, ('test',), image_options(32, 1.0, (0.35, 1.0)),
        'CIFAR-100 (TFDS cifar100, fine labels)'),
    'oxford_flowers102': FinetuneDataset(
        'oxford_flowers102', 102,
        {'train': 'train', 'validation': 'validation', 'test': 'test'},
        ('validation', 'test'), image_options(224, 0.875), 'Oxford Flowers-102'),
    'imagenette': FinetuneDataset(
        'imagenette', 10, {'train': 'train', 'validation': 'validation'}, ('validation',),
        image_options(224, 0.875), 'Imagenette (10 easy ImageNet classes)',
        variants=_FAST_AI_VARIANTS),
}


class ImagewoofDataset(FinetuneDataset):
  """Imagewoof from the fast.ai release, read in place (TFDS has no imagewoof builder).

  Layout: `<manual_dir>/imagewoof2-<variant>/{train,val}/<wnid>/*.JPEG` as extracted from
  `imagewoof2-<variant>.tgz` (variant 320 by default; 160 or full size `imagewoof2`);
  `prepare` extracts the archive if it lies in the manual directory. Labels are the sorted
  WordNet ids (the fast.ai order). Splits: `train`, `validation` (the `val` folder).
  """

  downloads = False  # the fast.ai archive is a manual download

  def __init__(self):
    super().__init__('imagewoof', 10, {'train': 'train', 'validation': 'val'}, ('validation',),
                     image_options(224, 0.875), 'Imagewoof (10 dog breeds, fast.ai release)')
    self.options['variant'] = '320'

  def root(self, config: dict) -> str:
    variant = str(config['variant'])
    if variant not in ('320', '160', 'full'):
      raise errors.UserError(
          f"Unknown imagewoof variant {variant!r}; valid: ['320', '160', 'full'].")
    name = 'imagewoof2' if variant == 'full' else f'imagewoof2-{variant}'
    return os.path.join(config['manual_dir'], name)

  def _not_prepared(self, config: dict) -> str:
    root = self.root(config)
    return (f'Imagewoof not found at {root}/{{train,val}}/<wnid>/*.JPEG. Download '
            f'https://s3.amazonaws.com/fast-ai-imageclas/{os.path.basename(root)}.tgz into '
            f'{config["manual_dir"]}/ and run\n  {self.prepare_command(config)}')

  def _scan(self, config: dict):
    root = self.root(config)
    if not all(os.path.isdir(os.path.join(root, s)) for s in ('train', 'val')):
      raise DatasetNotPreparedError(self._not_prepared(config))
    return custom.scan_folder(root)

  def info(self, config: dict) -> DatasetInfo:
    classes, splits = self._scan(config)
    if len(classes) != self.num_classes:
      raise CorruptDataError(f'{self.root(config)}: expected 10 class folders, found '
                             f'{len(classes)}.')
    size = int(config['image_size'])
    return DatasetInfo(
        name=config['name'], num_classes=self.num_classes, image_shape=(size, size, 3),
        splits=tuple(self.split_map),
        num_examples={s: len(splits[f][0]) for s, f in self.split_map.items()},
        default_eval_splits=self.default_eval_splits)

  def source(self, config: dict, split: str):
    if split not in self.split_map:
      raise errors.UserError(f'Unknown split {split!r} for dataset imagewoof; valid splits: '
                             f'{list(self.split_map)}.')
    _, splits = self._scan(config)
    return custom.FileSource(*splits[self.split_map[split]])

  def transform(self, config: dict, split: str, train: bool):
    t = super().transform(config, split, train)
    t.name_key = 'file'
    return t

  def prepare(self, config: dict) -> None:
    root = self.root(config)
    archive = root + '.tgz'
    if not os.path.isdir(root) and os.path.isfile(archive):
      with tarfile.open(archive) as tar:
        tar.extractall(config['manual_dir'], filter='data')
    self.info(config)


DATASETS['imagewoof'] = ImagewoofDataset()
