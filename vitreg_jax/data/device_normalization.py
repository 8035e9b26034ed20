"""Input normalization on the device: batches cross to it as uint8, the step normalizes them.

The input pipeline hands over images as uint8 `[b, H, W, C]` (a quarter of the bytes of
float32, so the host-to-device copy and the host's own work shrink 4x) and the jitted train /
eval step maps them to the model's input, per channel:

  x_normalized = (x - 255 mean) / (255 std)        (float32; the same formula as the host's
                                                    `preprocess.normalize`)

with the dataset's `mean` / `std` (its data config options, e.g. `(0.5, 0.5, 0.5)` for [-1, 1]
or the ImageNet statistics). `Normalization` is a small frozen (hashable) record, so it can be
bound into a jitted step as a constant.

Float images are taken as already normalized and passed through unchanged: synthetic
benchmark batches, tests, and the analyses that add noise in normalized units feed floats.
An integer dtype other than uint8 is an error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from vitreg_jax.data import preprocess


@dataclasses.dataclass(frozen=True)
class Normalization:
  """Per-channel `mean` and `std` of images in [0, 1] (the pipeline's uint8 is 255 x that)."""
  mean: tuple = preprocess.HALF
  std: tuple = preprocess.HALF

  def __post_init__(self):
    object.__setattr__(self, 'mean', tuple(float(m) for m in self.mean))
    object.__setattr__(self, 'std', tuple(float(s) for s in self.std))
    if len(self.mean) != len(self.std) or min(self.std) <= 0:
      raise ValueError(f'Normalization needs one mean and one std > 0 per channel, got '
                       f'mean={self.mean}, std={self.std}.')

  def __call__(self, images):
    """uint8 -> normalized float32 (inside jit); float images are returned as they are."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.floating):
      return images
    _check_uint8(images.dtype)
    shift = np.asarray(self.mean, np.float32) * 255.0
    scale = 1.0 / (np.asarray(self.std, np.float32) * 255.0)
    return (images.astype(jnp.float32) - shift) * scale

  def host(self, images: np.ndarray) -> np.ndarray:
    """The same map in NumPy (for tools that need normalized images on the host)."""
    images = np.asarray(images)
    if np.issubdtype(images.dtype, np.floating):
      return images
    _check_uint8(images.dtype)
    return preprocess.normalize(images, self.mean, self.std)


def _check_uint8(dtype) -> None:
  if np.dtype(dtype) != np.uint8:
    raise TypeError(f'Images must be uint8 (normalized on the device) or float (already '
                    f'normalized), got {np.dtype(dtype)}.')


def of_transform(transform: Any) -> Normalization:
  """The normalization a dataset's per-example transform stands for.

  `preprocess.ImageTransform` carries `mean` / `std`; wrappers (the rotation task's
  transform) hold one as `image_transform`.
  """
  inner = getattr(transform, 'image_transform', transform)
  mean: Sequence[float] = getattr(inner, 'mean', None)
  std: Sequence[float] = getattr(inner, 'std', None)
  if mean is None or std is None:
    raise TypeError(f'{type(transform).__name__} does not say how its images are normalized '
                    '(no mean / std).')
  return Normalization(tuple(mean), tuple(std))
