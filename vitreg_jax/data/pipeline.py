"""Sharded, deterministic, resumable input pipelines on grain `MapDataset`s.

Why grain over random-access sources: the order of examples is a pure function of
(seed, position), so resuming at `start_step` needs only the step number from the checkpoint
(no iterator state), every process reads only the examples of its own slice, and nothing
imports TensorFlow at train time. Throughput is measured by `bench/data.py` (see
README.md).

Train stream (infinite). With `n` examples and global batch `G`, global position
`p = step * G + j` (j < G) holds the example `perm_e(p mod n)` of epoch `e = p // n`, where
`perm_e` is a permutation seeded by (`seed`, `e`) (`Permutation`: a NumPy permutation table
for up to 2**24 examples, grain's O(1)-memory `index_shuffle` beyond): every epoch
is a fresh permutation and consecutive epochs run on without dropping examples (a global batch
may straddle two epochs). Process `i` of `P` takes the `L = G / P` consecutive positions
`step * G + i * L + [0, L)`, so the global batch does not depend on the number of processes and
the processes' slices are disjoint. Augmentation of an example draws from
`np.random.default_rng([seed, e, example_index])`.

Eval stream (finite). Positions `s * G + i * L + [0, L)` for `s < ceil(n / G)`; positions
`>= n` repeat example 0 with `mask = 0` so every process yields the same number of equally
shaped batches (needed for multi-host `jit`) and every real example appears exactly once.
"""

from __future__ import annotations

import math
import sys
from typing import Optional, Sequence

from absl import flags
import numpy as np

from vitreg_jax import errors
from vitreg_jax.data import mixing
from vitreg_jax.data.base import Example, Transform


