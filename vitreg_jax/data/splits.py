"""Split slicing for every dataset: `train[:6%]`, `train[:5000]`, `test[-10%:]`, ...

The "6% of the data" experiments of "How do Vision Transformers Work?" (Park & Kim, ICLR 2022,
Fig. 4: "the spectrum of ViT using 6% dataset for training") train on a subset of the
training set. Any `train_split` or eval split may carry a slice in TFDS's syntax
(https://www.tensorflow.org/datasets/splits), read by this module rather than by TFDS so that
it works the same for every dataset (TFDS-backed, `.npz`, image folders, embedded):

  `name[from:to]`  from / to: an example count (`train[:5000]`, `train[100:200]`) or a
                   percentage (`train[:6%]`, `train[10%:20%]`), negative counts from the end
                   (`train[-5000:]`), either side may be omitted.

Semantics are TFDS's with its default `rounding='closest'`: a percentage p of a split of n
examples is the boundary `round(p * n / 100)`; a boundary beyond the split is an error. The
slice is the contiguous range of the split in its stored order (TFDS shuffles examples when it
writes a dataset, so a prefix of a TFDS split is a fixed pseudo-random sample; for `.npz` and
image folders it is the file order). The selected examples are a pure function of the split
string and the dataset, so training on a slice stays deterministic and resumable: the train
stream permutes the slice's `n` examples exactly as it would a whole split.

Not supported (an error says so): TFDS's `+` concatenation, `shard` units and the
`pct1_dropremainder` rounding.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Optional, Sequence

from vitreg_jax import errors

_SPEC = re.compile(r'^(?P<name>[^\[\]]+?)(\[(?P<selector>[^\[\]]*)\])?$')
_BOUND = re.compile(r'^(?P<value>-?\d+(\.\d*)?)(?P<unit>%?)$')


@dataclasses.dataclass(frozen=True)
class SplitSlice:
  """A parsed split string: the dataset's split `name` and an optional slice of it."""
  spec: str
  name: str
  start: Optional[float] = None   # None: from the first example.
  stop: Optional[float] = None    # None: to the end.
  percent: bool = False

  @property
  def sliced(self) -> bool:
    return self.start is not None or self.stop is not None

  def bounds(self, num_examples: int) -> tuple:
    """Absolute `[from, to)` in a split of `num_examples` examples (TFDS 'closest' rounding).

    Raises:
      ValueError: a boundary beyond the split, or an empty selection.
    """
    n = int(num_examples)

    def absolute(value, default):
      if value is None:
        return default
      index = int(round(value * n / 100.0)) if self.percent else int(value)
      if abs(index) > n:
        raise errors.UserError(f'Split {self.spec!r}: boundary {index} is beyond the {n} examples '
                               f'of split {self.name!r}.')
      return n + index if index < 0 else index

    start, stop = absolute(self.start, 0), absolute(self.stop, n)
    if stop <= start:
      raise errors.UserError(f'Split {self.spec!r} selects no example of the {n} in split '
                             f'{self.name!r} (range [{start}, {stop})).')
    return start, stop

  def size(self, num_examples: int) -> int:
    start, stop = self.bounds(num_examples)
    return stop - start


def _syntax_error(spec: str, why: str) -> ValueError:
  return ValueError(
      f'Unrecognized split {spec!r}: {why}. Use a split name with an optional slice in TFDS '
      "syntax: 'train', 'train[:6%]', 'train[:5000]', 'train[10%:20%]', 'train[-1000:]'.")


def parse(spec: str) -> SplitSlice:
  """Parses `name` or `name[from:to]` (see the module docstring).

  Raises:
    ValueError: naming the problem and showing the accepted forms.
  """
  if not isinstance(spec, str):
    raise TypeError(f'A split must be a string, got {type(spec).__name__} {spec!r}.')
  spec = spec.strip()
  if '+' in spec:
    raise _syntax_error(spec, "concatenating splits with '+' is not supported")
  if '(' in spec:
    raise _syntax_error(spec, 'rounding options such as (pct1_dropremainder) are not '
                              'supported (percentages round to the closest example)')
  match = _SPEC.match(spec)
  if not match:
    raise _syntax_error(spec, 'not of the form name[from:to]')
  name, selector = match['name'].strip(), match['selector']
  if selector is None:
    return SplitSlice(spec, name)
  parts = [p.strip() for p in selector.split(':')]
  if len(parts) != 2 or not any(parts):
    raise _syntax_error(spec, f'bad slice [{selector}] (a slice is [from:to])')
  bounds = [_BOUND.match(p) if p else None for p in parts]
  if any(p and b is None for p, b in zip(parts, bounds)):
    raise _syntax_error(spec, f'bad slice boundary in [{selector}]')
  units = {b['unit'] for b in bounds if b}
  if len(units) > 1:
    raise _syntax_error(spec, 'mixing % and example counts in one slice')
  percent = units == {'%'}
  values = [float(b['value']) if b else None for b in bounds]
  if not percent and any(v is not None and v != int(v) for v in values):
    raise _syntax_error(spec, 'example counts must be integers')
  return SplitSlice(spec, name, values[0], values[1], percent)


def base_name(spec: str) -> str:
  """The dataset split a (possibly sliced) split string reads: `'train[:6%]'` -> `'train'`."""
  return parse(spec).name


class SlicedSource:
  """Random-access view `[start, stop)` of a source (`len`, `[i]`); nothing is copied."""

  def __init__(self, source: Sequence, start: int, stop: int):
    self._source, self._start, self._len = source, int(start), int(stop) - int(start)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int):
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f'index {index} out of range for a slice of {self._len} examples.')
    return self._source[self._start + index]

  def __repr__(self) -> str:
    return f'SlicedSource({self._source!r}, [{self._start}, {self._start + self._len}))'


def apply(source: Sequence, spec: str) -> Sequence:
  """Returns `source` restricted to the slice of `spec` (the source itself if unsliced)."""
  parsed = parse(spec)
  if not parsed.sliced:
    return source
  start, stop = parsed.bounds(len(source))
  return SlicedSource(source, start, stop)


def main(argv=None):
  """`python -m vitreg_jax.data.splits 'train[:6%]' 50000` prints the selected range."""
  args = sys.argv[1:] if argv is None else argv
  if len(args) != 2:
    print("usage: python -m vitreg_jax.data.splits SPLIT NUM_EXAMPLES  (e.g. 'train[:6%]' "
          '50000)')
    return 2
  parsed = parse(args[0])
  start, stop = parsed.bounds(int(args[1]))
  print(f'{args[0]}: split {parsed.name!r}, examples [{start}, {stop}) = {stop - start}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
