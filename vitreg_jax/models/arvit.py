"""ARViT, the Attention Regulated Vision Transformer (ARViT paper, Section 3.4, Fig. 2).

Paper definition (the default, `variant='paper'`):
  * convolutional patch embedding, kernel = stride = patch size (16);
  * fixed 2D sine-cosine position embedding added to every patch token;
  * 6 pre-norm encoder blocks, hidden size 516, 12 heads (head size 43);
  * the two-layer MLP of each block replaced by a single fully connected layer (D -> D, GELU);
  * no CLS token: the head reads the complete output of the last block, flattened to N * D.
The paper does not say whether the blocks are pre- or post-norm, nor which activation the
single layer uses; pre-norm and GELU are ViT's.

`variant='code'` is the authors' encoder of their patch-similarity runs
(mormille/self-attention-regularization: region_similarity_based/ARViT/ARViT.py, layers/
encoder.py, launch-ARViT.py; positional encoding in models/positional_encoding.py), a DETR
encoder (a PyTorch `nn.TransformerEncoderLayer` copy, `normalize_before=False`):

  ===================== ===================== ==========================================
  field                 paper (default)       authors' code (`variant='code'`)
  ===================== ===================== ==========================================
  width, num_heads      516, 12               512, 8 (their similarity runs; their distance
                                              runs use 516, 12: set the fields)
  norm                  'pre'                 'post': `LN(x + Attn(x))`, `LN(x + FFN(x))`
  posemb                'sincos2d'            'sincos2d_detr' (their channel layout)
  posemb_scale          1.0                   0.3
  posemb_at             'input' (added once)  'qkv': added to the query, key and value
                                              inputs of every block (their `q = k = v =
                                              src + pos`; 'qk' is DETR's original, value
                                              without it, as their older models/encoder.py)
  mlp_dim, activation   0 (single FC), gelu   256 (two layers D -> 256 -> D), relu
  dropout, attn_dropout 0, 0                  0.1, 0.1 (residual branches, FFN hidden layer,
                                              attention probabilities)
  pre_head_norm         False                 True (LayerNorm before flattening)
  layer_norm_eps        1e-6 (flax's)         1e-5 (PyTorch's `nn.LayerNorm` default)
  ===================== ===================== ==========================================

Each field can be set on its own (fields override the variant). Left as in the rest of the
library: parameter initialization, and the order in
which the head flattens the N x D features (theirs channel-major, a fixed permutation of the
head's rows). Their code also averages the attention map over heads (PyTorch's
`nn.MultiheadAttention` returns head-averaged weights); this affects only what the regularizer
sees, so the model keeps per-head maps in `out['block{i}']['attn']` and the regularizers offer
the averaging (the maps are the probabilities before attention dropout).

ARViT shares the encoder block of ViT (`encoder.Encoder`), so head masks, captured attention
and per-head inputs (`div_layers`) work identically.
"""

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from vitreg_jax import errors
from vitreg_jax.checks import check_choice
from vitreg_jax.models import attention
from vitreg_jax.models import encoder
from vitreg_jax.models.vit import grid_size

VARIANTS = {
    'paper': dict(width=516, num_heads=12, norm='pre', posemb='sincos2d', posemb_scale=1.0,
                  posemb_at='input', mlp_dim=0, activation='gelu', dropout=0.0,
                  attn_dropout=0.0, pre_head_norm=False, layer_norm_eps=1e-6),
    'code': dict(width=512, num_heads=8, norm='post', posemb='sincos2d_detr', posemb_scale=0.3,
                 posemb_at='qkv', mlp_dim=256, activation='relu', dropout=0.1,
                 attn_dropout=0.1, pre_head_norm=True, layer_norm_eps=1e-5),
}


