"""Training-step throughput of vitreg_jax against timm and the chip's limit; one JSON object.

    python bench/train_step.py                      # GPU defaults: bf16, batch 256, 224 px
    python bench/train_step.py --cpu_realistic      # this CPU: fp32, batch 8, 224 px, vs timm
    python bench/train_step.py --cpu_small          # small CPU run: fp32, batch 4, 64 px
    python bench/train_step.py --smoke              # seconds: a tiny ViT, checks it runs

For ViT-Ti/16, S/16, B/16 (1000 classes) and ARViT (paper variant, 10 classes), a full step of
the library's own `vitreg_jax.training.steps.train_step` (forward, backward, AdamW, finite check, the
parameters and optimizer state donated) on synthetic data already on the device:

* `images_per_s`: batch / median step time, timed in `--windows` windows of `--window` steps
  after `--warmup` steps (synchronized only at the end of a window, as the training loop runs).
* `xla_flops_per_image`: XLA's cost analysis of the compiled step / batch. `model_flops_per_image`:
  the analytic count (3 x forward: every matmul of the encoder, attention scores and values,
  patch embedding, head), the usual numerator of MFU. XLA does not count the FLOPs inside
  fused cuDNN attention, so on a GPU the two differ by the attention term.
* On a GPU: `mfu` = model FLOPs/s / `--peak_tflops` (989, the dense bf16 peak of an H100/H200
  SXM), `peak_memory_gib` (device allocator), and `max_batch` (largest batch whose compiled
  step fits the device memory, from XLA's memory analysis of the compiled step, doubling then
  bisecting to a multiple of 8; `--max_batch_models`).
* timm (when a Python with torch + timm is found: `--torch_python`, else this Python if it
  imports them, else /work/venv-torch): the matching `vit_*_patch16_224` at the same batch and
  size through `bench/timm_step.py`, and `ours_over_timm` = our images/s / timm's per model.
  The timm run happens first, in a subprocess, so the frameworks never share device memory.

`--cpu_realistic` is the CPU figure to quote: fp32 on both sides (no bf16 autocast on CPU),
batch 8, 224-px images (196 patches), no torch.compile, and `--interleave`: one timm process
(`timm_step.py --serve`) stays up and the two sides run one window each in turn, so load
drifts on a shared machine hit both alike. `--cpu_small` (batch 4, 64 px, 16 patches) is a
quick smoke run where per-op overheads dominate; its ratio flatters us. The JSON says which
(`setting`); neither says anything about a GPU. The one-command GPU run is `bench/gpu_run.sh`
(BENCHMARKS.md). `--smoke` runs the same code on a `tiny` ViT (width 32, 2 blocks, 32 px,
batch 2, one window of one step, no timm): it checks that the script runs, and its figures
mean nothing.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitreg_jax import models
from vitreg_jax.training import objective as objective_lib
from vitreg_jax.training import steps

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {  # name -> (model_name, kwargs, num_classes)
    'ti': ('vit', dict(variant='Ti/16'), 1000),
    's': ('vit', dict(variant='S/16'), 1000),
    'b': ('vit', dict(variant='B/16'), 1000),
    'arvit': ('arvit', dict(variant='paper'), 10),
    # --smoke's: the same code path in seconds (4 patches at 32 px).
    'tiny': ('vit', dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=16), 10),
}


def model_flops_per_image(model, image: int, num_classes: int) -> float:
  """Analytic training FLOPs per image: 3 x (2 x multiply-adds of the forward pass)."""
  p = model.patch_size
  n_patch = (image // p) ** 2
  n = n_patch + int(getattr(model, 'classifier', None) == 'token')
  d, depth = model.width, model.depth
  mlp = model.mlp_dim
  mlp_macs = 2 * d * mlp if mlp else d * d  # ARViT's mlp_dim=0: one D x D layer
  block = n * (4 * d * d + mlp_macs) + 2 * n * n * d  # qkv + out, MLP, scores + values
  head_in = d * n if model.__class__.__name__ == 'ARViT' else d
  forward = n_patch * 3 * p * p * d + depth * block + head_in * num_classes
  return 3 * 2 * float(forward)


def make_step(model, tx, num_classes, normalize=None):
  """The library's train step, jitted; `normalize` for uint8 batches (the loop's input)."""
  step = functools.partial(steps.train_step, tx=tx, normalize=normalize,
                           objective=objective_lib.Objective(model, num_classes=num_classes))
  return jax.jit(step, donate_argnums=0)


def new_state(model, tx, image):
  """A fresh train state (call under `jax.jit` or `jax.eval_shape`)."""
  variables = dict(model.init(jax.random.key(0), jnp.zeros((1, image, image, 3))))
  params = variables.pop('params')
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), model_state=variables,
                          rng=jax.random.key(1))


def synthetic_batch(batch, image, num_classes, uint8=False):
  """Random images on the device: normalized float32, or uint8 as the input pipeline gives."""
  keys = jax.random.split(jax.random.key(2))
  if uint8:
    images = jax.random.randint(keys[0], (batch, image, image, 3), 0, 256).astype(jnp.uint8)
  else:
    images = jax.random.normal(keys[0], (batch, image, image, 3), jnp.float32)
  return {'image': images,
          'label': jax.random.randint(keys[1], (batch,), 0, num_classes)}


def fits(model, tx, num_classes, batch, image, limit_bytes) -> bool:
  """Whether the compiled step at `batch` fits in `limit_bytes` (XLA memory analysis)."""
  state = jax.eval_shape(functools.partial(new_state, model, tx, image))
  data = {'image': jax.ShapeDtypeStruct((batch, image, image, 3), jnp.float32),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32)}
  try:
    mem = make_step(model, tx, num_classes).lower(state, data).compile().memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' in str(e) or 'memory' in str(e).lower():
      return False
    raise
  used = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return used <= limit_bytes


def max_batch(model, tx, num_classes, image, start, limit_bytes, max_tries=6):
  """Largest batch (multiple of 8) whose step fits: doubling from `start`, then bisection."""
  lo, hi, tries = 0, None, 0
  b = start
  while hi is None and tries < max_tries:
    tries += 1
    if fits(model, tx, num_classes, b, image, limit_bytes):
      lo, b = b, b * 2
    else:
      hi = b
  while hi is not None and hi - lo > 8 and tries < max_tries:
    tries += 1
    mid = (lo + hi) // 16 * 8
    lo, hi = (mid, hi) if fits(model, tx, num_classes, mid, image, limit_bytes) else (lo, mid)
  return lo or None


class OursRunner:
  """Our jitted step for one model: compiled at construction, then timed window by window."""

  def __init__(self, name, args):
    model_name, kwargs, self.num_classes = MODELS[name]
    self.model = models.create(model_name, self.num_classes, dtype=args.dtype, **kwargs)
    tx = optax.adamw(1e-3, weight_decay=0.05)
    self.step = make_step(self.model, tx, self.num_classes)
    self.state = jax.jit(functools.partial(new_state, self.model, tx, args.image))()
    self.batch = synthetic_batch(args.batch, args.image, self.num_classes)
    start = time.perf_counter()
    compiled = self.step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    self.cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.tx, self.measured = tx, None

  def window(self, steps: int) -> float:
    """Seconds per step over `steps` steps, synchronized at the end only."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, self.measured = self.step(self.state, self.batch)
    jax.block_until_ready(self.measured)
    return (time.perf_counter() - start) / steps

  def figures(self, name, seconds, args) -> dict:
    flops = model_flops_per_image(self.model, args.image, self.num_classes)
    out = {'images_per_s': args.batch / seconds, 'step_seconds': seconds,
           'compile_seconds': self.compile_s, 'model_flops_per_image': flops,
           'xla_flops_per_image': float(self.cost.get('flops', float('nan'))) / args.batch,
           'final_loss': float(self.measured['loss']),
           'finite': bool(self.measured['finite'])}
    device = jax.devices()[0]
    if device.platform == 'gpu':
      out['mfu'] = flops * out['images_per_s'] / (args.peak_tflops * 1e12)
      stats = device.memory_stats() or {}
      out['peak_memory_gib'] = stats.get('peak_bytes_in_use', 0) / 2**30
      if name in args.max_batch_models.split(','):
        limit = stats.get('bytes_limit', 0)
        out['max_batch'] = max_batch(self.model, self.tx, self.num_classes, args.image,
                                     args.batch, limit)
    return out


