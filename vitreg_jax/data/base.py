"""Shared pieces of every dataset: the info record, the spec interface, config checks.

A dataset is registered in `vitreg_jax.data.DATASETS` as a `DatasetSpec`. A spec knows its
own options (with defaults), describes itself (`info`), opens a random-access source of raw
examples per split (`source`) and makes the per-example transform (`transform`) that turns a
raw example into the batch format of docs/design.md (`image` uint8, normalized later on the
device with the transform's `mean` / `std`, `label` int32, attributes int32).
`vitreg_jax.data.pipeline` turns a source and a transform into sharded, deterministic grain
iterators.

Nothing here imports TensorFlow or TFDS; TFDS-backed specs import it inside their methods.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from vitreg_jax import errors

# Keys every data config may hold, with their defaults. The dataset's own options come on top.
COMMON_OPTIONS = {
    'name': 'dominoes',
    'train_split': 'train',
    'eval_splits': None,      # None: the dataset's default evaluation splits.
    'data_dir': None,         # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    'manual_dir': None,       # Manually downloaded files; None: <data_dir>/downloads/manual.
    'num_threads': 4,         # grain reader threads per process.
    'prefetch_batches': 4,    # batches buffered ahead of the training loop.
    'num_workers': 0,         # >0: grain worker processes (mp_prefetch) for heavy decoding.
    'mixup': None,            # Mixup/CutMix options (data/mixing.py), applied in the train step.
    'sampler': 'uniform',     # training order: 'uniform' | 'group_balanced' | 'upsample' (groups.py)
    'upsample': None,         # sampler='upsample': dict(file=, factor=, copies=) (groups.py)
}

Example = Mapping[str, Any]
Transform = Callable[[Example, Optional[np.random.Generator]], dict]


class DatasetNotPreparedError(errors.UserError):
  """A dataset's files are missing; the message says which files go where and what to run."""


class CorruptDataError(errors.UserError):
  """A data file exists but cannot be read; the message names the file."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset before it sees a batch.

  Attributes:
    name: registry name.
    num_classes: number of values of `label`.
    image_shape: (H, W, C) of `batch['image']` after preprocessing.
    splits: every split name `Dataset.eval_iterator` / `train_split` accept.
    attributes: names of the extra int32 labels in each batch (e.g. 'spurious', 'group').
    num_examples: split -> number of examples, where known without reading the data.
    default_eval_splits: the splits evaluated when the config does not say.
    attribute_classes: attribute -> number of values (for per-attribute metrics).
  """
  name: str
  num_classes: int
  image_shape: tuple
  splits: tuple
  attributes: tuple = ()
  num_examples: dict = dataclasses.field(default_factory=dict)
  default_eval_splits: tuple = ()
  attribute_classes: dict = dataclasses.field(default_factory=dict)


class DatasetSpec:
  """Interface of a registered dataset. Subclasses set `options` and implement the methods.

  `options` maps each dataset-specific config key to its default value; config keys outside
  `COMMON_OPTIONS | options` are rejected.
  """
  options: dict = {}
  description: str = ''
  # True where `prepare` downloads everything itself (TFDS), so `main --prepare_data` can.
  downloads: bool = False

  def info(self, config: dict) -> DatasetInfo:
    raise NotImplementedError

  def source(self, config: dict, split: str) -> Sequence[Example]:
    """Random-access sequence (`len`, `[i]`) of raw examples of `split`."""
    raise NotImplementedError

  def eval_source(self, config: dict, split: str) -> Sequence[Example]:
    """The source evaluation iterates over (default: `source`)."""
    return self.source(config, split)

  def transform(self, config: dict, split: str, train: bool) -> Transform:
    """`fn(example, rng) -> dict` of NumPy arrays; `rng` is None for evaluation."""
    raise NotImplementedError

  def prepare(self, config: dict) -> None:
    """Builds the dataset's files (TFDS builders); a no-op for datasets read in place."""
    del config


def resolve_config(spec: DatasetSpec, data_config: Any) -> dict:
  """Returns the plain-dict config with defaults filled in; rejects unknown keys.

  Args:
    spec: the registered dataset.
    data_config: ml_collections ConfigDict or dict.
  Returns:
    dict with every common and dataset-specific key.
  Raises:
    errors.UserError: naming unknown keys and listing the valid ones.
  """
  cfg = as_dict(data_config)
  valid = {**COMMON_OPTIONS, **spec.options}
  unknown = sorted(set(cfg) - set(valid))
  if unknown:
    raise errors.UserError(
        f'Unknown data option(s) {unknown} for dataset {cfg.get("name")!r}; valid options: '
        f'{sorted(valid)}.')
  out = {**valid, **cfg}
  for key in ('data_dir', 'manual_dir'):
    if out[key]:
      out[key] = os.path.expanduser(str(out[key]))
  if out['data_dir'] is None:
    out['data_dir'] = os.environ.get(
        'TFDS_DATA_DIR', os.path.join(os.path.expanduser('~'), 'tensorflow_datasets'))
  if out['manual_dir'] is None:
    out['manual_dir'] = os.path.join(out['data_dir'], 'downloads', 'manual')
  for key in ('num_threads', 'prefetch_batches', 'num_workers'):
    if not isinstance(out[key], (int, np.integer)) or out[key] < 0:
      raise errors.UserError(f'data.{key} must be an integer >= 0, got {out[key]!r}.')
  return out


