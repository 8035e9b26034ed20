"""Cost of head evaluation against the plain forward pass; prints one JSON object.

    python bench/heads.py                     # quickstart ViT + the `heads` command's wall time
    python bench/heads.py --model b16 --batch 256 --skip_command     # ViT-B/16 (a GPU)
    python bench/heads.py --smoke --run_dir=runs   # seconds: checks it runs, figures meaningless

* `mask_eval_over_eval`: images x masks per second of the head-mask evaluator
  (`vitreg_jax.heads.evaluate.MaskEvaluator`, all masks of one call on the same `--batch` images)
  over images per second of the training loop's eval step (`steps.eval_step`, unmasked) on
  the same model, batch and uint8 images, timed in alternating rounds (`--rounds`) so load
  drifts hit both; the median round of each. The masks are those of
  `heads --layer=all` (every head alone and removed, in every block: masks differ from the
  first block on, so nothing is shared between masks) and, as
  `mask_eval_over_eval_last_layer`, those of the default `--layer=-1`. Target (issue 21):
  `mask_eval_over_eval` >= 0.8, i.e. a mask costs no more than a forward pass of its images.
* `command`: wall time of `python -m vitreg_jax.heads --workdir=RUN` as a user runs it
  (`--select=oracle`, `--select=greedy`, `--layer=all`), each a fresh process (imports,
  checkpoint restore, data, compilation and evaluation), and the `compilations` each
  reports. RUN is the issue's size: the quickstart ViT (4 blocks, width 64, 4 heads, patch 4)
  trained `--steps` steps on 32 x 32 images (two embedded dominoes side by side, written as
  `npz` splits: `--num_train` train images) with 4 eval splits of `--num_eval` images (made
  once under `--run_dir`, which it creates, and reused when present).
  Target: under 30 s for `--select=oracle` on an idle 2-core machine.

`--smoke` is the smallest run of every part (batch 8, one round, a 2-step run on 64 + 4 x 16
images, `--select=oracle` only): it checks that the script works on a bare machine, and its
figures mean nothing.

The machine's load average (`os.getloadavg`) before and after is in the JSON.
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

from vitreg_jax import models
from vitreg_jax.data import device_normalization
from vitreg_jax.heads import evaluate
from vitreg_jax.heads import masks as masks_lib
from vitreg_jax.training import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name -> model kwargs (10 classes: the figures do not depend on the head size)
    'quickstart': dict(width=64, depth=4, mlp_dim=128, num_heads=4, patch_size=4,
                       classifier='token', posemb='learn'),
    'b16': dict(variant='B/16'),
}


def command_masks(depth, num_heads, layers):
  """The masks `heads` scores: the full model, every head of `layers` alone and removed."""
  alone, _ = masks_lib.head_masks(depth, num_heads, layers, 'alone')
  removed, _ = masks_lib.head_masks(depth, num_heads, layers, 'removed')
  return np.concatenate([np.ones((1, depth, num_heads), np.float32), alone, removed])


def _timed(fn):
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def evaluator_ratio(args) -> dict:
  """Images x masks / s of the mask evaluator over images / s of the eval step, alternating."""
  model = models.create('vit', 10, **MODELS[args.model])
  h, w = (int(s) for s in args.image.split(','))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, h, w, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (args.batch,)).astype(np.int32)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, h, w, 3)))
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                           opt_state=None, model_state={}, rng=None)
  normalize = device_normalization.Normalization((0.5,) * 3, (0.5,) * 3)
  eval_fn = jax.jit(functools.partial(steps.eval_step, model=model, normalize=normalize))
  batch = jax.device_put({'image': images, 'label': labels})  # As the loop's prefetch does.
  full = steps.all_heads_mask(model)
  depth, num_heads = masks_lib.model_shape(model)
  mask_sets = {'all': command_masks(depth, num_heads, range(depth)),
               'last_layer': command_masks(depth, num_heads, [depth - 1])}
  layers = {'all': tuple(range(depth)), 'last_layer': (depth - 1,)}
  evaluators = {k: evaluate.MaskEvaluator(model, layers=layers[k]) for k in mask_sets}
  runs = {'eval': lambda: eval_fn(state, batch, full)}
  for k, masks in mask_sets.items():
    runs[k] = functools.partial(evaluators[k], variables, images, labels, masks,
                                normalize=normalize)
  compile_s = {k: _timed(fn) for k, fn in runs.items()}  # First call: compilation.
  times = {k: [] for k in runs}
  for _ in range(args.rounds):
    for k, fn in runs.items():
      times[k].append(_timed(fn))
  med = {k: statistics.median(v) for k, v in times.items()}
  eval_ips = args.batch / med['eval']
  out = {'model': args.model, 'image': [h, w], 'batch': args.batch, 'rounds': args.rounds,
         'eval_images_per_s': eval_ips, 'first_call_seconds': compile_s}
  for k, masks in mask_sets.items():
    ips = args.batch * len(masks) / med[k]
    suffix = '' if k == 'all' else f'_{k}'
    out[f'num_masks{suffix}'] = len(masks)
    out[f'mask_images_per_s{suffix}'] = ips
    out[f'mask_eval_over_eval{suffix}'] = ips / eval_ips
    out[f'compilations{suffix}'] = evaluators[k].traces
  return out


SPLITS = ('train', 'val_id', 'val_ood', 'test_id', 'test_ood')
RUN_CONFIG = """from vitreg_jax import config_lib
def get_config(arg=None):
  qs = config_lib.import_config({quickstart!r}).get_config("steps={steps}")
  qs.data = dict(name="npz", path={path!r}, splits={splits!r}, train_split="train",
                 eval_splits={evals!r})
  qs.eval_every_steps = qs.checkpoint_every_steps = {steps}
  return qs
