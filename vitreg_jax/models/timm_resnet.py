"""Import of a timm ResNet `state_dict` into the post-activation `resnet` model (params and
BatchNorm statistics).

timm's `ResNet` with its default 7x7 stem (timm/models/resnet.py, `ResNet`, `Bottleneck`,
`BasicBlock`; `resnet50` is `ResNet(Bottleneck, [3, 4, 6, 3])`, torchvision's "v1.5" layout)
is the He et al. post-activation network that `models.resnet.ResNet` builds with
`stem='imagenet'`: conv1 7x7/2 (padding 3) -> bn1 -> ReLU -> 3x3/2 max-pool (padding 1), then
per block `ReLU(shortcut(x) + bn3(conv3(ReLU(bn2(conv2(ReLU(bn1(conv1(x)))))))))` with the
stride on the 3x3 conv and `downsample = Conv1x1_stride -> BN` when the shape changes, global
average pooling and `fc`. Names map one to one:

  conv1 / bn1                    -> stem_conv / stem_norm
  layer{s}.{b}.conv{j} / .bn{j}  -> stage{s}_block{b}/Conv_{j-1} / BatchNorm_{j-1}
  layer{s}.{b}.downsample.0 / .1 -> stage{s}_block{b}/shortcut / shortcut_norm
  fc                             -> head

A conv weight `[out, in, kh, kw]` becomes a flax kernel `[kh, kw, in, out]`, a Linear's
`[out, in]` is transposed, a BatchNorm's `weight` is flax's `scale`, and `running_mean` /
`running_var` go to the `batch_stats` collection (`num_batches_tracked` is dropped: eval uses
the running statistics only). BatchNorm eps is 1e-5 in both. timm variants with other parts
(a deep stem `conv1.0`, average-pool downsampling, squeeze-excitation, anti-aliasing) have no
`resnet` equivalent and are refused, naming the keys. The model must match the file:
`width` = timm's `channels[0]`, `stem_width=64` unless it equals it (timm's plain stem is
always 64 wide), `depth` / `blocks_per_stage` = its `layers` (`configs/timm_imagenet.py`).
"""

import re
from typing import Dict, Optional, Tuple

import flax
import numpy as np

from vitreg_jax import errors
from vitreg_jax.models import convert
from vitreg_jax.models import weight_layouts

_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def _module_name(torch_module: str) -> Optional[str]:
  """timm module path (without the parameter name) -> the `resnet` module path, or None."""
  if torch_module in ('conv1', 'bn1'):
    return {'conv1': 'stem_conv', 'bn1': 'stem_norm'}[torch_module]
  if torch_module == 'fc':
    return 'head'
  m = re.fullmatch(r'layer(\d)\.(\d+)\.(conv|bn)(\d)', torch_module)
  if m:
    kind = 'Conv' if m.group(3) == 'conv' else 'BatchNorm'
    return f'stage{m.group(1)}_block{m.group(2)}/{kind}_{int(m.group(4)) - 1}'
  m = re.fullmatch(r'layer(\d)\.(\d+)\.downsample\.([01])', torch_module)
  if m:
    return f'stage{m.group(1)}_block{m.group(2)}/' + ('shortcut', 'shortcut_norm')[int(m.group(3))]
  return None


def from_timm_resnet(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """A timm `ResNet.state_dict()` -> `{'params/...' | 'batch_stats/...': array}` in `resnet`'s
  names and flax shapes (module docstring).

  Raises:
    errors.UserError naming the keys with no `resnet` equivalent.
  """
  out, unknown = {}, []
  for key, value in state.items():
    module, _, leaf = key.rpartition('.')
    name = _module_name(module)
    value = np.asarray(value)
    if leaf == 'num_batches_tracked':
      continue
    if name is None:
      unknown.append(key)
    elif leaf == 'weight' and value.ndim == 4 and not name.endswith('norm') and (
        '/BatchNorm_' not in name):  # a conv (a 4-d weight in a norm's place is refused)
      out[f'params/{name}/kernel'] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    elif name == 'head':
      out[f'params/head/{"kernel" if leaf == "weight" else "bias"}'] = (
          np.ascontiguousarray(value.T) if leaf == 'weight' else value)
    elif leaf in _BN and value.ndim == 1:
      collection, flax_leaf = _BN[leaf]
      out[f'{collection}/{name}/{flax_leaf}'] = value
    else:
      unknown.append(f'{key} {value.shape}')
  if unknown:
    raise errors.UserError(
        'timm ResNet keys with no vitreg_jax resnet equivalent: ' + ', '.join(unknown[:8])
        + (' ...' if len(unknown) > 8 else '') + '. Supported: timm ResNets with the plain '
        '7x7 stem, 1x1-conv downsampling, no SE / anti-aliasing (e.g. resnet50, resnet18).')
  return {k: v.astype(np.float32) if v.dtype.kind == 'f' else v for k, v in out.items()}


def load_resnet(path: str, variables: dict, *,
                reset_head: Optional[bool] = None) -> Tuple[dict, dict]:
  """Loads a timm ResNet file (`.npz` / `.safetensors` of its state_dict) into `resnet` variables.

  Args:
    path: the weight file (`tools/convert_timm.py` writes it), any `etils.epath` path.
    variables: `{'params': ..., 'batch_stats': ...}` of the target model (structure and shapes).
    reset_head: as `convert.load_vit`: None resets the head only when the classes differ.
  Returns:
    `(params, batch_stats)` trees with the structure of `variables`.
  Raises:
    errors.UserError naming every missing, unexpected or mismatching array.
  """
  ckpt = from_timm_resnet(weight_layouts.read(path))
  target = convert.flatten(variables)
  # `merge` resets `head/...` keys: strip the collection name for the params.
  params = convert.merge(
      {k.removeprefix('params/'): v for k, v in ckpt.items() if k.startswith('params/')},
      {k.removeprefix('params/'): v for k, v in target.items() if k.startswith('params/')},
      path=path, reset_head=reset_head)
  stats = convert.merge(
      {k: v for k, v in ckpt.items() if k.startswith('batch_stats/')},
      {k: v for k, v in target.items() if k.startswith('batch_stats/')}, path=path)

  def tree(flat, prefix=''):
    return flax.traverse_util.unflatten_dict(
        {tuple(k.removeprefix(prefix).split('/')): v for k, v in flat.items()})
  return tree(params), tree(stats, 'batch_stats/')
