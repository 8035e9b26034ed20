"""Prepares a dataset once: `python -m vitreg_jax.data.prepare NAME --data_dir=D --manual_dir=M`.

TFDS-backed datasets are built (downloading what TFDS can download, reading manual files
from `--manual_dir`) into `--data_dir` in array_record format, which the grain pipeline reads
by random access. Datasets read in place (dominoes, npz, image_folder, CIFAR-100-C's .npy
files, imagewoof) are checked. Dataset options are passed as `--option key=value` (values
parsed as Python literals), e.g.

  python -m vitreg_jax.data.prepare mnist_cifar --data_dir=~/tensorflow_datasets \
      --option agreement=0.9 --option seed=0
  python -m vitreg_jax.data.prepare waterbirds --manual_dir=/data/waterbirds_raw

At the end it prints the dataset's info, which is what training will see.
"""

from __future__ import annotations

import ast
import sys
from typing import Sequence

from absl import app
from absl import flags

from vitreg_jax import data
from vitreg_jax.data import base

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory (default: '
                                '$TFDS_DATA_DIR or ~/tensorflow_datasets).')
_MANUAL_DIR = flags.DEFINE_string('manual_dir', None, 'Directory of manually downloaded '
                                  'files (default: <data_dir>/downloads/manual).')
_OPTION = flags.DEFINE_multi_string('option', [], 'Dataset option key=value (repeatable).')


def parse_options(items: Sequence[str]) -> dict:
  """['k=v', ...] -> {k: literal_eval(v) or the string v}."""
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise ValueError(f'--option must be key=value, got {item!r}.')
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def prepare(name: str, data_dir=None, manual_dir=None, **options):
  """Prepares dataset `name` and returns its `DatasetInfo`.

  Args:
    name: a registered dataset name (`vitreg_jax.data.DATASETS`).
    data_dir, manual_dir: as in the data config.
    **options: the dataset's own options (validated).
  Returns:
    the `info` of the prepared dataset (`data.open`).
  """
  config = dict(name=name, data_dir=data_dir, manual_dir=manual_dir, **options)
  spec, cfg = data.get_spec(config)
  spec.prepare(cfg)
  return data.open(config).info


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(f'Usage: python -m vitreg_jax.data.prepare NAME [--data_dir=...] '
                         f'[--manual_dir=...] [--option k=v]; NAME in {sorted(data.DATASETS)}.')
  try:
    info = prepare(argv[1], _DATA_DIR.value, _MANUAL_DIR.value, **parse_options(_OPTION.value))
  except (base.DatasetNotPreparedError, base.CorruptDataError, ValueError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    sys.exit(1)
  print(info)


if __name__ == '__main__':
  app.run(main)
