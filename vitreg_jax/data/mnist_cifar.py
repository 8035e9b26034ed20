"""MNIST-CIFAR: an MNIST 0/1 digit (spurious) stacked above a CIFAR-10 automobile/truck (robust).

Recipe of Shah et al. 2020 ("The Pitfalls of Simplicity Bias in Neural Networks", Sec. 3) as
used by the diverse-ViT-heads poster (Datasets: MNIST-CIFAR): each example is a 64x32x3
uint8 image, rows 0-31 an MNIST digit (28x28 zero-padded by 2 px to 32x32, repeated to 3
channels), rows 32-63 a CIFAR-10 image. `label` is the CIFAR class (0 automobile, 1 truck),
`spurious` the digit (0 or 1), `group = 2 * label + spurious`.

Construction of one split from pools of digits and CIFAR images (`construct_split`):
1. Truncate: `n = min(#automobile, #truck, #zeros, #ones)` (a random subset of each pool),
   so the classes are balanced and every digit pool suffices; OOD splits use an even `n`.
2. In class c, exactly `round(p * n)` examples get digit c and the rest digit 1 - c, with
   `p = agreement` in distribution (train, val_id, test_id; default 0.9) and `p = 0.5` out of
   distribution (val_ood, test_ood: the digit is independent of the label and the four groups
   have equal size).
3. The examples are shuffled.
Splits: `train` from the MNIST and CIFAR train sets; the CIFAR test set is split per class
into a val part (a fraction `val_ratio`, default 0.2) and a test part (the rest), and `val_id`,
`val_ood` (`test_id`, `test_ood`) pair the val (test) part with digits drawn afresh from the
MNIST test set. `val_ratio=0.2` is the authors' (config/vision_diverse_mnist_cifar.yaml
`val_ratio`, applied by `split_dataset` in diverse_vit/utils.py `get_dataset`); theirs splits
the ID and the OOD validation sets independently and unstratified (so a CIFAR image can be in
`valID` and in `testOOD`), ours once per class for both domains, so no val image is a test
image. `val_ratio=0.5` is this library's split before 2026-12-06. Everything is a
deterministic function of `seed` (a separate random stream per split).

Built by a TFDS builder (`builder_class()`) from the TFDS `mnist` and `cifar10` datasets:
`python -m vitreg_jax.data.prepare mnist_cifar --data_dir=DIR` prepares those two (download
once) and then writes `DIR/mnist_cifar/agree0.9_seed0/1.0.0/` in array_record format.
"""

from __future__ import annotations

import functools

from etils import epath
import numpy as np

from vitreg_jax import errors
from vitreg_jax.data import preprocess
from vitreg_jax.data.base import TfdsDataset

SPLITS = ('train', 'val_id', 'val_ood', 'test_id', 'test_ood')
CIFAR_CLASSES = (1, 9)          # CIFAR-10 automobile, truck -> label 0, 1
DIGITS = (0, 1)                 # MNIST 0, 1 -> spurious 0, 1
IMAGE_SHAPE = (64, 32, 3)


def stack_images(digit: np.ndarray, photo: np.ndarray) -> np.ndarray:
  """[n, 28, 28(, 1)] digits and [n, 32, 32, 3] photos -> [n, 64, 32, 3], digit on top."""
  digit = np.asarray(digit, np.uint8).reshape(len(digit), 28, 28)
  top = np.pad(digit, ((0, 0), (2, 2), (2, 2)))[..., None].repeat(3, axis=-1)
  return np.concatenate([top, np.asarray(photo, np.uint8)], axis=1)


