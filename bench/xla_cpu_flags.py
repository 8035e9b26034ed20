"""XLA:CPU compiler options against the default on the realistic CPU training step; one JSON.

    python bench/xla_cpu_flags.py                   # ViT-Ti/16, 224 px, batch 8, fp32, AdamW
    python bench/xla_cpu_flags.py --models ti,s --rounds 5
    python bench/xla_cpu_flags.py --smoke           # seconds: train_step.py's tiny ViT, 32 px

The same jitted `steps.train_step` as `bench/train_step.py --cpu_realistic` is compiled once
per option set (`Lowered.compile(compiler_options=...)`, so all variants live in one process)
and the variants run one window each in turn for `--rounds` rounds, so load drifts hit them
alike. One train state passes through all variants in turn (each step donates it), so the
variants train one model between them. For each variant: the median seconds per step, the
windows, `over_default` (default time / its time: > 1 is faster), whether its last step was
finite and, for a variant XLA rejects, the error. A flag whose `over_default` stays within
the rounds' spread buys nothing. `--smoke` (the tiny ViT at 32 px, batch 2, one round of one
step) checks that the script runs; its figures mean nothing.
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

# bench/train_step.py (the model table, step, state and batch), wherever this file is run from.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = {
    'default': {},
    'onednn': {'xla_cpu_use_onednn': True},
    'xnnpack': {'xla_cpu_use_xnnpack': True},
    'fast_math': {'xla_cpu_enable_fast_math': True},
}


def compile_variants(model, tx, num_classes, state, batch, names):
  """`{name: compiled step or error string}` for each option set in `names`."""
  lowered = ts.make_step(model, tx, num_classes).lower(state, batch)
  out = {}
  for name in names:
    try:
      out[name] = lowered.compile(compiler_options=VARIANTS[name])
    except Exception as e:  # pylint: disable=broad-except
      out[name] = f'{type(e).__name__}: {str(e)[:200]}'
  return out


def window(compiled, state, batch, steps):
  start = time.perf_counter()
  for _ in range(steps):
    state, measured = compiled(state, batch)
  jax.block_until_ready(measured)
  return state, measured, (time.perf_counter() - start) / steps


def bench_model(name, args):
  model_name, kwargs, num_classes = ts.MODELS[name]
  model = ts.models.create(model_name, num_classes, dtype='float32', **kwargs)
  tx = optax.adamw(1e-3, weight_decay=0.05)
  state = jax.jit(functools.partial(ts.new_state, model, tx, args.image))()
  batch = ts.synthetic_batch(args.batch, args.image, num_classes)
  compiled = compile_variants(model, tx, num_classes, state, batch, args.variants.split(','))
  runnable = {k: v for k, v in compiled.items() if not isinstance(v, str)}
  times = {k: [] for k in runnable}
  finite = {}
  for k, fn in runnable.items():  # warm-up step each
    state, _, _ = window(fn, state, batch, 1)
  for _ in range(args.rounds):
    for k, fn in runnable.items():
      state, measured, seconds = window(fn, state, batch, args.window)
      times[k].append(seconds)
      finite[k] = bool(measured['finite'])
  base = statistics.median(times['default'])
  result = {}
  for k, v in compiled.items():
    if isinstance(v, str):
      result[k] = {'options': VARIANTS[k], 'error': v}
      continue
    median = statistics.median(times[k])
    result[k] = {'options': VARIANTS[k], 'step_seconds': median,
                 'windows': [round(t, 3) for t in times[k]],
                 'over_default': base / median, 'finite': finite[k]}
  return result


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='ti', help=f'subset of {sorted(ts.MODELS)}')
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help=f'subset of {list(VARIANTS)} (default first)')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--image', type=int, default=224)
  parser.add_argument('--window', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: the tiny ViT, 32 px, batch 2, one round of 1 step')
  args = parser.parse_args(argv)
  unknown = set(args.variants.split(',')) - set(VARIANTS)
  if unknown or not args.variants.startswith('default'):
    parser.error(f'--variants: start with default and choose from {list(VARIANTS)} '
                 f'(unknown: {sorted(unknown)}).')
  unknown = set(args.models.split(',')) - set(ts.MODELS)
  if unknown:
    parser.error(f'--models: unknown {sorted(unknown)}; valid: {sorted(ts.MODELS)}')
  if args.smoke:
    args.models, args.batch, args.image, args.window, args.rounds = 'tiny', 2, 32, 1, 1
  return args


def main(argv=None):
  args = parse_args(argv)
  out = {'setting': f'cpu, fp32, batch {args.batch}, {args.image} px, training step (AdamW)',
         'smoke': args.smoke,
         'jax': jax.__version__, 'devices': str(jax.devices()),
         'models': {m: bench_model(m, args) for m in args.models.split(',')}}
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  sys.exit(main())
