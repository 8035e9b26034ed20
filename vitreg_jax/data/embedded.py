"""Embedded ARViT data: crops of the photos that ship with scikit-image and scikit-learn.

Two registered datasets share one source (docs/embedded.md):

* `embedded` (this module's `load`): the downstream task. A 32x32 gray crop is classified by
  the photo it comes from, among `CLASSES` (ten photos and textures: astronaut, camera,
  coffee, rocket, brick, grass, gravel, moon, china, flower). Every crop has its mean and
  contrast removed and a random gain, offset and pixel noise added, so brightness and contrast
  do not tell the photos apart: the class must be read from local texture and structure (the
  regime where a locality prior on attention can matter), and flat regions (sky, shadow) are
  ambiguous, so the task does not saturate.
* `embedded_rotation` (`vitreg_jax.data.embedded_rotation`, made into the rotation task by
  `rotation.EmbeddedRotationDataset`): the self-supervised pretraining source, the same kind
  of crops of the same ten photos plus `PRETRAIN_ONLY` (six more), labelled by their photo
  (`object_label`); the model predicts their rotation.

No leakage: every photo is centre-cropped to at most `MAX_HW`, cut into a grid of
`TILE x TILE` tiles, and every tile is given once, independently of the seed, to one pool:
`pretrain` / `pretrain_val` (rotation pretraining), `train` / `val` / `test` (downstream). The
partition has two levels (`sources`): blocks of `BLOCK x BLOCK` tiles go whole to `pretrain`,
`pretrain_val` or the downstream side (`BLOCK_FRACTIONS` for the ten class photos,
`PRETRAIN_ONLY_FRACTIONS` for the others), then the downstream blocks' tiles are split one by
one into `train` / `val` / `test` (`DOWNSTREAM_FRACTIONS`). Pretraining regions are thus
contiguous, so a larger-context pretraining crop (`super_tiles`, `downscale` 2) can lie wholly
inside them, while the downstream test tiles stay scattered over the photo. Crops are clamped
to one tile (or super-tile) of their pool (`tiles.sample_crops`), so no pixel of a downstream
test tile is seen in pretraining or in downstream training.

Results are deterministic in `(split, seed, options)`, cached in-process, read-only.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from skimage import data as skimage_data

from vitreg_jax import checks
from vitreg_jax import errors
from vitreg_jax.data import tiles as tiles_lib

# The downstream classes (label = index) and the photos seen only in pretraining.
CLASSES = ('astronaut', 'camera', 'coffee', 'rocket', 'brick', 'grass', 'gravel', 'moon',
           'china', 'flower')
PRETRAIN_ONLY = ('chelsea', 'coins', 'hubble_deep_field', 'stereo_motorcycle', 'cell',
                 'immunohistochemistry')
SOURCES = CLASSES + PRETRAIN_ONLY
SPLITS = ('train', 'val', 'test')
NUM_CLASSES = len(CLASSES)
SIZE = 32
IMAGE_SHAPE = (SIZE, SIZE, 3)
ATTRIBUTES = ()

TILE = 64              # tile side in pixels of the photo (native resolution)
MAX_HW = (512, 640)    # larger photos are centre-cropped to this
POOLS = ('pretrain', 'pretrain_val', 'train', 'val', 'test')
BLOCK = 2              # tiles per side of a partition block (128 px): see the module docstring
# Blocks -> (pretrain, pretrain_val, downstream); downstream tiles -> (train, val, test). The
# class photos' tiles end up about 40 / 10 / 20 / 10 / 20 % in POOLS' order.
BLOCK_FRACTIONS = (0.4, 0.1, 0.5)
PRETRAIN_ONLY_FRACTIONS = (0.9, 0.1, 0.0)
DOWNSTREAM_FRACTIONS = (0.4, 0.2, 0.4)
DOWNSCALES = (1, 2)    # super-tile sides in tiles (`super_tiles`)
_PARTITION_SEED = 20280  # fixed: every data seed sees the same held-out tiles
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

DEFAULT_OPTIONS = {
    'num_train': 2000,
    'num_val': 1000,
    'num_test': 2000,
    # Crop side range in photo pixels (at most TILE); crops are resampled to SIZE x SIZE.
    'min_crop': 32,
    'max_crop': 64,
    # Std of the Gaussian pixel noise (pixels in [0, 1]).
    'noise': 0.02,
}
# Per-crop photometric jitter after standardization: gain (std) and offset (mean) ranges.
_GAIN = (0.12, 0.22)
_OFFSET = (0.35, 0.65)
_MIN_STD = 0.03  # floor of the per-crop std, so flat crops are not blown up to full contrast


def _photo(name: str) -> np.ndarray:
  """One source photo as float32 gray `[h, w]` in [0, 1] (scikit-image or scikit-learn)."""
  if name in ('china', 'flower'):
    # Imported lazily: scikit-learn's datasets module is slow to import.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    bunch = datasets.load_sample_images()
    image = bunch.images[[f.endswith(f'{name}.jpg') for f in bunch.filenames].index(True)]
  else:
    image = getattr(skimage_data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: the left view
  image = np.asarray(image, np.float32) / 255.0
  return image[..., :3] @ _LUMA if image.ndim == 3 else image


@functools.lru_cache(maxsize=1)
def sources() -> dict[str, Any]:
  """The source photos and their tiles per pool (seed independent).

  Returns:
    dict with `photos` float32 `[len(SOURCES), MAX_HW[0], MAX_HW[1], 1]` (each photo
    centre-cropped to at most MAX_HW, zero-padded below and right; padding is never tiled) and
    `tiles[pool]` int32 `[t, 3]` rows of (photo index, tile top, tile left) in pixels.
  """
  rng = np.random.default_rng(_PARTITION_SEED)
  photos = np.zeros((len(SOURCES), *MAX_HW, 1), np.float32)
  pools = {pool: [] for pool in POOLS}
  for index, name in enumerate(SOURCES):
    image = _photo(name)
    h, w = min(image.shape[0], MAX_HW[0]), min(image.shape[1], MAX_HW[1])
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    photos[index, :h, :w, 0] = image[top:top + h, left:left + w]
    for pool, cells in zip(POOLS, _partition_photo(index, name, h, w, rng)):
      pools[pool].append(cells)
  return {'photos': photos, 'tiles': {p: np.concatenate(t) for p, t in pools.items()}}


def _partition_photo(index: int, name: str, h: int, w: int, rng: np.random.Generator):
  """One photo's tiles per pool (POOLS' order): whole blocks to pretraining, then tiles."""
  grid_h, grid_w = h // TILE, w // TILE
  oy, ox = (h - grid_h * TILE) // 2, (w - grid_w * TILE) // 2  # centre the grid
  rows, cols = np.divmod(np.arange(grid_h * grid_w), grid_w)
  cells = np.stack([np.full_like(rows, index), oy + rows * TILE, ox + cols * TILE], 1)
  block = (rows // BLOCK) * -(-grid_w // BLOCK) + cols // BLOCK  # edge blocks may be partial
  fractions = BLOCK_FRACTIONS if name in CLASSES else PRETRAIN_ONLY_FRACTIONS
  pretrain, pretrain_val, down = tiles_lib.partition(rng.permutation(block.max() + 1), fractions)
  down_tiles = rng.permutation(np.flatnonzero(np.isin(block, down)))
  parts = [np.flatnonzero(np.isin(block, pretrain)), np.flatnonzero(np.isin(block, pretrain_val))]
  parts += tiles_lib.partition(down_tiles, DOWNSTREAM_FRACTIONS)
  return [cells[np.sort(part)].astype(np.int32) for part in parts]


@functools.lru_cache(maxsize=4)
def super_tiles(pool: str, downscale: int) -> tuple[np.ndarray, np.ndarray]:
  """The `downscale x downscale` windows of tiles lying wholly in `pool`, area-downscaled.

  A window starts at any tile of the pool (windows overlap); it is kept only if all its tiles
  belong to the pool, so its pixels are the pool's alone. Its `downscale * TILE` px side is
  averaged down to `TILE` px by `downscale x downscale` box means, so a crop of it sees
  `downscale` times more of the scene at the same resolution. `downscale=1`: the pool's tiles.

  Returns:
    (float32 `[m, TILE, TILE, 1]` images, int32 `[m, 3]` rows of (photo index, top, left) of
    each window's first tile, in native pixels).
  """
  src = sources()
  rows = src['tiles'][pool]
  members = {tuple(r) for r in rows.tolist()}
  side = downscale * TILE
  images, kept = [], []
  for p, top, left in rows.tolist():
    if all((p, top + i * TILE, left + j * TILE) in members
           for i in range(downscale) for j in range(downscale)):
      region = src['photos'][p, top:top + side, left:left + side, 0]
      images.append(region.reshape(TILE, downscale, TILE, downscale).mean(axis=(1, 3)))
      kept.append((p, top, left))
  if not images:
    raise errors.UserError(f'No {downscale}x{downscale} window of tiles lies wholly in pool '
                           f'{pool!r}; use a smaller downscale (one of {DOWNSCALES}).')
  return np.stack(images)[..., None], np.array(kept, np.int32)


def check_options(options: dict[str, Any], defaults: dict[str, Any], dataset: str) -> dict:
  """Merges `options` into `defaults` and validates them (`errors.UserError` naming the fix)."""
  unknown = sorted(set(options) - set(defaults))
  if unknown:
    raise errors.UserError(f'Unknown {dataset} option(s) {unknown}; valid options are '
                           f'{sorted(defaults)}.')
  opts = {**defaults, **options}
  for key in [k for k in opts if k.startswith('num_')]:
    checks.integer_at_least(f'{dataset} option {key}', opts[key], 1)
  checks.number_in(f'{dataset} option noise', opts['noise'], 0.0)
  lo, hi = opts['min_crop'], opts['max_crop']
  if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))
          and 2 <= lo <= hi <= TILE):
    raise errors.UserError(f'{dataset} needs integers 2 <= min_crop <= max_crop <= {TILE} (the '
                           f'tile size), got min_crop={lo!r}, max_crop={hi!r}.')
  return opts


def check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise errors.UserError(f'seed must be a non-negative integer, got {seed!r}.')
  return int(seed)


def crops(photos: np.ndarray, pool_tiles: np.ndarray, tile_index: np.ndarray,
          opts: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
  """Crops of the tiles `pool_tiles[tile_index]`, photometrically normalized and jittered.

  Geometry: `tiles.sample_crops` (side `U{min_crop..max_crop}` inside the tile, bilinear to
  SIZE x SIZE, random horizontal flip). Photometry: each crop is standardized (mean 0, std 1,
  the std floored at `_MIN_STD`), then scaled by a gain `~ U(_GAIN)`, shifted by an offset
  `~ U(_OFFSET)`, Gaussian noise of std `noise` is added and the result clipped to [0, 1].

  Returns:
    float32 `[n, SIZE, SIZE]`.
  """
  photo, top, left = pool_tiles[tile_index].T.astype(np.int64)
  out = tiles_lib.sample_crops(photos, photo, top, left, TILE, SIZE, opts['min_crop'],
                               opts['max_crop'], rng)[..., 0]
  n = len(out)
  mean = out.mean(axis=(1, 2), keepdims=True)
  std = np.maximum(out.std(axis=(1, 2), keepdims=True), _MIN_STD)
  gain = rng.uniform(*_GAIN, size=(n, 1, 1)).astype(np.float32)
  offset = rng.uniform(*_OFFSET, size=(n, 1, 1)).astype(np.float32)
  noise = rng.normal(0.0, opts['noise'], size=out.shape).astype(np.float32)
  return np.clip((out - mean) / std * gain + offset + noise, 0.0, 1.0)


def whole_tile_crops(images: np.ndarray, n: int, opts: dict[str, Any],
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """`n` crops (`crops`' law) of images that are one tile each (`[m, TILE, TILE, 1]`), drawn
  uniformly; returns the crops (float32 `[n, SIZE, SIZE]`) and which image each came from."""
  zeros = np.zeros(len(images), np.int64)
  cells = np.stack([np.arange(len(images)), zeros, zeros], 1)  # image i's only tile: (0, 0)
  index = rng.integers(0, len(images), size=n)
  return crops(images, cells, index, opts, rng), index


def to_uint8_rgb(gray: np.ndarray) -> np.ndarray:
  """float `[n, h, w]` in [0, 1] -> uint8 `[n, h, w, 3]` (three equal channels)."""
  image = np.round(gray * 255.0).astype(np.uint8)
  return np.repeat(image[..., None], 3, axis=-1)


def read_only(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  for array in arrays.values():
    array.flags.writeable = False
  return arrays


def load(split: str, seed: int = 0, **options: Any) -> dict[str, np.ndarray]:
  """Builds one split of the downstream task `embedded`.

  Args:
    split: 'train', 'val' or 'test' (tiles of the pools of the same names).
    seed: data seed; each split has its own random stream. The tile partition does not depend
      on it.
    **options: overrides of `DEFAULT_OPTIONS` (`num_train` / `num_val` / `num_test`,
      `min_crop`, `max_crop`, `noise`).

  Returns:
    dict of read-only arrays: `image` uint8 `[n, 32, 32, 3]` (gray), `label` int32 `[n]`
    (index in `CLASSES`). Classes are balanced (`n // NUM_CLASSES` or one more each).

  Raises:
    errors.UserError: unknown split or option, or a value out of range.
  """
  if split not in SPLITS:
    raise errors.UserError(f'Unknown embedded split {split!r}; valid splits are {SPLITS}.')
  opts = check_options(options, DEFAULT_OPTIONS, 'embedded')
  return _load_cached(split, check_seed(seed), tuple(sorted(opts.items())))


@functools.lru_cache(maxsize=8)
def _load_cached(split: str, seed: int, opts_items: tuple) -> dict[str, np.ndarray]:
  opts = dict(opts_items)
  n = opts[f'num_{split}']
  rng = np.random.default_rng([seed, POOLS.index(split)])
  src = sources()
  pool_tiles = src['tiles'][split]
  label = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
  tile_index = np.empty(n, np.int64)
  for c in range(NUM_CLASSES):
    candidates = np.flatnonzero(pool_tiles[:, 0] == c)
    where = np.flatnonzero(label == c)
    tile_index[where] = candidates[rng.integers(0, len(candidates), size=len(where))]
  image = to_uint8_rgb(crops(src['photos'], pool_tiles, tile_index, opts, rng))
  return read_only({'image': image, 'label': label})
