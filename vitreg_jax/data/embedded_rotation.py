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

`faces` and `digits` (fractions of the crops, default 0) draw that share of the crops from the
upright faces and handwritten digits of `data/embedded_objects.py` instead of the photo
windows: objects with a clear "up", as ImageNet's are. Their `object_label` is
`len(embedded.SOURCES)` (faces) or that plus one (digits).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from vitreg_jax import errors
from vitreg_jax import checks
from vitreg_jax.data import embedded
from vitreg_jax.data import embedded_objects
from vitreg_jax.data import rotation

SPLITS = ('train', 'val')
NUM_CLASSES = rotation.NUM_ROTATIONS
# Source photos, then the object collections (embedded_objects.KINDS).
NUM_OBJECTS = len(embedded.SOURCES) + len(embedded_objects.KINDS)
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
    # Fractions of the crops taken from upright objects (embedded_objects) instead of photos.
    'faces': 0.0,
    'digits': 0.0,
}


def load(split: str, seed: int = 0, **options: Any) -> dict[str, np.ndarray]:
  """Builds one split of the pretraining crops (before rotation).

  Args:
    split: 'train' (pool `pretrain`) or 'val' (pool `pretrain_val`).
    seed: data seed; each split has its own random stream.
    **options: overrides of `DEFAULT_OPTIONS` (`num_train`, `num_val`, `min_crop`,
      `max_crop`, `noise`; the crop law of `embedded.crops`; `downscale`, one of
      `embedded.DOWNSCALES`; `faces`, `digits`: fractions of upright objects; the module
      docstring).

  Returns:
    dict of read-only arrays: `image` uint8 `[n, 32, 32, 3]` (gray, upright), `label` int32
    `[n]` (index in `embedded.SOURCES`, tiles drawn uniformly so larger photos count more; then
    one index per object collection). The share of each collection is exact (rounded).

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
  for kind in embedded_objects.KINDS:
    checks.number_in(f'embedded_rotation option {kind}', opts[kind], 0.0, 1.0)
  if sum(opts[kind] for kind in embedded_objects.KINDS) > 1.0:
    raise errors.UserError('embedded_rotation options faces + digits are fractions of the '
                           f"crops and must sum to at most 1, got {opts['faces']} + "
                           f"{opts['digits']}.")
  return _load_cached(split, embedded.check_seed(seed), tuple(sorted(opts.items())))


@functools.lru_cache(maxsize=4)
def _load_cached(split: str, seed: int, opts_items: tuple) -> dict[str, np.ndarray]:
  opts = dict(opts_items)
  n = opts[f'num_{split}']
  pool = POOL[split]
  rng = np.random.default_rng([seed, embedded.POOLS.index(pool)])
  counts = []  # rounded, and capped so that the kinds never exceed n together
  for kind in embedded_objects.KINDS:
    counts.append(min(int(round(opts[kind] * n)), n - sum(counts)))
  photo_gray, photo_label = _photo_crops(pool, n - sum(counts), opts, rng)
  gray, label = [photo_gray], [photo_label]
  for index, (kind, count) in enumerate(zip(embedded_objects.KINDS, counts)):
    gray.append(embedded_objects.crops(kind, pool, count, opts, rng))
    label.append(np.full(count, len(embedded.SOURCES) + index, np.int32))
  order = rng.permutation(n)  # the kinds interleaved, so any prefix has the same mix
  image = embedded.to_uint8_rgb(np.concatenate(gray)[order])
  return embedded.read_only({'image': image,
                             'label': np.concatenate(label).astype(np.int32)[order]})


def _photo_crops(pool: str, n: int, opts: dict, rng: np.random.Generator):
  """`n` crops of the pool's photo windows and their photo index (float32 `[n, 32, 32]`)."""
  images, windows = embedded.super_tiles(pool, opts['downscale'])
  gray, index = embedded.whole_tile_crops(images, n, opts, rng)
  return gray, windows[index, 0]
