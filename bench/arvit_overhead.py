"""ARViT's regularizer overheads end to end, the thesis' way: one JSON object.

    python bench/arvit_overhead.py                     # both (the paper's: slow on a CPU)
    python bench/arvit_overhead.py --settings=embedded # the CPU one only
    python bench/arvit_overhead.py --smoke             # seconds: checks it runs

The thesis reports the cost of its penalties as wall time per training epoch on ImageNet
(papers/arvit-attention-regularization.txt, Section 4.3: 16m44s for ARViT-Base, 18m20s with
the 2D-distance penalty, 18m44s with the region-similarity one, batch 80). An epoch is a fixed
number of identical steps through the same input pipeline, so the ratio of its training time
is the ratio of the steps' times (the evaluation, the same for every row, is left out); this bench measures that ratio for the rows `base`, `L<block>` and
`R1-<block>` of `configs/arvit.py` in one process, the rows timed in turns (one window of
`--window` steps each, `--windows` rounds) so that load drifts on a shared machine hit them
alike. A step is the training loop's own (`training.train.train_and_evaluate`'s pieces: the
config's objective with its regularizer, Adam with clipping and the cosine schedule, the
finite guard, uint8 batches normalized inside the step), synchronized once per window as the
loop is.

Settings (`--settings`):
* `embedded` (the CPU size): `configs/arvit.py:dataset=embedded_rotation` as trained on 2 cores
  (32 px, patch 4, width 96, batch 80), batches from the dataset's own training iterator
  (`device_batches`, as in training): the end-to-end step including the input pipeline.
* `paper`: the paper's model (`dataset=imagenet_rotation`: 224 px, patch 16, width 516) at
  batch `--paper_batch` (80, Section 4.3), on one synthetic uint8 batch on the device (no
  ImageNet needed; the input pipeline is the same for every row, so it would add the same
  time to each). Minutes per step on a CPU: run it on a GPU, or pass `--paper_batch 8`.

Output: `<setting>.<row>_over_base` for `distance` and `similarity`, median seconds per step of
every row, and `thesis_epoch_ratio` (the thesis' figures, ImageNet on their GPU: a different
machine, model size and dataset). `--smoke` runs the runlocal configs (width 48, batch 2, 32
px for `paper` too) cut to one block of two heads, for one window of one step: its figures
mean nothing.
"""

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from vitreg_jax import config_lib
from vitreg_jax import data
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import optim
from vitreg_jax.training import steps
from vitreg_jax.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The thesis' epoch times (Section 4.3), seconds: ARViT-Base, 2D distance, region similarity.
THESIS_EPOCH_S = {'base': 16 * 60 + 44, 'distance': 18 * 60 + 20, 'similarity': 18 * 60 + 44}
SETTINGS = ('embedded', 'paper')


def row_config(row: str, setting: str, args):
  """The config of one row in one setting (configs/arvit.py)."""
  dataset = 'embedded_rotation' if setting == 'embedded' else 'imagenet_rotation'
  arg = f'variant={row},dataset={dataset}' + (',runlocal' if args.smoke else '')
  config = config_lib.load_config_file(os.path.join(ROOT, f'configs/arvit.py:{arg}'))
  if setting == 'paper':
    config.batch_size = args.paper_batch
    if args.smoke:
      config.data.image_size = 32
  elif args.smoke:
    config.batch_size = 2
  if args.smoke:  # one block of two heads: seconds to compile (block 1 is regularized)
    config.model.update(depth=1, num_heads=2)
  config.total_steps, config.total_epochs = 1000, None  # the schedule's length only
  config.schedule = dict(name='cosine')
  return config_lib.with_defaults(config)


