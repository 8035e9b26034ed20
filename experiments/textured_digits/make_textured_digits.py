"""A third spurious-correlation dataset, with a texture shortcut (kept out of the package).

"Textured digits": 32x32 images of a handwritten 4 or 9 (scikit-learn's embedded 8x8 digits,
upscaled x2, at a random position, white ink blended at a random strength) drawn over a
grayscale texture. Label = the digit (robust, harder: 4 and 9 share most strokes);
`spurious` = the texture: 0 a crop of scikit-image's `brick`, 1 of its `gravel`. Each texture
crop is standardized (its mean and contrast removed, then drawn at random) so only the
texture's structure tells the two apart, not its brightness: a shortcut of a different kind
than the colour of `experiments/colored_digits/` and the digit-on-top of the dominoes
(`docs/dominoes.md`), closer to the texture bias of ImageNet models (Geirhos et al., ICLR 2019,
"ImageNet-trained CNNs are biased towards texture").

Correlation as in the dominoes: in `train`, `val_id` and `test_id` exactly
`round(agreement * n / 2)` examples of each class show that class's texture (default 0.9), in
`val_ood` / `test_ood` exactly half of each class show each texture. Groups = (label,
spurious): the `npz` loader derives `group = 2 * label + spurious` from the `spurious` array
(`vitreg_jax/data/groups.py`).

No leakage: the sources are partitioned once (`--seed`) into train / val / test pools,
60/20/20: the digit images by index per class, each texture by an 8x8 grid of
non-overlapping 64x64 tiles. A background is a 32x32 crop inside one tile of its pool
(random offset, flip and quarter turn), so no pixel of a validation or test tile, and no
validation or test digit, is ever in a training image. `val_*` draw from the `val` pool,
`test_*` from the `test` pool.

  python experiments/textured_digits/make_textured_digits.py --out=/tmp/textured_digits
writes OUT/{train,val_id,val_ood,test_id,test_ood}.npz (images uint8 [n, 32, 32, 3] gray,
labels int32, spurious int32).
"""

import argparse
import os

import numpy as np
from skimage import data as skdata
from sklearn import datasets

DIGITS = (4, 9)            # label 0, label 1
TEXTURES = ("brick", "gravel")  # spurious 0, spurious 1 (skimage.data, shipped)
TILE, SIZE = 64, 32        # texture tile side (pool unit), image side
POOLS = ("train", "val", "test")
FRACTIONS = (0.6, 0.2, 0.2)
CONTRAST, INK = 0.075, 0.85  # texture std, digit opacity (the difficulty; see main's --help)
SIZES = {"train": 10000, "val_id": 1000, "val_ood": 1000, "test_id": 1000, "test_ood": 1000}


def _cut(n: int, rng) -> dict:
  """A random partition of range(n) into the pools, 60/20/20."""
  order = rng.permutation(n)
  a, b = round(FRACTIONS[0] * n), round((FRACTIONS[0] + FRACTIONS[1]) * n)
  return dict(zip(POOLS, (order[:a], order[a:b], order[b:])))


def digit_pools(seed: int) -> dict:
  """pool -> per class, the digit images `[n, 16, 16]` in [0, 1] (and their sklearn indices)."""
  d = datasets.load_digits()
  rng = np.random.default_rng(seed)
  out = {p: {"images": [], "index": []} for p in POOLS}
  for digit in DIGITS:
    index = np.flatnonzero(d.target == digit)
    for pool, part in _cut(len(index), rng).items():
      chosen = np.sort(index[part])
      out[pool]["index"].append(chosen)
      out[pool]["images"].append(np.kron(d.images[chosen] / 16.0, np.ones((1, 2, 2))))
  return out


def texture_pools(seed: int) -> dict:
  """pool -> per texture, the tiles `[n, 64, 64]` in [0, 1] (and their grid indices)."""
  rng = np.random.default_rng(seed + 1)
  out = {p: {"tiles": [], "index": []} for p in POOLS}
  for name in TEXTURES:
    img = getattr(skdata, name)().astype(np.float32) / 255.0
    rows, cols = img.shape[0] // TILE, img.shape[1] // TILE
    tiles = img[:rows * TILE, :cols * TILE].reshape(rows, TILE, cols, TILE)
    tiles = tiles.transpose(0, 2, 1, 3).reshape(rows * cols, TILE, TILE)
    for pool, part in _cut(len(tiles), rng).items():
      chosen = np.sort(part)
      out[pool]["index"].append(chosen)
      out[pool]["tiles"].append(tiles[chosen])
  return out


