"""Model registry: `create(name, num_classes, **kwargs)` builds a flax module by name.

Config keys are the module's own dataclass fields: `create(config.model_name,
num_classes, **config.model)`. Every model returns `(logits, out)` (see docs/design.md).
"""

import dataclasses
from typing import Tuple

import flax.linen as nn

from vitreg_jax import errors
from vitreg_jax.models.alternet import AlterNet
from vitreg_jax.models.arvit import ARViT
from vitreg_jax.models.preresnet import PreResNet
from vitreg_jax.models.resnet import ResNet
from vitreg_jax.models.vit import ViT

MODELS = {
    'vit': ViT,
    'arvit': ARViT,
    'resnet': ResNet,          # the authors' post-activation ResNet
    'preresnet': PreResNet,    # pre-activation (AlterNet's backbone)
    'alternet': AlterNet,
}


def field_names(module_cls) -> Tuple[str, ...]:
  """The user-settable dataclass fields of a flax module class (without parent/name)."""
  return tuple(f.name for f in dataclasses.fields(module_cls)
               if f.init and f.name not in ('parent', 'name'))


def create(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds model `name` with `num_classes` outputs.

  Args:
    name: a key of `MODELS`.
    num_classes: number of output classes.
    **kwargs: the module's own fields (e.g. `variant='Ti/16', classifier='gap'` for 'vit').
  Returns:
    An unbound flax module; call `.init` / `.apply` on it.
  Raises:
    ValueError: unknown name (lists `sorted(MODELS)`) or unknown field (lists valid fields).
  """
  if name not in MODELS:
    raise errors.UserError(f'Unknown model {name!r}; valid names: {sorted(MODELS)}')
  cls = MODELS[name]
  valid = field_names(cls)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown or 'num_classes' in kwargs:
    raise errors.UserError(
        f'Unknown field(s) {unknown or ["num_classes (pass it positionally)"]} '
        f'for model {name!r}; valid fields: {sorted(set(valid) - {"num_classes"})}')
  return cls(num_classes=num_classes, **kwargs)
