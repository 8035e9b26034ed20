"""The pre-norm (or post-norm) Transformer encoder shared by ViT and ARViT.

`Encoder` stacks `EncoderBlock`s (attention from `attention.py`, then `MlpBlock`), adds the
position embeddings (`learn`, `sincos2d`, `sincos2d_detr`; at the input or inside q/k(/v)),
and returns the per-block intermediates in `out` (docs/design.md, Models). `check_call_args`
validates a ViT-like model's per-call arguments (`capture_attention`, `div_layers`,
`head_mask`); `embed_patches` is the non-overlapping patch embedding.

Module names follow the public ViT checkpoints (`Transformer/encoderblock_{i}/...`), so
`.npz` checkpoints map one to one (see `convert.py`).
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitreg_jax import errors
from vitreg_jax.checks import check_choice
from vitreg_jax.models import attention


ACTIVATIONS = {'gelu': nn.gelu, 'relu': nn.relu}
NORMS = ('pre', 'post')
POSEMB_AT = ('input', 'qk', 'qkv')


class MlpBlock(nn.Module):
  """Feed-forward sub-layer: `Dense(mlp_dim) -> act -> Dense(D)`, or with `mlp_dim=0` a single
  fully connected layer `Dense(D) -> act` (ARViT, paper Section 3.4). `act` is GELU (ViT) or
  ReLU (the ARViT authors' PyTorch encoder, `activation="relu"`).

  `gelu_approximate`: the tanh form of GELU (flax's default, used by big_vision and the public
  JAX ViTs) or, with False, the exact erf form (PyTorch's `nn.GELU`, used by timm)."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: attention.Dtype = jnp.float32
  activation: str = 'gelu'
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dense = lambda n: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                               kernel_init=nn.initializers.xavier_uniform(),
                               bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    y = dense(self.mlp_dim or d)(x)
    if self.activation == 'gelu':
      y = nn.gelu(y, approximate=self.gelu_approximate)
    else:
      y = ACTIVATIONS[self.activation](y)
    if self.mlp_dim:
      y = nn.Dropout(self.dropout)(y, deterministic=not train)
      y = dense(d)(y)
    return y


class EncoderBlock(nn.Module):
  """Transformer block, pre-norm (ViT) or post-norm (the ARViT authors' DETR-style encoder).

  pre:  `x + Attn(LN(x))`, then `x + MLP(LN(x))`.
  post: `LN(x + Attn(x))`, then `LN(x + MLP(x))` (PyTorch `normalize_before=False`).

  Attributes:
    num_heads: H.
    mlp_dim: hidden width of the feed-forward; 0 = single fully connected layer.
    dropout: dropout after attention and in the feed-forward.
    drop_path: stochastic-depth rate of this block (whole residual branches dropped per example).
    attn_residual: False drops the residual connection around the attention (DIV authors' code,
      last block).
    head_dim: width per head (default D / H); H * head_dim may differ from D.
    qkv_bias: biases on the query/key/value projections.
    norm: 'pre' or 'post' (see above).
    activation: feed-forward nonlinearity, 'gelu' or 'relu'.
    attn_dropout: dropout on the attention probabilities while training.
    gelu_approximate: tanh GELU in the MLP (True) or exact erf GELU (timm), see `MlpBlock`.
    layer_norm_eps: epsilon of both LayerNorms (flax's 1e-6; PyTorch's `nn.LayerNorm` 1e-5).
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: attention.Dtype = jnp.float32
  attn_residual: bool = True
  attention_impl: Optional[str] = None
  head_dim: Optional[int] = None
  qkv_bias: bool = True
  norm: str = 'pre'
  activation: str = 'gelu'
  attn_dropout: float = 0.0
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None, head_mask=None, explicit=False, per_head_inputs=False,
               train=False, pos=None, pos_to_values=False):
    """Applies the block to `x [B, N, D]`.

    Args:
      mask: optional boolean `[N, N]` attention mask (local windows).
      head_mask: optional `[H]` or `[B, H]` head mask.
      explicit: materialize the attention probabilities (`out['attn']`).
      per_head_inputs: give each head its own (perturbable) copy of the attention input (the
        normalized input in a pre-norm block, the block input in a post-norm one).
      train: enable dropout and stochastic depth (rng 'dropout').
      pos: optional `[N, D]` position encoding added to the query/key inputs of this block
        (and to the value inputs with `pos_to_values`).
    Returns:
      `(x_out, out)` with `out` = {'input', 'head_out', 'after_attn', 'output'[, 'attn']}.
    """
    out = {'input': x}
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    # Stochastic depth: one Bernoulli per example, shared across tokens and channels.
    drop_path = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(
        y, deterministic=not train)
    layer_norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                           param_dtype=jnp.float32, name=name)
    pre = self.norm == 'pre'
    y = layer_norm('LayerNorm_0')(x) if pre else x
    if per_head_inputs:
      b, n, d = y.shape
      y = jnp.broadcast_to(y[:, None], (b, self.num_heads, n, d))
      y = self.perturb(attention.PERTURBATION_NAME, y)
    qkv_features = None if self.head_dim is None else self.num_heads * self.head_dim
    y, aux = attention.MultiHeadAttention(self.num_heads, qkv_features=qkv_features, dtype=self.dtype,
                                implementation=self.attention_impl, use_bias=self.qkv_bias,
                                attn_dropout=self.attn_dropout,
                                name='MultiHeadDotProductAttention_0')(
        y, mask=mask, head_mask=head_mask, explicit=explicit, per_head_inputs=per_head_inputs,
        qk_pos=pos, v_pos=pos if pos_to_values else None, train=train)
    out.update(aux)
    y = drop(y)
    # Stochastic depth drops a residual branch; without the residual there is nothing to skip to.
    x = x + drop_path(y) if self.attn_residual else y
    if not pre:
      x = layer_norm('LayerNorm_0')(x)
    out['after_attn'] = x  # the residual stream between the two sub-blocks (Fourier analysis)
    y = layer_norm('LayerNorm_1')(x) if pre else x
    y = MlpBlock(self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                 activation=self.activation,
                 gelu_approximate=self.gelu_approximate, name='MlpBlock_0')(y, train)
    x = x + drop_path(drop(y))
    if not pre:
      x = layer_norm('LayerNorm_1')(x)
    out['output'] = x
    return x, out


class AddPositionEmbs(nn.Module):
  """Learned position embedding `pos_embedding [1, N, D]` over all tokens (CLS included)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                    (1,) + x.shape[1:], jnp.float32)
    return x + pe.astype(x.dtype)


POSEMBS = ('learn', 'sincos2d', 'sincos2d_detr')


class Encoder(nn.Module):
  """Position embedding, `depth` encoder blocks and the final LayerNorm (module 'Transformer').

  Attributes:
    depth, num_heads, mlp_dim: block geometry (mlp_dim 0 = single FC layer).
    posemb: 'learn' (over all tokens, as the public ViT checkpoints), 'sincos2d' (fixed, on
      patch tokens only, big_vision layout) or 'sincos2d_detr' (fixed, the ARViT authors'
      layout, see `attention.posemb_sincos_2d_detr`).
    posemb_scale: multiplier of the fixed sin-cos embedding.
    posemb_at: where a fixed embedding enters: 'input' (added once to the tokens, ViT),
      'qk' (added to the query/key inputs of every block, DETR) or 'qkv' (to the query, key
      and value inputs of every block, the ARViT authors' similarity encoder).
    dropout: after the position embedding (pre-norm only) and inside the blocks.
    drop_path: stochastic depth of the last block; block i uses `drop_path * i / (depth - 1)`
      (linear decay rule of Huang et al. 2016).
    final_norm: apply 'encoder_norm' after the last block.
    last_attn_residual: keep the residual connection around the last block's attention.
    remat: recompute each block's activations in the backward pass (`nn.remat`): less memory
      for large batches, about one extra forward of compute; same parameters and results.
    head_dim, qkv_bias, norm, activation, attn_dropout: per block, see `EncoderBlock`.
    gelu_approximate: tanh GELU (True) or exact erf GELU (timm) in every block's MLP.
    layer_norm_eps: epsilon of every LayerNorm (the blocks' and 'encoder_norm').
  """
  depth: int
  num_heads: int
  mlp_dim: int
  posemb: str = 'learn'
  posemb_scale: float = 1.0
  dropout: float = 0.0
  drop_path: float = 0.0
  dtype: attention.Dtype = jnp.float32
  final_norm: bool = True
  last_attn_residual: bool = True
  attention_impl: Optional[str] = None
  remat: bool = False
  head_dim: Optional[int] = None
  qkv_bias: bool = True
  norm: str = 'pre'
  activation: str = 'gelu'
  attn_dropout: float = 0.0
  posemb_at: str = 'input'
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6

  def _position_encoding(self, x, grid_hw, num_prefix_tokens):
    """Returns `(x, pos)`: tokens with the embedding added at the input, or the `[N, D]`
    encoding every block adds to its query/key (/value) inputs (zero on prefix tokens)."""
    check_choice('posemb', self.posemb, POSEMBS)
    check_choice('posemb_at', self.posemb_at, POSEMB_AT)
    if self.posemb == 'learn':
      if self.posemb_at != 'input':
        raise errors.UserError("posemb_at='qk'/'qkv' needs a fixed posemb ('sincos2d' or "
                               "'sincos2d_detr'), not 'learn'.")
      return AddPositionEmbs(name='posembed_input')(x), None
    fn = attention.posemb_sincos_2d if self.posemb == 'sincos2d' else attention.posemb_sincos_2d_detr
    pe = jnp.asarray(fn(grid_hw, x.shape[-1]) * self.posemb_scale, x.dtype)[0]
    pe = jnp.pad(pe, ((num_prefix_tokens, 0), (0, 0)))
    if self.posemb_at == 'input':
      return x + pe, None
    return x, pe

  @nn.compact
  def __call__(self, x, *, grid_hw, num_prefix_tokens=0, attn_mask=None, head_mask=None,
               capture=frozenset(), div_layers=frozenset(), train=False,
               expand_masks_at=None):
    """Runs the encoder on tokens `x [B, P + gh * gw, D]`.

    Args:
      head_mask: None, `[depth, H]` or `[B, depth, H]`; with `expand_masks_at`, `[C, depth, H]`
        (C masks, each applied to every example).
      capture / div_layers: sets of block indices (see `attention.parse_layers`).
      expand_masks_at: None, or a block index l in `[0, depth]`: evaluate the B examples under
        each of the C masks of `head_mask`. Blocks before l, where the caller guarantees that
        all C masks agree (mask 0 is used), run once on the B examples; block l's input is
        then tiled mask-major to `[C * B, ...]` (row `c * B + b` = example b under mask c).
        Scoring masks that differ only in the last block thus costs one forward pass plus C
        last blocks (head selection, `vitreg_jax.heads`).
    Returns:
      `(encoded [B, N, D] (or [C * B, N, D] when expanding), out)` with `out['block{i}']` dicts.
    """
    check_choice('norm', self.norm, NORMS)
    check_choice('activation', self.activation, tuple(ACTIVATIONS))
    x, pos = self._position_encoding(x, grid_hw, num_prefix_tokens)
    if self.norm == 'pre':  # ViT's embedding dropout; the post-norm DETR encoder has none
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    out = {}
    # Arguments 4-6 and 8 (explicit, per_head_inputs, train, pos_to_values) are Python bools:
    # static under remat.
    block_cls = (nn.remat(EncoderBlock, static_argnums=(4, 5, 6, 8)) if self.remat
                 else EncoderBlock)
    attn_mask = None if attn_mask is None else jnp.asarray(attn_mask)
    expand = _MaskExpansion(head_mask, expand_masks_at, self.depth)
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)
      x, block_mask = expand(x, i)
      x, out[f'block{i}'] = block_cls(
          self.num_heads, self.mlp_dim, dropout=self.dropout, drop_path=rate, dtype=self.dtype,
          attn_residual=self.last_attn_residual or i < self.depth - 1,
          attention_impl=self.attention_impl, head_dim=self.head_dim, qkv_bias=self.qkv_bias,
          norm=self.norm, activation=self.activation, attn_dropout=self.attn_dropout,
          gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps,
          name=f'encoderblock_{i}')(
              x, attn_mask, block_mask, i in capture, i in div_layers, train, pos,
              self.posemb_at == 'qkv')
    x, _ = expand(x, self.depth)
    if self.final_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                       name='encoder_norm')(x)
    return x, out


