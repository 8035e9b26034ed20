"""DIV: head diversification by orthogonal input gradients (head-diversity poster).

"Learning Diverse Features in Vision Transformers for Improved Generalization" (poster; after
Teney et al. 2022). `div_loss` takes the per-head input gradients `g[B, H, N, D]` of the top
prediction `p*` w.r.t. each head's copy of the block's normalized attention input and returns
`L_IG = 1/N sum_{i != j} sum_n (g_i[n] . g_j[n])^2` (per example, batch mean).
`div_head_input_grads` obtains all H gradients in one backward pass (a `jax.vjp` of the
forward pass as a function of zero "perturbations" added to the per-head copies). `SPEC` is
its entry in the regularizer registry (`registry.py`), registered as 'div'.

Where the poster and the authors' public code differ, the poster's definition is the default
and the code's variant an option; each docstring says which is which.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from vitreg_jax.checks import check_choice
from vitreg_jax.regularizers import registry

Array = jax.Array

DIV_TARGETS = ('max_logit', 'max_prob', 'label_logit')
DIV_REDUCTIONS = ('sum', 'mean')

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
  check_choice('DIV target', target, DIV_TARGETS)
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
  check_choice('DIV reduction', reduction, DIV_REDUCTIONS)
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


def strip_perturbations(variables: Mapping[str, Any]) -> dict:
  return {k: v for k, v in variables.items() if k != 'perturbations'}


def perturbation_shapes(model, variables, images, div_layers, apply_kwargs):
  """Abstract shapes of the model's 'perturbations' collection (no FLOPs: eval_shape).

  The tree the model creates when applied with `div_layers` (docs/design.md, Models): zeros
  of these shapes are the point `div_head_input_grads` differentiates at, and a reference that
  perturbs one head at a time builds its perturbations on them. `apply_kwargs` are the
  `model.apply` arguments of the real call (head_mask, ...); rngs, mutable and train are
  dropped (the shapes are those of an evaluation pass).
  """
  kwargs = {k: v for k, v in apply_kwargs.items() if k not in ('rngs', 'mutable', 'train')}

  def init_perturbations(v, x):
    _, state = model.apply(v, x, div_layers=tuple(div_layers), train=False,
                           mutable=['perturbations'], **kwargs)
    return state.get('perturbations', {})

  return jax.eval_shape(init_perturbations, variables, images)


def head_input_leaves(tree) -> list:
  """The `(path, leaf)` pairs of `tree` (e.g. `perturbation_shapes`) named 'head_inputs': one
  per DIV block, each `[B, H, N, D]` (the per-head copies of the block's attention input)."""
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if path and getattr(path[-1], 'key', None) == 'head_inputs':
      leaves.append((path, leaf))
  return leaves


def _head_input_paths(model, variables, images, div_layers, apply_kwargs):
  """Maps each DIV block index to the tree path of its 'head_inputs' perturbation."""
  paths = {}
  for layer in div_layers:
    leaves = head_input_leaves(
        perturbation_shapes(model, variables, images, (layer,), apply_kwargs))
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
  variables = strip_perturbations(variables)
  div_layers = tuple(sorted(set(div_layers)))
  shapes = perturbation_shapes(model, variables, images, div_layers, apply_kwargs)
  if len(div_layers) == 1:
    leaves = head_input_leaves(shapes)
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


def _div_term(ctx: registry.LayerContext, *, target: str, normalize: bool,
              reduction: str) -> Array:
  del target  # Read by the forward pass (registry.HEAD_INPUT_GRADS), not here.
  return div_loss(ctx.head_input_grads, normalize=normalize, reduction=reduction)


# Layers default to the last block, as in the authors' code. The poster's raw-gradient term
# can be too small to steer training at a usual weight: the balance check refuses it then.
SPEC = registry.register(registry.RegularizerSpec(
    name='div', fn=_div_term,
    options=dict(target='max_logit', normalize=False, reduction='sum'),
    choices=dict(target=DIV_TARGETS, reduction=DIV_REDUCTIONS),
    default_layers=(-1,), needs={registry.HEAD_INPUT_GRADS},
    refuse_if_negligible=True,
    negligible_fix=("use the authors' normalized DIV (add normalize=True, reduction='mean' to "
                    "the entry; `:div=code` in configs/mnist_cifar.py and "
                    "configs/waterbirds.py) or ")))
