"""Vision Transformer (Dosovitskiy et al. 2021) with head masks and exposed attention.

Parameter names and shapes follow the public AugReg / big_vision ViT checkpoints
(`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `pre_logits`, `head`), so that
`convert.py` loads them one to one and the parameter counts equal the reference models
(Ti/16 5,717,416; S/16 22,050,664; B/16 86,567,656 at 224 px, 1000 classes, CLS, learned
position embedding). big_vision's current layout and timm's `state_dict` are converted to these
names by `convert.py`; `classifier='map'` adds big_vision's attention-pooling head
(`map_head.py`) and `gelu_approximate=False` the exact GELU of timm's models.

Call: `ViT(...).apply(variables, images, head_mask=None, train=False, capture_attention=False,
div_layers=(), expand_masks_at=None)` returns `(logits, out)`; see `vitreg_jax/models/encoder.py`
(`expand_masks_at`: every image under each of several head masks in one call),
`vitreg_jax/models/attention.py` and docs/design.md for `out` and the arguments.
"""

import re
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax.checks import check_choice
from vitreg_jax.models import attention
from vitreg_jax.models import encoder
from vitreg_jax.models import map_head

# Geometry of the named sizes (width, depth, mlp_dim, num_heads), as in the ViT paper / big_vision.
# 'Ti6x12' is the ViT-Tiny baseline of the ARViT paper (Table 1): ViT-Tiny width and MLP with
# ARViT's 6 blocks and 12 heads (head size 16).
SIZES = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
    'Ti6x12': (192, 6, 768, 12),
}
CLASSIFIERS = ('token', 'gap', 'map')
_GEOMETRY = ('width', 'depth', 'mlp_dim', 'num_heads', 'patch_size')


def decode_variant(variant: Optional[str]) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  if variant is None:
    return {}
  match = re.fullmatch(r'([A-Za-z0-9]+)/(\d+)', variant)
  if not match or match.group(1) not in SIZES:
    raise errors.UserError(f'Unknown ViT variant {variant!r}: use "<size>/<patch>" with size in '
                           f'{sorted(SIZES)} and an integer patch size, e.g. "Ti/16" or "S/4".')
  width, depth, mlp_dim, num_heads = SIZES[match.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(match.group(2)))


HEAD_INITS = ('lecun_normal', 'pytorch')


class Head(nn.Module):
  """Classifier `x @ kernel + bias` with the parameter names of `nn.Dense` ('kernel', 'bias').

  init: 'zeros' (big_vision), 'lecun_normal' (flax's Dense default, zero bias) or 'pytorch'
  (`torch.nn.Linear.reset_parameters`: kernel and bias uniform in `+-1/sqrt(fan_in)`, since
  kaiming_uniform with a = sqrt(5) has bound sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(fan_in)).
  """
  features: int
  init: str = 'zeros'
  dtype: attention.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    bound = 1.0 / np.sqrt(fan_in)
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound)
    kernel_init, bias_init = {
        'zeros': (nn.initializers.zeros, nn.initializers.zeros),
        'lecun_normal': (nn.initializers.lecun_normal(), nn.initializers.zeros),
        'pytorch': (uniform, uniform),
    }[self.init]
    kernel = self.param('kernel', kernel_init, (fan_in, self.features), jnp.float32)
    bias = self.param('bias', bias_init, (self.features,), jnp.float32)
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


def grid_size(image_hw: Sequence[int], patch_size: int) -> Tuple[int, int]:
  """Patch grid of an image; clear error when a side is not a multiple of the patch."""
  h, w = (int(s) for s in image_hw)
  if h % patch_size or w % patch_size:
    raise errors.UserError(f'Image size {h}x{w} is not divisible by patch_size={patch_size}.')
  return h // patch_size, w // patch_size


