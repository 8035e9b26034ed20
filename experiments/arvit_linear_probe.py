"""What the rotation pretraining hands to fine-tuning: a linear probe of its frozen features on
the downstream task `embedded` (issue 28).

For every rotation-pretraining run (`configs/arvit.py:dataset=embedded_rotation`) the encoder is
frozen twice: with its pretrained weights and with a fresh random initialization of the same
model (the `random_init` reference, drawn from `--seed`, default 0: a random encoder like the
one fine-tuning from scratch starts with, not that run's exact draw). Both encode the
`embedded` splits (`pre_logits`, the head's input; evaluation preprocessing), and a linear
classifier (ridge regression on one-hot labels of the standardized features, scikit-learn's
`RidgeClassifier`: closed form, seconds on ARViT's 6144 features) is fit on `train`, its
penalty alpha chosen on `val` (ALPHA_GRID), and scored on `test`. A pretraining that transfers gives a probe clearly above the random encoder's.
Printed as JSON, one line per run.

  python experiments/arvit_linear_probe.py ROT_RUN [ROT_RUN ...] [--seed=S]
"""

import json
import sys
import warnings

import jax
import numpy as np
from sklearn import linear_model
from sklearn import preprocessing

from vitreg_jax import data
from vitreg_jax.training import features
from vitreg_jax.training import rundir

ALPHA_GRID = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
SPLITS = ('train', 'val', 'test')


def probe(feats: dict, labels: dict) -> dict:
  """Fits on `train` for each alpha, picks it on `val`; val / test accuracy and the alpha."""
  scaler = preprocessing.StandardScaler().fit(feats['train'])
  x = {s: scaler.transform(feats[s]) for s in SPLITS}
  best = None
  # More features than examples: the ridge solves a near-singular dual at small alphas.
  warnings.filterwarnings('ignore', message='Ill-conditioned matrix')
  warnings.filterwarnings('ignore', message='An ill-conditioned matrix')
  for alpha in ALPHA_GRID:
    clf = linear_model.RidgeClassifier(alpha=alpha).fit(x['train'], labels['train'])
    val = clf.score(x['val'], labels['val'])
    if best is None or val > best[0]:
      best = (val, alpha, clf)
  val, alpha, clf = best
  return {'val': float(val), 'test': float(clf.score(x['test'], labels['test'])),
          'alpha': alpha}


def on_embedded(run):
  """`run` reading the downstream task (its data seed) instead of its pretraining data."""
  run.dataset = data.open({'name': 'embedded', 'seed': int(run.config.get('seed', 0))})
  return run


def encode(run) -> tuple[dict, dict]:
  """`pre_logits` and labels of every `embedded` split under `run`'s weights."""
  out = {s: features.extract(run, s) for s in SPLITS}
  return ({s: np.asarray(o['features']) for s, o in out.items()},
          {s: np.asarray(o['label']) for s, o in out.items()})


def random_init(run, seed: int):
  """The same model, freshly initialized (the run's checkpointed variables replaced)."""
  dummy = np.zeros((1, *run.dataset.info.image_shape), np.float32)
  rng = jax.random.PRNGKey(seed)
  run.variables = jax.device_get(
      run.model.init({'params': rng, 'dropout': rng}, dummy, train=False))
  return run


def main(argv) -> None:
  seed = 0
  workdirs = []
  for arg in argv:
    if arg.startswith('--seed='):
      seed = int(arg.split('=', 1)[1])
    else:
      workdirs.append(arg)
  for workdir in workdirs:
    result = {'workdir': workdir}
    result['pretrained'] = probe(*encode(on_embedded(rundir.load_run(workdir))))
    fresh = random_init(on_embedded(rundir.load_run(workdir)), seed)
    result['random_init'] = probe(*encode(fresh))
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    sys.exit(__doc__.strip().splitlines()[-1].strip())
  main(sys.argv[1:])
