"""Datasets and input pipelines: a plain dict registry and three entry points.

```python
info = data.get_info(config.data)     # num_classes, image_shape, splits, attributes, ...
it = data.make_train_iterator(config.data, global_batch_size=..., seed=..., start_step=...)
for batch in data.make_eval_iterator(config.data, 'test', global_batch_size=...): ...
```
Batches are dicts of NumPy arrays: `image` uint8 `[b, H, W, C]` (not normalized: the jitted
step normalizes it on the device with `data.normalization(config.data)`, see
`data/device_normalization.py`), `label` int32 `[b]`, attribute arrays int32 `[b]`
(`info.attributes`), and, in eval batches, `mask` float32 `[b]` (1 real, 0 padding).
`b = global_batch_size / process_count`.

`DATASETS` (`data/registry.py`) maps each config name to a `base.DatasetSpec`; `'dominoes'` is
the no-setup default. Importing this package imports neither TensorFlow nor TFDS; TFDS-backed
datasets import `tensorflow_datasets` when first opened. Nor does it import jax or grain (about
3 s): config files (through `config_lib`), `data.prepare` and the reports import this package,
and the pipeline and the on-device mixing and normalization import them when they run. See
docs/data.md for every dataset, its options and how to prepare it (`python -m
vitreg_jax.data.prepare NAME`).

Every split (`train_split`, eval splits) may be sliced in TFDS's syntax, for every dataset:
`train[:6%]`, `train[:5000]`, `test[-10%:]` (`vitreg_jax.data.splits`). A dataset spec only
ever sees the unsliced split name; the slice is applied to its source here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from vitreg_jax.data import base
from vitreg_jax.data import device_normalization
from vitreg_jax.data import groups
from vitreg_jax.data import mixing
from vitreg_jax.data import pipeline
from vitreg_jax.data import splits as splits_lib
from vitreg_jax.data.base import (CorruptDataError, DatasetInfo, DatasetNotPreparedError,
                                  DatasetSpec)
from vitreg_jax.data.registry import DATASETS, get_spec
from vitreg_jax.metrics import (group_counts, group_metrics, group_metrics_from_counts,
                                mean_corruption_accuracy)


def get_info(data_config: Any) -> DatasetInfo:
  """Describes the dataset of `data_config`; fails if it is not prepared.

  Args:
    data_config: ConfigDict or dict (`name`, `train_split`, `eval_splits`, `data_dir`,
      `manual_dir`, pipeline options and the dataset's own options).
  Returns:
    `DatasetInfo` with `num_classes`, `image_shape` (H, W, C), `splits`, `attributes`,
    `num_examples` (split -> int where known), `default_eval_splits`, `attribute_classes`.
  Raises:
    ValueError: unknown dataset name, option or split.
    DatasetNotPreparedError: files of the train split or of an eval split are missing; the
      message says what to put where and which command prepares them.
    CorruptDataError: a data file exists but cannot be read (named in the message).
  """
  spec, cfg = get_spec(data_config)
  mixing.check_config(cfg['mixup'])
  train = splits_lib.parse(cfg['train_split'])
  info = spec.info(_unsliced(cfg))
  base.check_split(info, train.name)
  if train.sliced:
    n = info.num_examples.get(train.name)
    if n is None:
      n = len(spec.source(_unsliced(cfg), train.name))
    info = dataclasses.replace(
        info, num_examples={**info.num_examples, cfg['train_split']: train.size(n)})
  for split in eval_splits(data_config, info):
    # Open every split the run will evaluate, so missing files fail now, not hours later.
    _eval_source(spec, cfg, info, split)
  spec.transform(_unsliced(cfg), train.name, train=True)  # Bad augmentation options fail here.
  info = groups.with_group_attribute(info)
  if cfg['sampler'] != 'uniform':  # A dataset without groups, a missing error set: fail now.
    _train_order(spec, cfg, info, seed=0, global_batch=1)
  return info


def _train_order(spec, cfg: dict, info: DatasetInfo, *, seed: int, global_batch: int):
  """`config.data.sampler`'s order over the (sliced) train split (None: uniform)."""
  if cfg['sampler'] == 'uniform':
    return None
  source = splits_lib.apply(spec.source(_unsliced(cfg), splits_lib.base_name(
      cfg['train_split'])), cfg['train_split'])
  return groups.make_order(cfg, source, info, seed=seed, global_batch=global_batch)


def _unsliced(cfg: dict) -> dict:
  """The resolved config a dataset spec sees: `train_split` without its slice."""
  return {**cfg, 'train_split': splits_lib.base_name(cfg['train_split'])}


def _eval_source(spec, cfg: dict, info: DatasetInfo, split: str):
  """The (sliced) source `make_eval_iterator` reads for `split`; checks the split name."""
  name = splits_lib.base_name(split)
  base.check_split(info, name)
  return splits_lib.apply(spec.eval_source(_unsliced(cfg), name), split)


def eval_splits(data_config: Any, info: Optional[DatasetInfo] = None) -> tuple:
  """The splits to evaluate: `data_config.eval_splits` or the dataset's default."""
  spec, cfg = get_spec(data_config)
  if cfg['eval_splits'] is not None:
    splits = cfg['eval_splits']
    return (splits,) if isinstance(splits, str) else tuple(splits)
  return (info or spec.info(_unsliced(cfg))).default_eval_splits


def make_train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                        start_step: int = 0, process_index: Optional[int] = None,
                        process_count: Optional[int] = None):
  """Infinite iterator of this process's training batches (see `pipeline.train_iterator`).

  Args:
    data_config: as `get_info`; reads `config.train_split`.
    global_batch_size: examples per step over all processes; must divide by process_count.
    seed: data seed. Epoch e is a fresh permutation; augmentation is seeded per
      (seed, epoch, example index); the stream is a pure function of (seed, step).
    start_step: first step to yield; `start_step=k` equals skipping k batches.
    process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
  Returns:
    iterator of dicts `image`, `label`, attributes with leading dim
    `global_batch_size // process_count`.
  """
  spec, cfg = get_spec(data_config)
  split, unsliced = splits_lib.base_name(cfg['train_split']), _unsliced(cfg)
  info = groups.with_group_attribute(spec.info(unsliced))
  base.check_split(info, split)
  pi, pc = pipeline.default_process(process_index, process_count)
  pipeline.local_batch_size(global_batch_size, pc)
  source = splits_lib.apply(spec.source(unsliced, split), cfg['train_split'])
  return pipeline.train_iterator(
      source, groups.add_group(spec.transform(unsliced, split, train=True), info),
      global_batch_size=global_batch_size, seed=seed, start_step=start_step,
      process_index=pi, process_count=pc, num_threads=cfg['num_threads'],
      prefetch_batches=cfg['prefetch_batches'], num_workers=cfg['num_workers'],
      mix=mixing.check_config(cfg['mixup']),
      order=_train_order(spec, cfg, info, seed=seed, global_batch=global_batch_size))


