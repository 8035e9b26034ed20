"""A dataset defined outside vitreg_jax, through the `npz` reader: two classes of stripes with
a colour shortcut that agrees with the class 90% of the time in the ID splits, 50% in the
OOD ones.

docs/design.md, "How to add a dataset", shows this file; tests/extension_test.py trains on it.
"""
import os

import numpy as np

from vitreg_jax import data
from vitreg_jax.data import custom

SPLITS = ('train', 'val_id', 'val_ood', 'test_id', 'test_ood')


def write(folder: str, n: int = 64, seed: int = 0) -> str:
  """Writes FOLDER/<split>.npz; returns the `path` pattern for the config."""
  rng = np.random.default_rng(seed)
  for split in SPLITS:
    label = rng.integers(0, 2, n)
    agree = 0.5 if split.endswith('ood') else 0.9    # how often the colour tells the class
    spurious = np.where(rng.random(n) < agree, label, 1 - label)
    images = np.zeros((n, 8, 8, 3), np.uint8)
    images[label == 1, ::2, :, 0] = 255              # the class: horizontal red stripes
    images[..., 2] = 255 * spurious[:, None, None]   # the shortcut: a blue wash
    np.savez(os.path.join(folder, f'{split}.npz'), images=images, labels=label,
             spurious=spurious)
  return os.path.join(folder, '{split}.npz')


class ToyStripes(custom.NpzDataset):
  """The `npz` reader with this dataset's own splits and no augmentation by default."""
  description = '8x8 stripes (label) with a colour shortcut (spurious)'
  options = {**custom.NpzDataset.options, 'splits': SPLITS, 'augment': False}


data.DATASETS['toy_stripes'] = ToyStripes()
