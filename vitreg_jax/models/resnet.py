"""Pre-activation ResNets (He et al. 2016, "Identity mappings in deep residual networks").

The CNN baselines of "How do ViTs work?" and the backbone of AlterNet (`alternet.py`). Every
residual block computes `x + F(x)` with `F = (BN -> ReLU -> Conv) x 2` (basic, ResNet-18/34) or
x 3 (bottleneck 1x1 -> 3x3 -> 1x1 with expansion 4, ResNet-50/101/152); a projection shortcut
(1x1 conv on the pre-activated input) is used when the shape changes. Stages 2-4 halve the
resolution in their first block (stride on the 3x3 conv). After the last stage: BN -> ReLU ->
global average pooling -> Dense head.

Stems: 'cifar' (3x3 conv, stride 1, for 32-px inputs) and 'imagenet' (7x7 conv stride 2, BN,
ReLU, 3x3 max-pool stride 2, for 224-px inputs).

Spatial smoothing (`smoothing=True`; "How do ViTs work?": "applying spatial smoothing at the
end of a stage improves accuracy"): the authors' blur block (xxxnell/how-do-vits-work,
models/smoothing_block.py, `TanhBlurBlock`, placed after every stage by their models/resnet.py,
`num_sblocks=(1, 1, 1, 1)`), i.e. before each subsampling (the next stage's strided block, or
the global average pooling after the last stage):

  y = t * tanh(x / t)   (t = `smoothing_temperature`, 10 as theirs: bounds large activations)
  y = ReLU(y)
  y = 2x2 average pool with stride 1 over zero padding, zeros counted in the mean

`smoothing_padding='authors'` pads one pixel on every side (their `AvgPool2d(2, stride=1,
padding=1)`), so each smoothed map is one pixel larger (32 -> 33, then 17 after a stride-2
block); `'same'` pads one row and column at the bottom / right so the map keeps its size (what
AlterNet's attention windows need, as they must tile the map).

`out` (for the Fourier analysis of feature maps): 'stem', 'block{i}' = {'input', 'output'}
with i counting blocks over all stages (0-based), 'stage{s}' (s = 1..4, each stage's output),
'encoded' (after the final BN-ReLU), 'pre_logits', 'logits'. With smoothing, the smoothed
map after the last block i of a stage is `out['block{i}']['smoothed']` and 'stage{s}' is the
smoothed map (what the next stage sees). BatchNorm statistics live in the
'batch_stats' collection: `apply(..., train=True, mutable=['batch_stats'])`.
"""

import functools

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


def _conv(features, kernel, strides=1, dtype=jnp.float32, name=None):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding='SAME' if kernel > 1 else 'VALID', use_bias=False, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=nn.initializers.kaiming_normal(),
                 name=name)


def _shortcut(x, y, out_features, strides, dtype):
  """Identity, or a 1x1 projection of the pre-activated input `y` when the shape changes."""
  if strides != 1 or x.shape[-1] != out_features:
    return _conv(out_features, 1, strides, dtype, name='shortcut')(y)
  return x


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


def check_cnn_call(model_name, head_mask, capture_attention, div_layers):
  """CNN-family models take the common call signature but have no per-head features."""
  if head_mask is not None:
    raise errors.UserError(f'{model_name} has no per-block attention heads: head_mask must be None '
                           '(head masks apply to vit and arvit).')
  if capture_attention not in (False, None, ()) or tuple(div_layers or ()):
    raise errors.UserError(f'{model_name} does not support capture_attention / div_layers (they '
                           'apply to vit and arvit); pass False and ().')


def make_stem(images, kind: str, width: int, train: bool, dtype):
  """The ResNet stem: 'cifar' (3x3 conv) or 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max-pool)."""
  if kind == 'cifar':
    return _conv(width, 3, 1, dtype, name='stem_conv')(images)
  if kind == 'imagenet':
    x = _conv(width, 7, 2, dtype, name='stem_conv')(images)
    x = nn.relu(_norm(train, dtype, name='stem_norm')(x))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
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