def make_eval_iterator(data_config: Any, split: str, *, global_batch_size: int,
                       process_index: Optional[int] = None,
                       process_count: Optional[int] = None):
  """Finite iterator over `split`: every example exactly once across processes.

  Every process yields `ceil(n / global_batch_size)` batches of
  `global_batch_size // process_count` examples; past the end, batches are padded with
  `mask = 0` (real examples have `mask = 1`). Eval preprocessing is deterministic.
  """
  spec, cfg = get_spec(data_config)
  info = groups.with_group_attribute(spec.info(_unsliced(cfg)))
  source = _eval_source(spec, cfg, info, split)
  pi, pc = pipeline.default_process(process_index, process_count)
  transform = spec.transform(_unsliced(cfg), splits_lib.base_name(split), train=False)
  return pipeline.eval_iterator(
      source, groups.add_group(transform, info),
      global_batch_size=global_batch_size, process_index=pi, process_count=pc,
      num_threads=cfg['num_threads'], prefetch_batches=cfg['prefetch_batches'],
      num_workers=cfg['num_workers'])


def normalization(data_config: Any) -> device_normalization.Normalization:
  """How the dataset's uint8 batches are normalized (its `mean` / `std`), for the jitted steps."""
  spec, cfg = get_spec(data_config)
  unsliced = _unsliced(cfg)
  return device_normalization.of_transform(
      spec.transform(unsliced, splits_lib.base_name(cfg['train_split']), train=False))


def num_examples(data_config: Any, split: str) -> int:
  """Number of examples `make_eval_iterator` covers in `split` (opens the source)."""
  spec, cfg = get_spec(data_config)
  return len(_eval_source(spec, cfg, spec.info(_unsliced(cfg)), split))


__all__ = [
    'DATASETS', 'DatasetInfo', 'DatasetSpec', 'DatasetNotPreparedError', 'CorruptDataError',
    'get_info', 'get_spec', 'eval_splits', 'make_train_iterator', 'make_eval_iterator',
    'normalization', 'num_examples', 'group_counts', 'group_metrics', 'group_metrics_from_counts',
    'mean_corruption_accuracy',
]
