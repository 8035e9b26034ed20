r"""MNIST-CIFAR with ERM or DIV: the head-diversity poster's Table 1 ("ViT+ERM", "ViT+DIV").

Poster: "Learning Diverse Features in Vision Transformers for Improved Generalization"
(papers/diverse-vit-heads-poster.txt). Each 64x32 image stacks an MNIST digit (0/1, the simple
spurious feature) on a CIFAR-10 automobile/truck (the robust label); in train and `*_id` the
digit agrees with the label 90% of the time, in `*_ood` it is random. Prepare the data once
(`python -m vitreg_jax.data.prepare mnist_cifar --data_dir=D`), then:

  python -m vitreg_jax.main --config=configs/mnist_cifar.py:reg=erm --workdir=/tmp/mc_erm
  python -m vitreg_jax.main --config=configs/mnist_cifar.py:reg=div --workdir=/tmp/mc_div
  python -m vitreg_jax.main --config=configs/mnist_cifar.py:reg=div,runlocal --workdir=/tmp/mc

Arguments (`:key=value,...`):
  reg       'erm' | 'div' (DIV on the last block).
  div       'code' (default: the authors' code, which produced the poster's numbers: per-token
            normalized gradients, mean over batch x H x H; lambda 100, the value their README
            gives) | 'paper' (the
            poster's L_IG: sum over head pairs of squared dot products of the raw input
            gradients; lambda = PAPER_WEIGHT_FACTOR x MATCHED_SCALE[data], 1.1e11 on
            MNIST-CIFAR: see below and docs/configs.md).
  weight    lambda; < 0 (default) = the variant's value above.
  data      'mnist_cifar' (default) | 'dominoes': the same model and recipe on the embedded
            stand-in (32 x 16 images), for choosing lambda where MNIST-CIFAR is not at hand.
  steps     training steps with data=dominoes (default 600), when `epochs` is 0.
  epochs    data=dominoes: train this many epochs of the 10,000 training images at batch 80
            (125 steps each), evaluate after every epoch and decay at 70% and 80% of them, as
            the authors' 100-epoch schedule does (default 0: `steps` steps instead).
  lr        one learning rate for ERM and DIV alike (default < 0: the authors' per-method
            rates, ERM 1e-4 and DIV 1e-3); the equal-LR control of the poster's table.
  seed      run seed (the poster reports mean +- std over seeds).
  agreement P(digit = label) in train / `*_id` (0.9 as in the poster).
  residual  keep the residual around the last block's attention (default false: the authors'
            architecture, in every row, ERM included; true is our ablation, not theirs).
  runlocal  a 20-step smoke run: the same model with 2 blocks and heads of size 16, small
            batches.
  init      path of one of the authors' released checkpoints (ArmandNM/diverse-vit,
            `checkpoints/ckpt_erm_ep37.pth`, `ckpt_diverse_ep34.pth`) converted to `.npz` by
            `tools/convert_diverse_vit.py` (default '': none). Sets `init_from` (kind
            'diverse_vit', their head kept); the inputs are their [0, 1] pixels as in every
            row of this config (`UNIT_RANGE`, below). Import it as a run with
            `python -m vitreg_jax.import_weights --config=configs/mnist_cifar.py:init=P.npz
            --workdir=DIR`, then `heads` / the analyses read DIR; data=mnist_cifar only (the
            checkpoints are of 64 x 32 MNIST-CIFAR), with the default `residual`.

Every row (ERM, DIV code and paper) trains the authors' architecture: their
`Transformer.forward` (diverse_vit/models/vision_transformer.py) has no residual around the
last block's attention (`x = attn(x)`), whatever the loss. ERM and DIV differ only in the
regularizer and the authors' per-method learning rate (their README, "Experiments"). Every
evaluation also scores each head of the last block alone (`config.head_eval = '-1'`, their
`evaluate_epoch_head_combinations` in diverse_vit/training.py), so the tables report their
statistics (`scripts/reporting.py`, `get_experiment_summary`; docs/heads.md).

Training recipe (the authors' config/vision_diverse_mnist_cifar.yaml and README): Adam,
batch 80, 100 epochs, learning rate x0.1 at epochs 70 and 80; ERM lr 1e-4; DIV lr 1e-3 and
lambda = 100 on the last block. Evaluated on val_id, val_ood, test_id, test_ood (accuracy,
`spurious_accuracy`, per-group and worst-group accuracy).

Model: the poster does not state it; the authors' README and config give it
(ArmandNM/diverse-vit, config/vision_diverse_mnist_cifar.yaml; diverse_vit/models/
vision_transformer.py, lucidrains' vit-pytorch adapted): 64 x 32 input, patch 4 (a 16 x 8 grid
of 128 patches + CLS), width 64, depth 6, 4 heads of size 64 (`dim_head` 64 by default, so the
attention's inner width 256 differs from the residual width), MLP 128, query/key/value without
bias, CLS token, learned position embedding: 506,306 parameters, as theirs. Their head is
`nn.Linear` with PyTorch's default init; we use the same (`head_zeroinit=False,
head_init='pytorch'`) because with a zero head the top logit does not depend on the input, so
DIV's input gradients, its value and its parameter gradients are exactly zero at step 0 and the
regularizer only starts once cross-entropy has moved the head. The MLP's GELU is exact, as
PyTorch's (`gelu_approximate=False`), and every LayerNorm has PyTorch's eps 1e-5
(`layer_norm_eps=1e-5`: their `PreNorm` and `mlp_head` use `nn.LayerNorm(dim)`; flax's default
is 1e-6). Remaining difference, kept as in the rest of the library: their position embedding
and CLS token start from N(0, 1) (ours N(0, 0.02) and zeros).
"""

