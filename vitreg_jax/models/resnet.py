"""ResNets of "How do ViTs work?": the authors' post-activation ResNet and the shared CNN parts.

Two families share this file's helpers (stems, smoothing, stage runner, classifier):

* `ResNet` (`model_name='resnet'`): the **post-activation** ResNet (He et al. 2015) that the
  slides compare ViTs with: xxxnell/how-do-vits-work, models/resnet.py (`ResNet`, `dnn_50`:
  `get_model('resnet_50')` with the CIFAR stem, `stem=False`, its default) built from
  models/resnet_dnn_block.py (`BasicBlock`, `Bottleneck`). A block computes
  `ReLU(shortcut(x) + BN(Conv(...ReLU(BN(Conv(x))))))`: basic = two 3x3 convs (ResNet-18/34),
  bottleneck = 1x1 -> 3x3 (stride) -> 1x1 with expansion 4 (ResNet-50/101/152), every conv
  followed by BN, ReLU after each BN except the last, whose ReLU comes after the addition. The
  shortcut is the identity, or `BN(Conv1x1_stride(x))` when the shape changes. Stem: 'cifar' =
  3x3 conv -> BN -> ReLU; 'imagenet' = 7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool. Head: global
  average pooling -> Dense (their `GAPBlock`: no BN, the last block already ends in a ReLU).
  Convs and the max-pool pad as PyTorch (k // 2 on every side), so the strided convs see the
  same pixels as theirs (flax's 'SAME' would pad 0 before and 1 after an even map).
  `drop_path` is their stochastic depth (`sd`, `layers.DropPath` on the residual branch,
  linear in the global block index, `sd * j / (blocks - 1)`; 0 by default, as theirs).
* `preresnet.PreResNet` (`model_name='preresnet'`): the pre-activation ResNet
  (models/preresnet.py), AlterNet's backbone.

Spatial smoothing (`smoothing=True`; the slides: "applying spatial smoothing at the end of a
stage improves accuracy"): the authors' blur block (models/smoothing_block.py,
`TanhBlurBlock`) at the end of stages, `smoothing_stages[s]` blocks after stage s+1 (their
`num_sblocks`). Default (None): the authors' placement for the family, after every stage for
post-activation ResNets (models/resnet.py, `dnn_smooth_50`: `num_sblocks=(1, 1, 1, 1)`) and
after every stage but the last for pre-activation ones (models/preresnet.py,
`dnn_smooth_50`: `(1, 1, 1, 0)`). One block is

  y = t * tanh(x / t)   (t = `smoothing_temperature`, 10 as theirs: bounds large activations)
  y = ReLU(y)
  y = 2x2 average pool with stride 1 over zero padding, zeros counted in the mean

`smoothing_padding='authors'` pads one pixel on every side (their `AvgPool2d(2, stride=1,
padding=1)`), so each smoothed map is one pixel larger (32 -> 33, then 17 after a stride-2
block); `'same'` pads one row and column at the bottom / right so the map keeps its size (what
AlterNet's attention windows need, as they must tile the map).

`out` (for the Fourier and variance analyses): 'stem', 'block{i}' = {'input', 'output'} with
i counting blocks over all stages (0-based), 'stage{s}' (s = 1..4, each stage's output),
'encoded' (the map the head pools: the last stage's output, or after the final BN-ReLU of a
pre-activation net), 'pre_logits', 'logits'. With smoothing, the smoothed map after the last
block i of a stage is `out['block{i}']['smoothed']` and 'stage{s}' is the smoothed map (what
the next stage sees). BatchNorm (PyTorch's momentum 0.1 and eps 1e-5) statistics live in the
'batch_stats' collection: `apply(..., train=True, mutable=['batch_stats'])`.
"""

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vitreg_jax import errors
from vitreg_jax.checks import check_choice
from vitreg_jax.models import attention

STEMS = ('cifar', 'imagenet')
SMOOTHING_PADDINGS = ('authors', 'same')
# depth -> (blocks per stage, bottleneck?)
DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}