def build_row(config, mesh, synthetic: bool):
  """(jitted train step, initial state, batch iterator) of one row, as training builds them."""
  dataset = None if synthetic else data.open(config.data)
  num_classes = 4
  image_shape = ((config.data.image_size,) * 2 + (3,)) if synthetic else dataset.info.image_shape
  model = steps.create_model(config, num_classes)
  objective = objective_lib.Objective.from_config(config, model, dataset,
                                                 num_classes=num_classes)
  tx, _ = optim.make_optimizer(config, config.total_steps, None)
  state, shardings = steps.create_train_state(config, model, tx, image_shape, mesh,
                                              loss_state=objective.init_state)
  if synthetic:
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (config.batch_size, *image_shape), np.uint8),
             'label': np.arange(config.batch_size, dtype=np.int32) % num_classes}
    batches = train.device_batches(iter(lambda: batch, None), mesh)
    # An affine uint8 -> float map inside the step, as every dataset's; the same for every row.
    normalize = data.open(dict(name='embedded_rotation')).normalization
  else:
    batches = train.device_batches(
        dataset.train_iterator(global_batch_size=config.batch_size, seed=0), mesh,
        extra_keys=objective.batch_keys)
    normalize = dataset.normalization
  step = steps.jit_train_step(shardings, mesh, objective=objective, tx=tx, normalize=normalize)
  return step, state, batches


def time_rows(rows: dict, window: int, windows: int) -> dict:
  """Median seconds per step of each row, one window of each in turn (after a warm-up)."""
  states = {}
  for name, (step, state, batches) in rows.items():  # compile + one warm-up window
    for _ in range(window):
      state, _ = step(state, next(batches))
    states[name] = jax.block_until_ready(state)
  times = {name: [] for name in rows}
  for _ in range(windows):
    for name, (step, _, batches) in rows.items():
      state = states[name]
      start = time.perf_counter()
      for _ in range(window):
        state, measured = step(state, next(batches))
      jax.block_until_ready(measured)
      times[name].append((time.perf_counter() - start) / window)
      states[name] = state
  return {name: statistics.median(t) for name, t in times.items()}


def bench_setting(setting: str, args) -> dict:
  names = {'base': 'base', 'distance': f'L{args.block}', 'similarity': f'R1-{args.block}'}
  configs = {kind: row_config(row, setting, args) for kind, row in names.items()}
  mesh = train.make_mesh(configs['base'])
  rows = {kind: build_row(c, mesh, synthetic=setting == 'paper') for kind, c in configs.items()}
  seconds = time_rows(rows, args.window, args.windows)
  base = configs['base']
  return {
      'distance_over_base': seconds['distance'] / seconds['base'],
      'similarity_over_base': seconds['similarity'] / seconds['base'],
      'step_seconds': seconds, 'rows': names, 'batch_size': base.batch_size,
      'image_size': base.data.get('image_size') or 32,
      'width': base.model.get('width'), 'patch_size': base.model.get('patch_size')}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--settings', default=','.join(SETTINGS),
                      help=f'comma-separated subset of {SETTINGS}')
  parser.add_argument('--block', type=int, default=1,
                      help='regularized block k (rows Lk, R1-k; --smoke: 1)')
  parser.add_argument('--paper_batch', type=int, default=80)
  parser.add_argument('--window', type=int, default=10)
  parser.add_argument('--windows', type=int, default=5)
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: runlocal models, batch 2, one window of one step')
  args = parser.parse_args(argv)
  args.settings = [s for s in args.settings.split(',') if s]
  unknown = sorted(set(args.settings) - set(SETTINGS))
  if unknown:
    parser.error(f'unknown settings {unknown}; valid: {list(SETTINGS)}')
  if args.smoke:
    args.paper_batch, args.window, args.windows, args.block = 2, 1, 1, 1
  return args


def main(argv=None):
  args = parse_args(argv)
  result = {s: bench_setting(s, args) for s in args.settings}
  result['thesis_epoch_ratio'] = {k: THESIS_EPOCH_S[k] / THESIS_EPOCH_S['base']
                                  for k in ('distance', 'similarity')}
  result.update(window=args.window, windows=args.windows, smoke=args.smoke,
                backend=jax.default_backend(), device=jax.devices()[0].device_kind)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