from vitreg_jax import config_lib

REGS = ("erm", "div")
DIV_VARIANTS = ("code", "paper")
DATASETS = ("mnist_cifar", "dominoes")
# `div=paper`'s lambda = PAPER_WEIGHT_FACTOR x the data's matched scale: the lambda at which the
# poster's raw-gradient term pushes the parameters as hard as the authors' term at lambda 100,
# at initialization (`python bench/div_scale.py --data=D --seeds=3 --batch=80`, median
# `weight_paper_by_grad`). The factor, 10, was the best of 1/10/100/1000 on `val_ood` of the
# embedded data (`get_sweep`; 69.0 vs 67.4 / 66.5 / 63.8, 1-2 seeds; docs/configs.md), as
# MNIST-CIFAR cannot be downloaded where it was tuned.
MATCHED_SCALE = {"mnist_cifar": 1.1e10, "dominoes": 1.2e9}
PAPER_WEIGHT_FACTOR = 10.0
# The authors' MNIST-CIFAR ViT (module docstring): 506,306 parameters with 2 classes.
AUTHORS_MODEL = dict(patch_size=4, width=64, depth=6, num_heads=4, head_dim=64, mlp_dim=128,
                     qkv_bias=False, classifier="token", posemb="learn", head_zeroinit=False,
                     head_init="pytorch", gelu_approximate=False, layer_norm_eps=1e-5,
                     **config_lib.AUTHORS_ARCHITECTURE)


# The authors' inputs: [0, 1] pixels (their `get_dataset` in diverse_vit/utils.py applies
# `ToTensor()` alone), in training, evaluation and when loading their checkpoints (`init`).
UNIT_RANGE = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def get_config(arg=None):
  """Returns the MNIST-CIFAR ERM / DIV config for the argument string `arg`."""
  arg = config_lib.parse_arg(arg, reg="erm", div="code", weight=-1.0, seed=0,
                             agreement=0.9, data="mnist_cifar", steps=600, epochs=0,
                             lr=-1.0, residual=False, runlocal=False, init="",
                             seeds=2, table=False)  # seeds, table: get_sweep's, unused here
  _check_choices(arg)
  config = config_lib.ml_collections.ConfigDict()
  config.seed = arg.seed
  config.runlocal = arg.runlocal
  config.model_name = "vit"
  config.model = dict(AUTHORS_MODEL, last_attn_residual=arg.residual)
  config.data = dict(name="mnist_cifar", agreement=arg.agreement, train_split="train",
                     eval_splits=("val_id", "val_ood", "test_id", "test_ood"), **UNIT_RANGE)
  config.batch_size = 80
  config.eval_batch_size = 400
  config.total_epochs = 100
  config.optimizer = dict(name="adam", lr=_learning_rate(arg))
  config.schedule = dict(name="step", boundary_epochs=(70, 80), decay_factor=0.1)
  if arg.reg == "div":
    config_lib.set_div_regularizer(config, impl=arg.div, weight=_div_weight(arg))
  config.head_eval = "-1"  # every head of the last block alone, at every evaluation
  config.log_every_steps = 100
  # The authors evaluate (every head alone too) after every epoch (diverse_vit/training.py,
  # `run_training`): 10,000 training images / batch 80 = 125 steps.
  config.eval_every_steps = 125
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  if arg.data == "dominoes":
    _use_dominoes(config, arg)
  if arg.init:
    _use_authors_checkpoint(config, arg)

  if arg.runlocal:
    config.model.update(depth=2, head_dim=16)
    config.batch_size = 16
    config.eval_batch_size = 64
    config.total_epochs = None
    config.total_steps = 20
    config.schedule = dict(name="step", boundaries=(14, 16), decay_factor=0.1)
    config.log_every_steps = 5
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 10
  return config


def _check_choices(arg):
  for name, choices in (("reg", REGS), ("div", DIV_VARIANTS), ("data", DATASETS)):
    if arg[name] not in choices:
      raise ValueError(f"{name} must be one of {choices}, got {arg[name]!r}.")
  if arg.steps <= 0:
    raise ValueError(f"steps must be positive, got {arg.steps}.")
  if arg.epochs < 0:
    raise ValueError(f"epochs must be >= 0 (0: use `steps`), got {arg.epochs}.")
  if arg.epochs and arg.data != "dominoes":
    raise ValueError("epochs=N sets the dominoes schedule; MNIST-CIFAR trains the authors' 100 "
                     "epochs (override --config.total_epochs instead).")


