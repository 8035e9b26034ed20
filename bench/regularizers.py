"""Cost of the regularizers in a full training step; prints one JSON object.

    python bench/regularizers.py [--batch 64] [--paper_batch 80] [--dtype bfloat16]
    python bench/regularizers.py --quick          # the real models on a CPU: batch 4, 3 rounds
    python bench/regularizers.py --arvit_batch 8 --repeats 5   # this CPU: DIV at 64 / 80
    python bench/regularizers.py --smoke          # seconds: tiny models, checks it runs

Each figure is a ratio of median step times measured in this run, a step being
`jax.value_and_grad` of (cross-entropy + regularizer) plus an optax Adam update, jitted,
timed after compilation. The configurations are timed round-robin (one step of each in
turn, `repeats` rounds) so that load drifts on a shared machine hit them alike. The compute
dtype is bf16 on a GPU/TPU and fp32 on a CPU unless `--dtype` says otherwise.

* `div_step_ratio` (headline): DIV (weight 100, last block) / ERM at `--batch` (64) for the
  MNIST-CIFAR model (configs/mnist_cifar.py: 64 x 32 px, patch 4, width 256, depth 6, 8 heads);
  `div_step_ratio_mnist_cifar_paper_batch` the same at `--paper_batch` (80, the config's);
  `div_step_ratio_quickstart`: the quickstart model (32 x 16 px, width 64, depth 4, 4 heads)
  at `--batch`.
* `distance_step_ratio`, `similarity_step_ratio`: ARViT (paper variant: width 516, 6 blocks,
  12 heads, patch 16) at 224 x 224 px and `--arvit_batch` (default `--paper_batch`, 80,
  Section 4.3; a CPU takes minutes per step there, so it runs a smaller one), the paper's
  penalty (configs/arvit.py: distance 0.01, similarity 0.005) on block 0 / no penalty.
* `div_loop_over_vectorized` (4 heads) and `div_loop_over_vectorized_12_heads`: at
  `--loop_batch` (8), a width-192 ViT on 64 x 32 px, the DIV step with the per-head loop
  reference (one `jax.grad` per head w.r.t. a perturbation of that head's input only, then the
  ERM forward) / the one-pass version.

`--smoke` times the same configurations on tiny models (`SMOKE_DIV_SETTINGS`, `SMOKE_ARVIT`:
2 heads everywhere), batch 2, one round: it checks that the script runs, and its figures mean
nothing.
"""

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from vitreg_jax import models
from vitreg_jax import regularizers
from vitreg_jax.regularizers import div as reg_div


def cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def make_step(loss_fn, tx):
  """A jitted train step `(params, opt_state, images, labels) -> (params, opt_state, loss)`."""

  @jax.jit
  def step(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def reg_loss(reg):
  def loss_fn(params, images, labels):
    logits, _, total, _, _ = reg({'params': params}, images, labels=labels)
    return cross_entropy(logits, labels) + total
  return loss_fn


def loop_div_loss(model, layer, weight):
  """DIV with the slow reference: one backward pass per head (plus the ERM forward)."""

  def loss_fn(params, images, labels):
    variables = {'params': params}
    shapes = reg_div.perturbation_shapes(model, variables, images, (layer,), {})
    ((path, leaf),) = reg_div.head_input_leaves(shapes)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def p_star(delta, head):
      full = jnp.zeros(leaf.shape, leaf.dtype).at[:, head].set(delta)
      perturbations = jax.tree_util.tree_map_with_path(
          lambda p, z: full if p == path else z, zeros)
      logits, _ = model.apply({**variables, 'perturbations': perturbations}, images,
                              div_layers=(layer,),
                              capture_attention=tuple(range(layer, model.depth)))
      return jnp.sum(regularizers.prediction_target(logits))

    delta0 = jnp.zeros(leaf.shape[:1] + leaf.shape[2:], leaf.dtype)
    grads = jnp.stack([jax.grad(p_star)(delta0, h) for h in range(leaf.shape[1])], axis=1)
    logits, _ = model.apply(variables, images)
    return cross_entropy(logits, labels) + weight * regularizers.div_loss(grads)

  return loss_fn


def time_round_robin(steps, states, batch, repeats):
  """Median seconds per step of each named step function, timed in turns."""
  for name, step in steps.items():  # compile + one warm-up step each
    states[name] = jax.block_until_ready(step(*states[name], *batch))[:2]
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      out = jax.block_until_ready(step(*states[name], *batch))
      times[name].append(time.perf_counter() - start)
      states[name] = out[:2]
  return {name: statistics.median(t) for name, t in times.items()}


def setup(model, configs, batch, loss_overrides=None):
  tx = optax.adam(1e-4)
  # Jitted: one compile, where an eager init compiles every op of the model on its own.
  params = jax.jit(model.init)(jax.random.key(0), batch[0])['params']
  steps, states = {}, {}
  for name, config in configs.items():
    loss_fn = (loss_overrides or {}).get(name) or reg_loss(regularizers.build(config, model))
    steps[name] = make_step(loss_fn, tx)
    states[name] = (params, tx.init(params))
  return steps, states


# Model settings of the configs (configs/mnist_cifar.py, configs/quickstart.py, configs/arvit.py).
DIV_SETTINGS = {
    'mnist_cifar': (dict(width=256, depth=6, mlp_dim=512, num_heads=8, patch_size=4), (64, 32)),
    'quickstart': (dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=4), (32, 16)),
    'small_4_heads': (dict(width=192, depth=4, mlp_dim=384, num_heads=4, patch_size=4), (64, 32)),
    'small_12_heads': (dict(width=192, depth=4, mlp_dim=384, num_heads=12, patch_size=4),
                       (64, 32)),
}


