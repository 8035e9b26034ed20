"""Pre-activation ResNets (He et al. 2016, "Identity mappings in deep residual networks").

`model_name='preresnet'`: the authors' models/preresnet.py (xxxnell/how-do-vits-work,
`PreResNet`, blocks in models/preresnet_dnn_block.py) and the backbone of AlterNet
(`alternet.py`; their models/alternet.py builds on the same pre-activation blocks). Every
residual block computes `x + F(x)` with `F = (BN -> ReLU -> Conv) x 2` (basic, ResNet-18/34)
or x 3 (bottleneck 1x1 -> 3x3 -> 1x1 with expansion 4, ResNet-50/101/152); a projection
shortcut (1x1 conv, no BN, on the pre-activated input) is used when the shape changes.
Stages 2-4 halve the resolution in their first block (stride on the 3x3 conv). After the
last stage: BN -> ReLU -> global average pooling -> Dense head (their `BNGAPBlock`). Block
outputs are the un-normalized residual stream (no BN or ReLU after the addition), unlike the
post-activation `resnet.ResNet`.

Stems ('cifar': one 3x3 conv, as theirs; 'imagenet': 7x7/2 conv, BN, ReLU, 3x3/2 max-pool,
where theirs has no BN-ReLU before the pool) and 'SAME' padding are this library's earlier
pre-activation ResNet, kept so its checkpoints load and compute the same function.

Spatial smoothing (`smoothing=True`): the blur block of `resnet.py`, by default after every
stage but the last, the authors' placement for pre-activation nets (models/preresnet.py,
`dnn_smooth_50`: `num_sblocks=(1, 1, 1, 0)`); `smoothing_stages=(1, 1, 1, 1)` restores the
placement this model had before (after every stage). `out` as in `resnet.py`.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitreg_jax.checks import check_choice
from vitreg_jax.models import attention
from vitreg_jax.models import resnet

# The conv / BN / shortcut helpers shared with the post-activation ResNet and AlterNet.
_conv, _norm, _shortcut = resnet._conv, resnet._norm, resnet._shortcut  # pylint: disable=W0212


class BasicBlock(nn.Module):
  """Pre-activation basic block: two 3x3 convs; output width `features`."""
  features: int
  strides: int = 1
  dtype: attention.Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.relu(_norm(train, self.dtype)(x))
    shortcut = _shortcut(x, y, self.features, self.strides, self.dtype)
    y = _conv(self.features, 3, self.strides, self.dtype)(y)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = _conv(self.features, 3, 1, self.dtype)(y)
    return shortcut + y


class BottleneckBlock(nn.Module):
  """Pre-activation bottleneck: 1x1 (features) -> 3x3 (features, stride) -> 1x1 (4 x features)."""
  features: int
  strides: int = 1
  dtype: attention.Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    y = nn.relu(_norm(train, self.dtype)(x))
    shortcut = _shortcut(x, y, out_features, self.strides, self.dtype)
    y = _conv(self.features, 1, 1, self.dtype)(y)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = _conv(self.features, 3, self.strides, self.dtype)(y)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = _conv(out_features, 1, 1, self.dtype)(y)
    return shortcut + y


class PreResNet(nn.Module):
  """Pre-activation ResNet classifier.

  Attributes:
    num_classes: outputs of the head.
    depth: 18, 34 (basic blocks), 50, 101, 152 (bottleneck blocks).
    stem: 'cifar' (32-px inputs) or 'imagenet' (224-px inputs).
    width: channels of the first stage (64); stage s has `width * 2**(s-1)` (x4 in bottlenecks).
    dtype: compute dtype; parameters float32.
    smoothing: the authors' blur block at stage ends (module docstring).
    smoothing_stages: blur blocks after each of the 4 stages; None = (1, 1, 1, 0) (theirs).
    smoothing_temperature, smoothing_padding: its tanh scale t and its padding.
  """
  num_classes: int
  depth: int = 18
  stem: str = 'cifar'
  width: int = 64
  dtype: str = 'float32'
  smoothing: bool = False
  smoothing_stages: Optional[Sequence[int]] = None
  smoothing_temperature: float = 10.0
  smoothing_padding: str = 'authors'

  def __post_init__(self):
    check_choice('ResNet depth', self.depth, sorted(resnet.DEPTHS))
    check_choice('stem', self.stem, resnet.STEMS)
    attention.resolve_dtype(self.dtype)
    resnet.check_smoothing(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, head_mask=None, train=False, capture_attention=False,
               div_layers=()):
    """Classifies `images [B, H, W, C]`; returns `(logits [B, num_classes] float32, out)`."""
    resnet.check_cnn_call('preresnet', head_mask, capture_attention, div_layers)
    dtype = attention.resolve_dtype(self.dtype)
    counts, bottleneck = resnet.DEPTHS[self.depth]
    block_cls = BottleneckBlock if bottleneck else BasicBlock
    out = {}
    x = resnet.make_stem(images.astype(dtype), self.stem, self.width, train, dtype)
    out['stem'] = x
    blocks = [[block_cls(self.width * 2**s, strides=2 if s > 0 and b == 0 else 1, dtype=dtype,
                         name=f'stage{s + 1}_block{b}') for b in range(n)]
              for s, n in enumerate(counts)]
    x = resnet.run_stages(x, blocks, train, out, resnet.stage_smoothing(self),
                          resnet.smoothing_counts(self, len(counts), post_activation=False))
    return resnet.classify(x, self.num_classes, train, dtype, out), out