def bench_ours(name, args):
  runner = OursRunner(name, args)
  if args.warmup:
    runner.window(args.warmup)
  seconds = statistics.median(runner.window(args.window) for _ in range(args.windows))
  return runner.figures(name, seconds, args)


def find_torch_python(requested):
  if requested:
    return requested
  try:
    import timm, torch  # pylint: disable=g-import-not-at-top,unused-import,multiple-imports
    return sys.executable
  except ImportError:
    pass
  venv = '/work/venv-torch/bin/python'
  return venv if os.path.exists(venv) else None


def _timm_command(args, python, sizes, serve=False):
  return ([python, os.path.join(HERE, 'timm_step.py'), '--models', ','.join(sizes),
           '--batch', str(args.batch), '--image', str(args.image), '--dtype', args.dtype,
           '--warmup', str(args.warmup), '--window', str(args.window),
           '--windows', str(args.windows)] + (['--compile'] if args.timm_compile else [])
          + (['--serve'] if serve else []))


def _timm_python_and_sizes(args):
  """`(python, sizes, why)`: the Python to run timm with (None: skip it, `why` says why)."""
  sizes = [m for m in args.models.split(',') if m in ('ti', 's', 'b')]
  if args.no_timm:
    return None, sizes, '--no_timm'
  if not sizes:
    return None, sizes, 'no ViT-Ti/S/B model among --models'
  python = find_torch_python(args.torch_python)
  if not python:
    return None, sizes, ('no Python with torch + timm (--torch_python, this Python, '
                         '/work/venv-torch)')
  return python, sizes, ''


