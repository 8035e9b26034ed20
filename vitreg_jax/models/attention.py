"""Multi-head self-attention shared by ViT, ARViT and AlterNet (the encoder: encoder.py).

One attention module serves every experiment of the three papers:

* **Fused or explicit.** By default a block calls `jax.nn.dot_product_attention` (cuDNN flash
  attention on a GPU when dtype and head size allow, XLA elsewhere), which never writes the
  `[B, H, N, N]` probabilities to memory. Blocks whose maps a regularizer or an analysis reads
  ("captured" blocks) compute `softmax(q k^T / sqrt(Dh))` explicitly and return it. Both paths
  compute the same function (tested to agree numerically).
* **Head masks** (head-selection poster, "Head selection" step 2-3): the per-head outputs
  `z_h = softmax(Q_h K_h^T / sqrt(Dh)) V_h` are multiplied by `m_h` and the concatenation by
  `H / sum_h m_h` before the output projection, so dropping a head equals removing its weights
  and rescaling the remaining heads by `H / kept`.
* **Per-head input copies** (DIV, "Diversity regularizer"): with `per_head_inputs` the block
  broadcasts its normalized input `x [B, N, D]` to `xh [B, H, N, D]`, routes it through
  `self.perturb('head_inputs', xh)` and computes head h's q, k, v from `xh[:, h]`. The gradient
  w.r.t. that perturbation is the input gradient through each head, in one backward pass.
  Flax's `perturb` is the identity when the `'perturbations'` collection is absent; when the
  collection is mutable (e.g. `init`, or `apply(..., mutable=['perturbations'])`) it creates
  zeros of the right shape; when present it must hold every requested block's entry.
* **Local attention** ("How do ViTs work?", Section 3 ablation): a boolean `[N, N]` mask that
  lets each patch token see only a k x k window of the patch grid (see
  `local_attention_mask`); prefix tokens (CLS) stay global. It works on both paths.

Parameter layout is flax's `MultiHeadDotProductAttention`: query/key/value kernels `[D, H, Dh]`,
biases `[H, Dh]`, output kernel `[H, Dh, D]`, bias `[D]`; the encoder uses the module names of
the public ViT checkpoints (`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/...`),
so `.npz` checkpoints map one to one (see `convert.py`).
"""

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitreg_jax import errors
from vitreg_jax.checks import resolve_layers

# Name of the flax perturbation that holds per-head input copies (`div_layers`). In ViT and
# ARViT it lives at `perturbations/Transformer/encoderblock_{i}/head_inputs`, shape [B, H, N, D].
PERTURBATION_NAME = 'head_inputs'
ATTENTION_IMPLEMENTATIONS = (None, 'xla', 'cudnn')
Dtype = Any


def resolve_dtype(dtype) -> jnp.dtype:
  """Returns a NumPy dtype for a name such as 'bfloat16' or a dtype; clear error otherwise."""
  try:
    return jnp.dtype(dtype)
  except TypeError as e:
    raise errors.UserError(f'Unknown dtype {dtype!r}; use e.g. "float32", "bfloat16" or '
                           '"float16".') from e


def parse_layers(value, depth: int, what: str) -> frozenset:
  """`capture_attention` / `div_layers` (False / () none, True every block, or 0-based block
  indices) as a frozenset of block indices (`checks.resolve_layers`, no negative indices)."""
  return frozenset(resolve_layers(value, depth, what, negative=False))