def _norm(train: bool, dtype, name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def _conv(features, kernel, strides=1, dtype=jnp.float32, name=None, torch_padding=False):
  """Bias-free conv; 'SAME' padding, or with `torch_padding` PyTorch's `kernel // 2` per side."""
  if torch_padding:
    padding = ((kernel // 2, kernel // 2),) * 2
  else:
    padding = 'SAME' if kernel > 1 else 'VALID'
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.kaiming_normal(), name=name)


def _shortcut(x, y, out_features, strides, dtype):
  """Identity, or a 1x1 projection of the pre-activated input `y` when the shape changes."""
  if strides != 1 or x.shape[-1] != out_features:
    return _conv(out_features, 1, strides, dtype, name='shortcut')(y)
  return x


def _drop_path(rate: float, y, train: bool):
  """Stochastic depth: the whole residual branch dropped per example (rng 'dropout')."""
  return nn.Dropout(rate, broadcast_dims=(1, 2, 3))(y, deterministic=not train)


def _post_shortcut(x, out_features, strides, train, dtype):
  """Identity, or BN(Conv1x1_stride(x)) when the shape changes (authors' `shortcut`)."""
  if strides != 1 or x.shape[-1] != out_features:
    y = _conv(out_features, 1, strides, dtype, name='shortcut', torch_padding=True)(x)
    return _norm(train, dtype, name='shortcut_norm')(y)
  return x


class PostBasicBlock(nn.Module):
  """Post-activation basic block (authors' resnet_dnn_block.py, `BasicBlock`):
  `ReLU(shortcut(x) + BN(Conv3x3(ReLU(BN(Conv3x3_stride(x))))))`."""
  features: int
  strides: int = 1
  drop_path: float = 0.0
  dtype: attention.Dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    skip = _post_shortcut(x, self.features, self.strides, train, self.dtype)
    y = _conv(self.features, 3, self.strides, self.dtype, torch_padding=True)(x)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = _norm(train, self.dtype)(_conv(self.features, 3, 1, self.dtype, torch_padding=True)(y))
    return nn.relu(skip + _drop_path(self.drop_path, y, train))


class PostBottleneckBlock(nn.Module):
  """Post-activation bottleneck (authors' resnet_dnn_block.py, `Bottleneck`): 1x1 (features)
  -> 3x3 (features, stride) -> 1x1 (4 x features), each conv followed by BN, ReLU after the
  first two; output `ReLU(shortcut(x) + branch)`."""
  features: int
  strides: int = 1
  drop_path: float = 0.0
  dtype: attention.Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    skip = _post_shortcut(x, out_features, self.strides, train, self.dtype)
    y = nn.relu(_norm(train, self.dtype)(_conv(self.features, 1, 1, self.dtype)(x)))
    y = _conv(self.features, 3, self.strides, self.dtype, torch_padding=True)(y)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = _norm(train, self.dtype)(_conv(out_features, 1, 1, self.dtype)(y))
    return nn.relu(skip + _drop_path(self.drop_path, y, train))


def check_cnn_call(model_name, head_mask, capture_attention, div_layers):
  """CNN-family models take the common call signature but have no per-head features."""
  if head_mask is not None:
    raise errors.UserError(f'{model_name} has no per-block attention heads: head_mask must be None '
                           '(head masks apply to vit and arvit).')
  if capture_attention not in (False, None, ()) or tuple(div_layers or ()):
    raise errors.UserError(f'{model_name} does not support capture_attention / div_layers (they '
                           'apply to vit and arvit); pass False and ().')


def make_stem(images, kind: str, width: int, train: bool, dtype, post_activation=False):
  """The ResNet stem. Pre-activation (`post_activation=False`, today's PreResNet): 'cifar' =
  3x3 conv; 'imagenet' = 7x7/2 conv, BN, ReLU, 3x3/2 max-pool ('SAME' padding).
  Post-activation (the authors' ResNet): 'cifar' = 3x3 conv, BN, ReLU; 'imagenet' as above
  with PyTorch's padding (3 around the 7x7 conv, 1 around the max-pool)."""
  torch_pad = post_activation
  if kind == 'cifar':
    x = _conv(width, 3, 1, dtype, name='stem_conv', torch_padding=torch_pad)(images)
    return nn.relu(_norm(train, dtype, name='stem_norm')(x)) if post_activation else x
  if kind == 'imagenet':
    x = _conv(width, 7, 2, dtype, name='stem_conv', torch_padding=torch_pad)(images)
    x = nn.relu(_norm(train, dtype, name='stem_norm')(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2),
                       padding=((1, 1), (1, 1)) if torch_pad else 'SAME')
  raise errors.UserError(f'stem must be one of {STEMS}, got {kind!r}')


def smooth(x, temperature: float = 10.0, padding: str = 'authors'):
  """The authors' spatial-smoothing block: `t tanh(x / t)`, ReLU, 2x2 average pool, stride 1.

  Args:
    x: feature map `[B, H, W, C]`.
    temperature: t of the scaled tanh.
    padding: 'authors' (zero-pad one pixel on every side: output `[B, H + 1, W + 1, C]`) or
      'same' (zero-pad one row / column at the bottom / right: output `[B, H, W, C]`); padded
      zeros count in the mean, as in PyTorch's `AvgPool2d` default.
  """
  if padding not in SMOOTHING_PADDINGS:
    raise errors.UserError(
        f'smoothing_padding must be one of {SMOOTHING_PADDINGS}, got {padding!r}')
  y = nn.relu(temperature * jnp.tanh(x / temperature))
  pad = ((1, 1), (1, 1)) if padding == 'authors' else ((0, 1), (0, 1))
  return nn.avg_pool(y, (2, 2), strides=(1, 1), padding=pad, count_include_pad=True)


def smoothing_counts(module, num_stages: int, post_activation: bool):
  """Blur blocks after each stage: `module.smoothing_stages`, or the authors' placement
  (post-activation: every stage; pre-activation: every stage but the last); zeros without
  smoothing."""
  if not module.smoothing:
    return (0,) * num_stages
  if module.smoothing_stages is not None:
    return tuple(module.smoothing_stages)
  return (1,) * num_stages if post_activation else (1,) * (num_stages - 1) + (0,)


def check_smoothing(module, num_stages: int = 4):
  """Validates a model's `smoothing*` fields (clear errors at construction); turns
  `smoothing_stages` into a tuple (keeps the module hashable when a config passes a list)."""
  check_choice('smoothing_padding', module.smoothing_padding, SMOOTHING_PADDINGS)
  if not module.smoothing_temperature > 0:
    raise errors.UserError('smoothing_temperature must be > 0 (the scaled tanh divides by it), got '
                           f'{module.smoothing_temperature}')
  stages = module.smoothing_stages
  if stages is None:
    return
  stages = tuple(stages)
  if not module.smoothing:
    raise errors.UserError('smoothing_stages applies with smoothing=True.')
  if len(stages) != num_stages or any(int(n) != n or n < 0 for n in stages):
    raise errors.UserError(f'smoothing_stages must give a count >= 0 of blur blocks for each of '
                           f'the {num_stages} stages (the authors\' num_sblocks, e.g. (1, 1, 1, '
                           f'0)), got {stages}.')
  object.__setattr__(module, 'smoothing_stages', tuple(int(n) for n in stages))


def stage_smoothing(module):
  """The stage-end smoothing of a model with `smoothing*` fields (`smooth`), or None."""
  if not module.smoothing:
    return None
  return functools.partial(smooth, temperature=float(module.smoothing_temperature),
                           padding=module.smoothing_padding)


def run_stages(x, blocks, train: bool, out: dict, smoothing=None,
               counts: Optional[Sequence[int]] = None):
  """Applies `blocks` (a list of stages, each a list of block modules) and records `out`.

  `smoothing`: None, or a function applied `counts[s]` times (default once) to stage s's
  output (`smooth` with the model's settings), recorded as `out['block{i}']['smoothed']` of
  the stage's last block."""
  i = 0
  for s, stage in enumerate(blocks, start=1):
    for block in stage:
      y = block(x, train)
      out[f'block{i}'] = {'input': x, 'output': y}
      x, i = y, i + 1
    n = 0 if smoothing is None else (1 if counts is None else counts[s - 1])
    if n and stage:
      for _ in range(n):
        x = smoothing(x)
      out[f'block{i - 1}']['smoothed'] = x
    out[f'stage{s}'] = x
  return x


def classify(x, num_classes: int, train: bool, dtype, out: dict, pre_activation=True):
  """[Final BN -> ReLU (pre-activation nets) ->] global average pooling -> Dense; fills out
  and returns float32 logits."""
  if pre_activation:
    x = nn.relu(_norm(train, dtype, name='final_norm')(x))
  out['encoded'] = x
  x = x.mean(axis=(1, 2))
  out['pre_logits'] = x
  logits = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name='head')(x)
  out['logits'] = logits.astype(jnp.float32)
  return out['logits']


class ResNet(nn.Module):
  """The authors' post-activation ResNet classifier (module docstring).

  Attributes:
    num_classes: outputs of the head.
    depth: 18, 34 (basic blocks), 50, 101, 152 (bottleneck blocks).
    stem: 'cifar' (32-px inputs) or 'imagenet' (224-px inputs).
    width: channels of the first stage (64); stage s has `width * 2**(s-1)` (x4 in bottlenecks).
    stem_width: channels of the stem conv; None = `width` (the authors' and torchvision's
      ResNets). timm's 7x7 stem is always 64 wide (timm/models/resnet.py, `ResNet.__init__`:
      `inplanes = 64` without a deep stem), so a timm ResNet of other `channels` sets it.
    blocks_per_stage: blocks in each of the 4 stages; None = the `depth`'s counts (`DEPTHS`).
      `depth` still picks the block type (basic for 18 / 34, bottleneck from 50), so
      `depth=50, blocks_per_stage=(1, 1, 1, 1)` is a bottleneck ResNet with one block a stage
      (the imported timm test fixtures).
    drop_path: stochastic depth of the last block (theirs: `sd`, 0 by default).
    dtype: compute dtype; parameters float32.
    smoothing: the authors' blur block at stage ends (module docstring).
    smoothing_stages: blur blocks after each of the 4 stages; None = (1, 1, 1, 1) (theirs).
    smoothing_temperature, smoothing_padding: its tanh scale t and its padding.
  """
  num_classes: int
  depth: int = 18
  stem: str = 'cifar'
  width: int = 64
  stem_width: Optional[int] = None
  blocks_per_stage: Optional[Sequence[int]] = None
  drop_path: float = 0.0
  dtype: str = 'float32'
  smoothing: bool = False
  smoothing_stages: Optional[Sequence[int]] = None
  smoothing_temperature: float = 10.0
  smoothing_padding: str = 'authors'

  def __post_init__(self):
    check_choice('ResNet depth', self.depth, sorted(DEPTHS))
    check_choice('stem', self.stem, STEMS)
    attention.resolve_dtype(self.dtype)
    check_smoothing(self)
    if self.blocks_per_stage is not None:
      counts = tuple(self.blocks_per_stage)
      if len(counts) != 4 or any(int(n) != n or n < 1 for n in counts):
        raise errors.UserError(f'blocks_per_stage must give 4 counts >= 1 (one per stage), got '
                               f'{counts}.')
      object.__setattr__(self, 'blocks_per_stage', tuple(int(n) for n in counts))  # hashable
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, head_mask=None, train=False, capture_attention=False,
               div_layers=()):
    """Classifies `images [B, H, W, C]`; returns `(logits [B, num_classes] float32, out)`."""
    check_cnn_call('resnet', head_mask, capture_attention, div_layers)
    dtype = attention.resolve_dtype(self.dtype)
    counts, bottleneck = DEPTHS[self.depth]
    counts = self.blocks_per_stage or counts
    block_cls = PostBottleneckBlock if bottleneck else PostBasicBlock
    out = {}
    x = make_stem(images.astype(dtype), self.stem, self.stem_width or self.width, train, dtype,
                  post_activation=True)
    out['stem'] = x
    total, blocks = sum(counts), []
    for s, n in enumerate(counts):
      blocks.append([block_cls(self.width * 2**s, strides=2 if s > 0 and b == 0 else 1,
                               drop_path=self.drop_path * (sum(counts[:s]) + b)
                               / max(total - 1, 1),
                               dtype=dtype, name=f'stage{s + 1}_block{b}') for b in range(n)])
    x = run_stages(x, blocks, train, out, stage_smoothing(self),
                   smoothing_counts(self, len(counts), post_activation=True))
    return classify(x, self.num_classes, train, dtype, out, pre_activation=False), out
