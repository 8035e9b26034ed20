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
            normalized gradients, mean over batch x H x H, no residual around the last
            block's attention; lambda 100, the value their README gives) | 'paper' (the
            poster's L_IG: sum over head pairs of squared dot products of the raw input
            gradients; lambda `config_lib.DIV_WEIGHTS['paper']`, an uncalibrated placeholder:
            see `bench/div_scale.py` and docs/configs.md; sweep `weight=` on validation).
  weight    lambda; < 0 (default) = the variant's value above.
  seed      run seed (the poster reports mean +- std over seeds).
  agreement P(digit = label) in train / `*_id` (0.9 as in the poster).
  runlocal  a 20-step smoke run: the same model with 2 blocks and heads of size 16, small
            batches.

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
PyTorch's (`gelu_approximate=False`). Remaining differences, kept as in the rest of the
library: their position embedding and CLS token start from N(0, 1) (ours N(0, 0.02) and
zeros) and their LayerNorm eps is 1e-5 (ours 1e-6).
"""

from vitreg_jax import config_lib

REGS = ("erm", "div")
DIV_VARIANTS = ("code", "paper")
# The authors' MNIST-CIFAR ViT (module docstring): 506,306 parameters with 2 classes.
AUTHORS_MODEL = dict(patch_size=4, width=64, depth=6, num_heads=4, head_dim=64, mlp_dim=128,
                     qkv_bias=False, classifier="token", posemb="learn", head_zeroinit=False,
                     head_init="pytorch", gelu_approximate=False)


def get_config(arg=None):
  """Returns the MNIST-CIFAR ERM / DIV config for the argument string `arg`."""
  arg = config_lib.parse_arg(arg, reg="erm", div="code", weight=-1.0, seed=0,
                             agreement=0.9, runlocal=False)
  if arg.reg not in REGS:
    raise ValueError(f"reg must be one of {REGS}, got {arg.reg!r}.")
  if arg.div not in DIV_VARIANTS:
    raise ValueError(f"div must be one of {DIV_VARIANTS}, got {arg.div!r}.")
  config = config_lib.ml_collections.ConfigDict()
  config.seed = arg.seed
  config.runlocal = arg.runlocal
  config.model_name = "vit"
  config.model = dict(AUTHORS_MODEL)
  config.data = dict(name="mnist_cifar", agreement=arg.agreement, train_split="train",
                     eval_splits=("val_id", "val_ood", "test_id", "test_ood"))
  config.batch_size = 80
  config.eval_batch_size = 400
  config.total_epochs = 100
  config.optimizer = dict(name="adam", lr=1e-4 if arg.reg == "erm" else 1e-3)
  config.schedule = dict(name="step", boundary_epochs=(70, 80), decay_factor=0.1)
  if arg.reg == "div":
    config_lib.set_div_regularizer(config, impl=arg.div,
                                   weight=arg.weight if arg.weight >= 0 else None)
  config.log_every_steps = 100
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2

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
