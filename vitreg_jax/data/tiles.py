"""Crops of source images read from a fixed grid of tiles: the no-leakage device of the embedded
datasets (`dominoes`, `embedded`, `embedded_rotation`).

A source image is cut into non-overlapping square tiles and every tile is given to one pool
(train, val, test, ...) once, independently of the data seed (`partition`). A crop is then
placed inside one tile of its pool and its samples are clamped to that tile
(`sample_crops`), so no pixel of a held-out tile ever reaches a training example: the
held-out pools are new regions of the images, never seen even in part.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def partition(order: np.ndarray, fractions: Sequence[float]) -> list[np.ndarray]:
  """Splits a permutation into consecutive parts of the given fractions (they sum to 1)."""
  n = len(order)
  cuts = np.round(np.cumsum(fractions)[:-1] * n).astype(int)
  return np.split(order, cuts)


def sample_crops(images: np.ndarray, image: np.ndarray, tile_top: np.ndarray,
                 tile_left: np.ndarray, tile: int, out_size: int, min_crop: int,
                 max_crop: int, rng: np.random.Generator) -> np.ndarray:
  """Random square crops, each read only from its own tile, resampled to `out_size`.

  Crop i has side `s ~ U{min_crop..max_crop}` and is placed uniformly inside the tile of side
  `tile` whose top-left pixel is `(tile_top[i], tile_left[i])` of `images[image[i]]`; it is
  resampled bilinearly at the centres of an `out_size x out_size` grid and flipped
  horizontally with probability 1/2. Sample coordinates are clamped to the tile, so no pixel
  outside it contributes (bilinear weights included, see `bilinear`).

  Args:
    images: float32 `[num_images, H, W, C]`.
    image, tile_top, tile_left: int `[n]`, the crop's source image and its tile's corner.
    tile, out_size, min_crop, max_crop: sizes in pixels (`min_crop <= max_crop <= tile`).
    rng: draws, in this order, the sides, the vertical and horizontal offsets and the flips.

  Returns:
    float32 `[n, out_size, out_size, C]`.
  """
  n = len(image)
  tile_top = np.asarray(tile_top, np.int64)
  tile_left = np.asarray(tile_left, np.int64)
  size = rng.integers(min_crop, max_crop + 1, size=n).astype(np.float32)
  top = tile_top + rng.uniform(0.0, 1.0, n) * (tile - size)
  left = tile_left + rng.uniform(0.0, 1.0, n) * (tile - size)
  # Sample at the centres of an out_size x out_size grid covering the crop.
  grid = (np.arange(out_size, dtype=np.float32) + 0.5) / out_size
  ys = top[:, None] + grid[None] * size[:, None] - 0.5  # [n, out_size], pixel coordinates
  xs = left[:, None] + grid[None] * size[:, None] - 0.5
  flip = rng.random(n) < 0.5
  xs[flip] = xs[flip, ::-1]
  ys = np.clip(ys, tile_top[:, None], tile_top[:, None] + tile - 1)
  xs = np.clip(xs, tile_left[:, None], tile_left[:, None] + tile - 1)
  return bilinear(images, np.asarray(image, np.int64), ys, xs)


def bilinear(images: np.ndarray, image: np.ndarray, ys: np.ndarray, xs: np.ndarray):
  """Bilinear samples `images[image[i], ys[i, a], xs[i, b]]` -> `[n, len(a), len(b), C]`.

  Corner pixels are taken so that a coordinate lying exactly on a pixel reads only that pixel
  (`floor` and `ceil`), so clamped coordinates never touch pixels beyond the clamp.
  """
  num, h, w, channels = images.shape
  y0, x0 = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
  y1, x1 = np.ceil(ys).astype(np.int64), np.ceil(xs).astype(np.int64)
  wy = (ys - y0)[:, :, None, None].astype(np.float32)
  wx = (xs - x0)[:, None, :, None].astype(np.float32)
  # One flat gather per corner (much faster than three broadcast index arrays).
  flat = images.reshape(num * h * w, channels)
  rows = image[:, None] * h

  def corner(yy, xx):
    return np.take(flat, ((rows + yy)[:, :, None] * w + xx[:, None, :]), axis=0)

  top = corner(y0, x0) * (1 - wx) + corner(y0, x1) * wx
  bottom = corner(y1, x0) * (1 - wx) + corner(y1, x1) * wx
  return top * (1 - wy) + bottom * wy