def local_attention_mask(grid_hw: Sequence[int], window: int,
                         num_prefix_tokens: int = 0) -> np.ndarray:
  """Boolean `[N, N]` mask (True = may attend) for k x k local attention on a patch grid.

  Patch token i at grid position (r_i, c_i) sees the k x k window of positions
  `[s(r_i), s(r_i) + k) x [s(c_i), s(c_i) + k)` with `s(p) = clip(p - k // 2, 0, G - k)` for a
  grid side G. The window is centred on the token (odd k) and shifted inwards at the borders,
  so every token sees exactly k x k patches (a sliding "neighbourhood attention" window). For an
  even k the token sits at offset k/2 of its window, i.e. it sees k/2 patches before it and
  k/2 - 1 after it along each axis. A window at least as large as a grid side covers that side
  completely, so k = 8 on the 8 x 8 grid of a 32-px image with patch 4 is global attention,
  matching "How do ViTs work?" (3 x 3, 5 x 5 local and 8 x 8 global MSAs). Prefix tokens (CLS)
  attend to everything and are seen by everything.

  Args:
    grid_hw: (grid_h, grid_w) patch grid.
    window: k >= 1.
    num_prefix_tokens: tokens before the patch tokens (CLS).
  Returns:
    np.ndarray bool of shape `[P + gh * gw, P + gh * gw]`.
  """
  if int(window) < 1:
    raise errors.UserError(
        f'local_window must be a positive int (k of a k x k window), got {window}.')
  gh, gw = (int(s) for s in grid_hw)

  def visible(size):
    k = min(int(window), size)
    pos = np.arange(size)
    start = np.clip(pos - k // 2, 0, size - k)
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + k)

  rows, cols = visible(gh), visible(gw)  # [gh, gh], [gw, gw]
  patch = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(gh * gw, gh * gw)
  n = num_prefix_tokens + gh * gw
  mask = np.ones((n, n), dtype=bool)
  mask[num_prefix_tokens:, num_prefix_tokens:] = patch
  return mask


