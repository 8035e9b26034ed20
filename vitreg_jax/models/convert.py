"""Import of public ViT weights (AugReg, big_vision, timm) into `vitreg_jax` ViT params.

The `.npz` files of the public ViT releases store one array per parameter under its
'/'-joined path, e.g. `Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel`
`[D, H, Dh]`. `models.vit.ViT` uses exactly these names and shapes (AugReg layout).
big_vision's current layout (top-level `pos_embedding` without a CLS row, scanned blocks,
MAP head) and timm's PyTorch `state_dict` (`.safetensors` or `.npz`) are first translated to
these names by `weight_layouts.py`. Loading is then a one-to-one copy plus two adaptations for
fine-tuning:

* the learned position embedding is resampled to the new patch grid: the patch part is reshaped
  to its `(gh, gw, D)` grid and resized bilinearly (`jax.image.resize`, antialiased when
  shrinking) to the new grid; prefix (CLS) embeddings are kept apart and copied unchanged
  (dropped when the new model has no CLS token, zero when only the new model has one);
* the head is replaced by a fresh zero-initialized one when the number of classes differs
  (or always, with `reset_head=True`).

Typical use (fine-tuning from public weights):

    model = models.create('vit', 10, variant='B/16')
    params = model.init(rng, jnp.zeros((1, 384, 384, 3)))['params']
    params = convert.load_vit('B_16-i21k-...npz', params, model=model, image_hw=(384, 384))

A timm model: `models.create('vit', 1000, variant='S/16', gelu_approximate=False)` and
`convert.load_vit('vit_small.safetensors', ..., layout='timm')` (the exact GELU reproduces
timm's logits; `num_heads` must match the timm model, its file does not record it).
"""

import io
import math
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import flax
import jax
import numpy as np

from vitreg_jax import errors
from vitreg_jax.models import vit
from vitreg_jax.models import weight_layouts

POSEMB_KEY = weight_layouts.POSEMB_KEY
# Checkpoint entries a model may legitimately not have (another head, no CLS, fixed posemb).
_OPTIONAL_PREFIXES = ('head/', 'pre_logits/', 'cls', 'Transformer/posembed_input/')
LAYOUTS = weight_layouts.LAYOUTS


def flatten(params) -> Dict[str, np.ndarray]:
  """Nested params -> {'a/b/c': array}."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return {k: np.asarray(v) for k, v in flat.items()}


def save_npz(path, params) -> None:
  """Writes params in the public checkpoints' layout (one '/'-joined key per array), to any
  `etils.epath` path."""
  buffer = io.BytesIO()  # np.savez seeks, which object stores' writers cannot.
  np.savez(buffer, **flatten(params))
  epath.Path(path).write_bytes(buffer.getvalue())


def load_npz(path: str) -> Dict[str, np.ndarray]:
  """Reads a `.npz` checkpoint into {'/'-joined key: float32 array} (strips 'params/' etc.)."""
  return weight_layouts.read(path)


def load_translated(path: str, *, num_heads: int, layout: Optional[str] = None,
                    ckpt_grid_hw: Optional[Sequence[int]] = None,
                    model_grid_hw: Optional[Sequence[int]] = None
                    ) -> Tuple[Dict[str, np.ndarray], str]:
  """Reads a weight file and translates it to `ViT` names (see `weight_layouts.py`).

  Args:
    path: `.npz` or `.safetensors`.
    num_heads: the model's heads (needed to split timm's fused qkv).
    layout: None (detect from the keys), 'augreg', 'big_vision' (also reads AugReg files, the
      older big_vision layout), 'timm' or 'diverse_vit' (the head-diversity authors' ViT).
    ckpt_grid_hw: the checkpoint's patch grid, needed only when it is not square (and not the
      grid `model_grid_hw` of the model being loaded).
  Returns:
    `({ViT key: array}, detected layout)`.
  """
  if layout is not None and layout not in LAYOUTS:
    raise errors.UserError(f'Unknown weight layout {layout!r}; valid: {LAYOUTS} or None (detect).')
  flat = weight_layouts.read(path)
  found = weight_layouts.detect(flat)
  if layout is not None and found != layout and {found, layout} != {'augreg', 'big_vision'}:
    raise errors.UserError(f'{path} looks like a {found!r} checkpoint (keys like '
                           f'{sorted(flat)[:3]}), not {layout!r}: fix config.init_from.kind.')
  if found == 'diverse_vit':
    return weight_layouts.from_diverse_vit(flat, num_heads=num_heads), found
  if found == 'timm':
    return weight_layouts.from_timm(flat, num_heads=num_heads, grid_hw=ckpt_grid_hw,
                                    hint_hw=model_grid_hw), found
  return weight_layouts.from_big_vision(flat, grid_hw=ckpt_grid_hw,
                                        hint_hw=model_grid_hw), found


def _split_prefix(num_tokens: int, num_prefix: Optional[int],
                  grid_hw: Optional[Sequence[int]]) -> Tuple[int, Tuple[int, int]]:
  """Infers (num_prefix_tokens, grid) of a checkpoint's position embedding."""
  if grid_hw is not None:
    gh, gw = grid_hw
    prefix = num_tokens - gh * gw if num_prefix is None else num_prefix
    if prefix < 0 or prefix + gh * gw != num_tokens:
      raise errors.UserError(
          f'Checkpoint position embedding has {num_tokens} tokens, which does not '
          f'match grid {gh}x{gw} with {prefix} prefix tokens.')
    return prefix, (gh, gw)
  for prefix in ((num_prefix,) if num_prefix is not None else (1, 0)):
    side = math.isqrt(num_tokens - prefix)
    if side * side == num_tokens - prefix:
      return prefix, (side, side)
  raise errors.UserError(f'Cannot infer the patch grid of a {num_tokens}-token position embedding '
                         '(not a square plus 0 or 1 prefix tokens); pass ckpt_grid_hw.')


