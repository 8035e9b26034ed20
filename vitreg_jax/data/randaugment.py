"""RandAugment (Cubuk et al. 2020) on uint8 images with PIL: no TensorFlow, no global RNG.

Why this variant: the CIFAR recipe of "How do Vision Transformers Work?" (Park & Kim, ICLR
2022; authors' repository xxxnell/how-do-vits-work, `configs/cifar100_vit.yaml`, "the
configuration ... mostly used in the paper ... for both CNNs and ViTs") asks timm for
`auto_augment: rand-m9-n2-mstd1.0` (`ops/datasets.py` passes it to timm's
`transforms_imagenet_train`). This module implements that policy as timm defines it
(rwightman/pytorch-image-models, `timm/data/auto_augment.py`: `rand_augment_transform`,
`AugmentOp`, `_RAND_TRANSFORMS`), written for this project:

- `n` ops per image, drawn uniformly with replacement from the 15 ops of `RAND_OPS`; each
  is applied with probability 1/2 (timm's `prob=0.5`, not in the RandAugment paper).
- Magnitude `m` on a 0..10 scale; with `mstd > 0` it is redrawn per op from
  N(m, mstd) and clipped to [0, `mmax`] (10 by default); `mstd > 100` draws uniformly
  from [0, m].
- Level -> argument at magnitude l (l / 10 = v):
  Rotate +-30 v degrees; ShearX/Y +-0.3 v; TranslateX/YRel +-0.45 v of the image size
  (sign drawn with probability 1/2); Posterize keeps int(4 v) bits (8+: unchanged);
  Solarize threshold int(256 v); SolarizeAdd adds int(110 v) to pixels below 128;
  Color/Contrast/Brightness/Sharpness enhance factor 1.8 v + 0.1; AutoContrast, Equalize
  and Invert have no argument. `inc1` selects the "increasing" variants (Posterize keeps
  4 - int(4 v) bits, Solarize threshold 256 - int(256 v), enhance factor 1 +- 0.9 v, >= 0.1).
- Geometric ops fill uncovered pixels with `fill` (timm passes the dataset mean x 255) and
  resample bilinearly or bicubically, chosen at random per op (`interpolation='random'`,
  the authors' setting) or fixed.

Every random draw comes from the `np.random.Generator` the pipeline seeds per (seed, epoch,
example), so an augmented epoch is a pure function of the seed: resuming reproduces it.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from vitreg_jax import errors

RAND_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize',
            'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY',
            'TranslateXRel', 'TranslateYRel')
_INCREASING = {'Posterize': 'PosterizeIncreasing', 'Solarize': 'SolarizeIncreasing',
               'Color': 'ColorIncreasing', 'Contrast': 'ContrastIncreasing',
               'Brightness': 'BrightnessIncreasing', 'Sharpness': 'SharpnessIncreasing'}
RAND_INCREASING_OPS = tuple(_INCREASING.get(op, op) for op in RAND_OPS)
_MAX_LEVEL = 10.0
_SIGNED = {'Rotate': 30.0, 'ShearX': 0.3, 'ShearY': 0.3, 'TranslateXRel': 0.45,
           'TranslateYRel': 0.45}
_ENHANCE = {'Color': ImageEnhance.Color, 'Contrast': ImageEnhance.Contrast,
            'Brightness': ImageEnhance.Brightness, 'Sharpness': ImageEnhance.Sharpness}
_INTERPOLATIONS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC,
                   'nearest': Image.NEAREST}


def op_argument(name: str, level: float, rng: np.random.Generator):
  """The argument of op `name` at magnitude `level` (0..10), as in the module docstring."""
  v = level / _MAX_LEVEL
  if name in _SIGNED:
    value = v * _SIGNED[name]
    return -value if rng.random() < 0.5 else value
  base = name.replace('Increasing', '')
  increasing = name != base
  if base == 'Posterize':
    bits = int(v * 4)
    return 4 - bits if increasing else bits
  if base == 'Solarize':
    threshold = int(v * 256)
    return 256 - threshold if increasing else threshold
  if base == 'SolarizeAdd':
    return int(v * 110)
  if base in _ENHANCE:
    if increasing:
      delta = v * 0.9
      return max(0.1, 1.0 + (-delta if rng.random() < 0.5 else delta))
    return v * 1.8 + 0.1
  return None  # AutoContrast, Equalize, Invert.


def apply_op(img: Image.Image, name: str, arg, *, fill: tuple, resample) -> Image.Image:
  """Applies one op with its argument to a PIL image (RGB or L)."""
  base = name.replace('Increasing', '')
  geometric = dict(resample=resample, fillcolor=fill if img.mode == 'RGB' else fill[0])
  if base == 'AutoContrast':
    return ImageOps.autocontrast(img)
  if base == 'Equalize':
    return ImageOps.equalize(img)
  if base == 'Invert':
    return ImageOps.invert(img)
  if base == 'Rotate':
    return img.rotate(arg, **geometric)
  if base == 'Posterize':
    return img if arg >= 8 else ImageOps.posterize(img, arg)
  if base == 'Solarize':
    return ImageOps.solarize(img, arg)
  if base == 'SolarizeAdd':
    lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))
  if base in _ENHANCE:
    return _ENHANCE[base](img).enhance(arg)
  # Affine ops: PIL maps each output pixel (x, y) to the input (a x + b y + c, d x + e y + f).
  w, h = img.size
  matrix = {'ShearX': (1, arg, 0, 0, 1, 0), 'ShearY': (1, 0, 0, arg, 1, 0),
            'TranslateXRel': (1, 0, arg * w, 0, 1, 0),
            'TranslateYRel': (1, 0, 0, 0, 1, arg * h)}[base]
  return img.transform(img.size, Image.AFFINE, matrix, **geometric)


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """`fn(image uint8 [H, W, C], rng) -> uint8 [H, W, C]`; picklable for grain workers.

  Attributes:
    num_ops: ops per image (`n`).
    magnitude: `m` (0..10 scale; above 10 only with `magnitude_max`).
    magnitude_std: per-op Gaussian noise on the magnitude (`mstd`); inf: uniform [0, m].
    magnitude_max: upper clip of the magnitude (timm's `mmax`; default 10).
    increasing: use the "increasing" op variants (timm's `inc1`).
    fill: RGB fill of geometric ops (uint8 values).
    interpolation: 'random' (bilinear or bicubic per op), 'bilinear', 'bicubic', 'nearest'.
  """
  num_ops: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  magnitude_max: Optional[float] = None
  increasing: bool = False
  fill: tuple = (128, 128, 128)
  interpolation: str = 'random'

  def __post_init__(self):
    if self.interpolation != 'random' and self.interpolation not in _INTERPOLATIONS:
      raise errors.UserError(f"RandAugment interpolation must be 'random' or one of "
                             f'{sorted(_INTERPOLATIONS)}, got {self.interpolation!r}.')
    if self.num_ops < 0 or self.magnitude < 0:
      raise errors.UserError(f'RandAugment needs num_ops >= 0 and magnitude >= 0, got '
                             f'{self.num_ops}, {self.magnitude}.')

  @property
  def ops(self) -> tuple:
    return RAND_INCREASING_OPS if self.increasing else RAND_OPS

  def _level(self, rng: np.random.Generator) -> float:
    level = self.magnitude
    if self.magnitude_std == float('inf'):
      level = rng.uniform(0.0, level)
    elif self.magnitude_std > 0:
      level = rng.normal(level, self.magnitude_std)
    return float(np.clip(level, 0.0, self.magnitude_max or _MAX_LEVEL))

  def _resample(self, rng: np.random.Generator):
    if self.interpolation == 'random':
      return (Image.BILINEAR, Image.BICUBIC)[int(rng.integers(2))]
    return _INTERPOLATIONS[self.interpolation]

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    squeeze = image.ndim == 3 and image.shape[-1] == 1
    img = Image.fromarray(image[..., 0] if squeeze else image)
    fill = tuple(int(f) for f in self.fill)
    for index in rng.integers(0, len(self.ops), self.num_ops):
      if rng.random() >= 0.5:  # each chosen op is applied with probability 1/2 (timm).
        continue
      name = self.ops[int(index)]
      arg = op_argument(name, self._level(rng), rng)
      img = apply_op(img, name, arg, fill=fill, resample=self._resample(rng))
    out = np.asarray(img)
    return out[..., None] if squeeze else out


def from_string(spec: str, *, fill: Sequence[int] = (128, 128, 128),
                interpolation: str = 'random') -> RandAugment:
  """Parses a timm RandAugment string such as `'rand-m9-n2-mstd1.0'` (also `mmax`, `inc`).

  Raises:
    ValueError: not a 'rand-...' string, or an unknown / unsupported section.
  """
  parts = str(spec).split('-')
  if parts[0] != 'rand':
    raise errors.UserError(f"RandAugment spec must start with 'rand' (e.g. 'rand-m9-n2-mstd1.0'), "
                           f'got {spec!r}.')
  kwargs = dict(fill=tuple(int(f) for f in fill), interpolation=interpolation)
  for part in parts[1:]:
    match = re.fullmatch(r'([a-z]+)(\d.*)', part)
    if not match or match[1] not in ('m', 'n', 'mstd', 'mmax', 'inc'):
      raise errors.UserError(
          f'Unknown RandAugment section {part!r} in {spec!r}; valid: m<magnitude>, '
          'n<ops>, mstd<std>, mmax<max>, inc<0|1> (weighted choice w is not '
          'supported).')
    key, value = match[1], match[2]
    if key == 'm':
      kwargs['magnitude'] = float(value)
    elif key == 'n':
      kwargs['num_ops'] = int(value)
    elif key == 'mstd':
      kwargs['magnitude_std'] = float('inf') if float(value) > 100 else float(value)
    elif key == 'mmax':
      kwargs['magnitude_max'] = float(value)
    else:
      kwargs['increasing'] = bool(int(value))
  return RandAugment(**kwargs)


def main(argv=None):
  """`python -m vitreg_jax.data.randaugment [SPEC [OUT.png]]`: a grid of augmented copies
  of a synthetic 32 x 32 image (rows: seeds), to look at what a policy does."""
  args = sys.argv[1:] if argv is None else argv
  spec = args[0] if args else 'rand-m9-n2-mstd1.0'
  out = args[1] if len(args) > 1 else '/tmp/randaugment.png'
  policy = from_string(spec)
  yy, xx = np.mgrid[:32, :32]
  image = np.stack([xx * 8, yy * 8, ((xx // 8 + yy // 8) % 2) * 255], -1).astype(np.uint8)
  rows = [np.concatenate([policy(image, np.random.default_rng([s, i])) for i in range(8)], 1)
          for s in range(4)]
  Image.fromarray(np.concatenate(rows, 0)).resize((8 * 96, 4 * 96), Image.NEAREST).save(out)
  print(f'{policy}\nwrote {out}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
