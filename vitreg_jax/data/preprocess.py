"""Per-example image preprocessing in NumPy + PIL (no TensorFlow), run inside grain workers.

Conventions: images are uint8 `[H, W, C]` on input and on output: the transforms hand uint8 to
the device, where the jitted step normalizes it (`data/device_normalization.py`) with the
transform's `mean` / `std`; `normalize` here is the same map in NumPy (float32
`(x / 255 - mean) / std`). Random ops take a `np.random.Generator` that the pipeline seeds per
(seed, epoch, example index), so augmentation is reproducible on resume.

Standard recipes:
- train (`train_crop_flip`): Inception-style random-resized crop (area fraction drawn
  uniformly from `scale`, log aspect ratio uniformly from log(`ratio`), up to 10 tries, else
  a centre crop), resized bilinearly to `size`, then a horizontal flip with probability 1/2
  (Szegedy et al. 2015; the torchvision / big_vision default).
- train, CIFAR style (`ImageTransform(padding=4)`): pad each side with `padding` zeros and
  take a random `size x size` crop, then the flip (torchvision's `RandomCrop(32, padding=4)`,
  the crop of the "How do ViTs work?" authors' CIFAR recipe).
- optional RandAugment (`ImageTransform(randaugment=...)`, `vitreg_jax.data.randaugment`) on
  the cropped uint8 image, before normalization.
- eval (`resize_center_crop`): resize the shorter side to `size / crop_fraction` and take
  the central `size x size` crop (crop_fraction 0.875 gives the usual 256 -> 224).
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from vitreg_jax import errors
from vitreg_jax.data import randaugment as randaugment_lib
from vitreg_jax.data.base import CorruptDataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)   # maps [0, 255] to [-1, 1]


def decode_image(data: bytes, name: str = '<bytes>') -> np.ndarray:
  """Decodes JPEG/PNG bytes to uint8 RGB `[H, W, 3]`; a broken file raises naming `name`."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert('RGB'))
  except (OSError, ValueError, SyntaxError) as e:
    raise CorruptDataError(f'{name}: corrupt or truncated image ({e}).') from None


def to_rgb(image: np.ndarray) -> np.ndarray:
  """`[H, W]` / `[H, W, 1]` / `[H, W, 3]` uint8 -> `[H, W, 3]`."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 `[H, W, C]` -> float32 `(x / 255 - mean) / std`."""
  mean = np.asarray(mean, np.float32) * 255.0
  inv = 1.0 / (np.asarray(std, np.float32) * 255.0)
  out = image.astype(np.float32)
  out -= mean
  out *= inv
  return out


def _resize_box(image: np.ndarray, box: tuple, out_hw: tuple) -> np.ndarray:
  """Crops `box = (top, left, height, width)` and resizes it bilinearly to `out_hw` in one go."""
  top, left, h, w = box
  if (h, w) == tuple(out_hw):
    return np.ascontiguousarray(image[top:top + h, left:left + w])
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = pil.resize((out_hw[1], out_hw[0]), Image.BILINEAR,
                   box=(left, top, left + w, top + h))
  out = np.asarray(out)
  return out[..., None] if squeeze else out


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: Sequence[float] = (0.08, 1.0),
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple:
  """Samples an Inception crop `(top, left, h, w)`; see the module docstring for the law."""
  area = height * width
  # All 10 attempts drawn at once (two generator calls instead of up to 40).
  targets = area * rng.uniform(scale[0], scale[1], 10)
  aspects = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), 10))
  ws = np.rint(np.sqrt(targets * aspects)).astype(int)
  hs = np.rint(np.sqrt(targets / aspects)).astype(int)
  ok = np.flatnonzero((ws > 0) & (ws <= width) & (hs > 0) & (hs <= height))
  if ok.size:
    h, w = int(hs[ok[0]]), int(ws[ok[0]])
    top, left = rng.integers(0, (height - h + 1, width - w + 1))
    return int(top), int(left), h, w
  # Fallback: the largest centre crop whose aspect ratio lies within `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size, rng: np.random.Generator,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style random-resized crop to `size` (int: square, or (h, w)), bilinear."""
  box = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return _resize_box(image, box, _hw(size))


def resize_center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """Resize the shorter side to `size / crop_fraction`, then centre-crop `size x size`.

  Implemented as one crop+resize from the source image (same pixels as resize-then-crop up to
  bilinear rounding). `crop_fraction=1` resizes the central square to `size`.
  """
  height, width = image.shape[:2]
  side = min(height, width) * crop_fraction   # source pixels that map to the output square
  h = w = max(1, int(round(side)))
  top, left = (height - h) // 2, (width - w) // 2
  return _resize_box(image, (top, left, h, w), (size, size))


