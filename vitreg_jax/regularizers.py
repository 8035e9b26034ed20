"""Attention regularizers: head diversity (DIV) and ARViT's attention-map penalties.

Three regularizers from two papers, as pure functions that return a scalar, plus the
training wrapper `build(...)` that wires them into the loss from `config.regularizers`.

* **DIV**, head diversification by orthogonal input gradients ("Learning Diverse Features
  in Vision Transformers for Improved Generalization", poster; after Teney et al. 2022).
  `div_loss` takes the per-head input gradients `g[B, H, N, D]` of the top prediction `p*`
  w.r.t. each head's copy of the block's normalized attention input and returns
  `L_IG = 1/N sum_{i != j} sum_n (g_i[n] . g_j[n])^2` (per example, batch mean).
  `div_head_input_grads` obtains all H gradients in one backward pass (a `jax.vjp` of the
  forward pass as a function of zero "perturbations" added to the per-head copies).
* **Spatial distance penalty** (ARViT paper, section 3.2): `L_D = sum_{n,m} A[n,m] P[n,m]`
  with `P` a function of the Manhattan distance between patch positions
  (`distance_penalty_matrix`, `distance_loss`).
* **Patch similarity penalty** (ARViT paper, section 3.3, Fig. 1): `L_S = sum A * S` with
  `S[n,m]` the mean squared error between the channel Gram matrices of patches n and m
  (`patch_gram_matrices`, `similarity_matrix`, `similarity_loss`).

Where the papers and the authors' public code differ, the paper's definition is the default
and the code's variant an option; each docstring says which is which.

Training usage (see docs/design.md)::

    reg = regularizers.build(config.regularizers, model)
    logits, out, reg_total, terms, new_state = reg(variables, images, labels=labels,
                                                   train=True, rngs={'dropout': key})
    loss = cross_entropy(logits, labels) + reg_total
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    'DIV_TARGETS',
    'PENALTY_KINDS',
    'SIMILARITY_METRICS',
    'REGULARIZERS',
    'Regularizer',
    'attention_map_loss',
    'build',
    'distance_loss',
    'distance_penalty_matrix',
    'div_head_input_grads',
    'div_loss',
    'manhattan_distance_matrix',
    'patch_gram_matrices',
    'prediction_target',
    'similarity_loss',
    'similarity_matrix',
]

DIV_TARGETS = ('max_logit', 'max_prob', 'label_logit')
DIV_REDUCTIONS = ('sum', 'mean')
PENALTY_KINDS = ('normalized', 'smooth_sign', 'offset')
SIMILARITY_METRICS = ('mse', 'minkowski')
BATCH_REDUCTIONS = ('mean', 'sum')


def _check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f'Unknown {what} {value!r}; valid choices: {list(choices)}.')


# --------------------------------------------------------------------------------------
# DIV: orthogonality of per-head input gradients.
# --------------------------------------------------------------------------------------


def prediction_target(logits: Array, target: str = 'max_logit',
                      labels: Optional[Array] = None) -> Array:
  """The per-example scalar `p*` whose input gradients DIV makes orthogonal.

  Args:
    logits: `[B, K]` class logits (any float dtype; computed in float32).
    target: 'max_logit' (default, the poster's "top prediction" and the authors' code):
      the logit of the predicted class, the argmax taken under `stop_gradient`;
      'max_prob': the softmax probability of the predicted class;
      'label_logit': the logit of the true class (needs `labels`).
    labels: `[B]` int class labels, only for 'label_logit'.

  Returns:
    `[B]` float32 array `p*`.
  """
  _check_choice('DIV target', target, DIV_TARGETS)
  logits = logits.astype(jnp.float32)
  if target == 'label_logit':
    if labels is None:
      raise ValueError("DIV target 'label_logit' needs labels: pass labels=... to the "
                       "regularizer call, or use target='max_logit'.")
    index = jnp.asarray(labels).astype(jnp.int32)
  else:
    index = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
  if target == 'max_prob':
    logits = jax.nn.softmax(logits, axis=-1)
  return jnp.take_along_axis(logits, index[:, None], axis=-1)[:, 0]


def _safe_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  # max(|x|, eps) as in torch's F.normalize, written so that a zero vector (a masked head)
  # has a finite gradient, which matters because DIV is differentiated a second time.
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def div_loss(grads: Array, *, normalize: bool = False, reduction: str = 'sum') -> Array:
  """Head-diversity loss `L_IG` from per-head input gradients (DIV poster).

  With `g_i[n]` the gradient of `p*` w.r.t. token n of the block's attention input taken
  through head i only, `c[n, i, j] = g_i[n] . g_j[n]` and, per example,

      L_IG = 1/N * sum_{i != j} sum_{n=1}^{N} c[n, i, j]^2 ,

  averaged over the batch (the poster writes the per-example value; the batch mean makes
  the weight independent of the batch size).

  Args:
    grads: `[B, H, N, D]` per-head input gradients (any float dtype; accumulated in fp32).
    normalize: False (paper) or True (authors' code, `normalize_grads='per_token'`): each
      `g_i[n]` is scaled to unit length first, so `c` is a cosine similarity.
    reduction: 'sum' (paper: sum over head pairs) or 'mean' (authors' code: the mean over
      batch x H x H of the token-averaged squares with a zeroed diagonal, i.e. the paper's
      value divided by H^2).

  Returns:
    float32 scalar.
  """
  _check_choice('DIV reduction', reduction, DIV_REDUCTIONS)
  if grads.ndim != 4:
    raise ValueError(f'div_loss expects grads [B, H, N, D], got shape {grads.shape}.')
  g = grads.astype(jnp.float32)
  if normalize:
    g = _safe_normalize(g, axis=-1)
  num_heads = g.shape[1]
  c = jnp.einsum('bind,bjnd->bnij', g, g, precision=jax.lax.Precision.HIGHEST)
  off_diagonal = 1.0 - jnp.eye(num_heads, dtype=jnp.float32)
  per_example = jnp.mean(jnp.sum(jnp.square(c) * off_diagonal, axis=(2, 3)), axis=1)
  if reduction == 'mean':
    per_example = per_example / (num_heads * num_heads)
  return jnp.mean(per_example)


def _strip_perturbations(variables: Mapping[str, Any]) -> dict:
  return {k: v for k, v in variables.items() if k != 'perturbations'}


def _perturbation_shapes(model, variables, images, div_layers, apply_kwargs):
  """Abstract shapes of the model's 'perturbations' collection (no FLOPs: eval_shape)."""
  kwargs = {k: v for k, v in apply_kwargs.items() if k not in ('rngs', 'mutable', 'train')}

  def init_perturbations(v, x):
    _, state = model.apply(v, x, div_layers=tuple(div_layers), train=False,
                           mutable=['perturbations'], **kwargs)
    return state.get('perturbations', {})

  return jax.eval_shape(init_perturbations, variables, images)


def _head_input_leaves(tree) -> list:
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if path and getattr(path[-1], 'key', None) == 'head_inputs':
      leaves.append((path, leaf))
  return leaves


def _head_input_paths(model, variables, images, div_layers, apply_kwargs):
  """Maps each DIV block index to the tree path of its 'head_inputs' perturbation."""
  paths = {}
  for layer in div_layers:
    leaves = _head_input_leaves(
        _perturbation_shapes(model, variables, images, (layer,), apply_kwargs))
    if len(leaves) != 1:
      raise ValueError(
          f'With div_layers=({layer},) the model created {len(leaves)} perturbations named '
          "'head_inputs' (expected exactly 1): it must call self.perturb('head_inputs', xh) "
          'with xh [B, H, N, D] in that block (docs/design.md, Models).')
    paths[layer] = leaves[0][0]
  return paths


def _get_path(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def div_head_input_grads(model, variables, images, *, div_layers: Sequence[int],
                         target: str = 'max_logit', labels: Optional[Array] = None,
                         **apply_kwargs):
  """Per-head input gradients of `p*` for several blocks, in one forward + one backward.

  The model gives each head of block l its own copy `xh[:, h]` of the block's normalized
  attention input and adds a zero perturbation to it (`self.perturb('head_inputs', xh)`).
  We take `jax.vjp` of the whole forward pass as a function of those perturbations; one
  call of the pullback with cotangent 1 for every example's `p*` returns
  `d(sum_b p*_b)/d xh`, whose `[b, h]` slice is `d p*_b / d x` through head h only (the
  examples do not interact in a ViT). The same forward pass gives the logits and `out`.

  Args:
    model: a Flax module honouring the `div_layers` contract of docs/design.md.
    variables: its variables (a 'perturbations' entry is ignored).
    images: `[B, H, W, C]`.
    div_layers: non-negative block indices.
    target: see `prediction_target`.
    labels: `[B]` labels for target='label_logit'.
    **apply_kwargs: forwarded to `model.apply` (head_mask, train, capture_attention,
      rngs, mutable).

  Returns:
    `(grads, logits, out, new_state)`: `grads` maps each block index to `[B, H, N, D]`
    gradients (dtype of the model's computation); `new_state` is the mutated-collection
    dict when `mutable` is given, else {}.
  """
  variables = _strip_perturbations(variables)
  div_layers = tuple(sorted(set(div_layers)))
  shapes = _perturbation_shapes(model, variables, images, div_layers, apply_kwargs)
  if len(div_layers) == 1:
    leaves = _head_input_leaves(shapes)
    if len(leaves) != 1:
      raise ValueError(
          f'With div_layers={div_layers} the model created {len(leaves)} perturbations '
          "named 'head_inputs' (expected 1): it must call self.perturb('head_inputs', xh) "
          'in that block (docs/design.md, Models).')
    paths = {div_layers[0]: leaves[0][0]}
  else:
    paths = _head_input_paths(model, variables, images, div_layers, apply_kwargs)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  mutable = apply_kwargs.pop('mutable', False)

  def forward(perturbations):
    result = model.apply({**variables, 'perturbations': perturbations}, images,
                         div_layers=div_layers, mutable=mutable, **apply_kwargs)
    (logits, out), new_state = result if mutable else (result, {})
    return prediction_target(logits, target, labels), (logits, out, new_state)

  p_star, pullback, (logits, out, new_state) = jax.vjp(forward, zeros, has_aux=True)
  (grad_tree,) = pullback(jnp.ones_like(p_star))
  grads = {layer: _get_path(grad_tree, path) for layer, path in paths.items()}
  return grads, logits, out, dict(new_state)


# --------------------------------------------------------------------------------------
# ARViT: spatial distance and patch similarity penalties on attention maps.
# --------------------------------------------------------------------------------------


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
  _check_choice('distance penalty kind', kind, PENALTY_KINDS)
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
  _check_choice('batch_reduction', batch_reduction, BATCH_REDUCTIONS)
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
      raise ValueError(f'expected an int or a pair (h, w), got {x!r}.')
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
    raise ValueError(f'image {h}x{w} is smaller than the patch grid {gh}x{gw}.')
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
  _check_choice('similarity metric', metric, SIMILARITY_METRICS)
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


# --------------------------------------------------------------------------------------
# Training wrapper.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  kind: str                      # 'div' or 'attention'
  options: Mapping[str, Any]     # valid options and their defaults
  default_layers: Optional[tuple[int, ...]]  # None: `layers` is required


_MAP_OPTIONS = dict(per_head=False, normalize_attention=False, bias=0.0, log=False,
                    batch_reduction='mean')

REGULARIZERS: dict[str, _Spec] = {
    'div': _Spec('div', dict(target='max_logit', normalize=False, reduction='sum'), (-1,)),
    'distance': _Spec('attention', dict(penalty='normalized', alpha=4.0, beta=0.5,
                                        gamma=0.1, **_MAP_OPTIONS), None),
    'similarity': _Spec('attention', dict(region_size=None, metric='mse', p=0.1, eps=1e-6,
                                          normalize_similarity=False, **_MAP_OPTIONS),
                        None),
}
_CHOICES = dict(target=DIV_TARGETS, reduction=DIV_REDUCTIONS, penalty=PENALTY_KINDS,
                metric=SIMILARITY_METRICS, batch_reduction=BATCH_REDUCTIONS)
_ENTRY_KEYS = ('name', 'weight', 'layers', 'tag')


@dataclasses.dataclass(frozen=True)
class _Term:
  name: str        # unique key in `terms`
  regularizer: str
  weight: float
  layers: tuple[int, ...]
  options: Mapping[str, Any]


def _resolve_layers(layers, depth: int, where: str) -> tuple[int, ...]:
  if isinstance(layers, (int, np.integer)):
    layers = (layers,)
  layers = tuple(layers)
  if not layers:
    raise ValueError(f'{where}: layers is empty; give at least one block index.')
  resolved = []
  for layer in layers:
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
      raise ValueError(f'{where}: layer {layer!r} is not an int.')
    if not -depth <= layer < depth:
      raise ValueError(f'{where}: layer {layer} is out of range for a model with depth '
                       f'{depth}; valid: {-depth}..{depth - 1} (negative counts from the '
                       'end, -1 = last block).')
    resolved.append(int(layer) % depth)
  if len(set(resolved)) != len(resolved):
    raise ValueError(f'{where}: layers {layers} name the same block twice.')
  return tuple(resolved)


def _parse_entry(index: int, entry: Mapping[str, Any], depth: int) -> _Term:
  entry = dict(entry)
  name = entry.get('name')
  if name not in REGULARIZERS:
    raise ValueError(f'regularizers[{index}]: unknown regularizer name {name!r}; valid '
                     f'names: {sorted(REGULARIZERS)}.')
  spec = REGULARIZERS[name]
  where = f'regularizers[{index}] ({name})'
  unknown = sorted(set(entry) - set(_ENTRY_KEYS) - set(spec.options))
  if unknown:
    raise ValueError(f'{where}: unknown option(s) {unknown}; valid: '
                     f'{sorted(set(_ENTRY_KEYS) | set(spec.options))}.')
  if 'weight' not in entry:
    raise ValueError(f'{where}: missing weight (the lambda multiplying this term).')
  weight = entry['weight']
  if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)):
    raise ValueError(f'{where}: weight must be a number, got {weight!r}.')
  if 'layers' in entry:
    layers = entry['layers']
  elif spec.default_layers is not None:
    layers = spec.default_layers
  else:
    raise ValueError(f'{where}: missing layers (block indices, e.g. layers=(0,); the ARViT '
                     'paper regularizes one block, L1..L6).')
  options = {**spec.options, **{k: v for k, v in entry.items() if k in spec.options}}
  for key, choices in _CHOICES.items():
    if key in options:
      _check_choice(f'{where} option {key}', options[key], choices)
  return _Term(name=entry.get('tag') or name, regularizer=name, weight=float(weight),
               layers=_resolve_layers(layers, depth, where), options=options)


