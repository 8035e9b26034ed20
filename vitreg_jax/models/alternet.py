"""AlterNet ("How do ViTs work?", Section 4 and Fig. 11): a pre-activation ResNet whose stages
end with multi-head self-attention (MSA) blocks.

Build-up rule (paper, Section 4.1): starting from a ResNet, replace Conv blocks with MSA blocks
from the end of a stage, alternating, so a stage of n blocks with m MSAs is laid out as
`C ... C M C M` (MSA at positions n-1, n-3, ..., n-2m+1, 0-based). The first block of a stage
(the subsampling one) stays a Conv, hence m <= n // 2. The default is Alter-ResNet-50 of
Fig. 11 (as in the authors' code): blocks per stage (3, 4, 6, 4), MSAs per stage (0, 1, 3, 2),
heads (3, 6, 12, 24) following Swin, giving stages `CCC | CCCM | CMCMCM | CMCM`.

MSA block, `msa_block='authors'` (default): the authors' `AttentionBlockB`
(xxxnell/how-do-vits-work, models/alternet.py, `LocalAttention` and models/attentions.py,
`Attention2d`), for a block of bottleneck width f and output width 4f:

  y = GELU(BN(x));  skip = x (or a 1x1 projection of y when the width changes)
  y = BN(Conv1x1_f(y))                               (no conv bias)
  y = LocalMSA(y): non-overlapping w x w windows (w = `msa_window`, 7 by default), heads of
      size `head_dim` = 64, q/k/v 1x1 projections without bias, logits
      `q k^T / sqrt(64) + B[dr + w - 1, dc + w - 1]` with B a learned (2w - 1) x (2w - 1)
      relative position bias shared by the heads (init N(0, 0.02)) and (dr, dc) the key's
      offset from the query inside the window, output projection (with bias) to 4f
  out = DropPath(y) + skip

`msa_block='figure'`: our earlier block designed from Fig. 11 only, kept as an ablation:
`x + Conv1x1_{4f}(ReLU(BN(MSA(LN(Conv1x1_f(ReLU(BN(x))))))))`, global MSA (or `msa_window`
windows) with no position bias and head size 32 (Swin's).

AlterNet is pre-activation, as the authors' (models/alternet.py: `preresnet_dnn` blocks,
`AttentionBlockB` "with pre-activation", `StemB`, `BNGAPBlock`), so its Conv blocks are
`preresnet.BottleneckBlock`.

Spatial smoothing (`smoothing=True`): the authors' blur block of `resnet.py` (their AlterNet
has none; the slides' "spatial smoothing at the end of a stage improves accuracy" is shown on
ResNets), placed by their rule for pre-activation nets: after every stage but the last
(models/preresnet.py, `num_sblocks=(1, 1, 1, 0)`); `smoothing_stages` sets the blocks per
stage (`(1, 1, 1, 1)`: after every stage, this model's placement before). The attention
windows must tile every map, so when a smoothed stage is followed by a stage with MSAs,
AlterNet needs `smoothing_padding='same'` (the default 'authors' padding makes each map one
pixel larger, so later maps have odd sides); construction fails with that advice.

`out` follows `resnet.py` ('stem', 'block{i}', 'stage{s}', 'encoded', 'pre_logits', 'logits');
`AlterNet(...).block_kinds()` says which global block index is 'conv' or 'msa'.
"""

from typing import List, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax.checks import check_choice
from vitreg_jax.models import attention
from vitreg_jax.models import preresnet
from vitreg_jax.models import resnet


MSA_BLOCKS = ('authors', 'figure')


def alternet_layout(blocks_per_stage: Sequence[int],
                    msa_per_stage: Sequence[int]) -> List[List[str]]:
  """Per-stage block kinds by the build-up rule (MSAs from the end of a stage, alternating).

  Args:
    blocks_per_stage: n_s, blocks in stage s.
    msa_per_stage: m_s <= n_s // 2, MSA blocks in stage s.
  Returns:
    e.g. `[['conv'] * 3, ['conv'] * 3 + ['msa'], ...]`.
  """
  if len(blocks_per_stage) != len(msa_per_stage):
    raise errors.UserError(f'blocks_per_stage {tuple(blocks_per_stage)} and msa_per_stage '
                           f'{tuple(msa_per_stage)} must have the same length.')
  layout = []
  for s, (n, m) in enumerate(zip(blocks_per_stage, msa_per_stage), start=1):
    if not 0 <= m <= n // 2:
      raise errors.UserError(
          f'Stage {s} has {n} blocks, so it can hold 0..{n // 2} alternating MSA '
          f'blocks (the first block stays a Conv), got {m}.')
    kinds = ['conv'] * n
    for j in range(m):
      kinds[n - 1 - 2 * j] = 'msa'
    layout.append(kinds)
  return layout