def bench_timm(args):
  """Runs bench/timm_step.py in a Python with torch + timm; None (with a reason) otherwise."""
  python, sizes, why = _timm_python_and_sizes(args)
  if not python:
    return None, why
  cmd = _timm_command(args, python, sizes)
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode:
    return None, f'timm_step.py failed: {res.stderr.strip()[-2000:]}'
  return json.loads(res.stdout.strip().splitlines()[-1]), ' '.join(cmd)


def bench_interleaved(args, result):
  """`--interleave`: ours and timm (a `timm_step.py --serve` process) one window each in
  turn, so a changing machine load hits both sides alike; median window of each."""
  python, sizes, why = _timm_python_and_sizes(args)
  if not python:
    raise SystemExit(f'--interleave needs a Python with torch + timm ({why}).')
  cmd = _timm_command(args, python, sizes, serve=True)
  timm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def ask(request):
    timm.stdin.write(request + '\n')
    timm.stdin.flush()
    return json.loads(timm.stdout.readline())

  result['timm'] = json.loads(timm.stdout.readline())
  result['timm_command'] = ' '.join(cmd)
  try:
    for name in args.models.split(','):
      load_before = os.getloadavg()
      ours = OursRunner(name, args)
      if args.warmup:
        ours.window(args.warmup)
      theirs_info = ask(f'build {name}') if name in sizes else None
      times = {'ours': [], 'timm': []}
      for _ in range(args.windows):
        times['ours'].append(ours.window(args.window))
        if theirs_info:
          times['timm'].append(ask('window')['step_seconds'])
      fig = ours.figures(name, statistics.median(times['ours']), args)
      fig.update(window_seconds=times, load_before=load_before, load_after=os.getloadavg())
      if theirs_info:
        fig['timm_images_per_s'] = args.batch / statistics.median(times['timm'])
        fig['ours_over_timm'] = fig['images_per_s'] / fig['timm_images_per_s']
        result['timm']['models'][name] = theirs_info
      result['models'][name] = fig
      del ours
  finally:
    timm.stdin.write('quit\n')
    timm.stdin.close()
    timm.wait()


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ti,s,b,arvit', help=f'subset of {sorted(MODELS)}')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--image', type=int, default=224)
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--window', type=int, default=10)
  parser.add_argument('--windows', type=int, default=5)
  parser.add_argument('--peak_tflops', type=float, default=989.0)
  parser.add_argument('--max_batch_models', default='b')
  parser.add_argument('--torch_python', default=None)
  parser.add_argument('--no_timm', action='store_true')
  parser.add_argument('--timm_compile', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--cpu_small', action='store_true',
                      help='fp32, batch 4, 64 px, 1 warm-up, 3 windows of 2 steps, no compile')
  parser.add_argument('--cpu_realistic', action='store_true',
                      help='fp32, batch 8, 224 px, 1 warm-up, 5 windows of 1 step, no '
                           'compile, interleaved with timm')
  parser.add_argument('--interleave', action='store_true',
                      help='time ours and timm window by window in turn (one run)')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: the tiny ViT, fp32, batch 2, 32 px, 1 warm-up, one window '
                           'of 1 step, no timm (figures meaningless)')
  args = parser.parse_args(argv)
  unknown = set(args.models.split(',')) - set(MODELS)
  if unknown:
    parser.error(f'unknown models {sorted(unknown)}; valid: {sorted(MODELS)}')
  if args.cpu_small:
    args.dtype, args.batch, args.image = 'float32', 4, 64
    args.warmup, args.window, args.windows, args.timm_compile = 1, 2, 3, False
  if args.cpu_realistic:
    args.dtype, args.batch, args.image, args.interleave = 'float32', 8, 224, True
    args.warmup, args.window, args.windows, args.timm_compile = 1, 1, 5, False
  if args.smoke:
    args.models, args.dtype, args.batch, args.image, args.no_timm = 'tiny', 'float32', 2, 32, True
    args.warmup, args.window, args.windows, args.interleave = 1, 1, 1, False
  return args