"""


def make_npz32(run_dir: str, num_train: int, num_eval: int) -> str:
  """The issue's data: 32 x 32 images (two dominoes side by side: the digit halves and the
  photo halves of example i and of example i+1 of the same split, labels and `spurious` of
  example i), `num_train` train and `num_eval` per eval split, as `npz` files."""
  from vitreg_jax.data import dominoes  # pylint: disable=g-import-not-at-top
  pattern = os.path.join(run_dir, f'npz32_train{num_train}_eval{num_eval}', '{split}.npz')
  os.makedirs(os.path.dirname(pattern), exist_ok=True)
  for split in SPLITS:
    n = num_train if split == 'train' else num_eval
    d = dominoes.load(split, num_train=n, num_val=n, num_test=n)
    images = np.concatenate([d['image'], np.roll(d['image'], -1, axis=0)], axis=2)
    np.savez(pattern.format(split=split), images=images, labels=d['label'],
             spurious=d['spurious'])
  return pattern


def run_command(cmd) -> None:
  """Runs a command from the repository root, quietly; on failure, raises with its last lines
  of output (a run on a lent machine must say why it stopped)."""
  res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  if res.returncode:
    tail = '\n'.join((res.stdout + res.stderr).strip().splitlines()[-20:])
    raise RuntimeError(f'{" ".join(cmd)} failed (exit {res.returncode}):\n{tail}')


def make_run(args) -> str:
  """The issue's run: quickstart ViT (patch 4), `--steps` steps, 32 x 32 images, 4 eval
  splits of `--num_eval` images (made once under `--run_dir`, reused when present)."""
  name = f'steps{args.steps}_train{args.num_train}_eval{args.num_eval}_32x32'
  workdir = os.path.join(args.run_dir, name)
  if os.path.exists(os.path.join(workdir, 'config.json')) and os.path.isdir(
      os.path.join(workdir, 'checkpoints')):
    return workdir
  os.makedirs(args.run_dir, exist_ok=True)  # A bare machine has no such folder yet.
  config_file = os.path.join(args.run_dir, f'{name}_config.py')
  data = make_npz32(args.run_dir, args.num_train, args.num_eval)
  with open(config_file, 'w') as f:
    f.write(RUN_CONFIG.format(quickstart=os.path.join(ROOT, 'configs', 'quickstart.py'),
                              steps=args.steps, path=data, splits=SPLITS, evals=SPLITS[1:]))
  run_command([sys.executable, '-m', 'vitreg_jax.main', f'--config={config_file}',
               f'--workdir={workdir}'])
  return workdir


def command_wall(workdir: str, extra, out_dir: str) -> dict:
  """Wall time of one `python -m vitreg_jax.heads` process and the compilations it reports."""
  out_dir = os.path.abspath(out_dir)  # The command runs from the repository root.
  start = time.perf_counter()
  run_command([sys.executable, '-m', 'vitreg_jax.heads', f'--workdir={workdir}',
               f'--out={out_dir}', '--no_progress', *extra])
  wall = time.perf_counter() - start
  with open(os.path.join(out_dir, 'heads.json')) as f:
    result = json.load(f)
  return {'wall_s': round(wall, 2), 'compilations': result.get('compilations'),
          'load_after': os.getloadavg()}


COMMAND_FLAGS = {'oracle': ['--select=oracle'], 'greedy': ['--select=greedy'],
                 'all': ['--layer=all', '--select=oracle']}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='quickstart', choices=sorted(MODELS))
  p.add_argument('--image', default=None, help='H,W (default: 32,32 quickstart, 224,224 b16)')
  p.add_argument('--batch', type=int, default=500, help="the eval batch (quickstart's 500)")
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--skip_command', action='store_true')
  p.add_argument('--commands', default='oracle,greedy,all',
                 help='which `heads` commands to time: oracle, greedy, all (--layer=all)')
  p.add_argument('--run_dir', default='/tmp/vitreg_bench_heads',
                 help='where the run and its data are made (created; reused when present)')
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--num_train', type=int, default=1000)
  p.add_argument('--num_eval', type=int, default=600)
  p.add_argument('--smoke', action='store_true',
                 help='seconds: batch 8, 1 round, a 2-step run on 64 + 4 x 16 images, '
                      'oracle only; checks the script runs (figures meaningless)')
  args = p.parse_args(argv)
  unknown = set(args.commands.split(',')) - set(COMMAND_FLAGS)
  if unknown:
    p.error(f'--commands: unknown {sorted(unknown)}; valid: {sorted(COMMAND_FLAGS)}')
  if args.smoke:
    args.batch, args.rounds, args.steps, args.num_train, args.num_eval = 8, 1, 2, 64, 16
    args.commands = 'oracle'
  args.image = args.image or ('32,32' if args.model == 'quickstart' else '224,224')
  # The commands run from the repository root: a relative folder means the caller's.
  args.run_dir = os.path.abspath(args.run_dir)
  return args


def main(argv=None):
  args = parse_args(argv)
  result = {'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
            'smoke': args.smoke, 'load_before': os.getloadavg(),
            'evaluator': evaluator_ratio(args)}
  result['mask_eval_over_eval'] = result['evaluator']['mask_eval_over_eval']
  if not args.skip_command:
    workdir = make_run(args)
    result['run'] = workdir
    result['command'] = {name: command_wall(workdir, COMMAND_FLAGS[name],
                                            os.path.join(args.run_dir, f'out_{name}'))
                         for name in args.commands.split(',')}
  result['load_after'] = os.getloadavg()
  print(json.dumps(result))


if __name__ == '__main__':
  main()
