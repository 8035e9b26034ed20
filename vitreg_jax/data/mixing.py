"""Mixup and CutMix: drawn by the input pipeline from (seed, step), applied on the device.

Split in two so that the stream stays a pure function of (seed, step) and independent of the
number of processes:
- `draw(mix_config, seed, step, height, width)` (NumPy, host) draws the batch's recipe:
  whether it is mixed, Mixup or CutMix, lambda and the CutMix box. The train iterator adds it
  to every example of the batch (`mix_lam`, `mix_box`, `mix_cutmix`: the same values on every
  example and every process), so resuming at a step reproduces it.
- `apply(batch, num_classes)` (JAX, inside the jitted train step) mixes each example with its
  partner in the *global* batch (example B - 1 - i, the batch reversed) and returns the images
  and the soft targets the loss takes. A host-side mix could only pair examples within one
  process's slice.

The recipe is the "How do Vision Transformers Work?" authors' (Park & Kim, ICLR 2022;
xxxnell/how-do-vits-work, `configs/cifar100_vit.yaml`: `mixup_alpha: 1.0, cutmix_alpha: 0.8,
prob: 1.0`, handed to timm's `Mixup` in `ops/trains.py`) in timm's batch mode
(rwightman/pytorch-image-models, `timm/data/mixup.py`):
- With probability `prob` the batch is mixed, else left as it is (lambda = 1).
- If both alphas are > 0, CutMix is chosen with probability `switch_prob` (0.5), else Mixup;
  lambda ~ Beta(alpha, alpha) of the chosen one.
- Mixup (Zhang et al. 2018): `x = lambda x + (1 - lambda) x_partner`.
- CutMix (Yun et al. 2019): a box of `int(H sqrt(1 - lambda))` x `int(W sqrt(1 - lambda))`
  centred uniformly in the image (clipped at the border; half-sides rounded down) is pasted
  from the partner, and lambda is corrected to the kept area, `1 - box area / (H W)`.
- Targets: `lambda onehot(y) + (1 - lambda) onehot(y_partner)`, rows summing to 1. Label
  smoothing is applied by the loss afterwards (`steps.soft_cross_entropy`); it is affine and the
  mixture weights sum to 1, so this equals timm's smoothing of each one-hot before mixing.

Config: `config.data.mixup = dict(mixup_alpha=1.0, cutmix_alpha=0.8, prob=1.0,
switch_prob=0.5)` (None: no mixing), validated by `check_config` at `data.get_info`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from vitreg_jax import errors

DEFAULTS = {'mixup_alpha': 1.0, 'cutmix_alpha': 0.8, 'prob': 1.0, 'switch_prob': 0.5}
BATCH_KEYS = ('mix_lam', 'mix_box', 'mix_cutmix')
_STREAM = 0x4D1C  # separates the mixing draws from the permutation and augmentation draws.


def check_config(mix_config: Optional[Mapping[str, Any]]) -> Optional[dict]:
  """Returns the mixing options with defaults filled in (None: no mixing); validates them.

  Raises:
    ValueError: an unknown option (naming the valid ones) or a value out of range.
  """
  if mix_config is None:
    return None
  cfg = dict(mix_config.to_dict() if hasattr(mix_config, 'to_dict') else mix_config)
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise errors.UserError(f'Unknown data.mixup option(s) {unknown}; valid options: '
                           f'{sorted(DEFAULTS)}.')
  cfg = {**DEFAULTS, **cfg}
  for key in ('mixup_alpha', 'cutmix_alpha'):
    if cfg[key] < 0:
      raise errors.UserError(f'data.mixup.{key} must be >= 0 (0 disables it), got {cfg[key]}.')
  for key in ('prob', 'switch_prob'):
    if not 0 <= cfg[key] <= 1:
      raise errors.UserError(f'data.mixup.{key} must be in [0, 1], got {cfg[key]}.')
  if cfg['mixup_alpha'] == 0 and cfg['cutmix_alpha'] == 0:
    raise errors.UserError('data.mixup needs mixup_alpha > 0 or cutmix_alpha > 0; set '
                           'data.mixup = None to train without mixing.')
  return cfg


def cutmix_box(rng: np.random.Generator, lam: float, height: int, width: int) -> tuple:
  """The CutMix box `(top, bottom, left, right)` (end-exclusive) for `lam`."""
  cut = np.sqrt(1.0 - lam)
  cut_h, cut_w = int(height * cut), int(width * cut)
  cy, cx = int(rng.integers(height)), int(rng.integers(width))
  return (int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height)),
          int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width)))


def draw(mix_config: Mapping[str, Any], seed: int, step: int, height: int,
         width: int) -> dict:
  """The recipe of the global batch of `step`: a pure function of (seed, step).

  Returns:
    `mix_lam` (float32: weight of each example's own image and label), `mix_box` (int32
    [4], the CutMix box; empty when unused), `mix_cutmix` (int32 0/1).
  """
  cfg = check_config(mix_config)
  rng = np.random.default_rng([int(seed), int(step), _STREAM])
  apply, switch = rng.random(2)
  use_cutmix = (switch < cfg['switch_prob'] if cfg['mixup_alpha'] > 0 and
                cfg['cutmix_alpha'] > 0 else cfg['cutmix_alpha'] > 0)
  alpha = cfg['cutmix_alpha'] if use_cutmix else cfg['mixup_alpha']
  lam, box = float(rng.beta(alpha, alpha)), (0, 0, 0, 0)
  if apply >= cfg['prob']:
    lam, use_cutmix = 1.0, False
  elif use_cutmix:
    box = cutmix_box(rng, lam, height, width)
    lam = 1.0 - (box[1] - box[0]) * (box[3] - box[2]) / (height * width)
  return {'mix_lam': np.float32(lam), 'mix_box': np.asarray(box, np.int32),
          'mix_cutmix': np.int32(use_cutmix)}


def apply(batch: Mapping[str, Any], num_classes: int) -> tuple:
  """The train step's entry point: `(images, soft targets [B, num_classes])`.

  A batch without the `mix_*` keys gives its images and one-hot targets. Runs under `jit` on
  the global batch: the partner of example i is example B - 1 - i.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  images = batch['image']
  targets = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
  if 'mix_lam' not in batch:
    return images, targets
  # Every example carries the batch's recipe; read it from example 0.
  lam, box, cutmix = batch['mix_lam'][0], batch['mix_box'][0], batch['mix_cutmix'][0] > 0
  height, width = images.shape[1:3]
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  in_box = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])
  partner = images[::-1]
  mixed_up = lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * partner
  out = jnp.where(cutmix, jnp.where(in_box[None, :, :, None], partner, images), mixed_up)
  return out, lam * targets + (1 - lam) * targets[::-1]
