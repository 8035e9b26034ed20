"""The dataset registry: config name -> `base.DatasetSpec`, and `get_spec` to resolve a config.

A dataset defined outside the package is registered by adding its spec to `DATASETS` (see
docs/data.md, "Adding a dataset"); `data.open` then opens it like the built-in ones.
"""

from __future__ import annotations

from typing import Any

from vitreg_jax import errors
from vitreg_jax.data import base
from vitreg_jax.data import corrupted
from vitreg_jax.data import custom
from vitreg_jax.data import finetune
from vitreg_jax.data import imagenet
from vitreg_jax.data import mnist_cifar
from vitreg_jax.data import rotation
from vitreg_jax.data import waterbirds

DATASETS: dict = {
    'dominoes': custom.EmbeddedDataset(
        'vitreg_jax.data.dominoes', 'embedded MNIST/CIFAR-like dominoes (no setup)'),
    'npz': custom.NpzDataset(),
    'image_folder': custom.ImageFolderDataset(),
    'mnist_cifar': mnist_cifar.MnistCifarDataset(),
    'waterbirds': waterbirds.WaterbirdsDataset(),
    'imagenet_rotation': imagenet.ImageNetRotationDataset(),
    'embedded': custom.EmbeddedDataset(
        'vitreg_jax.data.embedded', 'embedded photo crops, which photo (ARViT fine-tuning)'),
    'embedded_rotation': rotation.EmbeddedRotationDataset(
        'vitreg_jax.data.embedded_rotation',
        'embedded photo crops, 4-way rotation (ARViT pretraining)'),
    **finetune.DATASETS,
    **corrupted.DATASETS,
}


def get_spec(data_config: Any) -> tuple:
  """Returns (spec, resolved config dict) for a data config; validates name and options.

  Used by `data.open` (and by `config_lib` to validate a config's data section); everything
  else works on the opened `Dataset`.

  Raises:
    errors.UserError: an unknown dataset name or option.
  """
  cfg = base.as_dict(data_config)
  name = cfg.get('name', base.COMMON_OPTIONS['name'])
  if name not in DATASETS:
    raise errors.UserError(f'Unknown dataset {name!r}; valid names: {sorted(DATASETS)}.')
  cfg['name'] = name
  spec = DATASETS[name]
  return spec, base.resolve_config(spec, cfg)