def _unique_names(terms: list[_Term]) -> list[_Term]:
  counts = {}
  for t in terms:
    counts[t.name] = counts.get(t.name, 0) + 1
  out, seen = [], set()
  for t in terms:
    name = t.name
    if counts[name] > 1:
      name = f"{name}_l{'_'.join(map(str, t.layers))}"
    base, k = name, 2
    while name in seen:
      name, k = f'{base}_{k}', k + 1
    seen.add(name)
    out.append(dataclasses.replace(t, name=name))
  return out


class Regularizer:
  """The configured regularizers bound to a model: one call gives logits and penalties.

  Attributes:
    terms_config: the parsed terms (name, regularizer, weight, resolved layers, options).
    attention_layers: blocks whose attention is computed explicitly (softmax
      materialized): the layers of every distance/similarity term and, when DIV is on,
      every block from the first DIV layer to the last block, because DIV's double
      backprop needs second derivatives there, which fused kernels (cuDNN flash attention)
      do not provide. All other blocks keep the fused path.
    div_layers: blocks whose heads get their own input copies.
  """

  def __init__(self, terms: Sequence[_Term], model):
    self.terms_config = tuple(terms)
    self.model = model
    attn = {l for t in terms if t.regularizer != 'div' for l in t.layers}
    div = {l for t in terms if t.regularizer == 'div' for l in t.layers}
    if div:
      attn |= set(range(min(div), model.depth))
    self.attention_layers = tuple(sorted(attn))
    self.div_layers = tuple(sorted(div))

  def __repr__(self):
    parts = ', '.join(f'{t.name}: {t.weight} x {t.regularizer}{list(t.layers)}'
                      for t in self.terms_config)
    return f'Regularizer({parts})'

  def _term_value(self, term, out, grads, images, layout):
    gh, gw, prefix = layout
    values = []
    for layer in term.layers:
      if term.regularizer == 'div':
        values.append(div_loss(grads[layer], normalize=term.options['normalize'],
                               reduction=term.options['reduction']))
        continue
      block = out.get(f'block{layer}', {}) if isinstance(out, Mapping) else {}
      if 'attn' not in block:
        raise ValueError(f"term {term.name!r}: the model output has no out['block{layer}']"
                         "['attn']; the model must return attention maps for the blocks "
                         'in capture_attention (docs/design.md, Models).')
      opts = dict(term.options)
      if term.regularizer == 'distance':
        values.append(distance_loss(block['attn'], (gh, gw), num_prefix_tokens=prefix,
                                    **opts))
      else:
        values.append(similarity_loss(block['attn'], images, (gh, gw),
                                      num_prefix_tokens=prefix, **opts))
    return functools.reduce(jnp.add, values)

  def __call__(self, variables, images, *, labels=None, train: bool = False, rngs=None,
               head_mask=None, mutable=False):
    """Forward pass plus every configured penalty.

    Args:
      variables: the model's variables ({'params': ..., maybe 'batch_stats': ...}).
      images: `[B, H, W, C]`.
      labels: `[B]` int labels (only DIV with target='label_logit' reads them).
      train: forwarded to the model (dropout, batch norm).
      rngs: forwarded to `model.apply` (e.g. {'dropout': key}).
      head_mask: `[depth, heads]` or None, forwarded.
      mutable: forwarded (e.g. ['batch_stats'] when training BatchNorm models).

    Returns:
      `(logits, out, reg_total, terms, new_state)`: `terms` maps each term name to its
      unweighted float32 value, `reg_total = sum_t weight_t * terms[t]` (0.0 without
      terms), `new_state` the dict of mutated collections ({} when mutable is False).
    """
    variables = _strip_perturbations(variables)
    kwargs = dict(train=train)
    if head_mask is not None:
      kwargs['head_mask'] = head_mask
    if self.attention_layers:
      kwargs['capture_attention'] = self.attention_layers
    if rngs is not None:
      kwargs['rngs'] = rngs
    grads = {}
    if self.div_layers:
      div_terms = [t for t in self.terms_config if t.regularizer == 'div']
      targets = {t.options['target'] for t in div_terms}
      if len(targets) > 1:
        raise ValueError(f'all DIV terms must share one target, got {sorted(targets)}.')
      grads, logits, out, new_state = div_head_input_grads(
          self.model, variables, images, div_layers=self.div_layers, target=targets.pop(),
          labels=labels, mutable=mutable, **kwargs)
    else:
      result = self.model.apply(variables, images, mutable=mutable, **kwargs)
      (logits, out), new_state = result if mutable else (result, {})
      new_state = dict(new_state)
    layout = (self.model.token_layout(images.shape[1:3])
              if any(t.regularizer != 'div' for t in self.terms_config) else (0, 0, 0))
    terms = {t.name: self._term_value(t, out, grads, images, layout)
             for t in self.terms_config}
    reg_total = jnp.zeros((), jnp.float32)
    for t in self.terms_config:
      reg_total = reg_total + t.weight * terms[t.name]
    return logits, out, reg_total, terms, new_state


