"""Rotation accuracy of `embedded_rotation` pretraining runs, per kind of source image (issue 28).

The pretraining crops mix photo windows, faces and digits (docs/embedded.md); one accuracy
hides how much of it each kind carries. For every run, on its `val` split (all four rotations of
each crop): the accuracy over all crops, over the photo windows, the faces and the digits, and
the number of crops of each. Printed as JSON, one line per run.

  python experiments/arvit_rotation_by_source.py RUN [RUN ...]
"""

import json
import sys

import numpy as np

from vitreg_jax.data import embedded
from vitreg_jax.data import embedded_objects
from vitreg_jax.training import features
from vitreg_jax.training import rundir


def by_source(pred: np.ndarray, label: np.ndarray, source: np.ndarray) -> dict:
  """Accuracy overall and per kind; `source` is the `object_label` attribute."""
  photos = len(embedded.SOURCES)
  kinds = {'photos': source < photos}
  for index, kind in enumerate(embedded_objects.KINDS):
    kinds[kind] = source == photos + index
  out = {'all': float(np.mean(pred == label)), 'n_all': int(len(label))}
  for kind, where in kinds.items():
    out[kind] = float(np.mean(pred[where] == label[where])) if where.any() else None
    out[f'n_{kind}'] = int(where.sum())
  return out


def main(workdirs) -> None:
  for workdir in workdirs:
    run = rundir.load_run(workdir)
    out = features.extract(run, 'val')
    print(json.dumps({'workdir': workdir, **by_source(np.asarray(out['pred']),
                                                      np.asarray(out['label']),
                                                      np.asarray(out['object_label']))}))


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit(__doc__.strip().splitlines()[-1].strip())
  main(sys.argv[1:])