def construct_split(digit_images, digit_labels, photo_images, photo_labels, agreement: float,
                    rng: np.random.Generator, ood: bool = False) -> dict:
  """Builds one split (steps 1-3 of the module docstring).

  Args:
    digit_images, digit_labels: MNIST pool ([m, 28, 28(, 1)] uint8, [m] int).
    photo_images, photo_labels: CIFAR-10 pool ([k, 32, 32, 3] uint8, [k] int, 10 classes).
    agreement: P(spurious == label) within each class (ignored if `ood`: 0.5).
    rng: the split's random stream.
    ood: whether the digit is independent of the label (balanced groups).
  Returns:
    dict with `image` uint8 [n', 64, 32, 3], `label`, `spurious`, `group` int32 [n'], and
    `photo_index`, `digit_index` (indices into the pools, for checks).
  """
  photo_labels, digit_labels = np.asarray(photo_labels), np.asarray(digit_labels)
  photo_pools = [rng.permutation(np.flatnonzero(photo_labels == c)) for c in CIFAR_CLASSES]
  digit_pools = [rng.permutation(np.flatnonzero(digit_labels == d)) for d in DIGITS]
  n = min(len(p) for p in photo_pools + digit_pools)
  if ood:
    n -= n % 2
  if n == 0:
    raise ValueError('MNIST-CIFAR: a class or digit pool is empty.')
  p = 0.5 if ood else float(agreement)
  agree = int(round(p * n))
  used = [0, 0]  # digits consumed per pool
  labels, spurious, photos, digits = [], [], [], []
  for c in (0, 1):
    digit_of = np.where(np.arange(n) < agree, c, 1 - c)
    for d in digit_of:
      digits.append(digit_pools[d][used[d]])
      used[d] += 1
    photos.extend(photo_pools[c][:n])
    labels.extend([c] * n)
    spurious.extend(digit_of)
  order = rng.permutation(len(labels))
  photo_index = np.asarray(photos)[order]
  digit_index = np.asarray(digits)[order]
  label = np.asarray(labels, np.int32)[order]
  spur = np.asarray(spurious, np.int32)[order]
  return {
      'image': stack_images(np.asarray(digit_images)[digit_index],
                            np.asarray(photo_images)[photo_index]),
      'label': label, 'spurious': spur, 'group': (2 * label + spur).astype(np.int32),
      'photo_index': photo_index.astype(np.int64), 'digit_index': digit_index.astype(np.int64),
  }


def construct(mnist: dict, cifar: dict, agreement: float = 0.9, seed: int = 0,
              val_ratio: float = 0.2) -> dict:
  """All five splits from `mnist` / `cifar` = {'train'|'test': (images, labels)}.

  Returns: split -> dict of arrays (see `construct_split`); indices of val/test splits refer
  to the CIFAR / MNIST test sets.
  """
  if not 0.0 <= agreement <= 1.0:
    raise errors.UserError(f'agreement must be in [0, 1], got {agreement}.')
  if not 0.0 < val_ratio < 1.0:
    raise errors.UserError(f'val_ratio must be in (0, 1) (the authors\' 0.2), got {val_ratio}.')
  rngs = {s: np.random.default_rng([seed, i]) for i, s in enumerate(SPLITS)}
  out = {'train': construct_split(*mnist['train'], *cifar['train'], agreement, rngs['train'])}
  # Split the CIFAR test set per class into a val part and a test part.
  test_images, test_labels = cifar['test']
  test_labels = np.asarray(test_labels)
  half_rng = np.random.default_rng([seed, len(SPLITS)])
  val_idx, test_idx = [], []
  for c in CIFAR_CLASSES:
    idx = half_rng.permutation(np.flatnonzero(test_labels == c))
    cut = int(round(len(idx) * val_ratio))
    val_idx.append(idx[:cut])
    test_idx.append(idx[cut:])
  for part, idx in (('val', np.concatenate(val_idx)), ('test', np.concatenate(test_idx))):
    for domain in ('id', 'ood'):
      split = f'{part}_{domain}'
      ex = construct_split(*mnist['test'], np.asarray(test_images)[idx], test_labels[idx],
                           agreement, rngs[split], ood=domain == 'ood')
      ex['photo_index'] = idx[ex['photo_index']]
      out[split] = ex
  return out