def background(rng, tiles: np.ndarray, contrast: float) -> np.ndarray:
  """A standardized 32x32 crop of a random tile: random offset, flip and quarter turn, then
  the crop's own mean and contrast replaced by random ones, the same for both textures (std
  uniform in `contrast` x [2/3, 4/3])."""
  tile = tiles[rng.integers(len(tiles))]
  y, x = rng.integers(0, TILE - SIZE + 1, 2)
  crop = np.rot90(tile[y:y + SIZE, x:x + SIZE], rng.integers(4))
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  crop = (crop - crop.mean()) / (crop.std() + 1e-6)
  return rng.uniform(0.3, 0.6) + contrast * rng.uniform(2 / 3, 4 / 3) * crop


def spurious_values(rng, labels: np.ndarray, agreement: float) -> np.ndarray:
  """Per class exactly `round(agreement * n_c)` examples whose attribute equals the label."""
  spurious = 1 - labels
  for c in (0, 1):
    members = rng.permutation(np.flatnonzero(labels == c))
    spurious[members[:round(agreement * len(members))]] = c
  return spurious


def make_split(rng, digits: list, tiles: list, n: int, agreement: float, contrast: float,
               ink: float):
  """`n` images (classes exactly balanced), their labels and texture ids. `contrast`: the
  texture's mean std; `ink`: the digit's mean opacity (uniform in ink +- 0.15, at most 1)."""
  labels = rng.permutation(np.arange(n) % 2)
  spurious = spurious_values(rng, labels, agreement)
  images = np.zeros((n, SIZE, SIZE), np.float32)
  for i in range(n):
    img = background(rng, tiles[spurious[i]], contrast)
    pool = digits[labels[i]]
    stroke = pool[rng.integers(len(pool))] * rng.uniform(ink - 0.15, min(ink + 0.15, 1.0))
    y, x = rng.integers(0, SIZE - 16 + 1, 2)
    patch = img[y:y + 16, x:x + 16]
    img[y:y + 16, x:x + 16] = patch * (1 - stroke) + stroke  # white ink, partly transparent
    images[i] = img
  images += rng.normal(0, 0.03, images.shape)
  images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
  return np.repeat(images[..., None], 3, -1), labels.astype(np.int32), spurious.astype(np.int32)


def build(out: str, seed: int = 0, agreement: float = 0.9, sizes: dict = None,
          contrast: float = CONTRAST, ink: float = INK) -> None:
  """Writes `out/{split}.npz` for every split of `sizes` (default `SIZES`)."""
  os.makedirs(out, exist_ok=True)
  digits, textures = digit_pools(seed), texture_pools(seed)
  rng = np.random.default_rng(seed + 2)
  for split, n in (sizes or SIZES).items():
    pool = "train" if split == "train" else split.split("_")[0]
    images, labels, spurious = make_split(rng, digits[pool]["images"], textures[pool]["tiles"],
                                          n, 0.5 if split.endswith("ood") else agreement,
                                          contrast, ink)
    np.savez(os.path.join(out, f"{split}.npz"), images=images, labels=labels, spurious=spurious)
    print(split, images.shape, "P(spurious = label) =", float((labels == spurious).mean()))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--agreement", type=float, default=0.9,
                 help="P(texture = label) in train and *_id (OOD: 0.5)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--contrast", type=float, default=CONTRAST,
                 help="texture std (pixels in [0, 1]): higher makes the shortcut easier")
  p.add_argument("--ink", type=float, default=INK,
                 help="digit opacity: higher makes the robust feature easier")
  args = p.parse_args()
  build(args.out, args.seed, args.agreement, contrast=args.contrast, ink=args.ink)


if __name__ == "__main__":
  main()
