"""Argument checks shared by the models, the regularizers and head selection.

One home for three small questions every layer of the package asks: is a value one of the
named choices (`check_choice`), which blocks do these layer indices name (`resolve_layers`),
and what is a model's `(depth, heads)` (`head_shape`). Light on purpose (NumPy and
`errors` only): the models import it. Every failure is an `errors.UserError`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vitreg_jax import errors


def check_choice(what: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises a `UserError` naming the valid choices when `value` is not one of them."""
  if value not in choices:
    raise errors.UserError(f'Unknown {what} {value!r}: {what} must be one of the valid choices: '
                           f'{list(choices)}.')


def _parse_text(text: str, what: str):
  text = text.strip().lower()
  if text in ('all', '*'):
    return True
  if text in ('last', ''):
    return -1
  try:
    return [int(p) for p in text.split(',') if p.strip()]
  except ValueError:
    raise errors.UserError(f"{what} {text!r}: use an integer (-1 = last), 'all' or a list like "
                           "'0,3'.") from None


def resolve_layers(layers, depth: int, what: str = 'layer', *,
                   negative: bool = True) -> tuple[int, ...]:
  """Block indices as 0-based ints, in the order given (duplicates kept).

  Args:
    layers: an int, an iterable of ints, True (every block), False / None (no block), or a
      string: 'all' / '*', 'last' / '' (= -1), '0,3'.
    depth: the model's number of blocks.
    what: named in the error messages (a flag, a config field, an argument).
    negative: True: negative indices count from the end (-1 = last block), as in configs and
      flags; False: they are errors (a model's call arguments, already resolved).
  Raises:
    ValueError: naming `what` and the valid range, for a non-integer or an index outside
      the model.
  """
  if isinstance(layers, str):
    layers = _parse_text(layers, what)
  if layers is True:
    return tuple(range(depth))
  if layers is False or layers is None:
    return ()
  items = [layers] if isinstance(layers, (int, np.integer)) else layers
  try:
    items = list(items)
  except TypeError:
    raise errors.UserError(f'{what} must be a bool, a block index or a tuple of block indices, '
                           f'got {layers!r}.') from None
  low = -depth if negative else 0
  hint = ('negative counts from the end, -1 = last block' if negative
          else 'indices are 0-based')
  for i in items:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
      raise errors.UserError(f'{what}: layer {i!r} is not an int.')
    if not low <= i < depth:
      raise errors.UserError(
          f"{what}: block index {i} is out of range, outside the model's {depth} "
          f'blocks (valid: {low}..{depth - 1}; {hint}).')
  return tuple(int(i) % depth for i in items)


def head_shape(model, needed_by: str | None = None) -> tuple[int, int] | None:
  """`(depth, num_heads)` of a model that takes head masks (`depth`, `num_heads` fields).

  Args:
    model: a flax module (or any object).
    needed_by: for a model without heads, None returns None; a string (what needs the heads,
      e.g. 'config.head_mask') raises a ValueError naming it.
  """
  depth, heads = getattr(model, 'depth', None), getattr(model, 'num_heads', None)
  if isinstance(depth, int) and isinstance(heads, int):
    return depth, heads
  if needed_by is None:
    return None
  raise errors.UserError(f'{needed_by} needs an attention model with `depth` and `num_heads`; '
                         f'{type(model).__name__} has none (use a ViT-like model).')


def integer_at_least(name: str, value: Any, minimum: int) -> None:
  """`errors.UserError` unless `value` is an integer (not a bool) >= `minimum`."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise errors.UserError(f'{name} must be an integer >= {minimum}, got {value!r}.')


def number_in(name: str, value: Any, low: float, high: float | None = None) -> None:
  """`errors.UserError` unless `value` is a number (not a bool) in `[low, high]` (`high`
  None: no upper bound)."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low and (
      high is None or value <= high)
  if not ok:
    bound = f'>= {low:g}' if high is None else f'in [{low:g}, {high:g}]'
    raise errors.UserError(f'{name} must be a number {bound}, got {value!r}.')
