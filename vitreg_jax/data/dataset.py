"""The dataset object: `ds = data.open(config.data)`, the one place a data config is resolved.

```python
ds = data.open(config.data)    # resolves and checks the config; missing files fail here
ds.info                        # num_classes, image_shape, splits, attributes, num_examples, ...
ds.eval_splits                 # what training evaluates: config.data.eval_splits or the default
ds.held_out_splits             # every split but the training one (head selection, DFR)
it = ds.train_iterator(global_batch_size=256, seed=0, start_step=step)
for batch in ds.eval_iterator('val_id', global_batch_size=256): ...   # padded, with `mask`
ds.normalization               # the uint8 -> model input map the jitted steps apply
ds.group_counts()              # examples per group of the train split
out = ds.read_split('val_id', batch_size=256, predict=fn)   # real examples, with fn's outputs
ds.metrics(out['pred'], out['loss'], out)                   # `metrics.classification_metrics`
```

`read_split` is the one reading of a split for evaluation: training's evaluation, the head
evaluator's image pool, the features of JTT and DFR all call it (the analyses stream the same
batches with `stream_split`). It runs `predict` on the padded eval batches (equal shapes on
every process, as `jit` needs), reads the outputs back once after the loop, and drops the
padding; `metrics` then scores them with the train split's group proportions.

Nothing here imports jax, grain or TensorFlow: the pipeline imports grain when an iterator is
made, TFDS-backed specs import TFDS when a source is opened, and `predict` / `gather` are the
caller's (jitted) functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional

import numpy as np

from vitreg_jax import metrics as metrics_lib
from vitreg_jax.data import base
from vitreg_jax.data import device_normalization
from vitreg_jax.data import groups
from vitreg_jax.data import mixing
from vitreg_jax.data import pipeline
from vitreg_jax.data import registry
from vitreg_jax.data import splits as splits_lib


def open(data_config: Any) -> 'Dataset':  # pylint: disable=redefined-builtin
  """Opens the dataset of `data_config` (a `Dataset` is returned as it is).

  Args:
    data_config: ConfigDict or dict (`name`, `train_split`, `eval_splits`, `data_dir`,
      `manual_dir`, pipeline options and the dataset's own options).
  Raises:
    errors.UserError: unknown dataset name, option or split (the message lists the valid ones).
    DatasetNotPreparedError: files of the train split or of an eval split are missing; the
      message says what to put where and which command prepares them.
    CorruptDataError: a data file exists but cannot be read (named in the message).
  """
  if isinstance(data_config, Dataset):
    return data_config
  spec, cfg = registry.get_spec(data_config)
  return Dataset(spec, cfg)


class Dataset:
  """One dataset, opened and checked: its resolved config, spec, info, splits and streams.

  Attributes:
    spec: the registered `base.DatasetSpec`.
    config: the resolved config dict (every common and dataset option; `train_split` as
      given, possibly sliced).
    info: `base.DatasetInfo` (with the derived `group` attribute where the dataset has a
      `spurious` one; `num_examples` holds the sliced train split's size).
    train_split: the training split, as configured (e.g. 'train[:6%]').
    eval_splits: the splits training evaluates: `config.eval_splits`, else the dataset's
      `default_eval_splits`.
    held_out_splits: every split of the dataset but the training one (the ID and OOD,
      validation and test splits that head selection and DFR read).
  """

  def __init__(self, spec: base.DatasetSpec, config: dict):
    self.spec, self.config = spec, config
    self.name, self.train_split = config['name'], config['train_split']
    self._spec_config = {**config, 'train_split': splits_lib.base_name(self.train_split)}
    self.info = self._checked_info()

  def __repr__(self) -> str:
    return f'Dataset({self.name!r}, train_split={self.train_split!r})'

  def _checked_info(self) -> base.DatasetInfo:
    """The info, after every check a run needs before compute (`open`'s docstring)."""
    cfg = self.config
    mixing.check_config(cfg['mixup'])
    train = splits_lib.parse(self.train_split)
    info = self.spec.info(self._spec_config)
    base.check_split(info, train.name)
    if train.sliced:
      n = info.num_examples.get(train.name)
      if n is None:
        n = len(self.spec.source(self._spec_config, train.name))
      info = dataclasses.replace(
          info, num_examples={**info.num_examples, self.train_split: train.size(n)})
    self.eval_splits = _configured(cfg['eval_splits'], info.default_eval_splits)
    for split in self.eval_splits:
      # Open every split the run will evaluate, so missing files fail now, not hours later.
      self._eval_source(split, info)
    self.spec.transform(self._spec_config, train.name, train=True)  # Bad augmentation options.
    info = groups.with_group_attribute(info)
    self.held_out_splits = tuple(s for s in info.splits if s != train.name)
    if cfg['sampler'] != 'uniform':  # A dataset without groups, a missing error set: fail now.
      self._train_order(info, seed=0, global_batch=1)
    return info

  def _source(self, split: str):
    """The (sliced) training-view source of `split` (`spec.source`)."""
    return splits_lib.apply(
        self.spec.source(self._spec_config, splits_lib.base_name(split)), split)

  def _train_order(self, info, *, seed: int, global_batch: int):
    """`config.sampler`'s order over the (sliced) train split (None: uniform)."""
    if self.config['sampler'] == 'uniform':
      return None
    return groups.make_order(self.config, self._source(self.train_split), info, seed=seed,
                             global_batch=global_batch)

  def _eval_source(self, split: str, info: Optional[base.DatasetInfo] = None):
    """The (sliced) source `eval_iterator` reads for `split`; checks the split name."""
    name = splits_lib.base_name(split)
    base.check_split(info or self.info, name)
    return splits_lib.apply(self.spec.eval_source(self._spec_config, name), split)

  def num_examples(self, split: str) -> int:
    """Number of examples `eval_iterator` covers in `split` (opens the source)."""
    return len(self._eval_source(split))

  def train_iterator(self, *, global_batch_size: int, seed: int, start_step: int = 0,
                     process_index: Optional[int] = None, process_count: Optional[int] = None):
    """Infinite iterator of this process's training batches (`pipeline.train_iterator`).

    Args:
      global_batch_size: examples per step over all processes; must divide by process_count.
      seed: data seed. Epoch e is a fresh permutation; augmentation is seeded per
        (seed, epoch, example index); the stream is a pure function of (seed, step).
      start_step: first step to yield; `start_step=k` equals skipping k batches.
      process_index, process_count: default `jax.process_index()`, `jax.process_count()`.
    Returns:
      iterator of dicts `image`, `label`, attributes (and the Mixup/CutMix recipe with
      `mixup`) with leading dim `global_batch_size // process_count`.
    """
    split = splits_lib.base_name(self.train_split)
    pi, pc = pipeline.default_process(process_index, process_count)
    pipeline.local_batch_size(global_batch_size, pc)
    transform = self.spec.transform(self._spec_config, split, train=True)
    cfg = self.config
    return pipeline.train_iterator(
        self._source(self.train_split), groups.add_group(transform, self.info),
        global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=pi, process_count=pc, num_threads=cfg['num_threads'],
        prefetch_batches=cfg['prefetch_batches'], num_workers=cfg['num_workers'],
        mix=mixing.check_config(cfg['mixup']),
        order=self._train_order(self.info, seed=seed, global_batch=global_batch_size))

  def eval_iterator(self, split: str, *, global_batch_size: int,
                    process_index: Optional[int] = None, process_count: Optional[int] = None):
    """Finite iterator over `split`: every example exactly once across processes.

    Every process yields `ceil(n / global_batch_size)` batches of
    `global_batch_size // process_count` examples; past the end, batches are padded with
    `mask = 0` (real examples have `mask = 1`). Eval preprocessing is deterministic.
    """
    source = self._eval_source(split)
    pi, pc = pipeline.default_process(process_index, process_count)
    transform = self.spec.transform(self._spec_config, splits_lib.base_name(split), train=False)
    cfg = self.config
    return pipeline.eval_iterator(
        source, groups.add_group(transform, self.info),
        global_batch_size=global_batch_size, process_index=pi, process_count=pc,
        num_threads=cfg['num_threads'], prefetch_batches=cfg['prefetch_batches'],
        num_workers=cfg['num_workers'])

  @functools.cached_property
  def normalization(self) -> device_normalization.Normalization:
    """How the uint8 batches are normalized (the dataset's `mean` / `std`), for the steps."""
    return device_normalization.of_transform(self.spec.transform(
        self._spec_config, splits_lib.base_name(self.train_split), train=False))

  def group_counts(self, split: Optional[str] = None) -> np.ndarray:
    """Examples per group in `split` (default: the train split), `[num_groups]` float64.

    Raises:
      errors.UserError: for a dataset without a group attribute, naming what it needs.
    """
    ids = groups.group_ids(self._source(split or self.train_split), self.info)
    return np.bincount(ids, minlength=groups.num_groups(self.info)).astype(np.float64)

  @functools.cached_property
  def train_group_counts(self) -> Optional[tuple]:
    """Training examples per group, or None without groups: the proportions behind
    `train_weighted_mean_accuracy` (vitreg_jax/metrics.py). Read once per object."""
    if groups.num_groups(self.info) is None:
      return None
    return tuple(self.group_counts().tolist())

  def read_split(self, split: str, *, batch_size: int, predict: Optional[Callable] = None,
                 gather: Optional[Callable] = None, images: bool = False,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> dict:
    """Every real example of `split` once, with `predict`'s per-example outputs.

    Args:
      split: a split of the dataset (sliced names allowed).
      batch_size: the global eval batch size.
      predict: `fn(batch) -> {name: [b] array}` called on every padded batch (this process's
        part; the outputs may be device arrays over all processes' examples). They are read
        back once, after the loop, so a device evaluation does not sync per batch.
      gather: `fn(tree) -> tree` turning this process's host arrays (and the list of `predict`
        outputs) into all processes' (`process_allgather(tiled=True)` in multi-host
        training); default: one process, nothing to gather.
      images: keep `image` in the result (the head evaluator's pool).
      process_index, process_count: as `eval_iterator`.
    Returns:
      `{label, mask, <attributes>, [image], <predict's outputs>}`, `[n]` arrays over the real
      examples (padding dropped, so `mask` is all ones), in the split's order.
    """
    gather = gather or (lambda tree: tree)
    host, outputs = {}, []
    for batch in self.eval_iterator(split, global_batch_size=batch_size,
                                    process_index=process_index, process_count=process_count):
      if predict is not None:
        outputs.append(predict(batch))
      kept = gather({k: np.asarray(v) for k, v in batch.items() if images or k != 'image'})
      for k, v in kept.items():
        host.setdefault(k, []).append(np.asarray(v))
    arrays = {k: np.concatenate(v) for k, v in host.items()}
    if outputs:
      outputs = gather(outputs)
      arrays.update({k: np.concatenate([np.asarray(o[k]) for o in outputs])
                     for k in outputs[0]})
    real = _real(arrays.get('mask', np.zeros(0)))
    if not real.any():
      raise ValueError(f'Eval split {split!r} of dataset {self.name!r} is empty.')
    return {k: v[real] for k, v in arrays.items()}

  def stream_split(self, split: str, *, batch_size: int,
                   max_examples: Optional[int] = None) -> Iterator[dict]:
    """`read_split` one batch at a time, for host-side consumers (the analyses): this
    process's eval batches of `split` with the padding dropped, at most `max_examples`."""
    seen = 0
    for batch in self.eval_iterator(split, global_batch_size=batch_size, process_index=0,
                                    process_count=1):
      keep = _real(batch['mask'])
      if max_examples is not None:
        keep &= np.cumsum(keep) + seen <= max_examples
      if keep.any():
        seen += int(keep.sum())
        yield {k: v[keep] for k, v in batch.items()}
      if max_examples is not None and seen >= max_examples:
        return

  def metrics(self, pred, loss, arrays, confidence=None) -> dict:
    """`metrics.classification_metrics` of a split, given the train split's group counts
    where the split has groups (for `train_weighted_mean_accuracy`)."""
    counts = self.train_group_counts if 'group' in arrays else None
    return metrics_lib.classification_metrics(pred, loss, arrays, confidence=confidence,
                                              train_group_counts=counts)


def _configured(splits, default: tuple) -> tuple:
  """`config.eval_splits` as a tuple (one name or several), or `default` when None."""
  if splits is None:
    return tuple(default)
  return (splits,) if isinstance(splits, str) else tuple(splits)


def _real(mask) -> np.ndarray:
  """The real examples of a padded eval batch (`mask` 1; padding has 0)."""
  return np.asarray(mask) > 0
