"""A second spurious-correlation dataset for the head-selection check (kept out of the package).

"Coloured digits": 32x32 RGB images of a handwritten 3 or 8 (scikit-learn's embedded 8x8
digits, upscaled x2, placed at a random position, random stroke brightness) on a coloured
background. Label = the digit (robust, harder); `spurious` = the background colour family
(0 reddish, 1 greenish; hue, saturation and brightness jittered per image), simple. In train /
*_id the colour agrees with the label with probability 0.9; in *_ood it is random. The digit
images are split 60/20/20 between train / val / test pools, so no digit image seen in
training appears in an evaluation split. Gaussian pixel noise (std 12 / 255).

  python experiments/colored_digits/make_colored_digits.py --out=/tmp/colored_digits
writes OUT/{train,val_id,val_ood,test_id,test_ood}.npz (images uint8, labels, spurious).
"""

import argparse
import os

import numpy as np
from sklearn import datasets

DIGITS = (3, 8)
SIZES = {"train": 10000, "val_id": 1000, "val_ood": 1000, "test_id": 1000, "test_ood": 1000}


def pools(seed):
  """Per class, the digit images [n, 16, 16] in [0, 1] of the train / val / test pools."""
  d = datasets.load_digits()
  rng = np.random.default_rng(seed)
  out = {"train": [], "val": [], "test": []}
  for digit in DIGITS:
    imgs = d.images[d.target == digit] / 16.0
    imgs = np.kron(imgs, np.ones((1, 2, 2)))  # 8x8 -> 16x16
    imgs = imgs[rng.permutation(len(imgs))]
    n = len(imgs)
    a, b = int(0.6 * n), int(0.8 * n)
    out["train"].append(imgs[:a])
    out["val"].append(imgs[a:b])
    out["test"].append(imgs[b:])
  return out


def background(rng, colour):
  """A jittered reddish (0) or greenish (1) RGB colour in [0, 1]."""
  base = np.array([0.75, 0.25, 0.2]) if colour == 0 else np.array([0.2, 0.65, 0.3])
  return np.clip(base + rng.normal(0, 0.08, 3), 0, 1) * rng.uniform(0.7, 1.0)


def make_split(rng, digit_pool, n, agreement):
  images = np.zeros((n, 32, 32, 3), np.float32)
  labels = rng.integers(0, 2, n)
  agree = rng.random(n) < agreement
  spurious = np.where(agree, labels, 1 - labels)
  for i in range(n):
    pool = digit_pool[labels[i]]
    digit = pool[rng.integers(len(pool))]
    img = np.broadcast_to(background(rng, spurious[i]), (32, 32, 3)).copy()
    y, x = rng.integers(0, 17, 2)
    stroke = digit[..., None] * rng.uniform(0.7, 1.0)
    patch = img[y:y + 16, x:x + 16]
    img[y:y + 16, x:x + 16] = patch * (1 - stroke) + stroke  # white ink
    images[i] = img
  images += rng.normal(0, 12 / 255, images.shape)
  return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels, spurious


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True)
  p.add_argument("--agreement", type=float, default=0.9)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  digit_pools = pools(args.seed)
  rng = np.random.default_rng(args.seed + 1)
  for split, n in SIZES.items():
    pool = digit_pools["train" if split == "train" else split.split("_")[0]]
    agreement = 0.5 if split.endswith("ood") else args.agreement
    images, labels, spurious = make_split(rng, pool, n, agreement)
    np.savez(os.path.join(args.out, f"{split}.npz"), images=images,
             labels=labels.astype(np.int32), spurious=spurious.astype(np.int32))
    print(split, images.shape, "P(spurious = label) =", float((labels == spurious).mean()))


if __name__ == "__main__":
  main()