def relative_position_index(window: int) -> np.ndarray:
  """`[w^2, w^2, 2]` indices into a (2w - 1) x (2w - 1) bias table: for query a and key b of a
  w x w window (row-major), `(row_b - row_a + w - 1, col_b - col_a + w - 1)`."""
  pos = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij'), -1)
  pos = pos.reshape(-1, 2)
  return pos[None, :, :] - pos[:, None, :] + window - 1


def to_windows(y, window: int):
  """`[B, h, w, C]` -> `[B * (h / win) * (w / win), win^2, C]` (row-major inside a window)."""
  b, h, w, c = y.shape
  if h % window or w % window:
    raise errors.UserError(f'msa_window={window} must divide the feature map {h}x{w} (the authors '
                           'tile the map with non-overlapping windows); choose a divisor, e.g. 4 '
                           'for the 16/8/4 maps of a 32-px CIFAR AlterNet.')
  y = y.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(-1, window * window, c)


def from_windows(tokens, shape_bhw, window: int):
  """Inverse of `to_windows` for a map of batch/height/width `shape_bhw`."""
  b, h, w = shape_bhw
  c = tokens.shape[-1]
  y = tokens.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, h, w, c)


class MSABlock(nn.Module):
  """The authors' AlterNet MSA block (`AttentionBlockB`, module docstring).

  Attributes:
    features: bottleneck width f (output 4 f).
    num_heads: attention heads.
    head_dim: width per head (64).
    window: side w of the non-overlapping attention windows (7); must divide the map sides.
    drop_path: stochastic-depth rate of this block.
  """
  features: int
  num_heads: int
  head_dim: int = 64
  window: int = 7
  drop_path: float = 0.0
  dtype: attention.Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    y = nn.gelu(resnet._norm(train, self.dtype)(x), approximate=False)
    shortcut = resnet._shortcut(x, y, out_features, 1, self.dtype)
    y = resnet._conv(self.features, 1, 1, self.dtype)(y)
    y = resnet._norm(train, self.dtype)(y)
    b, h, w, _ = y.shape
    win = int(self.window)
    windows = to_windows(y, win)  # Checks the window divides the map before any parameter.
    table = self.param('relative_position_bias', nn.initializers.normal(stddev=0.02),
                       (2 * win - 1, 2 * win - 1), jnp.float32)
    index = relative_position_index(win)
    bias = table[index[..., 0], index[..., 1]]  # [w^2, w^2], shared by the heads
    tokens, _ = attention.MultiHeadAttention(
        self.num_heads, qkv_features=self.num_heads * self.head_dim, out_features=out_features,
        dtype=self.dtype, use_bias=False, name='attention')(windows, bias=bias)
    y = from_windows(tokens, (b, h, w), win)
    y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2, 3))(y, deterministic=not train)
    return shortcut + y


