"""Is the input pipeline ever the bottleneck? Real-data / synthetic-data step time; one JSON.

    python bench/input_ratio.py                 # GPU default: ViT-B/16, 224 px, bf16, batch 256
    python bench/input_ratio.py --cpu_small     # this CPU: ViT-Ti/16, 64 px, fp32, batch 8
    python bench/input_ratio.py --smoke         # seconds: checks it runs, figures meaningless

`real`: the training loop's own input path: the grain pipeline
(`vitreg_jax.data.pipeline.train_iterator`, one thread per core) over in-memory JPEGs
(`bench/data.py`'s generator, 300-500 px a side), the ImageNet-style train transform (decode,
random-resized crop to the model size, flip; uint8 out), batches moved to the device as uint8
by `inflight.prefetch_to_device`, normalized inside the step, and the step monitored by
`inflight.StepMonitor`, exactly as `train.train_and_evaluate` does. `synthetic`: the same loop
(same step, normalization included) on one uint8 batch already on the device.
`real_over_synthetic` = median real step time / median synthetic step time (target <= 1.05 on
the GPU at ViT-B/16 224 px). Also reported: the pipeline's own images/s without a model.
`--smoke` runs the same loops on `bench/train_step.py`'s tiny ViT at 32 px (batch 2, 4 JPEGs,
2 timed steps): it checks that the script runs, and its figures mean nothing.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data as bench_data  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step as bench_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from vitreg_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitreg_jax import sharding as shd  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitreg_jax.data import device_normalization  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitreg_jax.data import preprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from vitreg_jax.training import inflight  # pylint: disable=g-import-not-at-top,wrong-import-position


def host_batches(args, cores, transform):
  from vitreg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  jpegs = bench_data.make_jpegs(args.jpegs)
  source = [{'image': b, 'label': i % 1000} for i, b in enumerate(jpegs)]
  return pipeline.train_iterator(source, transform, global_batch_size=args.batch, seed=0,
                                 num_threads=cores, prefetch_batches=2 * cores)


def _raise(step, measured):
  raise FloatingPointError(f'non-finite step {step}: {measured}')


def run_loop(step, state, batches, steps, warmup, window):
  """Median seconds per step of the training loop's pattern, in windows of `window` steps."""
  monitor = inflight.StepMonitor(max_in_flight=3)
  times, n = [], 0
  start = time.perf_counter()
  for batch in batches:
    state, measured = step(state, batch)
    n += 1
    monitor.record(n, measured)
    if n == warmup or (n > warmup and (n - warmup) % window == 0):
      monitor.check(_raise)
      now = time.perf_counter()
      if n > warmup:
        times.append((now - start) / window)
      start = now
    if n == warmup + steps:
      break
  return statistics.median(times)


def setting(args) -> str:
  if args.smoke:
    return 'smoke: tiny ViT at 32 px, batch 2; checks the script runs, figures meaningless'
  if args.cpu_small:
    return 'cpu_small: ViT-Ti/16 at 64 px, batch 8; not the GPU target setting'
  return 'full'


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='b', choices=sorted(bench_step.MODELS))
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--image', type=int, default=224)
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--window', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--jpegs', type=int, default=512)
  parser.add_argument('--cpu_small', action='store_true',
                      help='ViT-Ti/16, 64 px, fp32, batch 8, 6 steps in windows of 2, 64 JPEGs')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: the tiny ViT, 32 px, fp32, batch 2, 1 warm-up + 2 steps in '
                           'windows of 1, 4 JPEGs (figures meaningless)')
  args = parser.parse_args(argv)
  if args.cpu_small:
    args.model, args.image, args.dtype, args.batch = 'ti', 64, 'float32', 8
    args.steps, args.window, args.warmup, args.jpegs = 6, 2, 2, 64
  if args.smoke:
    args.model, args.image, args.dtype, args.batch = 'tiny', 32, 'float32', 2
    args.steps, args.window, args.warmup, args.jpegs = 2, 1, 1, 4
  return args


def main(argv=None):
  args = parse_args(argv)
  cores = bench_data.num_cores()
  model_name, kwargs, num_classes = bench_step.MODELS[args.model]
  model = models.create(model_name, num_classes, dtype=args.dtype, **kwargs)
  tx = optax.adamw(1e-3, weight_decay=0.05)
  transform = preprocess.ImageTransform(size=args.image, train=True, augment=True,
                                        mean=preprocess.IMAGENET_MEAN,
                                        std=preprocess.IMAGENET_STD)
  step = bench_step.make_step(model, tx, num_classes,
                              normalize=device_normalization.of_transform(transform))
  init = jax.jit(functools.partial(bench_step.new_state, model, tx, args.image))
  mesh = shd.make_mesh()

  pipe = host_batches(args, cores, transform)
  next(pipe)
  start, count = time.perf_counter(), max(4, args.steps // 3)
  for _ in range(count):
    next(pipe)
  pipeline_ips = count * args.batch / (time.perf_counter() - start)

  synthetic = bench_step.synthetic_batch(args.batch, args.image, num_classes, uint8=True)
  forever = iter(lambda: synthetic, None)
  synthetic_s = run_loop(step, init(), forever, args.steps, args.warmup, args.window)
  real = inflight.prefetch_to_device(
      ({'image': b['image'], 'label': b['label'] % num_classes} for b in pipe), mesh)
  real_s = run_loop(step, init(), real, args.steps, args.warmup, args.window)
  print(json.dumps({
      'real_over_synthetic': real_s / synthetic_s,
      'real_step_seconds': real_s, 'synthetic_step_seconds': synthetic_s,
      'real_images_per_s': args.batch / real_s, 'synthetic_images_per_s': args.batch / synthetic_s,
      'pipeline_only_images_per_s': pipeline_ips, 'cores': cores,
      'model': args.model, 'batch_size': args.batch, 'image_size': args.image,
      'dtype': args.dtype, 'steps': args.steps, 'window': args.window,
      'setting': setting(args),
      'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind}))


if __name__ == '__main__':
  main()
