"""Prepares a dataset once: `python -m vitreg_jax.data.prepare NAME --data_dir=D --manual_dir=M`.

TFDS-backed datasets are built (downloading what TFDS can download, reading manual files
from `--manual_dir`) into `--data_dir` in array_record format, which the grain pipeline reads
by random access. Datasets read in place (dominoes, npz, image_folder, CIFAR-100-C's .npy
files, imagewoof) are checked. Dataset options are passed as `--option key=value` (values
parsed as Python literals), e.g.

  python -m vitreg_jax.data.prepare mnist_cifar --data_dir=~/tensorflow_datasets \
      --option agreement=0.9 --option seed=0
  python -m vitreg_jax.data.prepare waterbirds --manual_dir=/data/waterbirds_raw

At the end it prints the dataset's info, which is what training will see. Training does the
same for its own dataset when it is missing with `python -m vitreg_jax.main ... --prepare_data`.
A mistake (an unknown name or option) is one line, exit status 1.
"""

from __future__ import annotations

import ast
from typing import Sequence

from absl import app
from absl import flags

from vitreg_jax import data
from vitreg_jax import errors

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (its `__main__`), not at import."""
  flags.DEFINE_string('data_dir', None, 'TFDS data directory (default: $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets).')
  flags.DEFINE_string('manual_dir', None, 'Directory of manually downloaded files (default: '
                      '<data_dir>/downloads/manual).')
  flags.DEFINE_multi_string('option', [], 'Dataset option key=value (repeatable).')


def parse_options(items: Sequence[str]) -> dict:
  """['k=v', ...] -> {k: literal_eval(v) or the string v}."""
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not key:
      raise errors.UserError(f'--option must be key=value, got {item!r}.')
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
  with errors.exit_on_user_error():  # A mistake is one line; a bug keeps its traceback.
    if len(argv) != 2:
      raise errors.UserError(
          'Usage: python -m vitreg_jax.data.prepare NAME [--data_dir=...] [--manual_dir=...] '
          f'[--option k=v]; NAME in {sorted(data.DATASETS)}.')
    info = prepare(argv[1], FLAGS.data_dir, FLAGS.manual_dir, **parse_options(FLAGS.option))
  print(info)


if __name__ == '__main__':
  define_flags()
  app.run(main)