def load_inputs(data_dir=None, download: bool = True) -> tuple:
  """Reads TFDS `mnist` and `cifar10` (train and test) into memory.

  Returns:
    (mnist, cifar), each {'train'|'test': (images uint8, labels int64)}.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  out = []
  for name in ('mnist', 'cifar10'):
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
      builder.download_and_prepare(file_format='array_record')
    arrays = {}
    for split in ('train', 'test'):
      source = builder.as_data_source(split=split)
      n = len(source)
      examples = [source[i] for i in range(n)]
      arrays[split] = (np.stack([np.asarray(e['image']) for e in examples]).astype(np.uint8),
                       np.asarray([int(e['label']) for e in examples]))
    out.append(arrays)
  return tuple(out)


def config_name(agreement: float, seed: int, val_ratio: float = 0.2) -> str:
  """The TFDS config's name; `val_ratio` 0.5 (the split before 2026-12-06) keeps its old name,
  so data prepared then is still found."""
  suffix = '' if val_ratio == 0.5 else f'_val{val_ratio:g}'
  return f'agree{agreement:g}_seed{int(seed)}{suffix}'


@functools.lru_cache(maxsize=1)
def builder_class():
  """Defines (once) and returns the TFDS builder class; imports TFDS."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class MnistCifarConfig(tfds.core.BuilderConfig):
    """Agreement rate, seed and validation fraction of the construction."""

    def __init__(self, *, agreement: float = 0.9, seed: int = 0, val_ratio: float = 0.2,
                 **kwargs):
      super().__init__(name=config_name(agreement, seed, val_ratio),
                       description=(f'P(digit == label) = {agreement} in distribution, seed '
                                    f'{seed}, val_ratio {val_ratio}'), **kwargs)
      self.agreement, self.seed, self.val_ratio = float(agreement), int(seed), float(val_ratio)

  class MnistCifar(tfds.core.GeneratorBasedBuilder):
    """MNIST 0/1 over CIFAR-10 automobile/truck (see vitreg_jax/data/mnist_cifar.py)."""
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    # TFDS derives this from the module via importlib_resources, which is not a dependency of
    # the pinned TFDS; the file itself is what it needs (no checksums or metadata files here).
    code_path = epath.Path(__file__)
    BUILDER_CONFIGS = [MnistCifarConfig(agreement=0.9, seed=0, val_ratio=0.2)]

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=IMAGE_SHAPE, encoding_format='png'),
              'label': tfds.features.ClassLabel(names=['automobile', 'truck']),
              'spurious': tfds.features.ClassLabel(names=['zero', 'one']),
              'group': tfds.features.ClassLabel(num_classes=4),
          }),
          supervised_keys=('image', 'label'),
          description=__doc__)

    def _split_generators(self, dl_manager):
      del dl_manager
      # The inputs live next to this dataset (same data_dir); read them once.
      mnist, cifar = load_inputs(str(self.data_dir_root))
      cfg = self.builder_config
      splits = construct(mnist, cifar, cfg.agreement, cfg.seed, cfg.val_ratio)
      return {name: self._generate_examples(arrays) for name, arrays in splits.items()}

    def _generate_examples(self, arrays):
      for i in range(len(arrays['label'])):
        yield i, {k: arrays[k][i] for k in ('image', 'label', 'spurious', 'group')}

  return MnistCifar, MnistCifarConfig


class MnistCifarDataset(TfdsDataset):
  """Registry entry 'mnist_cifar' (options: `agreement`, `seed`, `val_ratio` of the
  construction)."""
  options = {'agreement': 0.9, 'seed': 0, 'val_ratio': 0.2, 'mean': preprocess.HALF,
             'std': preprocess.HALF}
  split_map = {s: s for s in SPLITS}
  num_classes = 2
  attributes = ('spurious', 'group')
  attribute_classes = {'spurious': 2, 'group': 4}
  default_eval_splits = SPLITS[1:]
  tfds_name = 'mnist_cifar'
  description = 'MNIST 0/1 (spurious) over CIFAR automobile/truck (robust), 64x32'
  prepare_hint = ('Built from TFDS mnist and cifar10 (downloaded by TFDS into the same '
                  'data_dir; no manual files).')

  def builder(self, config: dict):
    cls, cfg_cls = builder_class()
    name = config_name(config['agreement'], config['seed'], config['val_ratio'])
    # TFDS refuses a custom config object named like a predefined one: pass the name then.
    builder_config = (name if name in cls.builder_configs else
                      cfg_cls(agreement=config['agreement'], seed=config['seed'],
                              val_ratio=config['val_ratio']))
    return cls(data_dir=config['data_dir'], config=builder_config)

  def image_shape(self, config: dict) -> tuple:
    return IMAGE_SHAPE

  def transform(self, config: dict, split: str, train: bool):
    # No augmentation: the digit/photo layout is the point of the dataset.
    return preprocess.ImageTransform(size=None, train=train, augment=False,
                                     mean=config['mean'], std=config['std'],
                                     attributes=self.attributes)