def resize_square_center_crop(image: np.ndarray, size: int,
                              crop_fraction: float = 0.875) -> np.ndarray:
  """Resize (ignoring aspect) to a `size / crop_fraction` square, then centre-crop `size`.

  The eval transform of Sagawa et al.'s code for CUB / Waterbirds
  (Resize((256, 256)) + CenterCrop(224)); done as one crop+resize of the source image.
  """
  height, width = image.shape[:2]
  h = max(1, int(round(height * crop_fraction)))
  w = max(1, int(round(width * crop_fraction)))
  return _resize_box(image, ((height - h) // 2, (width - w) // 2, h, w), (size, size))


def pad_random_crop(image: np.ndarray, size, padding: int,
                    rng: np.random.Generator) -> np.ndarray:
  """Zero-pads each side by `padding`, then crops a random `size` (int or (h, w)) window."""
  out_h, out_w = _hw(size)
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  if padded.shape[0] < out_h or padded.shape[1] < out_w:
    raise errors.UserError(f'Padded image {padded.shape[:2]} is smaller than the crop '
                           f'{(out_h, out_w)}; raise crop_padding or lower image_size.')
  top, left = rng.integers(0, (padded.shape[0] - out_h + 1, padded.shape[1] - out_w + 1))
  return np.ascontiguousarray(padded[top:top + out_h, left:left + out_w])


def maybe_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def _hw(size) -> tuple:
  return (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)


def train_crop_flip(image: np.ndarray, size, rng: np.random.Generator,
                    scale: Sequence[float] = (0.08, 1.0), flip: bool = True) -> np.ndarray:
  """Standard train augmentation: random-resized crop to `size`, then random flip."""
  image = random_resized_crop(image, size, rng, scale=scale)
  return maybe_flip(image, rng) if flip else image


def eval_resize_crop(image: np.ndarray, size: Optional[int],
                     crop_fraction: float = 0.875) -> np.ndarray:
  """Standard eval preprocessing; `size=None` keeps the image as it is."""
  if size is None:
    return image
  return resize_center_crop(image, size, crop_fraction)


def rotate90(image: np.ndarray, k: int) -> np.ndarray:
  """Rotates counter-clockwise by `k * 90` degrees (square images keep their shape)."""
  return np.ascontiguousarray(np.rot90(image, k=int(k), axes=(0, 1)))


def imagenet_options(image_size: int = 224, crop_scale: Sequence[float] = (0.08, 1.0),
                     crop_fraction: float = 0.875) -> dict:
  """The base of an ImageNet-style dataset's `options` (what `ImageTransform` reads): the
  random-resized crop of `crop_scale` when training, the centre crop of `crop_fraction` for
  evaluation, ImageNet mean / std. Each such dataset extends it with its own keys."""
  return {
      'image_size': image_size,
      'augment': True,
      'crop_scale': tuple(crop_scale),
      'crop_fraction': crop_fraction,
      'mean': IMAGENET_MEAN,
      'std': IMAGENET_STD,
  }


# Train-augmentation options of the image datasets (cifar10/100, the fine-tuning and corrupted
# sets, npz, image_folder); `augmentation_kwargs` turns them into ImageTransform arguments.
AUGMENT_OPTIONS = {
    'crop_padding': None,   # int: CIFAR pad-and-random-crop instead of the random-resized crop.
    'randaugment': None,    # timm RandAugment string, e.g. 'rand-m9-n2-mstd1.0' (randaugment.py).
}


def augmentation_kwargs(config: dict) -> dict:
  """`padding` and `randaugment` for `ImageTransform` from a resolved data config.

  RandAugment fills the pixels uncovered by geometric ops with the dataset mean (as timm does
  with `img_mean`), so the fill normalizes to about zero.
  """
  spec = config.get('randaugment')
  padding = config.get('crop_padding')
  if padding is not None and (not isinstance(padding, (int, np.integer)) or padding < 0):
    raise errors.UserError(f'data.crop_padding must be None or an integer >= 0, got {padding!r}.')
  policy = None
  if spec:
    fill = tuple(int(min(255, round(255 * m))) for m in config.get('mean', HALF))
    policy = randaugment_lib.from_string(spec, fill=fill)
  return {'padding': padding, 'randaugment': policy}


class ImageTransform:
  """The per-example transform of image classification datasets (picklable for workers).

  train and augment: `train_crop_flip` to `size` (None: the image's own size), or with
  `padding` the CIFAR pad-and-crop plus flip; then `randaugment(image, rng)` if given;
  otherwise `eval_resize_crop` (size None: unchanged), or `resize_square_center_crop` with
  `square_resize`. `mean` / `std` are not applied here: they say how the device normalizes
  the uint8 output (`Dataset.normalization`).
  Output: `image` uint8, `label` int32 (from `label_key`), each attribute as int32.
  Encoded images (bytes) are decoded first; `name_key` names the file in decode errors.
  """

  def __init__(self, *, size: Optional[int], train: bool, augment: bool = True,
               crop_fraction: float = 0.875, scale: Sequence[float] = (0.08, 1.0),
               flip: bool = True, mean: Sequence[float] = HALF, std: Sequence[float] = HALF,
               attributes: Sequence[str] = (), label_key: str = 'label',
               image_key: str = 'image', rgb: bool = True, name_key: Optional[str] = None,
               square_resize: bool = False, padding: Optional[int] = None,
               randaugment=None):
    self.size, self.train, self.augment = size, train, augment
    self.crop_fraction, self.scale, self.flip = crop_fraction, tuple(scale), flip
    self.mean, self.std = tuple(mean), tuple(std)
    self.attributes, self.label_key, self.image_key = tuple(attributes), label_key, image_key
    self.rgb, self.name_key, self.square_resize = rgb, name_key, square_resize
    self.padding, self.randaugment = padding, randaugment

  def plan(self, height: int, width: int, rng: Optional[np.random.Generator]) -> tuple:
    """-> (box (top, left, h, w) in the source, output (h, w), flip?) for one example."""
    if self.train and self.augment:
      box = random_resized_crop_box(height, width, rng, self.scale)
      out_hw = _hw(self.size) if self.size else (height, width)
      return box, out_hw, bool(self.flip and rng.random() < 0.5)
    if self.size is None:
      return (0, 0, height, width), (height, width), False
    if self.square_resize:
      h = max(1, int(round(height * self.crop_fraction)))
      w = max(1, int(round(width * self.crop_fraction)))
    else:
      h = w = max(1, int(round(min(height, width) * self.crop_fraction)))
    return ((height - h) // 2, (width - w) // 2, h, w), _hw(self.size), False

  def image(self, example, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Decoded, cropped/resized (and flipped) uint8 image, before normalization."""
    img = example[self.image_key]
    pad_crop = self.train and self.augment and self.padding is not None
    if isinstance(img, (bytes, np.bytes_)):
      if not pad_crop:
        return self._image_from_bytes(bytes(img), example, rng)
      img = self._decode(bytes(img), example)
    img = np.asarray(img)
    if self.rgb:
      img = to_rgb(img)
    if pad_crop:
      img = pad_random_crop(img, self.size or img.shape[:2], int(self.padding), rng)
      return maybe_flip(img, rng) if self.flip else img
    box, out_hw, flip = self.plan(img.shape[0], img.shape[1], rng)
    img = _resize_box(img, box, out_hw)
    return img[:, ::-1] if flip else img

  def _image_from_bytes(self, data: bytes, example, rng) -> np.ndarray:
    """Crop + resize straight from the PIL image; JPEGs are decoded at a reduced scale
    (DCT scaling, `Image.draft`) when the crop is at least 2x larger than the output."""
    try:
      with Image.open(io.BytesIO(data)) as pil:
        width, height = pil.size
        (top, left, h, w), (out_h, out_w), flip = self.plan(height, width, rng)
        if pil.format == 'JPEG' and min(h / out_h, w / out_w) >= 2:
          pil.draft('RGB', (math.ceil(width * out_w / w), math.ceil(height * out_h / h)))
          sy, sx = pil.size[1] / height, pil.size[0] / width
          top, left, h, w = top * sy, left * sx, h * sy, w * sx
        if pil.mode not in ('RGB', 'L') or (self.rgb and pil.mode == 'L'):
          pil = pil.convert('RGB' if self.rgb or pil.mode != 'L' else 'L')
        out = np.asarray(pil.resize((out_w, out_h), Image.BILINEAR,
                                    box=(left, top, left + w, top + h)))
    except (OSError, ValueError, SyntaxError) as e:
      name = example.get(self.name_key, '<bytes>') if self.name_key else '<bytes>'
      name = name.decode() if isinstance(name, bytes) else name
      raise CorruptDataError(f'{name}: corrupt or truncated image ({e}).') from None
    if out.ndim == 2:
      out = out[..., None]
    return out[:, ::-1] if flip else out

  def _decode(self, data: bytes, example) -> np.ndarray:
    name = example.get(self.name_key, '<bytes>') if self.name_key else '<bytes>'
    return decode_image(data, name.decode() if isinstance(name, bytes) else str(name))

  def __call__(self, example, rng: Optional[np.random.Generator] = None) -> dict:
    image = self.image(example, rng)
    if self.randaugment is not None and self.train and self.augment:
      image = self.randaugment(image, rng)
    out = {'image': np.ascontiguousarray(image, np.uint8),
           'label': np.int32(example[self.label_key])}
    for key in self.attributes:
      out[key] = np.int32(example[key])
    return out
