"""The timm half of `bench/train_step.py`: images/s of timm's ViT training step; one JSON object.

    python bench/timm_step.py --models ti,s,b --batch 256 [--dtype bfloat16] [--compile]
    python bench/timm_step.py --smoke     # seconds: ViT-Ti at 32 px, batch 2, fp32, 1 step

Runs in a Python that has torch and timm (never a dependency of vitreg_jax): on the lent GPU
machine the system `python3`; on this CPU machine /work/venv-torch (bench/make_torch_venv.sh,
whose stand-in torchvision only lets `import timm` succeed). `bench/train_step.py` starts it
as a subprocess, before JAX claims the GPU, so the two frameworks never share device memory.

The step is what a timm user who wants speed writes: `timm.create_model('vit_<size>_patch16_224',
num_classes=1000)`, bf16 autocast (`--dtype bfloat16`, CUDA only), `torch.compile(model)`
(`--compile`), fused AdamW (fallback: foreach), timm's default attention, which calls
`F.scaled_dot_product_attention` (flash / cuDNN kernels on an H100), synthetic data already on
the device, `zero_grad(set_to_none=True)`. Timing: `--windows` windows of `--window` steps
after `--warmup` steps, synchronized only at window ends; the median window gives images/s.
Without torch or timm it exits at once with one line that says so and how to get them.
"""

import argparse
import json
import statistics
import sys
import time

TIMM_NAMES = {'ti': 'vit_tiny_patch16_224', 's': 'vit_small_patch16_224',
              'b': 'vit_base_patch16_224'}


def _sync(device):
  import torch  # pylint: disable=g-import-not-at-top
  if device.type == 'cuda':
    torch.cuda.synchronize()


def make_optimizer(model, lr=1e-3, weight_decay=0.05):
  import torch  # pylint: disable=g-import-not-at-top
  try:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             fused=True), 'fused'
  except (RuntimeError, TypeError):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             foreach=True), 'foreach'


def make_step(size, args, device):
  """timm's training step for one ViT size: `(step() -> loss, info dict)`."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = timm.create_model(TIMM_NAMES[size], num_classes=1000, img_size=args.image)
  model = model.to(device).train()
  opt, opt_kind = make_optimizer(model)
  step_model = torch.compile(model) if args.compile else model
  autocast = args.dtype == 'bfloat16'
  images = torch.randn(args.batch, 3, args.image, args.image, device=device)
  labels = torch.randint(0, 1000, (args.batch,), device=device)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      loss = loss_fn(step_model(images), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  return step, {'timm_model': TIMM_NAMES[size], 'optimizer': f'AdamW ({opt_kind})',
                'params': sum(p.numel() for p in model.parameters())}


def timed_window(step, steps, device):
  """Seconds per step over `steps` steps, synchronized at the end only; and the last loss."""
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  _sync(device)
  return (time.perf_counter() - start) / steps, loss


def bench_model(size, args, device):
  """Median images/s of one timm ViT; returns a dict of figures and the settings used."""
  import torch  # pylint: disable=g-import-not-at-top
  step, info = make_step(size, args, device)
  start = time.perf_counter()
  for _ in range(args.warmup):
    step()
  _sync(device)
  warmup_s = time.perf_counter() - start
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
  windows = []
  for _ in range(args.windows):
    seconds, loss = timed_window(step, args.window, device)
    windows.append(seconds)
  seconds = statistics.median(windows)
  result = {**info, 'images_per_s': args.batch / seconds, 'step_seconds': seconds,
            'warmup_seconds': warmup_s, 'final_loss': loss.item()}
  if device.type == 'cuda':
    result['peak_memory_gib'] = torch.cuda.max_memory_allocated() / 2**30
  return result


def serve(args, device, header):
  """Interleaved mode (`--serve`, driven by `bench/train_step.py --interleave`): one JSON line
  per request read from stdin: `build SIZE` (model, optimizer, `--warmup` steps), `window`
  (`--window` steps of the last built model: `{"step_seconds"}`), `quit`."""
  print(json.dumps(header), flush=True)
  step, info = None, {}
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] == 'quit':
      break
    if words[0] == 'build':
      step, info = make_step(words[1], args, device)
      start = time.perf_counter()
      for _ in range(args.warmup):
        step()
      _sync(device)
      print(json.dumps({**info, 'warmup_seconds': time.perf_counter() - start}), flush=True)
    elif words[0] == 'window':
      seconds, loss = timed_window(step, args.window, device)
      print(json.dumps({'step_seconds': seconds, 'loss': loss.item()}), flush=True)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='ti,s,b')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--image', type=int, default=224)
  parser.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  parser.add_argument('--compile', action='store_true', help='torch.compile the model')
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--window', type=int, default=5)
  parser.add_argument('--windows', type=int, default=5)
  parser.add_argument('--serve', action='store_true',
                      help='take requests on stdin (bench/train_step.py --interleave)')
  parser.add_argument('--smoke', action='store_true',
                      help='seconds: ViT-Ti at 32 px, batch 2, fp32, 1 warm-up step, one '
                           'window of 1 step (figures meaningless)')
  args = parser.parse_args(argv)
  unknown = set(args.models.split(',')) - set(TIMM_NAMES)
  if unknown:
    parser.error(f'--models: unknown {sorted(unknown)}; valid: {sorted(TIMM_NAMES)}')
  if args.smoke:
    args.models, args.batch, args.image, args.dtype = 'ti', 2, 32, 'float32'
    args.warmup, args.window, args.windows, args.compile = 1, 1, 1, False
  return args


def import_torch_and_timm():
  """`(torch, timm)`, or exit with one line: they are never dependencies of vitreg_jax."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SystemExit(f'bench/timm_step.py needs torch and timm, which this Python '
                     f'({sys.executable}) lacks ({e}); make a virtualenv with '
                     f'bench/make_torch_venv.sh and run this script with its python.') from None
  return torch, timm


def main(argv=None):
  args = parse_args(argv)
  torch, timm = import_torch_and_timm()
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True  # What a speed-minded user sets.
    torch.backends.cudnn.allow_tf32 = True
  out = {'torch': torch.__version__, 'timm': timm.__version__, 'device': str(device),
         'device_name': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
         'dtype': args.dtype,
         'autocast_bf16': args.dtype == 'bfloat16', 'torch_compile': args.compile,
         'sdpa': 'F.scaled_dot_product_attention (timm fused_attn)',
         'batch_size': args.batch, 'image_size': args.image,
         'threads': torch.get_num_threads(), 'smoke': args.smoke, 'models': {}}
  if args.serve:
    serve(args, device, out)
    return
  for size in args.models.split(','):
    out['models'][size] = bench_model(size, args, device)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