def setting(args) -> str:
  if args.smoke:
    return 'smoke: tiny ViT, fp32, batch 2, 32 px; checks the script runs, figures meaningless'
  if args.cpu_small:
    return 'cpu_small: fp32 both sides, batch 4, 64 px, no torch.compile; not a GPU figure'
  if args.cpu_realistic:
    return ('cpu_realistic: fp32 both sides, batch 8, 224 px, no torch.compile, windows '
            'interleaved with timm; not a GPU figure')
  return 'full'


def main(argv=None):
  args = parse_args(argv)
  timm_result, timm_command = (None, None) if args.interleave else bench_timm(args)
  device = jax.devices()[0]  # After the (non-interleaved) timm run: JAX takes the GPU now.
  result = {'setting': setting(args), 'backend': jax.default_backend(),
            'device': device.device_kind, 'jax': jax.__version__, 'dtype': args.dtype,
            'batch_size': args.batch, 'image_size': args.image, 'warmup': args.warmup,
            'window': args.window, 'windows': args.windows, 'peak_tflops': args.peak_tflops,
            'interleaved': args.interleave, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'models': {}}
  if args.interleave:
    bench_interleaved(args, result)
  else:
    for name in args.models.split(','):
      result['models'][name] = bench_ours(name, args)
    result['timm'] = timm_result if timm_result else {'skipped': timm_command}
    if timm_result:
      result['timm_command'] = timm_command
      for name, theirs in timm_result['models'].items():
        ours = result['models'][name]
        ours['timm_images_per_s'] = theirs['images_per_s']
        ours['ours_over_timm'] = ours['images_per_s'] / theirs['images_per_s']
  result['ours_over_timm'] = {k: v.get('ours_over_timm') for k, v in result['models'].items()}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