class ViT(nn.Module):
  """Vision Transformer classifier.

  Attributes:
    num_classes: outputs of the head (0: no head, logits are the pre-logits).
    variant: '<size>/<patch>' with size in `SIZES` ('Ti', 'S', 'M', 'B', 'L', 'H', 'Ti6x12'),
      e.g. 'Ti/16', 'S/4' (32-px and 64x32 inputs), 'Ti6x12/16' (ARViT paper's ViT-Tiny).
      Resolved when the module is constructed; explicit geometry fields override it.
    width, depth, mlp_dim, num_heads, patch_size: explicit geometry (override `variant`).
    classifier: 'token' (CLS token), 'gap' (mean of the encoded tokens, "How do ViTs work?")
      or 'map' (multihead attention pooling, big_vision's `pool_type='map'`, `map_head.py`).
    posemb: 'learn' (learned, over CLS and patches) or 'sincos2d' (fixed 2D sin-cos, patches).
    local_window: None (global attention) or k: every patch token attends only within a k x k
      window of the patch grid (`attention.local_attention_mask`; even k documented there);
      CLS stays global.
    representation_size: optional 'pre_logits' Dense + tanh before the head.
    dropout: dropout rate (after the position embedding, attention and MLP).
    drop_path: stochastic depth of the last block (linearly increasing from 0 over blocks).
    dtype: compute dtype ('float32', 'bfloat16', ...); parameters are float32.
    last_attn_residual: False removes the residual connection around the last block's
      attention (an option of the DIV authors' code).
    head_dim: width of each attention head; None = width / num_heads. `num_heads * head_dim`
      (the q/k/v width, flax's `qkv_features`) may differ from `width`: the DIV authors'
      MNIST-CIFAR model has width 64, 4 heads of size 64 (lucidrains' `dim_head`;
      ArmandNM/diverse-vit, diverse_vit/models/vision_transformer.py).
    qkv_bias: biases on the query/key/value projections (False in that model: `to_qkv` has
      `bias=False`).
    head_zeroinit: zero-initialize the head (as big_vision); False uses `head_init`.
    head_init: initializer of a non-zero head: 'lecun_normal' (flax's Dense default) or
      'pytorch' (`torch.nn.Linear`'s default, kernel and bias uniform in
      `+-1/sqrt(fan_in)`: the head of the DIV authors' PyTorch model).
    attention_impl: fused kernel choice: None (auto), 'xla' or 'cudnn'.
    remat: recompute block activations in the backward pass (less memory, same results).
    gelu_approximate: tanh GELU in the MLPs (flax default, big_vision, the AugReg checkpoints)
      or, with False, the exact erf GELU of PyTorch / timm (needed to reproduce timm's logits).
    layer_norm_eps: epsilon of every LayerNorm (blocks, 'encoder_norm', the MAP head): 1e-6,
      flax's default and timm's ViT's; 1e-5 is PyTorch's `nn.LayerNorm` default, the DIV
      authors' (ArmandNM/diverse-vit, diverse_vit/models/vision_transformer.py, `PreNorm`).
  """
  num_classes: int
  variant: Optional[str] = None
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  patch_size: Optional[int] = None
  classifier: str = 'token'
  posemb: str = 'learn'
  local_window: Optional[int] = None
  representation_size: Optional[int] = None
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: str = 'float32'
  last_attn_residual: bool = True
  head_dim: Optional[int] = None
  qkv_bias: bool = True
  head_zeroinit: bool = True
  head_init: str = 'lecun_normal'
  attention_impl: Optional[str] = None
  remat: bool = False
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6

  def __post_init__(self):
    # Fill the geometry from `variant` so `module.depth` / `module.num_heads` are ints.
    for key, value in decode_variant(self.variant).items():
      if getattr(self, key) is None:
        object.__setattr__(self, key, value)
    missing = [k for k in _GEOMETRY if getattr(self, k) is None]
    if missing:
      raise errors.UserError(f'ViT needs a variant (e.g. "Ti/16") or explicit {missing}.')
    check_choice('classifier', self.classifier, CLASSIFIERS)
    check_choice('posemb', self.posemb, encoder.POSEMBS)
    if not self.layer_norm_eps > 0:
      raise errors.UserError(f'layer_norm_eps must be > 0, got {self.layer_norm_eps}.')
    if self.head_dim is None and self.width % self.num_heads:
      raise errors.UserError(f'width {self.width} is not divisible by num_heads {self.num_heads}; '
                             'set head_dim to use heads of another size.')
    check_choice('head_init', self.head_init, HEAD_INITS)
    attention.resolve_dtype(self.dtype)
    super().__post_init__()

  def token_layout(self, image_hw: Sequence[int]) -> Tuple[int, int, int]:
    """(grid_h, grid_w, num_prefix_tokens) for images of size `image_hw`; CLS comes first."""
    gh, gw = grid_size(image_hw, self.patch_size)
    return gh, gw, int(self.classifier == 'token')

  @nn.compact
  def __call__(self, images, *, head_mask=None, train=False, capture_attention=False,
               div_layers=(), expand_masks_at=None):
    """Classifies `images [B, H, W, C]`; returns `(logits [B, num_classes] float32, out)`."""
    dtype = attention.resolve_dtype(self.dtype)
    capture, div, head_mask = encoder.check_call_args(
        self, capture_attention, div_layers, head_mask)
    gh, gw, num_prefix = self.token_layout(images.shape[1:3])
    x = encoder.embed_patches(images, self.width, self.patch_size, dtype, (gh, gw))
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (x.shape[0], 1, self.width)), x],
                          axis=1)
    mask = None
    if self.local_window is not None:
      mask = attention.local_attention_mask((gh, gw), self.local_window, num_prefix)

    x, out = encoder.Encoder(
        self.depth, self.num_heads, self.mlp_dim, posemb=self.posemb, dropout=self.dropout,
        drop_path=self.drop_path, dtype=dtype, last_attn_residual=self.last_attn_residual,
        attention_impl=self.attention_impl, remat=self.remat, head_dim=self.head_dim,
        qkv_bias=self.qkv_bias, gelu_approximate=self.gelu_approximate,
        layer_norm_eps=self.layer_norm_eps, name='Transformer')(
            x, grid_hw=(gh, gw), num_prefix_tokens=num_prefix, attn_mask=mask,
            head_mask=head_mask, capture=capture, div_layers=div, train=train,
            expand_masks_at=expand_masks_at)
    out['encoded'] = x
    if self.classifier == 'map':
      x = map_head.MAPHead(self.num_heads, self.mlp_dim, dtype=dtype,
                           gelu_approximate=self.gelu_approximate,
                           layer_norm_eps=self.layer_norm_eps, name='MAPHead_0')(x)
    else:
      x = x[:, 0] if self.classifier == 'token' else x.mean(axis=1)
    if self.representation_size:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=dtype, param_dtype=jnp.float32,
                           name='pre_logits')(x))
    out['pre_logits'] = x
    if self.num_classes:
      init = 'zeros' if self.head_zeroinit else self.head_init
      x = Head(self.num_classes, init, dtype, name='head')(x)
    logits = x.astype(jnp.float32)
    out['logits'] = logits
    return logits, out

