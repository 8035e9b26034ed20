"""ARViT's attention-map penalties: spatial distance and patch similarity.

* **Spatial distance penalty** (ARViT paper, section 3.2): `L_D = sum_{n,m} A[n,m] P[n,m]`
  with `P` a function of the Manhattan distance between patch positions
  (`distance_penalty_matrix`, `distance_loss`).
* **Patch similarity penalty** (ARViT paper, section 3.3, Fig. 1): `L_S = sum A * S` with
  `S[n,m]` the mean squared error between the channel Gram matrices of patches n and m
  (`patch_gram_matrices`, `similarity_matrix`, `similarity_loss`).

Where the paper and the authors' public code differ, the paper's definition is the default
and the code's variant an option; each docstring says which is which. `DISTANCE` and
`SIMILARITY` are their entries in the regularizer registry (`registry.py`), registered as
'distance' and 'similarity'.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vitreg_jax import errors
from vitreg_jax.checks import check_choice
from vitreg_jax.regularizers import registry

Array = jax.Array

PENALTY_KINDS = ('normalized', 'smooth_sign', 'offset')
SIMILARITY_METRICS = ('mse', 'minkowski')
BATCH_REDUCTIONS = ('mean', 'sum')

def manhattan_distance_matrix(grid_h: int, grid_w: int) -> Array:
  """`D[n, m] = |r_n - r_m| + |c_n - c_m|` for patches in row-major order on a grid.

  Args:
    grid_h, grid_w: patch grid (non-square grids allowed).

  Returns:
    `[N, N]` float32, N = grid_h * grid_w (computed from iota, so no large constant
    ends up in the compiled program).
  """
  rows = jnp.repeat(jnp.arange(grid_h), grid_w)
  cols = jnp.tile(jnp.arange(grid_w), grid_h)
  return (jnp.abs(rows[:, None] - rows[None, :])
          + jnp.abs(cols[:, None] - cols[None, :])).astype(jnp.float32)


def distance_penalty_matrix(grid_h: int, grid_w: int, kind: str = 'normalized', *,
                            alpha: float = 4.0, beta: float = 0.5,
                            gamma: float = 0.1) -> Array:
  """Penalty matrix `P` of the spatial distance loss (ARViT paper, section 3.2).

  The paper only asks that P grows with the Manhattan distance D; with `m[n] = max_m D[n,m]`
  (row maximum):
    'normalized' (default, the plain reading of the paper): `P = D / max(D)`, in [0, 1];
    'smooth_sign' (authors' code, penalty_factor "2"):
      `P = (D - m/alpha) / sqrt((D - m/alpha)^2 + beta)`: near patches (D < m/alpha) get a
      negative penalty (a reward), far ones a positive one, saturating at +-1;
    'offset' (authors' code, penalty_factor "1"): `P = (D + gamma) / (m + 1)`.

  Args:
    grid_h, grid_w: patch grid.
    kind: one of PENALTY_KINDS.
    alpha, beta: 'smooth_sign' constants (authors: 4 and 0.5).
    gamma: 'offset' constant (authors: 0.1).

  Returns:
    `[N, N]` float32.
  """
  check_choice('distance penalty kind', kind, PENALTY_KINDS)
  d = manhattan_distance_matrix(grid_h, grid_w)
  row_max = jnp.max(d, axis=1, keepdims=True)
  if kind == 'normalized':
    return d / jnp.maximum(jnp.max(d), 1.0)
  if kind == 'smooth_sign':
    a = d - row_max / alpha
    return a / jnp.sqrt(a * a + beta)
  return (d + gamma) / (row_max + 1.0)


def _min_max(x: Array, axes: tuple[int, ...], eps: float = 1e-12) -> Array:
  lo = jnp.min(x, axis=axes, keepdims=True)
  hi = jnp.max(x, axis=axes, keepdims=True)
  return (x - lo) / jnp.maximum(hi - lo, eps)


def attention_map_loss(attn: Array, penalty: Array, *, num_prefix_tokens: int = 0,
                       per_head: bool = False, normalize_attention: bool = False,
                       bias: float = 0.0, log: bool = False,
                       batch_reduction: str = 'mean') -> Array:
  """`sum_{n,m} A[n,m] (P[n,m] + bias)` per image, reduced over the batch (ARViT 3.2/3.3).

  Args:
    attn: `[B, H, T, T]` attention probabilities (or `[B, T, T]`, one map per image);
      T = num_prefix_tokens + N. Computed in float32.
    penalty: `[N, N]` (shared, e.g. the distance penalty) or `[B, N, N]` (per image, e.g.
      the similarity matrix).
    num_prefix_tokens: leading tokens (CLS) to drop from both axes of A.
    per_head: False (default): the head-averaged map `A = mean_h A_h`, the single map per
      block of the paper and of the authors' PyTorch `nn.MultiheadAttention`; True: each
      head's map is penalized (normalized and logged) separately and the per-head losses
      are averaged over heads. Without `normalize_attention` and `log` both give the same
      value, since the loss is linear in A.
    normalize_attention: min-max normalize each image's (or head's) N x N map to [0, 1]
      first (authors' code for the distance penalty).
    bias: added to the penalty (authors' similarity code: -0.17; default 0).
    log: return `log(max(L, 1))` of the batch-reduced value (authors' code).
    batch_reduction: 'mean' (default) or 'sum' (authors' code: one sum over the batch).

  Returns:
    float32 scalar.
  """
  check_choice('batch_reduction', batch_reduction, BATCH_REDUCTIONS)
  if attn.ndim == 3:
    attn = attn[:, None]
  if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
    raise ValueError(f'attention maps must be [B, H, T, T] or [B, T, T], got {attn.shape}.')
  a = attn[..., num_prefix_tokens:, num_prefix_tokens:].astype(jnp.float32)
  n = a.shape[-1]
  if penalty.shape[-2:] != (n, n):
    raise ValueError(f'penalty of shape {penalty.shape} does not match the {n} patch tokens '
                     f'of the attention map {attn.shape} (num_prefix_tokens='
                     f'{num_prefix_tokens}).')
  if not per_head:
    a = jnp.mean(a, axis=1, keepdims=True)
  if normalize_attention:
    a = _min_max(a, axes=(-2, -1))
  p = penalty.astype(jnp.float32) + bias
  if p.ndim == 3:
    p = p[:, None]
  per_map = jnp.sum(a * p, axis=(-2, -1))  # [B, H or 1]
  per_image = jnp.mean(per_map, axis=1)
  total = jnp.mean(per_image) if batch_reduction == 'mean' else jnp.sum(per_image)
  if log:
    total = jnp.log(jnp.maximum(total, 1.0))
  return total


def distance_loss(attn: Array, grid_hw: tuple[int, int], *, num_prefix_tokens: int = 0,
                  penalty: str = 'normalized', alpha: float = 4.0, beta: float = 0.5,
                  gamma: float = 0.1, **map_loss_options) -> Array:
  """Spatial distance attention penalty `L_D = sum_{n,m} A[n,m] P[n,m]` (ARViT 3.2).

  Args:
    attn: `[B, H, T, T]` attention probabilities of one block.
    grid_hw: `(grid_h, grid_w)` patch grid of the N = T - num_prefix_tokens patch tokens.
    num_prefix_tokens: leading non-patch tokens (CLS), excluded.
    penalty, alpha, beta, gamma: see `distance_penalty_matrix`.
    **map_loss_options: per_head, normalize_attention, bias, log, batch_reduction (see
      `attention_map_loss`). The authors' code: penalty='smooth_sign', log=True,
      batch_reduction='sum' (their model also min-max normalizes A:
      normalize_attention=True).

  Returns:
    float32 scalar (batch mean of the per-image sums by default).
  """
  p = distance_penalty_matrix(*grid_hw, penalty, alpha=alpha, beta=beta, gamma=gamma)
  return attention_map_loss(attn, p, num_prefix_tokens=num_prefix_tokens, **map_loss_options)


def _pair(x) -> tuple[int, int]:
  if isinstance(x, (tuple, list)):
    if len(x) != 2:
      raise errors.UserError(f'expected an int or a pair (h, w), got {x!r}.')
    return int(x[0]), int(x[1])
  return int(x), int(x)


def patch_gram_matrices(images: Array, grid_hw: tuple[int, int],
                        region_size=None) -> Array:
  """Channel Gram matrix of the pixel region of every patch (ARViT 3.3, Fig. 1).

  For the region `F` (channels x pixels) of patch n: `G_n = F F^T / (channels * C^2)`, the
  style representation of Gatys et al. Patch (i, j) of the `grid_h x grid_w` grid covers
  pixels `[i*ph, (i+1)*ph) x [j*pw, (j+1)*pw)` with `ph = H // grid_h` (the patch size).
  With the default `region_size` (the patch size) the region is the patch itself; another
  `C` uses the C x C window centred on the patch, zero-padded outside the image, still
  normalized by `channels * C^2`. Vectorized: a reshape (default) or one `reduce_window`.

  Args:
    images: `[B, H, W, Ch]`.
    grid_hw: patch grid `(grid_h, grid_w)` of the model (`module.token_layout`).
    region_size: None (patch size), an int C or a pair (Ch, Cw).

  Returns:
    `[B, N, Ch, Ch]` float32, patches in row-major order.
  """
  x = images.astype(jnp.float32)
  b, h, w, ch = x.shape
  gh, gw = grid_hw
  ph, pw = h // gh, w // gw
  if ph == 0 or pw == 0:
    raise errors.UserError(f'image {h}x{w} is smaller than the patch grid {gh}x{gw}.')
  rh, rw = (ph, pw) if region_size is None else _pair(region_size)
  if (rh, rw) == (ph, pw):
    f = x[:, :gh * ph, :gw * pw].reshape(b, gh, ph, gw, pw, ch)
    f = f.transpose(0, 1, 3, 5, 2, 4).reshape(b, gh * gw, ch, ph * pw)
    gram = jnp.einsum('bncp,bndp->bncd', f, f, precision=jax.lax.Precision.HIGHEST)
    return gram / (ch * ph * pw)
  # General region: the Gram entry (c, d) is the windowed sum of the pixelwise products.
  prods = (x[..., :, None] * x[..., None, :]).reshape(b, h, w, ch * ch)
  off_h, off_w = (ph - rh) // 2, (pw - rw) // 2  # window start relative to patch start
  prods = jnp.pad(prods, ((0, 0), (rh, rh), (rw, rw), (0, 0)))
  prods = prods[:, rh + off_h:rh + off_h + (gh - 1) * ph + rh,
                rw + off_w:rw + off_w + (gw - 1) * pw + rw]
  sums = jax.lax.reduce_window(prods, 0.0, jax.lax.add, (1, rh, rw, 1), (1, ph, pw, 1),
                               'VALID')
  return sums.reshape(b, gh * gw, ch, ch) / (ch * rh * rw)


def similarity_matrix(images: Array, grid_hw: tuple[int, int], *, region_size=None,
                      metric: str = 'mse', p: float = 0.1, eps: float = 1e-6,
                      normalize: bool = False) -> Array:
  """Pairwise style distance `S[n, m]` between the patches' Gram matrices (ARViT 3.3).

  'mse' (paper, default): `S[n,m] = mean_k (G_n[k] - G_m[k])^2` over the Ch x Ch entries:
  symmetric, non-negative, zero diagonal. Computed as `|G_n|^2 + |G_m|^2 - 2 G_n.G_m`
  (one matmul, O(N^2) memory), clamped at 0, symmetrized, with an exact zero diagonal.
  'minkowski' (authors' code, `nn.PairwiseDistance(p=0.1)`):
  `S[n,m] = (sum_k |G_n[k] - G_m[k] + eps|^p)^(1/p)` with p = 0.1 and torch's eps = 1e-6
  (so the diagonal is `(Ch^2)^(1/p) * eps`, not 0; pass eps=0 for a hollow matrix). For
  p < 1 this is not a metric; it is dominated by the entry-wise differences of the
  smallest magnitude. Memory O(B N^2 Ch^2).

  Always under `stop_gradient`: S is a function of the input image only.

  Args:
    images: `[B, H, W, Ch]`.
    grid_hw: patch grid.
    region_size: see `patch_gram_matrices`.
    metric: one of SIMILARITY_METRICS.
    p, eps: 'minkowski' constants.
    normalize: min-max normalize each image's N x N matrix to [0, 1] (authors' code).

  Returns:
    `[B, N, N]` float32.
  """
  check_choice('similarity metric', metric, SIMILARITY_METRICS)
  gram = jax.lax.stop_gradient(patch_gram_matrices(images, grid_hw, region_size))
  b, n = gram.shape[:2]
  g = gram.reshape(b, n, -1)
  k = g.shape[-1]
  if metric == 'mse':
    sq = jnp.sum(g * g, axis=-1)
    dot = jnp.einsum('bnk,bmk->bnm', g, g, precision=jax.lax.Precision.HIGHEST)
    s = jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * dot, 0.0) / k
    s = 0.5 * (s + jnp.swapaxes(s, 1, 2)) * (1.0 - jnp.eye(n, dtype=s.dtype))
  else:
    diff = jnp.abs(g[:, :, None, :] - g[:, None, :, :] + eps)
    s = jnp.sum(diff ** p, axis=-1) ** (1.0 / p)
  if normalize:
    s = _min_max(s, axes=(1, 2))
  return jax.lax.stop_gradient(s)


def similarity_loss(attn: Array, images: Array, grid_hw: tuple[int, int], *,
                    num_prefix_tokens: int = 0, region_size=None, metric: str = 'mse',
                    p: float = 0.1, eps: float = 1e-6, normalize_similarity: bool = False,
                    **map_loss_options) -> Array:
  """Patch similarity attention penalty `L_S = sum_{n,m} A[n,m] S[n,m]` (ARViT 3.3).

  Args:
    attn: `[B, H, T, T]` attention probabilities of one block.
    images: `[B, H, W, Ch]` the model's input images (S carries no gradient).
    grid_hw: patch grid of the N patch tokens.
    num_prefix_tokens: leading non-patch tokens (CLS), excluded.
    region_size, metric, p, eps: see `similarity_matrix`.
    normalize_similarity: per-image min-max normalization of S (authors' code).
    **map_loss_options: per_head, normalize_attention, bias, log, batch_reduction (see
      `attention_map_loss`). The authors' code: metric='minkowski',
      normalize_similarity=True, bias=-0.17, log=True, batch_reduction='sum'.

  Returns:
    float32 scalar.
  """
  s = similarity_matrix(images, grid_hw, region_size=region_size, metric=metric, p=p,
                        eps=eps, normalize=normalize_similarity)
  return attention_map_loss(attn, s, num_prefix_tokens=num_prefix_tokens, **map_loss_options)


def _distance_term(ctx: registry.LayerContext, **options) -> Array:
  return distance_loss(ctx.attn, ctx.grid_hw, num_prefix_tokens=ctx.num_prefix_tokens,
                       **options)


def _similarity_term(ctx: registry.LayerContext, **options) -> Array:
  return similarity_loss(ctx.attn, ctx.images, ctx.grid_hw,
                         num_prefix_tokens=ctx.num_prefix_tokens, **options)


# Options of `attention_map_loss` that both penalties take. The paper regularizes one block
# (ARViT-L1..L6), so an entry names its blocks: no default layers.
_MAP_OPTIONS = dict(per_head=False, normalize_attention=False, bias=0.0, log=False,
                    batch_reduction='mean')

DISTANCE = registry.register(registry.RegularizerSpec(
    name='distance', fn=_distance_term,
    options=dict(penalty='normalized', alpha=4.0, beta=0.5, gamma=0.1, **_MAP_OPTIONS),
    choices=dict(penalty=PENALTY_KINDS, batch_reduction=BATCH_REDUCTIONS),
    needs={registry.ATTENTION}))

SIMILARITY = registry.register(registry.RegularizerSpec(
    name='similarity', fn=_similarity_term,
    options=dict(region_size=None, metric='mse', p=0.1, eps=1e-6, normalize_similarity=False,
                 **_MAP_OPTIONS),
    choices=dict(metric=SIMILARITY_METRICS, batch_reduction=BATCH_REDUCTIONS),
    needs={registry.ATTENTION}))
