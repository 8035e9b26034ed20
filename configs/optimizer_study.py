r"""Optimizer study ("How do ViTs work?" slides, project plan): ResNet vs ViT under SGD with
momentum, Adam, AdamW and SAM, over learning rate x weight decay.

The slides ask whether flattening the loss landscape helps ViTs, "by comparing training speed
and final accuracy of ResNet and ViT in different optimizers and their hyperparameter
settings". Each run is one (model, optimizer, lr, wd, seed); the report
(`python -m vitreg_jax.reports ROOT --target=...`) gives final accuracy, steps and wall time to a
target accuracy and the training-loss curves. Two datasets:

  data=cifar100  the paper's CIFAR-100 models of configs/how_vits_work.py (ViT-Ti/4, ResNet-50),
                 300 epochs, its augmentation and label smoothing; only the optimizer changes.
  data=dominoes  the embedded data, a 2-block ViT and a ResNet-18 of width 8, 150 steps,
                 3 learning rates per optimizer, one seed: 24 runs, small enough to sweep on
                 a CPU (README.md shows its report).

  python -m vitreg_jax.sweep configs/optimizer_study.py:data=dominoes --workdir=/runs/opt_dom
  python -m vitreg_jax.sweep configs/optimizer_study.py:data=cifar100 --workdir=/runs/opt_c100 \
      --slurm --sbatch_args='--gpus=1 --time=24:00:00'
  python -m vitreg_jax.main --config=configs/optimizer_study.py:model=vit,opt=sam,lr=0.1 \
      --workdir=/tmp/one_point

Arguments (`:key=value,...`): `model` ('vit' | 'resnet'), `opt` ('sgd' | 'adam' | 'adamw' |
'sam'), `lr` (0 = the optimizer's default below), `wd` (-1 = the optimizer's default),
`rho` (SAM radius, 0.05 as Foret et al.), `data`, `steps` (dominoes only), `seed`, `runlocal`.

Defaults (our choice; the slides give no recipe): SGD momentum 0.9, lr 0.1, coupled L2 5e-4
(the usual CIFAR ResNet recipe); Adam lr 1e-3, no decay; AdamW lr 1e-3, decoupled decay 0.05
(DeiT); SAM = SGD as above at the adversarial point, rho 0.05. Gradients are clipped at norm 1
on dominoes only (a 2-block ViT at lr 0.3 otherwise diverges within a few steps, which is
a finding about the lr, not a useful data point).
"""

import os

from vitreg_jax import config_lib
from vitreg_jax import sweep

MODELS = ("vit", "resnet")
OPTIMIZERS = ("sgd", "adam", "adamw", "sam")
DATASETS = ("dominoes", "cifar100")
# optimizer -> (lr, weight decay): the centre of each grid.
DEFAULTS = {"sgd": (0.1, 5e-4), "adam": (1e-3, 0.0), "adamw": (1e-3, 0.05),
            "sam": (0.1, 5e-4)}
# The learning rates swept around each default: about x1/3, x1 and x3.
LR_GRID = {"sgd": (0.03, 0.1, 0.3), "adam": (3e-4, 1e-3, 3e-3), "adamw": (3e-4, 1e-3, 3e-3),
           "sam": (0.03, 0.1, 0.3)}


def _how_vits_work():
  return config_lib.import_config(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "how_vits_work.py"))


def _dominoes(arg):
  config = config_lib.ml_collections.ConfigDict()
  config.model_name = arg.model
  if arg.model == "vit":
    config.model = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4,
                        classifier="token", posemb="learn")
  else:
    config.model = dict(depth=18, width=8, stem="cifar")
  config.data = dict(name="dominoes", train_split="train", eval_splits=("val_id", "val_ood"),
                     num_val=500)
  config.batch_size = 32
  config.eval_batch_size = 250
  config.total_steps = 20 if arg.runlocal else arg.steps
  config.schedule = dict(name="cosine", warmup_steps=config.total_steps // 10)
  config.log_every_steps = 5 if arg.runlocal else 25
  config.eval_every_steps = 10 if arg.runlocal else 25
  config.checkpoint_every_steps = config.total_steps
  config.keep_checkpoints = 1
  return config


def get_config(arg=None):
  """One point of the study: `model`, `opt`, `lr`, `wd` on `data` (argument string `arg`)."""
  arg = config_lib.parse_arg(arg, model="vit", opt="sgd", lr=0.0, wd=-1.0, rho=0.05,
                             data="dominoes", steps=150, seed=0, runlocal=False)
  for name, value, valid in (("model", arg.model, MODELS), ("opt", arg.opt, OPTIMIZERS),
                             ("data", arg.data, DATASETS)):
    if value not in valid:
      raise ValueError(f"{name} must be one of {valid}, got {value!r}.")
  if arg.data == "cifar100":
    config = _how_vits_work().get_config(
        f"model={arg.model},seed={arg.seed}" + (",runlocal" if arg.runlocal else ""))
  else:
    config = _dominoes(arg)
  config.seed = arg.seed
  config.runlocal = arg.runlocal
  lr, wd = DEFAULTS[arg.opt]
  lr = arg.lr or lr
  wd = wd if arg.wd < 0 else arg.wd
  optimizer = dict(name=arg.opt, lr=lr, weight_decay=wd)
  if arg.opt in ("sgd", "sam"):
    optimizer["momentum"] = 0.9
  if arg.opt == "sam":
    optimizer.update(base="sgd", rho=arg.rho)
  if arg.data == "dominoes":
    optimizer["grad_clip_norm"] = 1.0
  config.optimizer = optimizer
  return config


def get_sweep(arg=None):
  """The grid: models x optimizers x learning rates (x wd on CIFAR-100) x seeds.

  dominoes (24 runs, ~15 CPU-minutes on 2 cores): 2 models x 4 optimizers x 3 learning rates
  around each optimizer's default (LR_GRID) at its default weight decay, one seed (`lrs=1`:
  the default lr only; `seeds=2` adds seed 1 without renaming the seed-0 points). cifar100:
  2 models x 4 optimizers x 3 learning rates x weight decay (the default and 0) x 3 seeds.
  """
  arg = config_lib.parse_arg(arg, data="dominoes", lrs=3, seeds=0)
  if arg.data not in DATASETS:
    raise ValueError(f"data must be one of {DATASETS}, got {arg.data!r}.")
  if not 1 <= arg.lrs <= 3:
    raise ValueError(f"lrs must be 1, 2 or 3 (learning rates per optimizer), got {arg.lrs}.")
  seeds = tuple(range(arg.seeds or (1 if arg.data == "dominoes" else 3)))
  points = []
  for opt in OPTIMIZERS:
    lr, wd = DEFAULTS[opt]
    lr_axis = (lr,) if arg.lrs == 1 else LR_GRID[opt][:arg.lrs]
    if arg.data == "dominoes":
      grid = sweep.product(model=MODELS, opt=(opt,), lr=lr_axis, seed=seeds)
    else:
      grid = sweep.product(model=MODELS, opt=(opt,), lr=lr_axis,
                           wd=tuple(sorted({wd, 0.0}, reverse=True)), seed=seeds)
    points += [dict(p, data=arg.data) for p in grid]
  return points
