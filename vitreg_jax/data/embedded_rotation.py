"""The images of `embedded_rotation`: crops of the pretraining tiles of `data/embedded.py`.

`load` returns crops labelled by their source photo (an index in `embedded.SOURCES`); the
registered spec (`rotation.EmbeddedRotationDataset`) turns them into the rotation task: the
label becomes the rotation `k` (drawn per epoch in training, all four in evaluation) and the
photo index the attribute `object_label`. Crops come only from the `pretrain` (split `train`)
and `pretrain_val` (split `val`) tiles, never from a downstream `test` tile (docs/embedded.md).

`downscale=2` takes the crops from 2 x 2-tile windows of the pool averaged down to one tile
(`embedded.super_tiles`): each crop then covers twice the scene at the same 32 px, so more
crops show an orientation (a horizon, an upright figure, light from above) than the texture
close-ups of a single tile. It exists for this pretraining task only; the downstream crops
keep the native scale.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from vitreg_jax import errors
from vitreg_jax.data import embedded
from vitreg_jax.data import rotation

SPLITS = ('train', 'val')
NUM_CLASSES = rotation.NUM_ROTATIONS
NUM_OBJECTS = len(embedded.SOURCES)
IMAGE_SHAPE = embedded.IMAGE_SHAPE
ATTRIBUTES = ('object_label',)
# Split -> pool of embedded's tile partition.
POOL = {'train': 'pretrain', 'val': 'pretrain_val'}

DEFAULT_OPTIONS = {
    'num_train': 20000,
    'num_val': 500,   # shown in all four rotations: 2000 evaluation examples
    'min_crop': embedded.DEFAULT_OPTIONS['min_crop'],
    'max_crop': embedded.DEFAULT_OPTIONS['max_crop'],
    'noise': embedded.DEFAULT_OPTIONS['noise'],
    # Scene context of a crop: windows of downscale x downscale tiles (embedded.super_tiles).
    'downscale': 1,
}


def load(split: str, seed: int = 0, **options: Any) -> dict[str, np.ndarray]:
  """Builds one split of the pretraining crops (before rotation).

  Args:
    split: 'train' (pool `pretrain`) or 'val' (pool `pretrain_val`).
    seed: data seed; each split has its own random stream.
    **options: overrides of `DEFAULT_OPTIONS` (`num_train`, `num_val`, `min_crop`,
      `max_crop`, `noise`; the crop law of `embedded.crops`; `downscale`, one of
      `embedded.DOWNSCALES`, the module docstring).

  Returns:
    dict of read-only arrays: `image` uint8 `[n, 32, 32, 3]` (gray, upright), `label` int32
    `[n]` (index in `embedded.SOURCES`; tiles are drawn uniformly, so larger photos count more).

  Raises:
    errors.UserError: unknown split or option, or a value out of range.
  """
  if split not in SPLITS:
    raise errors.UserError(
        f'Unknown embedded_rotation split {split!r}; valid splits are {SPLITS}.')
  opts = embedded.check_options(options, DEFAULT_OPTIONS, 'embedded_rotation')
  if opts['downscale'] not in embedded.DOWNSCALES:
    raise errors.UserError(f"embedded_rotation option downscale must be one of "
                           f"{embedded.DOWNSCALES}, got {opts['downscale']!r}.")
  return _load_cached(split, embedded.check_seed(seed), tuple(sorted(opts.items())))


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, seed: int, opts_items: tuple) -> dict[str, np.ndarray]:
  opts = dict(opts_items)
  n = opts[f'num_{split}']
  pool = POOL[split]
  rng = np.random.default_rng([seed, embedded.POOLS.index(pool)])
  images, windows = embedded.super_tiles(pool, opts['downscale'])
  photo = windows[:, 0]
  # Each super-tile is its own "photo" with one tile at (0, 0): embedded.crops clamps to it.
  cells = np.stack([np.arange(len(images)), np.zeros_like(photo), np.zeros_like(photo)], 1)
  tile_index = rng.integers(0, len(cells), size=n)
  image = embedded.to_uint8_rgb(embedded.crops(images, cells, tile_index, opts, rng))
  return embedded.read_only({'image': image, 'label': photo[tile_index]})
