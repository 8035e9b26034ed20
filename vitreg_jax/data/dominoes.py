"""Embedded "dominoes" spurious-correlation dataset, built on the fly from scikit-learn data.

Each image is a vertical domino of two 16x16 halves (``IMAGE_SHAPE = (32, 16, 3)``):

* top, the *spurious* half: an 8x8 scikit-learn digit (``load_digits``), a 0 for spurious
  attribute 0 and a 1 for spurious attribute 1, upscaled 2x (nearest) to 16x16, white on black.
  Like the MNIST half of MNIST-CIFAR, it is a simple, almost linearly separable feature.
* bottom, the *robust* half: a random crop of one of the two photos of
  ``load_sample_images`` (``china.jpg`` for class 0, ``flower.jpg`` for class 1), with scale and
  position jitter, horizontal flips, partial desaturation, per-crop mean removal, random
  brightness/contrast, a random per-channel colour offset and Gaussian pixel noise. The photos'
  average brightness and colour, which would make them as easy to tell apart as the digits,
  are removed or drowned by the jitter, so the class must mostly be read from texture, shape
  and a weak colour cue (sharp roofs, foliage and water vs. petals and a blurred background):
  learnable, but clearly slower to learn than the digit. The defaults were calibrated so that
  ERM on a small ViT shows a large ID-OOD gap (see ``README.md``).

The label is the robust class (which photo). In ``train``, ``val_id`` and ``test_id`` the spurious
digit agrees with the label for a fraction ``spurious_agreement`` of each class (exactly
``round(p * n_class)`` examples, 0.9 by default, as in the MNIST-CIFAR recipe of Shah et al.,
"The Pitfalls of Simplicity Bias in Neural Networks", 2020); in ``val_ood`` and ``test_ood`` the
spurious digit is independent of the label (exactly half of each class shows each digit).
Classes are balanced exactly (``n // 2`` and ``n - n // 2``).

No leakage: the source material is partitioned once, independently of the seed, into three pools
``train`` / ``val`` / ``test`` (60% / 20% / 20%): the digit images by index and each photo by a
grid of non-overlapping tiles (every crop lies inside one tile of its pool). ``val_id`` and
``val_ood`` draw from the ``val`` pool, ``test_id`` and ``test_ood`` from the ``test`` pool.

Usage::

    from vitreg_jax.data import dominoes
    ds = dominoes.load('train', seed=0, spurious_agreement=0.9)
    ds['image']     # uint8 [n, 32, 16, 3]
    ds['label']     # int32 [n], robust class (0 china, 1 flower)
    ds['spurious']  # int32 [n], spurious attribute (0 digit zero, 1 digit one)

Results are deterministic in ``(split, seed, options)`` and cached in-process; the returned arrays
are read-only (copy them before modifying).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from vitreg_jax import checks
from vitreg_jax import errors
from vitreg_jax.data import tiles as tiles_lib

SPLITS = ('train', 'val_id', 'val_ood', 'test_id', 'test_ood')
NUM_CLASSES = 2
HALF = 16  # side of each square half, in pixels
IMAGE_SHAPE = (2 * HALF, HALF, 3)
ATTRIBUTES = ('spurious',)

DEFAULT_OPTIONS = {
    # Fraction of each class in train / *_id whose spurious digit equals the label.
    'spurious_agreement': 0.9,
    'num_train': 10000,
    'num_val': 2000,
    'num_test': 2000,
    # Std of the Gaussian pixel noise added to the robust half (pixel values in [0, 1]).
    'robust_noise': 0.05,
    # Colour saturation of the robust half: 0 gray, 1 the photos' colours (colour makes the
    # photos much easier to tell apart).
    'robust_saturation': 0.3,
    # Half-width of a uniform random per-crop, per-channel colour offset (hides the colour cue).
    'color_jitter': 0.05,
    # Crop side range, in pixels of the photo downscaled 2x (tiles are TILE pixels wide).
    'min_crop': 16,
    'max_crop': 32,
}

# Source partition (fixed, seed independent): pool -> fraction of digits / photo tiles.
_POOLS = ('train', 'val', 'test')
_POOL_FRACTIONS = (0.6, 0.2, 0.2)
_SPLIT_POOL = {'train': 'train', 'val_id': 'val', 'val_ood': 'val', 'test_id': 'test',
               'test_ood': 'test'}
_SPURIOUS_DIGITS = (0, 1)
TILE = 32  # tile side in the 2x downscaled photo (213 x 320) -> 6 x 10 tiles per photo
_PARTITION_SEED = 20201  # fixed so that every data seed sees the same held-out sources


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
  """Merges ``options`` into the defaults and validates them (ValueError on bad input)."""
  unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
  if unknown:
    raise errors.UserError(f'Unknown dominoes option(s) {unknown}; valid options are '
                           f'{sorted(DEFAULT_OPTIONS)}.')
  opts = {**DEFAULT_OPTIONS, **options}
  checks.number_in('spurious_agreement', opts['spurious_agreement'], 0.0, 1.0)
  for key in ('num_train', 'num_val', 'num_test'):
    checks.integer_at_least(key, opts[key], 2)
  checks.number_in('robust_noise', opts['robust_noise'], 0.0)
  checks.number_in('color_jitter', opts['color_jitter'], 0.0, 1.0)
  checks.number_in('robust_saturation', opts['robust_saturation'], 0.0, 1.0)
  lo, hi = opts['min_crop'], opts['max_crop']
  if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))
          and 2 <= lo <= hi <= TILE):
    raise errors.UserError(
        f'Need integers 2 <= min_crop <= max_crop <= {TILE} (the tile size), got '
        f'min_crop={lo!r}, max_crop={hi!r}.')
  return opts


@functools.lru_cache(maxsize=1)
def sources() -> dict[str, Any]:
  """Loads and partitions the bundled source data (digits and photos) into pools.

  The partition is what keeps held-out splits free of training material (the module
  docstring's "No leakage"); it is fixed, independent of the data seed, and cached.

  Returns:
    dict with ``digits[pool][d]`` (float32 ``[m, 8, 8]`` in [0, 1] for spurious value d),
    ``photos`` (float32 ``[2, 213, 320, 3]`` in [0, 1], downscaled 2x by 2x2 averaging),
    ``tiles[pool]`` (int32 ``[t, 3]`` rows of (photo index, tile row, tile col)) and
    ``origin`` (the (row, col) pixel of the tile grid's top-left corner in the photos).
  """
  # scikit-learn is imported lazily: it is only needed when the dataset is built.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(_PARTITION_SEED)
  digits = datasets.load_digits()
  pools_digits = {pool: {} for pool in _POOLS}
  for value, digit in enumerate(_SPURIOUS_DIGITS):
    images = digits.images[digits.target == digit].astype(np.float32) / 16.0
    parts = tiles_lib.partition(rng.permutation(len(images)), _POOL_FRACTIONS)
    for pool, part in zip(_POOLS, parts):
      pools_digits[pool][value] = images[np.sort(part)]

  photos = []
  bunch = datasets.load_sample_images()
  for name in ('china.jpg', 'flower.jpg'):  # class 0, class 1
    image = bunch.images[[f.endswith(name) for f in bunch.filenames].index(True)]
    image = image.astype(np.float32) / 255.0
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    image = image[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    photos.append(image)
  photos = np.stack(photos)
  grid_h, grid_w = photos.shape[1] // TILE, photos.shape[2] // TILE
  pools_tiles = {pool: [] for pool in _POOLS}
  for photo in range(len(photos)):
    cells = np.array([(photo, r, c) for r in range(grid_h) for c in range(grid_w)], np.int32)
    parts = tiles_lib.partition(rng.permutation(len(cells)), _POOL_FRACTIONS)
    for pool, part in zip(_POOLS, parts):
      pools_tiles[pool].append(cells[np.sort(part)])
  tiles = {pool: np.concatenate(parts) for pool, parts in pools_tiles.items()}
  # Centre the tile grid in the photo (the remainder is split evenly between the borders).
  origin = ((photos.shape[1] - grid_h * TILE) // 2, (photos.shape[2] - grid_w * TILE) // 2)
  return {'digits': pools_digits, 'photos': photos, 'tiles': tiles, 'origin': origin}


def _assign_attributes(n: int, agreement: float, rng: np.random.Generator):
  """Balanced labels and spurious attributes with an exact agreement rate per class.

  Returns:
    (label, spurious), int32 ``[n]`` each, in random order. Class c has ``n_c`` = ``n // 2``
    (c = 0) or ``n - n // 2`` (c = 1) examples, of which ``round(agreement * n_c)`` have
    ``spurious == c`` and the rest ``spurious == 1 - c``.
  """
  label, spurious = [], []
  for c, n_c in enumerate((n // 2, n - n // 2)):
    n_agree = int(round(agreement * n_c))
    label.append(np.full(n_c, c, np.int32))
    spurious.append(np.where(np.arange(n_c) < n_agree, c, 1 - c).astype(np.int32))
  label, spurious = np.concatenate(label), np.concatenate(spurious)
  order = rng.permutation(n)
  return label[order], spurious[order]


def _spurious_halves(spurious: np.ndarray, pool_digits: dict[int, np.ndarray],
                     rng: np.random.Generator) -> np.ndarray:
  """Top halves: a random digit image of the pool showing ``spurious``, upscaled 2x.

  Returns float32 ``[n, 16, 16, 3]`` in [0, 1].
  """
  out = np.empty((len(spurious), 8, 8), np.float32)
  for value, images in pool_digits.items():
    where = np.flatnonzero(spurious == value)
    out[where] = images[rng.integers(0, len(images), size=len(where))]
  out = out.repeat(HALF // 8, axis=1).repeat(HALF // 8, axis=2)
  return np.repeat(out[..., None], 3, axis=-1)


def _robust_halves(label: np.ndarray, src: dict[str, Any], pool: str, opts: dict[str, Any],
                   rng: np.random.Generator) -> np.ndarray:
  """Bottom halves: jittered crops of the class's photo from tiles of ``pool``.

  Crops come from ``crops`` (geometry), taken from the photos desaturated to
  ``Y + robust_saturation * (RGB - Y)`` with luma ``Y = 0.299 R + 0.587 G + 0.114 B``
  (``robust_saturation = 0``: gray). The per-crop mean is removed, the result scaled by a
  contrast ``c ~ U[0.7, 1.3]``, shifted to a brightness ``b ~ U[0.35, 0.65]`` and Gaussian noise
  of std ``robust_noise`` (the same on all channels) and a per-channel colour offset
  ``~ U[-color_jitter, color_jitter]`` are added, before clipping to [0, 1]. Removing the mean
  removes the photos' very different average brightness (china is bright, flower dark), a cue
  as simple as the digit; the colour offset drowns most of their mean-colour difference.

  Returns float32 ``[n, 16, 16, 3]`` in [0, 1].
  """
  n = len(label)
  photos = src['photos']
  # Desaturate before resampling (both are linear, so they commute).
  luma = photos @ np.array([0.299, 0.587, 0.114], np.float32)[:, None]
  sat = float(opts['robust_saturation'])
  photos = luma if sat == 0.0 else luma + sat * (photos - luma)
  out = crops(label, photos, src['tiles'][pool], src['origin'], opts, rng)
  out = out - out.mean(axis=(1, 2, 3), keepdims=True)
  contrast = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)
  brightness = rng.uniform(0.35, 0.65, size=(n, 1, 1, 1)).astype(np.float32)
  noise = rng.normal(0.0, opts['robust_noise'], size=(n, HALF, HALF, 1)).astype(np.float32)
  out = out * contrast + brightness + noise  # the same noise on all channels: gray noise
  if opts['color_jitter'] > 0:
    j = opts['color_jitter']
    out = out + rng.uniform(-j, j, size=(n, 1, 1, 3)).astype(np.float32)
  return np.broadcast_to(np.clip(out, 0.0, 1.0), (n, HALF, HALF, 3))


def crops(label: np.ndarray, photos: np.ndarray, tiles: np.ndarray, origin: tuple[int, int],
          opts: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
  """Random 16x16 crops of ``photos[label[i]]``, each read only from one tile of ``tiles``.

  A random tile (of the label's photo) among ``tiles`` (rows of photo, tile row, tile col, as in
  ``sources()['tiles'][pool]``) is drawn per example; ``tiles_lib.sample_crops`` places a crop
  of side ``U{min_crop..max_crop}`` (``opts``, as ``DEFAULT_OPTIONS``) in it, clamped to the
  tile: this is what prevents leakage. ``origin`` is ``sources()['origin']``.

  Returns float32 ``[n, 16, 16, C]``.
  """
  n = len(label)
  tile_idx = np.empty(n, np.int64)
  for c in range(NUM_CLASSES):
    candidates = np.flatnonzero(tiles[:, 0] == c)
    where = np.flatnonzero(label == c)
    tile_idx[where] = candidates[rng.integers(0, len(candidates), size=len(where))]
  photo, tile_r, tile_c = tiles[tile_idx].T.astype(np.int64)
  return tiles_lib.sample_crops(photos, photo, origin[0] + tile_r * TILE,
                                origin[1] + tile_c * TILE, TILE, HALF, opts['min_crop'],
                                opts['max_crop'], rng)


def load(split: str, seed: int = 0, **options: Any) -> dict[str, np.ndarray]:
  """Builds one split of the dominoes dataset.

  Args:
    split: one of ``SPLITS``.
    seed: data seed; the result is a deterministic function of ``(split, seed, options)``.
      Each split uses its own random stream, so splits are independent for a given seed.
      The partition of source digits / photo tiles into train, val and test pools does not
      depend on the seed.
    **options: overrides of ``DEFAULT_OPTIONS``: ``spurious_agreement`` (fraction of each class
      whose spurious digit equals the label, used for ``train`` and ``*_id``; OOD splits always
      use 0.5), ``num_train`` / ``num_val`` / ``num_test`` (examples per split; ``num_val``
      applies to both ``val_id`` and ``val_ood``, ``num_test`` likewise), ``robust_noise``,
      ``robust_saturation``, ``color_jitter``, ``min_crop``, ``max_crop`` (see
      ``DEFAULT_OPTIONS`` and the module docstring).

  Returns:
    dict of read-only NumPy arrays: ``image`` uint8 ``[n, 32, 16, 3]``, ``label`` int32 ``[n]``
    (robust class: 0 china photo, 1 flower photo), ``spurious`` int32 ``[n]`` (0 digit zero,
    1 digit one in the top half).

  Raises:
    ValueError: unknown split or option, or an option value out of range.
  """
  if split not in SPLITS:
    raise errors.UserError(f'Unknown dominoes split {split!r}; valid splits are {SPLITS}.')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise errors.UserError(f'seed must be a non-negative integer, got {seed!r}.')
  opts = _check_options(options)
  return _load_cached(split, int(seed), tuple(sorted(opts.items())))


def clear_cache() -> None:
  """Forgets the splits built so far (frees their memory): the next ``load`` rebuilds them."""
  _load_cached.cache_clear()


@functools.lru_cache(maxsize=16)
def _load_cached(split: str, seed: int, opts_items: tuple[tuple[str, Any], ...]):
  opts = dict(opts_items)
  pool = _SPLIT_POOL[split]
  n = opts[f'num_{pool}']
  agreement = 0.5 if split.endswith('_ood') else float(opts['spurious_agreement'])
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  src = sources()
  label, spurious = _assign_attributes(n, agreement, rng)
  top = _spurious_halves(spurious, src['digits'][pool], rng)
  bottom = _robust_halves(label, src, pool, opts, rng)
  image = np.round(np.concatenate([top, bottom], axis=1) * 255.0).astype(np.uint8)
  result = {'image': image, 'label': label, 'spurious': spurious}
  for array in result.values():
    array.flags.writeable = False
  return result