def posemb_sincos_2d(grid_hw: Sequence[int], width: int,
                     temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2D sine-cosine position embedding `[1, gh * gw, width]` (row-major grid).

  A quarter of the channels each hold `sin(x w_j)`, `cos(x w_j)`, `sin(y w_j)`, `cos(y w_j)`
  with frequencies `w_j = temperature ** (-j / (width / 4 - 1))`, j = 0 .. width/4 - 1.
  """
  if width % 4:
    raise errors.UserError(f'posemb="sincos2d" needs a width divisible by 4, got {width}.')
  gh, gw = grid_hw
  y, x = np.mgrid[:gh, :gw]
  quarter = width // 4
  omega = 1.0 / temperature ** (np.arange(quarter) / max(quarter - 1, 1))
  y = y.reshape(-1, 1) * omega[None]
  x = x.reshape(-1, 1) * omega[None]
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


def posemb_sincos_2d_detr(grid_hw: Sequence[int], width: int,
                          temperature: float = 10_000.) -> np.ndarray:
  """The ARViT authors' fixed 2D sin/cos encoding `[1, gh * gw, width]` (row-major grid).

  Their `PositionalEncodingSin.positionalencoding2d` (mormille/self-attention-regularization,
  models/positional_encoding.py): with `h = width / 2` and frequencies
  `w_k = temperature ** (-2k / h)`, k = 0 .. h/2 - 1, channel `2k` holds `sin(x w_k)`, `2k+1`
  `cos(x w_k)` (x = column), channel `h + 2k` holds `sin(y w_k)` and `h + 2k + 1` `cos(y w_k)`
  (y = row): interleaved pairs, column half first. Same family as `posemb_sincos_2d`, with
  another channel order and frequencies spaced by `2/h` instead of `1/(width/4 - 1)`.
  """
  if width % 4:
    raise errors.UserError(f'posemb="sincos2d_detr" needs a width divisible by 4, got {width}.')
  gh, gw = grid_hw
  half = width // 2
  omega = temperature ** (-np.arange(0, half, 2) / half)  # [half / 2]
  y, x = np.mgrid[:gh, :gw]

  def pairs(p):  # [gh * gw, half]: sin, cos interleaved
    angle = p.reshape(-1, 1) * omega[None]
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(p.size, half)

  pe = np.concatenate([pairs(x), pairs(y)], axis=1)
  return pe[None].astype(np.float32)


def apply_head_mask(z: jax.Array, head_mask: jax.Array) -> jax.Array:
  """Masks and rescales per-head outputs (head-selection poster, steps 2-3).

  Args:
    z: per-head outputs `[B, N, H, Dh]`.
    head_mask: `[H]` (one mask) or `[B, H]` (one mask per example), 0/1 or soft.
  Returns:
    `z[..., h, :] * m_h * H / sum_h m_h`; a layer whose mask sums to 0 outputs zeros.
  """
  num_heads = z.shape[2]
  m = jnp.asarray(head_mask, jnp.float32)
  kept = m.sum(axis=-1, keepdims=True)
  # Double `where` keeps the gradient finite when every head of the layer is masked.
  scale = jnp.where(kept > 0, num_heads / jnp.where(kept > 0, kept, 1.0), 0.0)
  m = m * scale
  m = m[None, None] if m.ndim == 1 else m[:, None]  # [1|B, 1, H]
  return z * m[..., None].astype(z.dtype)


def _flat_init(init: Callable, num_in_axes: int) -> Callable:
  """Initializes a multi-axis kernel as the equivalent 2D matrix (fan-in/out as flax does)."""

  def wrapped(rng, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:num_in_axes])
    return init(rng, (fan_in, math.prod(shape[num_in_axes:])), dtype).reshape(shape)

  return wrapped


class HeadDense(nn.Module):
  """Projection `D -> (H, Dh)` with kernel `[D, H, Dh]` and bias `[H, Dh]` (query/key/value).

  Accepts a shared input `x [B, N, D]` or per-head inputs `xh [B, H, N, D]` (head h uses
  `xh[:, h]`: einsum `bhnd,dhk->bnhk`, the same FLOPs as the shared case). Returns
  `[B, N, H, Dh]`. `use_bias=False` drops the bias (the DIV authors' `to_qkv` and the
  "How do ViTs work?" authors' `to_q` / `to_kv` have none).
  """
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, per_head: bool = False) -> jax.Array:
    d = x.shape[-1]
    kernel = self.param('kernel', _flat_init(self.kernel_init, 1),
                        (d, self.num_heads, self.head_dim), jnp.float32)
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if per_head:
      y = jnp.einsum('bhnd,dhk->bnhk', x, kernel)
    else:
      y = jnp.einsum('bnd,dhk->bnhk', x, kernel)
    if not self.use_bias:
      return y
    bias = self.param('bias', nn.initializers.zeros, (self.num_heads, self.head_dim),
                      jnp.float32)
    return y + bias.astype(self.dtype)


def _choose_implementation(requested, dtype, head_dim, has_mask):
  if requested is not None:
    return requested
  # cuDNN flash attention handles fp16/bf16, head sizes multiple of 8 up to 128, no boolean
  # mask; every other case (CPU, TPU, fp32, local windows) goes to XLA.
  if (jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= 128 and not has_mask):
    return 'cudnn'
  return 'xla'


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention with head masks, optional explicit probabilities and per-head inputs.

  Attributes:
    num_heads: H.
    qkv_features: total q/k/v width H * Dh (default: input width). It may differ from the
      residual width D, as flax's `qkv_features` and lucidrains' `dim_head` (the DIV authors'
      MNIST-CIFAR model: D = 64, H = 4, Dh = 64, so H * Dh = 256).
    out_features: output width (default: input width).
    dtype: compute dtype; parameters stay float32.
    implementation: None (auto: cuDNN on GPU when possible, else XLA), 'xla' or 'cudnn';
      only used on the fused path.
    use_bias: biases on the query/key/value projections (the output projection always has
      one). False as lucidrains' `to_qkv` (DIV authors) and AlterNet's `to_q` / `to_kv`.
    attn_dropout: dropout on the attention probabilities while training (PyTorch's
      `nn.MultiheadAttention(dropout=...)`, the ARViT authors' encoder). A training call with
      a rate > 0 computes the probabilities explicitly (fused kernels have no dropout).
  """
  num_heads: int
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None
  use_bias: bool = True
  attn_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: Optional[jax.Array] = None,
               bias: Optional[jax.Array] = None, head_mask: Optional[jax.Array] = None,
               explicit: bool = False, per_head_inputs: bool = False,
               qk_pos: Optional[jax.Array] = None, v_pos: Optional[jax.Array] = None,
               train: bool = False):
    """Self-attention over tokens.

    Args:
      x: `[B, N, D]`, or `[B, H, N, D]` per-head inputs when `per_head_inputs`.
      mask: optional boolean `[N, N]` (True = may attend).
      bias: optional additive logit bias `[N, N]` or `[H, N, N]` (relative position bias).
      head_mask: optional `[H]` or `[B, H]`, see `apply_head_mask`.
      explicit: materialize the probabilities (returned as `aux['attn']`, float32
        `[B, H, N, N]`) instead of calling the fused kernel.
      per_head_inputs: `x` holds one input copy per head.
      qk_pos / v_pos: optional `[N, D]` (or broadcastable) added to the input of the query
        and key / of the value projections only (DETR-style position encoding in every
        layer, as the ARViT authors' encoder).
      train: enables `attn_dropout` (rng 'dropout').
    Returns:
      `(y [B, N, D_out], aux)` with `aux['head_out']` `[B, N, H, Dh]` the (masked, rescaled)
      head outputs that enter the output projection, and `aux['attn']` when explicit (the
      probabilities before attention dropout).
    """
    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise errors.UserError(f'attention implementation must be one of '
                             f'{ATTENTION_IMPLEMENTATIONS}, got {self.implementation!r}')
    d = x.shape[-1]
    features = self.qkv_features or d
    if features % self.num_heads:
      raise errors.UserError(f'qkv width {features} is not divisible by {self.num_heads} heads.')
    if per_head_inputs and (x.ndim != 4 or x.shape[1] != self.num_heads):
      raise ValueError(f'per-head inputs must be [B, {self.num_heads}, N, D], got {x.shape}.')
    head_dim = features // self.num_heads
    proj = lambda name: HeadDense(self.num_heads, head_dim, dtype=self.dtype,
                                  use_bias=self.use_bias, name=name)
    xqk = x if qk_pos is None else x + jnp.asarray(qk_pos, x.dtype)
    xv = x if v_pos is None else x + jnp.asarray(v_pos, x.dtype)
    q = proj('query')(xqk, per_head=per_head_inputs)  # [B, N, H, Dh]
    k = proj('key')(xqk, per_head=per_head_inputs)
    v = proj('value')(xv, per_head=per_head_inputs)

    aux = {}
    drop_attention = train and self.attn_dropout > 0
    if explicit or drop_attention:
      probs = _explicit_probs(q, k, head_dim, mask, bias)
      if explicit:
        aux['attn'] = probs
      if drop_attention:
        probs = nn.Dropout(self.attn_dropout)(probs, deterministic=False)
      z = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
    else:
      z = self._fused(q, k, v, head_dim, mask, bias)
    if head_mask is not None:
      z = apply_head_mask(z, head_mask)
    aux['head_out'] = z
    y = nn.DenseGeneral(self.out_features or d, axis=(-2, -1), dtype=self.dtype,
                        param_dtype=jnp.float32,
                        kernel_init=nn.initializers.xavier_uniform(), name='out')(z)
    return y, aux

  def _fused(self, q, k, v, head_dim, mask, bias):
    mask4 = None if mask is None else jnp.asarray(mask)[None, None]
    bias4 = None if bias is None else _bias4(bias, q.dtype)
    impl = _choose_implementation(self.implementation, q.dtype, head_dim,
                                  mask is not None or bias is not None)
    try:
      return jax.nn.dot_product_attention(q, k, v, bias=bias4, mask=mask4, implementation=impl)
    except (ValueError, NotImplementedError, RuntimeError):
      # Auto mode only: cuDNN checks shapes, dtypes and its version while tracing; anything
      # it rejects runs on the XLA kernel instead. An explicit request re-raises.
      if self.implementation is not None or impl == 'xla':
        raise
      return jax.nn.dot_product_attention(q, k, v, bias=bias4, mask=mask4, implementation='xla')


def _bias4(bias, dtype):
  bias = jnp.asarray(bias)
  return (bias[None, None] if bias.ndim == 2 else bias[None]).astype(dtype)


def _explicit_probs(q, k, head_dim, mask, bias):
  """`softmax(q k^T / sqrt(Dh) + bias)` in float32, masked entries excluded: `[B, H, N, N]`."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(head_dim).astype(np.float32)
  if bias is not None:
    logits = logits + _bias4(bias, jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)