def _learning_rate(arg) -> float:
  """`lr` when given, else the authors' per-method rate (their README: ERM 1e-4, DIV 1e-3)."""
  if arg.lr > 0:
    return arg.lr
  return 1e-4 if arg.reg == "erm" else 1e-3


def _use_dominoes(config, arg):
  """The authors' model and recipe on the embedded stand-in (32 x 16 images: an 8 x 4 grid).

  Batch 80 and Adam at the per-method rates as on MNIST-CIFAR; validation and test splits of
  the authors' sizes (`val_ratio=0.2` of the 2000 CIFAR-10 test images of their two classes:
  400 and 1600 images per domain); the learning
  rate x0.1 at 70% and 80% of training (the authors' epochs 70 and 80 of 100). `epochs=N`:
  N epochs of 125 steps, evaluated (every head alone too) after each, as their
  `run_training`; else `steps` steps evaluated every 100. Selection reads the validation
  splits only.
  """
  config.data = dict(name="dominoes", train_split="train",
                     eval_splits=("val_id", "val_ood", "test_id", "test_ood"),
                     spurious_agreement=arg.agreement, num_train=10000, num_val=400,
                     num_test=1600, **UNIT_RANGE)
  config.batch_size = 80
  config.eval_batch_size = 500
  config.total_epochs = None
  if arg.epochs:
    per_epoch = 10000 // config.batch_size
    config.total_steps = arg.epochs * per_epoch
    config.eval_every_steps = per_epoch
    # At epoch boundaries, as MultiStepLR steps once per epoch (milestones 70, 80 of 100).
    milestones = (round(0.7 * arg.epochs), round(0.8 * arg.epochs))
    config.schedule = dict(name="step", boundaries=tuple(m * per_epoch for m in milestones),
                           decay_factor=0.1)
  else:
    config.total_steps = arg.steps
    config.eval_every_steps = 100
    config.schedule = dict(name="step",
                           boundaries=(int(0.7 * arg.steps), int(0.8 * arg.steps)),
                           decay_factor=0.1)
  config.checkpoint_every_steps = config.eval_every_steps * 4


def _use_authors_checkpoint(config, arg):
  """Starts from one of the authors' checkpoints (`init`): their weights, head included (the
  inputs are already their [0, 1] pixels, `UNIT_RANGE`)."""
  if arg.data != "mnist_cifar" or arg.residual or arg.runlocal:
    raise ValueError("init= loads the authors' MNIST-CIFAR model: use it with data=mnist_cifar, "
                     "without residual or runlocal (the checkpoint fixes the architecture).")
  config.init_from = dict(path=arg.init, kind="diverse_vit", reset_head=False)


def _div_weight(arg):
  """lambda: `weight` when given, else the variant's default for this dataset."""
  if arg.weight >= 0:
    return arg.weight
  if arg.div == "code":
    return config_lib.DIV_CODE_WEIGHT
  return PAPER_WEIGHT_FACTOR * MATCHED_SCALE[arg.data]


def get_sweep(arg=None):
  """Two sweeps, over `seeds` seeds (every method once before the next seed):

  * `table` (the poster's table with the authors' recipe on the embedded data): ERM and DIV at
    the authors' per-method learning rates, or both at `lr` (the equal-LR control: with
    `lr=0.001`, DIV's runs are the same as the first sweep's), each `epochs` epochs.

      python -m vitreg_jax.sweep configs/mnist_cifar.py:table,epochs=10,seeds=3 --workdir=/runs/poster
      python -m vitreg_jax.heads --table /runs/poster/*

  * otherwise, choosing `div=paper`'s lambda on validation: ERM, the authors' DIV, and the
    paper's DIV at 1x, 10x, 100x and 1000x the data's matched scale (MATCHED_SCALE).

      python -m vitreg_jax.sweep configs/mnist_cifar.py:data=dominoes --workdir=/runs/div_lambda
      python -m vitreg_jax.reports /runs/div_lambda

  Read `val_ood` (and `val_id`); never the test splits.
  """
  arg = config_lib.parse_arg(arg, data="dominoes", steps=600, epochs=0, seeds=2, table=False,
                             lr=-1.0)
  if arg.table:
    rate = {"lr": f"{arg.lr:g}"} if arg.lr > 0 else {}
    return [dict(data="dominoes", epochs=arg.epochs or 10, reg=reg, **rate, seed=seed)
            for seed in range(arg.seeds) for reg in ("erm", "div")]
  scale = MATCHED_SCALE[arg.data]
  methods = ([dict(reg="erm"), dict(reg="div", div="code")]
             + [dict(reg="div", div="paper", weight=f"{f * scale:.2g}")  # a readable name
                for f in (1.0, 10.0, 100.0, 1000.0)])
  return [dict(data=arg.data, **({"steps": arg.steps} if arg.data == "dominoes" else {}),
               **method, seed=seed)
          for seed in range(arg.seeds) for method in methods]  # every method once first
