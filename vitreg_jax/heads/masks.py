"""Head masks: `[depth, heads]` arrays, their files, and the mask a run trains with.

A mask `m[l, h]` in {0, 1} keeps (1) or drops (0) head h of block l; the models rescale a
layer by `heads / kept` (see models/attention.py). `head_masks` builds the single-head masks
the per-head evaluation scores (each head alone, each head removed); `load_head_mask` reads
one from an array, a `head_mask.json` / `heads.json` / `.npy` file or a run directory, and
`save_head_mask` writes `head_mask.json`, usable as `config.head_mask=DIR/head_mask.json`
(`train_head_mask`).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from etils import epath
import jax.numpy as jnp
import numpy as np

from vitreg_jax import checks
from vitreg_jax import errors
from vitreg_jax.training import rundir

MASK_FILE = "head_mask.json"


def parse_layers(layer, depth: int) -> tuple[int, ...]:
  """`-1` / `3` / `'all'` / `'0,3'` -> sorted 0-based block indices (negative from the end).

  Raises:
    ValueError: naming the valid range, for an index outside the model.
  """
  return tuple(sorted(set(checks.resolve_layers(layer, depth, "Layer"))))


def model_shape(model) -> tuple[int, int]:
  """`(depth, num_heads)` of an attention model; a clear error for other models."""
  return checks.head_shape(model, needed_by="Head masks")


def head_masks(depth: int, num_heads: int, layers: Sequence[int], kind: str):
  """Single-head masks: `kind='alone'` keeps only head h of layer l, `'removed'` drops it.

  Returns:
    `(masks float32 [len(layers) * H, depth, H], [(layer, head), ...])`; every other layer
    keeps all its heads.
  """
  if kind not in ("alone", "removed"):
    raise ValueError(f"kind must be 'alone' or 'removed', got {kind!r}.")
  masks, index = [], []
  for layer in layers:
    for head in range(num_heads):
      m = np.ones((depth, num_heads), np.float32)
      if kind == "alone":
        m[layer] = 0.0
      m[layer, head] = 1.0 if kind == "alone" else 0.0
      masks.append(m)
      index.append((layer, head))
  return np.stack(masks), index


def load_head_mask(value, shape: tuple[int, int] | None = None) -> np.ndarray:
  """A `[depth, heads]` mask from an array/list or from a file or workdir.

  Args:
    value: an array or nested list; a path to a `.json` file holding a `mask` entry (the
      `head_mask.json` or `heads.json` this module writes) or to a `.npy` file; or a run
      directory holding `head_mask.json`.
    shape: the expected `(depth, heads)`; None skips the check.
  Raises:
    FileNotFoundError / ValueError: naming the file or the expected shape.
  """
  if isinstance(value, (str, os.PathLike)):
    path = epath.Path(value)  # Local or remote (gs://...).
    if path.is_dir():
      path = path / MASK_FILE
    if not path.exists():
      raise errors.PathNotFoundError(f"Head mask file {path} not found; write one with "
                                     "`python -m vitreg_jax.heads --workdir=RUN`.")
    if path.name.endswith(".npy"):
      with path.open("rb") as f:
        value = np.load(f)
    else:
      loaded = json.loads(path.read_text())
      value = loaded["mask"] if isinstance(loaded, dict) else loaded
  mask = np.asarray(value, np.float32)
  if shape is not None and mask.shape != tuple(shape):
    raise errors.UserError(f"Head mask has shape {mask.shape}; the model expects [depth, heads] = "
                           f"{tuple(shape)}. Use a mask selected on a run of the same model.")
  if mask.ndim == 2 and (mask.sum(axis=1) <= 0).any():
    raise errors.UserError(
        f"Head mask masks every head of layer(s) "
        f"{np.flatnonzero(mask.sum(axis=1) <= 0).tolist()}: keep >= 1 per layer.")
  return mask


def save_head_mask(mask, directory: str, **info) -> str:
  """Writes `directory/head_mask.json` (`mask` plus `info`, e.g. the rule); returns the path."""
  path = str(epath.Path(directory) / MASK_FILE)
  rundir.write_text(path, json.dumps({"mask": np.asarray(mask).tolist(), **info}, indent=1))
  return path


def train_head_mask(config, model):
  """`config.head_mask` (an array, or a head_mask.json / run dir path) as an array, checked
  against the model's `[depth, heads]`; None when unset."""
  if config.head_mask is None:
    return None
  shape = checks.head_shape(model, needed_by=f"config.head_mask (model {config.model_name!r})")
  return jnp.asarray(load_head_mask(config.head_mask, shape))
