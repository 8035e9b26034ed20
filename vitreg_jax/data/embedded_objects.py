"""Upright objects for `embedded_rotation`: faces and handwritten digits that ship with packages.

The photo windows of `data/embedded.py` alone make a rotation task that barely learns
(docs/embedded.md: about 30% after 400 steps, chance 25%): most windows are textures with no
visible "up". ImageNet, the thesis' pretraining set, is full of upright objects. This module
adds the two collections of upright objects that install with the package's dependencies:

  faces   the 100 face images of scikit-image's `data.lfw_subset()` (25 x 25 px crops of
          Labeled Faces in the Wild; its other 100 images are non-faces and are not used)
  digits  scikit-learn's `datasets.load_digits()` (1797 handwritten digits, 8 x 8 px, 16 gray
          levels; each gets a one-pixel black border so its strokes do not touch the edge)

Each collection is split once, with a fixed seed (not the data seed), into `pretrain` and
`pretrain_val` images (OBJECT_FRACTIONS), and every image is resampled bilinearly to one
`embedded.TILE` px tile, so `embedded.crops` cuts and jitters it exactly like a photo window.
None of them is ever part of the downstream task `embedded` (ten photos' tiles), so they add
nothing a downstream test crop could leak from.
"""

from __future__ import annotations

import functools

import numpy as np
from skimage import data as skimage_data
from skimage import transform

from vitreg_jax.data import embedded
from vitreg_jax.data import tiles as tiles_lib

KINDS = ('faces', 'digits')
POOLS = ('pretrain', 'pretrain_val')
OBJECT_FRACTIONS = (0.8, 0.2)
NUM_FACES = 100  # lfw_subset(): the first 100 images are faces, the next 100 are not
_PARTITION_SEED = 20281  # fixed: every data seed holds out the same images


@functools.lru_cache(maxsize=2)
def _raw(kind: str) -> np.ndarray:
  """float32 `[n, h, w]` in [0, 1]: the collection's images, upright."""
  if kind == 'faces':
    return np.asarray(skimage_data.lfw_subset()[:NUM_FACES], np.float32)
  # Imported lazily: scikit-learn's datasets module is slow to import.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = np.asarray(datasets.load_digits().images, np.float32) / 16.0
  return np.pad(digits, ((0, 0), (1, 1), (1, 1)))


@functools.lru_cache(maxsize=4)
def images(kind: str, pool: str) -> np.ndarray:
  """The `pool` images of collection `kind` at one tile, float32 `[m, TILE, TILE, 1]`."""
  raw = _raw(kind)
  side = embedded.TILE
  out = np.stack([transform.resize(raw[i], (side, side), order=1, anti_aliasing=False)
                  for i in indices(kind, pool)])
  return out.astype(np.float32)[..., None]


def indices(kind: str, pool: str) -> np.ndarray:
  """Which images of the collection (rows of `_raw(kind)`) form `pool` (seed independent)."""
  rng = np.random.default_rng([_PARTITION_SEED, KINDS.index(kind)])
  order = rng.permutation(len(_raw(kind)))
  return np.sort(tiles_lib.partition(order, OBJECT_FRACTIONS)[POOLS.index(pool)])


def crops(kind: str, pool: str, n: int, opts: dict, rng: np.random.Generator) -> np.ndarray:
  """`n` crops of random `pool` images of `kind`, by `embedded.crops`' law; float32 [n, 32, 32]."""
  return embedded.whole_tile_crops(images(kind, pool), n, opts, rng)[0]