def resample_posemb(posemb: np.ndarray, new_grid_hw: Sequence[int], new_prefix: int, *,
                    old_grid_hw: Optional[Sequence[int]] = None,
                    old_prefix: Optional[int] = None) -> np.ndarray:
  """Resamples a learned position embedding `[1, P + gh * gw, D]` to a new grid.

  Args:
    posemb: checkpoint embedding (prefix tokens first, then the row-major patch grid).
    new_grid_hw: target (gh, gw).
    new_prefix: target number of prefix tokens (1 with CLS, 0 with GAP).
    old_grid_hw / old_prefix: the checkpoint's grid and prefix count; inferred for square
      grids with 0 or 1 prefix tokens.
  Returns:
    `[1, new_prefix + gh' * gw', D]` float32: bilinear resize of the patch grid; prefix
    embeddings copied (dropped / zero-filled when the prefix counts differ).
  """
  posemb = np.asarray(posemb, np.float32)
  prefix, (gh, gw) = _split_prefix(posemb.shape[1], old_prefix, old_grid_hw)
  d = posemb.shape[-1]
  head, grid = posemb[:, :prefix], posemb[0, prefix:].reshape(gh, gw, d)
  nh, nw = new_grid_hw
  if (nh, nw) != (gh, gw):
    grid = np.asarray(jax.image.resize(grid, (nh, nw, d), method='bilinear'))
  if new_prefix <= prefix:
    head = head[:, :new_prefix]
  else:
    head = np.concatenate([head, np.zeros((1, new_prefix - prefix, d), np.float32)], axis=1)
  return np.concatenate([head, grid.reshape(1, nh * nw, d)], axis=1)


def load_vit(path: str, init_params, *, model, image_hw: Sequence[int],
             reset_head: Optional[bool] = None, ckpt_grid_hw: Optional[Sequence[int]] = None,
             layout: Optional[str] = None) -> Any:
  """Loads public ViT weights (AugReg, big_vision or timm) into the parameter tree of `model`.

  Args:
    path: `.npz` (AugReg / big_vision keys like `Transformer/encoderblock_0/LayerNorm_0/scale`,
      or a timm state_dict) or `.safetensors` (a timm state_dict).
    init_params: freshly initialized params of `model` (their structure and shapes are the
      target; they also supply parameters the checkpoint lacks only for the head).
    model: the `ViT` module (its `token_layout` gives the new grid and CLS count).
    image_hw: image size the model will be fine-tuned on.
    reset_head: True: fresh zero head; False: keep the checkpoint head (shapes must match);
      None (default): fresh zero head iff the number of classes differs.
    ckpt_grid_hw: the checkpoint's patch grid, needed only for non-square checkpoint grids.
    layout: None (detect), 'augreg', 'big_vision' or 'timm' (see `load_translated`).
  Returns:
    A params tree with the structure of `init_params`.
  Raises:
    ValueError naming every missing, unexpected or mismatching key (with both shapes).
  """
  if not isinstance(model, vit.ViT):
    raise errors.UserError(f'Public ViT weights load into model_name="vit" only, not '
                           f'{type(model).__name__} (use kind="checkpoint" for vitreg_jax runs).')
  gh, gw, prefix = model.token_layout(image_hw)
  ckpt, found = load_translated(path, num_heads=model.num_heads, layout=layout,
                                ckpt_grid_hw=ckpt_grid_hw, model_grid_hw=(gh, gw))
  if found in ('timm', 'diverse_vit') and model.gelu_approximate:
    logging.warning('Loading %s weights (PyTorch, exact GELU) into a ViT with tanh GELU: logits '
                    'will differ slightly; set model.gelu_approximate=False to reproduce them.',
                    found)
  loaded = merge(ckpt, flatten(init_params), path=path, new_grid=(gh, gw), new_prefix=prefix,
                  reset_head=reset_head, ckpt_grid_hw=ckpt_grid_hw)
  return flax.traverse_util.unflatten_dict(
      {tuple(k.split('/')): v for k, v in loaded.items()})


