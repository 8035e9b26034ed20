"""Per-example head outputs on the validation splits: `WORKDIR/heads_examples/step_*.npz`.

The label-free selection rules (heads/label_free.py) read more than the per-eval figures of
`heads_eval.jsonl`: each candidate's prediction and confidence on every example of the
validation splits (thresholded confidences, agreement between candidates, the full model's
error set, draws of k labelled OOD examples). The per-eval head evaluation
(`heads/training.py`) already computes them (`RunEval`'s per-example output, no extra forward
pass) and writes them here, so `heads --table` works on logs alone.

One file per evaluation step, `heads_examples/step_{step:08d}.npz`, holding:
* `kind` (str `[M]`), `layer`, `head` (int16 `[M]`, -1 for the full model): the candidates,
  in the order of that step's `heads_eval.jsonl` lines (the full model, then each head alone);
* per validation split S (the roles' `val_id` / `val_ood`, roles.py; one split when they are
  the same, as on Waterbirds): `S.pred` (int16 `[M, n]`), `S.confidence` (float16 `[M, n]`,
  the max softmax probability), `S.label` (int16 `[n]`) and `S.<attribute>` (`[n]`, int16
  when an integer that fits) for each of the dataset's example attributes (spurious
  attribute, group).

Test splits are never written: selection reads validation splits only. A resumed run deletes
the files past the step it restarts from (as `train_log.JsonlWriter` drops lines).
"""

from __future__ import annotations

import io
import re
import collections.abc
from typing import Mapping, Sequence

import numpy as np
from absl import logging
from etils import epath

EXAMPLES_DIR = "heads_examples"
_FILE = re.compile(r"^step_(\d{8})\.npz$")
KEY_FIELDS = ("kind", "layer", "head")


def file_name(step: int) -> str:
  return f"step_{int(step):08d}.npz"


def _int16(x) -> np.ndarray:
  return np.asarray(x).astype(np.int16)


def _compact(x) -> np.ndarray:
  """int16 for integers that fit (labels, attributes, groups); other arrays as they are (a
  custom dataset's attribute may be wider, or not an integer)."""
  x = np.asarray(x)
  if x.dtype.kind in "iu" and (x.size == 0 or (x.min() >= -2**15 and x.max() < 2**15)):
    return x.astype(np.int16)
  return x


def pack(keys: Sequence[tuple], splits: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
  """The arrays of one step's file.

  Args:
    keys: `(kind, layer, head)` per candidate (layer / head None for the full model).
    splits: `{split: {"pred": [M, n], "confidence": [M, n], "label": [n], <attribute>: [n]}}`.
  """
  out = {"kind": np.array([k[0] for k in keys]),
         "layer": _int16([-1 if k[1] is None else k[1] for k in keys]),
         "head": _int16([-1 if k[2] is None else k[2] for k in keys])}
  for split, arrays in splits.items():
    for name, a in arrays.items():
      out[f"{split}.{name}"] = (np.asarray(a, np.float16) if name == "confidence"
                                else _compact(a))
  return out


class ExamplesWriter:
  """Writes one step's per-example arrays; drops files past `start_step`. `enabled`: whether
  this process writes (process 0's; the caller knows, so this module imports no jax and the
  readers, the report's included, stay light)."""

  def __init__(self, workdir, start_step: int = 0, *, enabled: bool = True):
    self.folder = epath.Path(workdir) / EXAMPLES_DIR
    self.enabled = enabled
    if self.enabled and self.folder.exists():
      for step, path in _files(self.folder):
        if step > start_step:  # Written after the checkpoint the run resumes from.
          logging.info("%s: dropped, past the restored step %d.", path, start_step)
          path.unlink()

  def write(self, step: int, arrays: Mapping[str, np.ndarray]) -> None:
    if not self.enabled:
      return
    self.folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    # Through a temporary name and a rename: a crash leaves no half-written file.
    tmp = self.folder / (file_name(step) + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(self.folder / file_name(step))


def _files(folder: epath.Path) -> list[tuple[int, epath.Path]]:
  found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name))]
  return sorted(found, key=lambda t: t[0])


def steps(workdir) -> tuple[int, ...]:
  """The steps with a file (empty when the run wrote none: an older run)."""
  folder = epath.Path(workdir) / EXAMPLES_DIR
  return tuple(s for s, _ in _files(folder)) if folder.exists() else ()


def load(workdir, step: int) -> dict:
  """One step's file, `unpack`ed."""
  path = epath.Path(workdir) / EXAMPLES_DIR / file_name(step)
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
    return unpack({k: f[k] for k in f.files})


def unpack(arrays: Mapping[str, np.ndarray]) -> dict:
  """`pack`'s arrays as `{"keys": [(kind, layer, head)], split: {name: array}}` (float32
  confidences, int32 predictions, labels and attributes; layer / head None for the full
  model). `heads --select` reads its checkpoint's outputs through `pack` and this too, so a
  rule sees the same float16 confidences on a checkpoint as over the logs."""
  arrays = dict(arrays)
  none = lambda v: None if v < 0 else int(v)
  out = {"keys": [(str(k), none(l), none(h))
                  for k, l, h in zip(arrays.pop("kind"), arrays.pop("layer"),
                                     arrays.pop("head"))]}
  for name, a in arrays.items():
    split, field = name.split(".", 1)
    out.setdefault(split, {})[field] = (a.astype(np.float32) if a.dtype == np.float16
                                        else a.astype(np.int32) if a.dtype == np.int16 else a)
  return out


def read(workdir) -> dict[int, dict]:
  """Every step's file (`load`), by step; empty for a run without them."""
  return {s: load(workdir, s) for s in steps(workdir)}


class Lazy(collections.abc.Mapping):
  """`read(workdir)` as a mapping that reads each step's file on first access (the rules that
  need no per-example outputs read none)."""

  def __init__(self, workdir):
    self.workdir, self._loaded, self._steps = workdir, {}, None

  def _all_steps(self) -> tuple[int, ...]:
    if self._steps is None:
      self._steps = steps(self.workdir)
    return self._steps

  def __getitem__(self, step):
    if step not in self._all_steps():
      raise KeyError(step)
    if step not in self._loaded:
      self._loaded[step] = load(self.workdir, step)
    return self._loaded[step]

  def __iter__(self):
    return iter(self._all_steps())

  def __len__(self) -> int:
    return len(self._all_steps())