# --smoke's: every configuration on one tiny model, so that its repeats (same HLO) come from
# the compilation cache where one is on (the test suite's): seconds, figures meaningless.
SMOKE_DIV_SETTINGS = {
    name: (dict(width=8, depth=1, mlp_dim=16, num_heads=2, patch_size=4), (8, 8))
    for name in DIV_SETTINGS}
PAPER_ARVIT = ({}, 224)  # (model kwargs over the paper variant, image size)
SMOKE_ARVIT = (dict(width=24, depth=1, num_heads=2, patch_size=8), 32)


def bench_arvit(batch_size, repeats, dtype, arvit=PAPER_ARVIT):
  """ARViT paper variant at 224 px; the paper's penalties (configs/arvit.py) on block 0."""
  kwargs, size = arvit
  model = models.create('arvit', num_classes=10, dtype=dtype, **kwargs)
  images = jax.random.normal(jax.random.key(1), (batch_size, size, size, 3))
  labels = jnp.arange(batch_size) % 10
  configs = {'none': [],
             'distance': [dict(name='distance', weight=0.01, layers=(0,))],
             'similarity': [dict(name='similarity', weight=0.005, layers=(0,))]}
  steps, states = setup(model, configs, (images, labels))
  return time_round_robin(steps, states, (images, labels), repeats)


def bench_div(setting, batch_size, repeats, dtype, loop=False, erm=True,
              settings=DIV_SETTINGS):
  """DIV on the last block (weight 100) vs ERM (and the per-head loop reference)."""
  geometry, (h, w) = settings[setting]
  model = models.create('vit', num_classes=2, head_zeroinit=False, dtype=dtype, **geometry)
  images = jax.random.normal(jax.random.key(1), (batch_size, h, w, 3))
  labels = jnp.arange(batch_size) % 2
  configs = {'div': [dict(name='div', weight=100.0, layers=(-1,))]}
  if erm:
    configs['erm'] = []
  overrides = {}
  if loop:
    configs['loop'] = None
    overrides['loop'] = loop_div_loss(model, model.depth - 1, 100.0)
  steps, states = setup(model, configs, (images, labels), overrides)
  return time_round_robin(steps, states, (images, labels), repeats)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64, help='headline batch (DIV, ARViT: 80)')
  parser.add_argument('--paper_batch', type=int, default=80)
  parser.add_argument('--arvit_batch', type=int, default=None,
                      help='ARViT penalties batch (default: --paper_batch)')
  parser.add_argument('--loop_batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--dtype', default=None, help='default: bfloat16 on GPU/TPU, else float32')
  parser.add_argument('--quick', action='store_true',
                      help='CPU run of the real models: batch 4 everywhere (paper batch 4, '
                           'loop batch 2), 3 rounds')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: tiny models, batch 2, 1 round (figures meaningless)')
  args = parser.parse_args(argv)
  if args.quick:
    args.batch, args.paper_batch, args.loop_batch, args.repeats = 4, 4, 2, 3
    args.arvit_batch = 4
  if args.smoke:
    args.batch = args.paper_batch = args.loop_batch = args.arvit_batch = 2
    args.repeats = 1
  return args


def main(argv=None):
  args = parse_args(argv)
  dtype = args.dtype or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
  b, pb, r = args.batch, args.paper_batch, args.repeats
  div_settings = SMOKE_DIV_SETTINGS if args.smoke else DIV_SETTINGS
  div = functools.partial(bench_div, settings=div_settings)
  mc = div('mnist_cifar', b, r, dtype)
  mc_paper = div('mnist_cifar', pb, r, dtype)
  qs = div('quickstart', b, r, dtype)
  arvit_batch = args.arvit_batch or pb
  arvit = bench_arvit(arvit_batch, r, dtype, SMOKE_ARVIT if args.smoke else PAPER_ARVIT)
  div4 = div('small_4_heads', args.loop_batch, r, dtype, loop=True, erm=False)
  div12 = div('small_12_heads', args.loop_batch, r, dtype, loop=True, erm=False)
  result = {
      'div_step_ratio': mc['div'] / mc['erm'],
      'div_step_ratio_mnist_cifar_paper_batch': mc_paper['div'] / mc_paper['erm'],
      'div_step_ratio_quickstart': qs['div'] / qs['erm'],
      'distance_step_ratio': arvit['distance'] / arvit['none'],
      'similarity_step_ratio': arvit['similarity'] / arvit['none'],
      'div_loop_over_vectorized': div4['loop'] / div4['div'],
      'div_loop_over_vectorized_12_heads': div12['loop'] / div12['div'],
      'step_seconds': {'mnist_cifar': mc, 'mnist_cifar_paper_batch': mc_paper,
                       'quickstart': qs, 'arvit_224': arvit, 'loop_4_heads': div4,
                       'loop_12_heads': div12},
      'batch_size': b, 'paper_batch_size': pb, 'arvit_batch_size': arvit_batch,
      'loop_batch_size': args.loop_batch,
      'repeats': r, 'dtype': dtype, 'quick': args.quick, 'smoke': args.smoke,
      'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
      'devices': jax.device_count(),
  }
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                    for k, v in result.items()}))


if __name__ == '__main__':
  main()