def is_attention_model(model) -> bool:
  """True for a model (class or instance) whose blocks expose attention maps to the
  regularizers: the ViT-like models, which map tokens to the patch grid (`token_layout`)."""
  return callable(getattr(model, 'token_layout', None))


def check_attention_model(config_list, model_name: str, model) -> None:
  """Raises a ValueError unless `model` can carry the regularizers of `config_list`.

  ResNet has no attention and AlterNet's convolutional-stage MSAs do not expose the
  per-block attention maps of docs/design.md: both must fail here, naming the problem,
  rather than later inside the regularizer with an unrelated error.
  """
  if is_attention_model(model):
    return
  from vitreg_jax import models  # pylint: disable=g-import-not-at-top
  names = [dict(e).get('name') for e in config_list]
  valid = sorted(n for n, cls in models.MODELS.items() if is_attention_model(cls))
  raise ValueError(
      f'Attention regularizers {names} need an attention model whose blocks expose their '
      f'attention maps ({valid}); model {model_name!r} has none. Set config.model_name to '
      f'one of {valid}, or remove config.regularizers.')


def build(config_list: Optional[Sequence[Mapping[str, Any]]], model) -> Regularizer:
  """Parses `config.regularizers` and binds it to `model` (docs/design.md, Regularizers).

  Each entry: `dict(name='div'|'distance'|'similarity', weight=float, layers=(int, ...),
  tag=optional term name, **options)`. Options and defaults (paper's definition first):
    div: target='max_logit'|'max_prob'|'label_logit', normalize=False, reduction='sum'|
      'mean'; layers default (-1,) (the last block, as in the authors' code).
    distance: penalty='normalized'|'smooth_sign'|'offset', alpha=4, beta=0.5, gamma=0.1,
      per_head=False, normalize_attention=False, bias=0, log=False,
      batch_reduction='mean'|'sum'; layers required.
    similarity: region_size=None, metric='mse'|'minkowski', p=0.1, eps=1e-6,
      normalize_similarity=False, per_head, normalize_attention, bias, log,
      batch_reduction; layers required.
  Layers are 0-based block indices; negative ones count from the end. A term over several
  layers is the sum over its layers. Term names: the regularizer's name (or `tag`); if
  several entries share a name, `_l<layers>` is appended ('distance_l0', 'distance_l2').

  Args:
    config_list: the list of entries (ConfigDicts or dicts); None or [] for plain ERM.
    model: the Flax module (attention models expose `depth`).

  Returns:
    a `Regularizer`.

  Raises:
    ValueError: unknown name or option, bad choice, missing weight/layers, a layer out
      of range, or a model without attention blocks.
  """
  entries = list(config_list or [])
  if entries:
    check_attention_model(entries, type(model).__name__, model)
  depth = int(model.depth) if entries else 0
  terms = [_parse_entry(i, e, depth) for i, e in enumerate(entries)]
  return Regularizer(_unique_names(terms), model)