def as_dict(data_config: Any) -> dict:
  """ConfigDict / FrozenConfigDict / Mapping -> plain dict (one level)."""
  if data_config is None:
    return {}
  if hasattr(data_config, 'to_dict'):
    return dict(data_config.to_dict())
  if isinstance(data_config, Mapping):
    return dict(data_config)
  raise TypeError(f'data config must be a dict or ConfigDict, got {type(data_config).__name__}.')


def check_split(info: DatasetInfo, split: str) -> None:
  """Raises `errors.UserError` listing the valid splits when `split` is not one of `info`'s."""
  if split not in info.splits:
    raise errors.UserError(
        f'Unknown split {split!r} for dataset {info.name!r}; valid splits: {list(info.splits)}.')


class ArraySource:
  """Random-access source over a dict of equally long NumPy arrays (in memory or mmap)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f'Arrays of a split must have the same length, got {lengths}.')
    self._arrays = dict(arrays)
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict:
    return {k: v[index] for k, v in self._arrays.items()}

  def __repr__(self) -> str:
    return f'ArraySource(n={self._len}, keys={sorted(self._arrays)})'


class TfdsDataset(DatasetSpec):
  """A dataset stored by TFDS in array_record format, read with `builder.as_data_source`.

  Subclasses (or instances) set: `tfds_name` (name[/config]), `split_map` (our split ->
  TFDS split string), `num_classes`, `image_shape_fn` or a fixed `image_size` option,
  `attributes`, `default_eval_splits`, and `prepare_hint` (what the user must provide).
  Images are read as encoded bytes (`tfds.decode.SkipDecoding`) and decoded by the
  transform, so broken files are reported by example and decoding runs in grain's workers.
  """
  tfds_name: str = ''
  split_map: dict = {}
  num_classes: int = 0
  attributes: tuple = ()
  default_eval_splits: tuple = ()
  prepare_hint: str = ''
  downloads: bool = True  # TFDS downloads it; specs that need manual files say False.
  image_key: str = 'image'
  label_key: str = 'label'

  def builder(self, config: dict):
    """The TFDS builder (imports tensorflow_datasets)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(self.tfds_name, data_dir=config['data_dir'])

  def prepare_command(self, config: dict) -> str:
    default_manual = os.path.join(config['data_dir'], 'downloads', 'manual')
    manual = ('' if config['manual_dir'] == default_manual
              else f' --manual_dir={config["manual_dir"]}')
    return (f'python -m vitreg_jax.data.prepare {config["name"]} '
            f'--data_dir={config["data_dir"]}{manual}')

  def not_prepared_message(self, config: dict, detail: str = '') -> str:
    hint = self.prepare_hint.format(**config) if self.prepare_hint else ''
    return (f'Dataset {config["name"]!r} (TFDS {self.tfds_name}) is not prepared in '
            f'data_dir={config["data_dir"]}.'
            + (f'\n{hint}' if hint else '')
            + f'\nPrepare it once with:\n  {self.prepare_command(config)}'
            + (f'\n(TFDS said: {detail})' if detail else ''))

  def _open(self, config: dict, tfds_name: str, tfds_split: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = self.builder_for(config, tfds_name)
    decoders = {self.image_key: tfds.decode.SkipDecoding()}
    try:
      return builder.as_data_source(split=tfds_split, decoders=decoders)
    except Exception as e:  # pylint: disable=broad-except
      detail = str(e).splitlines()[0] if str(e) else type(e).__name__
      if builder.is_prepared():
        raise DatasetNotPreparedError(
            f'Dataset {config["name"]!r} exists in {builder.data_dir} but cannot be opened for '
            f'random access ({detail}). It must be stored as array_record: re-run\n  '
            f'{self.prepare_command(config)}') from None
      # TFDS's reason for a dataset that was never built is noise (no file of it exists).
      logging.vlog(1, 'TFDS on opening %s: %s', tfds_name, detail)  # --v=1 shows it
      raise DatasetNotPreparedError(self.not_prepared_message(config)) from None

  def builder_for(self, config: dict, tfds_name: str):
    """Builder of one TFDS name (datasets spanning several TFDS configs override `source`)."""
    if tfds_name == self.tfds_name:
      return self.builder(config)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.builder(tfds_name, data_dir=config['data_dir'])

  def source(self, config: dict, split: str):
    if split not in self.split_map:
      raise errors.UserError(f'Unknown split {split!r} for dataset {config["name"]!r}; '
                             f'valid splits: {list(self.split_map)}.')
    return self._open(config, self.tfds_name, self.split_map[split])

  def image_shape(self, config: dict) -> tuple:
    size = int(config['image_size'])
    return (size, size, 3)

  def info(self, config: dict) -> DatasetInfo:
    train = config['train_split']
    num_examples = {}
    if train in self.split_map:  # opening it checks the dataset is prepared.
      num_examples[train] = len(self.source(config, train))
    return DatasetInfo(
        name=config['name'], num_classes=self.num_classes,
        image_shape=self.image_shape(config), splits=tuple(self.split_map),
        attributes=tuple(self.attributes), num_examples=num_examples,
        default_eval_splits=tuple(self.default_eval_splits),
        attribute_classes=dict(getattr(self, 'attribute_classes', {})))

  def prepare(self, config: dict) -> None:
    """Downloads (or reads `manual_dir`) and writes array_record files into `data_dir`."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = self.builder(config)
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(manual_dir=config['manual_dir']))
