"""Groups (label x spurious attribute) and the training samplers that use them.

A *group* is a (label, spurious attribute) pair, as in the spurious-correlation literature
(Sagawa et al. 2020, "Distributionally Robust Neural Networks", Sec. 3): Waterbirds stores it
(`group = 2 * y + place`), MNIST-CIFAR too. A dataset that has a `spurious` attribute but no
`group` (the embedded `dominoes`, `npz` files with a `spurious` array) gets a derived one,
`group = label * S + spurious` with `S` the number of spurious values, in its `info` and in
every batch, so group metrics, group-balanced sampling and GroupDRO work on it unchanged.

Training order (`config.data.sampler`), each a pure function of (seed, global position), so a
resumed run sees exactly the stream of an uninterrupted one:

- `'uniform'` (default): a fresh permutation of the split per epoch (`pipeline.Permutation`).
- `'group_balanced'`: every position draws a group uniformly among the groups present in the
  split, then an example uniformly within it (with replacement). This is the sampling of the
  GroupDRO authors' `--reweight_groups` (kohpangwei/group_DRO, `data/dro_dataset.py`,
  `get_loader`: a `WeightedRandomSampler` with weight `1 / n_g` per example, i.e. each group
  drawn with probability `1 / #groups`). The draw of global step `s` comes from
  `default_rng([seed, s, TAG])`, identical on every process; each process takes its slice.
- `'upsample'`: JTT's upsampled training set (Liu et al. 2021, "Just Train Twice", Sec. 3):
  the examples listed in `data.upsample['file']` (JSON with an `indices` list into the train
  split, as `vitreg_jax.baselines.jtt` writes it) appear more often per epoch, every other
  example once; each epoch is a fresh permutation of that list. How often, from
  `data.upsample['factor']` (lambda_up) and `data.upsample['copies']`:
  `'authors'` (default): `factor + 1` times, as the authors' code builds it (anniesch/jtt,
  `run_expt.py`, `main`: `ConcatDataset([train_data, Subset(train_data, aug_indices *
  up_weight)])`, the original plus `up_weight` copies), so `factor` is the lambda_up of
  their commands and of Liu et al.'s App. B; `'lambda'`: `factor` times (the paper's
  Algorithm 1 as written, the error set lambda_up times and every other example once, and
  this package's meaning before; `factor=6` there equals `factor=5` here). The authors'
  count is the default because configs/baselines.py uses their published lambda_up.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

from etils import epath
import numpy as np

from vitreg_jax import errors

SAMPLERS = ('uniform', 'group_balanced', 'upsample')
UPSAMPLE_COPIES = ('authors', 'lambda')  # data.upsample['copies'] (module docstring)
UPSAMPLE_KEYS = ('file', 'factor', 'copies', 'step')
_BALANCED_TAG = 0x6B41  # separates the balanced draws from the permutations' streams
_UPSAMPLE_TAG = 0x7A77


def derived_spurious_classes(info) -> Optional[int]:
  """Number of spurious values when `group` is derived from (label, spurious), else None."""
  if 'group' in info.attributes or 'spurious' not in info.attributes:
    return None
  return int(info.attribute_classes.get('spurious', info.num_classes))


def with_group_attribute(info):
  """`info` with a derived `group` attribute (label x spurious) where it has none."""
  s = derived_spurious_classes(info)
  if s is None:
    return info
  return dataclasses.replace(
      info, attributes=(*info.attributes, 'group'),
      attribute_classes={**info.attribute_classes, 'group': info.num_classes * s})


def num_groups(info) -> Optional[int]:
  """Number of groups of a dataset with a (stored or derived) group attribute, else None."""
  info = with_group_attribute(info)
  if 'group' not in info.attributes:
    return None
  return int(info.attribute_classes.get('group', 4))


class WithGroup:
  """Wraps a transform: adds `group = label * S + spurious` to every example."""

  def __init__(self, transform, spurious_classes: int):
    self.transform, self.spurious_classes = transform, int(spurious_classes)

  def __getattr__(self, name):  # `mean`, `std`, ... of the wrapped transform.
    return getattr(self.transform, name)

  def __call__(self, example, rng=None) -> dict:
    out = self.transform(example, rng)
    if 'group' not in out:
      out['group'] = np.int32(out['label'] * self.spurious_classes + out['spurious'])
    return out


def add_group(transform, info):
  """The transform with a derived `group` where the dataset stores none (else unchanged).

  `info` may already list the derived `group` (`with_group_attribute`)."""
  if 'spurious' not in info.attributes:
    return transform
  return WithGroup(transform, int(info.attribute_classes.get('spurious', info.num_classes)))


def group_ids(source: Sequence, info) -> np.ndarray:
  """Group id of every example of `source` (raw examples; images are not decoded).

  Raises:
    errors.UserError: for a dataset without a group attribute, naming what it needs.
  """
  if 'group' not in info.attributes and 'spurious' not in info.attributes:
    raise errors.UserError(
        f"data.sampler='group_balanced' needs a dataset with groups; {info.name!r} has "
        f"attributes {list(info.attributes)}. Groups come from a `group` attribute "
        "(Waterbirds, MNIST-CIFAR) or from a `spurious` one (dominoes, an npz `spurious` "
        "array): group = label * #spurious + spurious.")
  s = int(info.attribute_classes.get('spurious', info.num_classes))
  rows = [source[i] for i in range(len(source))]
  return np.array([int(r['group']) if 'group' in r else int(r['label']) * s + int(r['spurious'])
                   for r in rows], np.int64)


class GroupBalancedOrder:
  """Global position -> augmentation index `p * n + example` (see the module docstring)."""

  def __init__(self, groups: np.ndarray, seed: int, global_batch: int):
    self._n, self._seed, self._global = len(groups), int(seed), int(global_batch)
    self._members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    self._cache = (None, None)

  def draw(self, step: int) -> np.ndarray:
    """The examples of global step `step` (all processes draw the same)."""
    if self._cache[0] != step:
      rng = np.random.default_rng([self._seed, int(step), _BALANCED_TAG])
      which = rng.integers(0, len(self._members), size=self._global)
      sizes = np.array([len(m) for m in self._members])
      within = np.floor(rng.random(self._global) * sizes[which]).astype(np.int64)
      self._cache = (step, np.array([self._members[g][i] for g, i in zip(which, within)]))
    return self._cache[1]

  def __call__(self, position: int) -> int:
    step, j = divmod(int(position), self._global)
    return int(position) * self._n + int(self.draw(step)[j])


class UpsampleOrder:
  """JTT's upsampled epochs: each of `indices` `repeats` times per epoch, every other example
  once; position -> `(epoch * repeats + copy) * n + example` (each copy its own augmentation
  index)."""

  def __init__(self, n: int, indices: Sequence[int], repeats: int, seed: int):
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise errors.UserError(f'Upsampled indices must lie in [0, {n}) (the train split), got '
                       f'{indices.min()}..{indices.max()}.')
    repeats = int(repeats)
    if repeats < 1:
      raise errors.UserError(f'Each upsampled example must appear at least once, got {repeats}.')
    extra = np.repeat(indices, repeats - 1)
    copies = np.concatenate([np.arange(1, repeats)] * len(indices)) if len(indices) else []
    self._table = np.concatenate([np.arange(n), extra]).astype(np.int64)
    self._copy = np.concatenate([np.zeros(n, np.int64), np.asarray(copies, np.int64)])
    self._n, self._repeats, self._seed, self._perms = n, repeats, int(seed), {}

  def __len__(self) -> int:
    return len(self._table)

  def __call__(self, position: int) -> int:
    epoch, k = divmod(int(position), len(self._table))
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch, _UPSAMPLE_TAG]).permutation(
          len(self._table))
      self._perms = {epoch: perm}
    k = perm[k]
    return (epoch * self._repeats + int(self._copy[k])) * self._n + int(self._table[k])


def upsample_repeats(upsample) -> int:
  """How many times each listed example appears per epoch under `data.upsample` (`factor`
  and `copies`, module docstring).

  Raises:
    errors.UserError: an unknown key or `copies`, or a `factor` below 1.
  """
  unknown = sorted(set(dict(upsample)) - set(UPSAMPLE_KEYS))
  if unknown:
    raise errors.UserError(
        f'Unknown data.upsample key(s) {unknown}; valid: {list(UPSAMPLE_KEYS)}.')
  copies = upsample.get('copies') or 'authors'
  if copies not in UPSAMPLE_COPIES:
    raise errors.UserError(f"Unknown data.upsample['copies'] {copies!r}; valid: "
                           f"{list(UPSAMPLE_COPIES)} ('authors': factor + 1 appearances).")
  factor = upsample.get('factor')
  factor = 1 if factor is None else int(factor)
  if factor < 1:
    raise errors.UserError(f"data.upsample['factor'] (lambda_up) must be >= 1, got {factor}.")
  return factor + 1 if copies == 'authors' else factor


def read_upsample(upsample) -> tuple[list, int]:
  """`(indices, repeats)` of `data.upsample` = dict(file=JSON with `indices`, factor=L,
  copies='authors' | 'lambda'): `repeats` from `upsample_repeats`."""
  if not upsample or not upsample.get('file'):
    raise errors.UserError(
        "data.sampler='upsample' needs data.upsample=dict(file=PATH, factor=L): PATH a JSON "
        "with an `indices` list (`python -m vitreg_jax.jtt` writes it as "
        "WORKDIR/jtt_error_set.json).")
  repeats = upsample_repeats(upsample)
  path = epath.Path(upsample['file'])
  if not path.exists():
    raise errors.PathNotFoundError(
        f'{path} not found: write the error set of the identification run '
        'with `python -m vitreg_jax.jtt --workdir=RUN`.')
  return list(json.loads(path.read_text())['indices']), repeats


def make_order(cfg: dict, source: Sequence, info, *, seed: int, global_batch: int):
  """The training order `position -> index` for `cfg['sampler']`, or None for uniform.

  Raises:
    errors.UserError: an unknown sampler, a dataset without groups, a bad `data.upsample`.
  """
  sampler = cfg.get('sampler') or 'uniform'
  if sampler not in SAMPLERS:
    raise errors.UserError(
        f'Unknown data.sampler {sampler!r}; valid samplers: {list(SAMPLERS)}.')
  if sampler == 'group_balanced':
    return GroupBalancedOrder(group_ids(source, info), seed, global_batch)
  if sampler == 'upsample':
    indices, repeats = read_upsample(cfg.get('upsample'))
    return UpsampleOrder(len(source), indices, repeats, seed)
  return None
