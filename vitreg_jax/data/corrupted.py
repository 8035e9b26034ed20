"""CIFAR-10-C and CIFAR-100-C (Hendrycks & Dietterich 2019), the robustness sets of
"How do ViTs work?" (Park & Kim 2022, Fig. 12: robustness = mean accuracy on CIFAR-100-C).

Both datasets train on the clean set and evaluate on corrupted copies of the test set:
splits `train`, `test` (clean, TFDS cifar10 / cifar100) and one split per corruption and
severity, named `<corruption>_<severity>` (severity 1..5), e.g. `fog_3`. Summarize the
per-split accuracies with `vitreg_jax.metrics.mean_corruption_accuracy`.

- `cifar10_corrupted`: the corrupted splits come from TFDS `cifar10_corrupted/<c>_<s>`
  (TFDS corruption names, e.g. `frosted_glass_blur`, `elastic`).
- `cifar100_corrupted`: the corrupted splits come from the released `.npy` files in
  `<manual_dir>/CIFAR-100-C/` (`<corruption>.npy` uint8 [50000, 32, 32, 3], severities 1..5
  in consecutive blocks of 10000, and `labels.npy`), read in place through a memory map
  (random access, nothing to build). File names are the corruption names (e.g. `glass_blur`,
  `elastic_transform`).
`corruptions` (option) restricts the corrupted splits; default: all 19 (15 benchmark + 4
extra). `BENCHMARK_CORRUPTIONS_*` lists the 15 of the paper's benchmark.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from vitreg_jax import errors
from vitreg_jax.data.base import (ArraySource, CorruptDataError, DatasetInfo,
                                  DatasetNotPreparedError)
from vitreg_jax.data.finetune import FinetuneDataset, image_options

SEVERITIES = (1, 2, 3, 4, 5)
CIFAR10_C = ('brightness', 'contrast', 'defocus_blur', 'elastic', 'fog', 'frost',
             'frosted_glass_blur', 'gaussian_blur', 'gaussian_noise', 'impulse_noise',
             'jpeg_compression', 'motion_blur', 'pixelate', 'saturate', 'shot_noise', 'snow',
             'spatter', 'speckle_noise', 'zoom_blur')
CIFAR100_C = ('brightness', 'contrast', 'defocus_blur', 'elastic_transform', 'fog', 'frost',
              'gaussian_blur', 'gaussian_noise', 'glass_blur', 'impulse_noise',
              'jpeg_compression', 'motion_blur', 'pixelate', 'saturate', 'shot_noise', 'snow',
              'spatter', 'speckle_noise', 'zoom_blur')
_EXTRA = ('gaussian_blur', 'saturate', 'spatter', 'speckle_noise')
BENCHMARK_CORRUPTIONS_10 = tuple(c for c in CIFAR10_C if c not in _EXTRA)
BENCHMARK_CORRUPTIONS_100 = tuple(c for c in CIFAR100_C if c not in _EXTRA)
C100_FOLDER = 'CIFAR-100-C'


def corruption_splits(corruptions) -> tuple:
  return tuple(f'{c}_{s}' for c in corruptions for s in SEVERITIES)


class _CorruptedBase(FinetuneDataset):
  """Clean train/test from TFDS plus `<corruption>_<severity>` eval splits."""
  all_corruptions: tuple = ()

  def _corruptions(self, config: dict) -> tuple:
    chosen = tuple(config['corruptions'] or self.all_corruptions)
    bad = sorted(set(chosen) - set(self.all_corruptions))
    if bad:
      raise errors.UserError(f'Unknown corruption(s) {bad} for {config["name"]}; valid: '
                             f'{list(self.all_corruptions)}.')
    return chosen

  def info(self, config: dict) -> DatasetInfo:
    info = super().info(config)
    corrupted = corruption_splits(self._corruptions(config))
    return DatasetInfo(
        name=config['name'], num_classes=info.num_classes, image_shape=info.image_shape,
        splits=tuple(self.split_map) + corrupted, num_examples=info.num_examples,
        default_eval_splits=('test',) + corrupted)

  def _check_corrupted_split(self, config: dict, split: str) -> tuple:
    corruption, _, severity = split.rpartition('_')
    if corruption not in self._corruptions(config) or severity not in map(str, SEVERITIES):
      raise errors.UserError(
          f'Unknown split {split!r} for dataset {config["name"]!r}; valid splits: '
          f'{list(self.split_map)} and <corruption>_<1..5> for corruption in '
          f'{list(self._corruptions(config))}.')
    return corruption, int(severity)


class Cifar10Corrupted(_CorruptedBase):
  """Registry entry 'cifar10_corrupted'."""
  all_corruptions = CIFAR10_C

  def __init__(self):
    super().__init__('cifar10', 10, {'train': 'train', 'test': 'test'}, ('test',),
                     dict(image_options(32, 1.0, (0.35, 1.0)), corruptions=None),
                     'CIFAR-10 + CIFAR-10-C (TFDS cifar10_corrupted)')
    self.prepare_hint = ('TFDS downloads cifar10 and cifar10_corrupted (CIFAR-10-C, 2.9 GB) '
                         'itself; network needed once.')

  def source(self, config: dict, split: str):
    if split in self.split_map:
      return super().source(config, split)
    corruption, severity = self._check_corrupted_split(config, split)
    return self._open(config, f'cifar10_corrupted/{corruption}_{severity}', 'test')

  def builder_for(self, config: dict, tfds_name: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(tfds_name, data_dir=config['data_dir'])

  def prepare(self, config: dict) -> None:
    super().prepare(config)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    for c in self._corruptions(config):
      for s in SEVERITIES:
        tfds.builder(f'cifar10_corrupted/{c}_{s}', data_dir=config['data_dir']
                     ).download_and_prepare(file_format='array_record')


@functools.lru_cache(maxsize=4)
def _c100_labels(folder: str) -> np.ndarray:
  return _load_npy(os.path.join(folder, 'labels.npy'))


def _load_npy(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise DatasetNotPreparedError(
        f'{path} is missing. CIFAR-100-C: extract CIFAR-100-C.tar '
        '(https://zenodo.org/record/3555552) so that <manual_dir>/CIFAR-100-C/<corruption>.npy '
        'and labels.npy exist.')
  try:
    return np.load(path, mmap_mode='r')
  except (ValueError, OSError, EOFError) as e:
    raise CorruptDataError(f'{path}: corrupt or truncated .npy file ({e}).') from None


class Cifar100Corrupted(_CorruptedBase):
  """Registry entry 'cifar100_corrupted'."""
  all_corruptions = CIFAR100_C
  downloads = False  # CIFAR-100-C's .npy files are a manual download

  def __init__(self):
    super().__init__('cifar100', 100, {'train': 'train', 'test': 'test'}, ('test',),
                     dict(image_options(32, 1.0, (0.35, 1.0)), corruptions=None),
                     'CIFAR-100 + CIFAR-100-C (.npy files in manual_dir)')
    self.prepare_hint = ('Clean CIFAR-100 comes from TFDS (downloaded once). CIFAR-100-C: '
                         'extract CIFAR-100-C.tar into {manual_dir}/ (giving '
                         '{manual_dir}/CIFAR-100-C/*.npy).')

  def folder(self, config: dict) -> str:
    return os.path.join(config['manual_dir'], C100_FOLDER)

  def source(self, config: dict, split: str):
    if split in self.split_map:
      return super().source(config, split)
    corruption, severity = self._check_corrupted_split(config, split)
    folder = self.folder(config)
    images = _load_npy(os.path.join(folder, f'{corruption}.npy'))
    labels = _c100_labels(folder)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8 or \
        len(images) != len(labels) or len(images) % len(SEVERITIES):
      raise CorruptDataError(
          f'{os.path.join(folder, corruption)}.npy: expected uint8 [5 * n, 32, 32, 3] matching '
          f'labels.npy ({len(labels)}), got {images.dtype} {images.shape}.')
    per = len(images) // len(SEVERITIES)
    sl = slice((severity - 1) * per, severity * per)
    return ArraySource({'image': images[sl], 'label': labels[sl]})

  def check_files(self, config: dict) -> None:
    """Opens every selected .npy file (reports a missing/corrupt one by name)."""
    for split in corruption_splits(self._corruptions(config))[::len(SEVERITIES)]:
      self.source(config, split)

  def prepare(self, config: dict) -> None:
    super().prepare(config)
    self.check_files(config)


DATASETS = {
    'cifar10_corrupted': Cifar10Corrupted(),
    'cifar100_corrupted': Cifar100Corrupted(),
}