class ARViT(nn.Module):
  """ARViT classifier.

  Attributes:
    num_classes: outputs of the head.
    variant: 'paper' (Section 3.4) or 'code' (the authors' encoder), see the module doc; the
      fields left None take the variant's value.
    width, num_heads: (516, 12) paper, (512, 8) code.
    depth, patch_size: 6, 16.
    mlp_dim: 0 = single fully connected layer (paper); > 0 = two-layer feed-forward.
    norm: 'pre' or 'post' blocks; activation: 'gelu' or 'relu' (feed-forward).
    posemb: 'sincos2d' or 'sincos2d_detr' (channel layouts); posemb_scale: its multiplier;
    posemb_at: 'input', 'qk' or 'qkv' (see `encoder.Encoder`).
    dropout, attn_dropout: on residual branches and FFN hidden layer / on the attention
      probabilities (training only).
    pre_head_norm: LayerNorm ('encoder_norm') on the last block's output before flattening.
    layer_norm_eps: epsilon of every LayerNorm: 1e-6 (paper) / 1e-5 (code, PyTorch's).
    head_dim, qkv_bias: attention head size (default width / heads) and q/k/v biases.
    local_window, drop_path, dtype, last_attn_residual, attention_impl, remat: as in ViT.
  """
  num_classes: int
  variant: str = 'paper'
  width: Optional[int] = None
  depth: int = 6
  num_heads: Optional[int] = None
  patch_size: int = 16
  mlp_dim: Optional[int] = None
  norm: Optional[str] = None
  activation: Optional[str] = None
  posemb: Optional[str] = None
  posemb_scale: Optional[float] = None
  posemb_at: Optional[str] = None
  pre_head_norm: Optional[bool] = None
  layer_norm_eps: Optional[float] = None
  head_dim: Optional[int] = None
  qkv_bias: bool = True
  local_window: Optional[int] = None
  dropout: Optional[float] = None
  attn_dropout: Optional[float] = None
  drop_path: float = 0.0
  dtype: str = 'float32'
  last_attn_residual: bool = True
  head_zeroinit: bool = True
  attention_impl: Optional[str] = None
  remat: bool = False

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise errors.UserError(f'Unknown ARViT variant {self.variant!r}; valid: {sorted(VARIANTS)}')
    for key, value in VARIANTS[self.variant].items():
      if getattr(self, key) is None:
        object.__setattr__(self, key, value)
    if self.head_dim is None and self.width % self.num_heads:
      raise errors.UserError(f'width {self.width} is not divisible by num_heads {self.num_heads}; '
                             'set head_dim to use heads of another size.')
    check_choice('norm', self.norm, encoder.NORMS)
    check_choice('activation', self.activation, tuple(encoder.ACTIVATIONS))
    check_choice('posemb', self.posemb, ('sincos2d', 'sincos2d_detr'))
    check_choice('posemb_at', self.posemb_at, encoder.POSEMB_AT)
    attention.resolve_dtype(self.dtype)
    super().__post_init__()

  def token_layout(self, image_hw: Sequence[int]) -> Tuple[int, int, int]:
    """(grid_h, grid_w, 0): patch tokens only, no CLS."""
    gh, gw = grid_size(image_hw, self.patch_size)
    return gh, gw, 0

  @nn.compact
  def __call__(self, images, *, head_mask=None, train=False, capture_attention=False,
               div_layers=(), expand_masks_at=None):
    """Classifies `images [B, H, W, C]`; returns `(logits [B, num_classes] float32, out)`."""
    dtype = attention.resolve_dtype(self.dtype)
    capture, div, head_mask = encoder.check_call_args(
        self, capture_attention, div_layers, head_mask)
    gh, gw, _ = self.token_layout(images.shape[1:3])
    x = encoder.embed_patches(images, self.width, self.patch_size, dtype, (gh, gw))
    mask = None
    if self.local_window is not None:
      mask = attention.local_attention_mask((gh, gw), self.local_window, 0)
    x, out = encoder.Encoder(
        self.depth, self.num_heads, self.mlp_dim, posemb=self.posemb,
        posemb_scale=self.posemb_scale, dropout=self.dropout, drop_path=self.drop_path,
        dtype=dtype, final_norm=self.pre_head_norm, last_attn_residual=self.last_attn_residual,
        attention_impl=self.attention_impl, remat=self.remat, head_dim=self.head_dim,
        qkv_bias=self.qkv_bias, norm=self.norm, activation=self.activation,
        attn_dropout=self.attn_dropout, posemb_at=self.posemb_at,
        layer_norm_eps=self.layer_norm_eps, name='Transformer')(
            x, grid_hw=(gh, gw), num_prefix_tokens=0, attn_mask=mask, head_mask=head_mask,
            capture=capture, div_layers=div, train=train,
            expand_masks_at=expand_masks_at)
    out['encoded'] = x
    x = x.reshape(x.shape[0], -1)  # the complete N x D output of the last block
    out['pre_logits'] = x
    init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
    logits = nn.Dense(self.num_classes, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                      name='head')(x).astype(jnp.float32)
    out['logits'] = logits
    return logits, out