def default_process(process_index: Optional[int], process_count: Optional[int]) -> tuple:
  """Fills in `jax.process_index()` / `jax.process_count()` where not given; validates."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}.')
  return int(process_index), int(process_count)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """`global_batch_size / process_count`, or a ValueError saying how to fix it."""
  if global_batch_size <= 0:
    raise errors.UserError(f'global_batch_size must be positive, got {global_batch_size}.')
  if global_batch_size % process_count:
    raise errors.UserError(
        f'global_batch_size={global_batch_size} must be divisible by the number of processes '
        f'({process_count}); use a multiple of {process_count}.')
  return global_batch_size // process_count


class Permutation:
  """Global position p -> `epoch * n + perm_epoch(p mod n)` (the example's pre-shuffle index).

  The default `order` of `train_iterator` (the 'uniform' sampler): a pure function of
  (`seed`, position), a fresh bijection of the `n` examples per epoch.

  Up to `MAX_TABLE` examples the permutation is a NumPy table per epoch (generated on first
  use, ~30 ms per million examples, the last two epochs kept): grain's `index_shuffle`
  cycle-walks and costs milliseconds per lookup on small datasets (8 ms at n = 16, 0.1 ms
  at n = 1000; measured). Beyond, `index_shuffle` (about 8 us, no memory) is used, seeded
  by a hash of (seed, epoch) so that adjacent seeds do not share epochs.
  """
  MAX_TABLE = 2**24

  def __init__(self, n: int, seed: int):
    self._n, self._seed, self._tables = int(n), int(seed), {}

  def _table(self, epoch: int) -> np.ndarray:
    table = self._tables.get(epoch)
    if table is None:
      table = np.random.default_rng([self._seed, epoch, 0x5EED]).permutation(self._n)
      self._tables = {e: t for e, t in self._tables.items() if e == epoch - 1}
      self._tables[epoch] = table
    return table

  def __call__(self, position: int) -> int:
    epoch, i = divmod(int(position), self._n)
    if self._n <= self.MAX_TABLE:
      return epoch * self._n + int(self._table(epoch)[i])
    import grain  # pylint: disable=g-import-not-at-top
    seed = int(np.random.SeedSequence([self._seed, epoch, 0x5EED]).generate_state(1)[0])
    return epoch * self._n + int(grain.experimental.index_shuffle(
        i, max_index=self._n - 1, seed=seed, rounds=4))

  def __getstate__(self):  # workers rebuild their own tables
    return {'_n': self._n, '_seed': self._seed, '_tables': {}}


def stack(examples: Sequence[dict]) -> dict:
  """List of example dicts -> dict of batched arrays."""
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


class _Augment:
  """map_with_index fn: index = epoch * n + example_index (index before shuffling)."""

  def __init__(self, transform: Transform, seed: int, n: int):
    self._transform, self._seed, self._n = transform, int(seed), n

  def __call__(self, index: int, example: Example) -> dict:
    epoch, example_index = divmod(int(index), self._n)
    rng = np.random.default_rng([self._seed, epoch, example_index])
    return self._transform(example, rng)


class _TrainBatch:
  """Step -> this process's slice of the global batch of that step."""

  def __init__(self, examples, permutation: Permutation, global_batch: int, local_batch: int,
               process_index: int, mix: Optional[dict] = None, seed: int = 0):
    self._examples, self._permutation = examples, permutation
    self._global, self._local, self._pi = global_batch, local_batch, process_index
    self._mix, self._seed = mix, seed

  def __call__(self, step: int) -> dict:
    first = int(step) * self._global + self._pi * self._local
    batch = stack([self._examples[self._permutation(p)]
                   for p in range(first, first + self._local)])
    if self._mix:  # The batch's Mixup/CutMix recipe, on every example (see data/mixing.py).
      recipe = mixing.draw(self._mix, self._seed, step, *batch['image'].shape[1:3])
      batch.update({k: np.broadcast_to(v, (self._local, *np.shape(v))).copy()
                    for k, v in recipe.items()})
    return batch


class _EvalBatch:
  """Batch index -> this process's slice, padded past the end with example 0 and mask 0."""

  def __init__(self, source, transform: Transform, global_batch: int, local_batch: int,
               process_index: int):
    self._source, self._transform = source, transform
    self._global, self._local, self._pi = global_batch, local_batch, process_index
    self._n = len(source)

  def __call__(self, batch_index: int) -> dict:
    first = int(batch_index) * self._global + self._pi * self._local
    examples = []
    for p in range(first, first + self._local):
      real = p < self._n
      ex = dict(self._transform(self._source[p if real else 0], None))
      ex['mask'] = np.float32(1.0 if real else 0.0)
      examples.append(ex)
    return stack(examples)


def _to_iterator(batches, num_threads: int, prefetch_batches: int, num_workers: int):
  import grain  # pylint: disable=g-import-not-at-top
  ds = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(prefetch_batches, num_threads)))
  if num_workers:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    # Worker w builds batches w, w + W, ...; grain interleaves them back in order.
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def train_iterator(source: Sequence[Example], transform: Transform, *, global_batch_size: int,
                   seed: int, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1, num_threads: int = 4, prefetch_batches: int = 4,
                   num_workers: int = 0, mix: Optional[dict] = None, order=None):
  """Infinite iterator of this process's training batches from step `start_step` on.

  Args:
    source: random-access raw examples (`len`, `[i]`).
    transform: `fn(example, rng) -> dict` producing `image`, `label`, attributes.
    global_batch_size: examples per step over all processes.
    seed: data seed; the stream is a pure function of (seed, step).
    start_step: the first step yielded (resume: the restored step).
    process_index, process_count: this process and the number of processes.
    num_threads, prefetch_batches, num_workers: grain parallelism (threads building whole
      batches, batches buffered, optional worker processes).
    mix: Mixup/CutMix options (`data/mixing.py`); each batch then carries its recipe
      (`mix_lam`, `mix_box`, `mix_cutmix`), drawn from (seed, step), applied on the device.
    order: `position -> epoch * n + example` replacing the per-epoch permutation (the
      group-balanced and upsampling samplers of `data/groups.py`); must be a pure function
      of the position so the stream stays a function of (seed, step).
  Returns:
    a grain `DatasetIterator` of dicts of NumPy arrays with leading dimension
    `global_batch_size // process_count`.
  """
  import grain  # pylint: disable=g-import-not-at-top
  local = local_batch_size(global_batch_size, process_count)
  n = len(source)
  if n == 0:
    raise ValueError('Cannot train on an empty split.')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  # Index epoch * n + i of `examples` is example i augmented with the rng of epoch `epoch`.
  examples = grain.MapDataset.source(source).map_with_index(_Augment(transform, seed, n))
  max_step = (sys.maxsize - global_batch_size) // global_batch_size
  steps = grain.MapDataset.range(int(start_step), max_step)
  order = Permutation(n, seed) if order is None else order
  batches = steps.map(_TrainBatch(examples, order, global_batch_size, local,
                                  process_index, mix=mix, seed=seed))
  return _to_iterator(batches, num_threads, prefetch_batches, num_workers)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """`ceil(num_examples / global_batch_size)`: batches every process yields."""
  return math.ceil(num_examples / global_batch_size)


def eval_iterator(source: Sequence[Example], transform: Transform, *, global_batch_size: int,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 4,
                  prefetch_batches: int = 4, num_workers: int = 0):
  """Finite iterator of this process's eval batches, each with a float32 `mask`.

  Args: as `train_iterator` (no seed: evaluation is deterministic and unshuffled).
  Returns:
    an iterator of `num_eval_batches(len(source), global_batch_size)` batches, identical in
    count and shape on every process; real examples have mask 1, padding mask 0.
  """
  import grain  # pylint: disable=g-import-not-at-top
  local = local_batch_size(global_batch_size, process_count)
  n = len(source)
  if n == 0:
    raise ValueError('Cannot evaluate on an empty split.')
  batches = grain.MapDataset.range(num_eval_batches(n, global_batch_size)).map(
      _EvalBatch(source, transform, global_batch_size, local, process_index))
  return _to_iterator(batches, num_threads, prefetch_batches, num_workers)