def check_smoothing(module):
  """Validates a model's `smoothing_*` fields (clear errors at construction)."""
  check_choice('smoothing_padding', module.smoothing_padding, SMOOTHING_PADDINGS)
  if not module.smoothing_temperature > 0:
    raise errors.UserError('smoothing_temperature must be > 0 (the scaled tanh divides by it), got '
                           f'{module.smoothing_temperature}')


def stage_smoothing(module):
  """The stage-end smoothing of a model with `smoothing*` fields (`smooth`), or None."""
  if not module.smoothing:
    return None
  return functools.partial(smooth, temperature=float(module.smoothing_temperature),
                           padding=module.smoothing_padding)


def run_stages(x, blocks, train: bool, out: dict, smoothing=None):
  """Applies `blocks` (a list of stages, each a list of block modules) and records `out`.

  `smoothing`: None, or a function applied to every stage's output (`smooth` with the model's
  settings), recorded as `out['block{i}']['smoothed']` of the stage's last block."""
  i = 0
  for s, stage in enumerate(blocks, start=1):
    for block in stage:
      y = block(x, train)
      out[f'block{i}'] = {'input': x, 'output': y}
      x, i = y, i + 1
    if smoothing is not None and stage:
      x = smoothing(x)
      out[f'block{i - 1}']['smoothed'] = x
    out[f'stage{s}'] = x
  return x


def classify(x, num_classes: int, train: bool, dtype, out: dict):
  """Final BN -> ReLU -> global average pooling -> Dense; fills out and returns float32 logits."""
  x = nn.relu(_norm(train, dtype, name='final_norm')(x))
  out['encoded'] = x
  x = x.mean(axis=(1, 2))
  out['pre_logits'] = x
  logits = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name='head')(x)
  out['logits'] = logits.astype(jnp.float32)
  return out['logits']


class ResNet(nn.Module):
  """Pre-activation ResNet classifier.

  Attributes:
    num_classes: outputs of the head.
    depth: 18, 34 (basic blocks), 50, 101, 152 (bottleneck blocks).
    stem: 'cifar' (32-px inputs) or 'imagenet' (224-px inputs).
    width: channels of the first stage (64); stage s has `width * 2**(s-1)` (x4 in bottlenecks).
    dtype: compute dtype; parameters float32.
    smoothing: the authors' blur block after every stage (module docstring).
    smoothing_temperature, smoothing_padding: its tanh scale t and its padding.
  """
  num_classes: int
  depth: int = 18
  stem: str = 'cifar'
  width: int = 64
  dtype: str = 'float32'
  smoothing: bool = False
  smoothing_temperature: float = 10.0
  smoothing_padding: str = 'authors'

  def __post_init__(self):
    check_choice('ResNet depth', self.depth, sorted(DEPTHS))
    check_choice('stem', self.stem, STEMS)
    attention.resolve_dtype(self.dtype)
    check_smoothing(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, head_mask=None, train=False, capture_attention=False,
               div_layers=()):
    """Classifies `images [B, H, W, C]`; returns `(logits [B, num_classes] float32, out)`."""
    check_cnn_call('resnet', head_mask, capture_attention, div_layers)
    dtype = attention.resolve_dtype(self.dtype)
    counts, bottleneck = DEPTHS[self.depth]
    block_cls = BottleneckBlock if bottleneck else BasicBlock
    out = {}
    x = make_stem(images.astype(dtype), self.stem, self.width, train, dtype)
    out['stem'] = x
    blocks = [[block_cls(self.width * 2**s, strides=2 if s > 0 and b == 0 else 1, dtype=dtype,
                         name=f'stage{s + 1}_block{b}') for b in range(n)]
              for s, n in enumerate(counts)]
    x = run_stages(x, blocks, train, out, stage_smoothing(self))
    return classify(x, self.num_classes, train, dtype, out), out