class FigureMSABlock(nn.Module):
  """Pre-activation bottleneck whose 3x3 conv is replaced by multi-head self-attention
  (`msa_block='figure'`, designed from Fig. 11; see the module docstring).

  Attributes:
    features: bottleneck width f (output 4 f).
    num_heads: attention heads.
    head_dim: width per head.
    window: None (global over the feature map) or a window side dividing both map sides.
  """
  features: int
  num_heads: int
  head_dim: int = 32
  window: Optional[int] = None
  dtype: attention.Dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    y = nn.relu(resnet._norm(train, self.dtype)(x))
    shortcut = resnet._shortcut(x, y, out_features, 1, self.dtype)
    y = resnet._conv(self.features, 1, 1, self.dtype)(y)
    b, h, w, c = y.shape
    win = self.window or None
    if win is None:
      tokens = y.reshape(b, h * w, c)
    else:
      if h % win or w % win:
        raise errors.UserError(f'msa_window={win} must divide the feature map {h}x{w}.')
      tokens = y.reshape(b, h // win, win, w // win, win, c).transpose(0, 1, 3, 2, 4, 5)
      tokens = tokens.reshape(-1, win * win, c)
    tokens = nn.LayerNorm(dtype=self.dtype, param_dtype=jnp.float32)(tokens)
    tokens, _ = attention.MultiHeadAttention(
        self.num_heads, qkv_features=self.num_heads * self.head_dim, out_features=c,
        dtype=self.dtype, name='attention')(tokens)
    if win is None:
      y = tokens.reshape(b, h, w, c)
    else:
      y = tokens.reshape(b, h // win, w // win, win, win, c).transpose(0, 1, 3, 2, 4, 5)
      y = y.reshape(b, h, w, c)
    y = nn.relu(resnet._norm(train, self.dtype)(y))
    y = resnet._conv(out_features, 1, 1, self.dtype)(y)
    return shortcut + y


class AlterNet(nn.Module):
  """Alternating Conv / MSA pre-activation ResNet (default: Alter-ResNet-50 of Fig. 11).

  Attributes:
    num_classes: outputs of the head.
    blocks_per_stage: bottleneck blocks per stage (3, 4, 6, 4).
    msa_per_stage: how many of them are MSA blocks, placed by the build-up rule (0, 1, 3, 2).
    heads: MSA heads per stage (3, 6, 12, 24).
    msa_block: 'authors' (default, their `AttentionBlockB`) or 'figure' (module docstring).
    head_dim: width of each head; None = 64 ('authors') / 32 ('figure').
    msa_window: window side; None = 7 ('authors', which needs it to divide the map sides) /
      global MSA over the feature map ('figure').
    drop_path: stochastic depth of the last block, linear in the global block index as the
      authors' `sd * j / (blocks - 1)`; applied to the MSA blocks ('authors' only: the
      Conv blocks here have none).
    stem: 'cifar' or 'imagenet' (see resnet.py).
    width: bottleneck width of stage 1 (64); doubles per stage.
    dtype: compute dtype; parameters float32.
    smoothing, smoothing_temperature, smoothing_padding: the blur block (resnet.py).
    smoothing_stages: blur blocks after each stage; None = every stage but the last.
  """
  num_classes: int
  blocks_per_stage: Sequence[int] = (3, 4, 6, 4)
  msa_per_stage: Sequence[int] = (0, 1, 3, 2)
  heads: Sequence[int] = (3, 6, 12, 24)
  msa_block: str = 'authors'
  head_dim: Optional[int] = None
  msa_window: Optional[int] = None
  drop_path: float = 0.0
  stem: str = 'cifar'
  width: int = 64
  dtype: str = 'float32'
  smoothing: bool = False
  smoothing_stages: Optional[Sequence[int]] = None
  smoothing_temperature: float = 10.0
  smoothing_padding: str = 'authors'

  def __post_init__(self):
    # Tuples keep the module hashable when a config passes lists.
    for key in ('blocks_per_stage', 'msa_per_stage', 'heads'):
      object.__setattr__(self, key, tuple(int(v) for v in getattr(self, key)))
    alternet_layout(self.blocks_per_stage, self.msa_per_stage)
    if len(self.heads) != len(self.blocks_per_stage):
      raise errors.UserError(f'heads {tuple(self.heads)} needs one entry per stage '
                             f'({len(self.blocks_per_stage)} stages).')
    check_choice('stem', self.stem, resnet.STEMS)
    check_choice('msa_block', self.msa_block, MSA_BLOCKS)
    if self.msa_block == 'figure' and self.drop_path:
      raise errors.UserError("drop_path applies to msa_block='authors' only.")
    attention.resolve_dtype(self.dtype)
    resnet.check_smoothing(self, len(self.blocks_per_stage))
    windowed = self.msa_block == 'authors' or self.msa_window
    counts = resnet.smoothing_counts(self, len(self.blocks_per_stage), post_activation=False)
    grows = [s for s, n in enumerate(counts) if n and any(self.msa_per_stage[s + 1:])]
    if self.smoothing_padding == 'authors' and windowed and grows:
      raise errors.UserError(
          "smoothing_padding='authors' makes every smoothed map one pixel larger, "
          'so the MSA windows of later stages cannot tile them: use '
          "smoothing_padding='same' for AlterNet.")
    super().__post_init__()

  def _msa_block(self, features, num_heads, drop_path, dtype, name):
    if self.msa_block == 'figure':
      return FigureMSABlock(features, num_heads, self.head_dim or 32, self.msa_window,
                            dtype=dtype, name=name)
    return MSABlock(features, num_heads, self.head_dim or 64, self.msa_window or 7,
                    drop_path=drop_path, dtype=dtype, name=name)

  def block_kinds(self) -> List[str]:
    """'conv' or 'msa' for every block, indexed like `out['block{i}']`."""
    return [k for stage in alternet_layout(self.blocks_per_stage, self.msa_per_stage)
            for k in stage]

  @nn.compact
  def __call__(self, images, *, head_mask=None, train=False, capture_attention=False,
               div_layers=()):
    """Classifies `images [B, H, W, C]`; returns `(logits [B, num_classes] float32, out)`."""
    resnet.check_cnn_call('alternet', head_mask, capture_attention, div_layers)
    dtype = attention.resolve_dtype(self.dtype)
    out = {}
    x = resnet.make_stem(images.astype(dtype), self.stem, self.width, train, dtype)
    out['stem'] = x
    blocks, index, total = [], 0, sum(self.blocks_per_stage)
    for s, kinds in enumerate(alternet_layout(self.blocks_per_stage, self.msa_per_stage)):
      features = self.width * 2**s
      stage = []
      for b, kind in enumerate(kinds):
        name = f'stage{s + 1}_block{b}'
        rate = self.drop_path * index / max(total - 1, 1)
        index += 1
        if kind == 'msa':
          stage.append(self._msa_block(features, self.heads[s], rate, dtype, name))
        else:
          stage.append(preresnet.BottleneckBlock(
              features, strides=2 if s > 0 and b == 0 else 1, dtype=dtype, name=name))
      blocks.append(stage)
    x = resnet.run_stages(x, blocks, train, out, resnet.stage_smoothing(self),
                          resnet.smoothing_counts(self, len(blocks), post_activation=False))
    return resnet.classify(x, self.num_classes, train, dtype, out), out