class _MaskExpansion:
  """Block i's input and head mask, for `Encoder(..., expand_masks_at=l)` (see there).

  Without expansion: `x` unchanged and `head_mask[..., i, :]`. With it: before block l the
  shared mask `head_mask[0, i]` on the B examples; at block l (or after the last block, l =
  depth) `x` is tiled to `[C * B, ...]`; from then on each row gets its own mask's row.
  """

  def __init__(self, head_mask, at, depth: int):
    if at is not None:
      if head_mask is None or head_mask.ndim != 3:
        raise ValueError('expand_masks_at needs head_mask of shape [C, depth, heads], got '
                         f'{None if head_mask is None else head_mask.shape}.')
      if not 0 <= int(at) <= depth:
        raise ValueError(f'expand_masks_at must be a block index in [0, {depth}], got {at}.')
    self.head_mask, self.at = head_mask, None if at is None else int(at)

  def __call__(self, x, i: int):
    m = self.head_mask
    if m is None:
      return x, None
    if self.at is None:
      return x, m[..., i, :] if i < m.shape[-2] else None
    c = m.shape[0]
    if i == self.at:
      x = jnp.tile(x, (c,) + (1,) * (x.ndim - 1))
    if i >= m.shape[-2]:  # After the last block.
      return x, None
    if i < self.at:
      return x, m[0, i]
    return x, jnp.repeat(m[:, i], x.shape[0] // c, axis=0)


def check_call_args(module, capture_attention, div_layers, head_mask):
  """Validates the per-call arguments of a ViT-like `module` (fields depth, num_heads).

  Returns:
    `(capture, div, head_mask)`: block-index tuples for `capture_attention` and `div_layers`
    and the checked head mask (see `attention.parse_layers`, `check_head_mask`).
  """
  return (attention.parse_layers(capture_attention, module.depth, 'capture_attention'),
          attention.parse_layers(div_layers, module.depth, 'div_layers'),
          check_head_mask(head_mask, module.depth, module.num_heads))


def embed_patches(images, width: int, patch_size: int, dtype, grid_hw):
  """Non-overlapping patch embedding (a conv with kernel = stride = patch) -> `[B, N, width]`.

  Must be called inside a compact module method: it creates the `embedding` submodule there.
  """
  p = patch_size
  x = nn.Conv(width, (p, p), strides=(p, p), padding='VALID', dtype=dtype,
              param_dtype=jnp.float32, name='embedding')(images.astype(dtype))
  return x.reshape(x.shape[0], grid_hw[0] * grid_hw[1], width)


def check_head_mask(head_mask, depth: int, num_heads: int):
  """Validates a `[depth, H]` or `[B, depth, H]` head mask (None passes)."""
  if head_mask is None:
    return None
  head_mask = jnp.asarray(head_mask)
  if head_mask.ndim not in (2, 3) or head_mask.shape[-2:] != (depth, num_heads):
    raise errors.UserError(f'head_mask must have shape [depth, heads] = [{depth}, {num_heads}] (or '
                           f'[batch, {depth}, {num_heads}]), got {head_mask.shape}.')
  return head_mask
