"""Scale of the two DIV variants on the authors' MNIST-CIFAR model; prints one JSON object.

    python bench/div_scale.py [--data mnist_cifar|dominoes] [--seeds 5] [--batch 80]
    python bench/div_scale.py --smoke      # seconds: checks it runs, figures meaningless

Why: the poster's Table 1 comes from the authors' code (ArmandNM/diverse-vit,
diverse_vit/losses.py: per-token normalized gradients, mean over B x H x H, no residual around
the last attention) with lambda = 100 tuned for that scale (their README). The poster's own
L_IG (raw gradients, sum over head pairs) has another scale, so `div=paper` needs its own
lambda. This script measures, for each variant on the model it is trained with
(`configs/mnist_cifar.py`, authors' geometry and PyTorch head init), at initialization:

* `L_code`, `L_paper`: the unweighted terms (median over seeds);
* `grad_code`, `grad_paper`: the global norm of their parameter gradients;
* `weight_paper_by_grad = 100 * grad_code / grad_paper`: the lambda at which the paper's term
  pushes the parameters as hard as the authors' term does with lambda 100;
* `weight_paper_by_value = 100 * L_code / L_paper`: the same matched on the loss value.

Inputs are N(0, 1) images of the data's shape (normalized pixels; MNIST-CIFAR 64 x 32 x 3,
the embedded dominoes 32 x 16 x 3): the scale depends on the number of tokens, so each dataset
has its own. `weight_paper_by_grad` is the `MATCHED_SCALE` of `configs/mnist_cifar.py`; the
factor applied to it was chosen on validation (its `get_sweep`).

`--smoke` measures one seed at batch 2 on the config's `runlocal` model (2 blocks) with the
dominoes' shape: it checks that the script runs, and its figures mean nothing.
"""

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp

from vitreg_jax import config_lib
from vitreg_jax import models
from vitreg_jax import regularizers


def _mnist_cifar_config(arg):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs',
                      'mnist_cifar.py')
  return config_lib.import_config(path).get_config(arg)


IMAGE_SHAPES = {'mnist_cifar': (64, 32, 3), 'dominoes': (32, 16, 3)}


def measure(div: str, seeds, batch: int, data: str = 'mnist_cifar', runlocal: bool = False):
  """[(unweighted DIV term, global norm of its parameter gradient)] at init, one per seed."""
  config = _mnist_cifar_config(f'reg=div,div={div},data={data},weight=1,runlocal={runlocal}')
  model = models.create('vit', 2, **config.model)
  entry = dict(config.regularizers[0], weight=1.0)
  reg = regularizers.build([entry], model)

  @jax.jit
  def value_and_grad_norm(params, images):
    term = lambda p: reg({'params': p}, images)[2]
    value, grads = jax.value_and_grad(term)(params)
    return value, jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))

  rows = []
  for seed in seeds:  # one compilation, then one call per seed
    images = jax.random.normal(jax.random.key(1000 + seed), (batch, *IMAGE_SHAPES[data]))
    params = model.init(jax.random.key(seed), images[:1])['params']
    value, norm = value_and_grad_norm(params, images)
    rows.append((float(value), float(norm)))
  return rows


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', choices=sorted(IMAGE_SHAPES), default='mnist_cifar')
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--batch', type=int, default=80)
  parser.add_argument('--smoke', action='store_true',
                      help="seconds: 1 seed, batch 2, the config's runlocal model, dominoes' "
                           'shape (figures meaningless)')
  args = parser.parse_args(argv)
  if args.smoke:
    args.seeds, args.batch, args.data = 1, 2, 'dominoes'
  return args


def main(argv=None):
  args = parse_args(argv)
  rows = {div: measure(div, range(args.seeds), args.batch, args.data, runlocal=args.smoke)
          for div in ('code', 'paper')}
  med = lambda div, i: statistics.median(r[i] for r in rows[div])
  result = dict(data=args.data, seeds=args.seeds, batch=args.batch, smoke=args.smoke,
                L_code=med('code', 0), L_paper=med('paper', 0),
                grad_code=med('code', 1), grad_paper=med('paper', 1))
  result['weight_paper_by_value'] = 100 * result['L_code'] / result['L_paper']
  result['weight_paper_by_grad'] = 100 * result['grad_code'] / result['grad_paper']
  result['per_seed'] = {div: [dict(L=v, grad=g) for v, g in r] for div, r in rows.items()}
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