load_vit_npz = load_vit  # The name before timm / big_vision layouts were added.


def merge(ckpt, target, *, path, new_grid=None, new_prefix=0, reset_head=None,
          ckpt_grid_hw=None):
  """Checkpoint arrays for every key of `target` (head reset, posemb resampled) or an error.

  `ckpt` and `target` are flat `{'/'-joined key: array}` in the model's names; the `head/`
  arrays are taken from `ckpt` when their shapes fit (and `reset_head` is not True), else
  zero; `new_grid` / `new_prefix` are the model's patch grid and prefix tokens, for a ViT's
  position embedding (`models/timm_resnet.py` merges a ResNet's params and batch statistics
  with it too).
  """
  loaded, missing, mismatched = {}, [], []
  for key, init in target.items():
    if key.startswith('head/'):
      fits = key in ckpt and ckpt[key].shape == init.shape
      if reset_head is False and not fits:
        shape = ckpt[key].shape if key in ckpt else None
        mismatched.append(f'{key}: checkpoint {shape} vs model {init.shape} (reset_head=False)')
      loaded[key] = ckpt[key] if fits and not reset_head else np.zeros(init.shape, np.float32)
    elif key not in ckpt:
      missing.append(key)
    elif key == POSEMB_KEY and ckpt[key].shape != init.shape:
      loaded[key] = resample_posemb(ckpt[key], new_grid, new_prefix, old_grid_hw=ckpt_grid_hw)
      if loaded[key].shape != init.shape:
        mismatched.append(f'{key}: resampled {loaded[key].shape} vs model {init.shape}')
    elif ckpt[key].shape != init.shape:
      mismatched.append(f'{key}: checkpoint {ckpt[key].shape} vs model {init.shape}')
    else:
      loaded[key] = ckpt[key]
  # A zero bias equals no bias (timm's qkv_bias=False is translated to zeros).
  unexpected = sorted(k for k in ckpt if k not in target
                      and not any(k.startswith(p) for p in _OPTIONAL_PREFIXES)
                      and not (k.endswith('/bias') and not np.any(ckpt[k])))
  if missing or unexpected or mismatched:
    lines = ([f'missing in checkpoint: {sorted(missing)}'] if missing else []) + (
        [f'not in the model: {unexpected}'] if unexpected else []) + (
        [f'shape mismatch: {m}' for m in mismatched]) + _hints(ckpt, target)
    raise errors.UserError(
        f'Checkpoint {path} does not fit the model (check variant / patch size):\n'
        + '\n'.join(lines))
  return loaded


def _hints(ckpt, target) -> list:
  """Model settings that would make a checkpoint fit (for the error message)."""
  hints = []
  if 'MAPHead_0/probe' in ckpt and 'MAPHead_0/probe' not in target:
    hints.append("hint: the checkpoint has a MAP head: set model classifier='map'.")
  if 'MAPHead_0/probe' in target and 'MAPHead_0/probe' not in ckpt:
    hints.append("hint: the checkpoint has no MAP head: classifier='token' or 'gap'.")
  if 'cls' in target and 'cls' not in ckpt:
    hints.append("hint: the checkpoint has no CLS token: set classifier='gap' (or 'map').")
  if POSEMB_KEY in target and POSEMB_KEY not in ckpt:
    hints.append("hint: the checkpoint has no learned position embedding: posemb='sincos2d'.")
  return hints
